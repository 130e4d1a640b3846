-- enqueue.lua: accept a new job (POST /download) in one step.
-- KEYS: the shard's events, job:<id>, aggr:<a>, ready:<a>[, idem:<key>]
-- ARGV: job_id, aggr_id, aggr_limit, aggr_proxy ('' for none), job.accepted data (JSON),
--   idempotency key ('' for none; scoped to its tenant by the caller), request fingerprint,
--   idempotency window ms, sealed secrets (JSON object field -> real value, '' for none: the
--   real url / request headers / callback URL where data holds redacted ones), aggregation
--   scope (the tenant whose aggr_prefix the aggregation has, '' for none), whether the caller
--   wants to be asked before a new aggregation is made (1: the tenant has a cap to check
--   across shards; 0: go on)
-- Keys touched: job:<id> (projection, created; sealed_* fields), ev:<id>, events, jobs (index),
--   aggr:<a> (hash: limit, proxy, jobs = unfinished downloads, scope), ready:<a> (RPUSH),
--   aggregations (zset: aggr -> ready size), aggregations:<scope> (the same, one tenant's), wake,
--   idem:<key> (hash: job_id, fingerprint; expires after the window).
-- Returns: {'ok', job_id} | {'exists'} (already accepted: the script was resent) |
--   {'proxy_conflict', existing_proxy} |
--   {'replayed', job_id} (same key, same request) | {'key_conflict', job_id} (same key, other
--   request) | {'new_aggregation'} (nothing written: check the tenant's cap, then call again
--   with 0)
local job_id, aggr_id, limit, proxy, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local idem_key, fingerprint, window_ms = ARGV[6], ARGV[7], tonumber(ARGV[8])
local sealed_json, scope, ask_first = ARGV[9], ARGV[10], ARGV[11] == '1'

if idem_key ~= '' then
  local seen = redis.call('HMGET', KEY.idempotency(idem_key), 'job_id', 'fingerprint')
  if seen[1] then
    return {seen[2] == fingerprint and 'replayed' or 'key_conflict', seen[1]}
  end
end

cjson.decode(data)  -- fails before any write if the document is not valid JSON for Lua
local sealed = sealed_json ~= '' and cjson.decode(sealed_json) or {}
if redis.call('EXISTS', KEY.job(job_id)) == 1 then return {'exists'} end
local aggr_key = KEY.aggr(aggr_id)
local current = redis.call('HMGET', aggr_key, 'limit', 'proxy')
if current[1] and (current[2] or '') ~= proxy then return {'proxy_conflict', current[2]} end
if not current[1] and ask_first then return {'new_aggregation'} end

redis.call('HSET', aggr_key, 'limit', limit, 'proxy', proxy, 'scope', scope)
redis.call('HINCRBY', aggr_key, 'jobs', 1)
local event_id = emit(job_id, 'job.accepted', data)
redis.call('ZADD', KEY.jobs, ts_of(event_id), job_id)
for field, value in pairs(sealed) do
  redis.call('HSET', KEY.job(job_id), SEALED[field], value)
end
redis.call('RPUSH', KEY.ready(aggr_id), job_id)
touch_registry(aggr_id)
wake(aggr_id)
if idem_key ~= '' then
  redis.call('HSET', KEY.idempotency(idem_key), 'job_id', job_id, 'fingerprint', fingerprint)
  redis.call('PEXPIRE', KEY.idempotency(idem_key), window_ms)
end
return done({'ok', job_id})
