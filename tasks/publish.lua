-- Publish one message: push it and index its queue as ready in the same atomic step, so
-- the ready index never says "empty" while the queue holds a message this script put there.
--
-- KEYS[1] the queue list   KEYS[2] the queue's waiters set (groups consuming it)
-- ARGV[1] the message      ARGV[2] 'L' to push at the back (LPUSH: a publish),
--                                  'R' at the front (RPUSH: a message handed back)
-- ARGV[3] ready prefix     ARGV[4] wake prefix     ARGV[5] wake list depth
if ARGV[2] == 'R' then
    redis.call('RPUSH', KEYS[1], ARGV[1])
else
    redis.call('LPUSH', KEYS[1], ARGV[1])
end
mark_ready(KEYS[1], KEYS[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
return 1
