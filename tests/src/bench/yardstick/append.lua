-- Appends one OrderPlaced event to a new stream per request: stream ids never
-- repeat (run id, thread, counter), so every request is a real append and a
-- 409 would show up as such in the status counts.
local run = os.getenv("EVENTPLANE_WRK_RUN") or "w"
local n = 0
local headers = { ["Content-Type"] = "application/json" }

function request()
   n = n + 1
   local id = string.format("%s-%d-%d", run, tid, n)
   local body = string.format(
      '{"expectedVersion":"no_stream","events":[{"type":"OrderPlaced","data":{"orderId":"%s","customerId":"c-%d","total":"%d.%02d"}}]}',
      id, n % 1000, 10 + n % 90, n % 100)
   return wrk.format("POST", "/v1/streams/order-" .. id .. "/events", headers, body)
end
