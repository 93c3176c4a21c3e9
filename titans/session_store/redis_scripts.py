"""Lua scripts of the Redis session store; see redis.py for the key layout.

Each script runs atomically in Redis, so state and metadata change together. The scripts
build the owner key from the stored owner, which standalone Redis allows but Redis Cluster
does not.
"""

# Renew the TTL of a session's keys and of its owner's index. ARGV[1] is the TTL in ms and
# ARGV[2] the owner key prefix "{prefix}:owner:".
RENEW_LUA = """
local function renew(meta_key, state_key)
  redis.call('PEXPIRE', meta_key, ARGV[1])
  redis.call('PEXPIRE', state_key, ARGV[1])
  local owner = redis.call('HGET', meta_key, 'owner')
  redis.call('PEXPIRE', ARGV[2] .. owner .. ':sessions', ARGV[1])
end
"""

# KEYS: meta, state. ARGV[3]: "meta" returns the metadata, "touch" only renews the TTL.
READ_LUA = RENEW_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
renew(KEYS[1], KEYS[2])
if ARGV[3] == 'touch' then return {'ok'} end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# Large states travel outside Lua: the client first SETs them under a staging key, and the
# script RENAMEs it over the state key. Copying a 16 MB argument into a script took about
# three times as long as a plain SET (measured with redis-py 8.2 and Redis 7.0.15 over loopback). RENAME is atomic, so
# readers still see the old or the new state, never a mix.
#
# KEYS: meta, state, staging. ARGV[3]: base version, or '' to skip the check; ARGV[4]: '1' if
# the staging key contains the new state, '0' to drop the state; ARGV[5..8]: state_bytes,
# state_sha256, tokens, updated_at.
WRITE_LUA = RENEW_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[3])
  return {'not_found'}
end
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if ARGV[3] ~= '' and version ~= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[3])
  return {'conflict', tostring(version)}
end
if ARGV[4] == '1' then
  if redis.call('EXISTS', KEYS[3]) == 0 then return {'staging_lost'} end
  redis.call('RENAME', KEYS[3], KEYS[2])
else
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], 'state_bytes', ARGV[5], 'state_sha256', ARGV[6], 'tokens', ARGV[7],
           'updated_at', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'version', 1)
renew(KEYS[1], KEYS[2])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: meta, state, owner index, staging. ARGV: ttl ms, session id, max sessions, created_at,
# has state ('1' if the staging key contains it), session key prefix "{prefix}:session:",
# then field/value pairs. Index members whose meta key expired are dropped before counting.
CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[4])
  return {'exists'}
end
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if redis.call('EXISTS', ARGV[6] .. member .. ':meta') == 0 then redis.call('ZREM', KEYS[3], member) end
end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[4])
  return {'too_many'}
end
redis.call('DEL', KEYS[2])
if ARGV[5] == '1' then
  if redis.call('EXISTS', KEYS[4]) == 0 then return {'staging_lost'} end
  redis.call('RENAME', KEYS[4], KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return {'ok'}
"""

# KEYS: meta, state. ARGV: owner key prefix, session id.
DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', ARGV[1] .. owner .. ':sessions', ARGV[2])
return {'ok'}
"""

# KEYS: lease. ARGV: token, ttl ms. Both scripts act only if the caller's token holds the lease.
RENEW_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
