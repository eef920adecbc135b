-- ARGV: prefix, job id, now, ttl. Returns the job's status afterwards, or nil.
local k = job_keys(ARGV[1], ARGV[2])
local status = redis.call('HGET', k.job, 'status')
if is_live(status) then
  finish(k, 'cancelled', ARGV[3], tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[1] .. ':cancelled', k.id)
  return 'cancelled'
end
return status
