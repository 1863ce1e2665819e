-- least_inflight: the backend with the fewest requests in flight first, then the next
-- least loaded as failover candidates: params.candidates of them in all (default 4,
-- enough for the default attempt cap of 3). Ties are broken by a rotating offset so idle
-- backends share the traffic instead of the first one taking it all.
--
-- It keeps the best few in a single pass rather than sorting: with 32 backends a sort
-- would read every backend's fields again on each of ~160 comparisons.

local P = { name = "least_inflight" }

local turn = 0

function P.route(req, backends)
  local n = #backends
  turn = turn + 1
  local k = math.min(n, (req.params and req.params.candidates) or 4)
  -- One pass keeps the k least loaded, sorted: `load` is the in-flight count first and a
  -- rotation second, unique per backend so ties are shared out.
  local top_load, top_index, count = {}, {}, 0
  for i = 1, n do
    local load = backends[i].inflight * n + (i + turn) % n
    if count < k or load < top_load[count] then
      local j = count < k and count + 1 or count
      while j > 1 and top_load[j - 1] > load do
        top_load[j], top_index[j] = top_load[j - 1], top_index[j - 1]
        j = j - 1
      end
      top_load[j], top_index[j] = load, i
      if count < k then count = count + 1 end
    end
  end
  local order = {}
  for j = 1, count do
    order[j] = backends[top_index[j]].name
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
