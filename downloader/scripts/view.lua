-- view.lua: a job's projection, live or packed (read only).
-- KEYS: the shard's events, job:<id>, done:<id>
-- ARGV: job_id
-- Keys touched: job:<id> (HGETALL), done:<id> (GET; its events folded, as rebuild would).
-- Returns: the projection as a flat list of field, value (the sealed fields left out), or {}
--   when the job is unknown (never was, or expired).
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
