//! The request lifecycle: Switchyard's `ProxyHttp` implementation. Each phase is short and
//! hands its work to the module that owns it; read top to bottom, it is the story of one
//! request:
//!
//! 0. `refuse_request_head` — a head Pingora could not read (or `CONNECT`) still gets
//!    Switchyard's error envelope, request id, access line and metric.
//! 1. `request_filter` — API key → tenant, read and bound the body, extract
//!    [`RequestMeta`], pick the route, run its policy, apply the guardrails: an ordered
//!    plan of backends (waiting in the route's queue while all are at capacity).
//! 2. `upstream_peer` — the next backend of the plan that will take it (an ejected backend
//!    admits one probe at a time); counts it in flight. Its head must come within the
//!    TTFB timeout, each read after it within the idle timeout
//!    (`upstream_read_timeout_after_header`).
//! 3. `upstream_request_filter` / `request_body_filter` — swap client credentials for the
//!    backend's, and send the whole body (again, on a retry).
//! 4. `upstream_response_filter` — a 5xx/429/401 before any byte went to the client moves
//!    the request to the next backend, within the attempt cap and the retry budget; a 429
//!    cools the backend down.
//! 5. body filters — the response streams through chunk by chunk; TTFT at the first
//!    chunk, usage read on the way.
//! 6. failures — connect errors (TLS verification included) and timeouts count against
//!    the backend and may retry; once a byte went downstream nothing is retried.
//! 7. `logging` — the attempt's outcome, statistics, metrics and the access log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use log::{info, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::backends::{Backend, Outcome};
use crate::body;
use crate::context::RequestCtx;
use crate::errors::{ClientError, UpstreamTlsFailure};
use crate::metrics::METRICS;
use crate::outlier::parse_retry_after;
use crate::plan::{self, Refusal};
use crate::provider;
use crate::reply::{refuse_head, reject, request_id, respond, REQUEST_ID, SERVED_BY};
use crate::request::{RequestMeta, CREDENTIAL_HEADERS};
use crate::retry::RetryBudget;
use crate::runtime::{Runtime, Shared};
use crate::tenants::Tenant;
use crate::usage::{BodyKind, UsageReader};

/// How soon after an attempt began a reused connection must break for it to count as
/// stale (closed by the backend while it sat in the pool) and be retried once on a fresh
/// connection, uncounted: a round trip, with room for a slow link.
const STALE_WITHIN: Duration = Duration::from_secs(1);

/// The Switchyard proxy service.
pub struct Switchyard {
    shared: Arc<Shared>,
    retry_budget: RetryBudget,
}

impl Switchyard {
    pub fn new(shared: Arc<Shared>) -> Self {
        Switchyard {
            shared,
            retry_budget: RetryBudget::default(),
        }
    }

    /// Settle the tenant's lease before the client has its answer when its next request
    /// depends on it: at once on this instance's counters, and with Redis when the lease
    /// holds a `concurrent` slot (the client's next request, at another instance maybe,
    /// must find it free). Other fleet leases are settled in `logging`, and the answer
    /// waits for nothing.
    async fn settle_before_answer(&self, ctx: &mut RequestCtx) {
        let Some(lease) = ctx.lease.take() else {
            return;
        };
        let (tokens, nano) = ctx.settlement(ctx.cost_usd());
        let limiter = &self.shared.limiter;
        match limiter.settle_locally(lease, tokens, nano) {
            Ok(()) => {}
            Err(lease) if lease.holds_a_slot() => limiter.settle(lease, tokens, nano).await,
            Err(lease) => ctx.lease = Some(lease),
        }
    }

    /// Whether to try the plan's next backend: one must be left, and the retry budget
    /// must allow it (taking one retry from it if so).
    fn retry_allowed(&self, ctx: &RequestCtx) -> bool {
        let Some(rt) = &ctx.runtime else { return false };
        let p = &rt.config.proxy;
        if !ctx.next_attempt_can_start() {
            return false;
        }
        let allowed = self
            .retry_budget
            .try_retry(p.retry_budget_percent, p.retry_budget_min_per_sec);
        if !allowed {
            warn!(target: "switchyard::retry", "{} retry budget exhausted; not retrying", ctx.request_id);
        }
        allowed
    }
}

