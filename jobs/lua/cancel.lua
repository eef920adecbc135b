-- Returns the job's status afterwards, or nil.
local k = job_keys(A.prefix, A.id)
local status = redis.call('HGET', k.job, 'status')
if is_live(status) then
  finish(k, CANCELLED, A.now, tonumber(A.ttl))
  redis.call('PUBLISH', A.prefix .. ':cancelled', k.id)
  return CANCELLED
end
return status
