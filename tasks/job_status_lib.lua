-- Shared by every script that writes a job's status (prepended to each when loaded):
-- job_status.lua, job_start.lua (the worker's pre-run check) and publish.lua (`queued`).
-- A job's statuses are a hash seq -> change, not a list: workers follow list pushes through
-- keyspace notifications (notify-keyspace-events E + l) to find jobs, and a status is not one.

local JOB_TERMINAL = {succeeded = true, failed = true, cancelled = true}

-- The status of a stored change. Changes end in `"status":"...","seq":N}` (appended below,
-- so nothing is decoded per write); anything else (an older writer) is decoded. A change
-- that is missing or does not decode has no status: a script that already wrote (a
-- result's SET) must not fail after it, since Redis keeps a script's writes on an error.
local function job_status_of(encoded)
  if type(encoded) ~= 'string' then return nil end
  local status = string.match(encoded, '"status":"(%a+)","seq":%d+}$')
  if status then return status end
  local ok, decoded = pcall(cjson.decode, encoded)
  if ok and type(decoded) == 'table' and type(decoded['status']) == 'string' then
    return decoded['status']
  end
  return nil
end

-- Record one status change and push it on the job's channel, atomically. `change` is a
-- JSON object (job_id, at, ...) without status and seq. Returns the change's sequence
-- number, or 0 when it is not a change: the job already ended, it is `queued` again, or it
-- has this status already (two paths saw one change).
local function write_status(hash, channel, status, change, ttl)
  local count = redis.call('HLEN', hash)
  if count > 0 then
    local previous = job_status_of(redis.call('HGET', hash, tostring(count)))
    if JOB_TERMINAL[previous] or status == 'queued' or previous == status then
      return 0
    end
  end
  local seq = count + 1
  local encoded = string.sub(change, 1, -2) .. ',"status":"' .. status .. '","seq":' .. seq .. '}'
  redis.call('HSET', hash, tostring(seq), encoded)
  redis.call('EXPIRE', hash, ttl)
  redis.call('PUBLISH', channel, encoded)
  return seq
end
