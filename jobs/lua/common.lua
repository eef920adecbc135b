-- Shared by the scripts below, prepended to each. Per-job keys hang off the job's hash
-- key; KEYS holds the shared ones: 1 live set, 2 queued-items counter, 3 queued-bytes
-- counter, 4 work stream.
local LIVE, ITEMS, BYTES, WORK = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function job_keys(prefix, id)
  local job = prefix .. ':job:' .. id
  return {
    job = job, results = job .. ':results', data = job .. ':data', events = job .. ':events',
    changed = prefix .. ':changed', id = id,
  }
end

local function progress_fields(k)
  local v = redis.call('HMGET', k.job, 'done', 'failed', 'total')
  return '"done": ' .. v[1] .. ', "failed": ' .. v[2] .. ', "total": ' .. v[3], v
end

local function emit(k, kind, data)
  local seq = redis.call('HINCRBY', k.job, 'seq', 1)
  redis.call('XADD', k.events, '0-' .. seq, 'kind', kind, 'data', data)
end

local FINAL_EVENT = {succeeded = 'done', failed = 'failed', cancelled = 'cancelled'}

-- Ends a live job: frees its queued images and counts, keeps what it computed for ttl.
local function finish(k, status, now, ttl)
  redis.call('HSET', k.job, 'status', status, 'finished_at', now)
  local v = redis.call('HMGET', k.job, 'done', 'total', 'queued_bytes', 'queued_items', 'idem')
  redis.call('DECRBY', ITEMS, tonumber(v[4]))
  redis.call('DECRBY', BYTES, tonumber(v[3]))
  redis.call('HSET', k.job, 'queued_bytes', 0, 'queued_items', 0)
  redis.call('DEL', k.data)
  redis.call('SREM', LIVE, k.id)
  local fields = progress_fields(k)
  emit(k, FINAL_EVENT[status], '{"status": "' .. status .. '", ' .. fields .. '}')
  for _, key in ipairs({k.job, k.results, k.events}) do
    redis.call('EXPIRE', key, ttl)
  end
  if v[5] then
    redis.call('EXPIRE', v[5], ttl)
  end
  redis.call('PUBLISH', k.changed, k.id)
end

-- Stores item index's result once; returns false if it already had one.
local function add_result(k, index, result, ok, now, ttl)
  if redis.call('HSETNX', k.results, index, result) == 0 then
    return false
  end
  local done = redis.call('HINCRBY', k.job, 'done', 1)
  redis.call('HINCRBY', k.job, 'failed', ok and 0 or 1)
  local fields, v = progress_fields(k)
  emit(k, 'progress', '{"index": ' .. index .. ', ' .. fields .. ', "result": ' .. result .. '}')
  if done == tonumber(v[3]) then
    finish(k, tonumber(v[2]) == done and 'failed' or 'succeeded', now, ttl)
  end
  redis.call('PUBLISH', k.changed, k.id)
  return true
end

local function is_live(status)
  return status == 'queued' or status == 'running'
end
