//! The plan for one request: which route, which policy, and — after the guardrails the
//! policy cannot override — the ordered backends to try. Also what each backend gets:
//! its own credentials and, where it knows the model by another name, a renamed body.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use log::warn;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backends::{Backend, Ineligible, InflightGuard, CAPACITY_FREED};
use crate::errors::ClientError;
use crate::metrics::METRICS;
use crate::policy::{self, Decision, Policy};
use crate::provider;
use crate::request::RequestMeta;
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::tenants::Tenant;

/// Backends to try for a request, in order.
#[derive(Debug)]
pub struct Plan {
    pub backends: Vec<Arc<Backend>>,
    /// Attempts allowed (the route's `max_attempts`).
    pub max_attempts: usize,
    /// The route's `retry_on_timeout`.
    pub retry_on_timeout: bool,
    /// `name@version` of the policy that decided.
    pub policy: Arc<str>,
    /// A slot already taken on the first backend (see `Backend::try_start_request`).
    pub reserved: Option<InflightGuard>,
    /// Backends offered to the policy.
    pub candidates: Vec<Arc<Backend>>,
    /// Backends left out, and why.
    pub skipped: Vec<(String, &'static str)>,
    /// Every backend was out (unhealthy or ejected) and `outlier.panic_mode` is on, so all
    /// were offered anyway: an ejected one takes the request too.
    pub panic: bool,
}

/// What a request that got no plan was offered, for its audit record: the backends its
/// policy was offered (none when none was eligible) and those left out, and why.
#[derive(Debug, Default)]
pub struct Considered {
    pub candidates: Vec<Arc<Backend>>,
    pub skipped: Vec<(String, &'static str)>,
}

/// Why no plan could be made.
#[derive(Debug)]
pub enum Refusal {
    /// Answer the client with this error.
    Client(ClientError),
    /// Every candidate is at `max_inflight`: the request may wait in its route's queue.
    AtCapacity,
}

impl From<ClientError> for Refusal {
    fn from(e: ClientError) -> Self {
        Refusal::Client(e)
    }
}

/// What a request may be routed to by the config alone: its route and the backends that
/// serve its model, speak its wire format and are in its tenant's regions. Screened before
/// the tenant's limits count the request, so one that no backend could ever serve (an
/// unknown model, say) is refused for that and not counted.
#[derive(Debug)]
pub struct Screened<'r> {
    route: &'r Route,
    /// Backends that serve the model in the request's format and the tenant may use.
    pub allowed: Vec<Arc<Backend>>,
    /// Backends left out, and why (the format guardrail's).
    skipped: Vec<(String, &'static str)>,
}

/// Find the request's route and the backends it may use; see [`Screened`].
pub fn screen<'r>(
    runtime: &'r Runtime,
    tenant: &Tenant,
    meta: &RequestMeta,
) -> Result<Screened<'r>, ClientError> {
    let model = meta.model.as_deref();
    let route = runtime
        .routes
        .select(&meta.path, model)
        .ok_or_else(|| ClientError::NotFound(meta.path.chars().take(200).collect()))?;
    if let Some(m) = model {
        if !runtime.backends.knows_model(m) {
            return Err(ClientError::ModelNotFound(m.chars().take(200).collect()));
        }
        if !tenant.may_use_model(m) {
            return Err(ClientError::Forbidden(format!(
                "this API key may not use model `{m}`"
            )));
        }
    }
    // The wire format is a guardrail too: a backend never gets a request it cannot parse.
    let mut skipped = Vec::new();
    let mut serving = runtime.backends.serving(model);
    serving.retain(|b| {
        let why = if !provider::speaks(b, meta.format) {
            Some(meta.format.mismatch_reason())
        } else if !provider::takes_path(b, &meta.path) {
            Some("guardrail: an azure backend takes only paths under /v1/")
        } else {
            None
        };
        if let Some(why) = why {
            skipped.push((b.name().to_string(), why));
        }
        why.is_none()
    });
    if serving.is_empty() {
        return Err(ClientError::NotInFormat {
            model: model.unwrap_or("-").chars().take(200).collect(),
            api: meta.format.api_name(),
        });
    }
    let allowed: Vec<Arc<Backend>> = serving
        .into_iter()
        .filter(|b| tenant.may_use_backend(b))
        .collect();
    if allowed.is_empty() {
        return Err(ClientError::Forbidden(format!(
            "no backend in the regions allowed for this API key serves model `{}`",
            model.unwrap_or("-")
        )));
    }
    Ok(Screened {
        route,
        allowed,
        skipped,
    })
}

