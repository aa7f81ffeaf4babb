-- Acknowledge one delivery: drop its unacknowledged record if this consumer still holds it.
--
-- A consumer declared dead (its heartbeat missing) may come back: its messages were
-- returned to their queues, and may already be held by another consumer. Its late
-- acknowledgement must not erase the new holder's record; it is counted instead.
--
-- KEYS: unacked hash, unacked index, deliveries hash, owner hash, this consumer's held
--       set, delivery stats hash
-- ARGV: delivery tag, this consumer's id
-- Returns 1 when the record was dropped, 0 for a late acknowledgement.
local tag = ARGV[1]
local owner = redis.call('HGET', KEYS[4], tag)
if owner == ARGV[2] or (not owner and redis.call('HEXISTS', KEYS[1], tag) == 1) then
    forget_delivery(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], tag)
    return 1
end
redis.call('HDEL', KEYS[5], tag)
redis.call('HINCRBY', KEYS[6], 'late_acks', 1)
return 0
