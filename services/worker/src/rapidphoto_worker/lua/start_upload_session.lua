-- start_upload_session (PROTOCOL §3): create the session, publish SESSION_STARTED.
-- KEYS: state, photos, failures, log (one session's: one slot)
-- ARGV: publish command, session_id, user_id, total_photos, occurred_at, maxlen, ttl,
--       session_channel
-- Reply: {'applied', event id} | {'duplicate'} (same owner and total) | {'conflict'}
local k = session_keys(KEYS)
local publish = publish_command(ARGV[1])
local a = {session_id = ARGV[2], occurred_at = ARGV[5]}
local user_id, total = ARGV[3], tonumber(ARGV[4])
local maxlen, ttl, channel = ARGV[6], ARGV[7], ARGV[8]

local existing = session_read(k)
if existing then
  -- Starting again is harmless when it says the same thing (a redelivered job), and must change
  -- nothing when it does not: the owner decides who may watch the session.
  if existing.owner == user_id and existing.total == total then
    session_touch(k, existing)  -- so that a WAIT after it covers the first run (lib.lua)
    return {'duplicate'}
  end
  return {'conflict'}
end

session_create(k, user_id, total)
local id = emit(publish, k.log, channel, maxlen, SESSION_STARTED,
  session_event(a, {total = total, uploaded = 0, failed = 0}, STATUS_IN_PROGRESS))
refresh_ttl(KEYS, ttl)
return {'applied', id}
