-- Publish one message: push it and index its queue as ready in the same atomic step, so
-- the ready index never says "empty" while the queue holds a message this script put there.
--
-- KEYS[1] the queue list   KEYS[2] the queue's waiters set (groups consuming it)
-- ARGV[1] the message      ARGV[2] 'L' to push at the back (LPUSH: a publish),
--                                  'R' at the front (RPUSH: a message handed back)
-- ARGV[3] ready prefix     ARGV[4] wake prefix     ARGV[5] wake list depth
-- A plugin job's submit adds (tasks/submit_step.py): KEYS[3] the paused hash, KEYS[4] the
-- job's status hash, KEYS[5] its channel; ARGV[6] plugin id, ARGV[7] its `queued` change
-- (complete, seq 1), ARGV[8] the status ttl in seconds, and maybe ARGV[9] and ARGV[10]
-- its `task-sent` event's channel and message (tasks/sent_event.py), published with
-- `queued`. A paused plugin's job is not pushed (nor its event sent): the pause is returned
-- instead of 1.
if KEYS[3] then
    local pause = redis.call('HGET', KEYS[3], ARGV[6])
    if pause then return pause end
end
if ARGV[2] == 'R' then
    redis.call('RPUSH', KEYS[1], ARGV[1])
else
    redis.call('LPUSH', KEYS[1], ARGV[1])
end
mark_ready(KEYS[1], KEYS[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
-- `queued` is only ever a job's first change (a message handed back is not queued again).
if KEYS[4] and redis.call('HSETNX', KEYS[4], '1', ARGV[7]) == 1 then
    redis.call('EXPIRE', KEYS[4], tonumber(ARGV[8]))
    redis.call('PUBLISH', KEYS[5], ARGV[7])
    -- Once, like `queued`: a publish kombu retries after a lost reply pushes again, but the
    -- job was sent once.
    if ARGV[10] then
        redis.call('PUBLISH', ARGV[9], ARGV[10])
    end
end
return 1
