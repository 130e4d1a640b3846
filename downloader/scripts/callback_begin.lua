-- callback_begin.lua: a notifier starts one delivery attempt.
-- ARGV: job_id, projection fields to return...
-- KEYS: the shard's events, job:<id>
-- Keys touched: job:<id> + ev:<id> + events (callback.attempted).
-- Returns: the requested projection fields (HMGET, the url as submitted: a callback's
--   resource_url is the caller's own) after the event, or {} when there is nothing to deliver
--   (the job is unknown, or its callback already ended: a duplicate stream entry).
local job_id = ARGV[1]
local state = redis.call('HGET', KEY.job(job_id), 'callback_state')
if state ~= 'Pending' and state ~= 'InProgress' then return {} end
local attempt = tonumber(redis.call('HGET', KEY.job(job_id), 'callback_attempts')) + 1
emit(job_id, 'callback.attempted', cjson.encode({attempt = attempt}))
local fields = {}
for i = 2, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
return done(unsealed(KEY.job(job_id), fields))
