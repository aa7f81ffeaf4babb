-- Return what a dead consumer held to the front of its queues, once.
--
-- A consumer (worker process) whose heartbeat is older than the dead-after bound is dead
-- (SIGKILL, OOM kill, a lost node): its unacknowledged messages go back now instead of
-- after the visibility timeout. The whole rescue of one consumer is one script, so
-- concurrent rescuers cannot both return a message: the second finds nothing held. The
-- delivery count is kept, so the poison rule still applies to a message that kills its
-- consumers. A consumer that was only paused and comes back finds its messages gone: its
-- late acknowledgement is counted by ack.lua.
--
-- KEYS: unacked hash, unacked index, owner hash, the dead consumer's held hash,
--       consumer heartbeats, delivery stats, the dead consumer's consumed-lists set
-- ARGV: the dead consumer's id, heartbeat bound (a heartbeat at or after it is alive),
--       kombu's global key prefix, waiters prefix, ready prefix, wake prefix, wake depth
-- Returns the number of messages returned (-1 if the consumer beat again meanwhile).
local dead = ARGV[1]
local beat = tonumber(redis.call('ZSCORE', KEYS[5], dead))
if beat and beat >= tonumber(ARGV[2]) then
    return -1
end
local held = redis.call('HGETALL', KEYS[4])
local returned = 0
for i = 1, #held, 2 do
    local tag, queue = held[i], held[i + 1]
    local entry = redis.call('HGET', KEYS[1], tag)
    if entry and redis.call('HGET', KEYS[3], tag) == dead then
        -- claim.lua wrote '[' .. item .. ',' .. exchange .. ',' .. routing key .. ']':
        -- cut the verbatim item back out, never re-encoding it.
        local ok, fields = pcall(cjson.decode, entry)
        if ok and type(fields) == 'table' then
            local suffix = ',' .. cjson.encode(fields[2]) .. ',' .. cjson.encode(fields[3]) .. ']'
            local item = string.sub(entry, 2, #entry - #suffix)
            redis.call('RPUSH', queue, item)
            local name = string.gsub(string.sub(queue, #ARGV[3] + 1), '\6\22%d+$', '')
            mark_ready(queue, ARGV[4] .. name, ARGV[5], ARGV[6], tonumber(ARGV[7]))
            redis.call('HDEL', KEYS[1], tag)
            redis.call('ZREM', KEYS[2], tag)
            redis.call('HDEL', KEYS[3], tag)
            returned = returned + 1
        end
    end
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], dead)
-- A consumer that was its own group (no worker selector) leaves no waiters behind.
for _, queue in ipairs(redis.call('SMEMBERS', KEYS[7])) do
    local name = string.gsub(string.sub(queue, #ARGV[3] + 1), '\6\22%d+$', '')
    redis.call('SREM', ARGV[4] .. name, dead)
end
redis.call('DEL', KEYS[7], ARGV[5] .. dead, ARGV[6] .. dead)
if returned > 0 then
    redis.call('HINCRBY', KEYS[6], 'rescued', returned)
end
return returned
