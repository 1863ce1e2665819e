//! Lua routing policies: loading `policies/*.lua`, running `route(req, backends)` on the
//! worker thread's own VM, and turning what the script returned into a [`Decision`].
//!
//! Each worker thread owns one sandboxed Lua VM (`Lua` is not `Send`, and one VM per thread
//! keeps the hot path free of locks). A policy is identified by its name and the hash of
//! its source; a thread loads a policy into its VM the first time it sees that version, so
//! swapping the [`PolicySet`] in the runtime snapshot swaps the code on every thread, while
//! a request that already holds the old snapshot finishes on the old version.

#[allow(unsafe_code)]
mod budget;
#[allow(unsafe_code)]
mod call;
#[allow(unsafe_code)]
mod patterns;
mod sy;
mod tables;
pub mod testing;
mod vm;

use foldhash::HashMap;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::backends::{Backend, BackendSet};
use crate::config::LuaConfig;
use crate::request::RequestMeta;
use crate::routes::Params;

pub use vm::PolicyVm;

/// One version of one policy file.
#[derive(Debug)]
pub struct Policy {
    /// File name without `.lua`.
    pub name: String,
    /// First 12 hex digits of the SHA-256 of the source.
    pub version: String,
    /// `name@version`, as logs and the audit name the policy.
    pub tag: Arc<str>,
    pub source: String,
    pub path: PathBuf,
}

impl Policy {
    pub fn new(name: &str, source: String, path: PathBuf) -> Policy {
        let digest = Sha256::digest(source.as_bytes());
        let version = hex::encode(&digest[..6]);
        Policy {
            name: name.to_string(),
            tag: format!("{name}@{version}").into(),
            version,
            source,
            path,
        }
    }

    /// Read a policy file; its name is the file name without `.lua`.
    pub fn read(path: &Path) -> Result<Policy, String> {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: not a policy file name", path.display()))?;
        let source =
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Policy::new(name, source, path.to_path_buf()))
    }
}

/// The policies in service, by name.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {
    by_name: HashMap<String, Arc<Policy>>,
}

/// A policy whose file failed while its version in service was kept.
#[derive(Debug, Clone)]
pub struct Kept {
    pub name: String,
    /// The failing file's version (`-` if it could not be read).
    pub version: String,
    pub why: String,
}

impl PolicySet {
    /// Load the named policies from `dir`, each compiled and its `tests` run in a fresh
    /// sandbox; every failure is listed. `in_service` is the set serving now, from the same
    /// directory and under the same Lua limits: a policy whose file fails keeps its version
    /// in service, as the file watcher would, so a broken file on disk holds up no reload
    /// of the config or change made through the admin API; those kept are returned, for
    /// the reload to report as refused. A policy with no version in service must load.
    pub fn load(
        dir: &Path,
        names: &[String],
        limits: &LuaConfig,
        in_service: Option<&PolicySet>,
        backends: &[String],
    ) -> Result<(PolicySet, Vec<Kept>), Vec<String>> {
        let mut set = PolicySet::default();
        let mut kept = Vec::new();
        let mut problems = Vec::new();
        for name in names {
            let path = dir.join(format!("{name}.lua"));
            let read = Policy::read(&path);
            let version = read.as_ref().map_or("-".to_string(), |p| p.version.clone());
            match read.and_then(|p| validate(p, limits, backends)) {
                Ok(p) => {
                    set.by_name.insert(name.clone(), Arc::new(p));
                }
                Err(why) => match in_service.and_then(|s| s.get(name)) {
                    Some(serving) => {
                        set.by_name.insert(name.clone(), serving.clone());
                        kept.push(Kept {
                            name: name.clone(),
                            version,
                            why,
                        });
                    }
                    None => problems.push(why),
                },
            }
        }
        if problems.is_empty() {
            Ok((set, kept))
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.by_name.get(name)
    }

    pub fn insert(&mut self, policy: Arc<Policy>) {
        self.by_name.insert(policy.name.clone(), policy);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_name.values()
    }
}

/// Compile a policy and run its `tests` in a fresh sandbox; the policy back if all pass.
/// `backends`: the config's backend names (a case may not return a name no backend has).
pub fn validate(policy: Policy, limits: &LuaConfig, backends: &[String]) -> Result<Policy, String> {
    let report = testing::run(&policy, limits, Some(backends));
    match report.failure_summary() {
        None => Ok(policy),
        Some(why) => Err(format!(
            "{} (version {}): {why}",
            policy.path.display(),
            policy.version
        )),
    }
}

/// What a policy decided for one request: backends by name (in a policy's own test cases)
/// or the backends themselves (from [`decide`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<T = String> {
    /// Backends to try, in order.
    Candidates(Vec<T>),
    /// Refuse the request with this status and message.
    Reject { status: u16, message: String },
}

