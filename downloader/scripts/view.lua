-- view.lua: a job's projection, live or packed (read only).
-- KEYS: the shard's events, job:<id>, done:<id>
-- ARGV: job_id
-- Keys touched: job:<id> (HGETALL), done:<id> (GET; its events folded, as rebuild would).
-- Returns: the projection as a flat list of field, value, or {} when the job is unknown (never
--   was, or expired). A live job's sealed_* fields come along (Job.from_hash drops them); a
--   packed job's are in its head, not folded.
local job_id = ARGV[1]
local row = redis.call('HGETALL', KEY.job(job_id))
if #row > 0 then return row end
local lines = unpack_done(job_id)
if not lines then return {} end
local flat = {}
for k, v in pairs(fold_lines(job_id, lines)) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
return flat
