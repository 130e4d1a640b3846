-- callback_begin.lua: a notifier starts one delivery attempt.
-- ARGV: job_id, stream entry id, group, consumer (entry '': no entry to check), projection
--   fields to return...
-- KEYS: the shard's events, job:<id>
-- Keys touched: callbacks (XPENDING of the entry; XACK + XDEL of a duplicate), job:<id> +
--   ev:<id> + events (callback.attempted).
-- Returns: the requested projection fields (HMGET, the url as submitted: a callback's
--   resource_url is the caller's own) after the event, or {} when there is nothing to deliver:
--   the job is unknown or its callback already ended (a duplicate stream entry: acknowledged
--   and deleted here), or the entry is no longer pending with this consumer (settled meanwhile,
--   or taken over by another notifier: left alone, it is that notifier's to deliver).
local job_id, entry, group, consumer = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local state = redis.call('HGET', KEY.job(job_id), 'callback_state')
if state ~= 'Pending' and state ~= 'InProgress' then
  if entry ~= '' then
    redis.call('XACK', KEY.callbacks, group, entry)
    redis.call('XDEL', KEY.callbacks, entry)
  end
  return {}
end
if entry ~= '' then
  local ok, held = pcall(redis.call, 'XPENDING', KEY.callbacks, group, entry, entry, 1)
  if not ok or #held == 0 or held[1][2] ~= consumer then return {} end
end
local attempt = tonumber(redis.call('HGET', KEY.job(job_id), 'callback_attempts')) + 1
emit(job_id, 'callback.attempted', cjson.encode({attempt = attempt}))
local fields = {}
for i = 5, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
return done(unsealed(KEY.job(job_id), fields))
