-- callback_skip.lua: acknowledge a stream entry that has nothing to deliver.
-- ARGV: stream entry id, group
-- KEYS: the shard's events, callbacks
-- Keys touched: callbacks (XACK + XDEL).
redis.call('XACK', KEY.callbacks, ARGV[2], ARGV[1])
redis.call('XDEL', KEY.callbacks, ARGV[1])
return 1
