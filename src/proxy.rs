//! The request lifecycle: Switchyard's `ProxyHttp` implementation. Each phase is short and
//! hands its work to the module that owns it; read top to bottom, it is the story of one
//! request:
//!
//! 1. `request_filter` — read and bound the body, extract [`RequestMeta`], pick the route,
//!    run its policy, apply the guardrails: an ordered plan of backends.
//! 2. `upstream_peer` — the next backend of the plan; counts it in flight.
//! 3. `upstream_request_filter` / `request_body_filter` — swap client credentials for the
//!    backend's, and send the whole body (again, on a retry).
//! 4. `upstream_response_filter` — a 5xx/429/401 before any byte went to the client moves
//!    the request to the next backend of the plan.
//! 5. body filters — the response streams through chunk by chunk; TTFT is taken at the
//!    first chunk.
//! 6. `logging` — statistics and the access log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use log::{info, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::backends::{Backend, InflightGuard, Outcome};
use crate::body;
use crate::errors::ClientError;
use crate::metrics::METRICS;
use crate::plan::{self, Plan};
use crate::request::{RequestMeta, CREDENTIAL_HEADERS};
use crate::runtime::{Runtime, Shared};
use crate::usage::{Usage, UsageReader};

/// Header carrying the request id, to the client and upstream.
pub const REQUEST_ID: &str = "x-request-id";
/// Header naming the backend that produced a response.
pub const SERVED_BY: &str = "x-switchyard-backend";

/// The Switchyard proxy service.
pub struct Switchyard {
    shared: Arc<Shared>,
}

impl Switchyard {
    pub fn new(shared: Arc<Shared>) -> Self {
        Switchyard { shared }
    }
}

/// Per-request state, from `request_filter` to `logging`.
pub struct RequestCtx {
    request_id: String,
    started: Instant,
    runtime: Option<Arc<Runtime>>,
    meta: Option<Arc<RequestMeta>>,
    /// The client's body, whole; replayed on every attempt.
    body: Option<Bytes>,
    plan: Option<Plan>,
    /// One entry per upstream attempt, in order.
    attempts: Vec<Attempt>,
    current: Option<Current>,
    /// An error answered by Switchyard itself, decided before `fail_to_proxy` runs.
    failure: Option<ClientError>,
    /// The pooled connection of the current attempt turned out stale; try the same
    /// backend once more on a fresh one.
    retry_same_backend: bool,
    status: u16,
    /// Tokens of the answer, when the response reported (or streamed) them.
    usage: Option<Usage>,
}

/// The attempt in progress.
struct Current {
    backend: Arc<Backend>,
    started: Instant,
    first_byte: Option<Instant>,
    last_byte: Option<Instant>,
    /// The body as this backend gets it (the model renamed if the backend maps it).
    body: Option<Bytes>,
    /// Reads `usage` from the response as it streams by.
    usage_reader: Option<UsageReader>,
    _inflight: InflightGuard,
}

/// What happened to one upstream attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub backend: String,
    pub outcome: String,
}

impl RequestCtx {
    fn new() -> Self {
        RequestCtx {
            request_id: String::new(),
            started: Instant::now(),
            runtime: None,
            meta: None,
            body: None,
            plan: None,
            attempts: Vec::new(),
            current: None,
            failure: None,
            retry_same_backend: false,
            status: 0,
            usage: None,
        }
    }

    /// Whether another backend of the plan may still be tried.
    fn can_try_next(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| {
            self.attempts.len() < p.max_attempts && self.attempts.len() < p.backends.len()
        })
    }

    /// Close the current attempt with an outcome; it counts for the backend's statistics.
    fn finish_attempt(&mut self, outcome: Outcome, what: impl Into<String>) {
        if let Some(cur) = self.current.take() {
            cur.backend.stats.record_outcome(outcome);
            if outcome == Outcome::Success {
                cur.backend.stats.record_latency(cur.started.elapsed());
            }
            self.attempts.push(Attempt {
                backend: cur.backend.name().to_string(),
                outcome: what.into(),
            });
        }
    }

    fn backend_name(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.backend.name())
    }
}

