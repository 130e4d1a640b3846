-- callback_end.lua: record the result of one delivery attempt and settle its stream entry.
-- ARGV: job_id, outcome ('delivered' | 'retry' | 'failed'), event data (JSON, with the
--   `attempt` number callback_begin handed out), stream entry id, group, delay_ms (retry wait,
--   or file deletion delay on 'delivered'; -1: keep the file; on 'failed' the file is deleted
--   when the job expires, after the retention period)
-- KEYS: the shard's events, job:<id>
-- Keys touched: job:<id> + ev:<id> + events (callback.delivered | callback.retry_scheduled |
--   callback.failed), callbacks (XACK + XDEL of the entry), callback-retries (zset job -> due
--   ms), reap (zset job -> when its file is deleted).
-- Two notifiers can hold one entry (one was taken for gone and its entry taken over): only the
-- latest attempt records. A stale one (the job is no longer InProgress at this attempt) changes
-- nothing, and settles its entry only if no attempt is in progress (else the entry may be the
-- one that attempt holds: acking it would lose it if that notifier dies).
-- Returns: the event id, or '' for a stale attempt.
local job_id, outcome, data, entry, group, delay = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local OUTCOME_EVENT = {
  delivered = 'callback.delivered', retry = 'callback.retry_scheduled', failed = 'callback.failed',
}
local etype = OUTCOME_EVENT[outcome]
if not etype then return redis.error_reply('callback_end: unknown outcome ' .. tostring(outcome)) end
local job = redis.call('HMGET', KEY.job(job_id), 'callback_state', 'callback_attempts')
if job[1] ~= 'InProgress' or tonumber(job[2]) ~= cjson.decode(data).attempt then
  if job[1] ~= 'InProgress' and entry ~= '' then
    redis.call('XACK', KEY.callbacks, group, entry)
    redis.call('XDEL', KEY.callbacks, entry)
  end
  return ''
end
local event_id = emit(job_id, etype, data)
if outcome == 'retry' then
  redis.call('ZADD', KEY.callback_retries, now_ms() + delay, job_id)
elseif redis.call('HGET', KEY.job(job_id), 'file_state') == 'stored' then
  -- delivered: delete after the configured delay; failed for good: keep the file for a /retry
  -- as long as the job itself is kept, then delete it with the job
  local after = outcome == 'delivered' and delay or SETTINGS.retention_ms
  if after >= 0 then redis.call('ZADD', KEY.reap, now_ms() + after, job_id) end
end
if entry ~= '' then
  redis.call('XACK', KEY.callbacks, group, entry)
  redis.call('XDEL', KEY.callbacks, entry)
end
return done(event_id)
