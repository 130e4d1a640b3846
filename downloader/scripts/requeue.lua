-- requeue.lua: hand jobs back to their ready queues: leases that expired (a processor died), or
-- the jobs a processor gives back on shutdown.
-- ARGV: reason, limit, then (giving back) pairs of job id, lease token...; no pairs = every
--   expired lease, at most `limit`
-- KEYS: the shard's events, leases, lease-owners
-- Keys touched: leases, lease-owners, inflight:<a> (SREM), ready:<a> (LPUSH: first in line
--   again), aggregations, job:<id> + ev:<id> + events (download.requeued), wake.
-- Returns: the number of jobs handed back.
local reason, limit = ARGV[1], tonumber(ARGV[2])
local ids = {}
if #ARGV - 1 == 2 then
  ids = redis.call('ZRANGEBYSCORE', KEY.leases, '-inf', now_ms(), 'LIMIT', 0, limit)
else
  for i = 3, #ARGV - 1, 2 do
    if redis.call('HGET', KEY.lease_owners, ARGV[i]) == ARGV[i + 1] then ids[#ids + 1] = ARGV[i] end
  end
end
for _, job_id in ipairs(ids) do
  local job = redis.call('HMGET', KEY.job(job_id), 'aggr_id', 'download_attempts')
  redis.call('HDEL', KEY.lease_owners, job_id)
  redis.call('ZREM', KEY.leases, job_id)
  if job[1] then
    redis.call('SREM', KEY.inflight(job[1]), job_id)
    redis.call('LPUSH', KEY.ready(job[1]), job_id)
    emit(job_id, 'download.requeued', cjson.encode({attempt = tonumber(job[2]), reason = reason}))
    touch_registry(job[1])
    wake(job[1])
  end
end
return done(#ids)