#[async_trait]
impl ProxyHttp for Switchyard {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// Decide where the request goes. Answers the client itself (`Ok(true)`) for bad
    /// requests, `GET /v1/models`, and policy rejections.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(session.req_header());
        let runtime = self.shared.load();
        ctx.runtime = Some(runtime.clone());
        match admit(session, ctx, &runtime).await {
            Ok(Admitted::Proxy) => Ok(false),
            Ok(Admitted::Answer(body)) => {
                respond(session, ctx, 200, body, None).await;
                Ok(true)
            }
            Err(e) => {
                reject(session, ctx, e).await;
                Ok(true)
            }
        }
    }

    /// The next backend of the plan, counted in flight until its attempt ends.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let backend = if std::mem::take(&mut ctx.retry_same_backend) {
            ctx.current.as_ref().map(|c| c.backend.clone())
        } else {
            ctx.plan
                .as_ref()
                .and_then(|p| p.backends.get(ctx.attempts.len()).cloned())
        };
        let Some(backend) = backend else {
            // Unreachable while errors are marked retryable only with a backend left.
            ctx.failure = Some(ClientError::UpstreamUnavailable);
            return Err(Error::explain(
                ErrorType::InternalError,
                "no backend left to try",
            ));
        };
        let runtime = ctx
            .runtime
            .as_ref()
            .expect("request_filter sets the runtime");
        let body = match (&ctx.body, &ctx.meta) {
            (Some(body), Some(meta)) => Some(plan::body_for(body, meta, &backend)),
            (body, _) => body.clone(),
        };
        let peer = peer_for(&backend, &runtime.config.proxy);
        ctx.current = Some(Current {
            _inflight: backend.stats.start(),
            backend,
            started: Instant::now(),
            first_byte: None,
            last_byte: None,
            body,
            usage_reader: None,
        });
        Ok(Box::new(peer))
    }

    /// Client credentials out, the backend's in; the body's length as this backend gets it.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let cur = ctx
            .current
            .as_ref()
            .expect("upstream_peer sets the attempt");
        for name in CREDENTIAL_HEADERS {
            upstream.remove_header(name);
        }
        plan::inject_credentials(upstream, &cur.backend)?;
        let prefix = &cur.backend.upstream.path_prefix;
        if !prefix.is_empty() {
            let path = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
            let uri: http::Uri = format!("{prefix}{path}")
                .parse()
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?;
            upstream.set_uri(uri);
        }
        upstream.insert_header(http::header::HOST, cur.backend.upstream.authority.as_str())?;
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(body) = &cur.body {
            upstream.remove_header(&http::header::TRANSFER_ENCODING);
            upstream.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        }
        Ok(())
    }

    /// The body was read whole in `request_filter`; send it (again, on a retry) at the end
    /// of the client's stream, in place of whatever Pingora buffered.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let full = ctx.current.as_ref().and_then(|c| c.body.clone());
        if full.is_some() {
            *body = if end_of_stream {
                full
            } else {
                Some(Bytes::new())
            };
        }
        Ok(())
    }

    /// A backend's failure status before any byte went downstream moves the request to the
    /// next backend; the last one's answer is relayed as it is (except 401/403).
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream.status.as_u16();
        let auth_failed = matches!(status, 401 | 403);
        let failed = status >= 500 || status == 429 || auth_failed;
        if !failed {
            if let Some(cur) = ctx.current.as_mut() {
                let content_type = upstream
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                cur.usage_reader = Some(UsageReader::new(content_type));
            }
            return Ok(());
        }
        let name = ctx.backend_name().unwrap_or_default().to_string();
        if auth_failed {
            warn!(
                "{} backend {name} refused our credentials ({status})",
                ctx.request_id
            );
        }
        if auth_failed
            || ctx.attempts.len() + 1
                < ctx
                    .plan
                    .as_ref()
                    .map_or(0, |p| p.max_attempts.min(p.backends.len()))
        {
            let outcome = if status == 429 {
                Outcome::Throttled
            } else {
                Outcome::Failure
            };
            ctx.finish_attempt(outcome, format!("status {status}"));
            let retry = ctx.can_try_next();
            if !retry && auth_failed {
                ctx.failure = Some(ClientError::UpstreamAuthFailed);
            }
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("backend {name} answered {status}"),
            );
            e.set_retry(retry);
            return Err(e);
        }
        Ok(())
    }

    /// Each chunk passes straight through; on the way, TTFT is taken at the first and
    /// usage read from all of them.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let Some(cur) = ctx.current.as_mut() else {
            return Ok(None);
        };
        let now = Instant::now();
        if cur.first_byte.is_none() {
            cur.first_byte = Some(now);
            cur.backend.stats.record_ttft(now - cur.started);
            METRICS
                .ttft
                .with_label_values(&[cur.backend.name()])
                .observe((now - cur.started).as_secs_f64());
        }
        cur.last_byte = Some(now);
        if let (Some(reader), Some(chunk)) = (cur.usage_reader.as_mut(), body.as_ref()) {
            reader.feed(chunk);
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(name) = ctx.backend_name() {
            response.insert_header(SERVED_BY, name)?;
        }
        ctx.status = response.status.as_u16();
        Ok(())
    }

    /// Connection failures: count against the backend; retry on the next one.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.finish_attempt(Outcome::Failure, format!("connect: {}", e.etype().as_str()));
        e.set_retry(ctx.can_try_next());
        e
    }

    /// Errors after connecting. A retry is allowed only while nothing went downstream —
    /// whatever the method, since the body is replayed whole from memory.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if session.response_written().is_some() {
            e.set_retry(false);
            return e;
        }
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) {
            // Our own verdict from upstream_response_filter; its retry flag stands.
            return e;
        }
        let stale = client_reused
            && *e.esource() == ErrorSource::Upstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
            && ctx.current.as_ref().is_some_and(|c| c.first_byte.is_none());
        if stale && !ctx.attempts.iter().any(|a| a.outcome == "stale connection") {
            // A pooled connection the backend had already closed: not the backend's fault.
            ctx.retry_same_backend = true;
            ctx.attempts.push(Attempt {
                backend: ctx.backend_name().unwrap_or_default().to_string(),
                outcome: "stale connection".into(),
            });
            e.set_retry(true);
            return e;
        }
        ctx.finish_attempt(Outcome::Failure, e.etype().as_str());
        e.set_retry(ctx.can_try_next());
        e
    }

    /// The request could not be proxied: answer with the OpenAI envelope, unless the
    /// response had already started (then the connection is closed, so the client sees an
    /// unfinished response rather than a made-up ending).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if session.response_written().is_some() {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let error = ctx.failure.take().unwrap_or_else(|| match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                ClientError::UpstreamTimeout
            }
            _ if *e.esource() == ErrorSource::Downstream => ClientError::BadBody,
            _ => ClientError::UpstreamUnavailable,
        });
        if *e.esource() == ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
            )
        {
            // The client is gone; there is no one to answer.
            ctx.status = 499;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let status = error.status();
        // Pingora closes the client connection after a failed proxy attempt whatever we
        // return here; say so, or a keep-alive client races into a reset.
        session.set_keepalive(None);
        reject(session, ctx, error).await;
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if e.is_none() {
            read_usage(ctx);
        }
        let served_by = ctx.backend_name().unwrap_or("none").to_string();
        count_request(ctx, &served_by);
        if ctx.current.is_some() {
            let ok = e.is_none() && ctx.status < 500;
            ctx.finish_attempt(
                if ok {
                    Outcome::Success
                } else {
                    Outcome::Failure
                },
                format!("status {}", ctx.status),
            );
        }
        let head = session.req_header();
        let meta = ctx.meta.as_deref();
        let attempts: Vec<String> = ctx
            .attempts
            .iter()
            .map(|a| format!("{}:{}", a.backend, a.outcome))
            .collect();
        info!(
            target: "switchyard::access",
            "{} {} {} status={} tenant={} model={} policy={} attempts=[{}] tokens_in={} tokens_out={} ms={:.1}{}",
            ctx.request_id,
            head.method,
            head.uri.path(),
            ctx.status,
            meta.map_or("-", |m| m.tenant.as_str()),
            meta.and_then(|m| m.model.as_deref()).unwrap_or("-"),
            ctx.plan.as_ref().map_or("-", |p| p.policy.as_str()),
            attempts.join(","),
            ctx.usage.map_or(0, |u| u.prompt_tokens),
            ctx.usage.map_or(0, |u| u.completion_tokens),
            ctx.started.elapsed().as_secs_f64() * 1e3,
            e.map(|e| format!(" error=\"{e}\"")).unwrap_or_default(),
        );
    }
}

