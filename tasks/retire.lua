-- Take the jobs waiting on unregistered plugins' queues into each plugin's holding list, in
-- one atomic step per batch, and return what each holding list holds.
--
-- A job moves from its queue list to the holding list in the same step (never in neither),
-- and leaves the holding list only once its failure is stored (tasks/retire.py removes it
-- then): a sweeper killed in between leaves it held, and the next sweep, by any worker or
-- producer, fails it again (storing the same failure twice is harmless).
--
-- KEYS    per plugin, `per` keys: its queue lists (one per priority step), then its holding
--         list
-- ARGV[1] keys per plugin   ARGV[2] most messages to move per plugin in this call
-- Returns, per plugin, the list of raw messages its holding list holds after the move.
local per = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
local out = {}
for base = 0, #KEYS - per, per do
    local holding = KEYS[base + per]
    local room = most - redis.call('LLEN', holding)
    for i = base + 1, base + per - 1 do
        while room > 0 do
            local item = redis.call('RPOP', KEYS[i])
            if not item then break end
            redis.call('LPUSH', holding, item)
            room = room - 1
        end
    end
    table.insert(out, redis.call('LRANGE', holding, 0, most - 1))
end
return out
