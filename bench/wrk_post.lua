-- POST a gen2 create with a bearer key: wrk -s bench/wrk_post.lua URL/runway/tasks
-- BENCH_KEY: the bearer key (required); BENCH_BODY: the JSON body (default: a documented gen2 body).
-- done() prints one `BENCH_JSON {...}` line that bench/run.py reads.
local body = os.getenv("BENCH_BODY") or '{"taskType":"gen2","internal":false,"options":{"name":"bench","gen2Options":{"mode":"gen2","seed":1,"interpolate":false,"upscale":false,"watermark":false,"motion_score":22,"use_motion_score":true,"use_motion_vectors":false,"text_prompt":"The wind blows hair up."},"exploreMode":false,"assetGroupName":"Generative Video"}}'
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_timeout":%d,"errors_status":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
