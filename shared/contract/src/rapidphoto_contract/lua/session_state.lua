-- session_state.lua: the one encoding of a session's state in Redis (PROTOCOL §10). The worker's
-- scripts write and read the state only through these functions, and the relay's sync_session.lua
-- reads it through them, so field names, the photo marks (`U`, `F:<reason>`) and the failure order
-- are handled here and nowhere else in Lua. The names are the generated constants (keys.py).

-- A session's keys, given KEYS in the order of rapidphoto_contract.keys.session_keys.
local function session_keys(keys)
  return {state = keys[1], photos = keys[2], failures = keys[3], log = keys[4]}
end

-- The state hash as {owner, total, uploaded, failed, status} (counts as numbers), or nil if the
-- session does not exist.
local function session_read(k)
  local s = redis.call('HMGET', k.state, F_OWNER, F_TOTAL, F_UPLOADED, F_FAILED, F_STATUS)
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

-- A new session: no photos yet, IN_PROGRESS.
local function session_create(k, owner, total)
  redis.call('HSET', k.state,
    F_OWNER, owner, F_TOTAL, total, F_UPLOADED, 0, F_FAILED, 0,
    F_STATUS, STATUS_IN_PROGRESS, F_FAILURE_SEQ, 0)
end

local function session_save_counts(k, session)
  redis.call('HSET', k.state, F_UPLOADED, session.uploaded, F_FAILED, session.failed)
end

local function session_save_status(k, status)
  redis.call('HSET', k.state, F_STATUS, status)
end

-- A photo's mark: 'uploaded'; 'failed' and its reason; 'unknown' for a mark we never write.
local function photo_mark_decode(mark)
  if mark == UPLOADED_MARK then
    return 'uploaded', nil
  end
  if string.sub(mark, 1, #FAILED_PREFIX) == FAILED_PREFIX then
    return 'failed', string.sub(mark, #FAILED_PREFIX + 1)
  end
  return 'unknown', nil
end

-- The outcome recorded for a photo ('uploaded', 'failed' or 'unknown'), or nil if it has none.
local function photo_outcome(k, photo_id)
  local mark = redis.call('HGET', k.photos, photo_id)
  if not mark then
    return nil
  end
  return (photo_mark_decode(mark))
end

-- Record an upload. `was_failed`: the photo failed before and leaves the current failures.
local function photo_set_uploaded(k, photo_id, was_failed)
  redis.call('HSET', k.photos, photo_id, UPLOADED_MARK)
  if was_failed then
    redis.call('ZREM', k.failures, photo_id)
  end
end

-- Record a failure with its reason (raw text). The failure counter orders the failures set, so a
-- snapshot can list the most recent failures (PROTOCOL §4).
local function photo_set_failed(k, photo_id, reason)
  local seq = redis.call('HINCRBY', k.state, F_FAILURE_SEQ, 1)
  redis.call('HSET', k.photos, photo_id, FAILED_PREFIX .. reason)
  redis.call('ZADD', k.failures, seq, photo_id)
end

-- The `limit` most recent current failures, oldest first, flat: {photo id, reason, ...}.
local function session_recent_failures(k, limit)
  local ids = redis.call('ZREVRANGE', k.failures, 0, limit - 1)
  local failures = {}
  if #ids > 0 then
    local marks = redis.call('HMGET', k.photos, unpack(ids))
    for i = #ids, 1, -1 do
      if marks[i] then
        local outcome, reason = photo_mark_decode(marks[i])
        if outcome == 'failed' then
          failures[#failures + 1] = ids[i]
          failures[#failures + 1] = reason
        end
      end
    end
  end
  return failures
end

-- A completion whose notification is not written yet (PROTOCOL §9: the notification is written in
-- a step of its own, in the owner's slot). `n`: {completed_id, occurred_at, total, uploaded,
-- failed}, what the notification will say; stored as those five, space separated (none has one).
local function session_set_pending_notification(k, n)
  redis.call('HSET', k.state, F_PENDING_NOTIFICATION,
    table.concat({n.completed_id, n.occurred_at, n.total, n.uploaded, n.failed}, ' '))
end

-- The pending notification as stored (a string), or nil when there is none.
local function session_pending_notification(k)
  local value = redis.call('HGET', k.state, F_PENDING_NOTIFICATION)
  if not value then
    return nil
  end
  return value
end

-- The notification is written: forget it, unless the session now has another one pending (it
-- expired and was completed again since `value` was read). Returns whether it was cleared.
local function session_clear_pending_notification(k, value)
  if redis.call('HGET', k.state, F_PENDING_NOTIFICATION) == value then
    redis.call('HDEL', k.state, F_PENDING_NOTIFICATION)
    return true
  end
  return false
end

-- A write that changes nothing (the owner written over itself): a duplicate command runs it so
-- that a WAIT after it covers every earlier write of the session, the first run's included.
local function session_touch(k, session)
  redis.call('HSET', k.state, F_OWNER, session.owner)
end
