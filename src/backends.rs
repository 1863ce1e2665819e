//! The backend set: each configured backend with its parsed upstream address, its key, and
//! the live statistics policies read (`inflight`, latency and TTFT EWMAs, tokens/s, error
//! rate). Statistics live in Rust, in atomics, so they survive policy swaps and are shared
//! by every worker thread without a lock.

use foldhash::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BackendConfig, Config};
use crate::dns::Address;
use crate::health::Health;
use crate::outlier::{Admission, Breaker, Why};
use crate::tls::CaFile;
use crate::window::Window;
use pingora::prelude::HttpPeer;

/// Where a backend lives, parsed from its `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix prepended to the client's path (`""` for none, never a trailing `/`).
    pub path_prefix: String,
    /// `host:port` for `HttpPeer` and the `Host` header.
    pub authority: String,
}

impl Upstream {
    /// Parse `http://host[:port][/prefix]` or `https://…`.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        // Errors quote the URL with any credentials in it masked.
        let shown = masked(url);
        let url = shown.as_str();
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("`{url}` must start with http:// or https://"));
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if hostport.contains('@') {
            return Err(format!(
                "`{url}` carries credentials: a backend's key goes in `api_key_env`"
            ));
        }
        // The client's path and query follow the prefix: a query or fragment here would
        // swallow them.
        if path.contains(['?', '#']) {
            return Err(format!(
                "`{url}` has a query or fragment: a backend URL is a scheme, host, port and path prefix"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // IPv6 literal: [::1]:8000
            let end = h
                .find(']')
                .ok_or_else(|| format!("`{url}` has an unclosed `[`"))?;
            let port = match &h[end + 1..] {
                "" => default_port,
                p => parse_port(p.strip_prefix(':').unwrap_or("x"), url)?,
            };
            (format!("[{}]", &h[..end]), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p, url)?),
                None => (hostport.to_string(), default_port),
            }
        };
        if host.is_empty() || host.contains(['@', ' ', '?', '#']) {
            return Err(format!("`{url}` has no valid host"));
        }
        Ok(Upstream {
            tls,
            authority: format!("{host}:{port}"),
            host,
            port,
            path_prefix: path.to_string(),
        })
    }

    /// The name the backend's certificate is verified against and sent as SNI: the URL's
    /// host (an IP literal without its brackets, which rustls verifies against the
    /// certificate's IP addresses and does not send as SNI).
    pub fn tls_name(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// `url` with what may be user information (`user:secret@`) masked as `***@`: everything
/// between the scheme and the last `@`, which a secret holding `/` or `?` cannot escape.
fn masked(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].rfind('@') {
        Some(at) => format!("{}***{}", &url[..after_scheme], &url[after_scheme + at..]),
        None => url.to_string(),
    }
}