/// Run the policy of a screened request over the backends that may take it now, within
/// the guardrails it cannot override. A request refused here leaves what it was offered
/// in `refused`.
pub fn decide(
    runtime: &Runtime,
    screened: &Screened,
    meta: &Arc<RequestMeta>,
    request_id: &str,
    refused: &mut Considered,
) -> Result<Plan, Refusal> {
    let mut skipped = screened.skipped.clone();
    let panic_mode = runtime.config.outlier.panic_mode;
    let offered = eligible(&screened.allowed, panic_mode, request_id, &mut skipped);
    let (candidates, panic) = match offered {
        Ok(c) => c,
        Err(Unavailable { full }) => {
            *refused = Considered {
                candidates: Vec::new(),
                skipped,
            };
            return Err(match full {
                true => Refusal::AtCapacity,
                false => unavailable_now(&screened.allowed, meta.model.as_deref()).into(),
            });
        }
    };
    match choose(
        runtime,
        screened,
        meta,
        request_id,
        &candidates,
        &mut skipped,
    ) {
        Ok(chosen) => Ok(Plan {
            backends: chosen.backends,
            max_attempts: screened.route.max_attempts,
            retry_on_timeout: screened.route.retry_on_timeout,
            reserved: Some(chosen.reserved),
            candidates,
            skipped,
            policy: chosen.policy,
            panic,
        }),
        Err(why) => {
            *refused = Considered {
                candidates,
                skipped,
            };
            Err(why)
        }
    }
}

