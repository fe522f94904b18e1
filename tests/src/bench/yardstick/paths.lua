-- GETs the paths listed in the file EVENTPLANE_WRK_PATHS, one per line. Each
-- thread takes its own share of the lines (every EVENTPLANE_WRK_THREADS-th),
-- in order, and starts over when it reaches the end. (wrk runs each thread's
-- init before it sets up the next thread, so the count comes from outside.)
local nthreads = tonumber(os.getenv("EVENTPLANE_WRK_THREADS"))
local mine = {}
local i = 0

function init(args)
   local file = assert(io.open(os.getenv("EVENTPLANE_WRK_PATHS"), "r"))
   local line_no = 0
   for line in file:lines() do
      if line_no % nthreads == tid then
         mine[#mine + 1] = line
      end
      line_no = line_no + 1
   end
   file:close()
   assert(#mine > 0, "no paths for this thread")
end

function request()
   i = i % #mine + 1
   return wrk.format("GET", mine[i])
end
