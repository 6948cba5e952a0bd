-- progress relay: the one atomic operation that changes a batch (schema v1).
-- Documented in docs/PROTOCOL.md; any language may load this file and EVAL/EVALSHA it.
--
-- KEYS: 1 batch hash, 2 item-outcome hash, 3 user index (zset), 4 shard stream,
--       5 seen bitmap, 6 failed bitmap (numbered item ids)
--       (all six share the shard's hash tag, see docs/PROTOCOL.md)
-- ARGV: 1 op (start|item|items|incr|set|finish), 2 batch_id, 3 user_id,
--       4 active ttl ms, 5 finished ttl ms, 6 stream MAXLEN (approximate),
--       7.. name/value pairs of the op's arguments; for `items`: item_id, ok (1|0) pairs
-- Returns the batch's state as a flat [name, value, ...] array (same fields as a stream entry).
-- Errors: "BADARG <text>" for invalid arguments, "WRONGUSER <text>" when the batch belongs to
-- another user. An error changes nothing: every command that can be refused (ACL, OOM) runs,
-- or is probed with a call that changes nothing, before the first write.

local MAX = 9007199254740991
local TERMINAL = {completed = true, failed = true, cancelled = true}
local STATUS = {pending = true, processing = true, completed = true, failed = true, cancelled = true}
-- numbered item ids ("0", "7", "4294967295": canonical decimals below 2^32) live in two bitmaps
-- (seen, failed) at bit offset = the number, as long as a bitmap stays small or dense: ids below
-- BITMAP_FLOOR always, larger ones while the bitmap holds at least one id per DENSITY bits.
-- Other numbered ids, and every other id, live in the item-outcome hash.
local BITMAP_FLOOR = 16777216 -- 2^24 bits: 2 MiB per bitmap
local DENSITY = 16
local CHUNK = 1000 -- ids per Redis call (keeps unpack() far below Lua's stack limit)
-- key TTLs are refreshed only when the expiry would move later by more than this (or earlier)
local SLACK_MS = 60000
-- flags in the hidden `aux_keys` field: which optional keys exist and carry the batch's expiry
local AUX_ITEMS, AUX_SEEN, AUX_FAILED = 1, 2, 4

local function bad(msg) return redis.error_reply('BADARG ' .. msg) end

local function valid_id(s) return type(s) == 'string' and #s >= 1 and #s <= 512 end
local function chars(s) local _, n = string.gsub(s, '[^\128-\191]', ''); return n end

-- digits only: tonumber() also takes '1.5', '1e3', '0x10'
local function int_arg(s)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') or #s > 15 then return nil end
  return tonumber(s)
end

if #KEYS ~= 6 then return bad('the script takes 6 keys (see docs/PROTOCOL.md), got ' .. #KEYS) end
local op, batch_id, user_id = ARGV[1], ARGV[2], ARGV[3]
local active_ms, finished_ms, maxlen = int_arg(ARGV[4]), int_arg(ARGV[5]), int_arg(ARGV[6])
if not valid_id(batch_id) or chars(batch_id) > 128 then return bad('batch_id must be 1-128 characters') end
if not valid_id(user_id) or chars(user_id) > 128 then return bad('user_id must be 1-128 characters') end
if not active_ms or active_ms < 1 or not finished_ms or finished_ms < 1 then
  return bad('ttl arguments must be positive integers (ms)')
end
if not maxlen or maxlen < 1 then return bad('stream maxlen must be a positive integer') end

local args = {}
-- item outcomes in order: ids[i], oks[i] ('1'|'0'), nums[i] (the number of a numbered id, else
-- false); outcomes is nil for ops without items
local outcomes, ids, oks, nums = nil, {}, {}, {}
local function add_outcome(item_id, ok)
  if not valid_id(item_id) then return bad('item_id must be 1-512 bytes') end
  if ok ~= '1' and ok ~= '0' then return bad('ok must be 1 or 0') end
  local i = #ids + 1
  ids[i], oks[i], nums[i] = item_id, ok, false
  -- numbered: canonical decimal below 2^32 ("0", "7"; not "07", "-1", "+7", "1e3", " 7")
  local b = string.byte(item_id, 1)
  if b >= 48 and b <= 57 and #item_id <= 10 and (b ~= 48 or #item_id == 1)
      and not string.find(item_id, '%D') then
    local n = tonumber(item_id)
    if n < 4294967296 then nums[i] = n end
  end
  return nil
end
if op == 'items' then
  if (#ARGV - 6) % 2 ~= 0 then return bad('items takes item_id, ok pairs') end
  outcomes = true
  for i = 7, #ARGV, 2 do
    local err = add_outcome(ARGV[i], ARGV[i + 1])
    if err then return err end
  end
else
  for i = 7, #ARGV, 2 do
    if ARGV[i + 1] == nil then return bad('argument ' .. ARGV[i] .. ' has no value') end
    args[ARGV[i]] = ARGV[i + 1]
  end
end

-- nil when absent, false when invalid, else the number
local function count(name)
  local s = args[name]
  if s == nil then return nil end
  if not string.match(s, '^%d+$') or #s > 16 then return false end
  local n = tonumber(s)
  if n > MAX then return false end
  return n
end

local function need_count(name, required)
  local n = count(name)
  if n == false or (required and n == nil) then
    return nil, bad(name .. ' must be an integer between 0 and ' .. string.format('%.0f', MAX))
  end
  return n, nil
end

-- current state (and the hidden bookkeeping fields, which stream entries never carry)
local cur = redis.call('HMGET', KEYS[1], 'user_id', 'status', 'total', 'processed', 'successful',
  'failed', 'seq', 'started_at', 'label', 'updated_at', 'expires_at', 'bitmap_items',
  'hash_numbers', 'aux_keys')
local exists = cur[1] ~= false
if exists and cur[1] ~= user_id then
  return redis.error_reply('WRONGUSER batch ' .. batch_id .. ' belongs to another user')
end
local old = {
  status = cur[2] or 'pending', total = tonumber(cur[3]) or 0, processed = tonumber(cur[4]) or 0,
  successful = tonumber(cur[5]) or 0, failed = tonumber(cur[6]) or 0, label = cur[9] or false,
}
local new = {}
for k, v in pairs(old) do new[k] = v end
local expires_at = exists and tonumber(cur[11]) or nil
local bitmap_items, hash_numbers = tonumber(cur[12]) or 0, tonumber(cur[13]) or 0
local aux = exists and tonumber(cur[14]) or 0
local old_bitmap_items, old_hash_numbers = bitmap_items, hash_numbers
local explicit_status = false

-- call `cmd key <per-id words..>` over ids in chunks; returns the concatenated replies.
-- `head` words go first in the first call only (their replies too).
local function chunked(cmd, key, head, ids, words)
  local out = {}
  for first = 1, #ids, CHUNK do
    local argv = {key}
    if first == 1 then
      for _, w in ipairs(head) do argv[#argv + 1] = w end
    end
    for i = first, math.min(first + CHUNK - 1, #ids) do words(argv, ids[i]) end
    local reply = redis.call(cmd, unpack(argv))
    if type(reply) == 'table' then
      for _, v in ipairs(reply) do out[#out + 1] = v end
    end
  end
  return out
end

-- item outcomes: state[key] is '1', '0' or nil (unseen); key is the number for numbered ids
-- (wherever they are stored), else the id string
local orig, state, place = {}, {}, {}
local touched, is_touched = {}, {} -- keys whose outcome moved, in first-touched order
-- bitmaps are read and written either through a byte window (GETRANGE/SETRANGE: numbers close
-- together, as a reporter's flushes mostly are) or bit by bit (BITFIELD: scattered numbers)
local window = nil -- {lo = first byte, seen = bytes, failed = bytes}
local absent = {} -- bitmap key -> true when it does not exist yet (to create it at full size)

local function bit_in(bytes, n)
  local b = string.byte(bytes, math.floor(n / 8) - window.lo + 1)
  return b ~= nil and bit.band(b, bit.rshift(128, n % 8)) ~= 0
end

local function read_outcomes()
  local numbers, strings, seen_num, seen_str = {}, {}, {}, {}
  local lo, hi = nil, nil
  for i = 1, #ids do
    local n = nums[i]
    if n then
      if not seen_num[n] then
        seen_num[n] = true; numbers[#numbers + 1] = n
        if lo == nil or n < lo then lo = n end
        if hi == nil or n > hi then hi = n end
      end
    elseif not seen_str[ids[i]] then
      seen_str[ids[i]] = true; strings[#strings + 1] = ids[i]
    end
  end
  local in_hash = strings
  if #numbers > 0 then
    local unset = {} -- numbers whose seen bit is clear
    if hi - lo < 16 * #numbers + 64 and hi - lo < 262144 then
      window = {lo = math.floor(lo / 8)}
      local last = math.floor(hi / 8)
      window.seen = redis.call('GETRANGE', KEYS[5], window.lo, last)
      window.failed = redis.call('GETRANGE', KEYS[6], window.lo, last)
      for _, n in ipairs(numbers) do
        if bit_in(window.seen, n) then
          place[n] = 'bitmap'
          if bit_in(window.failed, n) then orig[n] = '0' else orig[n] = '1' end
        else
          unset[#unset + 1] = n
        end
      end
    else
      -- BITFIELD (not BITFIELD_RO): the read also proves the bitmap writes are allowed
      local bits = chunked('BITFIELD', KEYS[5], {}, numbers,
        function(a, n) a[#a + 1] = 'GET'; a[#a + 1] = 'u1'; a[#a + 1] = n end)
      local set_numbers = {}
      for i, n in ipairs(numbers) do
        if bits[i] == 1 then set_numbers[#set_numbers + 1] = n else unset[#unset + 1] = n end
      end
      if #set_numbers > 0 then
        local failed = chunked('BITFIELD', KEYS[6], {}, set_numbers,
          function(a, n) a[#a + 1] = 'GET'; a[#a + 1] = 'u1'; a[#a + 1] = n end)
        for i, n in ipairs(set_numbers) do
          place[n] = 'bitmap'
          if failed[i] == 1 then orig[n] = '0' else orig[n] = '1' end
        end
      end
    end
    if hash_numbers > 0 and #unset > 0 then -- numbered ids that did not fit the bitmaps
      in_hash = {}
      for _, v in ipairs(strings) do in_hash[#in_hash + 1] = v end
      for _, n in ipairs(unset) do in_hash[#in_hash + 1] = n end
    end
    if bit.band(aux, AUX_SEEN) == 0 then absent[KEYS[5]] = redis.call('EXISTS', KEYS[5]) == 0 end
    if bit.band(aux, AUX_FAILED) == 0 then absent[KEYS[6]] = redis.call('EXISTS', KEYS[6]) == 0 end
  end
  if #in_hash > 0 then
    local values = chunked('HMGET', KEYS[2], {}, in_hash,
      function(a, k) a[#a + 1] = type(k) == 'number' and string.format('%d', k) or k end)
    for i, k in ipairs(in_hash) do
      if values[i] then orig[k] = values[i]; place[k] = 'hash' end
    end
  end
  for k, v in pairs(orig) do state[k] = v end
end

local function count_outcome(key, n, ok)
  local prev = state[key]
  if prev == ok then return end
  if prev == nil then
    new.processed = new.processed + 1
    if n and (n < BITMAP_FLOOR or n < DENSITY * (bitmap_items + 1)) then
      place[key] = 'bitmap'; bitmap_items = bitmap_items + 1
    else
      place[key] = 'hash'
      if n then hash_numbers = hash_numbers + 1 end
    end
  elseif prev == '1' then
    -- a `set` may have lowered the counter below the items it holds: then count the item anew
    if new.successful > 0 then new.successful = new.successful - 1 else new.processed = new.processed + 1 end
  else
    if new.failed > 0 then new.failed = new.failed - 1 else new.processed = new.processed + 1 end
  end
  if ok == '1' then new.successful = new.successful + 1 else new.failed = new.failed + 1 end
  if not is_touched[key] then is_touched[key] = true; touched[#touched + 1] = key end
  state[key] = ok
end

if op == 'start' then
  local total, err = need_count('total', true)
  if err then return err end
  new.total = total
  if args.label ~= nil then
    if chars(args.label) > 200 then return bad('label must be at most 200 characters') end
    if args.label == '' then new.label = false else new.label = args.label end
  end
elseif op == 'item' then
  local err = add_outcome(args.item_id, args.ok)
  if err then return err end
  outcomes = true
elseif op == 'items' then
  -- parsed above
elseif op == 'incr' then
  local s, err = need_count('successful', false)
  if err then return err end
  local f, err2 = need_count('failed', false)
  if err2 then return err2 end
  s, f = s or 0, f or 0
  new.successful, new.failed = new.successful + s, new.failed + f
  new.processed = new.processed + s + f
elseif op == 'set' then
  local given = false
  for _, name in ipairs({'total', 'processed', 'successful', 'failed'}) do
    local n, err = need_count(name, false)
    if err then return err end
    if n ~= nil then new[name] = n; given = true end
  end
  if args.processed == nil and (args.successful ~= nil or args.failed ~= nil) then
    new.processed = new.successful + new.failed
  end
  if args.status ~= nil then
    if not STATUS[args.status] then return bad('unknown status ' .. args.status) end
    new.status = args.status
    explicit_status = true
    given = true
  end
  if not given then return bad('set needs at least one of total, processed, successful, failed, status') end
elseif op == 'finish' then
  if not TERMINAL[args.status or ''] then
    return bad('finish status must be completed, failed or cancelled')
  end
  new.status = args.status
  explicit_status = true
else
  return bad('unknown op ' .. tostring(op))
end

if outcomes then
  read_outcomes()
  for i = 1, #ids do
    local n = nums[i]
    if n then count_outcome(n, n, oks[i]) else count_outcome(ids[i], nil, oks[i]) end
  end
end

-- outcomes whose stored value really changes (a flip and its flip back in one call do not)
local item_changes = {}
for _, key in ipairs(touched) do
  if state[key] ~= orig[key] then item_changes[#item_changes + 1] = key end
end

-- item, incr and set (successful + failed) can all push a counter past MAX
for _, name in ipairs({'total', 'processed', 'successful', 'failed'}) do
  if new[name] > MAX then return bad('counter overflow') end
end

-- automatic transitions; terminal statuses only change when a status is given explicitly
if not explicit_status and not TERMINAL[new.status] then
  if new.status == 'pending' and new.processed > 0 then new.status = 'processing' end
  if new.total > 0 and new.processed >= new.total then new.status = 'completed' end
end

local changed = not exists or #item_changes > 0
for _, name in ipairs({'status', 'total', 'processed', 'successful', 'failed', 'label'}) do
  if new[name] ~= old[name] then changed = true end
end

local function num(n) return string.format('%.0f', n) end

local function state_fields(seq, started_at, updated_at)
  local out = {'v', '1', 'batch_id', batch_id, 'user_id', user_id, 'status', new.status,
    'total', num(new.total), 'processed', num(new.processed), 'successful', num(new.successful),
    'failed', num(new.failed), 'seq', seq, 'started_at', started_at, 'updated_at', updated_at}
  if new.label then out[#out + 1] = 'label'; out[#out + 1] = new.label end
  return out
end

if not changed then return state_fields(cur[7], cur[8], cur[10]) end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = num((tonumber(cur[7]) or 0) + 1)
local started_at = cur[8] or num(now)
local fields = state_fields(seq, started_at, num(now))

-- which writes this change needs
local ttl = active_ms
if TERMINAL[new.status] then ttl = finished_ms end
local want = now + ttl
local slack = math.min(SLACK_MS, math.floor(ttl / 16))
local refresh = expires_at == nil or want < expires_at or want > expires_at + slack
if refresh then expires_at = want end

local hash_writes, seen_writes, failed_writes = {}, {}, {}
for _, key in ipairs(item_changes) do
  if place[key] == 'bitmap' then
    if orig[key] == nil then seen_writes[#seen_writes + 1] = key end
    if state[key] == '0' or orig[key] == '0' then failed_writes[#failed_writes + 1] = key end
  else
    hash_writes[#hash_writes + 1] = key
  end
end
local new_aux = aux
if #hash_writes > 0 then new_aux = bit.bor(new_aux, AUX_ITEMS) end
if #seen_writes > 0 then new_aux = bit.bor(new_aux, AUX_SEEN) end
if #failed_writes > 0 then new_aux = bit.bor(new_aux, AUX_FAILED) end
-- keys created by this change get the batch's expiry even when it does not move
local aux_new_keys = {}
if not refresh then
  for flag, key in pairs({[AUX_ITEMS] = KEYS[2], [AUX_SEEN] = KEYS[5], [AUX_FAILED] = KEYS[6]}) do
    if bit.band(new_aux, flag) ~= 0 and bit.band(aux, flag) == 0 then
      aux_new_keys[#aux_new_keys + 1] = key
    end
  end
end
local drop_label = not new.label and old.label

local index_expires_at = nil
if refresh then
  -- the index lives as long as its longest-lived batch: the largest score once ours is set
  -- (callers may use other ttls than ours). Read before any write.
  index_expires_at = expires_at
  local top = redis.call('ZRANGE', KEYS[3], -2, -1, 'WITHSCORES')
  for i = 1, #top, 2 do
    local score = tonumber(top[i + 1])
    if top[i] ~= batch_id and score > index_expires_at then index_expires_at = score end
  end
end

-- probes: each write command that may be refused, called so that it changes nothing
if refresh or #aux_new_keys > 0 then redis.call('PEXPIREAT', KEYS[1], 1, 'GT') end
if refresh then
  redis.call('ZADD', KEYS[3], 'XX', 'GT', '-inf', batch_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], 1, 0)
end
if drop_label then redis.call('HDEL', KEYS[1], '') end
if (#seen_writes > 0 or #failed_writes > 0) and (window or absent[KEYS[5]] or absent[KEYS[6]]) then
  redis.call('SETRANGE', KEYS[5], 0, '')
end
if exists then
  redis.call('HSET', KEYS[1], 'v', '1') -- it holds v = 1 already; XADD goes first below
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(fields))
else
  -- the batch hash does not exist: XADD NOMKSTREAM on it adds nothing (WRONGTYPE: a stray
  -- field-less hash, also harmless); a refusal raises. HSET goes first, XADD last below.
  local probe = redis.pcall('XADD', KEYS[1], 'NOMKSTREAM', '*', 'v', '1')
  if type(probe) == 'table' and probe.err and not string.find(probe.err, 'WRONGTYPE', 1, true) then
    return redis.error_reply(probe.err)
  end
end

-- writes
local hidden = {'expires_at', num(expires_at), 'bitmap_items', num(bitmap_items),
  'hash_numbers', num(hash_numbers), 'aux_keys', num(new_aux)}
if bitmap_items == old_bitmap_items and hash_numbers == old_hash_numbers and new_aux == aux
    and not refresh then
  hidden = {}
end
local hset = {KEYS[1]}
for _, v in ipairs(fields) do hset[#hset + 1] = v end
for _, v in ipairs(hidden) do hset[#hset + 1] = v end
redis.call('HSET', unpack(hset))
if drop_label then redis.call('HDEL', KEYS[1], 'label') end
if #hash_writes > 0 then
  chunked('HSET', KEYS[2], {}, hash_writes, function(a, k)
    a[#a + 1] = type(k) == 'number' and string.format('%d', k) or k; a[#a + 1] = state[k]
  end)
end
-- bitmap writes. A missing bitmap is first created at its full size when the batch's total is
-- known (ids 0..total, up to BITMAP_FLOOR): growing it bit by bit would leave up to 1 MiB of
-- Redis's string headroom in each.
local function write_bitmap(key, bytes, changes, value)
  if #changes == 0 then return end
  if absent[key] and new.total >= 1 then
    redis.call('SETRANGE', key, math.floor(math.min(new.total, BITMAP_FLOOR - 1) / 8), '\0')
  end
  if not window then
    chunked('BITFIELD', key, {}, changes, function(a, n)
      a[#a + 1] = 'SET'; a[#a + 1] = 'u1'; a[#a + 1] = n; a[#a + 1] = value(n)
    end)
    return
  end
  local mod, first, last = {}, nil, nil
  for _, n in ipairs(changes) do
    local i = math.floor(n / 8) - window.lo + 1
    local b = mod[i] or string.byte(bytes, i) or 0
    local mask = bit.rshift(128, n % 8)
    if value(n) == 1 then b = bit.bor(b, mask) else b = bit.band(b, bit.bnot(mask)) end
    mod[i] = b
    if first == nil or i < first then first = i end
    if last == nil or i > last then last = i end
  end
  local out, part = {}, {}
  for i = first, last do
    part[#part + 1] = mod[i] or string.byte(bytes, i) or 0
    if #part == 4000 then out[#out + 1] = string.char(unpack(part)); part = {} end
  end
  if #part > 0 then out[#out + 1] = string.char(unpack(part)) end
  redis.call('SETRANGE', key, window.lo + first - 1, table.concat(out))
end
write_bitmap(KEYS[5], window and window.seen, seen_writes, function() return 1 end)
write_bitmap(KEYS[6], window and window.failed, failed_writes,
  function(n) return state[n] == '0' and 1 or 0 end)
if refresh then
  for _, key in ipairs({KEYS[1], KEYS[2], KEYS[5], KEYS[6]}) do
    redis.call('PEXPIREAT', key, expires_at) -- a missing key: a no-op
  end
  redis.call('ZADD', KEYS[3], expires_at, batch_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('PEXPIREAT', KEYS[3], index_expires_at)
else
  for _, key in ipairs(aux_new_keys) do redis.call('PEXPIREAT', key, expires_at) end
end
if not exists then redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(fields)) end
return fields
