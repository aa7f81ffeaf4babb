-- Reliable fetch: pop the next message of a worker's queues and record it as
-- unacknowledged in the same atomic step.
--
-- kombu's Redis transport BRPOPs a message and only then records it in the unacked hash
-- from the worker; a worker killed between the two loses the message. Here no instant
-- exists where the message is in neither place: if the worker dies after this script ran,
-- kombu's restore sweep (on any other worker) puts it back after the visibility timeout.
--
-- KEYS[1]   unacked hash (delivery tag -> [message, exchange, routing key], kombu's format)
-- KEYS[2]   unacked index (sorted set: delivery tag -> time it was delivered)
-- KEYS[3..] the queue lists, in the order they should be served (kombu's priority steps
--           and round-robin order)
-- ARGV[1]   now, in seconds since the epoch (the worker's clock, as kombu uses)
--
-- Returns false when every queue is empty, else {queue key, raw item, registered}:
-- registered is 0 when the item is not a kombu message this script can index (the worker
-- then dead-letters it, or indexes it itself if its stricter parser accepts it).

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
    if type(tag) ~= 'string' or tag == '' then
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

for i = 3, #KEYS do
    local item = redis.call('RPOP', KEYS[i])
    if item then
        local tag, exchange, routing_key = index_fields(item)
        if tag == nil then
            return {KEYS[i], item, 0}
        end
        -- The stored entry embeds the raw item verbatim: no re-encoding can alter it.
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. exchange .. ',' .. routing_key .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        return {KEYS[i], item, 1}
    end
end
return false
