-- lib.lua: helpers shared by the command scripts. scripts.py builds each command with
-- rapidphoto_contract.lua_scripts.build(lib.lua, <command>.lua): after the contract's generated
-- constants, its Lua libraries (stream_ids, json, the ENCODERS of the events, session_state), so
-- everything here is a local of that one script (a Redis script cannot load another).
--
-- Every command keeps the same shape (PROTOCOL §1, §6): read the session, decide, change the state,
-- append each resulting event to its log and PUBLISH the same bytes, refresh the TTLs. A script runs
-- atomically, so no client ever sees a state change without its event, or the other way round.

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

-- Append one event to a log and publish the same payload (PROTOCOL §4). `e` holds the event's
-- fields but its id, keyed by the event class's attribute names; the contract's generated encoder
-- writes them in wire order. Returns the entry id.
local function emit(log_key, channel, maxlen, event_type, e)
  local id = next_id(log_key)
  e.event_id = id
  local payload = ENCODERS[event_type](e)
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, id,
    LOG_FIELD_TYPE, event_type, LOG_FIELD_DATA, payload)
  redis.call('PUBLISH', channel, payload)
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

-- SESSION_TTL_SECONDS counts from a session's last change (PROTOCOL §2): every key of the session, and
-- the owner's notification log, get the full TTL again. EXPIRE on a missing key does nothing.
local function refresh_ttl(keys, ttl)
  for _, key in ipairs(keys) do
    redis.call('EXPIRE', key, ttl)
  end
end

-- Shared tail of the two photo commands: save the new counts, publish the photo event and, when
-- uploaded + failed reaches the total for the first time, complete the session (PROTOCOL §3): status
-- COMPLETED, SESSION_COMPLETED on the session log and channel, a notification on the owner's.
-- The photo event carries the status from before completion; SESSION_COMPLETED is the transition.
-- `photo` adds the photo event's own fields. Returns the reply for Python:
-- {'applied', photo event id[, completed id, notification id]}.
local function apply_photo_event(k, a, session, event_type, photo)
  session_save_counts(k, session)
  local reply = {'applied'}
  local event = session_event(a, session, session.status)
  for name, value in pairs(photo) do
    event[name] = value
  end
  reply[2] = emit(k.log, a.session_channel, a.maxlen, event_type, event)
  if session.status ~= STATUS_COMPLETED and session.uploaded + session.failed >= session.total then
    session_save_status(k, STATUS_COMPLETED)
    reply[3] = emit(k.log, a.session_channel, a.maxlen, SESSION_COMPLETED,
      session_event(a, session, STATUS_COMPLETED))
    reply[4] = emit(k.user_log, a.user_channel, a.maxlen, NOTIFICATION, {
      occurred_at = a.occurred_at,
      kind = KIND_UPLOAD_SESSION_COMPLETED,
      user_id = a.owner,
      session_id = a.session_id,
      total_photos = session.total,
      uploaded_photos = session.uploaded,
      failed_photos = session.failed,
    })
  end
  refresh_ttl(KEYS, a.ttl)
  return reply
end

-- KEYS and the ARGV prefix shared by the photo commands (commands.py builds them in this order):
-- the session's keys (keys.session_keys), then the owner's notification log.
local function photo_keys()
  local k = session_keys(KEYS)
  k.user_log = KEYS[5]
  return k
end

local function photo_args()
  return {
    session_id = ARGV[1],
    photo_id = ARGV[2],
    owner = ARGV[3],
    occurred_at = ARGV[4],
    maxlen = ARGV[5],
    ttl = ARGV[6],
    session_channel = ARGV[7],
    user_channel = ARGV[8],
  }
end

-- The checks both photo commands start with. Returns the session, or the reply to end with.
-- The owner was read by the caller to name the owner's log in KEYS (a script may only touch keys it
-- is given); it never changes once set, but the session may have expired and been started again by
-- someone else in between, so check rather than trust it.
local function load_photo_session(k, a)
  local session = session_read(k)
  if not session then
    return nil, {'not_found'}
  end
  if session.owner ~= a.owner then
    return nil, {'owner_changed'}
  end
  return session, nil
end
