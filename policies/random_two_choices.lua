-- random_two_choices: the power of two random choices. Pick two backends at random and
-- send to the one with fewer requests in flight (relative to its weight); the other
-- follows, then the rest by the same measure. Nearly as good as least_inflight, without
-- herding every thread onto the same idle backend at once.

local P = { name = "random_two_choices" }

local function load(b)
  return (b.inflight + 1) / b.weight
end

function P.route(req, backends)
  local n = #backends
  if n == 1 then return backends[1].name end
  local i = sy.random(n)
  local j = sy.random(n - 1)
  if j >= i then j = j + 1 end
  local a, b = backends[i], backends[j]
  if load(b) < load(a) then a, b = b, a end
  local order = { a.name, b.name }
  table.sort(backends, function(x, y) return load(x) < load(y) end)
  for _, x in ipairs(backends) do
    if x.name ~= a.name and x.name ~= b.name then order[#order + 1] = x.name end
  end
  return order
end

P.tests = {
  { name = "of two, the less loaded", req = {},
    backends = { { name = "busy", inflight = 8 }, { name = "idle", inflight = 0 } },
    expect = { "idle", "busy" } },
  { name = "one backend", req = {}, backends = { { name = "only" } }, expect = "only" },
}

return P
