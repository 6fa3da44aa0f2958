-- lib.lua: helpers shared by the command scripts. scripts.py builds each command with
-- rapidphoto_contract.lua_scripts.build(lib.lua, <command>.lua): after the contract's generated
-- constants, its Lua libraries (stream_ids, json, the ENCODERS of the events, session_state), so
-- everything here is a local of that one script (a Redis script cannot load another).
--
-- Every command keeps the same shape (PROTOCOL §1, §6): read the session, decide, change the state,
-- append each resulting event to its log and publish the same bytes, refresh the TTLs. A script runs
-- atomically, so no client ever sees a state change without its event, or the other way round.
-- Every script touches the keys of one slot only (PROTOCOL §9: a session's, or a user's), which the
-- shebang makes Redis enforce on a cluster; so a completion's notification, in the owner's slot, is
-- a script of its own (notify_session_completed.lua).
--
-- The publish command comes from Python (ARGV): PUBLISH on a standalone Redis, SPUBLISH (sharded
-- pub/sub, which the relay subscribes to with SSUBSCRIBE) on a cluster. Both reach the subscribers
-- of the one mode the relay runs in.
local PUBLISH_COMMANDS = {PUBLISH = true, SPUBLISH = true}

local function publish_command(name)
  if not PUBLISH_COMMANDS[name] then
    error('unknown publish command ' .. tostring(name))
  end
  return name
end

-- The id the next entry of a stream will get. We choose it ourselves (rather than XADD '*') because the
-- payload we store and publish must contain its own id: a client's Last-Event-ID is that id (PROTOCOL §4).
-- Same rule as Redis uses for '*': the current ms with sequence 0, or, if the clock has not moved past
-- the newest entry (same ms, or a clock that went backwards), that entry's ms with the next sequence.
-- The newest entry is the last id ever generated because nothing XDELs from our logs and approximate
-- MAXLEN trimming never removes the newest entry (PROTOCOL §10).
local function next_id(log_key)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local newest = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)
  if #newest > 0 then
    local ms, seq = stream_id_parts(newest[1][1])
    -- As numbers: a ms is far below 2^53, and so is any sequence this rule generates.
    ms, seq = tonumber(ms), tonumber(seq)
    if now_ms <= ms then
      -- %.0f: these exceed 2^31, which %d would not print correctly on every Lua build.
      return string.format('%.0f-%.0f', ms, seq + 1)
    end
  end
  return string.format('%.0f-0', now_ms)
end

-- Append one event to a log and publish the same payload (PROTOCOL §4) with `publish` (PUBLISH or
-- SPUBLISH). `e` holds the event's fields but its id, keyed by the event class's attribute names;
-- the contract's generated encoder writes them in wire order. Returns the entry id.
local function emit(publish, log_key, channel, maxlen, event_type, e)
  local id = next_id(log_key)
  e.event_id = id
  local payload = ENCODERS[event_type](e)
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, id,
    LOG_FIELD_TYPE, event_type, LOG_FIELD_DATA, payload)
  redis.call(publish, channel, payload)
  return id
end

-- The fields of a session event (PROTOCOL §4): the progress fields, counts from `session`.
local function session_event(a, session, status)
  return {
    occurred_at = a.occurred_at,
    session_id = a.session_id,
    total_photos = session.total,
    uploaded_photos = session.uploaded,
    failed_photos = session.failed,
    progress_percent = math.floor(100 * (session.uploaded + session.failed) / session.total),
    status = status,
  }
end

-- SESSION_TTL_SECONDS counts from a session's last change (PROTOCOL §2): every key of the script gets
-- the full TTL again. EXPIRE on a missing key does nothing.
local function refresh_ttl(keys, ttl)
  for _, key in ipairs(keys) do
    redis.call('EXPIRE', key, ttl)
  end
end

-- Shared tail of the two photo commands: save the new counts, publish the photo event and, when
-- uploaded + failed reaches the total for the first time, complete the session (PROTOCOL §3): status
-- COMPLETED, SESSION_COMPLETED on the session log and channel, and the owner's notification marked
-- pending in the session's state, in this same atomic step. The notification itself is written by
-- the second step, in the owner's slot (notify_session_completed.lua); the mark makes sure it is,
-- once, even if this worker dies first: any later photo command of the session sees it.
-- The photo event carries the status from before completion; SESSION_COMPLETED is the transition.
-- `photo` adds the photo event's own fields. Returns the reply for Python (see photo_reply).
-- The reply of a photo command that found its session: {status, owner, pending notification or '',
-- event ids...}. The owner and the pending notification tell Python whether to run the second step.
local function photo_reply(status, k, session, ids)
  local reply = {status, session.owner, session_pending_notification(k) or ''}
  for _, id in ipairs(ids) do
    reply[#reply + 1] = id
  end
  return reply
end

local function apply_photo_event(k, a, session, event_type, photo)
  session_save_counts(k, session)
  local event = session_event(a, session, session.status)
  for name, value in pairs(photo) do
    event[name] = value
  end
  local ids = {emit(a.publish, k.log, a.session_channel, a.maxlen, event_type, event)}
  if session.status ~= STATUS_COMPLETED and session.uploaded + session.failed >= session.total then
    session_save_status(k, STATUS_COMPLETED)
    ids[2] = emit(a.publish, k.log, a.session_channel, a.maxlen, SESSION_COMPLETED,
      session_event(a, session, STATUS_COMPLETED))
    session_set_pending_notification(k, {
      completed_id = ids[2],
      occurred_at = a.occurred_at,
      total = session.total,
      uploaded = session.uploaded,
      failed = session.failed,
    })
  end
  refresh_ttl(KEYS, a.ttl)
  return photo_reply('applied', k, session, ids)
end

-- KEYS and ARGV shared by the photo commands (commands.py builds them in this order): the session's
-- keys (keys.session_keys); the publish command, then the fields below.
local function photo_keys()
  return session_keys(KEYS)
end

local function photo_args()
  return {
    publish = publish_command(ARGV[1]),
    session_id = ARGV[2],
    photo_id = ARGV[3],
    occurred_at = ARGV[4],
    maxlen = ARGV[5],
    ttl = ARGV[6],
    session_channel = ARGV[7],
  }
end

-- A photo command that changes nothing: {'duplicate', owner, pending notification or ''}. It still
-- writes (nothing): so that a WAIT after it also covers the first run's writes (PROTOCOL §9).
local function photo_duplicate(k, session)
  session_touch(k, session)
  return photo_reply('duplicate', k, session, {})
end
