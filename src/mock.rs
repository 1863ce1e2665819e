//! Switchyard's own mock backend, OpenAI-compatible and Anthropic-compatible: a real
//! HTTP/1.1 and HTTP/2 server (cleartext, or TLS with `switchyard mock --tls-cert
//! --tls-key`) used by the integration tests, the load benchmark and `switchyard demo`.
//! It answers chat completions, completions (plain or streamed as SSE), embeddings, the
//! model list, the Responses API (plain or streamed, see [`responses`]) and Anthropic's
//! Messages API (plain or streamed, see [`anthropic`]), records what it received, and
//! injects faults chosen by options or per request headers.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`,
//! the same three under Azure's deployment paths
//! (`POST /openai/deployments/NAME/chat/completions?api-version=V`; the query is required),
//! `POST /v1/responses` (Azure: `/openai/responses?api-version=V`),
//! `POST /v1/messages` (and `/v1/messages/count_tokens`), `GET /v1/models`, `GET /health`,
//! and for tests
//! `GET /mock/requests` (last 1000),
//! `GET /mock/stats` (requests, in flight, health checks answered), `POST /mock/reset`
//! (clears the log, the request counter and the models seen), and
//! `POST /mock/health?pattern=ok,fail,...` (the answers of the next health checks in
//! turn, repeated: `ok` is 200, `fail` 503; a flapping backend). Every request except `/health` and `/mock/*` is counted, recorded before
//! any fault applies, and answered with `x-mock-backend`, `x-mock-body-sha256` and
//! `x-mock-body-bytes`.
//!
//! Per-request headers (each wins over the matching [`MockOptions`] field):
//! `x-mock-latency-ms`, `x-mock-chunks`, `x-mock-chunk-delay-ms`, `x-mock-status`
//! (300..=599 injects that status; 2xx answers normally), `x-mock-retry-after`,
//! `x-mock-fault` (`hang`, `close`, `reset-mid-stream`, `stall-mid-stream`, `drip`,
//! `early`), and `x-mock-cached-tokens` (prompt tokens reported as read from a prompt
//! cache; default 0). `early` (or [`MockOptions::early`] for every request) answers at
//! once, without reading the request body, as a server that refuses a body by its head
//! does: `x-mock-status`, else what `fail_rate` and `rate_limit_rate` draw, else 413. Over
//! HTTP/2 the stream is then reset with `NO_ERROR` (RFC 9113 §8.1), over HTTP/1.1 the
//! connection closed. Such a request is recorded with no body.
//! Errors of `/v1/messages` use Anthropic's envelope, all others OpenAI's.
//! An unusable value is answered 400 naming the header, so a typo in a test is loud.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::provider::{anthropic_error_type, ApiFormat};

mod anthropic;
mod responses;

/// How many received requests `/mock/requests` keeps.
const REQUEST_LOG_CAPACITY: usize = 1000;
/// Distinct model names remembered for `/v1/models`; later names are not listed.
const SEEN_MODELS_CAPACITY: usize = 1024;
/// Upper bound on `chunks`, so a header cannot make the mock allocate without limit.
const MAX_CHUNKS: u32 = 100_000;
/// Gap between streamed chunks under `x-mock-fault: drip`.
const DRIP_DELAY_MS: u64 = 200;
/// Model reported when a request names none, and always listed by `/v1/models`.
const DEFAULT_MODEL: &str = "mock-model";
/// Floats in each mock embedding.
const EMBEDDING_DIMS: usize = 8;

/// Options of one mock backend; every field also settable per request by a header.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Reported in `x-mock-backend`, `/health`, `/mock/stats` and the answer text. Default `"mock"`.
    pub name: String,
    /// Delay before response headers (`x-mock-latency-ms`). Default 0.
    pub latency_ms: u64,
    /// Content chunks in a streamed answer / words in a plain one (`x-mock-chunks`). Default 8.
    pub chunks: u32,
    /// Gap between streamed content chunks (`x-mock-chunk-delay-ms`). Default 0.
    pub chunk_delay_ms: u64,
    /// Share of requests answered `fail_status` (0..1). Default 0.
    pub fail_rate: f64,
    /// The status of the `fail_rate` share (a 5xx). Default 503.
    pub fail_status: StatusCode,
    /// Share of requests answered 429 with `Retry-After` (0..1). Default 0.
    pub rate_limit_rate: f64,
    /// `Retry-After` seconds on a 429 (`x-mock-retry-after`). Default 1.
    pub retry_after_s: u64,
    /// Answer every request before reading its body, as `x-mock-fault: early` does for one
    /// (a request with another `x-mock-fault` gets that instead). Default false.
    pub early: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            name: "mock".to_owned(),
            latency_ms: 0,
            chunks: 8,
            chunk_delay_ms: 0,
            fail_rate: 0.0,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            rate_limit_rate: 0.0,
            retry_after_s: 1,
            early: false,
        }
    }
}

/// Serve until the listener's task is dropped/aborted. Never returns Ok under normal operation.
///
/// Connections are tasks of a `JoinSet` owned by this future, so aborting it also drops
/// every open (keep-alive) connection: a "killed" mock really stops answering.
/// Fails at once with `InvalidInput` if `opts.name` cannot be sent as a header value.
pub async fn serve(listener: TcpListener, opts: MockOptions) -> io::Result<()> {
    serve_with_tls(listener, opts, None).await
}

/// [`serve`], over TLS when `tls` is given (see [`tls_acceptor`]). Either way a connection
/// speaks HTTP/1.1 or HTTP/2 (ALPN over TLS, the client's preface in cleartext), and every
/// answer says how it was reached: `x-mock-http-version` (`HTTP/1.1`, `HTTP/2.0`) and,
/// over TLS, `x-mock-tls-sni` (the server name the client sent, if any).
pub async fn serve_with_tls(
    listener: TcpListener,
    opts: MockOptions,
    tls: Option<TlsAcceptor>,
) -> io::Result<()> {
    let shared = Arc::new(Shared::new(opts)?);
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                connections.spawn(serve_connection(stream, Arc::clone(&shared), tls.clone()));
            }
            Err(e) => {
                // Accept errors (EMFILE, ECONNABORTED) are transient; spinning on them
                // would burn a core, so back off briefly.
                log::warn!("mock {}: accept failed: {e}", shared.opts.name);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
}

/// A TLS acceptor presenting the PEM pair `cert` / `key`, offering HTTP/2 and HTTP/1.1.
pub fn tls_acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let pair = crate::tls::ListenerCert::load("mock", cert, key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    pingora::tls::install_default_crypto_provider();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(pair));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    // SSE events are small; Nagle would hold them back and blur chunk timing.
    if let Err(e) = stream.set_nodelay(true) {
        log::debug!("mock: set_nodelay failed: {e}");
    }
    match tls {
        None => serve_http(TokioIo::new(stream), shared, None).await,
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => {
                let sni = stream.get_ref().1.server_name().map(str::to_owned);
                serve_http(TokioIo::new(stream), shared, sni).await
            }
            Err(e) => log::debug!("mock: TLS handshake failed: {e}"),
        },
    }
}