/// Take the usage of a completed response; its decode rate feeds the backend's `tps`.
fn read_usage(ctx: &mut RequestCtx) {
    let Some(cur) = ctx.current.as_mut() else {
        return;
    };
    let Some(usage) = cur.usage_reader.take().and_then(UsageReader::finish) else {
        return;
    };
    if let (Some(first), Some(last)) = (cur.first_byte, cur.last_byte) {
        let decoding = last - first;
        if usage.completion_tokens > 1 && decoding > Duration::from_millis(1) {
            cur.backend
                .stats
                .record_tps(usage.completion_tokens as f64 / decoding.as_secs_f64());
        }
    }
    ctx.usage = Some(usage);
}

/// Count the request in `switchyard_requests_total` and the duration histogram.
fn count_request(ctx: &RequestCtx, served_by: &str) {
    let model = match (
        ctx.meta.as_deref().and_then(|m| m.model.as_deref()),
        &ctx.runtime,
    ) {
        (None, _) => "none",
        (Some(m), Some(rt)) if rt.backends.knows_model(m) => m,
        // Label values never come from raw client input.
        (Some(_), _) => "other",
    };
    let mut status = itoa::Buffer::new();
    METRICS
        .requests
        .with_label_values(&[served_by, model, status.format(ctx.status)])
        .inc();
    METRICS
        .request_duration
        .with_label_values(&[served_by])
        .observe(ctx.started.elapsed().as_secs_f64());
    if let (Some(usage), Some(cur), Some(meta)) = (&ctx.usage, &ctx.current, &ctx.meta) {
        let cost = &cur.backend.config.cost;
        METRICS
            .tokens
            .with_label_values(&[served_by, model, "in"])
            .inc_by(usage.prompt_tokens);
        METRICS
            .tokens
            .with_label_values(&[served_by, model, "out"])
            .inc_by(usage.completion_tokens);
        let usd = (usage.prompt_tokens as f64 * cost.input
            + usage.completion_tokens as f64 * cost.output)
            / 1e6;
        METRICS
            .cost_usd
            .with_label_values(&[meta.tenant.as_str(), served_by])
            .inc_by(usd);
    }
}

