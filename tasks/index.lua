-- Index queue lists that hold messages pushed by someone who does not index them (a plain
-- Celery or kombu producer, a restore): found through keyspace notifications or a rescan.
--
-- KEYS    pairs of (queue list, its waiters set)
-- ARGV[1] ready prefix     ARGV[2] wake prefix     ARGV[3] wake list depth
-- Returns how many of the lists held messages.
local found = 0
for i = 1, #KEYS, 2 do
    if redis.call('LLEN', KEYS[i]) > 0 then
        mark_ready(KEYS[i], KEYS[i + 1], ARGV[1], ARGV[2], tonumber(ARGV[3]))
        found = found + 1
    end
end
return found
