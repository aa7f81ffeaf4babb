-- The worker's one round trip before a run (pool/job_start.py), loaded behind
-- job_status_lib.lua: is the job cancelled, is its plugin disabled, and if neither, the job
-- is `started` (recorded and pushed).
-- KEYS[1] the job's cancel marker, KEYS[2] the paused hash, KEYS[3] the job's status hash,
-- KEYS[4] its channel
-- ARGV[1] plugin id, ARGV[2] the change as a JSON object (job_id, at, worker, attempt, ...),
-- ARGV[3] ttl in s
-- Returns {cancellation or nil, pause or nil}: the job runs when both are nil, or when the
-- pause is a drain (draining plugins refuse submits, not runs).
local cancelled = redis.call('GET', KEYS[1])
if cancelled then return {cancelled, false} end
local pause = redis.call('HGET', KEYS[2], ARGV[1])
if pause and cjson.decode(pause)['mode'] == 'disabled' then return {false, pause} end
write_status(KEYS[3], KEYS[4], 'started', ARGV[2], tonumber(ARGV[3]))
return {false, pause or false}
