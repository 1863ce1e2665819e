-- Release a request's concurrency slot and replace its reservation with its real usage.
-- Mirrors LocalCounters::settle in src/limits/local.rs.
-- KEYS: 1 tokens zset, 2 tokens hash, 3 tokens sum, 4 in-flight zset, 5 spend of the day,
--       6 spend marks zset, 7 requests zset (see admit.lua)
-- ARGV: 1 id, 2 actual tokens (-1 = keep the reservation), 3 nano-USD to add (may be < 0),
--       4 window (ms), 5 "1" for a withdrawal: an admission whose answer never came, for a
--       request the instance refused; it leaves the minute's requests, as a request
--       refused at admission never entered them, and its spend is given back only if it
--       was counted
local id = ARGV[1]
local tokens, nano, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[7], id)
  if not redis.call('ZSCORE', KEYS[6], 'a:' .. id) then nano = 0 end
end
redis.call('ZREM', KEYS[4], id)
if tokens >= 0 then
  local old = redis.call('HGET', KEYS[2], id)
  if old then
    redis.call('HSET', KEYS[2], id, tokens)
    redis.call('INCRBY', KEYS[3], tokens - tonumber(old))
  elseif tokens > 0 then
    -- The reservation left the window already: the usage counts from now.
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), id)
    redis.call('HSET', KEYS[2], id, tokens)
    redis.call('INCRBY', KEYS[3], tokens)
    for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], window * 2) end
  end
end
if nano ~= 0 and not redis.call('ZSCORE', KEYS[6], 's:' .. id) then
  -- Applied once, also when a settlement whose answer was lost is sent again.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('INCRBY', KEYS[5], nano)
  redis.call('EXPIRE', KEYS[5], 3 * 86400)
  redis.call('ZADD', KEYS[6], now, 's:' .. id)
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window * 2)
  redis.call('PEXPIRE', KEYS[6], window * 2)
end
return 1
