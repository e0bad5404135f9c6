-- wrk script for the veil benchmark: POST a JSON chat completion body and, when done,
-- print one machine-readable line "BENCH_JSON {...}" with requests, duration, latency
-- percentiles (microseconds) and error counts.
--
-- Environment:
--   BENCH_BODY_FILE  path of the request body (preferred), or
--   BENCH_BODY       the request body itself
--   BENCH_API_KEY    sent as "Authorization: Bearer <key>" (optional)
--
-- Example:
--   BENCH_BODY_FILE=body.json BENCH_API_KEY=sk-veil-x \
--     wrk -t1 -c16 -d10s -s bench/wrk_post.lua http://127.0.0.1:8000/v1/chat/completions

local body_file = os.getenv("BENCH_BODY_FILE")
local body = os.getenv("BENCH_BODY")
if body_file and body_file ~= "" then
  local fh = assert(io.open(body_file, "rb"))
  body = fh:read("*a")
  fh:close()
end
assert(body, "set BENCH_BODY_FILE or BENCH_BODY")

-- A body holding the marker __BENCH_SEQ__ gets it replaced, in every request, by a value
-- unique to this run, thread and request (for loads that must never repeat a request,
-- such as a cache's miss path).
local MARKER = "__BENCH_SEQ__"
if body:find(MARKER, 1, true) then
  local urandom = assert(io.open("/dev/urandom", "rb"))
  local salt = urandom:read(6):gsub(".", function(c) return string.format("%02x", c:byte()) end)
  urandom:close()
  local seq = 0
  local template = body
  function request()
    seq = seq + 1
    return wrk.format(nil, nil, nil, (template:gsub(MARKER, salt .. "-" .. seq, 1)))
  end
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_API_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
