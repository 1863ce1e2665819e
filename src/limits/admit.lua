-- Check a tenant's limits and count one request, atomically, for every Switchyard
-- instance sharing this Redis. Mirrors src/limits/local.rs.
-- KEYS: 1 requests zset (id -> admitted ms), 2 tokens zset (id -> admitted ms),
--       3 tokens hash (id -> tokens), 4 tokens sum, 5 in-flight zset (id -> lease end ms),
--       6 spend of the day (nano-USD), 7 spend marks zset (what -> counted at ms; see below)
-- ARGV: 1 id, 2 rpm, 3 tpm, 4 concurrent, 5 budget nano-USD (-1 = no limit each),
--       6 tokens to reserve, 7 nano-USD to reserve, 8 lease ms, 9 window ms, 10 day number
-- Returns {admitted 1/0, refused kind (1 concurrent, 2 requests, 3 tokens, 4 spend),
--          retry ms, requests, tokens, in flight, spent nano-USD}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local rpm, tpm, conc, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens, nano = tonumber(ARGV[6]), tonumber(ARGV[7])
local lease, window, day = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cutoff = now - window

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
-- Expired token entries leave in batches (unpack takes a few thousand values at most).
while true do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, 500)
  if #expired == 0 then break end
  local gone = 0
  for _, n in ipairs(redis.call('HMGET', KEYS[3], unpack(expired))) do
    gone = gone + (tonumber(n) or 0)
  end
  redis.call('DECRBY', KEYS[4], gone)
  redis.call('HDEL', KEYS[3], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)

local reqs = redis.call('ZCARD', KEYS[1])
local toks = tonumber(redis.call('GET', KEYS[4]) or '0')
local inflight = redis.call('ZCARD', KEYS[5])
local spent = tonumber(redis.call('GET', KEYS[6]) or '0')
local function refuse(kind, retry)
  return {0, kind, math.max(0, retry), reqs, toks, inflight, spent}
end

if conc >= 0 and inflight >= conc then
  return refuse(1, 1000)
end
if rpm >= 0 and reqs >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return refuse(2, tonumber(oldest[2] or now) + window - now)
end
if tpm >= 0 and toks + tokens > tpm then
  if tokens > tpm then
    return refuse(3, window)
  end
  -- When enough of the oldest entries (looking at 500 at most) will have left the window.
  local sum = toks
  local entries = redis.call('ZRANGE', KEYS[2], 0, 499, 'WITHSCORES')
  local ids = {}
  for i = 1, #entries, 2 do ids[#ids + 1] = entries[i] end
  if #ids > 0 then
    local amounts = redis.call('HMGET', KEYS[3], unpack(ids))
    for i, n in ipairs(amounts) do
      sum = sum - (tonumber(n) or 0)
      if sum + tokens <= tpm then
        return refuse(3, tonumber(entries[2 * i]) + window - now)
      end
    end
  end
  return refuse(3, window)
end
if budget >= 0 and spent + nano > budget then
  return refuse(4, (day + 1) * 86400000 - now)
end

if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window * 2)
  reqs = reqs + 1
end
if tpm >= 0 then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, tokens)
  redis.call('INCRBY', KEYS[4], tokens)
  for k = 2, 4 do redis.call('PEXPIRE', KEYS[k], window * 2 + lease) end
  toks = toks + tokens
end
if conc >= 0 then
  redis.call('ZADD', KEYS[5], now + lease, id)
  redis.call('PEXPIRE', KEYS[5], lease * 2)
  inflight = inflight + 1
end
if budget >= 0 then
  spent = redis.call('INCRBY', KEYS[6], nano)
  redis.call('EXPIRE', KEYS[6], 3 * 86400)
  -- Marked as counted: if this call's answer is lost (a timeout after Redis ran it), the
  -- instance counts the request locally and replays it later; the replay sees the mark
  -- and does not count the spend again. Marks are kept for two windows.
  redis.call('ZADD', KEYS[7], now, 'a:' .. id)
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - window * 2)
  redis.call('PEXPIRE', KEYS[7], window * 2)
end
return {1, 0, 0, reqs, toks, inflight, spent}
