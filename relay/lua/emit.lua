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
-- another user, "NOPERM <text>" when the ACL user lacks a command the change needs. An error
-- changes nothing: reads and permission checks come before the first write.
--
-- Speed: each Lua table or closure costs about as much as a Redis call here, so the hot paths
-- (`item`, and `items` per outcome) keep to scalars, and helpers live in the branch using them.

local MAX = 9007199254740991
-- Numbered item ids (canonical decimals below 2^32: "0", "7", not "07", "-1", "+7") live in two
-- bitmaps (seen, failed) at bit offset = the number: always below FLOOR; above it only while the
-- bitmaps hold at least one id per DENSITY bits (else an id like 4294967295 alone would make a
-- 512 MiB bitmap). Other numbered ids, and every other id, live in the item-outcome hash.
local FLOOR = 16777216 -- 2^24 bits: 2 MiB per bitmap
local DENSITY = 16
local CHUNK = 1000 -- ids per Redis call (keeps unpack() far below Lua's stack limit)
-- key TTLs are refreshed only when the expiry would move later by more than this (or earlier)
local SLACK_MS = 60000
-- flags in the batch hash's hidden `aux_keys` field: optional keys that exist (and carry the
-- batch's expiry), and whether the item hash may hold numbered ids
local AUX_ITEMS, AUX_SEEN, AUX_FAILED, AUX_HASH_NUMBERS = 1, 2, 4, 8

if #KEYS ~= 6 then
  return redis.error_reply('BADARG the script takes 6 keys (see docs/PROTOCOL.md), got ' .. #KEYS)
end
local op, batch_id, user_id = ARGV[1], ARGV[2], ARGV[3]
local BAD = 'BADARG '

-- ids: 1-128 characters of UTF-8 (characters need counting only past 128 bytes)
for i = 2, 3 do
  local s = ARGV[i]
  if type(s) ~= 'string' or #s < 1 or (#s > 128 and (#s > 512
      or select(2, string.gsub(s, '[^\128-\191]', '')) > 128)) then
    return redis.error_reply(BAD .. (i == 2 and 'batch_id' or 'user_id') .. ' must be 1-128 characters')
  end
end
-- digits only: tonumber() also takes '1.5', '1e3', '0x10'
for i = 4, 6 do
  local s = ARGV[i]
  if type(s) ~= 'string' or s == '' or #s > 15 or string.find(s, '%D') or tonumber(s) < 1 then
    if i == 6 then return redis.error_reply(BAD .. 'stream maxlen must be a positive integer') end
    return redis.error_reply(BAD .. 'ttl arguments must be positive integers (ms)')
  end