#[async_trait]
impl ProxyHttp for Switchyard {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// A request Pingora refused before any phase ran: a head it could not read (400, or
    /// 431 when over its limits) or `CONNECT` (405). The answer is still Switchyard's: the
    /// envelope, a request id, an access line and the request counted. (A patch of the
    /// vendored pingora-proxy: vendor/pingora-proxy/SWITCHYARD-PATCH.md.)
    async fn refuse_request_head(
        &self,
        session: &mut ServerSession,
        status: u16,
        error: Option<&Error>,
    ) {
        let error = ClientError::refused_head(status, error);
        let mut ctx = RequestCtx::new();
        ctx.request_id = uuid::Uuid::new_v4().to_string();
        ctx.status = error.status();
        refuse_head(session, &ctx.request_id, &error).await;
        ctx.count("none", 0.0);
        // The head is not quoted: it was not read, and may hold credentials.
        ctx.log_access("-", "-", format_args!(" error=\"{}\"", error.code()));
        let record = ctx.take_audit_record("-", "-", 0.0);
        self.shared.audit.record(record);
    }

    /// Decide where the request goes. Answers the client itself (`Ok(true)`) for bad
    /// requests, `GET /v1/models`, and policy rejections.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(session.req_header());
        let runtime = self.shared.load();
        ctx.runtime = Some(runtime.clone());
        // A client that stops reading is let go once a write to it has waited this long:
        // Pingora's default is to wait for ever, holding the upstream request open.
        session.set_write_timeout(Some(Duration::from_millis(
            runtime.config.proxy.write_timeout_ms,
        )));
        // A kept-alive connection is closed after this long idle: Pingora's proxy would
        // otherwise wait for the next request for ever. (`None` is a connection the client
        // or HTTP/2 does not keep alive here; it stays so.)
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(runtime.config.proxy.keepalive_timeout_seconds));
        }
        match admit(session, ctx, &runtime, &self.shared).await {
            Ok(Admitted::Proxy) => {
                self.retry_budget.record_request();
                Ok(false)
            }
            Ok(Admitted::Answer(body)) => {
                respond(session, ctx, 200, body, None).await;
                Ok(true)
            }
            Err(ClientError::ClientGone) => {
                info!(target: "switchyard::reject", "{} client went away while its request waited", ctx.request_id);
                ctx.status = 499;
                session.set_keepalive(None);
                Ok(true)
            }
            Err(e) => {
                ctx.refused_by = e.policy().cloned();
                // Admitted, then refused (by the policy, or no capacity in time): no
                // backend had the request.
                self.settle_before_answer(ctx).await;
                reject(session, ctx, e).await;
                Ok(true)
            }
        }
    }

    /// The next backend of the plan, counted in flight until its attempt ends. A backend
    /// that went out of rotation since the plan was made (say, its one half-open probe is
    /// already out) is skipped.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let runtime = ctx
            .runtime
            .clone()
            .expect("request_filter sets the runtime");
        if let Some((backend, pass)) = ctx.retry_same_backend.take() {
            // Best effort: if it is full now, the plan's next backend takes over (and a
            // probe is handed on).
            if ctx.begin_attempt(backend.clone(), Some(pass)).is_err() {
                backend.stats.breaker.release(pass);
            }
        }
        while ctx.current.is_none() {
            let Some(backend) = ctx.next_backend() else {
                ctx.failure = Some(ClientError::UpstreamUnavailable);
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "no backend left to try",
                ));
            };
            if let Err(why) = ctx.begin_attempt(backend.clone(), None) {
                ctx.skip(&backend, why);
            }
        }
        let cur = ctx.current.as_ref().expect("an attempt was just begun");
        Ok(Box::new(peer_for(&cur.backend, &runtime.config.proxy)))
    }

    /// The response head came within `ttfb_timeout_ms` (the peer's read timeout); from then
    /// on each read of the answer, a stream's chunks or a plain body, may wait
    /// `idle_timeout_ms`.
    fn upstream_read_timeout_after_header(&self, ctx: &RequestCtx) -> Option<Duration> {
        let runtime = ctx.runtime.as_ref()?;
        Some(Duration::from_millis(runtime.config.proxy.idle_timeout_ms))
    }

    /// Client credentials out; the backend's in, with its provider's headers and path; the
    /// body's length as this backend gets it.
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
        for name in &CREDENTIAL_HEADERS {
            // Most requests carry none: a lookup costs less than Pingora's removal.
            if upstream.headers.contains_key(name) {
                upstream.remove_header(name);
            }
        }
        provider::prepare_upstream(upstream, &cur.backend, ctx.meta.as_deref())?;
        upstream.insert_header(http::header::HOST, cur.backend.upstream.authority.as_str())?;
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        let traceparent = upstream
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        if !traceparent.is_some_and(valid_traceparent) {
            upstream.insert_header("traceparent", new_traceparent())?;
        }
        if let Some(body) = &cur.body {
            if upstream
                .headers
                .contains_key(http::header::TRANSFER_ENCODING)
            {
                upstream.remove_header(&http::header::TRANSFER_ENCODING);
            }
            // One `Content-Length`, of the body as sent (a client may repeat the header).
            let mut lengths = upstream
                .headers
                .get_all(http::header::CONTENT_LENGTH)
                .iter();
            let length = lengths
                .next()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if length != Some(body.len()) || lengths.next().is_some() {
                upstream.insert_header(http::header::CONTENT_LENGTH, body.len())?;
            }
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
    /// next backend; the last one's answer is relayed as it is (except 401/403, which
    /// become 502: the backend's body is never shown).
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream.status.as_u16();
        let Some(cur) = ctx.current.as_mut() else {
            return Ok(());
        };
        if status == 429 {
            let retry_after = upstream
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let outlier = &ctx
                .runtime
                .as_ref()
                .expect("set in request_filter")
                .config
                .outlier;
            cur.backend.stats.breaker.cool_down(
                tokio::time::Instant::now(),
                retry_after,
                outlier,
                cur.pass,
            );
        }
        cur.answered = upstream.status.is_success();
        let auth_failed = matches!(status, 401 | 403);
        if !(status >= 500 || status == 429 || auth_failed) {
            let header = |name| upstream.headers.get(name).and_then(|v| v.to_str().ok());
            let asked_stream = ctx.meta.as_ref().is_some_and(|m| m.stream);
            let kind = BodyKind::of(
                header(http::header::CONTENT_TYPE),
                header(http::header::CONTENT_ENCODING),
                asked_stream,
            );
            cur.usage_reader = Some(UsageReader::new(kind));
            if kind != BodyKind::Stream {
                cur.usage_stripper = None;
            } else if cur.usage_stripper.is_some() {
                // The stream is rewritten on the way: its length is no longer the backend's.
                upstream.remove_header(&http::header::CONTENT_LENGTH);
            }
            return Ok(());
        }
        // Only a successful stream is rewritten; an error body is relayed as it is.
        cur.usage_stripper = None;
        let name = cur.backend.name().to_string();
        if auth_failed {
            warn!(
                "{} backend {name} refused our credentials ({status})",
                ctx.request_id
            );
        }
        // A 504 is a gateway behind the backend that stopped waiting: the model may still
        // be generating (and billing), as after a timeout of our own.
        // Asked second: asking spends from the retry budget.
        let retry = (status != 504 || ctx.plan.as_ref().is_some_and(|p| p.retry_on_timeout))
            && self.retry_allowed(ctx);
        if !(retry || auth_failed) {
            // The last backend's answer goes to the client; `logging` records the outcome.
            return Ok(());
        }
        let outcome = if status == 429 {
            Outcome::Neutral
        } else {
            Outcome::Failure
        };
        ctx.finish_attempt(outcome, format!("status {status}"));
        if !retry {
            ctx.failure = Some(ClientError::UpstreamAuthFailed);
        }
        let mut e = Error::explain(
            ErrorType::HTTPStatus(status),
            format!("backend {name} answered {status}"),
        );
        e.set_retry(retry);
        Err(e)
    }

    /// Each chunk passes straight through; on the way, TTFT is taken at the first and
    /// usage read from all of them.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let Some(cur) = ctx.current.as_mut() else {
            return Ok(None);
        };
        let now = Instant::now();
        if cur.first_byte.is_none() {
            cur.first_byte = Some(now);
            ctx.ttft = Some(now - cur.started);
            // Only an answer teaches the backend's time to first token: an error body
            // comes fast, and would make a failing backend look the quickest.
            if cur.answered {
                cur.backend.stats.record_ttft(now - cur.started);
                METRICS
                    .ttft
                    .with_label_values(&[cur.backend.name()])
                    .observe((now - cur.started).as_secs_f64());
            }
        }
        cur.last_byte = Some(now);
        if let (Some(reader), Some(chunk)) = (cur.usage_reader.as_mut(), body.as_ref()) {
            reader.feed(chunk);
        }
        if let Some(stripper) = cur.usage_stripper.as_mut() {
            let mut out = body
                .as_ref()
                .map(|c| stripper.filter(c))
                .unwrap_or_default();
            if end_of_stream || body.is_none() {
                let rest = stripper.finish();
                if !rest.is_empty() {
                    out = [out, rest].concat().into();
                }
            }
            *body = Some(out);
        }
        Ok(None)
    }

    /// The answer's last chunk waits to go out (the patched `pingora-proxy`): its usage is
    /// read, and the tenant's reservation settled now if the client's next request
    /// depends on it (`settle_before_answer`). `logging` settles what is left: other
    /// fleet leases, broken answers.
    async fn response_body_end(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        ctx.read_usage();
        self.settle_before_answer(ctx).await;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if session.is_process_shutting_down() || crate::server::closing() {
            // Shutting down (SIGTERM, or a graceful upgrade): tell the client not to reuse
            // this connection, so its next request goes to the listener's new owner.
            session.set_keepalive(None);
        }
        remove_backend_headers(response);
        response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        for (name, value) in &ctx.rate_headers {
            response.insert_header(*name, value.as_str())?;
        }
        if let Some(name) = ctx.backend_name() {
            response.insert_header(SERVED_BY, name)?;
            ctx.served_by = Some(name.to_string());
        }
        ctx.status = response.status.as_u16();
        Ok(())
    }

    /// Connection failures — a backend certificate that does not verify included — count
    /// against the backend (and may eject it); the request moves on to the next backend
    /// (never to the same one in cleartext).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let what = match tls_failure(&e) {
            Some(failure) => {
                // The rustls reason (unknown issuer, wrong name...) is for the operator only.
                warn!(
                    target: "switchyard::tls",
                    "{} backend {}: {e}",
                    ctx.request_id,
                    ctx.backend_name().unwrap_or("-")
                );
                failure.as_str()
            }
            None => e.etype().as_str(),
        };
        ctx.finish_attempt(Outcome::Failure, format!("connect: {what}"));
        e.set_retry(self.retry_allowed(ctx));
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
        if answer_started(session) || *e.esource() == ErrorSource::Downstream {
            // Bytes went to the client, or the client is the problem: never retried.
            e.set_retry(false);
            return e;
        }
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) {
            // Our own verdict from upstream_response_filter; its retry flag stands.
            return e;
        }
        // A pooled connection the backend had closed fails as soon as it is used, within a
        // round trip; one that breaks after the backend had the request a while broke
        // while the backend worked on it: that is the backend's failure.
        let stale_soon = ctx
            .current
            .as_ref()
            .is_some_and(|c| c.first_byte.is_none() && c.started.elapsed() < STALE_WITHIN);
        let stale = client_reused
            && stale_soon
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
            && !ctx.stale_retried;
        if stale {
            // A pooled connection the backend had already closed: not the backend's fault.
            ctx.stale_retried = true;
            ctx.retry_same_backend = ctx.current.as_ref().map(|c| (c.backend.clone(), c.pass));
            ctx.finish_attempt(Outcome::Neutral, "stale pooled connection");
            e.set_retry(true);
            return e;
        }
        let timed_out = matches!(e.etype(), ErrorType::ReadTimedout);
        ctx.finish_attempt(Outcome::Failure, e.etype().as_str());
        let may_retry = !timed_out || ctx.plan.as_ref().is_some_and(|p| p.retry_on_timeout);
        let retry = may_retry && self.retry_allowed(ctx);
        if timed_out && !retry {
            ctx.failure = Some(ClientError::UpstreamTimeout);
        }
        e.set_retry(retry);
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
        // The client went away, reset its HTTP/2 stream, or stopped reading until the write
        // timeout let it go; after the answer began, any failure on its side means it never
        // got the whole answer. Logged as 499, whatever status the answer started with.
        let client_gone = *e.esource() == ErrorSource::Downstream
            && (answer_started(session)
                || matches!(
                    e.etype(),
                    ErrorType::ReadError
                        | ErrorType::WriteError
                        | ErrorType::ConnectionClosed
                        | ErrorType::WriteTimedout
                        | ErrorType::H2Error
                ));
        if answer_started(session) || client_gone {
            if client_gone {
                ctx.status = 499;
            }
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let error = ctx.failure.take().unwrap_or_else(|| match e.etype() {
            // A connection never made is a backend unavailable (503), like a refused one;
            // a timeout once connected is a backend too slow to answer (504).
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => ClientError::UpstreamTimeout,
            _ if *e.esource() == ErrorSource::Downstream => ClientError::BadBody,
            _ => tls_failure(e).map_or(ClientError::UpstreamUnavailable, ClientError::UpstreamTls),
        });
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
        // A stream that broke off still used what it streamed; a request whose client
        // left while a backend had it, its prompt.
        ctx.read_usage();
        ctx.count_abandoned();
        // Priced at the serving backend, so before its attempt is finished.
        let cost_usd = ctx.cost_usd();
        if let Some(lease) = ctx.lease.take() {
            let (tokens, nano) = ctx.settlement(cost_usd);
            self.shared.limiter.settle(lease, tokens, nano).await;
        }
        ctx.count(ctx.backend_name().unwrap_or("none"), cost_usd);
        if let Some((backend, pass)) = ctx.retry_same_backend.take() {
            // The fresh-connection retry never ran (the client left, or Pingora's retry
            // cap came first): its breaker pass, perhaps the one half-open probe, goes back.
            backend.stats.breaker.release(pass);
        }
        if ctx.current.is_some() {
            let (outcome, what) = match e {
                Some(e) if *e.esource() == ErrorSource::Downstream => {
                    (Outcome::Neutral, "client closed".to_string())
                }
                Some(e) => (Outcome::Failure, format!("broken: {}", e.etype().as_str())),
                None if ctx.status >= 500 => (Outcome::Failure, format!("status {}", ctx.status)),
                None if ctx.status == 429 => (Outcome::Neutral, "status 429".to_string()),
                // Relayed as it came, but the backend failed: it counts against it.
                None if ctx.stream_error => (Outcome::Failure, "error event in the stream".into()),
                None => (Outcome::Success, format!("status {}", ctx.status)),
            };
            ctx.finish_attempt(outcome, what);
        }
        let head = session.req_header();
        let error = ErrorSuffix(e, ctx.refused_code);
        ctx.log_access(head.method.as_str(), head.uri.path(), error);
        let record = ctx.take_audit_record(head.method.as_str(), head.uri.path(), cost_usd);
        self.shared.audit.record(record);
    }
}

