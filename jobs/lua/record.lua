-- ARGV: prefix, job id, index, result JSON, ok (1/0), now, ttl, entry id, group.
-- Records the item once and acknowledges its delivery, whatever the job's state.
local k = job_keys(ARGV[1], ARGV[2])
local index = ARGV[3]
if is_live(redis.call('HGET', k.job, 'status')) then
  local size = redis.call('HSTRLEN', k.data, index)
  if add_result(k, index, ARGV[4], ARGV[5] == '1', ARGV[6], tonumber(ARGV[7])) then
    if redis.call('HDEL', k.data, index) == 1 then
      redis.call('DECRBY', ITEMS, 1)
      redis.call('DECRBY', BYTES, size)
      redis.call('HINCRBY', k.job, 'queued_items', -1)
      redis.call('HINCRBY', k.job, 'queued_bytes', -size)
    end
  end
end
redis.call('XACK', WORK, ARGV[9], ARGV[8])
redis.call('XDEL', WORK, ARGV[8])
return 1
