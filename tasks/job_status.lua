-- Record one status change of a job and push it, atomically (tasks/job_status.py).
-- KEYS[1] the job's status list, KEYS[2] its channel
-- ARGV[1] status, ARGV[2] the change as JSON (job_id, at, ...), ARGV[3] ttl in seconds
-- Returns the change's sequence number, or 0 when it is not a change: the job already
-- ended, it is `queued` again, or it has this status already (two paths saw one change).
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local status = ARGV[1]
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  local previous = cjson.decode(last)['status']
  if TERMINAL[previous] or status == 'queued' or previous == status then
    return 0
  end
end
local change = cjson.decode(ARGV[2])
local seq = redis.call('LLEN', KEYS[1]) + 1
change['status'] = status
change['seq'] = seq
local encoded = cjson.encode(change)
redis.call('RPUSH', KEYS[1], encoded)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', KEYS[2], encoded)
return seq
