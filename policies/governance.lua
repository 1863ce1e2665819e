-- governance: data residency. A request only ever goes to a backend in the caller's
-- region (req.region, from header x-switchyard-region or the tenant's region): a backend
-- whose `region` equals it or starts with it and a dash ("eu" covers "eu-west").
-- params.allowed_regions (a list) widens that for every caller on the route.
-- Inside the region, backends are tried in order of tag `priority` (lowest first, then
-- fewest in flight): an ordered failover that never leaves the region.
--
-- When every in-region backend is down the answer is 503 (retry later), never another
-- region; with no in-region backend configured it is 403. A request without a region is
-- refused (400) when params.require_region is true, else routed like least_inflight.
-- (Rust also enforces each tenant's allowed regions, whatever this script returns.)

local P = { name = "governance" }

local function in_region(b, region, allowed)
  local r = b.region
  if r == nil then return false end
  if r == region or string.sub(r, 1, #region + 1) == region .. "-" then return true end
  for _, a in ipairs(allowed) do
    if r == a or string.sub(r, 1, #a + 1) == a .. "-" then return true end
  end
  return false
end

local function order_of(list)
  table.sort(list, function(a, b)
    local pa, pb = tonumber(a.tags.priority) or 1000, tonumber(b.tags.priority) or 1000
    if pa ~= pb then return pa < pb end
    if a.inflight ~= b.inflight then return a.inflight < b.inflight end
    return a.name < b.name
  end)
  local names = {}
  for i, b in ipairs(list) do names[i] = b.name end
  return names
end

function P.route(req, backends)
  local params = req.params or {}
  local region = req.region
  if region == nil then
    if params.require_region then
      return nil, 400, "this route requires a caller region (header x-switchyard-region)"
    end
    return order_of(backends)
  end
  local allowed = params.allowed_regions or {}
  local here = {}
  for _, b in ipairs(backends) do
    if in_region(b, region, allowed) then here[#here + 1] = b end
  end
  if #here > 0 then return order_of(here) end
  for _, b in ipairs(sy.backends({ model = req.model, all = true })) do
    if in_region(b, region, allowed) then
      return nil, 503, "no backend in region " .. region .. " is available; retry later"
    end
  end
  return nil, 403, "no backend in region " .. region .. " serves this model"
end

P.tests = {
  { name = "only the caller's region, by priority", req = { model = "m", region = "eu" },
    backends = {
      { name = "us-1", region = "us-east" },
      { name = "eu-2", region = "eu-west", tags = { priority = "2" } },
      { name = "eu-1", region = "eu-central", tags = { priority = "1" } },
    },
    expect = { "eu-1", "eu-2" } },
  { name = "no region given and none required", req = { model = "m" },
    backends = { { name = "a", inflight = 2 }, { name = "b" } }, expect = { "b", "a" } },
  { name = "region required", req = { model = "m", params = { require_region = true } },
    backends = { { name = "a" } }, expect = { status = 400 } },
  { name = "the region's backends are all down: 503, not another region",
    req = { model = "m", region = "eu" },
    backends = { { name = "us-1", region = "us-east" } },
    unavailable = { { name = "eu-1", region = "eu-west", why_not = "ejected" } },
    expect = { status = 503 } },
  { name = "no backend in the region at all: 403", req = { model = "m", region = "eu" },
    backends = { { name = "us-1", region = "us-east" } },
    unavailable = { { name = "ap-1", region = "ap-south" } },
    expect = { status = 403 } },
}

return P
