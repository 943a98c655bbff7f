-- Mixed load for the soak: every BENCH_CREATE_EVERY-th request (default 4) is a create
-- (POST /runway/tasks), the others poll BENCH_TASK_ID (GET /runway/tasks/{id}).
-- wrk -s bench/wrk_mixed.lua URL   (BENCH_KEY, BENCH_TASK_ID required; BENCH_BODY optional)
local body = os.getenv("BENCH_BODY") or '{"taskType":"gen2","internal":false,"options":{"name":"bench","gen2Options":{"mode":"gen2","seed":1,"interpolate":false,"upscale":false,"watermark":false,"motion_score":22,"use_motion_score":true,"use_motion_vectors":false,"text_prompt":"The wind blows hair up."},"exploreMode":false,"assetGroupName":"Generative Video"}}'
local every = tonumber(os.getenv("BENCH_CREATE_EVERY") or "4")
local auth = "Bearer " .. (os.getenv("BENCH_KEY") or "")
local poll_path = "/runway/tasks/" .. (os.getenv("BENCH_TASK_ID") or "missing")
local create_headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
local poll_headers = {["Authorization"] = auth}
local n = 0

function request()
  n = n + 1
  if n % every == 0 then
    return wrk.format("POST", "/runway/tasks", create_headers, body)
  end
  return wrk.format("GET", poll_path, poll_headers, nil)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_timeout":%d,"errors_status":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
