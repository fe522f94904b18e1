-- Argo CD health check of Eventplane's Projection and PartitionPolicy
-- (resource.customizations.health.eventplane.io_Projection and
-- ..._PartitionPolicy in argocd-cm). It reads what the operator reports,
-- following kstatus: observedGeneration, then Stalled / Degraded, Ready and
-- Reconciling.
--   Progressing  the operator has not seen the current spec yet, or is
--                working on it (building, catching up, swapping)
--   Degraded     Stalled (it cannot go on without a change) or Degraded
--                (a failed rebuild, a halted projector) is True
--   Healthy      Ready is True for the current generation
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason or c.type
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status and obj.status.observedGeneration
if obj.status == nil or observed == nil or (generation ~= nil and observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation or "?")
  return hs
end

-- A condition written for an older generation says nothing about this one.
local function holds(kind)
  local c = condition(kind)
  if c == nil or c.status ~= "True" then
    return nil
  end
  if generation ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
    return nil
  end
  return c
end

local stalled = holds("Stalled")
if stalled ~= nil then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end
local degraded = holds("Degraded")
if degraded ~= nil then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
local reconciling = holds("Reconciling")
if reconciling ~= nil then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end
local ready = holds("Ready")
if ready ~= nil then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
-- Not ready, but nothing says it is stuck (a database that does not answer
-- yet): the operator retries.
hs.status = "Progressing"
local notReady = condition("Ready")
if notReady ~= nil and notReady.status ~= "True" then
  hs.message = describe(notReady)
else
  hs.message = "Waiting for the operator to report Ready at generation " .. tostring(generation or "?")
end
return hs