async fn serve_http<I>(io: TokioIo<I>, shared: Arc<Shared>, sni: Option<String>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let version = format!("{:?}", req.version());
        let sni = sni.clone();
        let answer = handle(Arc::clone(&shared), req);
        async move {
            let mut response = answer.await?;
            let headers = response.headers_mut();
            headers.insert("x-mock-http-version", header_value(&version));
            if let Some(sni) = sni {
                headers.insert("x-mock-tls-sni", header_value(&sni));
            }
            Ok::<_, MockError>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder.serve_connection(io, service).await {
        log::debug!("mock connection ended: {e}");
    }
}

/// Errors that end a connection instead of producing a response.
#[derive(Debug, thiserror::Error)]
enum MockError {
    /// `x-mock-fault: close`: hyper drops the connection when the service fails.
    #[error("injected fault: connection closed without a response")]
    InjectedClose,
    /// `x-mock-fault: reset-mid-stream`: hyper aborts the connection when the body fails.
    #[error("injected fault: connection reset mid-stream")]
    InjectedReset,
    /// The client went away or sent a broken body.
    #[error("reading the request body failed: {0}")]
    ReadBody(#[from] hyper::Error),
}

// ---------------------------------------------------------------------------------------
// Shared state: counters and the request journal.

struct Shared {
    opts: MockOptions,
    name: Arc<str>,
    name_header: HeaderValue,
    requests: AtomicU64,
    inflight: AtomicU64,
    journal: Mutex<Journal>,
    health: Mutex<HealthPattern>,
}

/// How `/health` answers: `answers[n % len]` for the n-th check since it was set.
struct HealthPattern {
    answers: Vec<bool>,
    checks: u64,
}

impl HealthPattern {
    /// `ok,fail,...` as answers; `None` when empty or a word is neither.
    fn parse(pattern: &str) -> Option<Vec<bool>> {
        let answers: Option<Vec<bool>> = pattern
            .split(',')
            .map(|w| match w.trim() {
                "ok" => Some(true),
                "fail" => Some(false),
                _ => None,
            })
            .collect();
        answers.filter(|a| !a.is_empty())
    }
}

#[derive(Default)]
struct Journal {
    requests: VecDeque<RequestRecord>,
    models: BTreeSet<String>,
}

/// One entry of `/mock/requests`.
#[derive(Debug, Serialize)]
struct RequestRecord {
    method: String,
    path: String,
    /// The query string, if any (Azure's `api-version`).
    query: Option<String>,
    headers: BTreeMap<String, String>,
    body_bytes: usize,
    body_sha256: String,
    model: Option<String>,
    stream: bool,
}

impl Shared {
    fn new(opts: MockOptions) -> io::Result<Shared> {
        let name_header = HeaderValue::from_str(&opts.name).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "mock name must be a valid header value",
            )
        })?;
        Ok(Shared {
            name: Arc::from(opts.name.as_str()),
            opts,
            name_header,
            requests: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            journal: Mutex::new(Journal::default()),
            health: Mutex::new(HealthPattern {
                answers: vec![true],
                checks: 0,
            }),
        })
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        // The journal holds plain data; a panic elsewhere cannot leave it inconsistent.
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request and marks it in flight until the returned guard drops.
    fn begin(self: &Arc<Self>) -> (u64, InflightGuard) {
        let seq = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.inflight.fetch_add(1, Ordering::Relaxed);
        (seq, InflightGuard(Arc::clone(self)))
    }

    fn record(&self, record: RequestRecord) {
        let mut journal = self.journal();
        if let Some(model) = record.model.as_deref() {
            if journal.models.len() < SEEN_MODELS_CAPACITY && !journal.models.contains(model) {
                journal.models.insert(model.to_owned());
            }
        }
        if journal.requests.len() >= REQUEST_LOG_CAPACITY {
            journal.requests.pop_front();
        }
        journal.requests.push_back(record);
    }

    fn reset(&self) {
        let mut journal = self.journal();
        journal.requests.clear();
        journal.models.clear();
        self.requests.store(0, Ordering::Relaxed);
    }

    /// `fail_status` with probability `fail_rate`, else 429 with probability `rate_limit_rate`.
    fn random_status(&self) -> Option<StatusCode> {
        let (fail, limit) = (self.opts.fail_rate, self.opts.rate_limit_rate);
        if fail <= 0.0 && limit <= 0.0 {
            return None;
        }
        let draw: f64 = rand::random();
        if draw < fail {
            Some(self.opts.fail_status)
        } else if draw < fail + limit {
            Some(StatusCode::TOO_MANY_REQUESTS)
        } else {
            None
        }
    }
}

/// Keeps one request counted in `inflight`; lives in the response body so it drops when
/// the body finishes or the connection goes away.
struct InflightGuard(Arc<Shared>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Faults and per-request overrides.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Hang,
    Close,
    ResetMidStream,
    StallMidStream,
    Drip,
    Early,
}

impl Fault {
    fn parse(value: &str) -> Option<Fault> {
        match value.trim() {
            "hang" => Some(Fault::Hang),
            "close" => Some(Fault::Close),
            "reset-mid-stream" => Some(Fault::ResetMidStream),
            "stall-mid-stream" => Some(Fault::StallMidStream),
            "drip" => Some(Fault::Drip),
            "early" => Some(Fault::Early),
            _ => None,
        }
    }

    /// What a body does once half of it is sent, for the faults that break a body.
    fn body_fault(self) -> Option<BodyFault> {
        match self {
            Fault::ResetMidStream => Some(BodyFault::Reset),
            Fault::StallMidStream => Some(BodyFault::Stall),
            _ => None,
        }
    }
}

/// A request header carrying a value the mock cannot use.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for header {header}")]
struct InvalidHeader {
    header: &'static str,
}

/// Options of this request after applying its `x-mock-*` headers.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    latency_ms: u64,
    chunks: u32,
    chunk_delay_ms: u64,
    /// Injected error status; 2xx in `x-mock-status` means "answer normally".
    status: Option<StatusCode>,
    retry_after_s: u64,
    fault: Option<Fault>,
    /// Prompt tokens reported as read from a prompt cache.
    cached_tokens: u64,
}

impl Plan {
    fn new(opts: &MockOptions, headers: &HeaderMap) -> Result<Plan, InvalidHeader> {
        let mut plan = Plan {
            latency_ms: header_or(headers, "x-mock-latency-ms", opts.latency_ms)?,
            chunks: header_or(headers, "x-mock-chunks", opts.chunks)?.min(MAX_CHUNKS),
            chunk_delay_ms: header_or(headers, "x-mock-chunk-delay-ms", opts.chunk_delay_ms)?,
            status: header_status(headers)?,
            retry_after_s: header_or(headers, "x-mock-retry-after", opts.retry_after_s)?,
            fault: header_fault(headers)?,
            cached_tokens: header_or(headers, "x-mock-cached-tokens", 0)?,
        };
        if plan.fault == Some(Fault::Drip) {
            plan.chunk_delay_ms = DRIP_DELAY_MS;
        }
        Ok(plan)
    }
}

fn header_str<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<Option<&'h str>, InvalidHeader> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| InvalidHeader { header: name }),
    }
}

fn header_or<T: std::str::FromStr>(
    headers: &HeaderMap,
    name: &'static str,
    default: T,
) -> Result<T, InvalidHeader> {
    match header_str(headers, name)? {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| InvalidHeader { header: name }),
    }
}

fn header_status(headers: &HeaderMap) -> Result<Option<StatusCode>, InvalidHeader> {
    const NAME: &str = "x-mock-status";
    let invalid = || InvalidHeader { header: NAME };
    let Some(code) = header_str(headers, NAME)? else {
        return Ok(None);
    };
    let code: u16 = code.parse().map_err(|_| invalid())?;
    match code {
        200..=299 => Ok(None),
        300..=599 => StatusCode::from_u16(code).map(Some).map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

fn header_fault(headers: &HeaderMap) -> Result<Option<Fault>, InvalidHeader> {
    const NAME: &str = "x-mock-fault";
    match header_str(headers, NAME)? {
        None | Some("") => Ok(None),
        Some(s) => Fault::parse(s)
            .map(Some)
            .ok_or(InvalidHeader { header: NAME }),
    }
}

// ---------------------------------------------------------------------------------------
// Request handling.

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, MockError> {
    let path = req.uri().path();
    if path == "/health" {
        return Ok(health(&shared));
    }
    if path.starts_with("/mock/") {
        return Ok(control(&shared, req.method(), path, req.uri().query()));
    }
    handle_counted(shared, req).await
}

/// A request that is counted, recorded and subject to faults (everything but /health
/// and /mock/*).
async fn handle_counted(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, MockError> {
    let (seq, guard) = shared.begin();
    let (parts, body) = req.into_parts();
    let plan = Plan::new(&shared.opts, &parts.headers);
    if let Some(mut response) = answer_early(&shared, &parts, &plan) {
        // `body` is dropped unread.
        shared.record(record_of(&parts, &[], "", None));
        response.body_mut().inflight = Some(guard);
        return Ok(response);
    }
    let body = body.collect().await?.to_bytes();
    let body_sha256 = hex::encode(Sha256::digest(&body));
    let parsed = ParsedBody::parse(&body);
    shared.record(record_of(&parts, &body, &body_sha256, parsed.as_ref().ok()));

    let call = Call {
        parts: &parts,
        body_bytes: body.len(),
        parsed: &parsed,
        seq,
    };
    let mut response = answer(&shared, &call, plan).await?;
    let headers = response.headers_mut();
    headers.insert("x-mock-body-sha256", header_value(&body_sha256));
    headers.insert("x-mock-body-bytes", HeaderValue::from(body.len()));
    response.body_mut().inflight = Some(guard);
    Ok(response)
}

/// `x-mock-fault: early` (or `--early`): an error answer before the body is read.
/// Unusable `x-mock-*` values are left to [`answer`], which reads the body first.
fn answer_early(
    shared: &Shared,
    parts: &Parts,
    plan: &Result<Plan, InvalidHeader>,
) -> Option<Response<MockBody>> {
    let plan = plan.as_ref().ok()?;
    let early = match plan.fault {
        Some(fault) => fault == Fault::Early,
        None => shared.opts.early,
    };
    if !early {
        return None;
    }
    let status = plan
        .status
        .or_else(|| shared.random_status())
        .unwrap_or(StatusCode::PAYLOAD_TOO_LARGE);
    let format = ApiFormat::of_path(parts.uri.path());
    Some(injected_error(shared, status, plan.retry_after_s, format))
}

/// What `answer` needs to know about the request.
struct Call<'a> {
    parts: &'a Parts,
    body_bytes: usize,
    parsed: &'a Result<ParsedBody, String>,
    seq: u64,
}

/// Applies the plan (latency, faults, injected status), then answers the endpoint.
async fn answer(
    shared: &Shared,
    call: &Call<'_>,
    plan: Result<Plan, InvalidHeader>,
) -> Result<Response<MockBody>, MockError> {
    let format = ApiFormat::of_path(call.parts.uri.path());
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            return Ok(ApiError::invalid_request(e.to_string())
                .param(e.header)
                .response(shared, format));
        }
    };
    if plan.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(plan.latency_ms)).await;
    }
    match plan.fault {
        // Dropped with the connection when the client goes away, releasing `inflight`.
        Some(Fault::Hang) => std::future::pending::<()>().await,
        Some(Fault::Close) => return Err(MockError::InjectedClose),
        _ => {}
    }
    if let Some(status) = plan.status.or_else(|| shared.random_status()) {
        return Ok(injected_error(shared, status, plan.retry_after_s, format));
    }
    Ok(route(shared, call, &plan))
}