/// The policy's order of `candidates` after the guardrails, with a slot taken on the one
/// that leads, and the policy's tag. Backends the policy named but may not have are added
/// to `skipped`.
fn choose(
    runtime: &Runtime,
    screened: &Screened,
    meta: &Arc<RequestMeta>,
    request_id: &str,
    candidates: &[Arc<Backend>],
    skipped: &mut Vec<(String, &'static str)>,
) -> Result<Chosen, Refusal> {
    let (decision, policy) = run_policy(runtime, screened.route, meta, candidates, request_id)?;
    let chosen = match decision {
        Decision::Reject { status, message } => {
            return Err(ClientError::PolicyRejected {
                status,
                message,
                policy: policy.tag.clone(),
            }
            .into())
        }
        Decision::Candidates(chosen) => chosen,
    };
    for b in &chosen {
        if !candidates.iter().any(|c| c.id == b.id) && !skipped.iter().any(|(n, _)| n == b.name()) {
            skipped.push((
                b.name().to_string(),
                "guardrail: not allowed for this request",
            ));
        }
    }
    let model = meta.model.as_deref();
    let mut backends = guard(&chosen, candidates, &screened.allowed, model)?;
    // Take a slot now: the first backend of the policy's order that has one leads.
    let Some((first, reserved)) = backends
        .iter()
        .enumerate()
        .find_map(|(i, b)| b.try_start_request().map(|g| (i, g)))
    else {
        return Err(Refusal::AtCapacity);
    };
    if first > 0 {
        let b = backends.remove(first);
        backends.insert(0, b);
    }
    Ok(Chosen {
        backends,
        reserved,
        policy: policy.tag.clone(),
    })
}

/// What [`choose`] made of a policy's answer.
struct Chosen {
    backends: Vec<Arc<Backend>>,
    reserved: InflightGuard,
    policy: Arc<str>,
}

/// The backends that may take a request now. When every one is out only because it is
/// unhealthy or ejected, none (a fast 503 with `Retry-After`, as the health checks keep
/// probing), or with `panic_mode` ("panic mode") all of them, minus drained and full ones,
/// with a warning: for a fleet where routing to possibly-bad backends beats failing every
/// request outright.
fn eligible(
    allowed: &[Arc<Backend>],
    panic_mode: bool,
    request_id: &str,
    skipped: &mut Vec<(String, &'static str)>,
) -> Result<(Vec<Arc<Backend>>, bool), Unavailable> {
    let now = tokio::time::Instant::now();
    let mut candidates = Vec::with_capacity(allowed.len());
    let mut only_health = true;
    let mut any_health = false;
    let mut full = false;
    for b in allowed {
        let eligibility = b.eligibility(now);
        if let Err(why) = eligibility {
            skipped.push((b.name().to_string(), why.as_str()));
        }
        match eligibility {
            Ok(()) => candidates.push(b.clone()),
            Err(Ineligible::Unhealthy | Ineligible::Ejected) => any_health = true,
            // A drained backend is out by the operator's hand, as if absent: it does not
            // keep the others out of panic mode.
            Err(Ineligible::Draining) => {}
            Err(Ineligible::Full) => {
                only_health = false;
                full = true;
            }
            Err(_) => only_health = false,
        }
    }
    let panic = panic_mode && candidates.is_empty() && only_health && any_health;
    if panic {
        warn!(target: "switchyard::health", "{request_id} panic mode: every backend for this request is unhealthy or ejected; trying them all");
        candidates = allowed
            .iter()
            .filter(|b| !b.stats.breaker.is_draining() && b.has_capacity())
            .cloned()
            .collect();
    }
    if candidates.is_empty() {
        Err(Unavailable { full })
    } else {
        Ok((candidates, panic))
    }
}

/// No backend can take the request now; `full` when some are only at capacity.
struct Unavailable {
    full: bool,
}

/// Wait in the route's bounded queue until a backend has capacity (then plan again), or
/// until the queue timeout (503 with `Retry-After`).
pub async fn wait_for_capacity(
    runtime: &Runtime,
    screened: &Screened<'_>,
    meta: &Arc<RequestMeta>,
    request_id: &str,
    refused: &mut Considered,
) -> Result<Plan, ClientError> {
    let unavailable = || ClientError::no_backend(meta.model.as_deref().unwrap_or("-"));
    let route = screened.route;
    if route.queued.fetch_add(1, Ordering::AcqRel) >= route.queue_max {
        route.queued.fetch_sub(1, Ordering::AcqRel);
        return Err(unavailable());
    }
    // Leaves the queue however this future ends, also when the client goes away.
    struct Queued<'a>(&'a AtomicUsize);
    impl Drop for Queued<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _queued = Queued(&route.queued);
    let deadline = tokio::time::Instant::now() + route.queue_timeout;
    loop {
        // Registered before planning again, so a wake-up in between is not lost.
        let freed = CAPACITY_FREED.notified();
        match decide(runtime, screened, meta, request_id, refused) {
            Ok(plan) => return Ok(plan),
            Err(Refusal::Client(e)) => return Err(e),
            Err(Refusal::AtCapacity) => {}
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            return Err(unavailable());
        }
    }
}

/// Run the route's policy; when it fails, its fallback (if any). A failure is logged with
/// the policy's version and the reason (which carries the script line).
fn run_policy<'r>(
    runtime: &'r Runtime,
    route: &Route,
    meta: &Arc<RequestMeta>,
    candidates: &[Arc<Backend>],
    request_id: &str,
) -> Result<(Decision<Arc<Backend>>, &'r Arc<Policy>), ClientError> {
    let mut tried = Vec::new();
    for name in std::iter::once(route.policy.as_str()).chain(route.fallback_policy.as_deref()) {
        let Some(policy) = runtime.policies.get(name) else {
            warn!("{request_id} policy `{name}` is not loaded");
            continue;
        };
        match policy::decide(
            policy,
            meta,
            &route.params,
            candidates,
            &runtime.backends,
            &runtime.config.lua,
            // A few more names than attempts, for those the guardrails may drop.
            route.max_attempts + 2,
        ) {
            Ok(decision) => {
                if let Decision::Candidates(chosen) = &decision {
                    let first = chosen.first().map_or("-", |b| b.name());
                    // Only configured names reach here (unknown ones are a policy error).
                    METRICS
                        .policy_decisions
                        .with_label_values(&[name, first])
                        .inc();
                }
                return Ok((decision, policy));
            }
            Err(e) => {
                tried.push(&*policy.tag);
                METRICS
                    .policy_errors
                    .with_label_values(&[name, e.kind()])
                    .inc();
                warn!(
                target: "switchyard::policy",
                "{request_id} policy {} failed ({}): {e}",
                policy.tag,
                e.kind()
                )
            }
        }
    }
    let policy = match tried.is_empty() {
        true => route.policy.as_str().into(),
        false => tried.join(",").into(),
    };
    Err(ClientError::PolicyFailed { policy })
}

