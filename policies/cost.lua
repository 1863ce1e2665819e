-- cost: the cheapest backend for this request that is behaving, then the next cheapest.
--
-- Price of a request = tokens * cost_in + (max_tokens or params.output_tokens, default 256)
-- * cost_out.
-- A backend is behaving when error_rate <= params.max_error_rate (default 0.05) and, if
-- params.max_latency_ms is set, latency_ms <= it. Behaving backends come first, cheapest
-- first; the others follow (cheapest first) as a last resort.

local P = { name = "cost" }

function P.route(req, backends)
  local params = req.params or {}
  local out_tokens = req.max_tokens or params.output_tokens or 256
  local max_err = params.max_error_rate or 0.05
  local max_lat = params.max_latency_ms
  local price, ok = {}, {}
  for _, b in ipairs(backends) do
    price[b.name] = req.tokens * b.cost_in + out_tokens * b.cost_out
    ok[b.name] = b.error_rate <= max_err and (max_lat == nil or b.latency_ms <= max_lat)
  end
  table.sort(backends, function(a, b)
    if ok[a.name] ~= ok[b.name] then return ok[a.name] end
    if price[a.name] ~= price[b.name] then return price[a.name] < price[b.name] end
    return a.name < b.name
  end)
  local order = {}
  for i, b in ipairs(backends) do order[i] = b.name end
  return order
end

P.tests = {
  { name = "cheapest first", req = { tokens = 1000, max_tokens = 100 },
    backends = { { name = "premium", cost_in = 2.5, cost_out = 10 }, { name = "cheap", cost_in = 0.2, cost_out = 0.6 } },
    expect = { "cheap", "premium" } },
  { name = "a failing cheap backend goes last", req = { tokens = 1000 },
    backends = { { name = "premium", cost_in = 2.5, cost_out = 10 }, { name = "cheap", cost_in = 0.2, cost_out = 0.6, error_rate = 0.5 } },
    expect = { "premium", "cheap" } },
  { name = "too slow counts as misbehaving", req = { tokens = 10, params = { max_latency_ms = 500 } },
    backends = { { name = "cheap", cost_in = 0.1, latency_ms = 900 }, { name = "dear", cost_in = 1, latency_ms = 100 } },
    expect = { "dear", "cheap" } },
}

return P