/// Take out of a backend's answer what is about the backend and not the client's: the
/// headers about its own connection (RFC 9110, 7.6.1: `Keep-Alive`, `Upgrade`, `TE`,
/// `Trailer`, `Proxy-Connection`, and those its `Connection` names; Pingora writes the
/// client's `Connection` itself), and the provider account's rate limits and
/// organization, which would show one tenant what every tenant used (a tenant's own
/// limits are added afterwards).
fn remove_backend_headers(response: &mut ResponseHeader) {
    use http::header::{
        HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
    };
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    const ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
    const PROJECT: HeaderName = HeaderName::from_static("openai-project");
    const ANTHROPIC_ORGANIZATION: HeaderName = HeaderName::from_static("anthropic-organization-id");
    let hop = |n: &HeaderName| {
        [
            &CONNECTION,
            &KEEP_ALIVE,
            &PROXY_CONNECTION,
            &TE,
            &TRAILER,
            &UPGRADE,
            &ORGANIZATION,
            &PROJECT,
            &ANTHROPIC_ORGANIZATION,
            // A provider's cookies (a CDN's bot-management one) would be shared by
            // every tenant.
            &http::header::SET_COOKIE,
        ]
        .contains(&n)
            || n.as_str().starts_with("x-ratelimit-")
            || n.as_str().starts_with("anthropic-ratelimit-")
    };
    // Most answers have none: one pass over the names, no lookups.
    if !response.headers.keys().any(hop) {
        return;
    }
    let mut names: Vec<HeaderName> = response
        .headers
        .keys()
        .filter(|n| hop(n))
        .cloned()
        .collect();
    for value in response.headers.get_all(CONNECTION) {
        let tokens = value.to_str().unwrap_or_default().split(',');
        names.extend(
            tokens
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                // The body's framing is Pingora's to handle, whatever the backend names.
                .filter(|n| *n != CONTENT_LENGTH && *n != TRANSFER_ENCODING),
        );
    }
    for name in names {
        response.remove_header(&name);
    }
}

