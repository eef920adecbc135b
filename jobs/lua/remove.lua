-- Cancels the job if it is live, then deletes every trace of it. Returns its status
-- before the deletion, or nil if it is unknown.
local k = job_keys(A.prefix, A.id)
local status = redis.call('HGET', k.job, 'status')
if not status then
  return nil
end
if is_live(status) then
  finish(k, CANCELLED, A.now, tonumber(A.ttl))
  redis.call('PUBLISH', A.prefix .. ':cancelled', k.id)
  status = CANCELLED
end
forget(k)
redis.call('PUBLISH', k.changed, k.id)
return status