/// 503 for a request that backends `allowed` could serve but none can take now. When some
/// are cooling down after a 429, `Retry-After` says when the first of them is back (a
/// client that honours it would otherwise spend its retries in seconds).
fn unavailable_now(allowed: &[Arc<Backend>], model: Option<&str>) -> ClientError {
    let now = tokio::time::Instant::now();
    let back_in = allowed
        .iter()
        .filter(|b| b.eligibility(now) == Err(Ineligible::CoolingDown))
        .filter_map(|b| b.stats.breaker.cooling_for(now))
        .min();
    ClientError::NoBackendAvailable {
        model: model.unwrap_or("-").to_string(),
        retry_after_secs: back_in.map_or(1, |wait| wait.as_secs_f64().ceil() as u64),
    }
}

/// The rules a policy cannot break: only backends that are candidates for this request
/// (serve the model, allowed for the tenant, eligible now) are kept, each once, in the
/// policy's order. When none is left, a policy that named backends the request may use
/// but that cannot take it now gets the client a 503 to retry (or, when they are only
/// full, a wait in the route's queue); one that named only backends the request may not
/// use, a 403.
fn guard(
    chosen: &[Arc<Backend>],
    candidates: &[Arc<Backend>],
    allowed: &[Arc<Backend>],
    model: Option<&str>,
) -> Result<Vec<Arc<Backend>>, Refusal> {
    let mut plan: Vec<Arc<Backend>> = Vec::with_capacity(chosen.len());
    for c in chosen {
        if let Some(b) = candidates.iter().find(|b| b.id == c.id) {
            if !plan.iter().any(|p| p.id == b.id) {
                plan.push(b.clone());
            }
        }
    }
    if plan.is_empty() {
        let may_serve: Vec<Arc<Backend>> = chosen
            .iter()
            .filter(|c| allowed.iter().any(|b| b.id == c.id))
            .cloned()
            .collect();
        let now = tokio::time::Instant::now();
        return Err(if may_serve.is_empty() {
            ClientError::Forbidden(format!(
                "the routing policy chose no backend that may serve model `{}`",
                model.unwrap_or("-")
            ))
            .into()
        } else if may_serve
            .iter()
            .all(|b| b.eligibility(now) == Err(Ineligible::Full))
        {
            Refusal::AtCapacity
        } else {
            unavailable_now(&may_serve, model).into()
        });
    }
    Ok(plan)
}

/// `GET /v1/models` for a tenant: only the models it may use.
pub fn visible_models(runtime: &Runtime, tenant: &Tenant) -> Bytes {
    let names = runtime.config.model_names();
    let visible = |m: &&str| may_reach(runtime, tenant, m);
    if names.iter().map(String::as_str).all(|m| visible(&m)) {
        return runtime.models_json.clone();
    }
    crate::runtime::models_list(names.iter().map(String::as_str).filter(visible))
}

/// Whether `tenant` may use `model` and a backend in its regions serves it.
fn may_reach(runtime: &Runtime, tenant: &Tenant, model: &str) -> bool {
    tenant.may_use_model(model)
        && runtime
            .backends
            .each_serving(Some(model))
            .any(|b| tenant.may_use_backend(b))
}

/// `GET /v1/models/{model}`: the model, if the tenant may use it and a backend in its
/// regions serves it.
pub fn visible_model(runtime: &Runtime, tenant: &Tenant, model: &str) -> Option<Bytes> {
    may_reach(runtime, tenant, model)
        .then(|| Bytes::from(crate::runtime::model_object(model).to_string()))
}

