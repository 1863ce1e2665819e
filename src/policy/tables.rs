//! The `req` and `backends` tables handed to `route`, built cheaply.
//!
//! Building Lua tables through the C API dominates the cost of a decision, so each VM keeps
//! one table per backend (static fields set once, live statistics rewritten only when they
//! changed) and one `req` table whose fields are overwritten per call. Policies get
//! read-only views of them. The array listing a request's candidates is kept too, per
//! candidate list, and a policy gets a fresh copy of it (made by `call::route` through the
//! C API), so it may sort it. The names a policy returns are found by the address of their
//! Lua string, not copied out and looked up.
//!
//! Everything here runs with the VM's memory limit lifted (see `PolicyVm::route`): with a
//! limit, mlua runs each table write as a protected call, which cost more than the write.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use mlua::{Function, Lua, LuaString, Table, Value};

use crate::backends::{now_secs, Backend, BackendSet};
use crate::config::ParamValue;
use crate::request::RequestMeta;
use crate::routes::Params;

/// Field names, interned once per VM.
struct Keys {
    /// `inflight`, `latency_ms`, `ttft_ms`, `tps`, `error_rate`, in [`Live`] order.
    live: [LuaString; LIVE_FIELDS.len()],
    model: LuaString,
    max_tokens: LuaString,
    stream: LuaString,
    tenant: LuaString,
    region: LuaString,
    path: LuaString,
    method: LuaString,
    format: LuaString,
    priority: LuaString,
    params: LuaString,
}

/// Names of the live statistics, in [`Live`] order.
const LIVE_FIELDS: [&str; 6] = [
    "inflight",
    "latency_ms",
    "ttft_ms",
    "tps",
    "error_rate",
    "healthy",
];

/// A backend's statistics as last written into its table (`healthy` as 1 or 0).
type Live = [f64; 6];

struct CachedBackend {
    data: Table,
    view: Table,
    /// The statistics as last read, before rounding: most calls find them unchanged.
    read: Live,
    live: Live,
}

/// A candidate list seen before: its backends (by id), where their tables are, and the
/// Lua array of their views that each call copies.
struct CandidateList {
    ids: Vec<u64>,
    slots: Vec<usize>,
    views: Table,
}

/// The arguments of one call, as `TableCache::prepare` lends them.
pub(super) struct Prepared<'a> {
    pub req: &'a Table,
    /// The VM's own array of candidate views: the policy gets a copy.
    pub views: &'a Table,
    pub count: usize,
    /// Finds the backends a policy names.
    pub names: &'a NameIndex,
}

/// Candidate lists kept per VM: routes, models and changes in eligibility make a few.
const CANDIDATE_LISTS: usize = 8;

pub(super) struct TableCache {
    keys: Keys,
    readonly: Function,
    /// Backend id → its entry in `slots`.
    slot_of: HashMap<u64, usize>,
    slots: Vec<CachedBackend>,
    /// Most recently used first.
    lists: Vec<CandidateList>,
    /// For the backend set last seen: its backends' names as Lua strings.
    names: Option<NameIndex>,
    req_data: Table,
    req_view: Table,
    /// The `req.params` table last used, by `Params::id`.
    params: Option<(u64, Table)>,
    /// What the `req` table holds now.
    last_req: LastRequest,
}

/// The values last written into the `req` table.
#[derive(Default)]
struct LastRequest {
    written: bool,
    model: Option<String>,
    tenant: Option<String>,
    region: Option<String>,
    path: Option<String>,
    method: Option<String>,
    format: Option<&'static str>,
    /// `max_tokens`, `priority`.
    numbers: [Option<i64>; 2],
    stream: bool,
}

impl TableCache {
    /// `readonly` makes read-only views; `request_view` the `req` view (`H.request`).
    pub fn new(lua: &Lua, readonly: Function, request_view: Function) -> mlua::Result<TableCache> {
        let s = |k: &str| lua.create_string(k);
        let keys = Keys {
            live: LIVE_FIELDS
                .map(s)
                .into_iter()
                .collect::<mlua::Result<Vec<_>>>()?
                .try_into()
                .expect("six keys"),
            model: s("model")?,
            max_tokens: s("max_tokens")?,
            stream: s("stream")?,
            tenant: s("tenant")?,
            region: s("region")?,
            path: s("path")?,
            method: s("method")?,
            format: s("format")?,
            priority: s("priority")?,
            params: s("params")?,
        };
        let req_data = lua.create_table_with_capacity(0, 13)?;
        req_data.raw_set("header", header_function(lua)?)?;
        // `tokens` and `session` are never stored: reading one works it out (see
        // `RequestMeta::tokens` and `RequestMeta::session`).
        let req_view = request_view.call((&req_data, lazy_fields_function(lua)?))?;
        Ok(TableCache {
            keys,
            readonly,
            slot_of: HashMap::new(),
            slots: Vec::new(),
            lists: Vec::new(),
            names: None,
            req_data,
            req_view,
            params: None,
            last_req: LastRequest::default(),
        })
    }

