-- least_inflight: the backend with the fewest requests in flight first, then the next
-- least loaded as failover candidates: params.candidates of them in all (default 4,
-- enough for the default attempt cap of 3). Ties are broken by a rotating offset so idle
-- backends share the traffic instead of the first one taking it all.
--
-- It keeps the best few in a single pass rather than sorting: with 32 backends a sort
-- would read every backend's fields again on each of ~160 comparisons. Each VM
-- instruction costs time (and counts against the budget), so the pass does as little as
-- it can for a backend that cannot make the list, and reuses one scratch list.

local P = { name = "least_inflight" }

local turn = 0
-- Scratch lists, one per worker thread, reused by every call: the best loads so far, in
-- order (top[0] is below every load, so the insertion loop needs no bounds check), and the
-- answer (read as soon as `route` returns, so it can be reused too).
local top, order = { [0] = -1 }, {}

-- Put `load` into its place among top[1..last - 1] (sorted), moving the larger ones up
-- into top[last].
local function place(load, last)
  local j = last
  while top[j - 1] > load do
    top[j] = top[j - 1]
    j = j - 1
  end
  top[j] = load
end

function P.route(req, backends)
  local n = #backends
  turn = turn + 1
  local t = turn
  local params = req.params
  local k = (params and params.candidates or 4) // 1
  if k > n then k = n elseif k < 0 then k = 0 end
  -- A backend's `load` is its in-flight count times n plus a rotation: unique per backend,
  -- so ties are shared out, and it gives the position back: i = (load - t - 1) % n + 1.
  for i = 1, k do
    place(backends[i].inflight * n + (i + t) % n, i)
  end
  -- The rest: one field read and one comparison for a backend that cannot make the list
  -- (more in flight than the k-th best so far).
  local worst = top[k]
  local most = worst // n
  for i = k + 1, n do
    local inflight = backends[i].inflight
    if inflight <= most then
      local load = inflight * n + (i + t) % n
      if load < worst then
        place(load, k)
        worst = top[k]
        most = worst // n
      end
    end
  end
  for j = 1, k do
    order[j] = backends[(top[j] - t - 1) % n + 1].name
  end
  order[k + 1] = nil
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
  { name = "the best few out of many, whatever their order",
    req = { model = "m", params = { candidates = 3 } },
    backends = { { name = "a", inflight = 9 }, { name = "b", inflight = 4 }, { name = "c", inflight = 8 },
                 { name = "d", inflight = 0 }, { name = "e", inflight = 7 }, { name = "f", inflight = 2 },
                 { name = "g", inflight = 6 }, { name = "h", inflight = 5 } },
    expect = { "d", "f", "b" } },
}

return P
