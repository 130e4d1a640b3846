-- prelude.lua: shared by every script (storage.py puts it in front of each one).
--
-- Every key a script touches belongs to one shard (see downloader/shards.py) and shares its hash
-- tag, so the whole script runs in one Redis Cluster slot:
--   KEYS[1]     the shard's event stream, `<prefix>:{<tag>}:events`: it routes the script to
--               the shard's node, and every other key is named from its prefix `<prefix>:{<tag>}:`
--               in KEY below (keys of jobs popped from a queue cannot be known beforehand)
--   KEYS[2..]   the keys of the job or aggregation the script is called for, then every fixed
--               key of the shard (storage.Keys.FIXED, whichever the script touches), declared
--               as Redis Cluster asks, and last the shard's `fence`: a key that never exists, so
--               that no script runs while the shard's slot moves between nodes (Redis answers
--               TRYAGAIN then: see storage.Keys.fence). Keys a script only learns as it runs
--               (the jobs popped from a queue) are of the same shard, so the same slot.
--   ARGV[#ARGV] JSON settings: {"retention_ms": ..., "events_maxlen": ...}
-- Scripts that are not about a shard (ratelimit.lua, stats.lua) name their own keys.

local SETTINGS = cjson.decode(ARGV[#ARGV])
local P = string.match(KEYS[1] or '', '^(.*}:)events$') or ''

-- Key builders: each has its twin in storage.Keys (tests/test_contract.py checks both spell
-- every name the same).
local KEY = {}
function KEY.job(id) return P .. 'job:' .. id end
function KEY.ev(id) return P .. 'ev:' .. id end
function KEY.done(id) return P .. 'done:' .. id end
function KEY.aggr(a) return P .. 'aggr:' .. a end
function KEY.ready(a) return P .. 'ready:' .. a end
function KEY.inflight(a) return P .. 'inflight:' .. a end
function KEY.idempotency(k) return P .. 'idem:' .. k end
function KEY.tenant_aggregations(scope) return P .. 'aggregations:' .. scope end
KEY.events = P .. 'events'
KEY.jobs = P .. 'jobs'
KEY.aggregations = P .. 'aggregations'
KEY.wake = P .. 'wake'
KEY.leases = P .. 'leases'
KEY.lease_owners = P .. 'lease-owners'
KEY.retries = P .. 'retries'
KEY.callbacks = P .. 'callbacks'
KEY.callback_retries = P .. 'callback-retries'
KEY.reap = P .. 'reap'
KEY.export_lock = P .. 'export:lock'
KEY.export_position = P .. 'export:position'

local NOW
local function now_ms()
  if not NOW then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

local function str(v)
  if v == true then return 'true' end
  if v == false then return 'false' end
  if type(v) == 'table' then return cjson.encode(v) end
  if type(v) == 'number' then return string.format('%d', v) end
  return tostring(v)
end

-- An event id is the id of its entry in the shard's event stream: `<ms>-<seq>`.
local function ts_of(event_id) return tonumber(string.match(event_id, '^(%d+)')) end

-- The fold: how one event changes a job's projection. Pure: it reads only the event, so
-- replaying a job's events (rebuild.lua) gives back exactly the live projection.
local function fold(job_id, etype, ts, event_id, d)
  local f = {updated_at = ts, last_event_id = event_id}
  if etype == 'job.accepted' then
    for k, v in pairs(d) do f[k] = v end
    f.id = job_id
    f.created_at = ts
    f.download_state = 'Pending'
    -- a job without a callback (it names an S3 bucket) never gets one: say so, not 'Pending'
    f.callback_state = (d.callback_type or '') == '' and 'NotRequested' or 'Pending'
    f.s3_bucket = d.s3_bucket or ''
    f.s3_region = d.s3_region or ''
    f.s3_key = ''
    f.download_attempts = 0
    f.callback_attempts = 0
    f.response_code = 0
    f.error = ''
    f.delivery_error = ''
    f.download_url = ''
    f.file_mime_type = ''
    f.file_bytes = 0
    f.image_size = ''
    f.file_state = 'none'
    f.outcome_event_id = ''
  elseif etype == 'download.started' then
    f.download_state = 'InProgress'
    f.download_attempts = d.attempt
  elseif etype == 'download.requeued' then
    f.download_state = 'Pending'
    f.download_attempts = d.attempt - 1
  elseif etype == 'download.retry_scheduled' then
    f.download_state = 'Pending'
    f.response_code = d.response_code
    f.error = d.error
  elseif etype == 'download.succeeded' then
    f.download_state = 'Success'
    f.outcome_event_id = event_id
    f.response_code = d.response_code
    f.error = ''
    f.download_url = d.download_url
    f.file_mime_type = d.file_mime_type
    f.file_bytes = d.file_bytes
    f.image_size = d.image_size
    -- 'stored': in our file store, reaped after the callback; 's3': in the job's bucket, ours
    -- never to delete
    f.s3_key = d.s3_key or ''
    f.file_state = f.s3_key ~= '' and 's3' or 'stored'
  elseif etype == 'download.failed' then
    f.download_state = 'Failed'
    f.outcome_event_id = event_id
    f.response_code = d.response_code
    f.error = d.error
    f.file_mime_type = d.file_mime_type or ''
  elseif etype == 'job.aborted' then
    f.download_state = 'Failed'
    f.outcome_event_id = event_id
    f.error = 'Aborted: ' .. d.reason
  elseif etype == 'callback.attempted' then
    f.callback_state = 'InProgress'
    f.callback_attempts = d.attempt
  elseif etype == 'callback.retry_scheduled' then
    f.callback_state = 'Pending'
    f.delivery_error = d.delivery_error
  elseif etype == 'callback.delivered' then
    f.callback_state = 'Success'
    f.delivery_error = ''
  elseif etype == 'callback.failed' then
    f.callback_state = 'Failed'
    f.delivery_error = d.delivery_error
  elseif etype == 'callback.requeued' then
    f.callback_state = 'Pending'
    f.callback_attempts = 0
  elseif etype == 'file.deleted' then
    f.file_state = 'deleted'
  end
  local flat = {}
  for k, v in pairs(f) do
    flat[#flat + 1] = k
    flat[#flat + 1] = str(v)
  end
  return flat
end

-- A job is settled when nothing more will happen to it unless someone asks: its callback
-- failed, or was delivered (or there is none) and no file of it stays in the file store.
local function settled(job_key)
  local s = redis.call('HMGET', job_key, 'callback_state', 'file_state', 'download_state')
  if s[1] == 'Failed' then return true end
  if s[1] == 'NotRequested' then
    return (s[3] == 'Success' or s[3] == 'Failed') and s[2] ~= 'stored'
  end
  return s[1] == 'Success' and s[2] ~= 'stored'
end

-- The secrets of a job (its real url, request headers and callback URL) are kept out of its
-- events, in fields of the projection that only these scripts read: SEALED[field] names them.
local SEALED = {
  url = 'sealed_url', request_headers = 'sealed_request_headers', callback_dst = 'sealed_callback_dst',
}

-- A live job is its projection (hash job:<id>) and its events (list ev:<id>, one
-- `<id>\t<type>\t<data JSON>` line each). A settled job is packed into one string, done:<id>:
-- the JSON object of its sealed fields, then its event lines, separated by newlines (JSON
-- escapes both separators), expiring after the retention period. Its projection is folded from
-- the events when asked for (view.lua): no field is kept twice. Packed lines are short: an
-- event type is its code (TYPE_CODE), an event id after the first is `+<ms after the one
-- before>`, with `-<seq>` when its sequence number is not 0 (`+0-1`). Their twins, which read
-- packed jobs for GET /jobs/{id}/events: events.PACKED_TYPE_CODES and events.unpack_lines.
local SETTLED = {}  -- job ids settled by the events of this script run: packed by done()
local TYPE_CODE = {
  ['job.accepted'] = 'a', ['download.started'] = 's', ['download.requeued'] = 'q',
  ['download.retry_scheduled'] = 'r', ['download.succeeded'] = 'S', ['download.failed'] = 'F',
  ['job.aborted'] = 'x', ['callback.attempted'] = 'c', ['callback.retry_scheduled'] = 'R',
  ['callback.delivered'] = 'C', ['callback.failed'] = 'E', ['callback.requeued'] = 'Q',
  ['file.deleted'] = 'd',
}
local TYPE_OF = {}
for etype, code in pairs(TYPE_CODE) do TYPE_OF[code] = etype end

-- A line as packed; `prev_ms`: the ms of the event before (nil for the first).
local function pack_line(line, prev_ms)
  local id, etype, data = string.match(line, '^([^\t]*)\t([^\t]*)\t(.*)$')
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms = tonumber(ms)
  if prev_ms and ms >= prev_ms then
    id = '+' .. string.format('%d', ms - prev_ms) .. (seq ~= '0' and ('-' .. seq) or '')
  end
  return id .. '\t' .. (TYPE_CODE[etype] or etype) .. '\t' .. data, ms
end

-- A packed line as it was live (a line packed before lines were short passes unchanged).
local function unpack_line(line, prev_ms)
  local id, code, data = string.match(line, '^([^\t]*)\t([^\t]*)\t(.*)$')
  local delta, seq = string.match(id, '^%+(%d+)%-?(%d*)$')
  local ms
  if delta then
    ms = prev_ms + tonumber(delta)
    id = string.format('%d', ms) .. '-' .. (seq ~= '' and seq or '0')
  else
    ms = tonumber(string.match(id, '^(%d+)'))
  end
  return id .. '\t' .. (TYPE_OF[code] or code) .. '\t' .. data, ms
end

-- Append one event to the shard's stream (its id) and to the job's list, and fold it into the
-- projection. `data_json` is the event's data as JSON text (kept verbatim); returns the event id.
local function emit(job_id, etype, data_json)
  local data = cjson.decode(data_json)  -- before any write: a bad document changes nothing
  local id = redis.call('XADD', KEY.events, 'MAXLEN', '~', SETTINGS.events_maxlen, '*',
    'j', job_id, 't', etype, 'd', data_json)
  local job_key = KEY.job(job_id)
  redis.call('RPUSH', KEY.ev(job_id), id .. '\t' .. etype .. '\t' .. data_json)
  redis.call('HSET', job_key, unpack(fold(job_id, etype, ts_of(id), id, data)))
  SETTLED[job_id] = settled(job_key) or nil
  return id
end

-- Pack a settled job: its sealed fields and its event lines into done:<id>, expiring after the
-- retention period; its live keys go.
local function pack(job_id)
  local job_key, ev_key = KEY.job(job_id), KEY.ev(job_id)
  local sealed = {}
  for _, field in pairs(SEALED) do
    local value = redis.call('HGET', job_key, field)
    if value then sealed[field] = value end
  end
  local lines = redis.call('LRANGE', ev_key, 0, -1)
  local ms
  for i, line in ipairs(lines) do lines[i], ms = pack_line(line, ms) end
  local head = next(sealed) and cjson.encode(sealed) or '{}'
  redis.call('SET', KEY.done(job_id), head .. '\n' .. table.concat(lines, '\n'),
    'PX', SETTINGS.retention_ms)
  redis.call('DEL', job_key, ev_key)
end

-- The end of every script that emits: pack what settled, then return `result`.
local function done(result)
  for job_id in pairs(SETTLED) do pack(job_id) end
  return result
end

-- The event lines of a packed job, and its sealed fields (a table); nil when not packed.
local function unpack_done(job_id)
  local packed = redis.call('GET', KEY.done(job_id))
  if not packed then return nil end
  local lines, ms = {}, nil
  for line in string.gmatch(packed, '[^\n]+') do lines[#lines + 1] = line end
  local sealed = cjson.decode(table.remove(lines, 1))
  for i, line in ipairs(lines) do lines[i], ms = unpack_line(line, ms) end
  return lines, sealed
end

-- Fold event lines (as stored) into a flat projection table {field = value}.
local function fold_lines(job_id, lines)
  local f = {}
  for _, line in ipairs(lines) do
    local id, etype, data = string.match(line, '^([^\t]*)\t([^\t]*)\t(.*)$')
    local flat = fold(job_id, etype, ts_of(id), id, cjson.decode(data))
    for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  end
  return f
end

-- Some projection fields of a job, live or packed (folded from its events), in `names`' order;
-- nil when the job is neither.
local function fields_of(job_id, names)
  if redis.call('EXISTS', KEY.job(job_id)) == 1 then
    return redis.call('HMGET', KEY.job(job_id), unpack(names))
  end
  local lines = unpack_done(job_id)
  if not lines then return nil end
  local folded, out = fold_lines(job_id, lines), {}
  for i, name in ipairs(names) do out[i] = folded[name] or false end
  return out
end

-- Make a packed job live again (a /retry of its failed callback): its list and projection come
-- back from its events. Returns false when the job is neither live nor packed.
local function revive(job_id)
  if redis.call('EXISTS', KEY.job(job_id)) == 1 then return true end
  local lines, sealed = unpack_done(job_id)
  if not lines then return false end
  local flat = {}
  for k, v in pairs(fold_lines(job_id, lines)) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  for k, v in pairs(sealed) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  redis.call('HSET', KEY.job(job_id), unpack(flat))
  redis.call('RPUSH', KEY.ev(job_id), unpack(lines))
  redis.call('DEL', KEY.done(job_id))
  return true
end

-- Keep the registry score (jobs waiting in the ready queue) exact for one aggregation, in the
-- registry of all and in its tenant's (`scope`, the tenant whose aggr_prefix it has).
local function touch_registry(aggr_id)
  local aggr = redis.call('HMGET', KEY.aggr(aggr_id), 'limit', 'scope')
  if aggr[1] then
    local waiting = redis.call('LLEN', KEY.ready(aggr_id))
    redis.call('ZADD', KEY.aggregations, waiting, aggr_id)
    if aggr[2] and aggr[2] ~= '' then
      redis.call('ZADD', KEY.tenant_aggregations(aggr[2]), waiting, aggr_id)
    end
  else
    redis.call('ZREM', KEY.aggregations, aggr_id)
  end
end

-- HMGET of projection fields, with the real value of a sealed one (for the processor's download
-- and the notifier's resource_url).
local function unsealed(job_key, fields)
  local wanted = {}
  for i, f in ipairs(fields) do wanted[i] = f end
  local seal_at = {}
  for i, f in ipairs(fields) do
    if SEALED[f] then
      wanted[#wanted + 1] = SEALED[f]
      seal_at[#wanted] = i
    end
  end
  local row = redis.call('HMGET', job_key, unpack(wanted))
  for at, i in pairs(seal_at) do
    if row[at] then row[i] = row[at] end
  end
  for _ = #fields + 1, #row do table.remove(row) end
  return row
end

-- The download reached its final outcome: hand the callback to the notifiers, if it has one.
local function queue_callback(job_id)
  if redis.call('HGET', KEY.job(job_id), 'callback_state') ~= 'NotRequested' then
    redis.call('XADD', KEY.callbacks, '*', 'job_id', job_id)
  end
end

local function wake(aggr_id)
  redis.call('XADD', KEY.wake, 'MAXLEN', '~', 10000, '*', 'a', aggr_id)
end

-- One job of the aggregation reached its final download outcome.
local function aggr_job_done(aggr_id)
  local left = redis.call('HINCRBY', KEY.aggr(aggr_id), 'jobs', -1)
  if left <= 0 and redis.call('LLEN', KEY.ready(aggr_id)) == 0
      and redis.call('SCARD', KEY.inflight(aggr_id)) == 0 then
    local scope = redis.call('HGET', KEY.aggr(aggr_id), 'scope')
    redis.call('DEL', KEY.aggr(aggr_id))
    if scope and scope ~= '' then redis.call('ZREM', KEY.tenant_aggregations(scope), aggr_id) end
  end
  touch_registry(aggr_id)
end

-- Start one job popped from the ready queue of its aggregation: take a slot, lease it to
-- `owner` until `expiry`, emit download.started. Returns the requested projection fields and
-- the lease token (`owner/<download.started event id>`, unique per claim: the fence for renew
-- and finish), or nil if the job no longer exists (expired after its retention).
local function start_job(aggr_id, job_id, owner, expiry, fields)
  local job_key = KEY.job(job_id)
  if redis.call('EXISTS', job_key) == 0 then return nil end
  redis.call('SADD', KEY.inflight(aggr_id), job_id)
  redis.call('ZADD', KEY.leases, expiry, job_id)
  local attempt = tonumber(redis.call('HGET', job_key, 'download_attempts') or '0') + 1
  local token = owner .. '/' .. emit(job_id, 'download.started', cjson.encode({attempt = attempt}))
  redis.call('HSET', KEY.lease_owners, job_id, token)
  local row = unsealed(job_key, fields)
  row[#row + 1] = token
  return row
end
