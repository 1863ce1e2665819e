//! The runtime snapshot: config, backend set, routes and policies of one generation, held
//! in an `ArcSwap` and replaced whole. A request keeps the snapshot it started with.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::admin::AdminAccess;
use crate::audit::Audit;
use crate::backends::BackendSet;
use crate::config::Config;
use crate::limits::Limiter;
use crate::policy::{Kept, PolicySet};
use crate::routes::Routes;
use crate::tenants::Tenants;

/// Everything a request needs that can change at run time. Cloning is cheap: a policy
/// reload clones the snapshot and replaces only its policies.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub backends: Arc<BackendSet>,
    pub routes: Arc<Routes>,
    pub policies: PolicySet,
    pub tenants: Arc<Tenants>,
    /// Who may use the admin API.
    pub admin_access: Arc<AdminAccess>,
    /// Body of `GET /v1/models` when every model is visible: OpenAI list format.
    pub models_json: Bytes,
}

impl Runtime {
    /// Build a snapshot from a validated config; the previous snapshot lends its backend
    /// statistics, and its policy versions to policies whose files now fail. Every policy
    /// the routes name is compiled and its tests run.
    pub fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, Vec<String>> {
        Runtime::build_keeping(config, previous).map(|(runtime, kept)| {
            for k in kept {
                log::warn!(target: "switchyard::reload", "{}; policy {} stays at the version in service", k.why, k.name);
            }
            runtime
        })
    }

    /// [`Runtime::build`], with the policies whose files failed while their versions in
    /// service were kept (same directory, same Lua limits).
    pub fn build_keeping(
        config: Config,
        previous: Option<&Runtime>,
    ) -> Result<(Runtime, Vec<Kept>), Vec<String>> {
        let backends = BackendSet::build(&config, previous.map(|p| p.backends.as_ref()));
        let in_service = previous
            .filter(|p| p.config.policies_dir == config.policies_dir && p.config.lua == config.lua)
            .map(|p| &p.policies);
        let policies = PolicySet::load(
            &config.policies_dir,
            &config.policy_names(),
            &config.lua,
            in_service,
            &config.backend_names(),
        );
        // Every problem at once, the backends' and the policies'.
        let (backends, (policies, kept)) = match (backends, policies) {
            (Ok(b), Ok(p)) => (b, p),
            (b, p) => {
                let mut problems = b.err().unwrap_or_default();
                problems.extend(p.err().unwrap_or_default());
                return Err(problems);
            }
        };
        let models: Vec<serde_json::Value> = config
            .model_names()
            .into_iter()
            .map(|m| serde_json::json!({ "id": m, "object": "model", "created": 0, "owned_by": "switchyard" }))
            .collect();
        let models_json =
            Bytes::from(serde_json::json!({ "object": "list", "data": models }).to_string());
        let tenants = Arc::new(Tenants::new(&config));
        let runtime = Runtime {
            admin_access: match previous {
                // The admin listener runs until the process ends: a config without
                // `admin:` keeps the access it had rather than opening the listener up.
                Some(p) if config.admin.is_none() => p.admin_access.clone(),
                _ => Arc::new(AdminAccess::of(&config)),
            },
            tenants,
            routes: Arc::new(Routes::new(&config.routes)),
            config: Arc::new(config),
            backends: Arc::new(backends),
            policies,
            models_json,
        };
        Ok((runtime, kept))
    }
}

/// An OpenAI model list.
pub fn models_list<'a>(models: impl Iterator<Item = &'a str>) -> Bytes {
    let data: Vec<serde_json::Value> = models.map(model_object).collect();
    Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string())
}

/// One model as OpenAI's API describes it (`GET /v1/models/{model}`, and each entry of the
/// list).
pub fn model_object(model: &str) -> serde_json::Value {
    serde_json::json!({ "id": model, "object": "model", "created": 0, "owned_by": "switchyard" })
}

/// The current snapshot, shared by every worker thread, and what the admin API reports
/// about policy versions.
#[derive(Debug)]
pub struct Shared {
    current: ArcSwap<Runtime>,
    /// Per policy: the version in service and the last version refused. Written only by
    /// reloads, read by the admin API; never on the request path.
    pub policy_status: Mutex<BTreeMap<String, PolicyStatus>>,
    /// The last config file refused since the one in service was loaded, if any.
    pub config_rejection: Mutex<Option<ConfigRejection>>,
    /// The audit log and the recent decisions (not replaced by reloads).
    pub audit: Audit,
    /// Tenant limit counters (kept across reloads; Redis settings are read at start).
    pub limiter: Limiter,
}

/// A policy's state, as `GET /admin/policies` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatus {
    pub version: String,
    /// Unix seconds when this version went into service.
    pub loaded_at: u64,
    pub last_rejection: Option<Rejection>,
}

/// A version that was refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub version: String,
    pub at: u64,
    pub reason: String,
}

/// A config file that was refused whole (the config in service keeps serving), and why.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRejection {
    pub at: u64,
    /// Every problem, with its path in the config (or the policy file and line).
    pub problems: Vec<String>,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Shared {
    /// Each policy's status, for a reload to write or the admin API to read.
    pub fn policy_status(&self) -> MutexGuard<'_, BTreeMap<String, PolicyStatus>> {
        self.policy_status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn new(runtime: Runtime, audit: Audit, limiter: Limiter) -> Shared {
        let now = unix_now();
        let status = runtime
            .policies
            .iter()
            .map(|p| {
                let s = PolicyStatus {
                    version: p.version.clone(),
                    loaded_at: now,
                    last_rejection: None,
                };
                (p.name.clone(), s)
            })
            .collect();
        Shared {
            current: ArcSwap::from_pointee(runtime),
            policy_status: Mutex::new(status),
            config_rejection: Mutex::new(None),
            audit,
            limiter,
        }
    }

    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    pub fn store(&self, runtime: Runtime) {
        self.current.store(Arc::new(runtime));
    }
}
