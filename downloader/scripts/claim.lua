-- claim.lua: take up to `count` ready jobs of one aggregation, within its global limit.
-- ARGV: aggr_id, owner (processor instance id), lease_ms, count, projection fields to return...
-- KEYS: the shard's events, aggr:<a>, ready:<a>, inflight:<a>
-- Keys touched: aggr:<a> (limit, proxy), ready:<a> (LPOP), inflight:<a> (set, SADD),
--   leases (zset job -> lease expiry ms), lease-owners (hash job -> owner), aggregations,
--   job:<id> + ev:<id> + events (download.started) of each job taken.
-- Returns: {proxy, ready_left, free_slots, job1, job2, ...} where each job is the list of the
--   requested projection fields (HMGET) after download.started, then its lease token
--   (`owner/<download.started event id>`: unique per claim, the fence for renew and finish).
local aggr_id, owner, lease_ms, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local fields = {}
for i = 5, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
local aggr_key, ready, inflight = KEY.aggr(aggr_id), KEY.ready(aggr_id), KEY.inflight(aggr_id)

local settings = redis.call('HMGET', aggr_key, 'limit', 'proxy')
if not settings[1] then return {'', 0, 0} end
local free = tonumber(settings[1]) - redis.call('SCARD', inflight)
local out = {settings[2] or '', 0, 0}
local expiry = now_ms() + lease_ms
while free > 0 and count > 0 do
  local job_id = redis.call('LPOP', ready)
  if not job_id then break end
  local row = start_job(aggr_id, job_id, owner, expiry, fields)
  if row then
    out[#out + 1] = row
    free = free - 1
    count = count - 1
  end
end
out[2] = redis.call('LLEN', ready)
out[3] = free
touch_registry(aggr_id)
return done(out)
