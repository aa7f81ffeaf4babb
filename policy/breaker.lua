-- pluginpool circuit breaker: every transition of one plugin's breaker, atomically.
-- KEYS: 1 state hash, 2 window (list for count windows, zset for time windows),
--       3 failed zset (time windows), 4 slow zset (time windows), 5 history list,
--       6 health hash, 7 recent errors list (record only)
-- ARGV: 1 op, 2 config JSON, 3 breaker channel, 4 plugin id, 5 token (half-open generation),
--       op "record": 6 outcome code (s = success, f = failure, x = opens at once, i = ignored),
--                    7 slow ("1"/"0"), 8 error channel, 9 error event JSON or "",
--                    10 health figures JSON, 11 per-minute health key prefix,
--                    12 "1" when the breaker is switched off (figures only),
--                    13 channel and 14 message of one more PUBLISH, or "" (the usage event)
--       op "override": 6 action (reset | force_open | trial: half-open now if open, not forced)
local op, cfg, channel, plugin = ARGV[1], cjson.decode(ARGV[2]), ARGV[3], ARGV[4]
local S, W, WF, WS, H = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function get(field, default)
  local value = redis.call('HGET', S, field)
  if value then return value end
  return default
end
local function num(field) return tonumber(get(field, '0')) end

local function transition(to, reason)
  local from = get('state', 'closed')
  redis.call('HSET', S, 'state', to, 'last_change_ms', now, 'reason', reason)
  local event = cjson.encode({plugin = plugin, from = from, to = to, reason = reason,
                              at_ms = now, open_ms = num('open_ms')})
  redis.call('LPUSH', H, event)
  redis.call('LTRIM', H, 0, 49)
  redis.call('PUBLISH', channel, event)
end

local function reset_window()
  redis.call('DEL', W, WF, WS)
  redis.call('HSET', S, 'w_total', 0, 'w_failed', 0, 'w_slow', 0)
end

local function open(reason, wait_ms)
  redis.call('HSET', S, 'opened_at_ms', now, 'open_until_ms', now + wait_ms, 'open_ms', wait_ms,
             'permits', 0, 'trial_ok', 0)
  transition('open', reason)
end

local function half_open(reason)
  redis.call('HINCRBY', S, 'generation', 1)
  redis.call('HSET', S, 'permits', cfg.half_open_calls, 'trial_ok', 0, 'half_open_since_ms', now)
  transition('half_open', reason)
end

-- The state now, moving open -> half_open when the wait is over, and re-issuing trial
-- permits whose jobs never reported back (lost messages must not wedge the breaker).
local function current_state()
  local state = get('state', 'closed')
  if state == 'open' and get('forced', '0') == '0' and now >= num('open_until_ms') then
    half_open('wait elapsed')
    state = 'half_open'
  elseif state == 'half_open' and num('permits') == 0
      and now - num('half_open_since_ms') > cfg.trial_timeout_ms then
    half_open('trials did not report back in time')
  end
  return state
end

local function window_counts()
  if cfg.window_type == 'time' then
    local cutoff = now - cfg.window_size * 1000
    for _, key in ipairs({W, WF, WS}) do redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff) end
    return redis.call('ZCARD', W), redis.call('ZCARD', WF), redis.call('ZCARD', WS)
  end
  return num('w_total'), num('w_failed'), num('w_slow')
end

local function push(failed, slow)
  if cfg.window_type == 'time' then
    local member = now .. ':' .. redis.call('HINCRBY', S, 'seq', 1)
    redis.call('ZADD', W, now, member)
    if failed then redis.call('ZADD', WF, now, member) end
    if slow then redis.call('ZADD', WS, now, member) end
    return
  end
  local code = (failed and 'f' or 's') .. (slow and 'S' or '-')
  redis.call('LPUSH', W, code)
  redis.call('HINCRBY', S, 'w_total', 1)
  if failed then redis.call('HINCRBY', S, 'w_failed', 1) end
  if slow then redis.call('HINCRBY', S, 'w_slow', 1) end
  if redis.call('LLEN', W) > cfg.window_size then
    local old = redis.call('RPOP', W)
    redis.call('HINCRBY', S, 'w_total', -1)
    if string.sub(old, 1, 1) == 'f' then redis.call('HINCRBY', S, 'w_failed', -1) end
    if string.sub(old, 2, 2) == 'S' then redis.call('HINCRBY', S, 'w_slow', -1) end
  end
