-- rebuild.lua: recompute one job's projection from its events alone (downloader rebuild).
-- ARGV: job_id
-- Keys touched: job:{id} (replaced, but its sealed_* fields, which no event holds),
--   job:{id}:events (read).
-- Returns: the number of events folded.
local job_id = ARGV[1]
local job_key, events_key = KEY.job(job_id), KEY.job_events(job_id)
local entries = redis.call('XRANGE', events_key, '-', '+')
if #entries == 0 then return 0 end
-- emit() gives the projection and the events the same expiry: take it from the events,
-- which survive when the projection was lost.
local ttl = redis.call('PTTL', events_key)
local keep = {}
for _, field in pairs(SEALED) do
  local value = redis.call('HGET', job_key, field)
  if value then
    keep[#keep + 1] = field
    keep[#keep + 1] = value
  end
end
redis.call('DEL', job_key)
if #keep > 0 then redis.call('HSET', job_key, unpack(keep)) end
for _, entry in ipairs(entries) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  redis.call('HSET', job_key, unpack(fold(job_id, f.type, f.ts, entry[1], cjson.decode(f.data))))
end
if ttl > 0 then redis.call('PEXPIRE', job_key, ttl) end
return #entries
