//! One sandboxed Lua 5.4 VM: the globals a policy may see, the instruction budget and
//! memory cap, loading policy files, and calling `route`.
//!
//! The sandbox is built from an empty environment, not by deleting from the standard one:
//! a policy sees read-only copies of `table`, `string` (without `dump`), `math`, `utf8`, a
//! handful of base functions, and `sy`. Its globals are read-only, so the only state a
//! policy keeps is in the locals of its file (one copy per worker thread).

use foldhash::HashMap;
use std::sync::Arc;

use mlua::{chunk::ChunkMode, ffi, Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value};

use super::tables::{NameIndex, TableCache};
use super::{budget, call, patterns, sy, Decision, Policy, PolicyError};
use crate::backends::{Backend, BackendSet};
use crate::config::LuaConfig;
use crate::request::RequestMeta;
use crate::routes::Params;

/// Trusted Lua that builds read-only views and calls `route`; runs with the real globals,
/// never a policy's.
const HELPERS: &str = r#"
local setmetatable, next, error, tostring, lower = setmetatable, next, error, tostring, string.lower
-- Each call leaves a little short-lived garbage (the candidate array, the answer): the
-- generational collector handles that for less than the incremental one.
collectgarbage("generational")
local H = {}
-- C loops the instruction budget cannot see (it counts Lua instructions), made short: an
-- empty string repeated (`string.rep("", 1e15)` would run for days; any other huge
-- repetition meets the memory cap at once) and moves of huge ranges.
do
  -- Numbers may come as strings ("1e15"): Lua converts them, so the checks do too.
  local rep, move, tonumber = string.rep, table.move, tonumber
  string.rep = function(s, n, sep)
    if s == "" and (sep == nil or sep == "") and tonumber(n) then return "" end
    return rep(s, n, sep)
  end
  table.move = function(a1, f, e, t, a2)
    local first, last = tonumber(f), tonumber(e)
    if first and last and last - first + 1 >= 1e6 then
      error("table.move of a million elements or more", 2)
    end
    return move(a1, f, e, t, a2)
  end
end
local function deny(_, k)
  error("attempt to modify a read-only table (key '" .. tostring(k) .. "')", 2)
end
-- Calls `sample` after every garbage collection cycle: each object's finalizer makes the
-- next first, so an error in `sample` (Lua turns errors in finalizers into warnings, and
-- drops them) cannot end the chain; only failing to allocate the next object at the
-- memory cap can (when the policy's own next allocation almost always fails too, and a
-- VM that hits its cap is rebuilt). (Lua makes none while the VM
-- closes.) `sample`, a Rust function, is kept in `H` so that it is never garbage itself:
-- finalized in the same cycle as the object, it would be gone when the next one calls it.
function H.after_every_gc(sample)
  H.gc_sample = sample
  local mt = {}
  mt.__gc = function() setmetatable({}, mt); H.gc_sample() end
  setmetatable({}, mt)
end
-- The `req` a policy gets: read-only like the others, with `tokens` and `session` not
-- stored in `t` but worked out when read (`lazy(k)` is a Rust function); `pairs` lists
-- them last (`session` only when the request has one).
local LAZY, IS_LAZY = { "tokens", "session" }, {}
for _, k in ipairs(LAZY) do IS_LAZY[k] = true end
function H.request(t, lazy)
  setmetatable(t, { __index = function(_, k)
    if IS_LAZY[k] then return lazy(k) end
  end })
  return H.readonly(t, function()
    local i = 0 -- LAZY fields listed so far, once `t` is walked
    local function step(_, k)
      if i == 0 then
        local nk, nv = next(t, k)
        if nk ~= nil then return nk, nv end
      end
      while i < #LAZY do
        i = i + 1
        local v = lazy(LAZY[i])
        if v ~= nil then return LAZY[i], v end
      end
      return nil
    end
    return step, nil, nil
  end)
end
-- `pcall` for policies: Lua's own, except that running out of instructions or memory is
-- not caught (`fatal`, given the error value, raises those again), so
-- `while true do pcall(f) end` cannot outlive its budget.
function H.pcall(fatal)
  local pcall = pcall
  local function pass(ok, ...)
    if not ok then fatal((...)) end
    return ok, ...
  end
  return function(f, ...) return pass(pcall(f, ...)) end