end
local active_ms, finished_ms, maxlen = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if op == 'items' then
  if (#ARGV - 6) % 2 ~= 0 then return redis.error_reply(BAD .. 'items takes item_id, ok pairs') end
else
  for i = 7, #ARGV, 2 do
    if ARGV[i + 1] == nil then
      return redis.error_reply(BAD .. 'argument ' .. ARGV[i] .. ' has no value')
    end
  end
end

-- current state, and the hidden bookkeeping fields (stream entries never carry them)
local cur = redis.call('HMGET', KEYS[1], 'user_id', 'status', 'total', 'processed', 'successful',
  'failed', 'seq', 'started_at', 'label', 'updated_at', 'expires_at', 'aux_keys')
local exists = cur[1] ~= false
if exists and cur[1] ~= user_id then
  return redis.error_reply('WRONGUSER batch ' .. batch_id .. ' belongs to another user')
end
local status, label = cur[2] or 'pending', cur[9] or false
local total, processed = tonumber(cur[3]) or 0, tonumber(cur[4]) or 0
local successful, failed = tonumber(cur[5]) or 0, tonumber(cur[6]) or 0
local o_status, o_label, o_total, o_processed, o_successful, o_failed =
  status, label, total, processed, successful, failed
local expires_at, aux = nil, 0
if exists then
  -- no aux_keys: written by the script before bitmaps existed, whose item hash may hold
  -- numbered ids (they stay there)
  expires_at, aux = tonumber(cur[11]), tonumber(cur[12]) or AUX_ITEMS + AUX_HASH_NUMBERS
end
local new_aux = aux
local explicit_status = false
local item_changed = false -- some item's stored outcome changes

-- item writes, run after the permission checks: one hash field, byte patches of the bitmaps (offset,
-- bytes), and for `items` a function writing the rest
local hash_f, hash_v = nil, nil
local seen_off, seen_bytes, failed_off, failed_bytes = nil, nil, nil, nil
local write_items = nil -- items: the hash fields and BITFIELD bits, written in chunks
local now = nil -- server time (ms), once read
local early_write = false -- `item` wrote its outcome first (see there)

if op == 'item' then
  local id, ok
  for i = 7, #ARGV, 2 do
    if ARGV[i] == 'item_id' then id = ARGV[i + 1] elseif ARGV[i] == 'ok' then ok = ARGV[i + 1] end
  end
  if type(id) ~= 'string' or #id < 1 or #id > 512 then return redis.error_reply(BAD .. 'item_id must be 1-512 bytes') end
  if ok ~= '1' and ok ~= '0' then return redis.error_reply(BAD .. 'ok must be 1 or 0') end
  -- numbered: a canonical decimal below 2^32
  local n, b = nil, string.byte(id, 1)
  if b >= 48 and b <= 57 and #id <= 10 and (b ~= 48 or #id == 1) and not string.find(id, '%D') then
    n = tonumber(id)
    if n >= 4294967296 then n = nil end
  end
  local prev, in_bitmap, at, mask, seen_byte, failed_byte = nil, false, 0, 0, 0, nil
  if n then
    at, mask = math.floor(n / 8), bit.rshift(128, n % 8)
    seen_byte = string.byte(redis.call('GETRANGE', KEYS[5], at, at)) or 0
    if bit.band(seen_byte, mask) ~= 0 then
      in_bitmap = true
      failed_byte = string.byte(redis.call('GETRANGE', KEYS[6], at, at)) or 0
      if bit.band(failed_byte, mask) ~= 0 then prev = '0' else prev = '1' end
    elseif bit.band(aux, AUX_HASH_NUMBERS) ~= 0 then
      prev = redis.call('HGET', KEYS[2], id) or nil
    end
  else
    -- A new id is the common case: write it first with HSETNX (one call instead of HGET and
    -- HSET), when nothing after that write can fail: the batch and its item hash exist, no
    -- counter is at its maximum, the keys' expiry will not move (so the change needs no index
    -- or TTL command), and the user may run HSETNX, HSET and XADD here.
    local early = exists and bit.band(aux, AUX_ITEMS) ~= 0 and processed < MAX
      and successful < MAX and failed < MAX and expires_at ~= nil
    if early then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      local done = status == 'completed' or status == 'failed' or status == 'cancelled'
      local may_finish = done or (total > 0 and processed + 1 >= total)
      for _, ttl in ipairs({active_ms, finished_ms}) do
        if (ttl == active_ms and not done) or (ttl == finished_ms and may_finish) then
          local want = now + ttl
          if want < expires_at or want > expires_at + math.min(SLACK_MS, math.floor(ttl / 16)) then
            early = false
          end
        end
      end
      local check = redis.acl_check_cmd
      if early and check then
        early = check('HSETNX', KEYS[2], 'v', '1') and check('HSET', KEYS[1], 'v', '1')
          and check('XADD', KEYS[4], '*', 'v', '1')
      end
    end
    if early and redis.call('HSETNX', KEYS[2], id, ok) == 1 then
      early_write = true
    else
      prev = redis.call('HGET', KEYS[2], id) or nil
    end
  end
  if prev ~= ok then
    -- as `count` in the items branch below
    if prev == '1' then
      if successful > 0 then successful = successful - 1 else processed = processed + 1 end
    elseif prev == '0' then
      if failed > 0 then failed = failed - 1 else processed = processed + 1 end
    else
      processed = processed + 1
    end
    if ok == '1' then successful = successful + 1 else failed = failed + 1 end
    item_changed = true
    if prev == nil and n then -- may it go into the bitmaps? (as `fits` below)
      in_bitmap = n < FLOOR or n < DENSITY * (redis.call('BITCOUNT', KEYS[5]) + 1)
    end
    if in_bitmap then
      if prev == nil then
        seen_off, seen_bytes = at, string.char(bit.bor(seen_byte, mask))
        new_aux = bit.bor(new_aux, AUX_SEEN)
      end
      if ok == '0' or prev == '0' then
        if failed_byte == nil then
          failed_byte = string.byte(redis.call('GETRANGE', KEYS[6], at, at)) or 0
        end
        if ok == '0' then failed_byte = bit.bor(failed_byte, mask)
        else failed_byte = bit.band(failed_byte, bit.bnot(mask)) end
        failed_off, failed_bytes = at, string.char(failed_byte)
        new_aux = bit.bor(new_aux, AUX_FAILED)
      end
    else
      if not early_write then hash_f, hash_v = id, ok end
      new_aux = bit.bor(new_aux, AUX_ITEMS)
      if n then new_aux = bit.bor(new_aux, AUX_HASH_NUMBERS) end
    end
  end
