-- ARGV: prefix, job id, now, ttl. Cancels the job if it is live, then deletes every trace
-- of it. Returns its status before the deletion, or nil if it is unknown.
local k = job_keys(ARGV[1], ARGV[2])
local status = redis.call('HGET', k.job, 'status')
if not status then
  return nil
end
if is_live(status) then
  finish(k, 'cancelled', ARGV[3], tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[1] .. ':cancelled', k.id)
  status = 'cancelled'
end
forget(k)
redis.call('PUBLISH', k.changed, k.id)
return status