/// The APIs the mock answers with a generated completion or embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Text,
    Embeddings,
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, no usage.
    CountTokens,
    /// OpenAI's Responses API, `POST /v1/responses`.
    Responses,
}

impl Api {
    /// The API of a POST path, and whether it came by an Azure deployment path. A
    /// trailing slash names the same API, as servers that redirect it do.
    fn of_path(path: &str) -> Option<(Api, bool)> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let openai = |rest: &str| match rest {
            "chat/completions" => Some(Api::Chat),
            "completions" => Some(Api::Text),
            "embeddings" => Some(Api::Embeddings),
            _ => None,
        };
        if path == "/v1/messages" {
            return Some((Api::Messages, false));
        }
        if path == "/v1/messages/count_tokens" {
            return Some((Api::CountTokens, false));
        }
        if path == "/v1/responses" {
            return Some((Api::Responses, false));
        }
        // Azure serves the Responses API outside the deployments.
        if path == "/openai/responses" {
            return Some((Api::Responses, true));
        }
        if let Some(rest) = path.strip_prefix("/v1/") {
            return openai(rest).map(|api| (api, false));
        }
        let (deployment, rest) = path.strip_prefix("/openai/deployments/")?.split_once('/')?;
        if deployment.is_empty() {
            return None;
        }
        openai(rest).map(|api| (api, true))
    }
}

fn route(shared: &Shared, call: &Call<'_>, plan: &Plan) -> Response<MockBody> {
    let method = &call.parts.method;
    let path = call.parts.uri.path();
    let format = ApiFormat::of_path(path);
    if method == Method::GET && path == "/v1/models" {
        return models(shared);
    }
    let api = match (method, Api::of_path(path)) {
        (&Method::POST, Some((api, azure))) => {
            let versioned = call
                .parts
                .uri
                .query()
                .is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")));
            if azure && !versioned {
                return ApiError::invalid_request(
                    "Missing required query parameter: api-version.".to_owned(),
                )
                .param("api-version")
                .response(shared, format);
            }
            api
        }
        _ => return ApiError::unknown_url(method, path).response(shared, format),
    };
    let parsed = match call.parsed {
        Ok(parsed) => parsed,
        Err(message) => return ApiError::invalid_request(message.clone()).response(shared, format),
    };
    match api {
        Api::Embeddings => embeddings(shared, parsed, call.body_bytes),
        Api::Text => completion(shared, call, parsed, plan, Kind::Text),
        Api::Chat => completion(shared, call, parsed, plan, Kind::Chat),
        Api::Responses => completion(shared, call, parsed, plan, Kind::Responses),
        Api::Messages => match anthropic::check_request(&call.parts.headers, parsed) {
            Ok(()) => completion(shared, call, parsed, plan, Kind::Messages),
            Err(message) => ApiError::invalid_request(message).response(shared, format),
        },
        Api::CountTokens => json_response(
            shared,
            StatusCode::OK,
            &serde_json::json!({ "input_tokens": prompt_tokens(call.body_bytes) }),
        ),
    }
}

fn record_of(
    parts: &Parts,
    body: &[u8],
    body_sha256: &str,
    parsed: Option<&ParsedBody>,
) -> RequestRecord {
    let mut headers = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined: &mut String| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    RequestRecord {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        body_bytes: body.len(),
        body_sha256: body_sha256.to_owned(),
        model: parsed.and_then(|p| p.model.clone()),
        stream: parsed.is_some_and(|p| p.stream),
    }
}

/// The fields of a request body the mock looks at.
#[derive(Debug, Default)]
struct ParsedBody {
    model: Option<String>,
    stream: bool,
    include_usage: bool,
    input: Option<serde_json::Value>,
    /// `max_tokens` and `messages` are present (Anthropic requires both).
    has_max_tokens: bool,
    has_messages: bool,
}

/// Wire view of a request body; other fields are skipped without being built.
#[derive(Deserialize)]
struct WireBody {
    model: Option<serde_json::Value>,
    stream: Option<serde_json::Value>,
    stream_options: Option<serde_json::Value>,
    input: Option<serde_json::Value>,
    max_tokens: Option<serde::de::IgnoredAny>,
    messages: Option<serde::de::IgnoredAny>,
}

impl ParsedBody {
    /// Err carries the client-facing message.
    fn parse(body: &[u8]) -> Result<ParsedBody, String> {
        // serde would also read a JSON array into a struct, field by position.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("We could not parse the JSON body of your request: \
                        expected a JSON object."
                .to_owned());
        }
        let wire: WireBody = serde_json::from_slice(body)
            .map_err(|e| format!("We could not parse the JSON body of your request: {e}."))?;
        let include_usage = wire
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        Ok(ParsedBody {
            model: wire
                .model
                .as_ref()
                .and_then(|m| m.as_str())
                .map(str::to_owned),
            stream: wire.stream.and_then(|s| s.as_bool()).unwrap_or(false),
            include_usage,
            input: wire.input,
            has_max_tokens: wire.max_tokens.is_some(),
            has_messages: wire.messages.is_some(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Endpoints.

fn health(shared: &Shared) -> Response<MockBody> {
    #[derive(Serialize)]
    struct Health<'a> {
        status: &'static str,
        name: &'a str,
    }
    let ok = {
        let mut h = shared.health.lock().unwrap_or_else(PoisonError::into_inner);
        let ok = h.answers[(h.checks % h.answers.len() as u64) as usize];
        h.checks += 1;
        ok
    };
    let (status, word) = if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "failing")
    };
    json_response(
        shared,
        status,
        &Health {
            status: word,
            name: &shared.name,
        },
    )
}

