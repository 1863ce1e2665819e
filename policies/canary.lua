-- canary: send params.percent (default 10) percent of traffic to the backends tagged
-- `track = "canary"`, the rest to the others: for model version roll-outs and A/B tests.
-- The split is sticky: a session (req.session), else a tenant, always lands on the same
-- side. Anonymous requests without a session share one tenant name, so they are split at
-- random instead (one key would send them all to the same side). A canary request fails over to the stable pool; a stable one never to the canary,
-- unless no stable backend is offered at all (then the canary serves rather than none).
-- params.key = "tenant" makes the tenant the sticky key even when a session exists.

local P = { name = "canary" }

-- FNV-1a, 32 bit: a stable bucket for a key.
local function bucket(key)
  local h = 2166136261
  for i = 1, #key do
    h = ((h ~ string.byte(key, i)) * 16777619) & 0xffffffff
  end
  return h % 10000
end

local function by_inflight(list, out)
  table.sort(list, function(a, b)
    if a.inflight ~= b.inflight then return a.inflight < b.inflight end
    return a.name < b.name
  end)
  for _, b in ipairs(list) do out[#out + 1] = b.name end
end

function P.route(req, backends)
  local params = req.params or {}
  local percent = params.percent or 10
  local canary, stable = {}, {}
  for _, b in ipairs(backends) do
    if b.tags.track == "canary" then canary[#canary + 1] = b else stable[#stable + 1] = b end
  end
  local key = req.session
  if params.key == "tenant" or key == nil then key = req.tenant end
  local to_canary
  if key == nil or key == "anonymous" and req.session == nil then
    to_canary = sy.random() * 100 < percent
  else
    to_canary = bucket(key) < percent * 100
  end
  local order = {}
  if to_canary and #canary > 0 then
    by_inflight(canary, order)
    by_inflight(stable, order)
  elseif #stable > 0 then
    by_inflight(stable, order)
  else
    by_inflight(canary, order)
  end
  return order
end

local pool = { { name = "stable-1" }, { name = "canary-1", tags = { track = "canary" } } }
P.tests = {
  { name = "0% never canaries", req = { session = "s1", params = { percent = 0 } }, backends = pool, expect = { "stable-1" } },
  { name = "100% always canaries, stable as failover", req = { session = "s1", params = { percent = 100 } },
    backends = pool, expect = { "canary-1", "stable-1" } },
  { name = "no stable backend offered: the canary serves", req = { session = "s1", params = { percent = 0 } },
    backends = { pool[2] }, expect = { "canary-1" } },
}

return P
