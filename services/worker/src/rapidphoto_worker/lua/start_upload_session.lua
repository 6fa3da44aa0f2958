-- start_upload_session (PROTOCOL §3): create the session, publish SESSION_STARTED.
-- KEYS: state, photos, failures, log, owner's notification log
-- ARGV: session_id, user_id, total_photos, occurred_at, maxlen, ttl, session_channel
-- Reply: {'applied', event id} | {'duplicate'} (same owner and total) | {'conflict'}
local state_key, log_key = KEYS[1], KEYS[4]
local session_id, user_id, total = ARGV[1], ARGV[2], tonumber(ARGV[3])
local occurred_at, maxlen, ttl, channel = ARGV[4], ARGV[5], ARGV[6], ARGV[7]

local existing = redis.call('HMGET', state_key, F_OWNER, F_TOTAL)
if existing[1] then
  -- Starting again is harmless when it says the same thing (a redelivered job), and must change
  -- nothing when it does not: the owner decides who may watch the session.
  if existing[1] == user_id and tonumber(existing[2]) == total then
    return {'duplicate'}
  end
  return {'conflict'}
end

redis.call('HSET', state_key,
  F_OWNER, user_id, F_TOTAL, total, F_UPLOADED, 0, F_FAILED, 0,
  F_STATUS, STATUS_IN_PROGRESS, F_FAILURE_SEQ, 0)
local id = emit(log_key, channel, maxlen, occurred_at, SESSION_STARTED,
  ',"sessionId":' .. jstr(session_id) .. progress_fields(total, 0, 0, STATUS_IN_PROGRESS))
refresh_ttl(KEYS, ttl)
return {'applied', id}