/// Longest text of a policy's that goes into a log line or an error: its `sy.log`
/// messages, error messages, names and rejection messages.
const MAX_TEXT_BYTES: usize = 1024;

/// Room made up front for a list a policy hands over: `#t` of a sparse table can be
/// astronomically more than it holds.
pub(super) const PREALLOCATED: usize = 64;

/// A backend name out of Lua, copied only if it could be one (a list may repeat one huge
/// string many times, and each copy would be outside the VM's memory cap): a longer one
/// names no backend.
pub(super) fn backend_name(s: &mlua::LuaString) -> Result<String, PolicyError> {
    let bytes = s.as_bytes();
    if bytes.len() > crate::config::MAX_BACKEND_NAME_BYTES {
        return Err(PolicyError::UnknownBackend(printable(&bytes)));
    }
    std::str::from_utf8(&bytes)
        .map(str::to_string)
        .map_err(|_| PolicyError::BadReturn("a non-UTF-8 name".into()))
}

/// A policy's text made safe for one log line: its first [`MAX_TEXT_BYTES`] (cut at a
/// character; read without copying the rest), the total length noted when it was longer,
/// and control characters (newlines above all, which would start a forged line) escaped.
pub(crate) fn printable(text: &[u8]) -> String {
    let cut = crate::request::floor_char_boundary(text, MAX_TEXT_BYTES);
    let mut out = String::with_capacity(cut + 16);
    let shown = String::from_utf8_lossy(&text[..cut]);
    let _ = crate::logging::write_escaped(&mut out, &shown, usize::MAX);
    if cut < text.len() {
        out.push_str(&format!("… ({} bytes)", text.len()));
    }
    out
}

/// A policy that did not produce a usable decision.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The file does not compile, or does not return a table with a `route` function.
    #[error("does not load: {0}")]
    Load(String),
    /// `route` raised an error (the message carries `file.lua:LINE:`).
    #[error("raised an error: {0}")]
    Runtime(String),
    /// `route` ran past its instruction budget (of `.0` instructions), stopped at the place
    /// `.1` (`file.lua:LINE`, empty when not known).
    #[error("exceeded its instruction budget of {} instructions{}", .0, at_place(.1))]
    Budget(u64, String),
    /// `route` ran past the time limit (of `.0` ms: library calls the budget does not
    /// count), stopped at the place `.1`.
    #[error("ran longer than {} ms{} (library calls over large inputs, which the instruction budget does not count)", .0, at_place(.1))]
    Time(u64, String),
    /// The VM ran past its memory cap (of `.0` bytes), last seen growing at `.1`
    /// (`file.lua:LINE`, empty when not known); it is discarded and rebuilt.
    #[error("exceeded the Lua memory limit of {} bytes{}", .0, at_place(.1))]
    Memory(usize, String),
    /// `route` returned something that is not a decision.
    #[error("returned {0}, not a backend name, a list of names, or nil, status, message")]
    BadReturn(String),
    /// `route` returned a name no backend has.
    #[error("returned unknown backend `{0}`")]
    UnknownBackend(String),
}

/// ` at file.lua:LINE`, or nothing when the place is not known.
fn at_place(place: &str) -> String {
    match place {
        "" => String::new(),
        p => format!(" at {p}"),
    }
}