fn control(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<MockBody> {
    match (method, path) {
        (&Method::POST, "/mock/health") => {
            let pattern = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("pattern="));
            let Some(answers) = pattern.and_then(HealthPattern::parse) else {
                return ApiError::invalid_request(
                    "`pattern` must list `ok` and `fail`, comma-separated".into(),
                )
                .param("pattern")
                .response(shared, ApiFormat::OpenAi);
            };
            let mut h = shared.health.lock().unwrap_or_else(PoisonError::into_inner);
            *h = HealthPattern { answers, checks: 0 };
            json_response(
                shared,
                StatusCode::OK,
                &serde_json::json!({ "health": pattern }),
            )
        }
        (&Method::GET, "/mock/requests") => {
            let journal = shared.journal();
            json_response(shared, StatusCode::OK, &journal.requests)
        }
        (&Method::POST, "/mock/reset") => {
            shared.reset();
            json_response(
                shared,
                StatusCode::OK,
                &serde_json::json!({ "reset": true }),
            )
        }
        (&Method::GET, "/mock/stats") => {
            #[derive(Serialize)]
            struct Stats<'a> {
                name: &'a str,
                requests: u64,
                inflight: u64,
                health_checks: u64,
            }
            let stats = Stats {
                name: &shared.name,
                requests: shared.requests.load(Ordering::Relaxed),
                inflight: shared.inflight.load(Ordering::Relaxed),
                health_checks: shared
                    .health
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .checks,
            };
            json_response(shared, StatusCode::OK, &stats)
        }
        _ => ApiError::unknown_url(method, path).response(shared, ApiFormat::OpenAi),
    }
}

fn models(shared: &Shared) -> Response<MockBody> {
    #[derive(Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'a str,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let journal = shared.journal();
    let mut ids: BTreeSet<&str> = journal.models.iter().map(String::as_str).collect();
    ids.insert(DEFAULT_MODEL);
    let data = ids
        .into_iter()
        .map(|id| Model {
            id,
            object: "model",
            created: 0,
            owned_by: &shared.name,
        })
        .collect();
    json_response(
        shared,
        StatusCode::OK,
        &List {
            object: "list",
            data,
        },
    )
}

fn embeddings(shared: &Shared, parsed: &ParsedBody, body_bytes: usize) -> Response<MockBody> {
    #[derive(Serialize)]
    struct Embedding {
        object: &'static str,
        index: usize,
        embedding: [f32; EMBEDDING_DIMS],
    }
    #[derive(Serialize)]
    struct EmbeddingUsage {
        prompt_tokens: u64,
        total_tokens: u64,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Embedding>,
        model: &'a str,
        usage: EmbeddingUsage,
    }
    let inputs: Vec<&serde_json::Value> = match &parsed.input {
        None | Some(serde_json::Value::Null) => {
            return ApiError::invalid_request("'input' is a required property".to_owned())
                .param("input")
                .response(shared, ApiFormat::OpenAi);
        }
        Some(serde_json::Value::Array(items)) => items.iter().collect(),
        Some(single) => vec![single],
    };
    let data = inputs
        .into_iter()
        .enumerate()
        .map(|(index, input)| Embedding {
            object: "embedding",
            index,
            embedding: embedding_of(input),
        })
        .collect();
    let tokens = prompt_tokens(body_bytes);
    let list = List {
        object: "list",
        data,
        model: parsed.model.as_deref().unwrap_or(DEFAULT_MODEL),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    json_response(shared, StatusCode::OK, &list)
}

/// A deterministic vector in [-1, 1] derived from the input's hash.
fn embedding_of(input: &serde_json::Value) -> [f32; EMBEDDING_DIMS] {
    let digest = Sha256::digest(input.to_string().as_bytes());
    let mut vector = [0.0; EMBEDDING_DIMS];
    for (slot, pair) in vector.iter_mut().zip(digest.chunks_exact(2)) {
        let raw = u16::from_be_bytes([pair[0], pair[1]]);
        *slot = f32::from(raw) / f32::from(u16::MAX) * 2.0 - 1.0;
    }
    vector
}

fn prompt_tokens(body_bytes: usize) -> u64 {
    (body_bytes as u64).div_ceil(4)
}

fn completion(
    shared: &Shared,
    call: &Call<'_>,
    parsed: &ParsedBody,
    plan: &Plan,
    kind: Kind,
) -> Response<MockBody> {
    let completion = Completion::new(shared, call, parsed, plan, kind);
    let fault = plan.fault.and_then(Fault::body_fault);
    if parsed.stream {
        let delay = Duration::from_millis(plan.chunk_delay_ms);
        let stream = SseStream::new(completion, parsed.include_usage, delay, fault);
        let mut response = response(shared, StatusCode::OK, MockBody::sse(stream));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return response;
    }
    let full = completion.full_json();
    let body = match fault {
        Some(fault) => MockBody::truncated(full, fault),
        None => MockBody::full(full),
    };
    with_json_type(response(shared, StatusCode::OK, body))
}

// ---------------------------------------------------------------------------------------
// OpenAI completion objects.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `/v1/chat/completions`: `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `/v1/completions`: `text_completion`.
    Text,
    /// `/v1/messages`: Anthropic's `message` and its stream events.
    Messages,
    /// `/v1/responses`: a `response` and its stream events.
    Responses,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    /// Present when some prompt tokens came from a prompt cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct PromptDetails {
    cached_tokens: u64,
}

/// The outer object shared by every completion and chunk shape.
#[derive(Serialize)]
struct Envelope<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [C],
    /// Absent, `null` (stream chunks when the client asked for usage, as OpenAI does), or
    /// the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct DeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// One answer: everything needed to render it whole or as SSE events.
struct Completion {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    name: Arc<str>,
    chunks: u32,
    usage: Usage,
    /// Stream chunks carry `"usage": null` (`stream_options.include_usage` was asked).
    null_usage: bool,
}

impl Completion {
    fn new(shared: &Shared, call: &Call<'_>, parsed: &ParsedBody, plan: &Plan, kind: Kind) -> Self {
        let chunks = plan.chunks;
        let prompt_tokens = prompt_tokens(call.body_bytes);
        let cached_tokens = plan.cached_tokens.min(prompt_tokens);
        Completion {
            kind,
            id: match kind {
                Kind::Chat => format!("chatcmpl-mock-{}", call.seq),
                Kind::Text => format!("cmpl-mock-{}", call.seq),
                Kind::Messages => format!("msg_mock_{}", call.seq),
                Kind::Responses => format!("resp_mock_{}", call.seq),
            },
            created: unix_now(),
            model: parsed.model.as_deref().unwrap_or(DEFAULT_MODEL).to_owned(),
            name: Arc::clone(&shared.name),
            chunks,
            usage: Usage {
                prompt_tokens,
                completion_tokens: u64::from(chunks),
                total_tokens: prompt_tokens + u64::from(chunks),
                prompt_tokens_details: (cached_tokens > 0)
                    .then_some(PromptDetails { cached_tokens }),
            },
            null_usage: parsed.stream && parsed.include_usage,
        }
    }

    /// Prompt tokens reported as read from a prompt cache.
    fn cached_tokens(&self) -> u64 {
        self.usage
            .prompt_tokens_details
            .map_or(0, |d| d.cached_tokens)
    }

    /// Appends word `index` of the answer: "Hello from NAME word1 word2 …".
    fn push_word(&self, out: &mut String, index: u32) {
        if index > 0 {
            out.push(' ');
        }
        match index {
            0 => out.push_str("Hello"),
            1 => out.push_str("from"),
            2 => out.push_str(&self.name),
            n => {
                // Writing to a String cannot fail.
                let _ = write!(out, "word{}", n - 2);
            }
        }
    }

    fn content(&self) -> String {
        let mut content = String::with_capacity(self.chunks as usize * 7);
        for index in 0..self.chunks {
            self.push_word(&mut content, index);
        }
        content
    }

