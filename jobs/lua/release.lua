-- Puts items back at the end of the work stream, for any replica, and acknowledges the
-- deliveries they replace. A second run (a retry after a late answer) finds them
-- acknowledged and adds nothing.
for pos = TAIL, #ARGV, 4 do
  if redis.call('XACK', WORK, A.group, ARGV[pos]) == 1 then
    redis.call('XADD', WORK, '*', 'job', ARGV[pos + 1], 'index', ARGV[pos + 2],
      'task', ARGV[pos + 3])
    redis.call('XDEL', WORK, ARGV[pos])
  end
end
return 1
