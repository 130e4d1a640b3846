-- renew.lua: extend the leases an owner still holds.
-- ARGV: owner, lease_ms, job ids...
-- Keys touched: lease-owners (read), leases (ZADD XX).
-- Returns: the ids whose lease the owner no longer holds (stop working on them).
local owner, lease_ms = ARGV[1], tonumber(ARGV[2])
local expiry = now_ms() + lease_ms
local lost = {}
for i = 3, #ARGV - 2 do
  local job_id = ARGV[i]
  if redis.call('HGET', KEY.lease_owners, job_id) == owner then
    redis.call('ZADD', KEY.leases, 'XX', expiry, job_id)
  else
    lost[#lost + 1] = job_id
  end
end
return lost
