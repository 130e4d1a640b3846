-- stats.lua: publish one instance's stats and that it is alive, in one step.
-- KEYS: the service-wide keys, all in one slot of their own: `<prefix>:{meta}:stats:<role>:<id>`,
--   `<prefix>:{meta}:instances`
-- ARGV: `<role>:<instance id>`, ttl_ms, now ms, then stat name, value pairs...
-- Keys touched: the stats hash (replaced, expiring after ttl_ms), instances (zset member ->
--   ms of its last publication).
-- Returns: 1
local stats_key, instances = KEYS[1], KEYS[2]
redis.call('DEL', stats_key)
if #ARGV > 4 then
  local pairs_ = {}
  for i = 4, #ARGV - 1 do pairs_[#pairs_ + 1] = ARGV[i] end
  redis.call('HSET', stats_key, unpack(pairs_))
end
redis.call('PEXPIRE', stats_key, tonumber(ARGV[2]))
redis.call('ZADD', instances, tonumber(ARGV[3]), ARGV[1])
return 1
