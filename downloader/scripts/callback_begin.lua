-- callback_begin.lua: a notifier starts one delivery attempt.
-- ARGV: job_id
-- Keys touched: job:{id} + events (callback.attempted).
-- Returns: the flat projection after the event, or {} when there is nothing to deliver (the job
--   is unknown, or its callback already ended: a duplicate stream entry).
local job_id = ARGV[1]
local state = redis.call('HGET', KEY.job(job_id), 'callback_state')
if state ~= 'Pending' and state ~= 'InProgress' then return {} end
local attempt = tonumber(redis.call('HGET', KEY.job(job_id), 'callback_attempts')) + 1
emit(job_id, 'callback.attempted', cjson.encode({attempt = attempt}))
return redis.call('HGETALL', KEY.job(job_id))
