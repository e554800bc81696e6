-- Argo CD health check for finetune.dev/FineTuneJob (see docs/gitops.md for where it goes).
-- Argo CD runs this with gopher-lua (Lua 5.1): no integer division, goto or bitwise operators.
-- Input: `obj`, the live FineTuneJob. Output: {status = Healthy|Progressing|Degraded|Suspended, message}.
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function progress(status)
  if status.epoch ~= nil and status.totalEpochs ~= nil then
    local text = string.format("epoch %d/%d", status.epoch, status.totalEpochs)
    if status.valMetric ~= nil and status.valMetricName ~= nil then
      text = text .. string.format(", %s %.4g", status.valMetricName, status.valMetric)
    end
    return text
  end
  return nil
end

local function describe(status, fallback)
  local text = status.message
  if text == nil or text == "" then
    text = fallback
  end
  if status.reason ~= nil and status.reason ~= "" then
    text = status.reason .. ": " .. text
  end
  return text
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to accept the job"
  return hs
end

-- A spec edit the operator has not acted on yet: whatever the phase says is about the old spec.
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. string.format("%d", generation)
  return hs
end

local invalid = condition(status, "Valid")
if invalid ~= nil and invalid.status == "False" then
  hs.status = "Degraded"
  hs.message = "Invalid spec: " .. (invalid.message or invalid.reason or "")
  return hs
end

local refused = condition(status, "SpecChangeRefused")
if refused ~= nil and refused.status == "True" then
  -- Git asks for a change the running job cannot take (model, data, ...): the live job differs from Git.
  hs.status = "Degraded"
  hs.message = "Spec change refused: " .. (refused.message or refused.reason or "")
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  local text = describe(status, "Training finished")
  if status.bestMetric ~= nil and status.bestEpoch ~= nil then
    text = text .. string.format(" (best %.4g at epoch %d)", status.bestMetric, status.bestEpoch)
  end
  hs.message = text
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status, "Training failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(status, "Job is suspended (spec.suspend or a queue)")
elseif phase == "Running" then
  hs.status = "Progressing"
  local text = progress(status) or "Training"
  local stopping = condition(status, "EarlyStopRequested")
  if stopping ~= nil and stopping.status == "True" then
    text = text .. "; stopping early: " .. (stopping.message or stopping.reason or "")
  end
  hs.message = text
elseif phase == "Pending" then
  hs.status = "Progressing"
  hs.message = describe(status, "Waiting for training pods")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