/// ` error="…"` after an access line, for a request that ended in an error: Pingora's
/// error, else the code of the error Switchyard answered with itself.
struct ErrorSuffix<'a>(Option<&'a Error>, Option<&'static str>);

impl std::fmt::Display for ErrorSuffix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorSuffix(Some(e), _) => write!(f, " error=\"{e}\""),
            ErrorSuffix(None, Some(code)) => write!(f, " error=\"{code}\""),
            ErrorSuffix(None, None) => Ok(()),
        }
    }
}

/// Whether the client's answer has begun: a final response head went to it (a
/// `100 Continue` does not count; the answer may still be anything).
fn answer_started(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|head| !head.status.is_informational())
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
    shared: &Shared,
) -> Result<Admitted, ClientError> {
    // No protocol upgrades (WebSocket): a tunnel would carry whatever the client likes with
    // the backend's key. Without the header the request is an ordinary one.
    if session
        .req_header()
        .headers
        .contains_key(http::header::UPGRADE)
    {
        session
            .req_header_mut()
            .remove_header(&http::header::UPGRADE);
    }
    let head = session.req_header();
    let path = head.uri.path().to_string();
    // The target as sent goes upstream when the path is not rewritten: it must be the
    // path checked here (`x/../v1` parses as `/`), or an absolute URI.
    let raw_is_path = head.raw_path().starts_with(b"/") || head.uri.scheme().is_some();
    if !raw_is_path || plan::is_ambiguous_path(&path) {
        return Err(ClientError::AmbiguousPath);
    }
    let tenant = runtime.tenants.authenticate(&head.headers).map_err(|why| {
        info!(target: "switchyard::auth", "{} refused: {why:?} API key", ctx.request_id);
        ClientError::Unauthorized
    })?;
    let admitted = admit_tenant(session, ctx, runtime, shared, tenant, path).await;
    if ctx.meta.is_none() {
        // Answered or refused before its metadata (which names the tenant) was read.
        ctx.tenant = Some(tenant.name.clone());
    }
    admitted
}

