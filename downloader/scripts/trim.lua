-- trim.lua: keep a shard's event stream and job index to their windows.
-- KEYS: the shard's events, jobs
-- ARGV: the oldest event id to keep in the stream (`<ms>-0`), the index score (ms) below which
--   a job may have expired
-- Keys touched: events (XTRIM MINID ~), jobs, and the job/done keys of up to 500 old index
--   entries: an entry whose job has expired goes; one whose job still lives (a download
--   waiting for its aggregation for days) is scored now, to be looked at again a window later.
-- Returns: {stream entries trimmed, index entries removed}
local trimmed = redis.call('XTRIM', KEY.events, 'MINID', '~', ARGV[1])
local removed = 0
local old = redis.call('ZRANGEBYSCORE', KEY.jobs, '-inf', '(' .. ARGV[2], 'LIMIT', 0, 500)
for _, id in ipairs(old) do
  if redis.call('EXISTS', KEY.job(id), KEY.done(id)) > 0 then
    redis.call('ZADD', KEY.jobs, now_ms(), id)
  else
    redis.call('ZREM', KEY.jobs, id)
    removed = removed + 1
  end
end
return {trimmed, removed}
