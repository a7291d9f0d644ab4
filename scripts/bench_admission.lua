-- wrk script of scripts/bench_admission_load.py: admission requests spread over many runs.
--
-- wrk is not a Python package: install it with `sudo apt-get install -y wrk` (Debian, Ubuntu).
-- The benchmark script runs it as
--
--   MC_BENCH_KEY=mc_... MC_BENCH_RUNS=runs.txt MC_BENCH_OUT=out.json \
--     wrk -t2 -c250 -d4s --timeout 10s -s scripts/bench_admission.lua http://127.0.0.1:PORT
--
-- MC_BENCH_RUNS names a file of run ids, one a line; with MC_BENCH_PATH set (for example
-- /bare) every request goes to that path instead, for the bare-server floors. At the end the
-- script writes one JSON document to MC_BENCH_OUT: latency percentiles (microseconds), the
-- count of every status, socket errors, and the decision id of every 200 answer, so the caller
-- can check that each one is durable.

local key = os.getenv("MC_BENCH_KEY") or ""
local fixed_path = os.getenv("MC_BENCH_PATH")
local runs = {}
if not fixed_path then
  for line in io.lines(os.getenv("MC_BENCH_RUNS")) do
    if #line > 0 then runs[#runs + 1] = line end
  end
end
-- Two tokens a step: thousands of admissions per run stay far below every budget, so each
-- answer is an allow and no violation work is mixed into what is measured.
local body = '{"step_index":1,"kind":"llm_call","model":"gpt-4o-mini",'
  .. '"estimate":{"input_tokens":1,"max_output_tokens":1}}'
local headers = {
  ["Authorization"] = "Bearer " .. key,
  ["Content-Type"] = "application/json",
}

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  ids = {}
  sent = 0
end

function request()
  sent = sent + 1
  local path = fixed_path
  if not path then
    -- Threads start at different runs and walk the list, so runs are hit evenly.
    local i = (sent * 7 + thread_index * 1009) % #runs + 1
    path = "/v1/runs/" .. runs[i] .. "/admissions"
  end
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, resp_body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 and not fixed_path then
    local id = string.match(resp_body, '"decision_id"%s*:%s*"([^"]+)"')
    if id then ids[#ids + 1] = id end
  end
end

local function json_list(items)
  local quoted = {}
  for i, v in ipairs(items) do quoted[i] = '"' .. v .. '"' end
  return "[" .. table.concat(quoted, ",") .. "]"
end

function done(summary, latency, requests)
  local all_statuses = {}
  local all_ids = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      all_statuses[status] = (all_statuses[status] or 0) + n
    end
    for _, id in ipairs(thread:get("ids")) do all_ids[#all_ids + 1] = id end
  end
  local status_parts = {}
  for status, n in pairs(all_statuses) do
    status_parts[#status_parts + 1] = string.format('"%d": %d', status, n)
  end
  local e = summary.errors
  local out = io.open(os.getenv("MC_BENCH_OUT"), "w")
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "statuses": {%s}, "errors": {"connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d}, "decision_ids": %s}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, table.concat(status_parts, ", "), e.connect, e.read,
    e.write, e.status, e.timeout, json_list(all_ids)))
  out:close()
end
