"""The queue's Redis function library (Lua), loaded with ``FUNCTION LOAD REPLACE``.

Here, in the contract, because two parties load it: each worker at start (and after Redis lost
its data), and the Redis pod's start hook (the operator puts LIBRARY in the pod), so the web
tier can queue before any worker ever ran. Functions run with the caller's ACL (Redis checks
every command they call), so the ACL still lists what each one calls (acl.py).
"""

from __future__ import annotations

from inferstack.contract.messages import DEADLINE_FIELD
from inferstack.contract import queue

__all__ = ["LIBRARY"]

_LIBRARY = """#!lua name=@LIB@

-- Requests not answered yet: the group's lag (never handed out) plus its pending entries (being
-- worked on). Answered entries wait in the stream until XTRIM MINID passes them (behind the oldest
-- one still pending), so XLEN would count them too. XLEN when Redis cannot tell (no group yet, or
-- a NULL lag).
local function waiting(stream, group)
  local length = redis.call('XLEN', stream)
  if length == 0 then return 0 end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == group then
      if type(f['lag']) ~= 'number' then return length end
      return f['lag'] + f['pending']
    end
  end
  return length
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- All of a request's images, or none. KEYS: stream. ARGV: cap, timeout_ms, arrivals channel,
-- group, image count, then per image its field count and field/value pairs. Refused when the
-- waiting requests would pass the cap (an empty queue takes any request, so none is refused
-- forever). The deadline comes from the Redis clock, shared by all pods. -> {accepted, waiting}
local function enqueue(keys, args)
  local stream, cap, count = keys[1], tonumber(args[1]), tonumber(args[5])
  local n = waiting(stream, args[4])
  if n >= cap or (n > 0 and n + count > cap) then return {0, n} end
  local deadline = now_ms() + tonumber(args[2])
  local at = 6
  for _ = 1, count do
    local nfields = tonumber(args[at])
    local xadd = {stream, '*'}
    for i = at + 1, at + nfields do xadd[#xadd + 1] = args[i] end
    xadd[#xadd + 1] = '@DEADLINE@'
    xadd[#xadd + 1] = deadline
    redis.call('XADD', unpack(xadd))
    at = at + nfields + 1
  end
  redis.call('PUBLISH', args[3], count)
  return {1, n + count}
end

-- KEYS: workers, model. ARGV: name, ttl_s, model record ('' keeps the current one).
local function heartbeat(keys, args)
  local t = redis.call('TIME')
  redis.call('ZADD', keys[1], tonumber(t[1]) + tonumber(args[2]), args[1])
  if args[3] ~= '' then redis.call('SET', keys[2], args[3], 'EX', tonumber(args[2]) * 6) end
  return 1
end

-- KEYS: workers. The names whose heartbeat has not lapsed.
local function live_workers(keys, args)
  local t = redis.call('TIME')
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', '(' .. t[1])
  return redis.call('ZRANGE', keys[1], 0, -1)
end

-- Drop answered entries from the stream: everything older than the oldest entry still pending,
-- or, with nothing pending, everything the group has read. Trimming from the head (XTRIM MINID)
-- keeps the group's lag exact; XDEL of an entry above the oldest pending one (workers finishing
-- out of order) makes Redis report the lag as NULL, which KEDA reads as 0. KEYS: stream; ARGV: group.
local function trim_answered(keys, args)
  local p = redis.call('XPENDING', keys[1], args[1])
  local floor = false
  if p[1] > 0 then
    floor = p[2]
  else
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      if f['name'] == args[1] then
        local ms, seq = string.match(f['last-delivered-id'], '^(%d+)-(%d+)$')
        floor = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)
      end
    end
  end
  if floor then return redis.call('XTRIM', keys[1], 'MINID', floor) end
  return 0
end

redis.register_function('@ENQUEUE@', enqueue)
redis.register_function{function_name = '@WAITING@', flags = {'no-writes'},
                        callback = function(keys, args) return waiting(keys[1], args[1]) end}
redis.register_function('@HEARTBEAT@', heartbeat)
redis.register_function('@LIVE@', live_workers)
redis.register_function{function_name = '@NOW@', flags = {'no-writes'}, callback = function() return now_ms() end}
redis.register_function('@TRIM@', trim_answered)
"""

_NAMES = {
    "@LIB@": queue.FUNCTION_LIBRARY, "@DEADLINE@": DEADLINE_FIELD, "@ENQUEUE@": queue.FN_ENQUEUE,
    "@WAITING@": queue.FN_WAITING, "@HEARTBEAT@": queue.FN_HEARTBEAT, "@LIVE@": queue.FN_LIVE_WORKERS,
    "@NOW@": queue.FN_NOW_MS, "@TRIM@": queue.FN_TRIM_ANSWERED,
}


def _render(source: str) -> str:
    for placeholder, name in _NAMES.items():
        source = source.replace(placeholder, name)
    return source


LIBRARY = _render(_LIBRARY)