end

local function retry_after(state)
  if state == 'open' then
    if get('forced', '0') == '1' then return -1 end
    return math.max(num('open_until_ms') - now, 0)
  end
  return 0
end

if op == 'acquire' then
  local state = current_state()
  if state == 'closed' then return {1, state, 0, 0} end
  if state == 'open' then return {0, state, retry_after(state), 0} end
  local generation = num('generation')
  local token = tonumber(ARGV[5]) or 0
  if token > 0 and token == generation then return {1, state, 0, generation} end
  if num('permits') > 0 then
    redis.call('HINCRBY', S, 'permits', -1)
    return {1, state, 0, generation}
  end
  return {0, state, 0, 0}
end

if op == 'record' then
  if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[8], ARGV[9]) end
  if ARGV[13] and ARGV[13] ~= '' then redis.call('PUBLISH', ARGV[13], ARGV[14]) end
  record_health(KEYS[6], ARGV[11], KEYS[7], cjson.decode(ARGV[10]), ARGV[9], now)
  if ARGV[12] == '1' then return {'closed', 0} end
  local code, slow = ARGV[6], ARGV[7] == '1'
  local state = current_state()
  if code == 'i' or get('forced', '0') == '1' then
    if code == 'i' and state == 'half_open' and (tonumber(ARGV[5]) or 0) == num('generation')
        and num('permits') < cfg.half_open_calls then
      redis.call('HINCRBY', S, 'permits', 1)  -- a trial that told nothing: another may run
    end
    return {state, retry_after(state)}
  end
  local failed = code == 'f' or code == 'x'
  if state == 'closed' then
    if code == 'x' then
      open('error that retrying cannot fix', cfg.open_ms)
      return {'open', retry_after('open')}
    end
    push(failed, slow)
    local total, failures, slows = window_counts()
    if total >= cfg.minimum_calls then
      if failures >= cfg.failure_rate_threshold * total then
        open(string.format('failure rate %d/%d', failures, total), cfg.open_ms)
        return {'open', retry_after('open')}
      end
      if slows >= cfg.slow_call_rate_threshold * total then
        open(string.format('slow-call rate %d/%d', slows, total), cfg.open_ms)
        return {'open', retry_after('open')}
      end
    end
    return {state, retry_after(state)}
  end
  if state == 'half_open' and (tonumber(ARGV[5]) or 0) == num('generation') then
    if failed or slow then
      local wait = math.min(math.floor(math.max(num('open_ms'), cfg.open_ms) * cfg.backoff_factor),
                            cfg.max_open_ms)
      open('trial run failed', wait)
      return {'open', retry_after('open')}
    end
    if redis.call('HINCRBY', S, 'trial_ok', 1) >= cfg.half_open_calls then
      reset_window()
      redis.call('HSET', S, 'open_ms', 0)
      transition('closed', 'trial runs succeeded')
      return {'closed', 0}
    end
  end
  return {state, retry_after(state)}
end

if op == 'override' then
  local action = ARGV[6]
  if action == 'reset' then
    reset_window()
    redis.call('HSET', S, 'forced', 0, 'open_ms', 0, 'permits', 0, 'trial_ok', 0)
    transition('closed', 'reset by operator')
  elseif action == 'force_open' then
    redis.call('HSET', S, 'forced', 1)
    open('forced open by operator', cfg.max_open_ms)
  elseif action == 'trial' then
    -- a new revision: the code the breaker judged is gone; its trials try the new one now
    if get('state', 'closed') == 'open' and get('forced', '0') == '0' then
      half_open('new revision registered')
    end
  else
    return redis.error_reply('unknown override ' .. tostring(action))
  end
  return {get('state', 'closed')}
end

if op == 'status' then
  local state = current_state()
  local total, failures, slows = window_counts()
  return cjson.encode({state = state, forced = get('forced', '0') == '1',
                       retry_after_ms = retry_after(state), window_total = total,
                       window_failed = failures, window_slow = slows,
                       open_ms = num('open_ms'), generation = num('generation'),
                       permits = num('permits'), trial_ok = num('trial_ok'),
                       reason = get('reason', ''), last_change_ms = num('last_change_ms'),
                       history = redis.call('LRANGE', H, 0, 49)})
end

return redis.error_reply('unknown op ' .. tostring(op))