elseif op == 'items' then
  -- count one outcome of an item whose stored outcome `prev` ('1', '0' or nil) differs from ok
  local function count(prev, ok)
    if prev == '1' then
      -- a `set` may have lowered the counter below the items it holds: then count the item anew
      if successful > 0 then successful = successful - 1 else processed = processed + 1 end
    elseif prev == '0' then
      if failed > 0 then failed = failed - 1 else processed = processed + 1 end
    else
      processed = processed + 1
    end
    if ok == '1' then successful = successful + 1 else failed = failed + 1 end
  end

  -- the number of a numbered item id (non-empty), else nil
  local function number_of(id)
    local b = string.byte(id, 1)
    if b < 48 or b > 57 or #id > 10 or (b == 48 and #id > 1) or string.find(id, '%D') then
      return nil
    end
    local n = tonumber(id)
    if n >= 4294967296 then return nil end
    return n
  end

  -- may a new numbered id go into the bitmaps?
  local bitcount = nil
  local function fits(n)
    if n < FLOOR then return true end
    if bitcount == nil then bitcount = redis.call('BITCOUNT', KEYS[5]) end
    if n < DENSITY * (bitcount + 1) then bitcount = bitcount + 1; return true end
    return false
  end

  -- parse; keys of item state: the number for numbered ids, else the id string
  local ids, oks, keys = {}, {}, {}
  local numbers, strings, listed = {}, {}, {}
  local lo, hi = nil, nil
  for i = 7, #ARGV, 2 do
    local id, ok = ARGV[i], ARGV[i + 1]
    if #id < 1 or #id > 512 then return redis.error_reply(BAD .. 'item_id must be 1-512 bytes') end
    if ok ~= '1' and ok ~= '0' then return redis.error_reply(BAD .. 'ok must be 1 or 0') end
    local n = number_of(id)
    local key = n or id
    ids[#ids + 1], oks[#oks + 1], keys[#keys + 1] = id, ok, key
    if not listed[key] then
      listed[key] = true
      if n then
        numbers[#numbers + 1] = n
        if lo == nil or n < lo then lo = n end
        if hi == nil or n > hi then hi = n end
      else
        strings[#strings + 1] = id
      end
    end
  end

  -- call `cmd key <head..> <words of each id..>` in chunks; the replies, concatenated
  local function chunked(cmd, key, head, list, words)
    local out = {}
    for first = 1, #list, CHUNK do
      local argv = {key}
      if first == 1 then for _, w in ipairs(head) do argv[#argv + 1] = w end end
      for i = first, math.min(first + CHUNK - 1, #list) do words(argv, list[i]) end
      local reply = redis.call(cmd, unpack(argv))
      if type(reply) == 'table' then for _, v in ipairs(reply) do out[#out + 1] = v end end
    end
    return out
  end
  local function get_bit(a, n) a[#a + 1] = 'GET'; a[#a + 1] = 'u1'; a[#a + 1] = n end
  local function field(a, k) a[#a + 1] = type(k) == 'number' and string.format('%d', k) or k end

  -- read the stored outcomes. Bitmaps: through one byte window when the numbers are close
  -- (a reporter's flushes mostly are), else bit by bit with BITFIELD
  local orig, in_bitmap = {}, {}
  local window_lo, seen_window, failed_window = nil, nil, nil
  local in_hash = strings
  if #numbers > 0 then
    local outside = {} -- numbers not in the bitmaps: maybe in the hash
    if hi - lo < 16 * #numbers + 64 and hi - lo < 262144 then
      window_lo = math.floor(lo / 8)
      seen_window = redis.call('GETRANGE', KEYS[5], window_lo, math.floor(hi / 8))
      failed_window = redis.call('GETRANGE', KEYS[6], window_lo, math.floor(hi / 8))
      for _, n in ipairs(numbers) do
        local i, m = math.floor(n / 8) - window_lo + 1, bit.rshift(128, n % 8)
        if bit.band(string.byte(seen_window, i) or 0, m) ~= 0 then
          in_bitmap[n] = true
          if bit.band(string.byte(failed_window, i) or 0, m) ~= 0 then orig[n] = '0' else orig[n] = '1' end
        else
          outside[#outside + 1] = n
        end
      end
    else
      -- BITFIELD (not BITFIELD_RO): the read also proves the bitmap writes are allowed
      local bits = chunked('BITFIELD', KEYS[5], {}, numbers, get_bit)
      local set_numbers = {}
      for i, n in ipairs(numbers) do
        if bits[i] == 1 then set_numbers[#set_numbers + 1] = n else outside[#outside + 1] = n end
      end
      if #set_numbers > 0 then
        local fbits = chunked('BITFIELD', KEYS[6], {}, set_numbers, get_bit)
        for i, n in ipairs(set_numbers) do
          in_bitmap[n] = true
          if fbits[i] == 1 then orig[n] = '0' else orig[n] = '1' end
        end
      end
    end
    if #outside > 0 and bit.band(aux, AUX_HASH_NUMBERS) ~= 0 then
      in_hash = {}
      for _, v in ipairs(strings) do in_hash[#in_hash + 1] = v end
      for _, n in ipairs(outside) do in_hash[#in_hash + 1] = n end
    end
  end
  if #in_hash > 0 then
    local values = chunked('HMGET', KEYS[2], {}, in_hash, field)
    for i, k in ipairs(in_hash) do
      if values[i] then orig[k] = values[i] end
    end
  end

  -- count in order
  local state, touched, is_touched = {}, {}, {}
  for k, v in pairs(orig) do state[k] = v end
  for i = 1, #ids do
    local key, ok = keys[i], oks[i]
    local prev = state[key]
    if prev ~= ok then
      count(prev, ok)
      if prev == nil and type(key) == 'number' and fits(key) then in_bitmap[key] = true end
      if not is_touched[key] then is_touched[key] = true; touched[#touched + 1] = key end
      state[key] = ok
    end
  end

  -- plan the writes of the outcomes that really change (a flip and its flip back do not)
  local seen_set, failed_set, pairs_out = {}, {}, {}
  for _, key in ipairs(touched) do
    if state[key] ~= orig[key] then
      item_changed = true
      if in_bitmap[key] then
        if orig[key] == nil then seen_set[#seen_set + 1] = key end
        if state[key] == '0' or orig[key] == '0' then failed_set[#failed_set + 1] = key end
      else
        field(pairs_out, key); pairs_out[#pairs_out + 1] = state[key]
        if type(key) == 'number' then new_aux = bit.bor(new_aux, AUX_HASH_NUMBERS) end
      end
    end
  end
  if #pairs_out > 0 then new_aux = bit.bor(new_aux, AUX_ITEMS) end
  if #seen_set > 0 then new_aux = bit.bor(new_aux, AUX_SEEN) end
  if #failed_set > 0 then new_aux = bit.bor(new_aux, AUX_FAILED) end

  -- a window: the changed bytes as one patch per bitmap
  local function patch(window, list, value)
    local mod, first, last = {}, nil, nil
    for _, n in ipairs(list) do
      local i, m = math.floor(n / 8) - window_lo + 1, bit.rshift(128, n % 8)
      local b = mod[i] or string.byte(window, i) or 0
      if value(n) == 1 then b = bit.bor(b, m) else b = bit.band(b, bit.bnot(m)) end
      mod[i] = b
      if first == nil or i < first then first = i end
      if last == nil or i > last then last = i end
    end
    local out, part = {}, {}
    for i = first, last do
      part[#part + 1] = mod[i] or string.byte(window, i) or 0
      if #part == 4000 then out[#out + 1] = string.char(unpack(part)); part = {} end
    end
    if #part > 0 then out[#out + 1] = string.char(unpack(part)) end
    return window_lo + first - 1, table.concat(out)
  end
  local function one() return 1 end
  local function failed_value(n) if state[n] == '0' then return 1 end return 0 end
  local by_bit = not window_lo
  if not by_bit then
    if #seen_set > 0 then seen_off, seen_bytes = patch(seen_window, seen_set, one) end
    if #failed_set > 0 then
      failed_off, failed_bytes = patch(failed_window, failed_set, failed_value)
    end
  end
  if #pairs_out > 0 or (by_bit and (#seen_set > 0 or #failed_set > 0)) then
    write_items = function()
      for first = 1, #pairs_out, 2 * CHUNK do
        redis.call('HSET', KEYS[2], unpack(pairs_out, first, math.min(first + 2 * CHUNK - 1, #pairs_out)))
      end
      if by_bit then
        chunked('BITFIELD', KEYS[5], {}, seen_set, function(a, n)
          a[#a + 1] = 'SET'; a[#a + 1] = 'u1'; a[#a + 1] = n; a[#a + 1] = 1
        end)
        chunked('BITFIELD', KEYS[6], {}, failed_set, function(a, n)
          a[#a + 1] = 'SET'; a[#a + 1] = 'u1'; a[#a + 1] = n; a[#a + 1] = failed_value(n)
        end)
      end
    end
  end
else
  local args = {}
  for i = 7, #ARGV, 2 do args[ARGV[i]] = ARGV[i + 1] end
  -- nil when absent, else the number (or an error reply)
  local function need_count(name, required)
    local s = args[name]
    if s == nil and not required then return nil, nil end
    if s == nil or s == '' or #s > 16 or string.find(s, '%D') or tonumber(s) > MAX then
      return nil, redis.error_reply(BAD .. name .. ' must be an integer between 0 and ' .. string.format('%.0f', MAX))
    end
    return tonumber(s), nil
  end
  if op == 'start' then
    local n, err = need_count('total', true)
    if err then return err end
    total = n
    if args.label ~= nil then
      if #args.label > 200 and select(2, string.gsub(args.label, '[^\128-\191]', '')) > 200 then
        return redis.error_reply(BAD .. 'label must be at most 200 characters')
      end
      if args.label == '' then label = false else label = args.label end
    end
  elseif op == 'incr' then
    local s, err = need_count('successful', false)
    if err then return err end
    local f, err2 = need_count('failed', false)
    if err2 then return err2 end
    s, f = s or 0, f or 0
    successful, failed, processed = successful + s, failed + f, processed + s + f
  elseif op == 'set' then
    local given = false
    local values = {}
    for _, name in ipairs({'total', 'processed', 'successful', 'failed'}) do
      local n, err = need_count(name, false)
      if err then return err end
      if n ~= nil then values[name] = n; given = true end
    end
    total = values.total or total
    processed = values.processed or processed
    successful = values.successful or successful
    failed = values.failed or failed
    if args.processed == nil and (args.successful ~= nil or args.failed ~= nil) then
      processed = successful + failed
    end
    local s = args.status
    if s ~= nil then
      if s ~= 'pending' and s ~= 'processing' and s ~= 'completed' and s ~= 'failed'
          and s ~= 'cancelled' then
        return redis.error_reply(BAD .. 'unknown status ' .. s)
      end
      status, explicit_status, given = s, true, true
    end
    if not given then
      return redis.error_reply(BAD .. 'set needs at least one of total, processed, successful, failed, status')
    end
  elseif op == 'finish' then
    local s = args.status
    if s ~= 'completed' and s ~= 'failed' and s ~= 'cancelled' then
      return redis.error_reply(BAD .. 'finish status must be completed, failed or cancelled')
    end
    status, explicit_status = s, true
  else
    return redis.error_reply(BAD .. 'unknown op ' .. tostring(op))
  end
end

-- item, incr and set (successful + failed) can all push a counter past MAX
if total > MAX or processed > MAX or successful > MAX or failed > MAX then
  return redis.error_reply(BAD .. 'counter overflow')
end

-- automatic transitions; terminal statuses only change when a status is given explicitly
local terminal = status == 'completed' or status == 'failed' or status == 'cancelled'
if not explicit_status and not terminal then
  if status == 'pending' and processed > 0 then status = 'processing' end
  if total > 0 and processed >= total then status, terminal = 'completed', true end
end

local seq, started_at, updated_at = cur[7], cur[8], cur[10]
local changed = not exists or item_changed or status ~= o_status or total ~= o_total
  or processed ~= o_processed or successful ~= o_successful or failed ~= o_failed
  or label ~= o_label
if changed and not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if changed then
  seq = string.format('%.0f', (tonumber(seq) or 0) + 1)
  updated_at = string.format('%.0f', now)
  started_at = started_at or updated_at
end
-- numbers as text: the stored text when unchanged (formatting costs)
local fields = {'v', '1', 'batch_id', batch_id, 'user_id', user_id, 'status', status,
  'total', total == o_total and cur[3] or string.format('%.0f', total),
  'processed', processed == o_processed and cur[4] or string.format('%.0f', processed),
  'successful', successful == o_successful and cur[5] or string.format('%.0f', successful),
  'failed', failed == o_failed and cur[6] or string.format('%.0f', failed),
  'seq', seq, 'started_at', started_at, 'updated_at', updated_at}
if label then fields[#fields + 1] = 'label'; fields[#fields + 1] = label end
if not changed then return fields end

-- the keys' expiry moves when it matters: later by more than the slack, or earlier
local ttl = active_ms
if terminal then ttl = finished_ms end
local want = now + ttl
local refresh = expires_at == nil or want < expires_at
  or want > expires_at + math.min(SLACK_MS, math.floor(ttl / 16))
if refresh then expires_at = want end
local drop_label = o_label and not label

-- reads before any write: keys created now (their expiry, full-size bitmaps), the index
local new_keys, absent_seen, absent_failed = nil, false, false
if new_aux ~= aux then
  if bit.band(new_aux, AUX_SEEN) ~= 0 and bit.band(aux, AUX_SEEN) == 0 then
    absent_seen = redis.call('EXISTS', KEYS[5]) == 0
  end
  if bit.band(new_aux, AUX_FAILED) ~= 0 and bit.band(aux, AUX_FAILED) == 0 then
    absent_failed = redis.call('EXISTS', KEYS[6]) == 0
  end
  if not refresh then
    new_keys = {}
    if bit.band(new_aux, AUX_ITEMS) ~= 0 and bit.band(aux, AUX_ITEMS) == 0 then new_keys[#new_keys + 1] = KEYS[2] end
    if bit.band(new_aux, AUX_SEEN) ~= 0 and bit.band(aux, AUX_SEEN) == 0 then new_keys[#new_keys + 1] = KEYS[5] end
    if bit.band(new_aux, AUX_FAILED) ~= 0 and bit.band(aux, AUX_FAILED) == 0 then new_keys[#new_keys + 1] = KEYS[6] end
    if #new_keys == 0 then new_keys = nil end
  end
end
local index_expires_at = nil
if refresh then
  -- the index lives as long as its longest-lived batch: the largest score once ours is set
  -- (callers may use other ttls than ours)
  index_expires_at = expires_at
  local top = redis.call('ZRANGE', KEYS[3], -2, -1, 'WITHSCORES')
  for i = 1, #top, 2 do
    local score = tonumber(top[i + 1])
    if top[i] ~= batch_id and score > index_expires_at then index_expires_at = score end
  end
end
local presize = (absent_seen or absent_failed) and total >= 1

-- permissions: every write command this change runs, checked before the first write (an ACL
-- refusal in the middle would leave a partial write). Redis >= 7.0; older servers skip this.
local check = redis.acl_check_cmd
if check and not early_write then -- (an early write checked what it needs)
  local items_written, bits_written = hash_f or write_items, seen_off or failed_off or presize
  local missing = (not check('HSET', KEYS[1], 'v', '1') and 'hset ' .. KEYS[1])
    or (not check('XADD', KEYS[4], '*', 'v', '1') and 'xadd ' .. KEYS[4])
    or (drop_label and not check('HDEL', KEYS[1], 'label') and 'hdel ' .. KEYS[1])
    or (items_written and not check('HSET', KEYS[2], 'v', '1') and 'hset ' .. KEYS[2])
    or (bits_written and not check('SETRANGE', KEYS[5], '0', '') and 'setrange ' .. KEYS[5])
    or (bits_written and not check('SETRANGE', KEYS[6], '0', '') and 'setrange ' .. KEYS[6])
    or (write_items and not check('BITFIELD', KEYS[5], 'GET', 'u1', '0') and 'bitfield ' .. KEYS[5])
    or (write_items and not check('BITFIELD', KEYS[6], 'GET', 'u1', '0') and 'bitfield ' .. KEYS[6])
  if not missing and (refresh or new_keys) then
    for _, i in ipairs({1, 2, 3, 5, 6}) do
      if not check('PEXPIREAT', KEYS[i], '1') then missing = 'pexpireat ' .. KEYS[i] end
    end
    if refresh then
      missing = missing or (not check('ZADD', KEYS[3], '1', 'm') and 'zadd ' .. KEYS[3])
        or (not check('ZREMRANGEBYSCORE', KEYS[3], '0', '1') and 'zremrangebyscore ' .. KEYS[3])
    end
  end
  if missing then
    return redis.error_reply('NOPERM this user has no permissions to run the emit script\'s '
      .. missing)
  end
end

-- writes
if exists then -- only what can have changed
  redis.call('HSET', KEYS[1], 'status', status, 'processed', fields[12], 'successful', fields[14],
    'failed', fields[16], 'seq', seq, 'updated_at', updated_at)
  if total ~= o_total then redis.call('HSET', KEYS[1], 'total', fields[10]) end
  if label and label ~= o_label then redis.call('HSET', KEYS[1], 'label', label) end
else
  redis.call('HSET', KEYS[1], unpack(fields))
end
if refresh or new_aux ~= aux then
  redis.call('HSET', KEYS[1], 'expires_at', string.format('%.0f', expires_at), 'aux_keys', new_aux)
end
if drop_label then redis.call('HDEL', KEYS[1], 'label') end
if hash_f then redis.call('HSET', KEYS[2], hash_f, hash_v) end
-- a new bitmap is created at its full size when the batch's total is known (ids 0..total):
-- growing it bit by bit would leave up to 1 MiB of Redis's string headroom in each
if presize then
  local last = math.floor(math.min(total, FLOOR - 1) / 8)
  if absent_seen then redis.call('SETRANGE', KEYS[5], last, '\0') end
  if absent_failed then redis.call('SETRANGE', KEYS[6], last, '\0') end
end
if seen_off then redis.call('SETRANGE', KEYS[5], seen_off, seen_bytes) end
if failed_off then redis.call('SETRANGE', KEYS[6], failed_off, failed_bytes) end
if write_items then write_items() end
if refresh then
  for _, key in ipairs({KEYS[1], KEYS[2], KEYS[5], KEYS[6]}) do
    redis.call('PEXPIREAT', key, expires_at) -- a missing key: a no-op
  end
  redis.call('ZADD', KEYS[3], expires_at, batch_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('PEXPIREAT', KEYS[3], index_expires_at)
elseif new_keys then
  for _, key in ipairs(new_keys) do redis.call('PEXPIREAT', key, expires_at) end
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(fields))
return fields