fn parse_port(p: &str, url: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{url}` has an invalid port"))
}

/// An API key: printed as `***` everywhere, so it cannot leak into logs by accident.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        crate::redact::register(&s);
        Secret(s)
    }
    /// The key itself, for the one place that injects it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One backend as the proxy and the policies see it.
#[derive(Debug)]
pub struct Backend {
    /// Unique for the life of the process; lets per-thread Lua caches notice replacement.
    pub id: u64,
    pub config: BackendConfig,
    pub upstream: Upstream,
    /// The upstream's address: resolved when the config was loaded, and again on an
    /// interval when the host is a name (`dns`).
    pub addr: Arc<Address>,
    /// Client-facing model name → the name the upstream knows.
    pub models: HashMap<String, String>,
    pub api_key: Option<Secret>,
    /// Trust anchors from `ca_file`, in place of the system roots. `None`: system roots.
    pub tls_ca: Option<CaFile>,
    pub stats: Arc<BackendStats>,
}

/// Concurrent requests one HTTP/2 connection to a backend carries before another is opened
/// (Pingora's default is 1, which would open a connection per request).
pub const H2_STREAMS_PER_CONNECTION: usize = 100;

impl Backend {
    /// Backend `i` of `config`; every problem with it listed.
    fn build(
        i: usize,
        bc: &BackendConfig,
        previous: Option<&BackendSet>,
    ) -> Result<Backend, Vec<String>> {
        let mut problems = Vec::new();
        let mut note = |what: &str, e: String| problems.push(format!("backends[{i}].{what}: {e}"));
        // A backend that keeps its name and host keeps its address (refreshed in the
        // background): a reload neither waits on DNS nor moves its connections.
        let upstream_and_addr = match Upstream::parse(&bc.url) {
            Err(e) => {
                note("url", e);
                None
            }
            Ok(upstream) => {
                let kept = previous
                    .and_then(|p| p.get(&bc.name))
                    .map(|b| &b.addr)
                    .filter(|a| a.is_for(upstream.tls_name(), upstream.port))
                    .cloned();
                let addr = match kept {
                    Some(addr) => Ok(addr),
                    None => Address::resolve(upstream.tls_name(), upstream.port).map(Arc::new),
                };
                match addr {
                    Ok(addr) => Some((upstream, addr)),
                    Err(e) => {
                        note("url", e);
                        None
                    }
                }
            }
        };
        let api_key = match &bc.api_key_env {
            Some(var) => match crate::config::api_key_from_env(var) {
                Ok(key) => Some(Secret::new(key)),
                Err(e) => {
                    note("api_key_env", e);
                    None
                }
            },
            None => None,
        };
        let tls_ca = match &bc.ca_file {
            Some(path) => match crate::tls::load_ca_file(path) {
                Ok(ca) => Some(ca),
                Err(e) => {
                    note("ca_file", e.to_string());
                    None
                }
            },
            None => None,
        };
        let Some((upstream, addr)) = upstream_and_addr.filter(|_| problems.is_empty()) else {
            return Err(problems);
        };
        // State follows a backend that keeps its name and URL; one whose URL changed is
        // another server, and starts afresh.
        let stats = previous
            .and_then(|p| p.get(&bc.name))
            .filter(|b| b.config.url == bc.url)
            .map(|b| b.stats.clone())
            .unwrap_or_default();
        Ok(Backend {
            id: NEXT_BACKEND_ID.fetch_add(1, Ordering::Relaxed),
            models: bc.models.pairs().into_iter().collect(),
            config: bc.clone(),
            upstream,
            addr,
            api_key,
            tls_ca,
            stats,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// How to reach the backend, for requests and health checks alike: TLS for `https://`
    /// (certificate and host name always verified, SNI from the URL host, `ca_file` when
    /// set; Pingora never falls back to cleartext), and HTTP/2 when `http2` is set.
    /// Timeouts are the caller's.
    pub fn peer(&self) -> HttpPeer {
        let u = &self.upstream;
        let sni = if u.tls { u.tls_name() } else { "" };
        let mut peer = HttpPeer::new(self.addr.get(), u.tls, sni.to_string());
        // Pingora pools connections by address and SNI: after a reload that changes the CAs
        // or the protocol, connections made under the old settings must not be reused.
        let ca_digest = self.tls_ca.as_ref().map_or(0, |ca| ca.digest);
        peer.group_key = (ca_digest << 1) | u64::from(self.config.http2);
        let o = &mut peer.options;
        o.verify_cert = true;
        o.verify_hostname = true;
        o.ca = self.tls_ca.as_ref().map(|ca| ca.certs.clone());
        if self.config.http2 {
            // TLS negotiates by ALPN (h2, else HTTP/1.1); cleartext has no negotiation, so
            // HTTP/2 there is h2c with prior knowledge.
            let min_version = if u.tls { 1 } else { 2 };
            o.set_http_version(2, min_version);
            o.max_h2_streams = H2_STREAMS_PER_CONNECTION;
        }
        peer
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// Take one of the backend's `max_inflight` slots, atomically (so concurrent requests
    /// cannot all see the last free slot); the request counts in flight until the guard
    /// drops. `None` when the backend is full.
    pub fn try_start_request(&self) -> Option<InflightGuard> {
        let max = self.config.max_inflight;
        self.stats
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(InflightGuard {
            stats: self.stats.clone(),
            bounded: max > 0,
        })
    }

    /// Whether an attempt could begin on it now (see `RequestCtx::begin_attempt`): it has
    /// room and its breaker would let the request through (`panic`: the plan's mode).
    pub fn can_begin(&self, now: tokio::time::Instant, panic: bool) -> bool {
        self.has_capacity() && self.stats.breaker.would_admit(now, panic)
    }

    /// Whether a new request may be sent now (capacity from `max_inflight`).
    pub fn has_capacity(&self) -> bool {
        let max = self.config.max_inflight;
        max == 0 || self.stats.inflight() < max
    }

    /// Whether the backend may be a candidate now, and if not, why.
    pub fn eligibility(&self, now: tokio::time::Instant) -> Result<(), Ineligible> {
        if !self.stats.health.is_healthy() {
            return Err(Ineligible::Unhealthy);
        }
        match self.stats.breaker.admission(now) {
            Admission::Open | Admission::Probe => {}
            Admission::Closed(Why::Ejected) => return Err(Ineligible::Ejected),
            Admission::Closed(Why::CoolingDown) => return Err(Ineligible::CoolingDown),
            Admission::Closed(Why::Draining) => return Err(Ineligible::Draining),
        }
        if self.has_capacity() {
            Ok(())
        } else {
            Err(Ineligible::Full)
        }
    }
}

/// Why a backend is not a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    Unhealthy,
    Ejected,
    CoolingDown,
    Draining,
    /// At `max_inflight`.
    Full,
}

