-- renew.lua: extend the leases a processor still holds.
-- ARGV: lease_ms, then pairs of job id, lease token (as claim.lua handed it out)...
-- KEYS: the shard's events, lease-owners, leases
-- Keys touched: lease-owners (read), leases (ZADD XX).
-- Returns: the ids whose lease is no longer held with that token (stop working on them).
local lease_ms = tonumber(ARGV[1])
local expiry = now_ms() + lease_ms
local lost = {}
for i = 2, #ARGV - 1, 2 do
  local job_id, token = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEY.lease_owners, job_id) == token then
    redis.call('ZADD', KEY.leases, 'XX', expiry, job_id)
  else
    lost[#lost + 1] = job_id
  end
end
return lost
