-- Record one status change of a job and push it, atomically (tasks/job_status.py).
-- KEYS[1] the job's status hash (seq -> change), KEYS[2] its channel
-- ARGV[1] status, ARGV[2] the change as JSON (job_id, at, ...), ARGV[3] ttl in seconds
-- Returns the change's sequence number, or 0 when it is not a change: the job already
-- ended, it is `queued` again, or it has this status already (two paths saw one change).
-- A hash, not a list: workers follow list pushes through keyspace notifications
-- (notify-keyspace-events E + l) to find jobs, and a status is not a job.
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local status = ARGV[1]
local count = redis.call('HLEN', KEYS[1])
if count > 0 then
  local previous = cjson.decode(redis.call('HGET', KEYS[1], tostring(count)))['status']
  if TERMINAL[previous] or status == 'queued' or previous == status then
    return 0
  end
end
local change = cjson.decode(ARGV[2])
local seq = count + 1
change['status'] = status
change['seq'] = seq
local encoded = cjson.encode(change)
redis.call('HSET', KEYS[1], tostring(seq), encoded)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', KEYS[2], encoded)
return seq