end
-- A read-only view of `t`; `pairs` walks `t`, or calls `walk` when given. The walk's
-- state is never `t` itself: `pairs` hands its state to the caller, who could write
-- through it (and so change what later calls, and other policies, see).
function H.readonly(t, walk)
  return setmetatable({}, {
    __index = t, __newindex = deny, __metatable = false,
    __pairs = walk or function() return function(_, k) return next(t, k) end, nil, nil end,
    __len = function() return #t end,
  })
end
function H.env(globals)
  return setmetatable({}, {
    __index = globals, __metatable = false,
    __newindex = function(_, k)
      error("globals are read-only; keep state in a local (assigning '" .. tostring(k) .. "')", 2)
    end,
  })
end
local function copy(t)
  local r = {}
  for k, v in next, t do r[k] = v end
  return r
end
-- A read-only copy of `t` and of the tables in it, as a route's `params` are in service.
local function frozen(t)
  local r = {}
  for k, v in next, t do r[k] = type(v) == "table" and frozen(v) or v end
  return H.readonly(r)
end
-- A `req` for a policy test case: the case's fields over the defaults a real request has.
function H.test_request(t)
  local r = copy(t or {})
  local headers = {}
  for k, v in next, (r.headers or {}) do headers[lower(k)] = v end
  r.headers = nil
  if r.tokens == nil then r.tokens = 0 end
  if r.stream == nil then r.stream = false end
  r.tenant = r.tenant or "anonymous"
  r.path = r.path or "/v1/chat/completions"
  if r.format == nil then
    local p = r.path
    r.format = (p == "/v1/messages" or p:sub(1, 13) == "/v1/messages/") and "anthropic" or "openai"
  end
  r.method = r.method or "POST"
  r.priority = r.priority or 0
  -- In service `params` is always a table, empty when the route gives none.
  r.params = frozen(r.params or {})
  r.header = function(name) return headers[lower(name)] end
  return H.readonly(r)
