-- Records the item once and acknowledges its delivery, whatever the job's state.
local k = job_keys(A.prefix, A.id)
local index = A.index
if is_live(redis.call('HGET', k.job, 'status')) then
  local size = redis.call('HSTRLEN', k.data, index)
  if add_result(k, index, A.result, A.ok == '1', A.now, tonumber(A.ttl)) then
    if redis.call('HDEL', k.data, index) == 1 then
      redis.call('DECRBY', ITEMS, 1)
      redis.call('DECRBY', BYTES, size)
      redis.call('HINCRBY', k.job, 'queued_items', -1)
      redis.call('HINCRBY', k.job, 'queued_bytes', -size)
    end
  end
end
redis.call('XACK', WORK, A.group, A.entry)
redis.call('XDEL', WORK, A.entry)
return 1