/// What `request_filter` decided.
enum Admitted {
    /// Forward to the plan's backends.
    Proxy,
    /// Switchyard answers this itself with a JSON body.
    Answer(Bytes),
}

/// Read the request, decide its plan, and store both in `ctx`.
async fn admit(
    session: &mut Session,
    ctx: &mut RequestCtx,
    runtime: &Arc<Runtime>,
) -> Result<Admitted, ClientError> {
    let head = session.req_header();
    let path = head.uri.path().to_string();
    let tenant = runtime.tenants.authenticate(&head.headers).map_err(|why| {
        info!(target: "switchyard::auth", "{} refused: {why:?} API key", ctx.request_id);
        ClientError::Unauthorized
    })?;
    if head.method == http::Method::GET && path == "/v1/models" {
        return Ok(Admitted::Answer(plan::visible_models(runtime, tenant)));
    }
    let mut meta = RequestMeta::from_head(head.method.as_str(), &path, &head.headers);
    meta.tenant = tenant.name.clone();
    if meta.region.is_none() {
        meta.region = tenant.region.clone();
    }
    // The OpenAI APIs take JSON whatever the content type says (curl -d sends a form type).
    let json = plan::is_json(head) || plan::needs_model(head.method.as_str(), &path);
    let proxy = &runtime.config.proxy;
    let body = body::read(
        session,
        proxy.max_body_bytes,
        Duration::from_millis(proxy.body_timeout_ms),
    )
    .await?;
    if let (Some(b), true) = (&body, json) {
        meta.read_json_body(b)?;
    }
    if meta.model.is_none() && plan::needs_model(&meta.method, &path) {
        return Err(ClientError::MissingModel);
    }
    let meta = Arc::new(meta);
    ctx.meta = Some(meta.clone());
    ctx.body = body;
    ctx.plan = Some(plan::decide(runtime, tenant, &meta, &ctx.request_id)?);
    Ok(Admitted::Proxy)
}

/// The client's `x-request-id` when it is a sane token, else a fresh UUID.
fn request_id(head: &RequestHeader) -> String {
    head.headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn peer_for(backend: &Backend, proxy: &crate::config::ProxyConfig) -> HttpPeer {
    let mut peer = HttpPeer::new(
        backend.addr,
        backend.upstream.tls,
        backend.upstream.host.clone(),
    );
    let o = &mut peer.options;
    o.connection_timeout = Some(Duration::from_millis(proxy.connect_timeout_ms));
    // Pingora's read timeout is the gap allowed between two reads: the first read waits for
    // the response head, later ones for stream chunks.
    o.read_timeout = Some(Duration::from_millis(
        proxy.ttfb_timeout_ms.max(proxy.idle_timeout_ms),
    ));
    o.write_timeout = Some(Duration::from_millis(proxy.idle_timeout_ms));
    o.idle_timeout = Some(Duration::from_secs(60));
    peer
}

/// Answer the client with an error in the OpenAI envelope.
async fn reject(session: &mut Session, ctx: &mut RequestCtx, error: ClientError) {
    info!(target: "switchyard::reject", "{} {} -> {} {}", ctx.request_id, session.req_header().uri.path(), error.status(), error);
    let status = error.status();
    let retry_after = error.retry_after_secs();
    respond(session, ctx, status, error.envelope(), retry_after).await;
}

/// Write a complete JSON response from Switchyard itself.
async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Bytes,
    retry_after: Option<u64>,
) {
    ctx.status = status;
    let build = || -> Result<ResponseHeader> {
        let mut h = ResponseHeader::build(status, Some(4))?;
        h.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        h.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        h.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(s) = retry_after {
            h.insert_header(http::header::RETRY_AFTER, s)?;
        }
        Ok(h)
    };
    let result = match build() {
        Ok(h) => match session.write_response_header(Box::new(h), false).await {
            Ok(()) => session.write_response_body(Some(body), true).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        info!("{} could not answer the client: {e}", ctx.request_id);
    }
}
