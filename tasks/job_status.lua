-- Record one status change of a job and push it, atomically (tasks/job_status.py); loaded
-- behind job_status_lib.lua.
-- KEYS[1] the job's status hash (seq -> change), KEYS[2] its channel
-- ARGV[1] status, ARGV[2] the change as a JSON object (job_id, at, ...), ARGV[3] ttl in s
-- Returns the change's sequence number, or 0 when it is not a change (see write_status).
return write_status(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))