end
-- A backend entry for a policy test case, with the defaults of an idle backend; with
-- `listed`, as `sy.backends` lists it: "eligible" (one of the case's `backends`), or
-- "unavailable" (one of its `unavailable`: why not, "unhealthy" unless it says).
function H.test_backend(t, listed)
  local b = copy(t)
  if listed == "eligible" then
    b.eligible, b.why_not = true, nil
  elseif listed == "unavailable" then
    b.eligible, b.why_not = false, b.why_not or "unhealthy"
    if b.healthy == nil then b.healthy = b.why_not ~= "unhealthy" end
  end
  b.provider = b.provider or "openai"
  b.weight = b.weight or 1
  b.tags = H.readonly(b.tags or {})
  local models = {}
  for k, v in next, (b.models or {}) do
    if type(k) == "number" then models[v] = true else models[k] = v end
  end
  b.models = H.readonly(models)
  for _, f in next, { "cost_in", "cost_out", "max_inflight", "inflight", "latency_ms", "ttft_ms", "tps", "error_rate" } do
    if b[f] == nil then b[f] = 0 end
  end
  if b.healthy == nil then b.healthy = true end
  return H.readonly(b)
end
-- `sy.backends` in a policy test case: the case's `backends` and `unavailable` ones, as a
-- function of `sy.backends`' options. A backend without `models` serves every model.
function H.test_listing(offered, unavailable)
  local entries = {} -- { entry, serves every model }
  local function add(list, listed)
    for _, t in ipairs(list or {}) do
      entries[#entries + 1] = { H.test_backend(t, listed), t.models == nil }
    end
  end
  add(offered, "eligible")
  add(unavailable, "unavailable")
  return function(opts)
    local model, all = opts and opts.model, opts and opts.all
    local out = {}
    for _, e in ipairs(entries) do
      local b, any_model = e[1], e[2]
      if (all or b.eligible) and (model == nil or any_model or b.models[model] ~= nil) then
        out[#out + 1] = b
      end
    end
    return out
  end
end
return H
"#;

/// Base functions a policy may call, taken from the standard library as they are.
const SAFE_BASE: [&str; 9] = [
    "pairs", "ipairs", "next", "select", "type", "tostring", "tonumber", "error", "assert",
];
/// Libraries a policy may use, each as a read-only view.
const SAFE_LIBS: [&str; 4] = ["table", "string", "math", "utf8"];

/// What the `sy` helpers may know about the call in progress. Kept in the VM's app data
/// for its whole life; its fields are set for each call.
#[derive(Default)]
pub(super) struct CallContext {
    pub req: Option<Arc<RequestMeta>>,
    pub all: Option<Arc<BackendSet>>,
    /// In a policy test case, what `sy.backends` lists instead (`H.test_listing`).
    pub test_listing: Option<Function>,
    /// `name@version` of the policy running.
    pub policy: Arc<str>,
}

/// Versions of a policy a VM keeps loaded: the current one, and the one before it that
/// requests begun before a reload (queued for capacity, say) still decide with. Each
/// version keeps its own state (its file's locals), so a request of the old version does
/// not recompile it and reset the new one's, or the other way round.
const VERSIONS_KEPT: usize = 2;

struct Loaded {
    version: String,
    /// `name@version`.
    tag: Arc<str>,
    module: Table,
    route: Function,
}

/// A Lua VM with the sandbox, its limits and the policies loaded into it.
pub struct PolicyVm {
    lua: Lua,
    /// The Lua state calls run on, for the instruction budget's hook.
    state: *mut ffi::lua_State,
    limits: LuaConfig,
    globals: Table,
    helpers: Table,
    /// By policy name, the versions loaded, most recently loaded first (see
    /// [`VERSIONS_KEPT`]).
    loaded: HashMap<String, Vec<Loaded>>,
    tables: TableCache,
}

impl PolicyVm {
    pub fn new(limits: &LuaConfig) -> mlua::Result<PolicyVm> {
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
            LuaOptions::new(),
        )?;
        let real = lua.globals();
        // Strings index the real string library, so `dump` must go from it, not a copy,
        // and the budgeted pattern functions must replace Lua's in it.
        let string: Table = real.get("string")?;
        string.raw_set("dump", Value::Nil)?;
        // One policy seeding the VM's generator would fix what `math.random` gives every
        // other policy on the thread.
        real.get::<Table>("math")?
            .raw_set("randomseed", Value::Nil)?;
        patterns::install(&lua, &string)?;
        let helpers: Table = lua.load(HELPERS).set_name("=switchyard").eval()?;
        let readonly: Function = helpers.get("readonly")?;
        lua.set_named_registry_value("switchyard.readonly", &readonly)?;

        let safe = lua.create_table()?;
        for name in SAFE_BASE {
            safe.raw_set(name, real.get::<Value>(name)?)?;
        }
        for lib in SAFE_LIBS {
            let t: Table = real.get(lib)?;
            safe.raw_set(lib, readonly.call::<Table>(t)?)?;
        }
        safe.raw_set(
            "unpack",
            real.get::<Table>("table")?.get::<Value>("unpack")?,
        )?;
        safe.raw_set(
            "pcall",
            protected_call(&lua, &helpers, limits.memory_limit_bytes)?,
        )?;
        safe.raw_set("sy", readonly.call::<Table>(sy::build(&lua)?)?)?;
        safe.raw_set("_VERSION", real.get::<Value>("_VERSION")?)?;
        let globals = readonly.call::<Table>(safe)?;

        let state = budget::state_of(&lua)?;
        lua.set_app_data(sy::LogLimiter::default());
        lua.set_app_data(CallContext::default());
        helpers
            .get::<Function>("after_every_gc")?
            .call::<()>(memory_sampler(&lua, limits.memory_limit_bytes)?)?;
        // Set last: building the sandbox must never count against the policies' memory.
        lua.set_memory_limit(limits.memory_limit_bytes)?;

        let tables = TableCache::new(&lua, readonly, helpers.get("request")?)?;
        Ok(PolicyVm {
            lua,
            state,
            limits: limits.clone(),
            globals,
            helpers,
            loaded: HashMap::default(),
            tables,
        })
    }

    pub fn limits(&self) -> &LuaConfig {
        &self.limits
    }

    /// Run `policy`'s `route` for one request. The backends chosen are taken from `all`;
    /// at most `max_names` of a returned list are read.
    pub fn route(
        &mut self,
        policy: &Policy,
        req: &Arc<RequestMeta>,
        params: &Params,
        candidates: &[Arc<Backend>],
        all: &Arc<BackendSet>,
        max_names: usize,
    ) -> Result<Decision<Arc<Backend>>, PolicyError> {
        let version = self.ensure_loaded(policy)?;
        let loaded = &self.loaded[&policy.name][version];
        let lua_err = |e: mlua::Error| PolicyError::Runtime(e.to_string());
        // Our own table upkeep runs without the memory limit: with one, mlua makes every
        // table write a protected call, which costs more than the write. The limit is
        // for what policies allocate, and is back before `route` runs.
        let _ = self.lua.set_memory_limit(0);
        let prepared = self.tables.prepare(&self.lua, req, params, candidates, all);
        let _ = self.lua.set_memory_limit(self.limits.memory_limit_bytes);
        let args = prepared.map_err(lua_err)?;
        if let Some(mut ctx) = self.lua.app_data_mut::<CallContext>() {
            ctx.req = Some(req.clone());
            ctx.all = Some(all.clone());
            ctx.policy = loaded.tag.clone();
        }
        let result = budget::run(self.state, self.limits.instruction_budget, || {
            call::route(&self.lua, &loaded.route, &args, max_names)
        });
        if let Some(mut ctx) = self.lua.app_data_mut::<CallContext>() {
            ctx.req = None;
            ctx.all = None;
        }
        match result {
            Ok(call::Answer::Chosen(backends)) => Ok(Decision::Candidates(backends)),
            Ok(call::Answer::Values(values)) => chosen_backends(values, args.names, max_names),
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Call a `route` function for a policy test case under the instruction budget, with
    /// `sy.backends` answered by `listing` (`H.test_listing`), and read its whole decision.
    pub(super) fn call_test_case(
        &self,
        route: &Function,
        req: Table,
        backends: Table,
        listing: Function,
    ) -> Result<Decision, PolicyError> {
        if let Some(mut ctx) = self.lua.app_data_mut::<CallContext>() {
            ctx.test_listing = Some(listing);
        }
        let values = budget::run(self.state, self.limits.instruction_budget, || {
            route.call::<MultiValue>((req, backends))
        });
        if let Some(mut ctx) = self.lua.app_data_mut::<CallContext>() {
            ctx.test_listing = None;
        }
        decision_from(values.map_err(|e| self.classify(e))?, usize::MAX)
    }

    /// Load a version of a policy unless this VM already has it; returns where it is in
    /// `loaded[name]`.
    fn ensure_loaded(&mut self, policy: &Policy) -> Result<usize, PolicyError> {
        let kept = self
            .loaded
            .get(&policy.name)
            .and_then(|versions| versions.iter().position(|l| l.version == policy.version));
        if let Some(at) = kept {
            return Ok(at);
        }
        let loaded = match self.load(policy) {
            // What the versions kept hold counts against the VM's memory cap: when the
            // new one does not fit beside them, it is loaded alone (a late request of an
            // old one loads that again).
            Err(PolicyError::Memory(..))
                if self.loaded.get(&policy.name).is_some_and(|v| !v.is_empty()) =>
            {
                self.loaded.remove(&policy.name);
                let _ = self.lua.gc_collect();
                self.load(policy)?
            }
            loaded => loaded?,
        };
        let versions = self.loaded.entry(policy.name.clone()).or_default();
        versions.insert(0, loaded);
        versions.truncate(VERSIONS_KEPT);
        Ok(0)
    }

    /// The module table of a version of a policy, loaded unless this VM already has it.
    pub(super) fn module(&mut self, policy: &Policy) -> Result<Table, PolicyError> {
        let at = self.ensure_loaded(policy)?;
        Ok(self.loaded[&policy.name][at].module.clone())
    }

    fn load(&self, policy: &Policy) -> Result<Loaded, PolicyError> {
        let env: Table = self
            .helpers
            .get::<Function>("env")
            .and_then(|f| f.call(&self.globals))
            .map_err(|e| PolicyError::Load(e.to_string()))?;
        let chunk = self
            .lua
            .load(&policy.source)
            .set_name(format!("={}.lua", policy.name))
            .set_mode(ChunkMode::Text)
            .set_environment(env);
        let tag = policy.tag.clone();
        if let Some(mut ctx) = self.lua.app_data_mut::<CallContext>() {
            ctx.policy = tag.clone();
        }
        let value = budget::run(self.state, self.limits.instruction_budget, || {
            chunk.call::<Value>(())
        });
        let module = match value.map_err(|e| self.classify(e)) {
            Ok(Value::Table(t)) => t,
            Ok(other) => {
                return Err(PolicyError::Load(format!(
                    "the file must return a table with a route function, not {}",
                    describe_value(&other)
                )))
            }
            Err(PolicyError::Runtime(msg)) => return Err(PolicyError::Load(msg)),
            Err(e) => return Err(e),
        };
        let route = match module.get::<Value>("route") {
            Ok(Value::Function(f)) => f,
            _ => {
                return Err(PolicyError::Load(
                    "the returned table has no route(req, backends) function".into(),
                ))
            }
        };
        Ok(Loaded {
            version: policy.version.clone(),
            tag,
            module,
            route,
        })
    }

    /// The Lua state, for the test runner.
    pub(super) fn lua(&self) -> &Lua {
        &self.lua
    }

    pub(super) fn helper(&self, name: &str) -> mlua::Result<Function> {
        self.helpers.get(name)
    }

    fn classify(&self, e: mlua::Error) -> PolicyError {
        if budget::exhausted() {
            // The message is `file.lua:LINE: instruction budget exceeded` (or `time limit
            // exceeded`), raised where the call was stopped.
            let message = error_message(&e);
            let timed_out = budget::timed_out();
            let what = if timed_out {
                budget::OUT_OF_TIME
            } else {
                budget::EXCEEDED
            };
            let place = message
                .strip_suffix(what.to_str().expect("ASCII"))
                .unwrap_or_default()
                .trim_end_matches([':', ' '])
                .to_string();
            if timed_out {
                PolicyError::Time(budget::CALL_TIME_LIMIT.as_millis() as u64, place)
            } else {
                PolicyError::Budget(self.limits.instruction_budget, place)
            }
        } else if is_memory_error(&e) {
            PolicyError::Memory(
                self.limits.memory_limit_bytes,
                budget::take_noted_place().unwrap_or_default(),
            )
        } else {
            PolicyError::Runtime(error_message(&e))
        }
    }
}

/// `pcall` for policies (`H.pcall`): Lua's own, with every error value and message as
/// Lua gives them, except that the instruction budget and the memory cap are not catchable.
fn protected_call(lua: &Lua, helpers: &Table, memory_cap: usize) -> mlua::Result<Function> {
    let fatal = lua.create_function(move |lua, error: Value| {
        if budget::exhausted() {
            // Raised again as it came, with the place the call was stopped at.
            return Err(mlua::Error::runtime(match &error {
                Value::String(s) => s.to_string_lossy(),
                _ => budget::EXCEEDED.to_string_lossy().into_owned(),
            }));
        }
        let over_memory = match &error {
            // From a Rust function (a `sy` helper) that could not allocate.
            Value::Error(e) => is_memory_error(e),
            // Lua's own message for an allocation that failed; a policy raising the same
            // text itself is told apart by the memory it uses.
            Value::String(s) => {
                s.as_bytes() == b"not enough memory"
                    && lua.used_memory() + memory_cap / 16 >= memory_cap
            }
            _ => false,
        };
        if over_memory {
            return Err(mlua::Error::MemoryError("not enough memory".into()));
        }
        Ok(())
    })?;
    helpers.get::<Function>("pcall")?.call(fatal)
}

/// Called after each garbage collection: while the VM is past half its memory `cap`, notes
/// where the call in progress is. Lua raises running out of memory without running the
/// message handler, so that error has no place of its own; a call that allocates without
/// bound goes through many collections on its way to the cap, and the last place one of
/// them saw is where it grew. A single allocation far past the cap may leave none.
fn memory_sampler(lua: &Lua, cap: usize) -> mlua::Result<Function> {
    lua.create_function(move |lua, ()| {
        if lua.used_memory() >= cap / 2 {
            budget::note_place();
        }
        Ok(())
    })
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// The Lua error message without mlua's traceback (`file.lua:LINE: message`).
fn error_message(e: &mlua::Error) -> String {
    match e {
        mlua::Error::RuntimeError(msg) | mlua::Error::SyntaxError { message: msg, .. } => {
            super::printable(msg.lines().next().unwrap_or_default().as_bytes())
        }
        mlua::Error::CallbackError { cause, .. } => error_message(cause),
        other => super::printable(
            other
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .as_bytes(),
        ),
    }
}

/// Read `route`'s return values as a decision.
///
/// Only the first `max_names` names of a list are read: a policy may rank every backend,
/// but a request tries only a few, and copying names out of Lua is a large share of the
/// cost of a decision.
fn decision_from(values: MultiValue, max_names: usize) -> Result<Decision, PolicyError> {
    let mut values = values.into_iter();
    match values.next().unwrap_or(Value::Nil) {
        Value::String(s) => Ok(Decision::Candidates(vec![super::backend_name(&s)?])),
        Value::Table(t) => {
            let mut names = Vec::with_capacity(t.raw_len().min(max_names).min(super::PREALLOCATED));
            for v in t.sequence_values::<Value>().take(max_names) {
                match v.map_err(|e| PolicyError::Runtime(e.to_string()))? {
                    Value::String(s) => names.push(super::backend_name(&s)?),
                    other => {
                        return Err(bad(&format!("a list holding {}", describe_value(&other))))
                    }
                }
            }
            if names.is_empty() {
                return Err(bad("an empty list"));
            }
            Ok(Decision::Candidates(names))
        }
        Value::Nil => {
            // `429.0 == 429` in Lua 5.4: a whole float is a status too.
            let status = match values.next() {
                Some(Value::Integer(i)) => Some(i),
                Some(Value::Number(n)) if n.fract() == 0.0 && n.abs() < 1e6 => Some(n as i64),
                _ => None,
            };
            let message = values.next();
            match status {
                Some(s) if (400..=599).contains(&s) => Ok(Decision::Reject {
                    status: s as u16,
                    message: match message {
                        // Logged as well as sent: one line, like all a policy's text.
                        Some(Value::String(m)) => super::printable(&m.as_bytes()),
                        _ => "request rejected by routing policy".into(),
                    },
                }),
                Some(s) => Err(bad(&format!("nil with status {s} (must be 400..599)"))),
                None => Err(bad("nil")),
            }
        }
        other => Err(bad(&describe_value(&other))),
    }
}

/// Read `route`'s answer as backends of the set `names` indexes. A name, or a list of
/// names that are all known, is read without copying a name out of Lua; anything else goes
/// through [`decision_from`], which judges it, and each name is then looked up.
fn chosen_backends(
    values: MultiValue,
    names: &NameIndex,
    max_names: usize,
) -> Result<Decision<Arc<Backend>>, PolicyError> {
    match values.front() {
        Some(Value::String(name)) => {
            if let Some(b) = names.backend(name) {
                return Ok(Decision::Candidates(vec![b.clone()]));
            }
        }
        Some(Value::Table(list)) => {
            let mut chosen = Vec::with_capacity(max_names.min(8));
            let mut all_known = true;
            for v in list.sequence_values::<Value>().take(max_names) {
                let known = match v {
                    Ok(Value::String(name)) => names.backend(&name).cloned(),
                    _ => None,
                };
                match known {
                    Some(b) => chosen.push(b),
                    None => {
                        all_known = false;
                        break;
                    }
                }
            }
            if all_known && !chosen.is_empty() {
                return Ok(Decision::Candidates(chosen));
            }
        }
        _ => {}
    }
    match decision_from(values, max_names)? {
        Decision::Candidates(found) => {
            found
                .into_iter()
                .map(|name| {
                    names.set().get(&name).cloned().ok_or_else(|| {
                        PolicyError::UnknownBackend(super::printable(name.as_bytes()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Decision::Candidates)
        }
        Decision::Reject { status, message } => Ok(Decision::Reject { status, message }),
    }
}

fn bad(what: &str) -> PolicyError {
    PolicyError::BadReturn(what.to_string())
}

/// `a number (42)`, `a boolean (true)`, `a function`: what a value is, for error messages.
pub(super) fn describe_value(v: &Value) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Boolean(b) => format!("a boolean ({b})"),
        Value::Integer(i) => format!("a number ({i})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("a string (\"{}\")", super::printable(&s.as_bytes())),
        other => format!("a {}", other.type_name()),
    }
}
