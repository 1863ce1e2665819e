-- weighted: smooth weighted round robin, as nginx does it. Over any window of
-- sum(weights) requests each backend gets exactly its weight's share, interleaved
-- (weights 5,1,1 give a a b a c a a, not a a a a a b c). The others follow as
-- failover candidates, heaviest first.
--
-- Configure with `weight:` on each backend. State (the current weights) is per worker
-- thread, so the split is exact per thread and within a few requests overall.

local P = { name = "weighted" }

local current = {}

function P.route(req, backends)
  local total, best, best_cw = 0, nil, nil
  for _, b in ipairs(backends) do
    local cw = (current[b.name] or 0) + b.weight
    current[b.name] = cw
    total = total + b.weight
    if best_cw == nil or cw > best_cw then
      best, best_cw = b, cw
    end
  end
  current[best.name] = current[best.name] - total

  local order = { best.name }
  table.sort(backends, function(a, b)
    if a.weight ~= b.weight then return a.weight > b.weight end
    return a.name < b.name
  end)
  for _, b in ipairs(backends) do
    if b.name ~= best.name then order[#order + 1] = b.name end
  end
  return order
end

local three = { { name = "a", weight = 5 }, { name = "b", weight = 1 }, { name = "c", weight = 1 } }
P.tests = {
  { name = "nginx order 1", req = {}, backends = three, expect_first = "a" },
  { name = "nginx order 2", req = {}, backends = three, expect_first = "a" },
  { name = "nginx order 3", req = {}, backends = three, expect_first = "b" },
  { name = "nginx order 4", req = {}, backends = three, expect_first = "a" },
  { name = "nginx order 5", req = {}, backends = three, expect_first = "c" },
  { name = "nginx order 6", req = {}, backends = three, expect_first = "a" },
  { name = "nginx order 7", req = {}, backends = three, expect = { "a", "b", "c" } },
}

return P
