-- pluginpool: durable per-plugin health figures, updated with every recorded outcome.
-- Loaded in front of breaker.lua, so recording an outcome stays one round trip. Counts
-- live in Redis, not in the aggregator: they survive its restarts and agree across replicas.
-- The same bounds as LATENCY_BUCKETS_MS in policy/health.py (a test holds them equal).
local LATENCY_BUCKETS_MS = {1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 65, 80, 100,
  150, 200, 300, 500, 750, 1000, 2500, 5000, 10000, 30000, 60000}

local function latency_label(ms)
  for _, bound in ipairs(LATENCY_BUCKETS_MS) do
    if ms <= bound then return tostring(bound) end
  end
  return 'inf'
end

local function record_health(hkey, minute_prefix, errors_key, stats, error_event, now)
  local minute_key = minute_prefix .. math.floor(now / 60000)
  redis.call('HINCRBY', hkey, 'runs', 1)
  redis.call('HINCRBY', minute_key, 'runs', 1)
  local error_type = stats.error_type
  if error_type and error_type ~= cjson.null then
    redis.call('HINCRBY', hkey, 'failed:' .. error_type, 1)
    redis.call('HINCRBY', minute_key, 'failed', 1)
    redis.call('HSET', hkey, 'last_error_type', error_type, 'last_error_ms', now)
    if error_event ~= '' then
      redis.call('LPUSH', errors_key, error_event)
      redis.call('LTRIM', errors_key, 0, 19)
    end
  else
    redis.call('HINCRBY', hkey, 'succeeded', 1)
    redis.call('HSET', hkey, 'last_success_ms', now)
  end
  local wall = tonumber(stats.wall_ms) or 0
  local label = latency_label(wall)
  redis.call('HINCRBY', hkey, 'lat:' .. label, 1)
  redis.call('HINCRBY', minute_key, 'lat:' .. label, 1)
  redis.call('HINCRBYFLOAT', hkey, 'wall_ms_sum', wall)
  for _, name in ipairs({'cpu_ms', 'cpu_percent', 'memory_mb', 'network_requests'}) do
    local value = tonumber(stats[name])
    if value then redis.call('HINCRBYFLOAT', hkey, name .. '_sum', value) end
  end
  for _, name in ipairs({'memory_mb', 'storage_kb'}) do
    local value = tonumber(stats[name])
    if value and value > (tonumber(redis.call('HGET', hkey, name .. '_max')) or 0) then
      redis.call('HSET', hkey, name .. '_max', value)
    end
  end
  redis.call('EXPIRE', minute_key, 3600)
end
