-- failover: a fixed chain. Backends are tried in the order of params.chain (a list of
-- backend names) when the route gives one, else of their tag `order` ("1" primary, "2"
-- backup, "3" secondary, ...). Backends the chain does not name follow it, by their tag
-- `order`; untagged backends come last, by name.

local P = { name = "failover" }

function P.route(req, backends)
  local params = req.params or {}
  local rank = {}
  if params.chain then
    for i, name in ipairs(params.chain) do rank[name] = i end
  end
  local function tag(b) return tonumber(b.tags.order) or math.huge end
  table.sort(backends, function(a, b)
    local ra, rb = rank[a.name] or math.huge, rank[b.name] or math.huge
    if ra ~= rb then return ra < rb end
    if tag(a) ~= tag(b) then return tag(a) < tag(b) end
    return a.name < b.name
  end)
  local order = {}
  for i, b in ipairs(backends) do order[i] = b.name end
  return order
end

P.tests = {
  { name = "by tag order", req = {},
    backends = { { name = "c", tags = { order = "3" } }, { name = "a", tags = { order = "1" } }, { name = "b", tags = { order = "2" } } },
    expect = { "a", "b", "c" } },
  { name = "the route's chain wins", req = { params = { chain = { "b", "a" } } },
    backends = { { name = "a" }, { name = "b" }, { name = "z" } },
    expect = { "b", "a", "z" } },
  { name = "the chain comes before any tag", req = { params = { chain = { "b", "a" } } },
    backends = { { name = "a" }, { name = "t", tags = { order = "1" } }, { name = "b" },
      { name = "z" }, { name = "u", tags = { order = "2" } } },
    expect = { "b", "a", "t", "u", "z" } },
  { name = "when the primary is down it is simply not a candidate", req = {},
    backends = { { name = "b", tags = { order = "2" } }, { name = "c", tags = { order = "3" } } },
    expect = { "b", "c" } },
}

return P
