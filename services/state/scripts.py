"""Lua scripts for FleetState: each runs atomically inside Redis (no half-written state)."""

from __future__ import annotations

# KEYS: req, tok, active   ARGV: id, status, now, ttl, field, value, ...
# Returns 1 if created, 0 if the id already exists.
REGISTER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'created_at', ARGV[3], 'updated_at', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
"""

# KEYS: req, active
# ARGV: id, new_status, now, ttl, is_terminal, n_allowed, allowed..., field, value, ...
# Returns {1, prev} on success, {0, prev} on an illegal transition, {0, ''} if missing.
TRANSITION = """
local prev = redis.call('HGET', KEYS[1], 'status')
if not prev then return {0, ''} end
local n = tonumber(ARGV[6])
local ok = false
for i = 7, 6 + n do if ARGV[i] == prev then ok = true end end
if not ok then return {0, prev} end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated_at', ARGV[3])
for i = 7 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] == '1' then redis.call('ZREM', KEYS[2], ARGV[1]) end
return {1, prev}
"""

# KEYS: tok, req   ARGV: offset, ttl, token...
# Returns {'ok', new_len} | {'dup', len} (identical retry) | {'mismatch', len} | {'missing', 0}.
APPEND_TOKENS = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'missing', 0} end
local len = redis.call('LLEN', KEYS[1])
local offset = tonumber(ARGV[1])
local n = #ARGV - 2
if offset ~= len then
  if offset >= 0 and offset + n <= len then
    local have = redis.call('LRANGE', KEYS[1], offset, offset + n - 1)
    local same = true
    for i = 1, n do if have[i] ~= ARGV[i + 2] then same = false end end
    if same then return {'dup', len} end
  end
  return {'mismatch', len}
end
for i = 3, #ARGV, 1000 do  -- chunks: unpack() is bounded by Lua's C stack
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {'ok', len + n}
"""

# KEYS: rdv   ARGV: json, ttl, replace   Returns the stored record.
PUBLISH_RENDEZVOUS = """
if ARGV[3] == '0' then
  local cur = redis.call('GET', KEYS[1])
  if cur then return cur end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""

# KEYS: rdv   ARGV: generation ('' = any)   Returns 1 if deleted.
CLEAR_RENDEZVOUS = """
if ARGV[1] ~= '' then
  local cur = redis.call('GET', KEYS[1])
  if not cur then return 0 end
  local gen = cjson.decode(cur)['generation']
  if tostring(gen) ~= ARGV[1] then return 0 end
end
return redis.call('DEL', KEYS[1])
"""
