-- content: route by what the request is.
--   * long prompts (req.tokens > params.long_tokens, default 8000) go only to backends
--     tagged `context = "long"`;
--   * small prompts (req.tokens < params.small_tokens, default 1000) prefer backends
--     tagged `tier = "cheap"`;
--   * a backend tagged `family = "<prefix>"` is preferred for models starting with it
--     (e.g. family = "llama" for llama-3.1-8b), pooling a model family on its hardware.
-- Within the preferred group, fewest in flight first; the rest follow as failover (for
-- long prompts, only long-context backends are ever returned).

local P = { name = "content" }

local function by_inflight(list)
  table.sort(list, function(a, b)
    if a.inflight ~= b.inflight then return a.inflight < b.inflight end
    return a.name < b.name
  end)
end

function P.route(req, backends)
  local params = req.params or {}
  local long_tokens = params.long_tokens or 8000
  local small_tokens = params.small_tokens or 1000
  local model = req.model or ""

  if req.tokens > long_tokens then
    local long = {}
    for _, b in ipairs(backends) do
      if b.tags.context == "long" then long[#long + 1] = b end
    end
    if #long == 0 then
      return nil, 400, "prompt of about " .. req.tokens .. " tokens needs a long-context backend, and none is available"
    end
    by_inflight(long)
    local order = {}
    for i, b in ipairs(long) do order[i] = b.name end
    return order
  end

  local preferred, rest = {}, {}
  for _, b in ipairs(backends) do
    local family = b.tags.family
    local fits = (family ~= nil and string.sub(model, 1, #family) == family)
      or (req.tokens < small_tokens and b.tags.tier == "cheap")
    if fits then preferred[#preferred + 1] = b else rest[#rest + 1] = b end
  end
  by_inflight(preferred)
  by_inflight(rest)
  local order = {}
  for _, b in ipairs(preferred) do order[#order + 1] = b.name end
  for _, b in ipairs(rest) do order[#order + 1] = b.name end
  return order
end

local pool = {
  { name = "long", tags = { context = "long" } },
  { name = "cheap", tags = { tier = "cheap" } },
  { name = "llama-box", tags = { family = "llama" } },
}
P.tests = {
  { name = "a 20 000-token prompt goes to long context only", req = { model = "gpt", tokens = 20000 },
    backends = pool, expect = { "long" } },
  { name = "a small prompt prefers the cheap tier", req = { model = "gpt", tokens = 50 },
    backends = pool, expect = { "cheap", "llama-box", "long" } },
  { name = "a model family goes to its pool", req = { model = "llama-3.1-8b", tokens = 5000 },
    backends = pool, expect = { "llama-box", "cheap", "long" } },
  { name = "no long-context backend: refused, not truncated", req = { tokens = 20000 },
    backends = { { name = "cheap", tags = { tier = "cheap" } } }, expect = { status = 400 } },
}

return P
