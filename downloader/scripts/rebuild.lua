-- rebuild.lua: recompute one job's projection from its events alone (downloader rebuild).
-- KEYS: the shard's events, job:<id>, ev:<id>
-- ARGV: job_id
-- Keys touched: job:<id> (replaced, but its sealed_* fields, which no event holds),
--   ev:<id> (read). A packed job has no stored projection: view.lua folds its events whenever
--   it is read, so there is nothing to rebuild.
-- Returns: the number of events folded (0 for a packed or unknown job).
local job_id = ARGV[1]
local job_key = KEY.job(job_id)
local lines = redis.call('LRANGE', KEY.ev(job_id), 0, -1)
if #lines == 0 then return 0 end
local flat = {}
for _, field in pairs(SEALED) do
  local value = redis.call('HGET', job_key, field)
  if value then
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
end
for k, v in pairs(fold_lines(job_id, lines)) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('DEL', job_key)
redis.call('HSET', job_key, unpack(flat))
return #lines
