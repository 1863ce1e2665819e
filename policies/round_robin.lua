-- round_robin: each request goes to the next backend in turn; the others follow as
-- failover candidates, in order.
--
-- The cursor is a local of this file, so each worker thread keeps its own; over many
-- requests every backend still gets an equal share.

local P = { name = "round_robin" }

local cursor = 0

function P.route(req, backends)
  local n = #backends
  cursor = cursor % n + 1
  local order = {}
  for i = 0, n - 1 do
    order[i + 1] = backends[(cursor - 1 + i) % n + 1].name
  end
  return order
end

P.tests = {
  { name = "first call starts at the first backend",
    req = { model = "m" },
    backends = { { name = "a" }, { name = "b" }, { name = "c" } },
    expect = { "a", "b", "c" } },
  { name = "the next call moves on by one",
    req = { model = "m" },
    backends = { { name = "a" }, { name = "b" }, { name = "c" } },
    expect = { "b", "c", "a" } },
  { name = "a single backend",
    req = { model = "m" },
    backends = { { name = "only" } },
    expect = "only" },
}

return P
