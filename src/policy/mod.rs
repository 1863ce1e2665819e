//! Lua routing policies: loading `policies/*.lua`, running `route(req, backends)` on the
//! worker thread's own VM, and turning what the script returned into a [`Decision`].
//!
//! Each worker thread owns one sandboxed Lua VM (`Lua` is not `Send`, and one VM per thread
//! keeps the hot path free of locks). A policy is identified by its name and the hash of
//! its source; a thread loads a policy into its VM the first time it sees that version, so
//! swapping the [`PolicySet`] in the runtime snapshot swaps the code on every thread, while
//! a request that already holds the old snapshot finishes on the old version.

mod sy;
mod tables;
pub mod testing;
mod vm;

use std::cell::RefCell;
use std::collections::HashMap;
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
    pub source: String,
    pub path: PathBuf,
}

impl Policy {
    pub fn new(name: &str, source: String, path: PathBuf) -> Policy {
        let digest = Sha256::digest(source.as_bytes());
        Policy {
            name: name.to_string(),
            version: hex::encode(&digest[..6]),
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

impl PolicySet {
    /// Load the named policies from `dir`, each compiled and its `tests` run in a fresh
    /// sandbox; every failure is listed.
    pub fn load(
        dir: &Path,
        names: &[String],
        limits: &LuaConfig,
    ) -> Result<PolicySet, Vec<String>> {
        let mut set = PolicySet::default();
        let mut problems = Vec::new();
        for name in names {
            let path = dir.join(format!("{name}.lua"));
            match Policy::read(&path).and_then(|p| validate(p, limits)) {
                Ok(p) => {
                    set.by_name.insert(name.clone(), Arc::new(p));
                }
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(set)
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
pub fn validate(policy: Policy, limits: &LuaConfig) -> Result<Policy, String> {
    let report = testing::run(&policy, limits);
    match report.failure_summary() {
        None => Ok(policy),
        Some(why) => Err(format!(
            "{} (version {}): {why}",
            policy.path.display(),
            policy.version
        )),
    }
}

/// What a policy decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Backend names to try, in order.
    Candidates(Vec<String>),
    /// Refuse the request with this status and message.
    Reject { status: u16, message: String },
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
    /// `route` ran past its instruction budget.
    #[error("exceeded its instruction budget of {0} instructions")]
    Budget(u64),
    /// The VM ran past its memory cap; it is discarded and rebuilt.
    #[error("exceeded the Lua memory limit of {0} bytes")]
    Memory(usize),
    /// `route` returned something that is not a decision.
    #[error("returned {0}, not a backend name, a list of names, or nil, status, message")]
    BadReturn(String),
    /// `route` returned a name no backend has.
    #[error("returned unknown backend `{0}`")]
    UnknownBackend(String),
}

impl PolicyError {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::Load(_) => "load",
            PolicyError::Runtime(_) => "runtime",
            PolicyError::Budget(_) => "budget",
            PolicyError::Memory(_) => "memory",
            PolicyError::BadReturn(_) => "bad_return",
            PolicyError::UnknownBackend(_) => "unknown_backend",
        }
    }
}

thread_local! {
    /// This worker thread's VM, built on first use and rebuilt after a memory error or when
    /// the Lua limits change.
    static VM: RefCell<Option<PolicyVm>> = const { RefCell::new(None) };
}

/// Run `policy` for one request on this thread's VM.
///
/// `candidates` are the eligible backends for the request; `all` is the whole backend set
/// (for `sy.backends` and to tell an unknown name from an ineligible one). At most
/// `max_names` names of a returned list are read.
pub fn decide(
    policy: &Policy,
    req: &Arc<RequestMeta>,
    params: &Params,
    candidates: &[Arc<Backend>],
    all: &Arc<BackendSet>,
    limits: &LuaConfig,
    max_names: usize,
) -> Result<Decision, PolicyError> {
    VM.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|vm| vm.limits() != limits) {
            *slot = Some(PolicyVm::new(limits).map_err(|e| PolicyError::Load(e.to_string()))?);
        }
        let vm = slot.as_mut().expect("VM was just built");
        let result = vm.route(policy, req, params, candidates, all, max_names);
        if matches!(result, Err(PolicyError::Memory(_))) {
            // A VM that hit its cap may hold garbage the policy keeps alive: start clean.
            *slot = None;
        }
        let decision = result?;
        if let Decision::Candidates(names) = &decision {
            if let Some(unknown) = names.iter().find(|n| all.get(n).is_none()) {
                return Err(PolicyError::UnknownBackend(unknown.clone()));
            }
        }
        Ok(decision)
    })
}