/// The body as `backend` gets it: unchanged, or with `model` renamed when the backend knows
/// the model by another name.
pub fn body_for(body: &Bytes, meta: &RequestMeta, backend: &Backend) -> Bytes {
    let (Some(model), Some((start, end))) = (meta.model.as_deref(), meta.model_span) else {
        return body.clone();
    };
    match backend.models.get(model) {
        Some(upstream_name) if upstream_name != model && end <= body.len() => {
            let quoted = serde_json::to_string(upstream_name).expect("a string serializes");
            let mut out = BytesMut::with_capacity(body.len() + quoted.len());
            out.extend_from_slice(&body[..start]);
            out.extend_from_slice(quoted.as_bytes());
            out.extend_from_slice(&body[end..]);
            out.freeze()
        }
        _ => body.clone(),
    }
}

/// Whether `path` could name another path to whoever reads it next: a `.` or `..`
/// segment (plain, percent-encoded, or before a `;` parameter), or an encoded slash or a
/// backslash, which servers in front of a backend may turn into a separator. No API
/// Switchyard serves has any of them.
pub fn is_ambiguous_path(path: &str) -> bool {
    // Most paths have no dot, escape or backslash at all: one scan, nothing allocated.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    lower.split('/').any(|segment| {
        let segment = segment.split(';').next().unwrap_or_default();
        let dots = segment.replace("%2e", ".");
        dots == "." || dots == ".."
    })
}

/// The APIs Switchyard forwards, all `POST` with a JSON body naming a model: OpenAI's
/// inference APIs, Anthropic's Messages API, the rerank and score APIs of vLLM and
/// others, and Ollama's own. Anything else (files, batches, fine-tuning, assistants,
/// realtime sessions, stored completions) is refused before its body is read: with a
/// backend's key, it would reach the provider account every tenant shares.
pub fn is_model_api(method: &str, path: &str) -> bool {
    method == "POST"
        && matches!(
            path.strip_suffix('/').unwrap_or(path),
            "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/v1/responses"
                | "/v1/moderations"
                | "/v1/images/generations"
                | "/v1/audio/speech"
                | "/v1/messages"
                | "/v1/messages/count_tokens"
                | "/v1/rerank"
                | "/v1/score"
                | "/api/chat"
                | "/api/generate"
                | "/api/embed"
                | "/api/embeddings"
        )
}

/// Model APIs that generate nothing and that providers do not bill (Anthropic's token
/// count, OpenAI's moderation): a tenant's token and spend limits reserve nothing for them,
/// and their answers carry no usage to settle.
pub fn is_free_api(path: &str) -> bool {
    matches!(
        path.strip_suffix('/').unwrap_or(path),
        "/v1/messages/count_tokens" | "/v1/moderations"
    )
}

#[cfg(test)]
mod tests {
    use super::{is_ambiguous_path, is_free_api, is_model_api};

    #[test]
    fn dot_segments_encoded_slashes_and_backslashes_are_ambiguous() {
        for path in [
            "/v1/../x",
            "/v1/./x",
            "/v1/%2e%2E/x",
            "/v1/.%2e",
            "/.",
            "/v1/x/..",
            "/v1/..%2f..%2fadmin",
            "/v1/a%2Fb",
            "/v1/..%5cadmin",
            "/v1/..\\admin",
            "/v1/..;x=1/admin",
        ] {
            assert!(is_ambiguous_path(path), "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/models/gpt-4.1",
            "/v1/..x",
            "/v1/a%20b",
            "/",
        ] {
            assert!(!is_ambiguous_path(path), "{path}");
        }
    }

    #[test]
    fn only_model_apis_are_forwarded() {
        assert!(is_model_api("POST", "/v1/chat/completions"));
        assert!(is_model_api("POST", "/v1/messages/count_tokens/"));
        assert!(is_free_api("/v1/messages/count_tokens/") && is_free_api("/v1/moderations"));
        assert!(!is_free_api("/v1/messages") && !is_free_api("/v1/embeddings"));
        assert!(is_model_api("POST", "/api/chat"));
        for (method, path) in [
            ("GET", "/v1/chat/completions"),
            ("POST", "/v1/realtime/sessions"),
            ("POST", "/v1/batches"),
            ("POST", "/v1/files"),
            ("PUT", "/v1/chat/completions"),
            ("POST", "/v1/chat/completions//"),
        ] {
            assert!(!is_model_api(method, path), "{method} {path}");
        }
    }
}
