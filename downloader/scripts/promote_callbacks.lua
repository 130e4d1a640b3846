-- promote_callbacks.lua: put callback retries that are due back on the callbacks stream.
-- ARGV: limit
-- KEYS: the shard's events, callback-retries, callbacks
-- Keys touched: callback-retries (zset job -> due ms), callbacks (XADD).
-- Returns: {moved, ms until the next one is due or -1}
local limit = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEY.callback_retries, '-inf', now_ms(), 'LIMIT', 0, limit)
for _, job_id in ipairs(due) do
  redis.call('ZREM', KEY.callback_retries, job_id)
  redis.call('XADD', KEY.callbacks, '*', 'job_id', job_id)
end
local nxt = redis.call('ZRANGE', KEY.callback_retries, 0, 0, 'WITHSCORES')
return {#due, nxt[2] and math.max(0, tonumber(nxt[2]) - now_ms()) or -1}
