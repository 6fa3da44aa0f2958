-- complete_photo_upload (PROTOCOL §3): mark the photo uploaded, publish PHOTO_UPLOADED.
-- KEYS: state, photos, failures, log, owner's notification log
-- ARGV: session_id, photo_id, owner, occurred_at, maxlen, ttl, session_channel, user_channel
-- Reply: {'applied', ids...} | {'duplicate'} | {'too_many'} | {'not_found'} | {'owner_changed'}
local k, a = photo_keys(), photo_args()
local session, early = load_photo_session(k, a)
if early then
  return early
end

local outcome = photo_outcome(k, a.photo_id)
if outcome == 'uploaded' then
  return {'duplicate'}
end
if outcome then
  -- Failed before: the latest outcome wins, so the photo moves from failed to uploaded and leaves
  -- the list of current failures. It is not a new distinct photo, so the total is no limit here.
  session.failed = session.failed - 1
elseif session.uploaded + session.failed >= session.total then
  return {'too_many'}
end
session.uploaded = session.uploaded + 1
photo_set_uploaded(k, a.photo_id, outcome ~= nil)
return apply_photo_event(k, a, session, PHOTO_UPLOADED, {photo_id = a.photo_id})
