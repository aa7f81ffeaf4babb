-- Store a plugin job's result and its final status in one step (tasks/result_store.py);
-- loaded behind job_status_lib.lua.
-- KEYS[1] the result's key (Celery's), KEYS[2] the job's status hash, KEYS[3] its channel
-- ARGV[1] the encoded result meta, ARGV[2] its expiry in s (0: none), ARGV[3] the final
-- status, ARGV[4] the change as a JSON object, ARGV[5] the status hash's ttl in s
-- Returns {1, seq} when stored; {0, 0} when the job has a stored SUCCESS already (a run of a
-- job redelivered after its success was stored, before its ack): nothing is overwritten,
-- as Celery's own store ensures with a GET first, here without that round trip and without
-- the gap between the GET and the SET.

local function succeeded(meta)
  -- Celery writes the meta with `status` first; anything else is decoded.
  local status = string.match(meta, '^{%s*"status"%s*:%s*"(%u+)"')
  if status then return status == 'SUCCESS' end
  local ok, decoded = pcall(cjson.decode, meta)
  return ok and type(decoded) == 'table' and decoded['status'] == 'SUCCESS'
end

local current = redis.call('GET', KEYS[1])
if current and succeeded(current) then
  return {0, 0}
end
local expires = tonumber(ARGV[2])
if expires > 0 then
  redis.call('SETEX', KEYS[1], expires, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return {1, write_status(KEYS[2], KEYS[3], ARGV[3], ARGV[4], tonumber(ARGV[5]))}
