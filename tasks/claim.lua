-- Reliable fetch: take the next message of a worker group's ready queues and record it as
-- unacknowledged in the same atomic step, applying the poison rule.
--
-- kombu's Redis transport BRPOPs a message and only then records it in the unacked hash
-- from the worker; a worker killed between the two loses the message. Here no instant
-- exists where the message is in neither place.
--
-- Which queue: the group's ready index (see delivery_lib.lua), not a scan of every queue
-- the worker consumes, so a claim costs the same with 1 plugin or 10,000. The served queue
-- moves to the back of the index (round robin between ready queues).
--
-- An indexed queue this consumer does not consume (a plugin an operator disabled with jobs
-- waiting, or the group's members not all caught up with a registry change) is left to
-- those that serve it, deferred NOT_SERVED_DEFER_MS behind the queues ready now in its
-- priority step, and the claim reads on past it: however many such queues there are, they
-- never hide a ready queue this consumer serves (they once filled the whole window the
-- claim read, and the group stopped claiming anything while a plugin's backlog waited
-- behind them). Deferred, a claim under load meets them again once per that interval
-- instead of at every claim (each costs about 5 us of Redis time when met); a member that
-- does serve one reaches it at most that much later than its turn.
--
-- The unacknowledged record of one delivery (shared by poison detection, dead-worker
-- rescue and ack) is, keyed by the message's delivery tag:
--   kombu's unacked hash entry and index score (so kombu's restore sweep still works),
--   the delivery count and first delivery time (deliveries hash: <tag>, <tag>|t),
--   the consumer holding it (owner hash) and the consumer's held hash (tag -> queue key),
--   from which a live worker returns it at once when the consumer's heartbeat stops.
--
-- KEYS[1]  unacked hash (delivery tag -> [message, exchange, routing key], kombu's format)
-- KEYS[2]  unacked index (sorted set: delivery tag -> time it was delivered)
-- KEYS[3]  deliveries hash      KEYS[4] owner hash        KEYS[5] this consumer's held hash
-- KEYS[6]  dead-letter hash     KEYS[7] dead-letter index KEYS[8] consumer heartbeats
-- KEYS[9]  this group's ready index   KEYS[10] the queue lists this consumer consumes (set)
-- KEYS[11] quarantined messages whose job's failure is not stored yet (set; the worker
--          stores it and removes the id, its restore sweep retries what is left)
-- KEYS[12..] pairs (queue list, waiters set) to index first: lists a keyspace notification
--          or a rescan says may hold messages nobody indexed
-- ARGV[1]  now, in seconds since the epoch (the worker's clock, as kombu uses)
-- ARGV[2]  this consumer's id
-- ARGV[3]  max deliveries without an outcome (0: no limit); one more is quarantined
-- ARGV[4]  dead-letter store bound
-- ARGV[5]  '1' to record the delivery, '0' for a consumer that does not acknowledge
-- ARGV[6]  ready prefix   ARGV[7] wake prefix   ARGV[8] wake list depth
-- ARGV[9]  how many ready queues to read from the index at a time
--
-- Returns {queue key, raw item, status, tag, quarantined ids...}; status 1: recorded, 0: handed
-- over unrecorded (not a kombu message this script can index, or not acknowledged; the
-- worker dead-letters or delivers it), -1: nothing ready.

local now = tonumber(ARGV[1])
local consumer = ARGV[2]
local max_deliveries = tonumber(ARGV[3])
local dead_letter_max = tonumber(ARGV[4])
local record = ARGV[5] ~= '0'
local ready = KEYS[9]

for i = 12, #KEYS, 2 do
    if redis.call('LLEN', KEYS[i]) > 0 then
        mark_ready(KEYS[i], KEYS[i + 1], ARGV[6], ARGV[7], tonumber(ARGV[8]))
    end
end

local function index_fields(item)
    local ok, message = pcall(cjson.decode, item)
    if not ok or type(message) ~= 'table' then
        return nil
    end
    local properties = message['properties']
    if type(properties) ~= 'table' then
        return nil
    end
    local tag = properties['delivery_tag']
    if type(tag) ~= 'string' or tag == '' or string.find(tag, '|', 1, true) then
        return nil
    end
    local info = properties['delivery_info']
    if type(info) ~= 'table' then
        return nil
    end
    local exchange = info['exchange']
    local routing_key = info['routing_key']
    if exchange == nil then exchange = cjson.null end
    if routing_key == nil then routing_key = cjson.null end
    return tag, cjson.encode(exchange), cjson.encode(routing_key)
end

local quarantined = {}

local function reply(queue, item, status, tag)
    local out = {queue, item, status, tag}
    for _, id in ipairs(quarantined) do table.insert(out, id) end
    return out
end

local NOT_SERVED_DEFER_MS = 5000

local function served(queue, defer_ms)
    if redis.call('LLEN', queue) == 0 then
        redis.call('ZREM', ready, queue)
    else
        redis.call('ZADD', ready, 'XX', ready_score(queue) + (defer_ms or 0), queue)
    end
end

local window = tonumber(ARGV[9])
local seen = {}
local start = 0
while true do
    local candidates = redis.call('ZRANGE', ready, start, start + window - 1)
    if #candidates == 0 then
        break
    end
    -- Entries seen earlier in this claim at the head of the window keep their place (an
    -- entry is changed only the first time it is seen): read on after them.
    local leading = 0
    while leading < #candidates and seen[candidates[leading + 1]] do
        leading = leading + 1
    end
    start = start + leading
    for i = leading + 1, #candidates do
        local queue = candidates[i]
        if not seen[queue] then
            seen[queue] = true
            if redis.call('SISMEMBER', KEYS[10], queue) == 0 then
                -- Not this consumer's (see the top): drop it once empty, else deferred.
                served(queue, NOT_SERVED_DEFER_MS)
            else
                while true do
                    local item = redis.call('RPOP', queue)
                    if not item then
                        redis.call('ZREM', ready, queue)
                        break
                    end
                    local tag, exchange, routing_key = nil, nil, nil
                    if record then
                        tag, exchange, routing_key = index_fields(item)
                    end
                    if tag == nil then
                        served(queue)
                        return reply(queue, item, 0, '')
                    end
                    local count = redis.call('HINCRBY', KEYS[3], tag, 1)
                    if count == 1 then
                        redis.call('HSET', KEYS[3], tag .. '|t', ARGV[1])
                    end
                    if max_deliveries > 0 and count > max_deliveries then
                        -- Poison: every earlier delivery ended without an outcome (its
                        -- consumer died).
                        local first = tonumber(redis.call('HGET', KEYS[3], tag .. '|t')) or now
                        local entry = cjson.encode({
                            id = tag, queue = queue, raw = item, requeueable = true,
                            reason = 'delivered ' .. (count - 1) .. ' times without an outcome '
                                .. '(its consumer died each time); quarantined by the poison rule',
                            first_seen = first, at = now, deliveries = count - 1,
                            last_consumer = redis.call('HGET', KEYS[4], tag) or cjson.null})
                        add_dead_letter(KEYS[6], KEYS[7], tag, entry, now, dead_letter_max)
                redis.call('SADD', KEYS[11], tag)
                        redis.call('HDEL', KEYS[3], tag, tag .. '|t')
                        redis.call('HDEL', KEYS[4], tag)
                        table.insert(quarantined, tag)
                    else
                        -- The stored entry embeds the raw item verbatim: no re-encoding can
                        -- alter it.
                        redis.call('HSET', KEYS[1], tag,
                                   '[' .. item .. ',' .. exchange .. ',' .. routing_key .. ']')
                        redis.call('ZADD', KEYS[2], now, tag)
                        redis.call('HSET', KEYS[4], tag, consumer)
                        redis.call('HSET', KEYS[5], tag, queue)
                        -- A consumer holds nothing before it is known (its heartbeat may not
                        -- have run).
                        redis.call('ZADD', KEYS[8], 'NX', now, consumer)
                        served(queue)
                        return reply(queue, item, 1, tag)
                    end
                end
            end
        end
    end
end
return reply('', '', -1, '')