impl Ineligible {
    pub fn as_str(&self) -> &'static str {
        match self {
            Ineligible::Unhealthy => "unhealthy",
            Ineligible::Ejected => "ejected",
            Ineligible::CoolingDown => "cooling down",
            Ineligible::Draining => "draining",
            Ineligible::Full => "at max_inflight",
        }
    }
}

/// The backends of one config generation, with a model index.
#[derive(Debug, Default)]
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
    by_name: HashMap<String, usize>,
    by_model: HashMap<String, Vec<usize>>,
}

static NEXT_BACKEND_ID: AtomicU64 = AtomicU64::new(1);

impl BackendSet {
    /// Build from a validated config. `previous` lends its statistics to backends of the
    /// same name and URL, so a reload keeps in-flight counts, EWMAs and health. Every
    /// problem (a URL, a host that does not resolve, a key, a CA file) is listed.
    pub fn build(
        config: &Config,
        previous: Option<&BackendSet>,
    ) -> Result<BackendSet, Vec<String>> {
        let mut set = BackendSet::default();
        let mut problems = Vec::new();
        for (i, bc) in config.backends.iter().enumerate() {
            let backend = match Backend::build(i, bc, previous) {
                Ok(b) => b,
                Err(mut p) => {
                    problems.append(&mut p);
                    continue;
                }
            };
            for model in backend.models.keys() {
                set.by_model.entry(model.clone()).or_default().push(i);
            }
            set.by_name.insert(bc.name.clone(), i);
            set.backends.push(Arc::new(backend));
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(name).map(|&i| &self.backends[i])
    }

    /// Backends that serve `model` (every backend when the request names no model), without
    /// collecting them.
    pub fn each_serving<'a>(
        &'a self,
        model: Option<&str>,
    ) -> impl Iterator<Item = &'a Arc<Backend>> + 'a {
        let (all, some) = match model {
            None => (self.backends.len(), &[][..]),
            Some(m) => (0, self.by_model.get(m).map_or(&[][..], Vec::as_slice)),
        };
        // One iterator type for both cases: every backend (`all` of them) or the model's.
        let some = some.iter().map(|&i| &self.backends[i]);
        self.backends.iter().take(all).chain(some)
    }

    /// Backends that serve `model` (every backend when the request names no model).
    pub fn serving(&self, model: Option<&str>) -> Vec<Arc<Backend>> {
        self.each_serving(model).cloned().collect()
    }

