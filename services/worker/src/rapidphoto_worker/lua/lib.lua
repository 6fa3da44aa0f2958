-- lib.lua: helpers shared by the command scripts. scripts.py loads each command as
--   <constants generated from rapidphoto_contract> .. lib.lua .. <command>.lua
-- so everything here is a local of that one script (a Redis script cannot load another).
--
-- Every command keeps the same shape (PROTOCOL §1, §6): read the session, decide, change the state,
-- append each resulting event to its log and PUBLISH the same bytes, refresh the TTLs. A script runs
-- atomically, so no client ever sees a state change without its event, or the other way round.

-- JSON string, byte-identical to Python's json.dumps(s, ensure_ascii=False) for the strings we pass
-- through here: ids (validated to [A-Za-z0-9_-]), event types, timestamps. cjson also escapes "/",
-- which Python does not; undo that. (cjson escapes DEL too, so free text such as a failure reason is
-- encoded by Python with the contract's own encoder and passed in ready-made; see commands.py.)
local function jstr(s)
  return (string.gsub(cjson.encode(s), '\\/', '/'))
end

-- Lua numbers are doubles; counts are small integers, so %d prints them exactly.
local function jint(n)
  return string.format('%d', n)
end

-- The id the next entry of a stream will get. We choose it ourselves (rather than XADD '*') because the
-- payload we store and publish must contain its own id: a client's Last-Event-ID is that id (PROTOCOL §4).
-- Same rule as Redis uses for '*': the current ms with sequence 0, or, if the clock has not moved past
-- the newest entry (same ms, or a clock that went backwards), that entry's ms with the next sequence.
-- The newest entry is the last id ever generated because nothing XDELs from our logs and approximate
-- MAXLEN trimming never removes the newest entry.
local function next_id(log_key)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local newest = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)
  if #newest > 0 then
    local ms, seq = string.match(newest[1][1], '^(%d+)-(%d+)$')
    ms, seq = tonumber(ms), tonumber(seq)
    if now_ms <= ms then
      -- %.0f: these exceed 2^31, which %d would not print correctly on every Lua build.
      return string.format('%.0f-%.0f', ms, seq + 1)
    end
  end
  return string.format('%.0f-0', now_ms)
end

-- Append one event to a log and publish the same payload. `fields` is the JSON text of the event's
-- own fields, starting with a comma; the envelope (type, eventId, occurredAt) comes first, in the wire
-- order of rapidphoto_contract.events. Returns the entry id.
local function emit(log_key, channel, maxlen, occurred_at, event_type, fields)
  local id = next_id(log_key)
  local payload = '{"type":' .. jstr(event_type) .. ',"eventId":' .. jstr(id)
    .. ',"occurredAt":' .. jstr(occurred_at) .. fields .. '}'
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, id,
    LOG_FIELD_TYPE, event_type, LOG_FIELD_DATA, payload)
  redis.call('PUBLISH', channel, payload)
  return id
end

-- The progress fields every session event ends with (PROTOCOL §4), in wire order.
local function progress_fields(total, uploaded, failed, status)
  return ',"totalPhotos":' .. jint(total)
    .. ',"uploadedPhotos":' .. jint(uploaded)
    .. ',"failedPhotos":' .. jint(failed)
    .. ',"progressPercent":' .. jint(math.floor(100 * (uploaded + failed) / total))
    .. ',"status":' .. jstr(status)
end

-- SESSION_TTL_SECONDS counts from a session's last change (PROTOCOL §2): every key of the session, and
-- the owner's notification log, get the full TTL again. EXPIRE on a missing key does nothing.
local function refresh_ttl(keys, ttl)
  for _, key in ipairs(keys) do
    redis.call('EXPIRE', key, ttl)
  end
end

-- The session's state hash as numbers, or nil if the session does not exist.
local function read_session(state_key)
  local s = redis.call('HMGET', state_key, F_OWNER, F_TOTAL, F_UPLOADED, F_FAILED, F_STATUS)
  if not s[1] then
    return nil
  end
  return {
    owner = s[1],
    total = tonumber(s[2]),
    uploaded = tonumber(s[3]),
    failed = tonumber(s[4]),
    status = s[5],
  }
end

-- Shared tail of the two photo commands: save the new counts, publish the photo event and, when
-- uploaded + failed reaches the total for the first time, complete the session (PROTOCOL §3): status
-- COMPLETED, SESSION_COMPLETED on the session log and channel, a notification on the owner's.
-- The photo event carries the status from before completion; SESSION_COMPLETED is the transition.
-- Returns the reply for Python: {'applied', photo event id[, completed id, notification id]}.
local function apply_photo_event(k, a, session, event_type, photo_fields)
  redis.call('HSET', k.state, F_UPLOADED, session.uploaded, F_FAILED, session.failed)
  local reply = {'applied'}
  reply[2] = emit(k.log, a.session_channel, a.maxlen, a.occurred_at, event_type,
    ',"sessionId":' .. jstr(a.session_id) .. photo_fields
    .. progress_fields(session.total, session.uploaded, session.failed, session.status))
  if session.status ~= STATUS_COMPLETED and session.uploaded + session.failed >= session.total then
    redis.call('HSET', k.state, F_STATUS, STATUS_COMPLETED)
    reply[3] = emit(k.log, a.session_channel, a.maxlen, a.occurred_at, SESSION_COMPLETED,
      ',"sessionId":' .. jstr(a.session_id)
      .. progress_fields(session.total, session.uploaded, session.failed, STATUS_COMPLETED))
    reply[4] = emit(k.user_log, a.user_channel, a.maxlen, a.occurred_at, NOTIFICATION,
      ',"kind":' .. jstr(KIND_UPLOAD_SESSION_COMPLETED)
      .. ',"userId":' .. jstr(a.owner)
      .. ',"sessionId":' .. jstr(a.session_id)
      .. ',"totalPhotos":' .. jint(session.total)
      .. ',"uploadedPhotos":' .. jint(session.uploaded)
      .. ',"failedPhotos":' .. jint(session.failed))
  end
  refresh_ttl(KEYS, a.ttl)
  return reply
end

-- KEYS and the ARGV prefix shared by the photo commands (commands.py builds them in this order).
local function photo_keys()
  return {
    state = KEYS[1], photos = KEYS[2], failures = KEYS[3], log = KEYS[4], user_log = KEYS[5],
  }
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
  local session = read_session(k.state)
  if not session then
    return nil, {'not_found'}
  end
  if session.owner ~= a.owner then
    return nil, {'owner_changed'}
  end
  return session, nil
end