    /// Bring the tables up to date for a call of `route` for `req` over `candidates`, and
    /// lend them out.
    pub fn prepare(
        &mut self,
        lua: &Lua,
        req: &RequestMeta,
        params: &Params,
        candidates: &[Arc<Backend>],
        all: &Arc<BackendSet>,
    ) -> mlua::Result<Prepared<'_>> {
        self.request(lua, req, params)?;
        self.candidates(lua, candidates, all.backends.len())?;
        if !self
            .names
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(&n.set, all))
        {
            self.names = Some(NameIndex::new(lua, all)?);
        }
        Ok(Prepared {
            req: &self.req_view,
            views: &self.lists[0].views,
            count: candidates.len(),
            names: self.names.as_ref().expect("just set"),
        })
    }

    /// Update the `req` table, rewriting only the fields that differ from the previous
    /// request (most requests on a route share model, path, method and tenant).
    fn request(&mut self, lua: &Lua, req: &RequestMeta, params: &Params) -> mlua::Result<()> {
        if self.params.as_ref().is_none_or(|(id, _)| *id != params.id) {
            let table = params_table(lua, &self.readonly, params)?;
            self.req_data.raw_set(&self.keys.params, &table)?;
            self.params = Some((params.id, table));
        }
        let (k, t, last) = (&self.keys, &self.req_data, &mut self.last_req);
        let fresh = !last.written;
        let set_str =
            |key: &LuaString, new: Option<&str>, old: &mut Option<String>| -> mlua::Result<()> {
                if fresh || old.as_deref() != new {
                    t.raw_set(key, new)?;
                    *old = new.map(str::to_string);
                }
                Ok(())
            };
        set_str(&k.model, req.model.as_deref(), &mut last.model)?;
        set_str(&k.tenant, Some(&req.tenant), &mut last.tenant)?;
        set_str(&k.region, req.region.as_deref(), &mut last.region)?;
        set_str(&k.path, Some(&req.path), &mut last.path)?;
        set_str(&k.method, Some(req.method.as_str()), &mut last.method)?;
        let format = req.format.as_str();
        if fresh || last.format != Some(format) {
            t.raw_set(&k.format, format)?;
            last.format = Some(format);
        }
        let numbers = [
            (&k.max_tokens, req.max_tokens.map(|m| m as i64)),
            (&k.priority, Some(req.priority)),
        ];
        for (i, (key, value)) in numbers.into_iter().enumerate() {
            if fresh || last.numbers[i] != value {
                t.raw_set(key, value)?;
                last.numbers[i] = value;
            }
        }
        if fresh || last.stream != req.stream {
            t.raw_set(&k.stream, req.stream)?;
            last.stream = req.stream;
        }
        last.written = true;
        Ok(())
    }

    /// Make `lists[0]` the array of read-only views of `candidates`, in their order, with
    /// every view's live statistics brought up to date.
    fn candidates(
        &mut self,
        lua: &Lua,
        candidates: &[Arc<Backend>],
        configured: usize,
    ) -> mlua::Result<()> {
        let found = self.lists.iter().position(|l| {
            l.ids.len() == candidates.len()
                && l.ids.iter().zip(candidates).all(|(id, b)| *id == b.id)
        });
        match found {
            Some(0) => {}
            Some(i) => {
                let list = self.lists.remove(i);
                self.lists.insert(0, list);
            }
            None => {
                let list = self.new_list(lua, candidates, configured)?;
                self.lists.truncate(CANDIDATE_LISTS - 1);
                self.lists.insert(0, list);
            }
        }
        let list = &self.lists[0];
        let now = now_secs();
        for (b, &slot) in candidates.iter().zip(&list.slots) {
            let cached = &mut self.slots[slot];
            for (j, read) in live_stats(b, now).into_iter().enumerate() {
                // NaN never equals itself, so a fresh entry writes every field once.
                if cached.read[j] == read {
                    continue;
                }
                cached.read[j] = read;
                let value = if ROUNDED.contains(&j) {
                    round2(read)
                } else {
                    read
                };
                if cached.live[j] != value {
                    cached
                        .data
                        .raw_set(&self.keys.live[j], live_value(j, value))?;
                    cached.live[j] = value;
                }
            }
        }
        Ok(())
    }

    fn new_list(
        &mut self,
        lua: &Lua,
        candidates: &[Arc<Backend>],
        configured: usize,
    ) -> mlua::Result<CandidateList> {
        // Backends replaced by a reload leave entries behind; drop them all now and then.
        if self.slots.len() > 2 * configured + 64 {
            self.slot_of.clear();
            self.slots.clear();
            self.lists.clear();
        }
        let views = lua.create_table_with_capacity(candidates.len(), 0)?;
        let mut slots = Vec::with_capacity(candidates.len());
        for (i, b) in candidates.iter().enumerate() {
            let slot = match self.slot_of.get(&b.id) {
                Some(&slot) => slot,
                None => {
                    let data = static_table(lua, &self.readonly, b)?;
                    let view = self.readonly.call(&data)?;
                    self.slots.push(CachedBackend {
                        data,
                        view,
                        read: [f64::NAN; LIVE_FIELDS.len()],
                        live: [f64::NAN; LIVE_FIELDS.len()],
                    });
                    self.slot_of.insert(b.id, self.slots.len() - 1);
                    self.slots.len() - 1
                }
            };
            views.raw_seti(i + 1, &self.slots[slot].view)?;
            slots.push(slot);
        }
        Ok(CandidateList {
            ids: candidates.iter().map(|b| b.id).collect(),
            slots,
            views,
        })
    }
}

