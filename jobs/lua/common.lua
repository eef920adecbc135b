-- Shared by the scripts below, prepended to each after what jobs/scripts.py defines: the
-- limits (MAX_FINISHED_BYTES, JOB_KEPT_BYTES), the statuses (QUEUED, RUNNING, SUCCEEDED,
-- FAILED, CANCELLED), FINAL_EVENT, is_live, and the script's arguments (A, TAIL). Per-job
-- keys hang off the job's hash key; KEYS holds the shared ones: 1 live set, 2
-- queued-items counter, 3 queued-bytes counter, 4 work stream, 5 finished jobs by time,
-- 6 their sizes, 7 the sizes' sum.
local LIVE, ITEMS, BYTES, WORK = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local FINISHED, FINISHED_SIZES, FINISHED_BYTES = KEYS[5], KEYS[6], KEYS[7]

local function job_keys(prefix, id)
  local job = prefix .. ':job:' .. id
  return {
    job = job, results = job .. ':results', data = job .. ':data', events = job .. ':events',
    changed = prefix .. ':changed', id = id, prefix = prefix,
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

-- Deletes every trace of a finished job.
local function forget(k)
  redis.call('DECRBY', FINISHED_BYTES, tonumber(redis.call('HGET', FINISHED_SIZES, k.id) or '0'))
  redis.call('HDEL', FINISHED_SIZES, k.id)
  redis.call('ZREM', FINISHED, k.id)
  local idem = redis.call('HGET', k.job, 'idem')
  if idem then
    redis.call('DEL', idem)
  end
  redis.call('DEL', k.job, k.results, k.events, k.data)
end

-- Forgets finished jobs: those whose keys expired, then the oldest while finished jobs
-- keep more than MAX_FINISHED_BYTES (never the newest). A bounded amount per call.
local function trim_finished(prefix, now_us, ttl)
  local gone = redis.call('ZRANGEBYSCORE', FINISHED, '-inf', now_us - ttl * 1e6, 'LIMIT', 0, 100)
  for _, id in ipairs(gone) do
    redis.call('DECRBY', FINISHED_BYTES, tonumber(redis.call('HGET', FINISHED_SIZES, id) or '0'))
    redis.call('HDEL', FINISHED_SIZES, id)
    redis.call('ZREM', FINISHED, id)
  end
  for _ = 1, 100 do
    if tonumber(redis.call('GET', FINISHED_BYTES) or '0') <= MAX_FINISHED_BYTES
        or redis.call('ZCARD', FINISHED) <= 1 then
      break
    end
    forget(job_keys(prefix, redis.call('ZRANGE', FINISHED, 0, 0)[1]))
  end
end

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
  local time = redis.call('TIME')
  local now_us = tonumber(time[1]) * 1e6 + tonumber(time[2])  -- exact in a double
  local kept = tonumber(redis.call('HGET', k.job, 'kept') or JOB_KEPT_BYTES)
  redis.call('ZADD', FINISHED, now_us, k.id)
  redis.call('HSET', FINISHED_SIZES, k.id, kept)
  redis.call('INCRBY', FINISHED_BYTES, kept)
  trim_finished(k.prefix, now_us, ttl)
  redis.call('PUBLISH', k.changed, k.id)
end

-- Stores item index's result once; returns false if it already had one.
local function add_result(k, index, result, ok, now, ttl)
  if redis.call('HSETNX', k.results, index, result) == 0 then
    return false
  end
  local done = redis.call('HINCRBY', k.job, 'done', 1)
  redis.call('HINCRBY', k.job, 'kept', 2 * #result + 100)
  redis.call('HINCRBY', k.job, 'failed', ok and 0 or 1)
  local fields, v = progress_fields(k)
  emit(k, 'progress', '{"index": ' .. index .. ', ' .. fields .. ', "result": ' .. result .. '}')
  if done == tonumber(v[3]) then
    finish(k, tonumber(v[2]) == done and FAILED or SUCCEEDED, now, ttl)
  end
  redis.call('PUBLISH', k.changed, k.id)
  return true
end
