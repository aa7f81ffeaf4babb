-- An instance's usage totals, last run, recent errors and last logs, written only while the
-- instance exists: a run still in flight when its instance is unloaded must not re-create
-- them (unload deletes them once; nothing would delete them again).
-- KEYS: the instance, its usage hash, its recent errors.
-- ARGV[1] "logs": ARGV[2] the run's logs.
-- ARGV[1] "run": ARGV[2] 1 if it failed, ARGV[3] the last run (JSON), ARGV[4] errors kept
--   (0: it succeeded, nothing pushed), then name, value pairs of summed usage figures.
if redis.call('HEXISTS', KEYS[1], 'plugin_id') == 0 then  -- as instances.MARK_FAILED asks
  return 0
end
if ARGV[1] == 'logs' then
  redis.call('HSET', KEYS[2], 'last_logs', ARGV[2])
  return 1
end
redis.call('HINCRBY', KEYS[2], 'runs', 1)
redis.call('HINCRBY', KEYS[2], 'failures', tonumber(ARGV[2]))
for i = 5, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], 'last_run', ARGV[3])
local kept = tonumber(ARGV[4])
if kept > 0 then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, kept - 1)
end
return 1
