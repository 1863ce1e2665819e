-- least_inflight: the backend with the fewest requests in flight first, then the others
-- by the same measure as failover candidates. Ties are broken by a rotating offset so
-- idle backends share the traffic instead of the first one taking it all.

local P = { name = "least_inflight" }

local turn = 0

function P.route(req, backends)
  local n = #backends
  turn = turn + 1
  local rank = {}
  for i = 1, n do
    rank[backends[i].name] = (i + turn) % n
  end
  table.sort(backends, function(a, b)
    if a.inflight ~= b.inflight then
      return a.inflight < b.inflight
    end
    return rank[a.name] < rank[b.name]
  end)
  local order = {}
  for i = 1, n do
    order[i] = backends[i].name
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
}

return P
