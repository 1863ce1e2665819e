-- Record a request admitted on this instance's own counters while Redis was unreachable,
-- so the fleet's counters include it once Redis is back.
-- KEYS: 1 requests zset, 2 tokens zset, 3 tokens hash, 4 tokens sum, 5 spend of that day,
--       6 spend marks zset (see admit.lua)
-- ARGV: 1 id, 2 admitted at (unix ms), 3 count the request 1/0, 4 tokens (-1 = none),
--       5 nano-USD (0 = none), 6 window ms
local id, at = ARGV[1], tonumber(ARGV[2])
local tokens, nano, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], at, id)
  redis.call('PEXPIRE', KEYS[1], window * 2)
end
if tokens >= 0 and redis.call('HEXISTS', KEYS[3], id) == 0 then
  redis.call('ZADD', KEYS[2], at, id)
  redis.call('HSET', KEYS[3], id, tokens)
  redis.call('INCRBY', KEYS[4], tokens)
  for k = 2, 4 do redis.call('PEXPIRE', KEYS[k], window * 2) end
end
if nano ~= 0 and not redis.call('ZSCORE', KEYS[6], 'a:' .. id) then
  -- Not counted yet: neither by an admission whose answer was lost nor by an earlier
  -- replay of this one.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('INCRBY', KEYS[5], nano)
  redis.call('EXPIRE', KEYS[5], 3 * 86400)
  redis.call('ZADD', KEYS[6], now, 'a:' .. id)
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window * 2)
  redis.call('PEXPIRE', KEYS[6], window * 2)
end
return 1
