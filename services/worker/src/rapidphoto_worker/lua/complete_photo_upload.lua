-- complete_photo_upload (PROTOCOL §3): mark the photo uploaded, publish PHOTO_UPLOADED.
-- KEYS: state, photos, failures, log, owner's notification log
-- ARGV: session_id, photo_id, owner, occurred_at, maxlen, ttl, session_channel, user_channel
-- Reply: {'applied', ids...} | {'duplicate'} | {'too_many'} | {'not_found'} | {'owner_changed'}
local k, a = photo_keys(), photo_args()
local session, early = load_photo_session(k, a)
if early then
  return early
end

local mark = redis.call('HGET', k.photos, a.photo_id)
if mark == UPLOADED_MARK then
  return {'duplicate'}
end
if mark then
  -- Failed before: the latest outcome wins, so the photo moves from failed to uploaded and leaves
  -- the list of current failures. It is not a new distinct photo, so the total is no limit here.
  session.failed = session.failed - 1
  redis.call('ZREM', k.failures, a.photo_id)
elseif session.uploaded + session.failed >= session.total then
  return {'too_many'}
end
session.uploaded = session.uploaded + 1
redis.call('HSET', k.photos, a.photo_id, UPLOADED_MARK)
return apply_photo_event(k, a, session, PHOTO_UPLOADED, ',"photoId":' .. jstr(a.photo_id))
