-- Hand one delivery back to its queue from a live consumer (a reject with requeue, a warm
-- shutdown's reserved messages), in one step: the message goes back on its queue list and
-- into the ready index, and its unacknowledged record is dropped, its delivery uncounted
-- (a hand-back is not a delivery without an outcome).
--
-- Done in two round trips (drop the owner and held entries, then kombu's restore), a
-- consumer killed or cut off between them left the message in the unacked hash with no
-- owner: no rescue could see it, only kombu's sweep after the visibility timeout (an hour).
--
-- KEYS: unacked hash, unacked index, deliveries hash, owner hash, this consumer's held hash
-- ARGV: delivery tag, this consumer's id, 'front' or 'back', kombu's global key prefix,
--       waiters prefix, ready prefix, wake prefix, wake depth
-- Returns 1: handed back; 0: not this consumer's any more (rescued, maybe claimed again:
-- nothing to do); -1: not a delivery claim.lua recorded (the caller restores it as kombu
-- does).
--
-- A consumer declared dead and back has no held entry any more (its rescuer deleted them
-- all) while the message may be on its queue again or held by another consumer: only an
-- unacknowledged entry with no owner at all is a message kombu recorded itself (the rule
-- ack.lua applies); anything else is not this consumer's to restore.
local tag = ARGV[1]
local queue = redis.call('HGET', KEYS[5], tag)
local owner = redis.call('HGET', KEYS[4], tag)
local entry = redis.call('HGET', KEYS[1], tag)
if not queue then
    if entry and not owner then
        return -1
    end
    return 0
end
if owner ~= ARGV[2] or not entry then
    redis.call('HDEL', KEYS[5], tag)
    return 0
end
-- claim.lua wrote '[' .. item .. ',' .. exchange .. ',' .. routing key .. ']': cut the
-- verbatim item back out, never re-encoding it (as rescue.lua does).
local ok, fields = pcall(cjson.decode, entry)
if not ok or type(fields) ~= 'table' then
    return -1
end
local suffix = ',' .. cjson.encode(fields[2]) .. ',' .. cjson.encode(fields[3]) .. ']'
local item = string.sub(entry, 2, #entry - #suffix)
if ARGV[3] == 'front' then
    redis.call('RPUSH', queue, item)
else
    redis.call('LPUSH', queue, item)
end
local name = string.gsub(string.sub(queue, #ARGV[4] + 1), '\6\22%d+$', '')
mark_ready(queue, ARGV[5] .. name, ARGV[6], ARGV[7], tonumber(ARGV[8]))
redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
redis.call('HINCRBY', KEYS[3], tag, -1)
redis.call('HDEL', KEYS[4], tag)
redis.call('HDEL', KEYS[5], tag)
return 1
