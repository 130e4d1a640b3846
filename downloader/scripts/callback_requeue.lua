-- callback_requeue.lua: POST /retry/{id}: give a failed callback a fresh round of attempts.
-- ARGV: job_id
-- Keys touched: job:{id} + events (callback.requeued), callbacks (XADD), reap (ZREM: the file
--   stays until this round ends).
-- Returns: {'ok', event_id} | {'unknown'} | {'no_callback'} (the job was given none) |
--   {'not_failed', callback_state}
local job_id = ARGV[1]
local state = redis.call('HGET', KEY.job(job_id), 'callback_state')
if not state then return {'unknown'} end
if state == 'NotRequested' then return {'no_callback'} end
if state ~= 'Failed' then return {'not_failed', state} end
local event_id = emit(job_id, 'callback.requeued', '{}')
redis.call('ZREM', KEY.reap, job_id)
redis.call('XADD', KEY.callbacks, '*', 'job_id', job_id)
return {'ok', event_id}
