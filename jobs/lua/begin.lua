-- Marks a queued job running; 1 if the job is live.
local k = job_keys(A.prefix, A.id)
local status = redis.call('HGET', k.job, 'status')
if status == QUEUED then
  redis.call('HSET', k.job, 'status', RUNNING, 'started_at', A.now)
  redis.call('PUBLISH', k.changed, k.id)
end
return is_live(status) and 1 or 0
