-- ratelimit.lua: take one request from a tenant's token bucket (api.tokens rate_per_second).
-- KEYS: the token's bucket, `<prefix>:{rate:<token key>}` (a slot of its own)
-- ARGV: rate (tokens per second), burst (the bucket's size)
-- Keys touched: the bucket (hash: tokens, at = ms of the last take; expires once it would be
--   full again, so an idle token costs nothing).
-- Returns: 0 when the request may go on, else the ms until a token is there.
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local key = KEYS[1]
local bucket = redis.call('HMGET', key, 'tokens', 'at')
local now = now_ms()
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
if tokens < 1 then return math.ceil((1 - tokens) * 1000 / rate) end
tokens = tokens - 1
redis.call('HSET', key, 'tokens', string.format('%.6f', tokens), 'at', now)
redis.call('PEXPIRE', key, math.ceil((burst - tokens) * 1000 / rate) + 1000)
return 0
