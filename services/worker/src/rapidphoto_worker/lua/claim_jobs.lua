-- claim_jobs: arq's start-of-job checks for a batch of queued jobs, in one round trip.
-- KEYS: the queue (sorted set), then arq:in-progress:<id> for each job id, in order
-- ARGV: now_ms, in-progress ttl_ms, then the job ids, in order
-- Reply: {id, score, id, score, ...} for the jobs this worker now holds.
--
-- Per job, exactly what arq.worker.Worker.start_jobs checks: still queued, due (score <= now; a job
-- deferred by Retry has a future score), and not held by another worker (no in-progress key); then
-- hold it by creating the in-progress key with arq's TTL. Stock arq workers on the same queue take
-- jobs by creating the same key (under WATCH, which a script's write aborts), so no job runs twice.
local now, ttl = tonumber(ARGV[1]), ARGV[2]
local claimed = {}
for i = 2, #KEYS do
  local job_id = ARGV[i + 1]
  local score = redis.call('ZSCORE', KEYS[1], job_id)
  if score and tonumber(score) <= now and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('SET', KEYS[i], '1', 'PX', ttl)
    claimed[#claimed + 1] = job_id
    claimed[#claimed + 1] = score
  end
end
return claimed
