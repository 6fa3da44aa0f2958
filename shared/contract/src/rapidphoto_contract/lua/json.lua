-- json.lua: the JSON values of the wire format (PROTOCOL §4), byte-identical to the contract's
-- Python encoder (rapidphoto_contract.events.dumps: compact, UTF-8, not ASCII-escaped). The
-- generated event encoders (rapidphoto_contract.lua_scripts) are built from these two.

-- A JSON string, for the strings a script writes itself: ids (validated to [A-Za-z0-9_-]), event
-- types, statuses, timestamps. cjson also escapes "/", which Python does not; undo that. (cjson
-- escapes DEL too, so free text, such as a failure reason, is JSON-encoded by Python and passed in
-- ready-made.)
local function jstr(s)
  return (string.gsub(cjson.encode(s), '\\/', '/'))
end

-- Lua numbers are doubles; counts are small integers, so %d prints them exactly.
local function jint(n)
  return string.format('%d', n)
end
