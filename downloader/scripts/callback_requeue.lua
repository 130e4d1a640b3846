-- callback_requeue.lua: POST /retry/{id}: give a failed callback a fresh round of attempts.
-- ARGV: job_id
-- KEYS: the shard's events, job:<id>
-- Keys touched: done:<id> (a packed job comes back: revive), job:<id> + ev:<id> + events
--   (callback.requeued), callbacks (XADD), reap (ZREM: the file stays until this round ends).
-- Returns: {'ok', event_id} | {'unknown'} | {'no_callback'} (the job was given none) |
--   {'not_failed', callback_state}
local job_id = ARGV[1]
local was_packed = redis.call('EXISTS', KEY.job(job_id)) == 0
if not revive(job_id) then return {'unknown'} end
local state = redis.call('HGET', KEY.job(job_id), 'callback_state')
if state ~= 'Failed' then
  if was_packed then pack(job_id) end  -- nothing to retry: it stays as it was
  if state == 'NotRequested' then return {'no_callback'} end
  return {'not_failed', state}
end
local event_id = emit(job_id, 'callback.requeued', '{}')
redis.call('ZREM', KEY.reap, job_id)
redis.call('XADD', KEY.callbacks, '*', 'job_id', job_id)
return done({'ok', event_id})