    pub fn knows_model(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    /// Whether one more ejection keeps the ejected share within `max_percent`.
    pub fn may_eject(&self, max_percent: u32) -> bool {
        let ejected = self
            .backends
            .iter()
            .filter(|b| b.stats.breaker.is_ejected())
            .count();
        (ejected + 1) * 100 <= self.backends.len() * max_percent as usize
    }
}

/// Smoothing factor of the EWMAs: each new sample weighs 20%.
const EWMA_ALPHA: f64 = 0.2;
/// Seconds in the error-rate window.
const WINDOW_SECS: usize = 60;

/// Live statistics of one backend, and what its requests and health checks taught us.
#[derive(Debug)]
pub struct BackendStats {
    /// Active health-check state.
    pub health: Health,
    /// Ejection, 429 cool-down and drain state.
    pub breaker: Breaker,
    inflight: AtomicU32,
    latency_ms: AtomicF64,
    ttft_ms: AtomicF64,
    tps: AtomicF64,
    /// Successes (0) and failures (1) per second.
    window: Window<WINDOW_SECS>,
    error_rate_second: AtomicU64,
    error_rate_cached: AtomicF64,
}

impl Default for BackendStats {
    fn default() -> Self {
        BackendStats {
            health: Health::default(),
            breaker: Breaker::default(),
            inflight: AtomicU32::new(0),
            latency_ms: AtomicF64::default(),
            ttft_ms: AtomicF64::default(),
            tps: AtomicF64::default(),
            window: Window::default(),
            error_rate_second: AtomicU64::new(0),
            error_rate_cached: AtomicF64::default(),
        }
    }
}

/// Outcome of one upstream attempt, as the statistics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Neither: the backend asked us to slow down (429), or the client went away.
    Neutral,
}

impl BackendStats {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
    pub fn latency_ms(&self) -> f64 {
        self.latency_ms.get()
    }
    pub fn ttft_ms(&self) -> f64 {
        self.ttft_ms.get()
    }
    pub fn tps(&self) -> f64 {
        self.tps.get()
    }

    /// Count a request as in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            stats: self.clone(),
            bounded: false,
        }
    }

    pub fn record_latency(&self, total: Duration) {
        self.latency_ms.ewma(total.as_secs_f64() * 1e3);
    }
    pub fn record_ttft(&self, ttft: Duration) {
        self.ttft_ms.ewma(ttft.as_secs_f64() * 1e3);
    }
    pub fn record_tps(&self, tokens_per_second: f64) {
        if tokens_per_second.is_finite() && tokens_per_second > 0.0 {
            self.tps.ewma(tokens_per_second);
        }
    }

    pub fn record_outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.window.add(now_secs(), 0),
            Outcome::Failure => self.window.add(now_secs(), 1),
            Outcome::Neutral => {}
        }
        if outcome == Outcome::Failure {
            // A failure shows at once; successes may wait for the next second.
            self.error_rate_second.store(0, Ordering::Release);
        }
    }

    /// Share of failed attempts over the last 60 s (0 when there were none), recomputed
    /// at most once a second: policies read it for every backend on every request, and
    /// scanning the window each time was the largest cost of a decision.
    pub fn error_rate(&self) -> f64 {
        self.error_rate_at(now_secs())
    }

    /// [`Self::error_rate`] with the clock read by the caller (once per decision).
    pub fn error_rate_at(&self, now: u64) -> f64 {
        if self.error_rate_second.load(Ordering::Acquire) == now {
            return self.error_rate_cached.get();
        }
        let rate = self.scan_error_rate(now);
        self.error_rate_cached
            .0
            .store(rate.to_bits(), Ordering::Relaxed);
        self.error_rate_second.store(now, Ordering::Release);
        rate
    }

    fn scan_error_rate(&self, now: u64) -> f64 {
        let [ok, failed] = self.window.sums(now);
        if ok + failed == 0 {
            0.0
        } else {
            failed as f64 / (ok + failed) as f64
        }
    }
}

pub use crate::window::now_secs;

/// Decrements a backend's in-flight count when dropped (also on error paths and panics),
/// waking requests queued for capacity when the backend has a `max_inflight`.
#[derive(Debug)]
pub struct InflightGuard {
    stats: Arc<BackendStats>,
    bounded: bool,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.bounded {
            CAPACITY_FREED.notify_waiters();
        }
    }
}

