-- complete_photo_upload (PROTOCOL §3): mark the photo uploaded, publish PHOTO_UPLOADED.
-- KEYS: state, photos, failures, log (one session's: one slot)
-- ARGV: publish command, session_id, photo_id, occurred_at, maxlen, ttl, session_channel
-- Reply: {'applied', owner, pending, ids...} | {'duplicate', owner, pending} | {'too_many'} |
--        {'not_found'} (pending: the completion's notification not written yet, or '')
local k, a = photo_keys(), photo_args()
local session = session_read(k)
if not session then
  return {'not_found'}
end

local outcome = photo_outcome(k, a.photo_id)
if outcome == 'uploaded' then
  return photo_duplicate(k, session)
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
