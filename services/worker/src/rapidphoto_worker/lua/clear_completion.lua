-- clear_completion (PROTOCOL §9): the end of a completion, in the session's slot again: the
-- notification is written (notify_session_completed), so the session's pending mark goes.
-- KEYS: state, photos, failures, log (one session's: one slot)
-- ARGV: the pending notification as the photo command read it
-- Reply: {'cleared'} | {'stale'} (already cleared, or another completion's mark)
local k = session_keys(KEYS)
if session_clear_pending_notification(k, ARGV[1]) then
  return {'cleared'}
end
return {'stale'}