/// The rest of [`admit`], for a request of `tenant`.
async fn admit_tenant(
    session: &mut Session,
    ctx: &mut RequestCtx,
    runtime: &Arc<Runtime>,
    shared: &Shared,
    tenant: &Tenant,
    path: String,
) -> Result<Admitted, ClientError> {
    let head = session.req_header();
    if head.method == http::Method::GET {
        match path.strip_prefix("/v1/models") {
            Some("" | "/") => return Ok(Admitted::Answer(plan::visible_models(runtime, tenant))),
            Some(id) if id.len() > 1 && id.starts_with('/') => {
                let id = percent_encoding::percent_decode_str(&id[1..]).decode_utf8_lossy();
                return plan::visible_model(runtime, tenant, &id)
                    .map(Admitted::Answer)
                    .ok_or_else(|| ClientError::ModelNotFound(id.chars().take(200).collect()));
            }
            _ => {}
        }
    }
    // Only model APIs go upstream: a tenant's rules (models, regions, token limits) hold
    // for every request sent with a backend's key.
    if !plan::is_model_api(head.method.as_str(), &path) {
        return Err(ClientError::NotProxied(format!(
            "{} {}",
            head.method,
            path.chars().take(200).collect::<String>()
        )));
    }
    let mut meta = RequestMeta::from_head(&head.method, &path, &head.headers);
    meta.tenant = tenant.name.clone();
    if meta.region.is_none() {
        meta.region = tenant.region.clone();
    }
    let proxy = &runtime.config.proxy;
    let body = body::read(
        session,
        proxy.max_body_bytes,
        Duration::from_millis(proxy.body_timeout_ms),
    )
    .await?;
    // Read as JSON whatever the content type says (curl -d sends a form type).
    if let Some(b) = &body {
        meta.read_json_body(b)?;
    }
    if meta.model.is_none() {
        return Err(ClientError::MissingModel);
    }
    let meta = Arc::new(meta);
    ctx.meta = Some(meta.clone());
    ctx.body = body;
    let screened = plan::screen(runtime, tenant, &meta)?;
    if let Some(limits) = &tenant.limits {
        let mut lease = shared
            .limiter
            .admit(&tenant.name, limits, &screened.allowed, &meta)
            .await?;
        ctx.rate_headers = std::mem::take(&mut lease.headers);
        ctx.lease = Some(lease);
    }
    ctx.plan = Some(
        match plan::decide(runtime, &screened, &meta, &ctx.request_id, &mut ctx.refused) {
            Ok(p) => p,
            Err(Refusal::Client(e)) => return Err(e),
            Err(Refusal::AtCapacity) => {
                let waiting = plan::wait_for_capacity(
                    runtime,
                    &screened,
                    &meta,
                    &ctx.request_id,
                    &mut ctx.refused,
                );
                tokio::select! {
                    plan = waiting => plan?,
                    // The body is read: a read that ends now means the client went away,
                    // and its request must not take a backend's slot when one frees up.
                    _ = session.read_body_or_idle(true) => return Err(ClientError::ClientGone),
                }
            }
        },
    );
    Ok(Admitted::Proxy)
}