impl PolicyError {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::Load(_) => "load",
            PolicyError::Runtime(_) => "runtime",
            PolicyError::Budget(..) | PolicyError::Time(..) => "budget",
            PolicyError::Memory(..) => "memory",
            PolicyError::BadReturn(_) => "bad_return",
            PolicyError::UnknownBackend(_) => "unknown_backend",
        }
    }
}

thread_local! {
    /// This worker thread's VM, built on first use and rebuilt after a call that ran out of
    /// instructions or memory, or when the Lua limits change.
    static VM: RefCell<Option<PolicyVm>> = const { RefCell::new(None) };
}

/// Run `policy` for one request on this thread's VM.
///
/// `candidates` are the eligible backends for the request; `all` is the whole backend set
/// (for `sy.backends`, and to tell an unknown name from an ineligible one): the backends
/// chosen are taken from it, and may include ones that are not candidates (the caller's
/// guardrails drop those). At most `max_names` names of a returned list are read.
pub fn decide(
    policy: &Policy,
    req: &Arc<RequestMeta>,
    params: &Params,
    candidates: &[Arc<Backend>],
    all: &Arc<BackendSet>,
    limits: &LuaConfig,
    max_names: usize,
) -> Result<Decision<Arc<Backend>>, PolicyError> {
    VM.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|vm| vm.limits() != limits) {
            *slot = Some(PolicyVm::new(limits).map_err(|e| PolicyError::Load(e.to_string()))?);
        }
        let vm = slot.as_mut().expect("VM was just built");
        let result = vm.route(policy, req, params, candidates, all, max_names);
        if matches!(
            result,
            Err(PolicyError::Memory(..) | PolicyError::Budget(..) | PolicyError::Time(..))
        ) {
            // A call stopped part-way may have left its policy's locals half-changed, and a
            // VM that hit its cap may hold garbage the policy keeps alive: start clean.
            *slot = None;
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ParamValue};
    use std::collections::BTreeMap;

    /// Three backends `a`, `b`, `c` serving model `m`, and a request for it.
    fn setup() -> (Arc<BackendSet>, Vec<Arc<Backend>>, Arc<RequestMeta>, Config) {
        let mut yaml = String::from(
            "listen: [{ addr: \"127.0.0.1:8080\" }]\nroutes:\n  - policy: p\nbackends:\n",
        );
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            yaml.push_str(&format!(
                "  - {{ name: {name}, url: \"http://127.0.0.1:{}\", models: [m], tags: {{ tier: x }} }}\n",
                9100 + i
            ));
        }
        let config = Config::parse(&yaml).expect("test config is valid");
        let set = Arc::new(BackendSet::build(&config, None).expect("backends build"));
        let candidates = set.serving(Some("m"));
        let mut meta = RequestMeta::from_head(
            &http::Method::POST,
            "/v1/chat/completions",
            &http::HeaderMap::new(),
        );
        meta.read_json_body(&bytes::Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .expect("test body is valid");
        (set, candidates, Arc::new(meta), config)
    }

    fn run(source: &str, params: &Params) -> Result<Decision<Arc<Backend>>, PolicyError> {
        let (set, candidates, req, config) = setup();
        let policy = Policy::new("p", source.to_string(), PathBuf::from("p.lua"));
        decide(&policy, &req, params, &candidates, &set, &config.lua, 5)
    }

    fn names(d: Result<Decision<Arc<Backend>>, PolicyError>) -> Result<Vec<String>, PolicyError> {
        d.map(|d| match d {
            Decision::Candidates(c) => c.iter().map(|b| b.name().to_string()).collect(),
            Decision::Reject { status, .. } => vec![format!("reject {status}")],
        })
    }

    fn no_params() -> Params {
        Params::new(BTreeMap::new())
    }

    #[test]
    fn a_vm_keeps_the_version_before_a_reload_with_its_state() {
        let (set, candidates, req, config) = setup();
        let version = |tag: &str| {
            let source = format!(
                "local n = 0\nlocal P = {{}}\nfunction P.route()\n  n = n + 1\n  return nil, 400 + n, '{tag}'\nend\nreturn P"
            );
            Policy::new("p", source, PathBuf::from("p.lua"))
        };
        let call =
            |p: &Policy| match decide(p, &req, &no_params(), &candidates, &set, &config.lua, 5) {
                Ok(Decision::Reject { status, message }) => (status, message),
                other => panic!("{other:?}"),
            };
        let (old, new) = (version("old"), version("new"));
        assert_eq!(call(&old), (401, "old".into()));
        assert_eq!(call(&new), (401, "new".into()));
        // A request begun before the reload decides with the old version, which goes on
        // where it was; so does the new one after it.
        assert_eq!(call(&old), (402, "old".into()));
        assert_eq!(call(&new), (402, "new".into()));
        // Two versions are kept: a third drops the oldest, which starts over if it comes
        // back.
        assert_eq!(call(&version("newer")), (401, "newer".into()));
        assert_eq!(call(&new), (403, "new".into()));
        assert_eq!(call(&old), (401, "old".into()));

        // A version that does not fit beside the one kept (12 MiB each, and making one
        // takes twice that, under a 32 MiB cap) is loaded alone.
        let big = |tag: &str| {
            let source = format!(
                "local big = string.rep('{tag}', 12 * 1024 * 1024)\nlocal P = {{}}\nfunction P.route()\n  return nil, 400 + #big % 7, '{tag}'\nend\nreturn P"
            );
            Policy::new("big", source, PathBuf::from("big.lua"))
        };
        assert_eq!(config.lua.memory_limit_bytes, 32 * 1024 * 1024);
        assert_eq!(call(&big("a")).1, "a");
        assert_eq!(call(&big("b")).1, "b");
        assert_eq!(call(&big("a")).1, "a");
    }

    #[test]
    fn backend_entries_and_req_are_read_only() {
        let read_only = "read-only";
        // `pairs` hands out its state: it is never the table behind a view.
        let no_table = "attempt to index a nil value";
        for (write, error) in [
            ("backends[1].inflight = 0", read_only),
            ("backends[1].name = 'x'", read_only),
            ("backends[1].tags.tier = 'y'", read_only),
            ("backends[1].models.m = false", read_only),
            ("req.model = 'x'", read_only),
            ("req.tokens = 1", read_only),
            ("req.session = 'x'", read_only),
            ("req.params.x = 1", read_only),
            ("select(2, pairs(backends[1])).name = 'x'", no_table),
            ("select(2, pairs(backends[1].tags)).tier = 'y'", no_table),
            ("select(2, pairs(req)).tokens = 5", no_table),
            ("select(2, pairs(req.params)).x = 1", no_table),
            ("select(2, pairs(string)).upper = nil", no_table),
            ("select(2, pairs(sy)).now_ms = nil", no_table),
            ("select(2, pairs(table)).concat = nil", no_table),
        ] {
            let source = format!(
                "local P = {{}}\nfunction P.route(req, backends)\n  {write}\n  return backends[1].name\nend\nreturn P"
            );
            match run(&source, &no_params()) {
                Err(PolicyError::Runtime(msg)) => assert!(msg.contains(error), "{write}: {msg}"),
                other => panic!("{write}: {other:?}"),
            }
        }
        // And `pairs` still walks what a view shows.
        let walk = "local P = {}\nfunction P.route(req, backends)\n  local n = 0\n  for k in pairs(backends[1]) do n = n + 1 end\n  for k in pairs(string) do n = n + 1 end\n  assert(n > 20, n)\n  return backends[1].name\nend\nreturn P";
        assert!(run(walk, &no_params()).is_ok());
    }

    #[test]
    fn req_tokens_and_session_are_worked_out_when_first_read_and_listed_by_pairs() {
        let (set, candidates, req, config) = setup();
        let ignores = Policy::new(
            "p",
            "local P = {}\nfunction P.route(req, b) return b[1].name end\nreturn P".into(),
            PathBuf::from("p.lua"),
        );
        decide(
            &ignores,
            &req,
            &no_params(),
            &candidates,
            &set,
            &config.lua,
            5,
        )
        .unwrap();
        assert!(
            !req.tokens_counted() && !req.session_hashed(),
            "a policy that never reads them costs no count and no hash"
        );

        // Read directly and through `pairs`, the same values as the proxy's limits and the
        // session key the body gives.
        let source = format!(
            "local P = {{}}\nfunction P.route(req, b)\n  local listed = {{}}\n  for k, v in pairs(req) do listed[k] = v end\n  if req.tokens == {} and listed.tokens == req.tokens\n    and req.session == '{}' and listed.session == req.session then return b[1].name end\n  return b[2].name\nend\nreturn P",
            req.tokens(),
            req.session().expect("the body has a first message"),
        );
        let reads = Policy::new("q", source, PathBuf::from("q.lua"));
        let (set, candidates, req, config) = setup();
        let chosen = decide(
            &reads,
            &req,
            &no_params(),
            &candidates,
            &set,
            &config.lua,
            5,
        );
        assert_eq!(names(chosen).unwrap()[0], candidates[0].name());
        assert!(req.tokens_counted() && req.session_hashed());

        // Without a prompt there is no session: `req.session` is nil and `pairs` skips it.
        // The client's `x-session-id` is the session whatever the body. `pairs` lists
        // what reading gives.
        let source = "local P = {}\nfunction P.route(req, b)\n  local listed\n  for k, v in pairs(req) do if k == 'session' then listed = v end end\n  if listed ~= req.session then return b[3].name end\n  if req.session == nil then return b[1].name end\n  return req.session == 'client-key' and b[2].name or b[3].name\nend\nreturn P";
        let sessions = Policy::new("s", source.into(), PathBuf::from("s.lua"));
        let mut headers = http::HeaderMap::new();
        for (header, body, expect) in [
            (None, r#"{"model":"m"}"#, 0),
            (Some("client-key"), r#"{"model":"m"}"#, 1),
            (
                Some("client-key"),
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
                1,
            ),
        ] {
            if let Some(h) = header {
                headers.insert("x-session-id", h.parse().unwrap());
            }
            let mut meta =
                RequestMeta::from_head(&http::Method::POST, "/v1/chat/completions", &headers);
            meta.read_json_body(&bytes::Bytes::from(body)).unwrap();
            let chosen = decide(
                &sessions,
                &Arc::new(meta),
                &no_params(),
                &candidates,
                &set,
                &config.lua,
                5,
            );
            assert_eq!(
                names(chosen).unwrap()[0],
                candidates[expect].name(),
                "{header:?} {body}"
            );
        }
    }

    #[test]
    fn sy_backends_and_candidates_show_each_backends_real_state() {
        let (set, candidates, req, config) = setup();
        // b fails its health checks, c is drained by the operator.
        let b = candidates.iter().find(|x| x.name() == "b").unwrap();
        while b.stats.health.is_healthy() {
            b.stats.health.observe(false, 1, 1);
        }
        candidates[2].stats.breaker.set_draining(true);
        let source = r#"
local P = {}
function P.route(req, backends)
  local seen = {}
  for _, x in ipairs(sy.backends{ model = "m", all = true }) do
    seen[#seen + 1] = x.name .. ":" .. tostring(x.healthy) .. ":" .. tostring(x.eligible)
      .. ":" .. tostring(x.why_not)
  end
  local eligible = sy.backends{ model = "m" }
  seen[#seen + 1] = #eligible .. ":" .. eligible[1].name
  -- Offered b anyway (as in panic mode): its view says what it is.
  for _, x in ipairs(backends) do seen[#seen + 1] = x.name .. ":" .. tostring(x.healthy) end
  return nil, 418, table.concat(seen, " ")
end
return P"#;
        let policy = Policy::new("p", source.into(), PathBuf::from("p.lua"));
        let offered: Vec<_> = candidates[..2].to_vec();
        match decide(&policy, &req, &no_params(), &offered, &set, &config.lua, 5).unwrap() {
            Decision::Reject { message, .. } => assert_eq!(
                message,
                "a:true:true:nil b:false:false:unhealthy c:true:false:draining 1:a a:true b:false"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn c_loops_the_budget_cannot_see_are_kept_short() {
        let route = |body: &str| {
            run(
                &format!("local P = {{}}\nfunction P.route(req, backends)\n  {body}\n  return backends[1].name\nend\nreturn P"),
                &no_params(),
            )
        };
        let started = std::time::Instant::now();
        assert!(route("assert(string.rep('', 1e15) == '' and (''):rep('1e15', '') == '')").is_ok());
        assert!(route("assert(string.rep('ab', 3, '-') == 'ab-ab-ab')").is_ok());
        assert!(route("assert(table.move({ 1, 2, 3 }, 1, 3, 2)[3] == 2)").is_ok());
        for moved in ["{}, 1, 1e15, 1, {}", "{}, '1', '1e15', 1"] {
            match route(&format!("table.move({moved})")) {
                Err(PolicyError::Runtime(msg)) => assert!(msg.contains("a million"), "{msg}"),
                other => panic!("{other:?}"),
            }
        }
        let cap = LuaConfig::default().memory_limit_bytes;
        // One allocation far past the cap: no collection may see it coming.
        match route("local s = string.rep('x', 1e8)") {
            Err(PolicyError::Memory(c, place)) if c == cap => {
                assert!(["", "p.lua:3"].contains(&place.as_str()), "{place}")
            }
            other => panic!("{other:?}"),
        }
        // `gsub`'s result, built by Switchyard's port of Lua's matcher: the memory cap
        // stops it, unless the call ran long enough (a loaded machine) for the watchdog to
        // arm the instruction budget, which the matcher counts against first.
        match route("local s = string.gsub(string.rep('x', 1e6), 'x', string.rep('y', 100))") {
            Err(PolicyError::Memory(c, _)) if c == cap => {}
            Err(PolicyError::Budget(_, place)) => assert_eq!(place, "p.lua:3"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn pcall_gives_what_lua_gives_but_never_catches_the_memory_cap() {
        let source = r#"
local P = {}
function P.route(req, backends)
  local ok, e = pcall(nil)
  assert(not ok and e:find("attempt to call a nil value"), e)
  ok, e = pcall(error, { code = 42 })
  assert(not ok and type(e) == "table" and e.code == 42)
  ok, e = pcall(error, "one\ntwo", 0)
  assert(not ok and e == "one\ntwo", e)
  ok, e = pcall(error)
  assert(not ok and e == nil)
  -- The text alone is not the memory cap: the VM is far from it.
  ok, e = pcall(error, "not enough memory", 0)
  assert(not ok and e == "not enough memory")
  local a, b, c = pcall(function(x, y) return x, y end, 1, 2)
  assert(a == true and b == 1 and c == 2)
  if req.model == "hoard" then
    pcall(function() local t = {} while true do t[#t + 1] = string.rep("x", 4096) .. #t end end)
  end
  return backends[1].name
end
return P"#;
        assert_eq!(names(run(source, &no_params())).unwrap(), vec!["a"]);
        let (set, candidates, _, config) = setup();
        let mut hoard = RequestMeta::from_head(
            &http::Method::POST,
            "/v1/chat/completions",
            &Default::default(),
        );
        hoard.model = Some("hoard".into());
        let policy = Policy::new("p", source.into(), PathBuf::from("p.lua"));
        let got = decide(
            &policy,
            &Arc::new(hoard),
            &no_params(),
            &candidates,
            &set,
            &config.lua,
            5,
        );
        // Named where it grew, inside the `pcall`.
        assert_eq!(
            got.unwrap_err(),
            PolicyError::Memory(config.lua.memory_limit_bytes, "p.lua:18".into())
        );
    }

    #[test]
    fn a_call_over_the_memory_cap_fails_and_the_next_runs_in_a_fresh_vm() {
        let cap = LuaConfig::default().memory_limit_bytes;
        // The file's state counts calls; the third allocates without bound. A fresh VM
        // starts the count again, so the fourth call answers as the first did.
        let source = r#"
local P = {}
local calls = 0
local hoard = {}
function P.route(req, backends)
  calls = calls + 1
  if calls == 3 then
    while true do hoard[#hoard + 1] = string.rep("x", 4096) .. #hoard end
  end
  return backends[calls].name
end
return P"#;
        // Each call loads the same version, so the VM's copy (and its count) is reused.
        let call = || names(run(source, &no_params()));
        assert_eq!(call().unwrap(), vec!["a"]);
        assert_eq!(call().unwrap(), vec!["b"]);
        assert_eq!(call(), Err(PolicyError::Memory(cap, "p.lua:8".into())));
        assert_eq!(call().unwrap(), vec!["a"], "the VM was rebuilt");
        assert_eq!(call().unwrap(), vec!["b"]);
    }

    #[test]
    fn a_runaway_call_is_stopped_and_the_next_runs_unhooked_in_a_fresh_vm() {
        let (set, candidates, req, config) = setup();
        let call = |policy: &Policy| {
            decide(
                policy,
                &req,
                &no_params(),
                &candidates,
                &set,
                &config.lua,
                5,
            )
        };
        // Out of instructions, stopped at a line of `file`.
        let over_budget = |got: &Result<Vec<String>, PolicyError>, file: &str| match got {
            Err(PolicyError::Budget(budget, place)) => {
                *budget == config.lua.instruction_budget
                    && place.strip_prefix(file).is_some_and(|line| {
                        line.strip_prefix(".lua:")
                            .is_some_and(|n| n.parse::<u32>().is_ok())
                    })
            }
            _ => false,
        };
        for body in [
            "while true do end",
            // pcall does not catch the budget.
            "while true do pcall(function() while true do end end) end",
            // Neither does recursion keep it from counting.
            "local function f() return f() end f()",
            // Nor a loop that keeps calling into Rust.
            "while true do sy.now_ms() end",
            // Nor a pattern that backtracks 2^28 ways: matching is not Lua instructions,
            // but its steps count the same (`patterns`), whichever way it is called.
            "string.find(('a'):rep(28), ('a?'):rep(28) .. ('a'):rep(28) .. 'b')",
            "local s, p = ('a'):rep(28), ('a?'):rep(28) .. ('a'):rep(28) .. 'b'\n  while true do pcall(s.match, s, p) end",
            "for _ in string.gmatch(('a'):rep(28) .. 'x', ('a?'):rep(28) .. ('a'):rep(28) .. 'b') do end",
            "string.gsub(('('):rep(1e5), '%b()', '')",
            // Work that is long for one step of the matcher counts for its length: a long
            // literal run, a long set, a back-reference, a replacement's escapes, a plain
            // search; and many short calls add up.
            "local s = ('a'):rep(2e5) s:match(('a'):rep(1e5) .. 'b')",
            "('a'):rep(2e5):find('[' .. ('b'):rep(2e5) .. ']')",
            "('a'):rep(1e6):find('^(.-)' .. ('%1'):rep(50) .. 'b')",
            "('x'):rep(1e5):gsub('', ('%0'):rep(1e6))",
            "local s = ('a'):rep(1e7)\n  while true do s:find('b', 1, true) end",
            "local s = ('a'):rep(990)\n  while true do s:find('b$') end",
        ] {
            // Only the second call runs away; the file's state counts calls.
            let source = format!(
                "local P = {{}}\nlocal calls = 0\nfunction P.route(req, backends)\n  calls = calls + 1\n  if calls == 2 then {body} end\n  return backends[calls].name\nend\nreturn P"
            );
            let policy = Policy::new("runaway", source, PathBuf::from("runaway.lua"));
            assert_eq!(names(call(&policy)).unwrap(), vec!["a"], "{body}");
            let started = std::time::Instant::now();
            let got = names(call(&policy));
            assert!(over_budget(&got, "runaway"), "{body}: {got:?}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{body}"
            );
            // The hook is gone and the VM was rebuilt (the count starts again): the next
            // call is an ordinary first one.
            assert_eq!(names(call(&policy)).unwrap(), vec!["a"], "{body}");
            assert!(!budget::exhausted());
        }
        // A file whose top level never ends is refused the same way.
        let stuck = Policy::new(
            "stuck",
            "while true do end".into(),
            PathBuf::from("stuck.lua"),
        );
        let got = names(call(&stuck));
        assert!(over_budget(&got, "stuck"), "{got:?}");
    }

    #[test]
    fn each_call_gets_a_fresh_candidate_array() {
        // The policy empties the array it was given, and the one it got the call before.
        let source = r#"
local P = {}
local kept
function P.route(req, backends)
  if kept then for i = #kept, 1, -1 do table.remove(kept, i) end end
  local n, first = #backends, backends[1].name
  table.sort(backends, function(x, y) return x.name > y.name end)
  kept = backends
  return n == 3 and first or nil, 500, "saw " .. n
end
return P"#;
        let (set, candidates, req, config) = setup();
        let policy = Policy::new("fresh", source.to_string(), PathBuf::from("fresh.lua"));
        for _ in 0..3 {
            let d = decide(
                &policy,
                &req,
                &no_params(),
                &candidates,
                &set,
                &config.lua,
                5,
            );
            assert_eq!(names(d).unwrap(), vec!["a"]);
        }
    }

    #[test]
    fn answers_become_backends_and_bad_ones_fail_as_before() {
        let answer = |ret: &str| {
            run(
                &format!(
                    "local P = {{}}\nfunction P.route(req, backends) return {ret} end\nreturn P"
                ),
                &Params::new(BTreeMap::from([(
                    "chain".to_string(),
                    ParamValue::List(vec![ParamValue::Str("c".into())]),
                )])),
            )
        };
        assert_eq!(names(answer("'b'")).unwrap(), vec!["b"]);
        assert_eq!(names(answer("{ 'c', 'a' }")).unwrap(), vec!["c", "a"]);
        // At most max_names (5) are read; what follows them is not looked at.
        assert_eq!(
            names(answer("{ 'a', 'b', 'c', 'a', 'b', 'nope', 42 }")).unwrap(),
            vec!["a", "b", "c", "a", "b"]
        );
        assert_eq!(
            names(answer("nil, 429, 'busy'")).unwrap(),
            vec!["reject 429"]
        );
        assert_eq!(
            names(answer("nil, 429.0, 'busy'")).unwrap(),
            vec!["reject 429"],
            "429.0 == 429 in Lua"
        );
        // A policy's text in a log line or an error is one line, of bounded length.
        let forged = "'x' .. string.rep('y', 100000) .. '\\n[ERROR switchyard] forged'";
        for (ret, error) in [
            (forged.to_string(), "unknown"),
            (format!("error({forged})"), "raised"),
        ] {
            let e = answer(&ret).unwrap_err();
            let shown = e.to_string();
            assert!(
                shown.contains(error) && shown.contains(" bytes)"),
                "{shown:.200}"
            );
            assert!(!shown.contains('\n') && shown.len() < 1200, "{shown:.200}");
        }
        // An error value is read as Lua shows it, and a helper's error as it raised it.
        match answer("error({})").unwrap_err() {
            PolicyError::Runtime(m) => assert!(m.starts_with("table: 0x"), "{m}"),
            other => panic!("{other:?}"),
        }
        match answer("sy.hash(true, backends)").unwrap_err() {
            PolicyError::Runtime(m) => {
                assert!(m.contains("key must be a string, not a boolean"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            answer("error('plain', 0)").unwrap_err(),
            PolicyError::Runtime("plain".into())
        );
        match answer(&format!("nil, 503, {forged}")).unwrap() {
            Decision::Reject { message, .. } => {
                assert!(
                    message.len() < 1200 && !message.contains('\n'),
                    "{message:.200}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            answer("'nope'").unwrap_err(),
            PolicyError::UnknownBackend("nope".into())
        );
        assert_eq!(
            answer("{ 'a', 'nope' }").unwrap_err(),
            PolicyError::UnknownBackend("nope".into())
        );
        assert_eq!(
            answer("{ 'a', 1 }").unwrap_err(),
            PolicyError::BadReturn("a list holding a number (1)".into())
        );
        assert_eq!(
            answer("{}").unwrap_err(),
            PolicyError::BadReturn("an empty list".into())
        );
        // A read-only view is read raw, as it always was: it looks empty.
        assert_eq!(
            answer("req.params.chain").unwrap_err(),
            PolicyError::BadReturn("an empty list".into())
        );
        assert_eq!(
            answer("42").unwrap_err(),
            PolicyError::BadReturn("a number (42)".into())
        );
    }
}
