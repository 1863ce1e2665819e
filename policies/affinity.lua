-- affinity: keep a conversation on the backend that holds its KV cache. The session key
-- (header x-session-id, else a hash of the system prompt and first message) is mapped to
-- a backend by sy.hash: consistent hashing with bounded load, so sessions spread evenly,
-- a removed backend moves only its own sessions, and one hot session cannot push its
-- backend past 1.25x the average load plus one (it spills to its next choice). Requests without a
-- session go to the backend with the fewest in flight. The rest follow as failover.

local P = { name = "affinity" }

function P.route(req, backends)
  local first
  if req.session ~= nil then
    first = sy.hash(req.session, backends)
  end
  table.sort(backends, function(a, b)
    if a.inflight ~= b.inflight then return a.inflight < b.inflight end
    return a.name < b.name
  end)
  first = first or backends[1].name
  local order = { first }
  for _, b in ipairs(backends) do
    if b.name ~= first then order[#order + 1] = b.name end
  end
  return order
end

P.tests = {
  { name = "no session: least in flight", req = {},
    backends = { { name = "a", inflight = 3 }, { name = "b", inflight = 0 } }, expect = { "b", "a" } },
}

return P
