-- The inputs were written to the job's data hash beforehand, with an expiry. The tail:
-- the input indexes, then index, error-result pairs for the items that could not be read.
local prefix, id, total, now, ttl = A.prefix, A.id, A.total, A.now, tonumber(A.ttl)
local idem, nbytes, task, digest = A.idem, tonumber(A.nbytes), A.task, A.digest
local nimages = tonumber(A.nimages)
local k = job_keys(prefix, id)
-- The client retries a command whose answer came late: a second run for the same job
-- answers as the first one did, and changes nothing.
local mine = redis.call('HMGET', k.job, 'status', 'total')
if mine[1] then
  return {'created', id, mine[1], mine[2]}
end
if idem ~= '' then
  local known = redis.call('GET', idem)
  if known then
    local v = redis.call('HMGET', prefix .. ':job:' .. known, 'status', 'total', 'digest')
    if v[1] then
      redis.call('DEL', k.data)
      if v[3] ~= digest then
        return {'conflict', known}
      end
      return {'known', known, v[1], v[2]}
    end
  end
end
if nimages > 0 and redis.call('EXISTS', k.data) == 0 then
  -- A first run refused the job and its answer was lost, or the inputs expired.
  return {'lost'}
end
local live = redis.call('SCARD', LIVE)
local items = tonumber(redis.call('GET', ITEMS) or '0')
local bytes = tonumber(redis.call('GET', BYTES) or '0')
if live >= tonumber(A.max_jobs) or items + nimages > tonumber(A.max_items)
    or bytes + nbytes > tonumber(A.max_bytes) then
  redis.call('DEL', k.data)
  return {'full', live, items, bytes}
end
redis.call('PERSIST', k.data)
redis.call('HSET', k.job, 'total', total, 'task', task, 'status', QUEUED, 'created_at', now,
  'done', 0, 'failed', 0, 'seq', 0, 'queued_bytes', nbytes, 'queued_items', nimages,
  'kept', JOB_KEPT_BYTES)
if idem ~= '' then
  redis.call('SET', idem, id)
  redis.call('HSET', k.job, 'idem', idem, 'digest', digest)
end
redis.call('SADD', LIVE, id)
redis.call('INCRBY', ITEMS, nimages)
redis.call('INCRBY', BYTES, nbytes)
for i = 1, nimages do
  redis.call('XADD', WORK, '*', 'job', id, 'index', ARGV[TAIL + i - 1], 'task', task)
end
local pos = TAIL + nimages
while pos < #ARGV do
  add_result(k, ARGV[pos], ARGV[pos + 1], false, now, ttl)
  pos = pos + 2
end
redis.call('PUBLISH', k.changed, id)
return {'created', id, QUEUED, total}