/// The backend names of one set as Lua strings, by address: a name a policy returns is
/// found without copying it out of Lua. Lua interns strings of up to 40 bytes, so any copy
/// of a short name is the very string held here; a longer one is looked up by content.
pub(super) struct NameIndex {
    set: Arc<BackendSet>,
    by_address: HashMap<usize, usize, BuildHasherDefault<AddressHasher>>,
    /// Held so that their addresses stay theirs.
    _strings: Vec<LuaString>,
}

impl NameIndex {
    fn new(lua: &Lua, set: &Arc<BackendSet>) -> mlua::Result<NameIndex> {
        let mut by_address = HashMap::default();
        let mut strings = Vec::with_capacity(set.backends.len());
        for (i, b) in set.backends.iter().enumerate() {
            let s = lua.create_string(b.name())?;
            by_address.insert(s.to_pointer() as usize, i);
            strings.push(s);
        }
        Ok(NameIndex {
            set: set.clone(),
            by_address,
            _strings: strings,
        })
    }

    pub fn set(&self) -> &BackendSet {
        &self.set
    }

    /// The backend whose name is the Lua string at `address`, if it is one of this set's:
    /// a short name a policy returns is always the very string held here.
    pub fn by_address(&self, address: usize) -> Option<&Arc<Backend>> {
        let &i = self.by_address.get(&address)?;
        self.set.backends.get(i)
    }

    /// The backend named `name`, if the set has one.
    pub fn backend(&self, name: &LuaString) -> Option<&Arc<Backend>> {
        self.by_address(name.to_pointer() as usize)
            .or_else(|| self.set.get(std::str::from_utf8(&name.as_bytes()).ok()?))
    }
}

/// Hashes an address: addresses are already spread out, and this is cheaper than SipHash.
#[derive(Default)]
pub(super) struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_usize(&mut self, n: usize) {
        // Strings are 8-byte aligned; mix the high bits down for hashbrown's top-7 tag.
        let n = n as u64 >> 3;
        self.0 = n ^ (n >> 29) ^ (n << 25);
    }
}

/// A backend's live statistics in [`Live`] order, as read (see [`ROUNDED`]).
fn live_stats(b: &Backend, now: u64) -> Live {
    let s = &b.stats;
    [
        s.inflight() as f64,
        s.latency_ms(),
        s.ttft_ms(),
        s.tps(),
        s.error_rate_at(now),
        // Candidates are healthy, except in panic mode (`outlier.panic_mode`, every
        // backend out).
        if s.health.is_healthy() { 1.0 } else { 0.0 },
    ]
}

/// A live statistic as Lua sees it: `inflight` an integer, `healthy` a boolean, the
/// others numbers.
fn live_value(field: usize, v: f64) -> Value {
    match field {
        0 => Value::Integer(v as i64),
        5 => Value::Boolean(v != 0.0),
        _ => Value::Number(v),
    }
}

/// The statistics policies see rounded to 1/100: `latency_ms`, `ttft_ms`, `tps`.
const ROUNDED: [usize; 3] = [1, 2, 3];

/// Statistics rounded to 1/100 so that jitter in the last digits does not cost a table
/// write. They are never negative; the cast is cheaper than `f64::round`, a libm call.
fn round2(v: f64) -> f64 {
    ((v * 100.0 + 0.5) as i64) as f64 / 100.0
}

