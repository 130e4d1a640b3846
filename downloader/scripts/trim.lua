-- trim.lua: keep a shard's event stream and job index to their windows.
-- KEYS: the shard's events, jobs
-- ARGV: the oldest event id to keep in the stream (`<ms>-0`), the index score (ms) below which
--   a job may have expired
-- Keys touched: events (XTRIM MINID ~), jobs, and the job/done keys of up to 500 old index
--   entries: an entry whose job has expired goes; one whose job still lives (a download
--   waiting for its aggregation for days) is scored now, to be looked at again a window later.
-- Returns: {stream entries trimmed, index entries removed, 1 when the trim may drop events the
--   Kafka export (export:position, when it runs) has not sent yet, else 0}
local position = redis.call('GET', KEY.export_position)
local unexported = 0
if position and #redis.call('XRANGE', KEY.events, '(' .. position, '(' .. ARGV[1], 'COUNT', 1) > 0 then
  unexported = 1
end
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
return {trimmed, removed, unexported}
