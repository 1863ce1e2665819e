//! The runtime snapshot: config, backend set, routes and policies of one generation, held
//! in an `ArcSwap` and replaced whole. A request keeps the snapshot it started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::backends::BackendSet;
use crate::config::Config;
use crate::policy::PolicySet;
use crate::routes::Routes;

/// Everything a request needs that can change at run time.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub backends: Arc<BackendSet>,
    pub routes: Routes,
    pub policies: PolicySet,
    /// Body of `GET /v1/models`: every configured model, OpenAI list format.
    pub models_json: Bytes,
}

impl Runtime {
    /// Build a snapshot from a validated config; the previous snapshot lends its backend
    /// statistics. Every policy the routes name is compiled and its tests run.
    pub fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, Vec<String>> {
        let backends = BackendSet::build(&config, previous.map(|p| p.backends.as_ref()))
            .map_err(|e| vec![e])?;
        let policies = PolicySet::load(&config.policies_dir, &config.policy_names(), &config.lua)?;
        let models: Vec<serde_json::Value> = config
            .model_names()
            .into_iter()
            .map(|m| serde_json::json!({ "id": m, "object": "model", "created": 0, "owned_by": "switchyard" }))
            .collect();
        let models_json =
            Bytes::from(serde_json::json!({ "object": "list", "data": models }).to_string());
        Ok(Runtime {
            routes: Routes::new(&config.routes),
            config: Arc::new(config),
            backends: Arc::new(backends),
            policies,
            models_json,
        })
    }
}

/// The current snapshot, shared by every worker thread.
#[derive(Debug)]
pub struct Shared {
    current: ArcSwap<Runtime>,
}

impl Shared {
    pub fn new(runtime: Runtime) -> Shared {
        Shared {
            current: ArcSwap::from_pointee(runtime),
        }
    }

    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    pub fn store(&self, runtime: Runtime) {
        self.current.store(Arc::new(runtime));
    }
}