/// A backend's table with its configured fields; live fields are written by the caller.
/// Built once per backend and VM, so plain string keys are fine here.
fn static_table(lua: &Lua, readonly: &Function, b: &Backend) -> mlua::Result<Table> {
    let c = &b.config;
    let t = lua.create_table_with_capacity(0, 16)?;
    t.raw_set("name", c.name.as_str())?;
    t.raw_set("provider", c.provider.as_str())?;
    t.raw_set("region", c.region.as_deref())?;
    t.raw_set("weight", c.weight)?;
    t.raw_set("cost_in", c.cost.input)?;
    t.raw_set("cost_out", c.cost.output)?;
    t.raw_set("max_inflight", c.max_inflight)?;
    let tags = lua.create_table_with_capacity(0, c.tags.len())?;
    for (key, value) in &c.tags {
        tags.raw_set(key.as_str(), value.as_str())?;
    }
    t.raw_set("tags", readonly.call::<Table>(tags)?)?;
    let models = lua.create_table_with_capacity(0, b.models.len())?;
    for model in b.models.keys() {
        models.raw_set(model.as_str(), true)?;
    }
    t.raw_set("models", readonly.call::<Table>(models)?)?;
    Ok(t)
}

/// A complete read-only backend view built fresh, with `eligible` and, when it is not,
/// `why_not` (for `sy.backends`, which is called rarely).
pub(super) fn fresh_backend(
    lua: &Lua,
    readonly: &Function,
    b: &Backend,
    why_not: Option<&str>,
) -> mlua::Result<Table> {
    let t = static_table(lua, readonly, b)?;
    for (j, (name, value)) in LIVE_FIELDS
        .iter()
        .zip(live_stats(b, now_secs()))
        .enumerate()
    {
        let value = if ROUNDED.contains(&j) {
            round2(value)
        } else {
            value
        };
        t.raw_set(*name, live_value(j, value))?;
    }
    t.raw_set("eligible", why_not.is_none())?;
    t.raw_set("why_not", why_not)?;
    readonly.call(t)
}

/// A route's `params` as a read-only Lua table (lists become read-only arrays).
fn params_table(lua: &Lua, readonly: &Function, params: &Params) -> mlua::Result<Table> {
    fn value(lua: &Lua, readonly: &Function, v: &ParamValue) -> mlua::Result<Value> {
        Ok(match v {
            ParamValue::Bool(b) => Value::Boolean(*b),
            ParamValue::Int(i) => Value::Integer(*i),
            ParamValue::Float(f) => Value::Number(*f),
            ParamValue::Str(s) => Value::String(lua.create_string(s)?),
            ParamValue::List(items) => {
                let t = lua.create_table_with_capacity(items.len(), 0)?;
                for item in items {
                    t.raw_push(value(lua, readonly, item)?)?;
                }
                Value::Table(readonly.call(t)?)
            }
        })
    }
    let t = lua.create_table_with_capacity(0, params.values.len())?;
    for (k, v) in &params.values {
        t.raw_set(k.as_str(), value(lua, readonly, v)?)?;
    }
    readonly.call(t)
}

/// `req.tokens` and `req.session` of the request being decided, each worked out on first
/// use: `lazy("tokens")`, `lazy("session")`.
fn lazy_fields_function(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(|lua, field: LuaString| {
        let ctx = lua.app_data_ref::<super::vm::CallContext>();
        let Some(req) = ctx.as_ref().and_then(|c| c.req.as_ref()) else {
            return Ok(Value::Nil);
        };
        match &*field.as_bytes() {
            b"tokens" => Ok(Value::Integer(req.tokens() as i64)),
            b"session" => match req.session() {
                Some(s) => lua.create_string(s).map(Value::String),
                None => Ok(Value::Nil),
            },
            _ => Ok(Value::Nil),
        }
    })
}

/// `req.header(name)`: a request header by case-insensitive name, credentials excluded.
/// Longest header name `req.header` looks up; a longer one is absent.
const MAX_HEADER_NAME_BYTES: usize = 1024;

fn header_function(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(|lua, name: LuaString| {
        // Read in place: no header has a long name, and copying a policy's
        // multi-megabyte string on every call is work the instruction budget cannot see.
        let bytes = name.as_bytes();
        if bytes.len() > MAX_HEADER_NAME_BYTES {
            return Ok(None);
        }
        let Ok(name) = std::str::from_utf8(&bytes) else {
            return Ok(None);
        };
        let ctx = lua.app_data_ref::<super::vm::CallContext>();
        let value = ctx
            .as_ref()
            .and_then(|c| c.req.as_ref())
            .and_then(|req| req.header(name).map(str::to_string));
        Ok(value)
    })
}
