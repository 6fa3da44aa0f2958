-- KEYS: state, failures, photos, log
-- ARGV: last id ('' = snapshot), its successor, max failures, failed-photo prefix,
--       state fields owner, total, uploaded, failed, status
local state = redis.call('HMGET', KEYS[1], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
if not state[1] then
  return {'missing'}
end
local owner, status = state[1], state[5] or ''

-- Entry ids compared as (ms, seq) decimals without leading zeros: by length, then as text.
local function cmpdec(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function cmp(x, y)
  local xm, xs = string.match(x, '^(%d+)-(%d+)$')
  local ym, ys = string.match(y, '^(%d+)-(%d+)$')
  local c = cmpdec(xm, ym)
  if c ~= 0 then return c end
  return cmpdec(xs, ys)
end

local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local newest_id = ''
if #newest > 0 then newest_id = newest[1][1] end

if ARGV[1] ~= '' and newest_id ~= '' and cmp(ARGV[1], newest_id) <= 0 then
  local first_id = redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 1)[1][1]
  local covered = cmp(first_id, ARGV[2]) <= 0
  if not covered then
    local info = redis.call('XINFO', 'STREAM', KEYS[4])
    local length, added
    for i = 1, #info, 2 do
      if info[i] == 'length' then length = info[i + 1] end
      if info[i] == 'entries-added' then added = info[i + 1] end
    end
    covered = added ~= nil and added == length
  end
  if covered then
    return {'replay', owner, status, redis.call('XRANGE', KEYS[4], '(' .. ARGV[1], '+')}
  end
end

local ids = redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
local failures = {}
if #ids > 0 then
  local marks = redis.call('HMGET', KEYS[3], unpack(ids))
  for i = #ids, 1, -1 do
    local mark = marks[i]
    if mark and string.sub(mark, 1, #ARGV[4]) == ARGV[4] then
      failures[#failures + 1] = ids[i]
      failures[#failures + 1] = string.sub(mark, #ARGV[4] + 1)
    end
  end
end
return {'snapshot', owner, status, state[2] or '0', state[3] or '0', state[4] or '0',
  newest_id, failures}
