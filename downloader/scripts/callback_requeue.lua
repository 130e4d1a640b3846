-- callback_requeue.lua: POST /retry/{id}: give a failed callback a fresh round of attempts.
-- ARGV: job_id
-- KEYS: the shard's events, job:<id>, done:<id>
-- Keys touched: done:<id> (a packed job whose callback failed comes back: revive; any other is
--   only read, its expiry untouched), job:<id> + ev:<id> + events (callback.requeued),
--   callbacks (XADD), reap (ZREM: the file stays until this round ends).
-- Returns: {'ok', event_id} | {'unknown'} | {'no_callback'} (the job was given none) |
--   {'not_failed', callback_state}
local job_id = ARGV[1]
local job = fields_of(job_id, {'callback_state'})
if not job then return {'unknown'} end
local state = job[1]
if state ~= 'Failed' then
  if state == 'NotRequested' then return {'no_callback'} end
  return {'not_failed', state}
end
revive(job_id)
local event_id = emit(job_id, 'callback.requeued', '{}')
redis.call('ZREM', KEY.reap, job_id)
redis.call('XADD', KEY.callbacks, '*', 'job_id', job_id)
return done({'ok', event_id})
