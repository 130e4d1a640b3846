-- reap.lua: three calls of the file reaper. ARGV[1] = 'due': list jobs whose file is due for
-- deletion (ARGV[2] = limit), oldest first, without removing them; 'done': the file of job
-- ARGV[2] is gone, record it; 'later': the file of job ARGV[2] could not be deleted, try again
-- in ARGV[3] ms.
-- KEYS: the shard's events, reap
-- Keys touched: reap (zset job -> due ms), job:<id> + ev:<id> + events (file.deleted).
--   A packed job (settled without its file going: a callback that failed for good) gets no
--   event: it expires with the file's deletion anyway.
-- Returns: 'due': {ids..., ms until the next due one or -1}; 'done', 'later': 1
if ARGV[1] == 'due' then
  local out = redis.call('ZRANGEBYSCORE', KEY.reap, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
  local nxt = redis.call('ZRANGE', KEY.reap, #out, #out, 'WITHSCORES')
  out[#out + 1] = nxt[2] and math.max(0, tonumber(nxt[2]) - now_ms()) or -1
  return out
end
local job_id = ARGV[2]
if ARGV[1] == 'later' then
  redis.call('ZADD', KEY.reap, 'XX', now_ms() + tonumber(ARGV[3]), job_id)
  return 1
end
if redis.call('ZREM', KEY.reap, job_id) == 1 and redis.call('EXISTS', KEY.job(job_id)) == 1 then
  emit(job_id, 'file.deleted', '{}')
end
return done(1)
