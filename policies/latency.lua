-- latency: lowest expected latency, chosen by the power of two choices so that load
-- spreads and no backend is starved of the samples that would show it has recovered.
--
-- Score = EWMA latency (ttft_ms for streams, where the first token is what users feel)
-- times (inflight + 1). A backend with no samples yet scores 0, so it wins whenever it is
-- one of the two drawn.
-- params.explore (default 0.02): share of requests sent to a random backend, so a slow
-- backend is still probed and its EWMA can fall when it recovers.

local P = { name = "latency" }

local function score(req, b)
  local ms = b.latency_ms
  if req.stream and b.ttft_ms > 0 then ms = b.ttft_ms end
  return ms * (b.inflight + 1)
end

function P.route(req, backends)
  local n = #backends
  if n == 1 then return backends[1].name end
  local explore = (req.params and req.params.explore) or 0.02
  local first
  if sy.random() < explore then
    first = backends[sy.random(n)]
  else
    local i = sy.random(n)
    local j = sy.random(n - 1)
    if j >= i then j = j + 1 end
    first = backends[i]
    if score(req, backends[j]) < score(req, first) then first = backends[j] end
  end
  local order = { first.name }
  table.sort(backends, function(a, b) return score(req, a) < score(req, b) end)
  for _, b in ipairs(backends) do
    if b ~= first then order[#order + 1] = b.name end
  end
  return order
end

P.tests = {
  { name = "the faster of two", req = { params = { explore = 0 } },
    backends = { { name = "slow", latency_ms = 200 }, { name = "fast", latency_ms = 5 } },
    expect = { "fast", "slow" } },
  { name = "streams go by time to first token", req = { stream = true, params = { explore = 0 } },
    backends = { { name = "a", latency_ms = 100, ttft_ms = 90 }, { name = "b", latency_ms = 50, ttft_ms = 40 } },
    expect = { "b", "a" } },
  { name = "load counts", req = { params = { explore = 0 } },
    backends = { { name = "busy", latency_ms = 10, inflight = 9 }, { name = "idle", latency_ms = 20 } },
    expect = { "idle", "busy" } },
}

return P
