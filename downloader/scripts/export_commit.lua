-- export_commit.lua: the event exporter records how far it got, if it still holds the lock.
-- ARGV: owner, position (last exported stream id, or '' to only renew), lock_ms
-- KEYS: the shard's events, export:lock, export:position
-- Keys touched: export:lock (string: owner, with expiry), export:position (string: stream id).
-- Returns: 1 while the caller holds the lock (renewed), 0 when another exporter has it.
local owner, position, lock_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local holder = redis.call('GET', KEY.export_lock)
if holder and holder ~= owner then return 0 end
redis.call('SET', KEY.export_lock, owner, 'PX', lock_ms)
if position ~= '' then redis.call('SET', KEY.export_position, position) end
return 1
