-- wrk script for bench/scenarios/flood.py: cycles through the requests of a spec file and counts the
-- answers by status, so a run reports its status-code mix, not just "non-2xx".
--
--   wrk -s bench/wrk/flood.lua URL -- SPEC_FILE
--
-- SPEC_FILE: one request a line, tab-separated: METHOD, PATH, KEY, BODY (BODY may be empty).
-- KEY is sent as `Authorization: Bearer KEY`; `-` sends none; `@random` a fresh random key per request
-- (shaped like Kiln's, so the server has to look it up). The summary is one line on stdout:
--   KILN {"requests": …, "status": {"429": …}, "retry_after_missing": …, "latency_us": {…}, …}

local threads = {}
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads)
end

local function split(line)
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do
    fields[#fields + 1] = field
  end
  return fields
end

local function build(spec, key)
  local headers = {}
  if key ~= "-" then
    headers["Authorization"] = "Bearer " .. key
  end
  if spec.body then
    headers["Content-Type"] = "application/json"
  end
  return wrk.format(spec.method, spec.path, headers, spec.body)
end

local function random_key()
  local chars = {}
  for n = 1, 43 do
    local at = math.random(1, #alphabet)
    chars[n] = alphabet:sub(at, at)
  end
  return "kiln-" .. table.concat(chars)
end

function init(args)
  specs = {}
  for line in io.lines(args[1]) do
    if line ~= "" then
      local f = split(line)
      local spec = { method = f[1], path = f[2], key = f[3] }
      if f[4] and f[4] ~= "" then
        spec.body = f[4]
      end
      if spec.key ~= "@random" then
        spec.request = build(spec, spec.key)
      end
      specs[#specs + 1] = spec
    end
  end
  math.randomseed(os.time() * 100 + (thread_no or 0))
  counts = {}
  retry_after_missing = 0
  quota_exceeded = 0
  next_spec = (thread_no or 0) % #specs
end

function request()
  next_spec = next_spec % #specs + 1
  local spec = specs[next_spec]
  return spec.request or build(spec, random_key())
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if status == 429 or status == 503 then
    local found = false
    for name, _ in pairs(headers) do
      if name:lower() == "retry-after" then
        found = true
      end
    end
    if not found then
      retry_after_missing = retry_after_missing + 1
    end
    if status == 429 and body and body:find("quota_exceeded", 1, true) then
      quota_exceeded = quota_exceeded + 1
    end
  end
end

function done(summary, latency, requests)
  local total, missing, quota = {}, 0, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts") or {}) do
      total[status] = (total[status] or 0) + n
    end
    missing = missing + (thread:get("retry_after_missing") or 0)
    quota = quota + (thread:get("quota_exceeded") or 0)
  end
  local mix = {}
  for status, n in pairs(total) do
    mix[#mix + 1] = string.format('"%d": %d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'KILN {"requests": %d, "duration_us": %d, "status": {%s}, "retry_after_missing": %d, ' ..
    '"quota_exceeded": %d, "errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, table.concat(mix, ", "), missing, quota,
    e.connect, e.read, e.write, e.timeout,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
    math.floor(latency:percentile(99)), math.floor(latency.max), latency.mean))
end
