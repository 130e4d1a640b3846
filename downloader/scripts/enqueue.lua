-- enqueue.lua: accept a new job (POST /download) in one step.
-- ARGV: job_id, aggr_id, aggr_limit, aggr_proxy ('' for none), job.accepted data (JSON),
--   idempotency key ('' for none; scoped to its tenant by the caller), request fingerprint,
--   idempotency window ms, sealed secrets (JSON object field -> real value, '' for none: the
--   real url / request headers where data holds redacted ones), aggregation scope (the tenant
--   whose aggr_prefix the aggregation has, '' for none), the most aggregations that scope may
--   have alive (0: no cap)
-- Keys touched: job:{id} (projection, created; sealed_* fields), job:{id}:events, events (global
--   stream), aggr:{a} (hash: limit, proxy, jobs = unfinished downloads, scope),
--   aggr:{a}:ready (list, RPUSH), aggregations (zset: aggr -> ready size),
--   aggregations:<scope> (the same, one tenant's), wake (stream that wakes processors),
--   idem:{key} (hash: job_id, fingerprint; expires after the window).
-- Returns: {'ok', job_id} | {'exists'} (already accepted: the script was resent) |
--   {'proxy_conflict', existing_proxy} |
--   {'replayed', job_id} (same key, same request) | {'key_conflict', job_id} (same key, other
--   request) | {'too_many_aggregations', cap}
local job_id, aggr_id, limit, proxy, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local idem_key, fingerprint, window_ms = ARGV[6], ARGV[7], tonumber(ARGV[8])
local sealed_json, scope, max_aggregations = ARGV[9], ARGV[10], tonumber(ARGV[11])

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
if not current[1] and max_aggregations > 0 then
  local registry = scope ~= '' and KEY.tenant_aggregations(scope) or KEY.aggregations
  if redis.call('ZCARD', registry) >= max_aggregations then
    return {'too_many_aggregations', max_aggregations}
  end
end

redis.call('HSET', aggr_key, 'limit', limit, 'proxy', proxy, 'scope', scope)
redis.call('HINCRBY', aggr_key, 'jobs', 1)
emit(job_id, 'job.accepted', data)
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
return {'ok', job_id}
