-- Reads up to A.count new items with their inputs in one round trip: {entry id, job id,
-- index, task, input or nil} each. Never blocks.
local reply = redis.call('XREADGROUP', 'GROUP', A.group, A.consumer, 'COUNT', A.count,
  'STREAMS', WORK, '>')
local taken = {}
if not reply then
  return taken
end
for _, entry in ipairs(reply[1][2]) do
  local fields = {}
  for pos = 1, #entry[2], 2 do
    fields[entry[2][pos]] = entry[2][pos + 1]
  end
  local data = redis.call('HGET', A.prefix .. ':job:' .. fields.job .. ':data', fields.index)
  table.insert(taken, {entry[1], fields.job, fields.index, fields.task or '', data})
end
return taken