    fn envelope<'a, C>(&'a self, object: &'static str, choices: &'a [C]) -> Envelope<'a, C> {
        Envelope {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage: self.null_usage.then_some(None),
        }
    }

    fn full_json(&self) -> Bytes {
        match self.kind {
            Kind::Messages => return anthropic::full_json(self),
            Kind::Responses => return responses::full_json(self),
            Kind::Chat | Kind::Text => {}
        }
        let content = self.content();
        let mut out = Vec::with_capacity(256 + content.len());
        match self.kind {
            Kind::Chat => {
                let choice = ChatChoice {
                    index: 0,
                    message: Message {
                        role: "assistant",
                        content: &content,
                    },
                    logprobs: None,
                    finish_reason: "stop",
                };
                let mut envelope = self.envelope("chat.completion", std::slice::from_ref(&choice));
                envelope.usage = Some(Some(self.usage));
                write_json(&mut out, &envelope);
            }
            Kind::Text => {
                let choice = TextChoice {
                    text: &content,
                    index: 0,
                    logprobs: None,
                    finish_reason: Some("stop"),
                };
                let mut envelope = self.envelope("text_completion", std::slice::from_ref(&choice));
                envelope.usage = Some(Some(self.usage));
                write_json(&mut out, &envelope);
            }
            Kind::Messages | Kind::Responses => unreachable!("answered above"),
        }
        Bytes::from(out)
    }

    /// Event `index` of those before the content, if there is one: the chat role chunk, or
    /// the opening events of Anthropic's API or the Responses API.
    fn opening_event(&self, index: u8) -> Option<Bytes> {
        match self.kind {
            Kind::Chat => (index == 0).then(|| self.role_event()),
            Kind::Text => None,
            Kind::Messages => anthropic::opening_event(self, index),
            Kind::Responses => responses::opening_event(self, index),
        }
    }

    /// Event `index` of those after the content, if there is one: the usage chunk (when
    /// asked for) and `[DONE]`, or the closing events of Anthropic's API or the Responses
    /// API.
    fn closing_event(&self, index: u8, include_usage: bool) -> Option<Bytes> {
        match self.kind {
            Kind::Messages => return anthropic::closing_event(self, index),
            Kind::Responses => return responses::closing_event(self, index),
            Kind::Chat | Kind::Text => {}
        }
        match (index, include_usage) {
            (0, true) => Some(self.usage_event()),
            (0, false) | (1, true) => Some(Bytes::from_static(b"data: [DONE]\n\n")),
            _ => None,
        }
    }

    /// The opening chat chunk, `delta: {role: assistant, content: ""}`.
    fn role_event(&self) -> Bytes {
        let finish_reason = (self.chunks == 0).then_some("stop");
        self.delta_event(Some("assistant"), "", finish_reason)
    }

    /// Content chunk `index`; the last one carries `finish_reason: "stop"`.
    fn content_event(&self, index: u32, scratch: &mut String) -> Bytes {
        scratch.clear();
        self.push_word(scratch, index);
        let finish_reason = (index + 1 == self.chunks).then_some("stop");
        match self.kind {
            Kind::Chat => self.delta_event(None, scratch, finish_reason),
            Kind::Messages => anthropic::delta_event(scratch),
            Kind::Responses => responses::delta_event(self, index, scratch),
            Kind::Text => {
                let choice = TextChoice {
                    text: scratch,
                    index: 0,
                    logprobs: None,
                    finish_reason,
                };
                sse_event(&self.envelope("text_completion", std::slice::from_ref(&choice)))
            }
        }
    }

    fn delta_event(
        &self,
        role: Option<&'static str>,
        content: &str,
        finish_reason: Option<&'static str>,
    ) -> Bytes {
        let choice = DeltaChoice {
            index: 0,
            delta: Delta { role, content },
            logprobs: None,
            finish_reason,
        };
        sse_event(&self.envelope("chat.completion.chunk", std::slice::from_ref(&choice)))
    }

    /// The `stream_options.include_usage` chunk: no choices, only usage.
    fn usage_event(&self) -> Bytes {
        let object = match self.kind {
            Kind::Text => "text_completion",
            Kind::Chat | Kind::Messages | Kind::Responses => "chat.completion.chunk",
        };
        let mut envelope = self.envelope::<DeltaChoice<'_>>(object, &[]);
        envelope.usage = Some(Some(self.usage));
        sse_event(&envelope)
    }
}

fn write_json(out: &mut Vec<u8>, value: &impl Serialize) {
    // Only our own derive-serialized types reach here; they cannot fail to serialize.
    if let Err(e) = serde_json::to_writer(out, value) {
        log::error!("mock: serializing a response failed: {e}");
    }
}

/// An SSE event with a name (`event:` line), as Anthropic's API and the Responses API send.
fn named_event(name: &str, value: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    write_json(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn sse_event(value: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    write_json(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------
// Responses and errors.

fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn response(shared: &Shared, status: StatusCode, body: MockBody) -> Response<MockBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-mock-backend", shared.name_header.clone());
    response
}

fn with_json_type(mut response: Response<MockBody>) -> Response<MockBody> {
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_response(
    shared: &Shared,
    status: StatusCode,
    value: &impl Serialize,
) -> Response<MockBody> {
    let mut out = Vec::with_capacity(128);
    write_json(&mut out, value);
    with_json_type(response(shared, status, MockBody::full(Bytes::from(out))))
}

/// An error answer, in the OpenAI envelope or (for Anthropic-format paths) Anthropic's.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid_request(message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    fn unknown_url(method: &Method, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown request URL: {method} {path}."),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn response(&self, shared: &Shared, format: ApiFormat) -> Response<MockBody> {
        if format == ApiFormat::Anthropic {
            #[derive(Serialize)]
            struct Body<'a> {
                r#type: &'a str,
                message: &'a str,
            }
            #[derive(Serialize)]
            struct Wrapper<'a> {
                r#type: &'static str,
                error: Body<'a>,
            }
            let wrapper = Wrapper {
                r#type: "error",
                error: Body {
                    r#type: anthropic_error_type(self.status.as_u16()),
                    message: &self.message,
                },
            };
            return json_response(shared, self.status, &wrapper);
        }
        #[derive(Serialize)]
        struct Body<'a> {
            message: &'a str,
            r#type: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Wrapper<'a> {
            error: Body<'a>,
        }
        let wrapper = Wrapper {
            error: Body {
                message: &self.message,
                r#type: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        json_response(shared, self.status, &wrapper)
    }
}

/// `x-mock-status`, `fail_rate` or `rate_limit_rate`: that status in the error envelope.
fn injected_error(
    shared: &Shared,
    status: StatusCode,
    retry_after_s: u64,
    format: ApiFormat,
) -> Response<MockBody> {
    let kind = match status.as_u16() {
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let error = ApiError {
        status,
        message: format!("mock {}: injected status {}", shared.name, status.as_u16()),
        kind,
        param: None,
        code: None,
    };
    let mut response = error.response(shared, format);
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
    }
    response
}

// ---------------------------------------------------------------------------------------
// Response bodies.

/// How a body that is told to break does so, once half of it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFault {
    /// Fail the body: hyper aborts the connection without the terminating chunk.
    Reset,
    /// Send nothing more, never end; the connection stays open.
    Stall,
}

/// A body fault waiting to strike once half the body is sent.
#[derive(Debug)]
struct Breaker {
    fault: BodyFault,
    yielded: bool,
}

impl Breaker {
    fn new(fault: BodyFault) -> Self {
        Breaker {
            fault,
            yielded: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        // hyper buffers frames that are ready together and drops that buffer when the body
        // fails; yielding once lets it flush the first half to the socket before the fault.
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.fault {
            BodyFault::Reset => Poll::Ready(Some(Err(MockError::InjectedReset))),
            // No waker is registered on purpose: this body never produces again, and is
            // dropped (releasing `inflight`) when hyper sees the client go away.
            BodyFault::Stall => Poll::Pending,
        }
    }
}

/// Every response body of the mock; carries the in-flight guard of counted requests.
struct MockBody {
    kind: BodyKind,
    inflight: Option<InflightGuard>,
}

enum BodyKind {
    Full(Option<Bytes>),
    /// A plain answer announced whole (`Content-Length`) of which only the first half is sent.
    Truncated {
        head: Option<Bytes>,
        full_len: u64,
        breaker: Breaker,
    },
    Sse(Box<SseStream>),
}

impl MockBody {
    fn full(data: Bytes) -> Self {
        MockBody {
            kind: BodyKind::Full(Some(data)),
            inflight: None,
        }
    }

    fn truncated(full: Bytes, fault: BodyFault) -> Self {
        let full_len = full.len() as u64;
        MockBody {
            kind: BodyKind::Truncated {
                head: Some(full.slice(..full.len() / 2)),
                full_len,
                breaker: Breaker::new(fault),
            },
            inflight: None,
        }
    }

