-- progress relay: the one atomic operation that changes a batch (schema v1).
-- Documented in docs/PROTOCOL.md; any language may load this file and EVAL/EVALSHA it.
--
-- KEYS: 1 batch hash, 2 item-outcome hash, 3 user index (zset), 4 shard stream
--       (all four share the shard's hash tag, see docs/PROTOCOL.md)
-- ARGV: 1 op (start|item|incr|set|finish), 2 batch_id, 3 user_id,
--       4 active ttl ms, 5 finished ttl ms, 6 stream MAXLEN (approximate),
--       7.. name/value pairs of the op's arguments
-- Returns the batch's state as a flat [name, value, ...] array (same fields as a stream entry).
-- Errors: "BADARG <text>" for invalid arguments, "WRONGUSER <text>" when the batch belongs to
-- another user. An error changes nothing.

local MAX = 9007199254740991
local TERMINAL = {completed = true, failed = true, cancelled = true}
local STATUS = {pending = true, processing = true, completed = true, failed = true, cancelled = true}

local function bad(msg) return redis.error_reply('BADARG ' .. msg) end

local function valid_id(s) return type(s) == 'string' and #s >= 1 and #s <= 512 end
local function chars(s) local _, n = string.gsub(s, '[^\128-\191]', ''); return n end

-- digits only: tonumber() also takes '1.5', '1e3', '0x10', which PEXPIRE/XADD reject only
-- after the batch hash was written
local function int_arg(s)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') or #s > 15 then return nil end
  return tonumber(s)
end

local op, batch_id, user_id = ARGV[1], ARGV[2], ARGV[3]
local active_ms, finished_ms, maxlen = int_arg(ARGV[4]), int_arg(ARGV[5]), int_arg(ARGV[6])
if not valid_id(batch_id) or chars(batch_id) > 128 then return bad('batch_id must be 1-128 characters') end
if not valid_id(user_id) or chars(user_id) > 128 then return bad('user_id must be 1-128 characters') end
if not active_ms or active_ms < 1 or not finished_ms or finished_ms < 1 then
  return bad('ttl arguments must be positive integers (ms)')
end
if not maxlen or maxlen < 1 then return bad('stream maxlen must be a positive integer') end

local args = {}
for i = 7, #ARGV, 2 do
  if ARGV[i + 1] == nil then return bad('argument ' .. ARGV[i] .. ' has no value') end
  args[ARGV[i]] = ARGV[i + 1]
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

-- current state
local cur = redis.call('HMGET', KEYS[1], 'user_id', 'status', 'total', 'processed', 'successful',
  'failed', 'seq', 'started_at', 'label')
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
local explicit_status = false
local item_write = nil

if op == 'start' then
  local total, err = need_count('total', true)
  if err then return err end
  new.total = total
  if args.label ~= nil then
    if chars(args.label) > 200 then return bad('label must be at most 200 characters') end
    if args.label == '' then new.label = false else new.label = args.label end
  end
elseif op == 'item' then
  local item_id, ok = args.item_id, args.ok
  if not valid_id(item_id) then return bad('item_id must be 1-512 bytes') end
  if ok ~= '1' and ok ~= '0' then return bad('ok must be 1 or 0') end
  local prev = redis.call('HGET', KEYS[2], item_id)
  if prev ~= ok then
    if prev == false then
      new.processed = new.processed + 1
    elseif prev == '1' then
      -- a `set` may have lowered the counter below the items it holds: then count the item anew
      if new.successful > 0 then new.successful = new.successful - 1 else new.processed = new.processed + 1 end
    else
      if new.failed > 0 then new.failed = new.failed - 1 else new.processed = new.processed + 1 end
    end
    if ok == '1' then new.successful = new.successful + 1 else new.failed = new.failed + 1 end
    item_write = {item_id, ok}
  end
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

-- item, incr and set (successful + failed) can all push a counter past MAX
for _, name in ipairs({'total', 'processed', 'successful', 'failed'}) do
  if new[name] > MAX then return bad('counter overflow') end
end

-- automatic transitions; terminal statuses only change when a status is given explicitly
if not explicit_status and not TERMINAL[new.status] then
  if new.status == 'pending' and new.processed > 0 then new.status = 'processing' end
  if new.total > 0 and new.processed >= new.total then new.status = 'completed' end
end

local changed = not exists or item_write ~= nil
for _, name in ipairs({'status', 'total', 'processed', 'successful', 'failed', 'label'}) do
  if new[name] ~= old[name] then changed = true end
end

local function num(n) return string.format('%.0f', n) end

local function state(seq, started_at, updated_at)
  local out = {'v', '1', 'batch_id', batch_id, 'user_id', user_id, 'status', new.status,
    'total', num(new.total), 'processed', num(new.processed), 'successful', num(new.successful),
    'failed', num(new.failed), 'seq', seq, 'started_at', started_at, 'updated_at', updated_at}
  if new.label then out[#out + 1] = 'label'; out[#out + 1] = new.label end
  return out
end

if not changed then
  local rest = redis.call('HMGET', KEYS[1], 'seq', 'started_at', 'updated_at')
  return state(rest[1], rest[2], rest[3])
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = num((tonumber(cur[7]) or 0) + 1)
local started_at = cur[8] or num(now)
local fields = state(seq, started_at, num(now))

if item_write then redis.call('HSET', KEYS[2], item_write[1], item_write[2]) end
redis.call('HSET', KEYS[1], unpack(fields))
if not new.label then redis.call('HDEL', KEYS[1], 'label') end

local ttl = active_ms
if TERMINAL[new.status] then ttl = finished_ms end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], now + ttl, batch_id)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
-- the index lives as long as its longest-lived batch (callers may use other ttls than ours)
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[3], last[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(fields))
return fields
