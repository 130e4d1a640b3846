-- enqueue.lua: accept a new job (POST /download) in one step.
-- ARGV: job_id, aggr_id, aggr_limit, aggr_proxy ('' for none), job.accepted data (JSON)
-- Keys touched: job:{id} (projection, created), job:{id}:events, events (global stream),
--   aggr:{a} (hash: limit, proxy, jobs = unfinished downloads), aggr:{a}:ready (list, RPUSH),
--   aggregations (zset: aggr -> ready size), wake (stream that wakes processors).
-- Returns: {'ok', event_id} | {'exists'} (id collision) | {'proxy_conflict', existing_proxy}
local job_id, aggr_id, limit, proxy, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('EXISTS', KEY.job(job_id)) == 1 then return {'exists'} end
local aggr_key = KEY.aggr(aggr_id)
local current = redis.call('HGET', aggr_key, 'proxy')
if current and current ~= proxy then return {'proxy_conflict', current} end

redis.call('HSET', aggr_key, 'limit', limit, 'proxy', proxy)
redis.call('HINCRBY', aggr_key, 'jobs', 1)
local event_id = emit(job_id, 'job.accepted', data)
redis.call('RPUSH', KEY.ready(aggr_id), job_id)
touch_registry(aggr_id)
wake(aggr_id)
return {'ok', event_id}