    fn sse(stream: SseStream) -> Self {
        MockBody {
            kind: BodyKind::Sse(Box::new(stream)),
            inflight: None,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        match &mut self.get_mut().kind {
            BodyKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKind::Truncated { head, breaker, .. } => match head.take() {
                Some(head) => Poll::Ready(Some(Ok(Frame::data(head)))),
                None => breaker.poll(cx),
            },
            BodyKind::Sse(stream) => stream.poll_event(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, BodyKind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyKind::Truncated { full_len, .. } => SizeHint::with_exact(*full_len),
            BodyKind::Sse(_) => SizeHint::default(),
        }
    }
}

/// Position in a streamed answer: the events before the content (the chat role chunk,
/// Anthropic's `message_start`…), the content, the events after it (usage, `[DONE]`,
/// Anthropic's `message_stop`…).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Open(u8),
    Content(u32),
    Close(u8),
    End,
}

/// A streamed answer produced event by event as hyper polls for frames: each SSE event is
/// its own body frame, produced only when due, so nothing is buffered ahead of time.
struct SseStream {
    completion: Completion,
    include_usage: bool,
    breaker: Option<Breaker>,
    next: Step,
    delay: Duration,
    /// Allocated once per stream (when `delay` is non-zero) and re-armed per chunk.
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping: bool,
    scratch: String,
}

impl SseStream {
    fn new(
        completion: Completion,
        include_usage: bool,
        delay: Duration,
        fault: Option<BodyFault>,
    ) -> Self {
        let sleep = (!delay.is_zero()).then(|| Box::pin(tokio::time::sleep(delay)));
        SseStream {
            completion,
            include_usage,
            breaker: fault.map(Breaker::new),
            next: Step::Open(0),
            delay,
            sleep,
            sleeping: false,
            scratch: String::new(),
        }
    }

    /// `Content(0)` if there is content (or a fault to reach), else what follows content.
    fn first_content(&self) -> Step {
        if self.completion.chunks > 0 || self.breaker.is_some() {
            Step::Content(0)
        } else {
            Step::Close(0)
        }
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        if self.sleeping {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            self.sleeping = false;
        }
        loop {
            let event = match self.next {
                Step::Open(index) => match self.completion.opening_event(index) {
                    Some(event) => {
                        self.next = Step::Open(index + 1);
                        event
                    }
                    None => {
                        self.next = self.first_content();
                        continue;
                    }
                },
                Step::Content(index) => {
                    if index == self.completion.chunks / 2 {
                        if let Some(breaker) = self.breaker.as_mut() {
                            return breaker.poll(cx);
                        }
                    }
                    let event = self.completion.content_event(index, &mut self.scratch);
                    if index + 1 < self.completion.chunks {
                        self.next = Step::Content(index + 1);
                        self.arm_sleep();
                    } else {
                        self.next = Step::Close(0);
                    }
                    event
                }
                Step::Close(index) => {
                    match self.completion.closing_event(index, self.include_usage) {
                        Some(event) => {
                            self.next = Step::Close(index + 1);
                            event
                        }
                        None => {
                            self.next = Step::End;
                            continue;
                        }
                    }
                }
                Step::End => return Poll::Ready(None),
            };
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
    }

    fn arm_sleep(&mut self) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(Instant::now() + self.delay);
            self.sleeping = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(opts: MockOptions) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, opts));
        addr
    }

    fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        raw
    }

    /// Sends one request on a fresh connection and reads until the server closes it.
    async fn exchange(addr: SocketAddr, raw: &str) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        out
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// A chunked body ended with its terminating `0\r\n\r\n` chunk.
        complete: bool,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        fn text(&self) -> String {
            String::from_utf8(self.body.clone()).unwrap()
        }
    }

    fn parse_reply(raw: &[u8]) -> Reply {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no head");
        let head = std::str::from_utf8(&raw[..split]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = &raw[split + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v == "chunked");
        let (body, complete) = if chunked {
            dechunk(rest)
        } else {
            (rest.to_vec(), true)
        };
        Reply {
            status,
            headers,
            body,
            complete,
        }
    }

    fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
        let mut body = Vec::new();
        loop {
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                return (body, false);
            };
            let size_line = std::str::from_utf8(&rest[..eol]).unwrap();
            let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                return (body, rest.starts_with(b"\r\n"));
            }
            if rest.len() < size + 2 {
                body.extend_from_slice(&rest[..rest.len().min(size)]);
                return (body, false);
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }

    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        parse_reply(&exchange(addr, &raw_request(method, path, headers, body)).await)
    }

    /// The JSON payloads of the `data:` events of an SSE body, `[DONE]` as a string.
    fn sse_events(body: &str) -> Vec<Value> {
        body.split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap_or_else(|_| Value::from(data)))
            .collect()
    }

    async fn stats(addr: SocketAddr) -> Value {
        call(addr, "GET", "/mock/stats", &[], "").await.json()
    }

    const CHAT: &str = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;

    #[tokio::test]
    async fn plain_chat_completion_has_openai_shape_and_echo_headers() {
        let addr = start(MockOptions {
            name: "b1".into(),
            chunks: 5,
            ..Default::default()
        })
        .await;
        let reply = call(addr, "POST", "/v1/chat/completions", &[], CHAT).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-mock-backend"), Some("b1"));
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let sha = hex::encode(Sha256::digest(CHAT.as_bytes()));
        assert_eq!(reply.header("x-mock-body-sha256"), Some(sha.as_str()));
        assert_eq!(
            reply.header("x-mock-body-bytes"),
            Some(CHAT.len().to_string().as_str())
        );
        let json = reply.json();
        assert_eq!(json["object"], "chat.completion");
        assert_eq!(json["model"], "m1");
        assert!(json["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(json["created"].as_u64().unwrap() > 0);
        let choice = &json["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "Hello from b1 word1 word2");
        assert_eq!(choice["finish_reason"], "stop");
        let prompt = CHAT.len().div_ceil(4) as u64;
        assert_eq!(json["usage"]["prompt_tokens"], prompt);
        assert_eq!(json["usage"]["completion_tokens"], 5);
        assert_eq!(json["usage"]["total_tokens"], prompt + 5);
    }

    #[tokio::test]
    async fn text_completion_has_text_completion_shape() {
        let addr = start(MockOptions::default()).await;
        let headers = [("x-mock-chunks", "3")];
        let reply = call(
            addr,
            "POST",
            "/v1/completions",
            &headers,
            r#"{"model":"t","prompt":"x"}"#,
        )
        .await;
        let json = reply.json();
        assert_eq!(json["object"], "text_completion");
        assert_eq!(json["choices"][0]["text"], "Hello from mock");
        assert_eq!(json["usage"]["completion_tokens"], 3);
    }

    #[tokio::test]
    async fn stream_sends_role_then_chunks_then_done_without_usage_by_default() {
        let addr = start(MockOptions {
            chunks: 4,
            ..Default::default()
        })
        .await;
        let body = r#"{"model":"m1","stream":true,"messages":[]}"#;
        let reply = call(addr, "POST", "/v1/chat/completions", &[], body).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("text/event-stream"));
        assert!(reply.header("x-mock-body-sha256").is_some());
        assert!(reply.complete);
        let events = sse_events(&reply.text());
        assert_eq!(events.len(), 1 + 4 + 1);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[0]["choices"][0]["delta"]["content"], "");
        let words: String = events[1..5]
            .iter()
            .map(|e| {
                assert_eq!(e["object"], "chat.completion.chunk");
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(words, "Hello from mock word1");
        assert_eq!(events[4]["choices"][0]["finish_reason"], "stop");
        assert!(events.iter().all(|e| e.get("usage").is_none()));
        assert_eq!(events[5], "[DONE]");
    }

    #[tokio::test]
    async fn stream_includes_usage_chunk_only_when_asked() {
        let addr = start(MockOptions {
            chunks: 2,
            ..Default::default()
        })
        .await;
        let body = r#"{"model":"m1","stream":true,"stream_options":{"include_usage":true}}"#;
        let reply = call(addr, "POST", "/v1/chat/completions", &[], body).await;
        let events = sse_events(&reply.text());
        assert_eq!(events.len(), 1 + 2 + 1 + 1);
        let usage = &events[3];
        assert_eq!(usage["choices"], Value::Array(vec![]));
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        assert_eq!(events[4], "[DONE]");
    }

    #[tokio::test]
    async fn first_chunk_arrives_before_the_next_is_produced() {
        let addr = start(MockOptions::default()).await;
        let body = r#"{"model":"m1","stream":true}"#;
        let headers = [("x-mock-chunks", "2"), ("x-mock-chunk-delay-ms", "400")];
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let raw = raw_request("POST", "/v1/chat/completions", &headers, body);
        stream.write_all(raw.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"Hello\"") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the first chunk");
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(started.elapsed() < Duration::from_millis(300));
        assert!(!String::from_utf8_lossy(&seen).contains("\" from\""));
    }

    #[tokio::test]
    async fn injected_status_answers_error_envelope() {
        let addr = start(MockOptions {
            retry_after_s: 7,
            ..Default::default()
        })
        .await;
        let reply = call(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-status", "503")],
            CHAT,
        )
        .await;
        assert_eq!(reply.status, 503);
        assert!(reply.header("x-mock-body-sha256").is_some());
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "server_error");
        assert!(error["message"].is_string());
        assert!(error["param"].is_null() && error["code"].is_null());

        let reply = call(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-status", "429")],
            CHAT,
        )
        .await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("7"));
        let headers = [("x-mock-status", "429"), ("x-mock-retry-after", "3")];
        let reply = call(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        assert_eq!(reply.header("retry-after"), Some("3"));
    }

    #[tokio::test]
    async fn fail_rate_one_fails_every_request() {
        let addr = start(MockOptions {
            fail_rate: 1.0,
            ..Default::default()
        })
        .await;
        let reply = call(addr, "POST", "/v1/chat/completions", &[], CHAT).await;
        assert_eq!(reply.status, 503);
        // Health checks are never faulted.
        assert_eq!(call(addr, "GET", "/health", &[], "").await.status, 200);
    }

    #[tokio::test]
    async fn health_answers_follow_the_pattern_set_in_turn() {
        let addr = start(MockOptions::default()).await;
        let bad = call(addr, "POST", "/mock/health?pattern=ok,maybe", &[], "").await;
        assert_eq!(bad.status, 400);
        let set = call(addr, "POST", "/mock/health?pattern=ok,fail,fail", &[], "").await;
        assert_eq!(set.status, 200);
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(call(addr, "GET", "/health", &[], "").await.status);
        }
        assert_eq!(seen, [200, 503, 503, 200, 503, 503, 200]);
        let stats = call(addr, "GET", "/mock/stats", &[], "").await.json();
        assert_eq!(stats["health_checks"], 7);
        assert_eq!(stats["requests"], 0, "health checks are not requests");
    }

    #[tokio::test]
    async fn requests_log_records_body_sha256_and_reset_clears_it() {
        let addr = start(MockOptions::default()).await;
        let headers = [("x-custom", "yes"), ("x-mock-status", "500")];
        call(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        call(addr, "GET", "/health", &[], "").await;
        let log = call(addr, "GET", "/mock/requests", &[], "").await.json();
        let log = log.as_array().unwrap();
        assert_eq!(log.len(), 1);
        let entry = &log[0];
        assert_eq!(entry["method"], "POST");
        assert_eq!(entry["path"], "/v1/chat/completions");
        assert_eq!(
            entry["body_sha256"],
            hex::encode(Sha256::digest(CHAT.as_bytes()))
        );
        assert_eq!(entry["body_bytes"], CHAT.len());
        assert_eq!(entry["model"], "m1");
        assert_eq!(entry["stream"], false);
        assert_eq!(entry["headers"]["x-custom"], "yes");
        assert_eq!(stats(addr).await["requests"], 1);

        call(addr, "POST", "/mock/reset", &[], "").await;
        let log = call(addr, "GET", "/mock/requests", &[], "").await.json();
        assert_eq!(log, Value::Array(vec![]));
        assert_eq!(stats(addr).await["requests"], 0);
    }

    #[tokio::test]
    async fn reset_mid_stream_ends_without_terminating_chunk() {
        let addr = start(MockOptions {
            chunks: 6,
            ..Default::default()
        })
        .await;
        let body = r#"{"model":"m1","stream":true}"#;
        let headers = [("x-mock-fault", "reset-mid-stream")];
        let raw = exchange(
            addr,
            &raw_request("POST", "/v1/chat/completions", &headers, body),
        )
        .await;
        assert!(!raw.ends_with(b"0\r\n\r\n"));
        let reply = parse_reply(&raw);
        assert_eq!(reply.status, 200);
        assert!(!reply.complete);
        let events = sse_events(&reply.text());
        assert_eq!(
            events.len(),
            1 + 3,
            "role chunk and half of the content chunks"
        );
        assert!(!reply.text().contains("[DONE]"));
        assert_eq!(stats(addr).await["inflight"], 0);
    }

    #[tokio::test]
    async fn reset_mid_body_of_a_plain_answer_cuts_it_short() {
        let addr = start(MockOptions::default()).await;
        let headers = [("x-mock-fault", "reset-mid-stream")];
        let reply = call(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        let announced: usize = reply.header("content-length").unwrap().parse().unwrap();
        assert_eq!(reply.body.len(), announced / 2);
    }

    /// Polls `/mock/stats` until `inflight` equals `want` (or a second passes).
    async fn wait_inflight(addr: SocketAddr, want: u64) {
        for _ in 0..100 {
            if stats(addr).await["inflight"] == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("inflight never reached {want}");
    }

    #[tokio::test]
    async fn hang_holds_until_the_client_goes_away() {
        let addr = start(MockOptions::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let raw = raw_request(
            "POST",
            "/v1/chat/completions",
            &[("x-mock-fault", "hang")],
            CHAT,
        );
        stream.write_all(raw.as_bytes()).await.unwrap();
        wait_inflight(addr, 1).await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
        assert!(read.is_err(), "a hung request must send nothing");
        drop(stream);
        wait_inflight(addr, 0).await;
    }

    #[tokio::test]
    async fn stall_mid_stream_keeps_the_connection_open_and_silent() {
        let addr = start(MockOptions {
            chunks: 4,
            ..Default::default()
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let headers = [("x-mock-fault", "stall-mid-stream")];
        let raw = raw_request(
            "POST",
            "/v1/chat/completions",
            &headers,
            r#"{"stream":true}"#,
        );
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\" from\"") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        let more = tokio::time::timeout(Duration::from_millis(150), stream.read(&mut buf)).await;
        assert!(more.is_err(), "a stalled stream must send nothing more");
        assert_eq!(stats(addr).await["inflight"], 1);
        drop(stream);
        wait_inflight(addr, 0).await;
    }

    #[tokio::test]
    async fn close_fault_drops_the_connection_without_a_response() {
        let addr = start(MockOptions::default()).await;
        let raw = raw_request(
            "POST",
            "/v1/chat/completions",
            &[("x-mock-fault", "close")],
            CHAT,
        );
        assert!(exchange(addr, &raw).await.is_empty());
        let log = call(addr, "GET", "/mock/requests", &[], "").await.json();
        assert_eq!(
            log.as_array().unwrap().len(),
            1,
            "recorded before the fault"
        );
    }

    #[tokio::test]
    async fn early_fault_answers_before_the_body_is_sent() {
        let addr = start(MockOptions::default()).await;
        for (status, want) in [(None, 413), (Some("401"), 401)] {
            // The head announces 10 MB that never come: only an answer that does not wait
            // for the body can arrive.
            let mut head = raw_request("POST", "/v1/chat/completions", &[], "");
            head = head.replace("content-length: 0", "content-length: 10000000");
            let mut headers = vec![("x-mock-fault", "early")];
            headers.extend(status.map(|s| ("x-mock-status", s)));
            for (name, value) in headers {
                head = head.replacen("\r\n\r\n", &format!("\r\n{name}: {value}\r\n\r\n"), 1);
            }
            let raw = tokio::time::timeout(Duration::from_secs(5), exchange(addr, &head))
                .await
                .expect("answered without the body");
            let reply = parse_reply(&raw);
            assert_eq!(reply.status, want);
            assert!(reply.json()["error"]["message"].is_string());
        }
        let log = call(addr, "GET", "/mock/requests", &[], "").await.json();
        let log = log.as_array().unwrap();
        assert_eq!(log.len(), 2);
        assert!(log.iter().all(|r| r["body_bytes"] == 0), "{log:?}");

        // An unusable value among the other headers is a 400 naming it, as without `early`.
        let reply = call(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-fault", "early"), ("x-mock-latency-ms", "soon")],
            CHAT,
        )
        .await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["param"], "x-mock-latency-ms");
    }

    #[tokio::test]
    async fn latency_header_delays_the_answer() {
        let addr = start(MockOptions::default()).await;
        let started = std::time::Instant::now();
        let reply = call(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-latency-ms", "120")],
            CHAT,
        )
        .await;
        assert_eq!(reply.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(120));
    }

    #[tokio::test]
    async fn bad_json_and_bad_headers_are_400_and_unknown_paths_404() {
        let addr = start(MockOptions::default()).await;
        let reply = call(addr, "POST", "/v1/chat/completions", &[], "{not json").await;
        assert_eq!(reply.status, 400);
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["param"].is_null() && error["code"].is_null());

        let reply = call(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-chunks", "many")],
            CHAT,
        )
        .await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["param"], "x-mock-chunks");

        let reply = call(addr, "GET", "/nope", &[], "").await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn embeddings_models_and_health() {
        let addr = start(MockOptions {
            name: "emb".into(),
            ..Default::default()
        })
        .await;
        let body = r#"{"model":"e1","input":["a","b"]}"#;
        let json = call(addr, "POST", "/v1/embeddings", &[], body).await.json();
        assert_eq!(json["object"], "list");
        let data = json["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["object"], "embedding");
        assert_eq!(data[1]["index"], 1);
        assert_eq!(
            data[0]["embedding"].as_array().unwrap().len(),
            EMBEDDING_DIMS
        );
        let again = call(addr, "POST", "/v1/embeddings", &[], body).await.json();
        assert_eq!(again["data"], json["data"], "deterministic");

        let models = call(addr, "GET", "/v1/models", &[], "").await.json();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["e1", "mock-model"]);

        let health = call(addr, "GET", "/health", &[], "").await.json();
        assert_eq!(health, serde_json::json!({ "status": "ok", "name": "emb" }));
    }

    #[test]
    fn plan_takes_headers_over_options() {
        let opts = MockOptions {
            chunks: 3,
            latency_ms: 5,
            ..Default::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-mock-chunks", HeaderValue::from_static("9"));
        headers.insert("x-mock-fault", HeaderValue::from_static("drip"));
        headers.insert("x-mock-status", HeaderValue::from_static("200"));
        let plan = Plan::new(&opts, &headers).unwrap();
        assert_eq!(plan.chunks, 9);
        assert_eq!(plan.latency_ms, 5);
        assert_eq!(plan.chunk_delay_ms, DRIP_DELAY_MS);
        assert_eq!(plan.status, None);
        headers.insert("x-mock-status", HeaderValue::from_static("42"));
        assert_eq!(
            Plan::new(&opts, &headers).unwrap_err().header,
            "x-mock-status"
        );
        headers.insert("x-mock-status", HeaderValue::from_static("502"));
        headers.insert("x-mock-fault", HeaderValue::from_static("explode"));
        assert_eq!(
            Plan::new(&opts, &headers).unwrap_err().header,
            "x-mock-fault"
        );
    }

    const MESSAGES: &str =
        r#"{"model":"claude-x","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    const VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

    /// `(event name, JSON data)` of each event of an Anthropic SSE body.
    fn named_events(body: &str) -> Vec<(String, Value)> {
        body.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|event| {
                let (name, data) = event.split_once('\n').expect("event and data lines");
                let name = name.strip_prefix("event: ").expect("an event line");
                let data = data.strip_prefix("data: ").expect("a data line");
                (name.to_owned(), serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn messages_answer_in_anthropics_shape_with_usage() {
        let addr = start(MockOptions {
            name: "claude-mock".into(),
            chunks: 4,
            ..Default::default()
        })
        .await;
        let reply = call(addr, "POST", "/v1/messages", &[VERSION], MESSAGES).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let json = reply.json();
        assert_eq!(json["type"], "message");
        assert_eq!(json["role"], "assistant");
        assert_eq!(json["model"], "claude-x");
        assert!(json["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(json["content"][0]["type"], "text");
        assert_eq!(json["content"][0]["text"], "Hello from claude-mock word1");
        assert_eq!(json["stop_reason"], "end_turn");
        let prompt = MESSAGES.len().div_ceil(4) as u64;
        assert_eq!(json["usage"]["input_tokens"], prompt);
        assert_eq!(json["usage"]["output_tokens"], 4);
        assert_eq!(json["usage"]["cache_read_input_tokens"], 0);
        assert_eq!(json["usage"]["cache_creation_input_tokens"], 0);

        let cached = [VERSION, ("x-mock-cached-tokens", "10")];
        let json = call(addr, "POST", "/v1/messages", &cached, MESSAGES)
            .await
            .json();
        assert_eq!(json["usage"]["input_tokens"], prompt - 10);
        assert_eq!(json["usage"]["cache_read_input_tokens"], 10);
    }

    #[tokio::test]
    async fn messages_stream_sends_anthropics_events_in_order() {
        let addr = start(MockOptions {
            chunks: 3,
            ..Default::default()
        })
        .await;
        let body = MESSAGES.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
        let reply = call(addr, "POST", "/v1/messages", &[VERSION], &body).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("text/event-stream"));
        assert!(reply.complete);
        let events = named_events(&reply.text());
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        for (name, data) in &events {
            assert_eq!(data["type"], name.as_str(), "data names its own event");
        }
        let start = &events[0].1["message"];
        assert_eq!(start["model"], "claude-x");
        assert_eq!(start["content"], Value::Array(vec![]));
        assert!(start["stop_reason"].is_null());
        let prompt = body.len().div_ceil(4) as u64;
        assert_eq!(start["usage"]["input_tokens"], prompt);
        let text: String = events[3..6]
            .iter()
            .map(|(_, e)| {
                assert_eq!(e["delta"]["type"], "text_delta");
                e["delta"]["text"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(text, "Hello from mock");
        assert_eq!(events[7].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(events[7].1["usage"]["output_tokens"], 3);
        assert!(!reply.text().contains("[DONE]"));
    }

    #[tokio::test]
    async fn messages_are_checked_and_fail_in_anthropics_envelope() {
        let addr = start(MockOptions::default()).await;
        let reply = call(addr, "POST", "/v1/messages", &[], MESSAGES).await;
        assert_eq!(reply.status, 400);
        let json = reply.json();
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version"));
        let no_max = r#"{"model":"m","messages":[]}"#;
        let reply = call(addr, "POST", "/v1/messages", &[VERSION], no_max).await;
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.json()["error"]["message"],
            "max_tokens: Field required"
        );

        let overloaded = [VERSION, ("x-mock-status", "529")];
        let reply = call(addr, "POST", "/v1/messages", &overloaded, MESSAGES).await;
        assert_eq!(reply.status, 529);
        assert_eq!(reply.json()["error"]["type"], "overloaded_error");

        // A fault cuts an Anthropic stream as it cuts an OpenAI one.
        let body = MESSAGES.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
        let headers = [VERSION, ("x-mock-fault", "reset-mid-stream")];
        let reply = call(addr, "POST", "/v1/messages", &headers, &body).await;
        assert_eq!(reply.status, 200);
        assert!(!reply.complete);
        assert!(!reply.text().contains("message_stop"));
    }

    #[test]
    fn a_trailing_slash_names_the_same_api() {
        for (path, api) in [
            ("/v1/messages/", Some((Api::Messages, false))),
            (
                "/v1/messages/count_tokens/",
                Some((Api::CountTokens, false)),
            ),
            ("/v1/chat/completions/", Some((Api::Chat, false))),
            (
                "/openai/deployments/d/chat/completions/",
                Some((Api::Chat, true)),
            ),
            ("/v1/", None),
            ("/v1//", None),
            ("/v1/messages//", None),
            ("/openai/deployments//chat/completions", None),
        ] {
            assert_eq!(Api::of_path(path), api, "{path}");
        }
    }

    #[tokio::test]
    async fn azure_deployment_paths_need_an_api_version() {
        let addr = start(MockOptions {
            chunks: 2,
            ..Default::default()
        })
        .await;
        let path = "/openai/deployments/gpt-4o-prod/chat/completions";
        let reply = call(addr, "POST", path, &[], CHAT).await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["param"], "api-version");
        let versioned = format!("{path}?api-version=2024-10-21");
        let reply = call(addr, "POST", &versioned, &[], CHAT).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["object"], "chat.completion");
        let embeddings = "/openai/deployments/e/embeddings/?api-version=1";
        let reply = call(addr, "POST", embeddings, &[], r#"{"input":"x"}"#).await;
        assert_eq!(reply.json()["object"], "list");
        let log = call(addr, "GET", "/mock/requests", &[], "").await.json();
        assert_eq!(log[1]["path"], path);
        assert_eq!(log[1]["query"], "api-version=2024-10-21");
        assert!(log[0]["query"].is_null());
    }
}
