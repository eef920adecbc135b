-- ARGV: prefix, job id, now. Marks a queued job running; 1 if the job is live.
local k = job_keys(ARGV[1], ARGV[2])
local status = redis.call('HGET', k.job, 'status')
if status == 'queued' then
  redis.call('HSET', k.job, 'status', 'running', 'started_at', ARGV[3])
  redis.call('PUBLISH', k.changed, k.id)
end
return is_live(status) and 1 or 0
