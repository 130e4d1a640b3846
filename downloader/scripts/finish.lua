-- finish.lua: record the outcome of one download attempt, if the caller still holds the lease.
-- ARGV: job_id, lease token (from claim.lua), outcome ('succeeded' | 'failed' | 'retry'), event data (JSON), retry_in_ms
-- Keys touched: lease-owners, leases, aggr:{a}:inflight (SREM), job:{id} + events
--   (download.succeeded | download.failed | download.retry_scheduled), retries (zset job -> due
--   ms, on 'retry'), aggr:{a} (jobs -1 on a final outcome; deleted when it has no job left),
--   aggregations, callbacks (stream read by notifiers, on a final outcome of a job that has
--   a callback), wake.
-- Returns: {'ok', event_id} | {'stale'} when that lease was lost (expired, aborted, re-claimed).
local job_id, token, outcome, data, retry_in = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('HGET', KEY.lease_owners, job_id) ~= token then return {'stale'} end

local aggr_id = redis.call('HGET', KEY.job(job_id), 'aggr_id')
redis.call('HDEL', KEY.lease_owners, job_id)
redis.call('ZREM', KEY.leases, job_id)
redis.call('SREM', KEY.inflight(aggr_id), job_id)

local event_id
if outcome == 'retry' then
  event_id = emit(job_id, 'download.retry_scheduled', data)
  redis.call('ZADD', KEY.retries, now_ms() + retry_in, job_id)
else
  event_id = emit(job_id, outcome == 'succeeded' and 'download.succeeded' or 'download.failed', data)
  aggr_job_done(aggr_id)
  queue_callback(job_id)
end
wake(aggr_id)
return {'ok', event_id}
