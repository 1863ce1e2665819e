-- predictive: send each request where it should finish first, estimated from what each
-- backend has shown recently (its EWMAs are learned online from every response):
--
--   wait    = queued requests ahead of us * their typical duration / concurrency
--   prefill = ttft_ms (time to first token)
--   decode  = output tokens / tps (tokens per second)
--
-- Without token-rate data yet (tps = 0) the estimate falls back to latency_ms. Backends
-- with no samples at all score 0 and are tried first, which is how they get samples.
-- params.output_tokens (default 256) stands in for an absent max_tokens;
-- params.concurrency (default 4): requests a backend serves in parallel before queueing.

local P = { name = "predictive" }

local function estimate(req, b, params)
  local out = req.max_tokens or params.output_tokens or 256
  local service
  if b.tps > 0 and b.ttft_ms > 0 then
    service = b.ttft_ms + out * 1000 / b.tps
  else
    service = b.latency_ms
  end
  local concurrency = params.concurrency or 4
  local wait = b.inflight * service / concurrency
  return wait + service
end

function P.route(req, backends)
  local params = req.params or {}
  local est = {}
  for _, b in ipairs(backends) do est[b.name] = estimate(req, b, params) end
  table.sort(backends, function(a, b)
    if est[a.name] ~= est[b.name] then return est[a.name] < est[b.name] end
    return a.inflight < b.inflight
  end)
  local order = {}
  for i, b in ipairs(backends) do order[i] = b.name end
  return order
end

P.tests = {
  { name = "fast decoder wins a long answer", req = { max_tokens = 1000 },
    backends = {
      { name = "quick-start", ttft_ms = 50, tps = 20, latency_ms = 1000 },
      { name = "fast-decode", ttft_ms = 300, tps = 200, latency_ms = 1000 },
    },
    expect = { "fast-decode", "quick-start" } },
  { name = "quick start wins a short answer", req = { max_tokens = 5 },
    backends = {
      { name = "quick-start", ttft_ms = 50, tps = 20 },
      { name = "fast-decode", ttft_ms = 300, tps = 200 },
    },
    expect = { "quick-start", "fast-decode" } },
  { name = "a queue counts", req = {},
    backends = { { name = "busy", latency_ms = 100, inflight = 40 }, { name = "slower", latency_ms = 300 } },
    expect = { "slower", "busy" } },
  { name = "an unmeasured backend is tried", req = {},
    backends = { { name = "known", latency_ms = 100 }, { name = "new" } },
    expect = { "new", "known" } },
}

return P
