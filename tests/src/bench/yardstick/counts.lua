-- Shared by every Eventplane wrk script: counts each response by status and
-- by the cache layer that answered, and prints one JSON line at the end so
-- the bench counts what really happened rather than what wrk assumes.
local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

statuses = {}
layers = {}

function response(status, headers, body)
   local s = tostring(status)
   statuses[s] = (statuses[s] or 0) + 1
   local layer = headers["eventplane-cache"] or headers["Eventplane-Cache"]
   if layer then
      layers[layer] = (layers[layer] or 0) + 1
   end
end

local function add(into, from)
   for k, v in pairs(from or {}) do
      into[k] = (into[k] or 0) + v
   end
end

local function object(t)
   local parts = {}
   for k, v in pairs(t) do
      parts[#parts + 1] = string.format("%q:%d", k, v)
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
   local all_statuses, all_layers = {}, {}
   for _, t in ipairs(threads) do
      add(all_statuses, t:get("statuses"))
      add(all_layers, t:get("layers"))
   end
   -- The bench's percentile grid (fine enough to merge runs from, finest
   -- in the tail), comma-separated.
   local grid = {}
   for p in string.gmatch(os.getenv("EVENTPLANE_WRK_PERCENTILES"), "[^,]+") do
      grid[#grid + 1] = tonumber(p)
   end
   local points = {}
   for _, p in ipairs(grid) do
      local v = (p == 100) and latency.max or latency:percentile(p)
      points[#points + 1] = string.format("[%.4f,%d]", p, v)
   end
   local e = summary.errors
   io.write(string.format(
      'EVENTPLANE_WRK {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"statuses":%s,"layers":%s,"latency_us":[%s]}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
      object(all_statuses), object(all_layers), table.concat(points, ",")))
end
