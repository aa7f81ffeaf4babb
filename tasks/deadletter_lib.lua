-- Shared by claim.lua and deadletter.lua (prepended to each when loaded): set one entry
-- aside in the bounded dead-letter store, evicting the oldest beyond max_len.
local function add_dead_letter(hash, index, id, entry, now, max_len)
    redis.call('HSET', hash, id, entry)
    redis.call('ZADD', index, now, id)
    local excess = redis.call('ZCARD', index) - max_len
    if excess > 0 then
        local evicted = redis.call('ZRANGE', index, 0, excess - 1)
        redis.call('ZREMRANGEBYRANK', index, 0, excess - 1)
        for _, old in ipairs(evicted) do
            redis.call('HDEL', hash, old)
        end
    end
end

-- Drop every part of one delivery's unacknowledged record.
local function forget_delivery(unacked, index, deliveries, owner, held, tag)
    redis.call('HDEL', unacked, tag)
    redis.call('ZREM', index, tag)
    redis.call('HDEL', deliveries, tag, tag .. '|t')
    redis.call('HDEL', owner, tag)
    redis.call('HDEL', held, tag)
end
