//! Routes: which policy decides for a request, chosen by path prefix and model glob. The
//! first route whose `match` fits wins.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use wildmatch::WildMatch;

use crate::config::{ParamValue, Route as RouteConfig};

/// A route's `params`, as `req.params` shows them. The id is unique for the life of the
/// process, so each Lua VM builds the table once and reuses it.
#[derive(Debug, Default)]
pub struct Params {
    pub id: u64,
    pub values: BTreeMap<String, ParamValue>,
}

static NEXT_PARAMS_ID: AtomicU64 = AtomicU64::new(1);

impl Params {
    pub fn new(values: BTreeMap<String, ParamValue>) -> Params {
        Params {
            id: NEXT_PARAMS_ID.fetch_add(1, Ordering::Relaxed),
            values,
        }
    }
}

/// A route ready to match.
#[derive(Debug)]
pub struct Route {
    path_prefix: Option<String>,
    model: Option<WildMatch>,
    pub policy: String,
    pub fallback_policy: Option<String>,
    pub max_attempts: usize,
    pub retry_on_timeout: bool,
    pub queue_max: usize,
    pub queue_timeout: std::time::Duration,
    /// Requests waiting for capacity on this route now.
    pub queued: AtomicUsize,
    pub params: Arc<Params>,
}

impl Route {
    fn matches(&self, path: &str, model: Option<&str>) -> bool {
        let path_ok = self
            .path_prefix
            .as_deref()
            .is_none_or(|p| path.starts_with(p));
        let model_ok = match (&self.model, model) {
            (None, _) => true,
            (Some(glob), Some(m)) => glob.matches(m),
            // A route for some models never takes a request that names none.
            (Some(_), None) => false,
        };
        path_ok && model_ok
    }
}

/// The ordered routes of one config.
#[derive(Debug, Default)]
pub struct Routes(Vec<Route>);

impl Routes {
    pub fn new(config: &[RouteConfig]) -> Routes {
        Routes(
            config
                .iter()
                .map(|r| Route {
                    path_prefix: r.matcher.path_prefix.clone(),
                    model: r.matcher.model.as_deref().map(WildMatch::new),
                    policy: r.policy.clone(),
                    fallback_policy: r.fallback_policy.clone(),
                    max_attempts: r.max_attempts as usize,
                    retry_on_timeout: r.retry_on_timeout,
                    queue_max: r.queue_max,
                    queue_timeout: std::time::Duration::from_millis(r.queue_timeout_ms),
                    queued: AtomicUsize::new(0),
                    params: Arc::new(Params::new(r.params.clone())),
                })
                .collect(),
        )
    }

    /// The first route that fits.
    pub fn select(&self, path: &str, model: Option<&str>) -> Option<&Route> {
        self.0.iter().find(|r| r.matches(path, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteMatch;

    fn route(prefix: Option<&str>, model: Option<&str>, policy: &str) -> RouteConfig {
        RouteConfig {
            matcher: RouteMatch {
                path_prefix: prefix.map(String::from),
                model: model.map(String::from),
            },
            policy: policy.into(),
            fallback_policy: None,
            max_attempts: 3,
            retry_on_timeout: false,
            queue_max: 64,
            queue_timeout_ms: 5_000,
            params: Default::default(),
        }
    }

    #[test]
    fn first_match_wins_by_prefix_and_model_glob() {
        let routes = Routes::new(&[
            route(Some("/v1/"), Some("gpt-4*"), "cost"),
            route(Some("/v1/"), None, "least_inflight"),
        ]);
        assert_eq!(
            routes
                .select("/v1/chat/completions", Some("gpt-4o"))
                .unwrap()
                .policy,
            "cost"
        );
        assert_eq!(
            routes
                .select("/v1/chat/completions", Some("llama"))
                .unwrap()
                .policy,
            "least_inflight"
        );
        assert_eq!(
            routes.select("/v1/chat/completions", None).unwrap().policy,
            "least_inflight"
        );
        assert!(routes.select("/other", Some("gpt-4o")).is_none());
    }
}