/// Why TLS to a backend failed, when that is what `e` is.
fn tls_failure(e: &Error) -> Option<UpstreamTlsFailure> {
    match e.etype() {
        ErrorType::TLSHandshakeFailure => Some(UpstreamTlsFailure::of(e)),
        ErrorType::InvalidCert => Some(UpstreamTlsFailure::Handshake),
        _ => None,
    }
}

/// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero).
fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// A new sampled trace for a request that arrived without one.
fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    // Written digit by digit: `format!` with widths costs several times more.
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, trace, 32);
    out.push('-');
    push_hex(&mut out, u128::from(span), 16);
    out.push_str("-01");
    out
}

/// The low `digits` hex digits of `value`, lower case, zero-padded.
fn push_hex(out: &mut String, value: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(HEX[((value >> (4 * i)) & 0xf) as usize] as char);
    }
}

/// How to reach a backend. Pingora's read timeout is the gap allowed between two reads;
/// here it bounds the wait for the response head (`ttfb_timeout_ms`), and
/// `upstream_read_timeout_after_header` replaces it with `idle_timeout_ms` once the head
/// came (a patch of the vendored pingora-proxy: vendor/pingora-proxy/SWITCHYARD-PATCH.md).
fn peer_for(backend: &Backend, proxy: &crate::config::ProxyConfig) -> HttpPeer {
    let mut peer = backend.peer();
    let o = &mut peer.options;
    o.connection_timeout = Some(Duration::from_millis(proxy.connect_timeout_ms));
    o.read_timeout = Some(Duration::from_millis(proxy.ttfb_timeout_ms));
    o.write_timeout = Some(Duration::from_millis(proxy.idle_timeout_ms));
    o.idle_timeout = Some(Duration::from_secs(60));
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_validated_and_created_in_w3c_form() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent("garbage"));
        for _ in 0..100 {
            assert!(valid_traceparent(&new_traceparent()));
        }
        let mut hex = String::new();
        push_hex(&mut hex, 0xab_u128 << 120 | 0x1f, 32);
        assert_eq!(hex, "ab00000000000000000000000000001f");
    }
}
