#!lua flags=no-writes
-- sync_session (PROTOCOL §5, "Resuming"): one atomic read of a session, a replay or a snapshot.
-- Built by rapidphoto_contract.lua_scripts.build: the session's state is read only through the
-- contract's session_state.lua (the worker's scripts write it through the same functions), and ids
-- are compared by its stream_ids.lua. no-writes: Redis runs it while out of memory (a stream must
-- still open then, PROTOCOL §5), and on a cluster it may only touch the session's slot.
-- KEYS: state, photos, failures, log (rapidphoto_contract.keys.session_keys)
-- ARGV: last id ('' = snapshot), its successor, max failures
-- Reply: {'missing'} | {'replay', owner, status, entries} |
--        {'snapshot', owner, status, total, uploaded, failed, newest id or '', {id, reason, ...}}
local k = session_keys(KEYS)
local session = session_read(k)
if not session then
  return {'missing'}
end
local owner, status = session.owner, session.status or ''

local newest = redis.call('XREVRANGE', k.log, '+', '-', 'COUNT', 1)
local newest_id = ''
if #newest > 0 then newest_id = newest[1][1] end

if ARGV[1] ~= '' and newest_id ~= '' and stream_id_cmp(ARGV[1], newest_id) <= 0 then
  local first_id = redis.call('XRANGE', k.log, '-', '+', 'COUNT', 1)[1][1]
  local covered = stream_id_cmp(first_id, ARGV[2]) <= 0
  if not covered then
    local info = redis.call('XINFO', 'STREAM', k.log)
    local length, added
    for i = 1, #info, 2 do
      if info[i] == 'length' then length = info[i + 1] end
      if info[i] == 'entries-added' then added = info[i + 1] end
    end
    covered = added ~= nil and added == length
  end
  if covered then
    return {'replay', owner, status, redis.call('XRANGE', k.log, '(' .. ARGV[1], '+')}
  end
end

return {'snapshot', owner, status, session.total or 0, session.uploaded or 0, session.failed or 0,
  newest_id, session_recent_failures(k, tonumber(ARGV[3]))}
