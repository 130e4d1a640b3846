-- abort.lua: DELETE /jobs/{id}: cancel a pending or running download.
-- ARGV: job_id, reason
-- KEYS: the shard's events, job:<id>, done:<id>
-- Keys touched: job:<id> + ev:<id> + events (job.aborted), ready:<a> (LREM), retries (ZREM),
--   leases + lease-owners + inflight:<a> (a running job loses its lease, so its processor
--   can no longer record an outcome), aggr:<a>, aggregations, callbacks (XADD: the failure
--   callback, if the job has one), wake (an entry naming the job, so its processor interrupts
--   it now).
-- Returns: {'ok', event_id} | {'unknown'} | {'finished', download_state} (a packed job too:
--   its download has ended)
local job_id, reason = ARGV[1], ARGV[2]
local job = fields_of(job_id, {'aggr_id', 'download_state'})
if not job or not job[1] then return {'unknown'} end
local aggr_id, state = job[1], job[2]
if state == 'Success' or state == 'Failed' then return {'finished', state} end

redis.call('LREM', KEY.ready(aggr_id), 0, job_id)
redis.call('ZREM', KEY.retries, job_id)
local running = redis.call('HDEL', KEY.lease_owners, job_id) == 1
redis.call('ZREM', KEY.leases, job_id)
redis.call('SREM', KEY.inflight(aggr_id), job_id)
local event_id = emit(job_id, 'job.aborted', cjson.encode({reason = reason}))
aggr_job_done(aggr_id)
queue_callback(job_id)
if running then
  redis.call('XADD', KEY.wake, 'MAXLEN', '~', 10000, '*', 'a', aggr_id, 'abort', job_id)
else
  wake(aggr_id)
end
return done({'ok', event_id})
