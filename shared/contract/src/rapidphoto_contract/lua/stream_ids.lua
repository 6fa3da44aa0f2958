-- stream_ids.lua: Redis Stream entry ids, `<ms>-<seq>` (PROTOCOL §4), the Lua twin of
-- rapidphoto_contract/stream_ids.py. The one place a script splits or compares ids.

-- The two decimal parts of an entry id, as text (nil, nil if it is not one).
local function stream_id_parts(id)
  return string.match(id, '^(%d+)-(%d+)$')
end

-- Two canonical decimals (no leading zeros) of any length: by length, then as text. Lua numbers are
-- doubles, exact only to 2^53, and a sequence may exceed that (PROTOCOL §4), so never tonumber.
local function decimal_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end

-- -1, 0 or 1 as entry id x orders before, with or after y: as (ms, seq) pairs, never as text.
-- Both must be canonical, as Redis and format_stream_id write them.
local function stream_id_cmp(x, y)
  local xm, xs = stream_id_parts(x)
  local ym, ys = stream_id_parts(y)
  local c = decimal_cmp(xm, ym)
  if c ~= 0 then return c end
  return decimal_cmp(xs, ys)
end
