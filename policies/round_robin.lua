-- round_robin: each request goes to the next backend in turn; the next ones in the
-- rotation follow as failover candidates: params.candidates of them in all (default 4,
-- enough for the default attempt cap of 3 — raise it with a route's max_attempts).
--
-- The cursor is a local of this file, so each worker thread keeps its own; over many
-- requests every backend still gets an equal share.

local P = { name = "round_robin" }

local cursor = 0
-- The answer, reused by every call of this thread: Switchyard reads it as soon as `route`
-- returns, and a new table per call (grown key by key) cost more than the rest of the call.
local order = {}

function P.route(req, backends)
  local n = #backends
  cursor = cursor % n + 1
  -- Plain comparisons rather than math.min: each read of a sandboxed global or library,
  -- and each call into C, costs more than the rest of this line.
  local params = req.params
  local k = params and params.candidates or 4
  if k > n then k = n end
  for i = 0, k - 1 do
    order[i + 1] = backends[(cursor - 1 + i) % n + 1].name
  end
  order[k + 1] = nil
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
  { name = "at most params.candidates names",
    req = { model = "m", params = { candidates = 2 } },
    backends = { { name = "a" }, { name = "b" }, { name = "c" } },
    expect = { "c", "a" } },
  { name = "a single backend",
    req = { model = "m" },
    backends = { { name = "only" } },
    expect = "only" },
}

return P
