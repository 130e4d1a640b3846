-- promote_retries.lua: move download retries that are due into their aggregation's ready queue.
-- ARGV: limit
-- KEYS: the shard's events, retries
-- Keys touched: retries (zset job -> due ms), ready:<a> (RPUSH), aggregations, wake.
-- Returns: {moved, ms until the next one is due or -1}
local limit = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEY.retries, '-inf', now_ms(), 'LIMIT', 0, limit)
for _, job_id in ipairs(due) do
  redis.call('ZREM', KEY.retries, job_id)
  local aggr_id = redis.call('HGET', KEY.job(job_id), 'aggr_id')
  if aggr_id then
    redis.call('RPUSH', KEY.ready(aggr_id), job_id)
    touch_registry(aggr_id)
    wake(aggr_id)
  end
end
local nxt = redis.call('ZRANGE', KEY.retries, 0, 0, 'WITHSCORES')
return {#due, nxt[2] and math.max(0, tonumber(nxt[2]) - now_ms()) or -1}
