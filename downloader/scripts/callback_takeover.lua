-- callback_takeover.lua: a live notifier takes over the callbacks of notifiers that are gone.
-- Each notifier is a consumer of each shard's callbacks group, named by its instance id, and
-- keeps a liveness key while it runs (storage.beat). The caller names the consumers of this
-- shard whose key lapsed; their pending entries (read and not settled) move to this consumer,
-- oldest first, and a gone consumer left with none is deleted from the group. One script: two
-- notifiers running it never take the same entry.
-- KEYS: the shard's events, callbacks
-- ARGV: this consumer, group, max entries to take (0: only delete gone consumers left empty),
--   the gone consumers' names...
-- Keys touched: callbacks (XINFO CONSUMERS, XPENDING, XCLAIM, XRANGE; XACK of an entry deleted
--   from the stream; XGROUP DELCONSUMER).
-- Returns: one row per gone consumer: {name, 1 if deleted else 0, entry id, job id, ...}
local me, group, room = ARGV[1], ARGV[2], tonumber(ARGV[3])
local gone = {}
for i = 4, #ARGV - 1 do gone[ARGV[i]] = true end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEY.callbacks, group)
if not ok then return {} end  -- no stream or group yet: nobody to take over from
local out = {}
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  local name, pending = info['name'], tonumber(info['pending'])
  if name ~= me and gone[name] then
    local row = {name, 0}
    if pending > 0 and room > 0 then
      local ids = {}
      for _, p in ipairs(redis.call('XPENDING', KEY.callbacks, group, '-', '+', room, name)) do
        ids[#ids + 1] = p[1]
      end
      redis.call('XCLAIM', KEY.callbacks, group, me, 0, unpack(ids))
      for _, id in ipairs(ids) do
        local entry = redis.call('XRANGE', KEY.callbacks, id, id)[1]
        if entry then
          local job_id = ''
          for i = 1, #entry[2], 2 do
            if entry[2][i] == 'job_id' then job_id = entry[2][i + 1] end
          end
          row[#row + 1] = id
          row[#row + 1] = job_id
        else
          redis.call('XACK', KEY.callbacks, group, id)  -- deleted from the stream: nothing to do
        end
      end
      room = room - #ids
      pending = pending - #ids
    end
    if pending == 0 then
      redis.call('XGROUP', 'DELCONSUMER', KEY.callbacks, group, name)
      row[2] = 1
    end
    out[#out + 1] = row
  end
end
return out
