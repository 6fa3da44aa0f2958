-- notify_session_completed (PROTOCOL §3, §9): the second step of a completion, in the owner's slot:
-- append the `notification` to the owner's log and publish it, once per completion.
-- KEYS: the owner's notification log, the completion's record (keys.session_completion_key)
-- ARGV: publish command, user_id, session_id, completed id, occurred_at, total, uploaded, failed,
--       maxlen, ttl, user_channel (the middle five: the session's pending notification)
-- Reply: {'applied', notification id} | {'duplicate', notification id}
--
-- The record holds "<completed id> <notification id>": a retry (the worker died before clearing the
-- pending mark, or two jobs of the session finish it at once) finds it and writes nothing. A record
-- of another completed id is an older incarnation of the session (expired, started again).
local log_key, record_key = KEYS[1], KEYS[2]
local publish = publish_command(ARGV[1])
local user_id, session_id, completed_id = ARGV[2], ARGV[3], ARGV[4]
local maxlen, ttl, channel = ARGV[9], ARGV[10], ARGV[11]

local record = redis.call('GET', record_key)
if record then
  local done_for, notification_id = string.match(record, '^(%S+) (%S+)$')
  if done_for == completed_id then
    redis.call('SET', record_key, record, 'KEEPTTL')  -- a write for WAIT to cover (lib.lua)
    return {'duplicate', notification_id}
  end
end

local id = emit(publish, log_key, channel, maxlen, NOTIFICATION, {
  occurred_at = ARGV[5],
  kind = KIND_UPLOAD_SESSION_COMPLETED,
  user_id = user_id,
  session_id = session_id,
  total_photos = tonumber(ARGV[6]),
  uploaded_photos = tonumber(ARGV[7]),
  failed_photos = tonumber(ARGV[8]),
})
redis.call('SET', record_key, completed_id .. ' ' .. id, 'EX', ttl)
redis.call('EXPIRE', log_key, ttl)
return {'applied', id}
