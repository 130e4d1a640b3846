-- trim.lua: keep a shard's event stream and job index to their windows.
-- KEYS: the shard's events, jobs
-- ARGV: the oldest event id to keep in the stream (`<ms>-0`), the oldest creation ms to keep in
--   the job index (older jobs have expired: their entries only take room)
-- Keys touched: events (XTRIM MINID ~), jobs (ZREMRANGEBYSCORE).
-- Returns: {stream entries trimmed, index entries removed}
local trimmed = redis.call('XTRIM', KEY.events, 'MINID', '~', ARGV[1])
local removed = redis.call('ZREMRANGEBYSCORE', KEY.jobs, '-inf', '(' .. ARGV[2])
return {trimmed, removed}
