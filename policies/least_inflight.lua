-- least_inflight: the backend with the fewest requests in flight first, then the next
-- least loaded as failover candidates: params.candidates of them in all (default 4,
-- enough for the default attempt cap of 3). Ties are broken by a rotating offset so idle
-- backends share the traffic instead of the first one taking it all.
--
-- It selects the best few in one pass each rather than sorting: with 32 backends a sort
-- would read every backend's fields again on each of ~160 comparisons.

local P = { name = "least_inflight" }

local turn = 0

function P.route(req, backends)
  local n = #backends
  turn = turn + 1
  local k = math.min(n, (req.params and req.params.candidates) or 4)
  -- One number per backend: in-flight count first, rotation second (unique per backend).
  local load = {}
  for i = 1, n do
    load[i] = backends[i].inflight * n + (i + turn) % n
  end
  local order = {}
  for j = 1, k do
    local best, best_i = math.huge, 1
    for i = 1, n do
      if load[i] < best then
        best, best_i = load[i], i
      end
    end
    order[j] = backends[best_i].name
    load[best_i] = math.huge
  end
  return order
end

P.tests = {
  { name = "fewest in flight first",
    req = { model = "m" },
    backends = { { name = "a", inflight = 3 }, { name = "b", inflight = 1 }, { name = "c", inflight = 2 } },
    expect = { "b", "c", "a" } },
  { name = "a busy backend goes last even when listed first",
    req = { model = "m" },
    backends = { { name = "busy", inflight = 9 }, { name = "idle", inflight = 0 } },
    expect = { "idle", "busy" } },
  { name = "only the best few are returned",
    req = { model = "m", params = { candidates = 2 } },
    backends = { { name = "a", inflight = 5 }, { name = "b", inflight = 1 }, { name = "c", inflight = 7 }, { name = "d", inflight = 3 } },
    expect = { "b", "d" } },
}

return P
