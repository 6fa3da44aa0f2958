-- fail_photo_upload (PROTOCOL §3): mark the photo failed, publish PHOTO_FAILED.
-- KEYS: state, photos, failures, log (one session's: one slot)
-- ARGV: publish command, session_id, photo_id, occurred_at, maxlen, ttl, session_channel,
--       reason (raw text, stored), reason_json (the same, JSON-encoded by Python, published)
-- Reply: {'applied', owner, pending, ids...} | {'duplicate', owner, pending} | {'too_many'} |
--        {'not_found'} (pending: the completion's notification not written yet, or '')
local k, a = photo_keys(), photo_args()
local reason, reason_json = ARGV[8], ARGV[9]
local session = session_read(k)
if not session then
  return {'not_found'}
end

-- Already uploaded: an uploaded photo is never turned into a failure (PROTOCOL §3).
-- Already failed: nothing changes, not even the reason. The first report is the one clients have
-- seen, and a redelivered job must not publish again; a later report of the same outcome is treated
-- the same way, because telling the two apart would need a delivery id the contract does not have.
if photo_outcome(k, a.photo_id) then
  return photo_duplicate(k, session)
end
if session.uploaded + session.failed >= session.total then
  return {'too_many'}
end
session.failed = session.failed + 1
photo_set_failed(k, a.photo_id, reason)
-- The reason is free text: its JSON comes from Python (the encoder inserts it as it is).
return apply_photo_event(k, a, session, PHOTO_FAILED, {photo_id = a.photo_id, reason = reason_json})