/// Notified whenever a request to a backend with `max_inflight` ends.
pub static CAPACITY_FREED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// An f64 in an `AtomicU64`; 0.0 until the first sample.
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn ewma(&self, sample: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if bits == 0 {
                    sample
                } else {
                    old + EWMA_ALPHA * (sample - old)
                };
                Some(new.to_bits())
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = Upstream::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path_prefix.as_str()),
            (false, "127.0.0.1", 8000, "")
        );
        let u = Upstream::parse("https://api.example.com/openai/").unwrap();
        assert_eq!(
            (u.tls, u.port, u.path_prefix.as_str()),
            (true, 443, "/openai")
        );
        assert_eq!(u.authority, "api.example.com:443");
        let u = Upstream::parse("http://[::1]:9000").unwrap();
        assert_eq!(u.authority, "[::1]:9000");
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("http://:80").is_err());
        assert!(Upstream::parse("http://h:0").is_err());
        assert!(Upstream::parse("http://user@h:1").is_err());
        for url in ["http://h:1/pre?x=1", "http://h:1/pre#frag", "http://h:1/?x"] {
            let e = Upstream::parse(url).unwrap_err();
            assert!(e.contains("query or fragment"), "{e}");
        }
    }

    #[test]
    fn credentials_in_a_url_are_refused_without_being_quoted() {
        for url in [
            "https://svc:sk-live-SECRET123@api.example.com",
            "https://svc:sk-live-SECRET123@api.example.com:8443/v1",
            "svc:sk-live-SECRET123@api.example.com",
            "http://sk-live-SECRET123@[::1]:9000",
        ] {
            let e = Upstream::parse(url).unwrap_err();
            assert!(!e.contains("SECRET"), "{e}");
            assert!(e.contains("***@"), "{e}");
        }
        let e = Upstream::parse("https://u:p@h").unwrap_err();
        assert!(e.contains("api_key_env"), "{e}");
        // A secret holding `/` is masked too.
        assert_eq!(masked("http://u:pa/ss@h:x"), "http://***@h:x");
        let e = Upstream::parse("http://u:pa/ss@h").unwrap_err();
        assert!(!e.contains("pa/ss"), "{e}");
    }

    #[test]
    fn peers_verify_tls_by_url_host_and_keep_pools_apart_by_protocol() {
        use pingora::upstreams::peer::Peer;
        let config = Config::parse(
            r#"
routes: [{ policy: round_robin }]
backends:
  - { name: h1, url: "https://127.0.0.1:9443/v1", models: [m] }
  - { name: h2, url: "https://127.0.0.1:9443/v1", models: [m], http2: true }
  - { name: h2c, url: "http://127.0.0.1:9000", models: [m], http2: true }
  - { name: v6, url: "https://[::1]:9443", models: [m] }
"#,
        )
        .unwrap();
        let set = BackendSet::build(&config, None).unwrap();
        let peer = |name: &str| set.get(name).unwrap().peer();
        let (h1, h2, h2c) = (peer("h1"), peer("h2"), peer("h2c"));
        assert!(h1.is_tls() && h1.options.verify_cert && h1.options.verify_hostname);
        assert_eq!(h1.sni, "127.0.0.1");
        assert_eq!(peer("v6").sni, "::1", "an IP literal without brackets");
        let versions = |p: &HttpPeer| {
            (
                p.options.alpn.get_max_http_version(),
                p.options.alpn.get_min_http_version(),
            )
        };
        assert_eq!(versions(&h1), (1, 1));
        assert_eq!(versions(&h2), (2, 1), "h2 by ALPN, HTTP/1.1 if declined");
        assert_eq!(
            versions(&h2c),
            (2, 2),
            "cleartext h2 is h2c with prior knowledge"
        );
        assert!(!h2c.is_tls());
        assert_ne!(
            h1.reuse_hash(),
            h2.reuse_hash(),
            "a protocol change must not reuse the old pool"
        );
        assert_eq!(h1.reuse_hash(), peer("h1").reuse_hash());
    }

    #[test]
    fn inflight_guard_counts_down_on_drop() {
        let s = Arc::new(BackendStats::default());
        let a = s.start();
        let b = s.start();
        assert_eq!(s.inflight(), 2);
        drop(a);
        assert_eq!(s.inflight(), 1);
        drop(b);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn ewma_starts_at_first_sample_then_smooths() {
        let s = BackendStats::default();
        s.record_latency(Duration::from_millis(100));
        assert_eq!(s.latency_ms(), 100.0);
        s.record_latency(Duration::from_millis(200));
        assert!((s.latency_ms() - 120.0).abs() < 1e-9);
    }

    #[test]
    fn error_rate_counts_the_window() {
        let s = BackendStats::default();
        assert_eq!(s.error_rate(), 0.0);
        s.record_outcome(Outcome::Success);
        s.record_outcome(Outcome::Success);
        s.record_outcome(Outcome::Failure);
        s.record_outcome(Outcome::Failure);
        assert!((s.error_rate() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("sk-live-123".into());
        assert_eq!(format!("{s} {s:?}"), "*** ***");
    }
}
