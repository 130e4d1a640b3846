-- finish.lua: record the outcome of one download attempt, if the caller still holds the lease;
-- then, if asked, hand the freed slot straight to the next ready job of the same aggregation.
-- ARGV: job_id, lease token (from claim.lua), outcome ('succeeded' | 'failed' | 'retry'),
--   event data (JSON), retry_in_ms, next_owner ('' = do not claim), lease_ms, projection
--   fields to return for the next job...
-- KEYS: the shard's events, job:<id>, lease-owners
-- Keys touched: lease-owners, leases, inflight:<a> (SREM), job:<id> + ev:<id> + events
--   (download.succeeded | download.failed | download.retry_scheduled), retries (zset job -> due
--   ms, on 'retry'), aggr:<a> (jobs -1 on a final outcome; deleted when it has no job left),
--   aggregations, callbacks (stream read by notifiers, on a final outcome of a job that has
--   a callback), wake (only when the slot was not handed on: a slot that stays taken is no
--   news to other processors); with next_owner, what claim.lua touches for one job.
-- Returns: {'ok', event_id[, next job row as claim.lua returns it]} | {'stale'} when that
--   lease was lost (expired, aborted, re-claimed).
local job_id, token, outcome, data, retry_in = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local next_owner, lease_ms = ARGV[6], tonumber(ARGV[7])
local OUTCOME_EVENT = {
  succeeded = 'download.succeeded', failed = 'download.failed', retry = 'download.retry_scheduled',
}
local etype = OUTCOME_EVENT[outcome]
if not etype then return redis.error_reply('finish: unknown outcome ' .. tostring(outcome)) end
if redis.call('HGET', KEY.lease_owners, job_id) ~= token then return {'stale'} end

local aggr_id = redis.call('HGET', KEY.job(job_id), 'aggr_id')
redis.call('HDEL', KEY.lease_owners, job_id)
redis.call('ZREM', KEY.leases, job_id)
redis.call('SREM', KEY.inflight(aggr_id), job_id)

local event_id = emit(job_id, etype, data)
if outcome == 'retry' then
  redis.call('ZADD', KEY.retries, now_ms() + retry_in, job_id)
else
  queue_callback(job_id)
end

local out = {'ok', event_id}
if next_owner ~= '' then
  local fields = {}
  for i = 8, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
  local limit = tonumber(redis.call('HGET', KEY.aggr(aggr_id), 'limit') or '0')
  local ready = KEY.ready(aggr_id)
  while redis.call('SCARD', KEY.inflight(aggr_id)) < limit do
    local next_id = redis.call('LPOP', ready)
    if not next_id then break end
    local row = start_job(aggr_id, next_id, next_owner, now_ms() + lease_ms, fields)
    if row then
      out[3] = row
      break
    end
  end
end
if outcome ~= 'retry' then
  aggr_job_done(aggr_id)
elseif out[3] then
  touch_registry(aggr_id)
end
if not out[3] then wake(aggr_id) end
return done(out)
