-- Shared by the delivery scripts (prepended to each when loaded).

-- Set one entry aside in the bounded dead-letter store, evicting the oldest beyond max_len.
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

-- The ready index: one sorted set per worker group of the queue lists that may hold a
-- message, in the order they will be served. A queue's score is its kombu priority step
-- (lower first) then the time it became ready or was last served, so the group serves its
-- ready queues round robin: a deep backlog on one queue cannot starve the others.
local function ready_score(queue_key)
    local step = tonumber(string.match(queue_key, '\6\22(%d+)$')) or 0
    local now = redis.call('TIME')
    return step * 1e14 + tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end

-- A queue list that holds a message is ready for every group consuming it: index it
-- (keeping its place if it is already indexed) and ring each group's wake-up list.
local function mark_ready(queue_key, waiters_key, ready_prefix, wake_prefix, wake_depth)
    local groups = redis.call('SMEMBERS', waiters_key)
    if #groups == 0 then
        return
    end
    local score = ready_score(queue_key)
    for _, group in ipairs(groups) do
        redis.call('ZADD', ready_prefix .. group, 'NX', score, queue_key)
        redis.call('LPUSH', wake_prefix .. group, 1)
        redis.call('LTRIM', wake_prefix .. group, 0, wake_depth - 1)
    end
end
