-- Runs the Argo CD health check (the script given as the first argument)
-- against sample Projection and PartitionPolicy objects, as Argo CD does:
-- the object in the global `obj`, the script's return value the health.
--   lua5.4 tests/argocd/health_test.lua charts/eventplane/argocd/health.lua
local script = assert(arg[1], "usage: health_test.lua HEALTH_SCRIPT")

local function health(object)
  local env = setmetatable({obj = object}, {__index = _G})
  local chunk = assert(loadfile(script, "t", env))
  return chunk()
end

local function cond(kind, status, reason, message, observed)
  return {type = kind, status = status, reason = reason, message = message or "",
          observedGeneration = observed, lastTransitionTime = "2026-12-01T10:00:00Z"}
end

local function projection(generation, observed, conditions)
  local status = nil
  if observed ~= false then
    status = {observedGeneration = observed, phase = "Ready", conditions = conditions}
  end
  return {apiVersion = "eventplane.io/v1alpha1", kind = "Projection",
          metadata = {name = "orders", namespace = "shop", generation = generation},
          status = status}
end

local function settled(generation, ready, reconciling, stalled, degraded, reason, message)
  return {
    cond("Ready", ready, ready == "True" and "VersionCurrent" or reason, ready == "True" and "" or message, generation),
    cond("Reconciling", reconciling, reconciling == "True" and reason or "Reconciled", reconciling == "True" and message or "", generation),
    cond("Stalled", stalled, stalled == "True" and reason or "Reconciled", stalled == "True" and message or "", generation),
    cond("Degraded", degraded, degraded == "True" and reason or "Reconciled", degraded == "True" and message or "", generation),
  }
end

local cases = {
  {"no status yet", projection(1, false, nil), "Progressing", "observe generation 1"},
  {"status of an older generation", projection(3, 2, settled(2, "True", "False", "False", "False")), "Progressing", "generation 3"},
  {"rebuilding", projection(2, 2, settled(2, "False", "True", "False", "False", "Rebuilding", "Job orders-rebuild-v2 is loading version 2")), "Progressing", "Rebuilding: Job orders-rebuild-v2"},
  {"catching up", projection(2, 2, settled(2, "False", "True", "False", "False", "CatchingUp", "version 2 is 120 events behind")), "Progressing", "CatchingUp"},
  {"ready at the current generation", projection(2, 2, settled(2, "True", "False", "False", "False")), "Healthy", "VersionCurrent"},
  {"rebuild failed: stalled", projection(2, 2, settled(2, "False", "False", "True", "True", "RebuildFailed", "rebuild Job orders-rebuild-v2 of version 2 failed")), "Degraded", "RebuildFailed: rebuild Job"},
  {"declaration refused: stalled", projection(1, 1, settled(1, "False", "False", "True", "False", "DeclarationRefused", "table orders belongs to another projection")), "Degraded", "DeclarationRefused"},
  {"ready but the projector halted", projection(1, 1, settled(1, "True", "False", "False", "True", "ProjectionHalted", "the live projector stopped on an event")), "Degraded", "ProjectionHalted"},
  {"a Ready condition left from an older generation", projection(3, 3, {cond("Ready", "True", "VersionCurrent", "", 2)}), "Progressing", "Ready at generation 3"},
  {"database unreachable, retrying", projection(1, 1, settled(1, "False", "False", "False", "False", "DatabaseUnreachable", "connection refused")), "Progressing", "DatabaseUnreachable"},
  {"partition policy current", {kind = "PartitionPolicy", metadata = {generation = 4},
     status = {observedGeneration = 4, conditions = {cond("Ready", "True", "PartitionsCurrent", "12 partitions", 4),
       cond("Reconciling", "False", "Reconciled", "", 4), cond("Stalled", "False", "Reconciled", "", 4)}}}, "Healthy", "PartitionsCurrent"},
  {"partition policy with a missing Secret", {kind = "PartitionPolicy", metadata = {generation = 1},
     status = {observedGeneration = 1, conditions = {cond("Ready", "False", "SecretNotFound", "Secret eventplane-db not found", 1),
       cond("Stalled", "True", "SecretNotFound", "Secret eventplane-db not found", 1)}}}, "Degraded", "SecretNotFound"},
  {"partition policy applying DDL", {kind = "PartitionPolicy", metadata = {generation = 2},
     status = {observedGeneration = 2, conditions = {cond("Ready", "False", "LockBusy", "another runner holds the lock", 2),
       cond("Reconciling", "True", "LockBusy", "another runner holds the lock", 2)}}}, "Progressing", "LockBusy"},
}

local failures = 0
for _, case in ipairs(cases) do
  local name, object, want, message = case[1], case[2], case[3], case[4]
  local got = health(object)
  local ok = got.status == want and got.message ~= nil and string.find(got.message, message, 1, true) ~= nil
  if ok then
    print("ok   " .. name .. ": " .. got.status .. " (" .. got.message .. ")")
  else
    failures = failures + 1
    print("FAIL " .. name .. ": want " .. want .. " with '" .. message .. "', got " ..
          tostring(got.status) .. " (" .. tostring(got.message) .. ")")
  end
end
print(string.format("%d cases, %d failed", #cases, failures))
os.exit(failures == 0)
