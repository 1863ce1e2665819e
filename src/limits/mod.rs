//! Tenant limits: requests and tokens per minute, requests in flight, and spend per UTC
//! day.
//!
//! Tokens and spend are *reserved* when a request is admitted (the prompt estimate plus
//! `max_tokens`, priced at the dearest backend serving the model) and *settled* to the
//! reported usage when it ends, so concurrent requests cannot overshoot a limit. Counters
//! live in this process, or in Redis when `redis:` is configured (one atomic script per
//! admission, so a fleet enforces one limit). While Redis is unreachable the instance
//! counts on its own (fail-open, the default) or refuses (fail-closed), and replays what it
//! counted once Redis is back.

mod fleet;
mod local;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::warn;

use crate::backends::Backend;
use crate::config::{Config, Cost, FailMode, TenantLimits};
use crate::errors::ClientError;
use crate::metrics::METRICS;
use crate::request::RequestMeta;

use fleet::RedisCounters;
use local::LocalCounters;

/// The sliding window of the per-minute limits.
pub(crate) const WINDOW_MS: u64 = 60_000;
pub(crate) const DAY_MS: u64 = 86_400_000;
const NANO_PER_USD: f64 = 1e9;
/// Reservations are capped here (a `max_tokens` of 1e18 must not overflow a counter); far
/// above any limit, so a request this large is refused all the same.
pub(crate) const MAX_TOKENS: u64 = 1 << 40;
const MAX_NANO: f64 = 1e17;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Concurrent,
    Requests,
    Tokens,
    Spend,
}

impl Kind {
    /// Suffix of the `x-ratelimit-*` headers, and the metric label.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Concurrent => "concurrent",
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::Spend => "usd",
        }
    }
}

/// One admission to check: what the request reserves against which limits.
#[derive(Debug)]
pub struct Ask<'a> {
    pub tenant: &'a str,
    pub id: &'a str,
    pub limits: &'a TenantLimits,
    pub tokens: u64,
    /// Spend reserved, in nano-USD.
    pub nano: i64,
    /// UTC day number the spend counts against.
    pub day: u64,
}

impl Ask<'_> {
    fn budget_nano(&self) -> Option<i64> {
        day_budget_nano(self.limits)
    }
}

/// The daily budget in nano-USD, as admissions compare spend with it.
fn day_budget_nano(limits: &TenantLimits) -> Option<i64> {
    limits.usd_per_day.map(|u| (u * NANO_PER_USD) as i64)
}

/// Counters as an admission left them (or found them, when refused).
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub requests: u64,
    pub tokens: u64,
    pub inflight: u64,
    pub spent_nano: i64,
}

#[derive(Debug)]
pub enum Outcome {
    Admitted(Snapshot),
    Refused {
        kind: Kind,
        retry_ms: u64,
        snapshot: Snapshot,
    },
}

/// The end of a request, to settle against the counters that admitted it.
#[derive(Debug, Clone)]
pub struct Settle {
    pub tenant: String,
    pub id: String,
    /// Whether it holds a concurrency slot.
    pub concurrent: bool,
    /// Tokens really used, replacing the reservation; `None` keeps the reservation.
    pub tokens: Option<u64>,
    /// Spend to add to the reservation (negative when it cost less).
    pub nano_delta: i64,
    pub day: u64,
}

/// Where an admission was counted, so its settlement goes to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    Redis,
}

/// An admitted request's hold on its tenant's limits, until [`Limiter::settle`].
#[derive(Debug)]
pub struct Lease {
    tenant: String,
    id: String,
    day: u64,
    tokens: Option<u64>,
    nano: Option<i64>,
    concurrent: bool,
    store: Store,
    /// `x-ratelimit-*` headers for the response.
    pub headers: Vec<(&'static str, String)>,
}

impl Lease {
    /// Whether the request holds one of its tenant's `concurrent` slots.
    pub fn holds_a_slot(&self) -> bool {
        self.concurrent
    }
}

/// A request over one of its tenant's limits: 429 with `Retry-After` and `x-ratelimit-*`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    pub kind: Kind,
    /// `None` for a request larger than the limit itself: retrying cannot help, and the
    /// answer says so with `x-should-retry: false` (which OpenAI's SDKs obey) instead.
    pub retry_after_secs: Option<u64>,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
}

/// The tenant limits of this process: counters here, or in Redis.
pub struct Limiter {
    local: LocalCounters,
    redis: Option<Arc<RedisCounters>>,
    on_failure: FailMode,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("redis", &self.redis.is_some())
            .field("on_failure", &self.on_failure)
            .finish()
    }
}

impl Limiter {
    /// Counters for this config; with `redis:`, starts the thread that talks to Redis.
    pub fn new(config: &Config) -> anyhow::Result<Limiter> {
        let redis = match &config.redis {
            Some(r) => Some(RedisCounters::start(r)?),
            None => None,
        };
        Ok(Limiter {
            local: LocalCounters::default(),
            redis,
            on_failure: config
                .redis
                .as_ref()
                .map_or(FailMode::Open, |r| r.on_failure),
        })
    }

    /// Count a request against its tenant's limits, reserving its tokens and spend.
    pub async fn admit(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        allowed: &[Arc<Backend>],
        meta: &RequestMeta,
    ) -> Result<Lease, ClientError> {
        let (tokens, nano) = if crate::plan::is_free_api(&meta.path) {
            (0, 0)
        } else {
            let tokens = meta
                .tokens()
                .saturating_add(meta.completion_reserve(limits.default_max_tokens))
                .min(MAX_TOKENS);
            (tokens, reserved_nano(allowed, meta, limits))
        };
        let now = now_ms();
        // Counters are keyed by an id of our own: a client's `x-request-id` may repeat.
        let id = uuid::Uuid::new_v4().simple().to_string();
        let ask = Ask {
            tenant,
            id: &id,
            limits,
            tokens,
            nano,
            day: now / DAY_MS,
        };
        let (outcome, store) = match &self.redis {
            Some(r) if r.is_up() => match r.admit(&ask).await {
                Ok(o) => (o, Store::Redis),
                Err(()) => {
                    // Redis may have run the admission whose answer was lost. Admitted
                    // here, the request's settlement reaches Redis in time; refused here,
                    // what Redis may hold for it (a concurrency slot for `lease_seconds`)
                    // is given back.
                    let fallen = self.fall_back(&ask, now);
                    if !matches!(fallen, Ok((Outcome::Admitted(_), _))) {
                        r.withdraw(&ask).await;
                    }
                    fallen?
                }
            },
            Some(_) => self.fall_back(&ask, now)?,
            None => (self.local.admit(&ask, now), Store::Local),
        };
        let day = ask.day;
        match outcome {
            Outcome::Admitted(snapshot) => Ok(Lease {
                tenant: tenant.to_string(),
                day,
                id,
                tokens: limits.tpm.map(|_| tokens),
                nano: limits.usd_per_day.map(|_| nano),
                concurrent: limits.concurrent.is_some(),
                store,
                headers: headers(limits, &snapshot, now, None),
            }),
            Outcome::Refused {
                kind,
                retry_ms,
                snapshot,
            } => {
                // A request over a limit on its own is told so, whichever limit refused it
                // first: waiting for the others would only get it refused by that one.
                let never = [Kind::Tokens, Kind::Spend]
                    .into_iter()
                    .find(|&k| never_fits(k, limits, tokens, nano));
                let kind = never.unwrap_or(kind);
                METRICS
                    .rate_limited
                    .with_label_values(&[tenant, kind.name()])
                    .inc();
                let retry_after_secs = retry_ms.div_ceil(1000).max(1);
                let refused = never.is_none().then_some((kind, retry_ms));
                let mut headers = headers(limits, &snapshot, now, refused);
                if never.is_some() {
                    headers.push(("x-should-retry", "false".into()));
                }
                Err(ClientError::RateLimited(Box::new(Exceeded {
                    kind,
                    retry_after_secs: never.is_none().then_some(retry_after_secs),
                    message: message(kind, limits, tokens, nano, retry_after_secs),
                    headers,
                })))
            }
        }
    }

    /// Redis is unreachable: count here (fail-open, remembered for Redis) or refuse.
    fn fall_back(&self, ask: &Ask, now: u64) -> Result<(Outcome, Store), ClientError> {
        if self.on_failure == FailMode::Closed {
            return Err(ClientError::LimitsUnavailable);
        }
        let outcome = self.local.admit(ask, now);
        if let (Outcome::Admitted(_), Some(r)) = (&outcome, &self.redis) {
            r.remember_admission(ask, now);
        }
        Ok((outcome, Store::Local))
    }

    /// Settle at once when that needs no call to Redis (this instance's counters only):
    /// the proxy does so before an answer's last byte goes out, so that the client's next
    /// request never finds this one's reservation still held. Otherwise the lease comes
    /// back, for [`Limiter::settle`].
    pub fn settle_locally(
        &self,
        lease: Lease,
        tokens: Option<u64>,
        nano: Option<i64>,
    ) -> Result<(), Lease> {
        if self.redis.is_some() {
            return Err(lease);
        }
        self.local
            .settle(&Self::settlement(lease, tokens, nano), now_ms());
        Ok(())
    }

    /// The request ended: release its slot and settle its reservation to what it used
    /// (`None`: usage unknown, the reservation stands).
    pub async fn settle(&self, lease: Lease, tokens: Option<u64>, nano: Option<i64>) {
        let store = lease.store;
        let s = Self::settlement(lease, tokens, nano);
        let now = now_ms();
        match (&self.redis, store) {
            (Some(r), Store::Redis) => r.settle(s).await,
            (Some(r), Store::Local) => {
                // Admitted while Redis was away: its admission is in the journal, or was
                // replayed already; either way Redis gets the settlement too.
                self.local.settle(&s, now);
                r.settle(s).await;
            }
            (None, _) => self.local.settle(&s, now),
        }
    }

    fn settlement(lease: Lease, tokens: Option<u64>, nano: Option<i64>) -> Settle {
        Settle {
            tenant: lease.tenant,
            id: lease.id,
            concurrent: lease.concurrent,
            tokens: lease.tokens.and(tokens),
            nano_delta: match (lease.nano, nano) {
                (Some(reserved), Some(actual)) => actual - reserved,
                _ => 0,
            },
            day: lease.day,
        }
    }
}

/// Spend reserved for a request: its tokens at the dearest prices of the backends that
/// may serve it (`allowed`: they serve its model, in its format, and the tenant may use
/// them), in nano-USD.
fn reserved_nano(allowed: &[Arc<Backend>], meta: &RequestMeta, limits: &TenantLimits) -> i64 {
    if limits.usd_per_day.is_none() {
        return 0;
    }
    let mut dearest = Cost::default();
    for b in allowed {
        dearest.input = dearest.input.max(b.config.cost.input);
        dearest.output = dearest.output.max(b.config.cost.output);
    }
    let completion = meta.completion_reserve(limits.default_max_tokens);
    (dearest.usd(meta.tokens(), completion) * NANO_PER_USD)
        .ceil()
        .min(MAX_NANO) as i64
}

/// What a request really cost, in nano-USD.
pub fn nano_usd(usd: f64) -> i64 {
    (usd * NANO_PER_USD).round() as i64
}

/// Whether the request alone is over the tenant's limit of this kind: it reserves more
/// tokens than the minute allows, or may cost more than the day's budget.
fn never_fits(kind: Kind, limits: &TenantLimits, tokens: u64, nano: i64) -> bool {
    match kind {
        Kind::Tokens => limits.tpm.is_some_and(|max| tokens > max),
        Kind::Spend => day_budget_nano(limits).is_some_and(|budget| nano > budget),
        Kind::Concurrent | Kind::Requests => false,
    }
}

fn message(kind: Kind, limits: &TenantLimits, tokens: u64, nano: i64, retry: u64) -> String {
    if never_fits(kind, limits, tokens, nano) {
        return match kind {
            Kind::Spend => format!(
                "request too large: it may cost ${:.2} (prompt + max_tokens at the dearest backend it may use) and the daily budget is ${:.2}; lower max_tokens",
                nano as f64 / NANO_PER_USD,
                limits.usd_per_day.unwrap_or(0.0)
            ),
            _ => format!(
                "request too large: it reserves {tokens} tokens (prompt + max_tokens) and the limit is {} tokens per minute; lower max_tokens",
                limits.tpm.unwrap_or(0)
            ),
        };
    }
    match kind {
        Kind::Concurrent => format!(
            "rate limit reached: at most {} requests in flight for this API key; retry in {retry}s",
            limits.concurrent.unwrap_or(0)
        ),
        Kind::Requests => format!(
            "rate limit reached: {} requests per minute for this API key; retry in {retry}s",
            limits.rpm.unwrap_or(0)
        ),
        Kind::Tokens => format!(
            "rate limit reached: {} tokens per minute for this API key; retry in {retry}s",
            limits.tpm.unwrap_or(0)
        ),
        Kind::Spend => format!(
            "daily budget of ${:.2} reached for this API key; it resets at 00:00 UTC, in {retry}s",
            limits.usd_per_day.unwrap_or(0.0)
        ),
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens,concurrent,usd}` for the limits
/// the tenant has. Resets are durations (`"12s"`): when the refusing limit frees enough,
/// when the minute window has rolled over, or when the UTC day ends.
fn headers(
    l: &TenantLimits,
    s: &Snapshot,
    now: u64,
    refused: Option<(Kind, u64)>,
) -> Vec<(&'static str, String)> {
    let reset = |kind: Kind, otherwise_ms: u64| {
        let ms = match refused {
            Some((k, retry)) if k == kind => retry,
            _ => otherwise_ms,
        };
        format!("{}s", ms.div_ceil(1000))
    };
    let mut h = Vec::with_capacity(11);
    if let Some(max) = l.rpm {
        h.push(("x-ratelimit-limit-requests", max.to_string()));
        h.push((
            "x-ratelimit-remaining-requests",
            max.saturating_sub(s.requests).to_string(),
        ));
        h.push((
            "x-ratelimit-reset-requests",
            reset(Kind::Requests, WINDOW_MS),
        ));
    }
    if let Some(max) = l.tpm {
        h.push(("x-ratelimit-limit-tokens", max.to_string()));
        h.push((
            "x-ratelimit-remaining-tokens",
            max.saturating_sub(s.tokens).to_string(),
        ));
        h.push(("x-ratelimit-reset-tokens", reset(Kind::Tokens, WINDOW_MS)));
    }
    if let Some(max) = l.concurrent {
        h.push(("x-ratelimit-limit-concurrent", max.to_string()));
        h.push((
            "x-ratelimit-remaining-concurrent",
            max.saturating_sub(s.inflight).to_string(),
        ));
    }
    if let Some(budget) = l.usd_per_day {
        let left = (budget - s.spent_nano as f64 / NANO_PER_USD).max(0.0);
        h.push(("x-ratelimit-limit-usd", format!("{budget:.4}")));
        h.push(("x-ratelimit-remaining-usd", format!("{left:.4}")));
        let midnight = (now / DAY_MS + 1) * DAY_MS;
        h.push(("x-ratelimit-reset-usd", reset(Kind::Spend, midnight - now)));
    }
    h
}

/// Wall-clock milliseconds: windows and days are shared with other instances and Redis.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Log a limit store problem once per change of state.
pub(crate) fn log_store_down(err: &str, fail_open: bool) {
    if fail_open {
        warn!(target: "switchyard::limits", "redis unreachable ({err}); tenant limits are counted by this instance alone until it is back (fail-open)");
    } else {
        warn!(target: "switchyard::limits", "redis unreachable ({err}); requests of tenants with limits are refused until it is back (fail-closed)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_each_configured_limit() {
        let l = TenantLimits {
            rpm: Some(10),
            tpm: Some(1000),
            concurrent: None,
            usd_per_day: Some(5.0),
            default_max_tokens: 16,
        };
        let s = Snapshot {
            requests: 3,
            tokens: 250,
            inflight: 0,
            spent_nano: 1_500_000_000,
        };
        let now = 10 * DAY_MS + 3_600_000;
        let h: std::collections::HashMap<_, _> = headers(&l, &s, now, Some((Kind::Tokens, 12_300)))
            .into_iter()
            .collect();
        assert_eq!(h["x-ratelimit-remaining-requests"], "7");
        assert_eq!(h["x-ratelimit-reset-requests"], "60s");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "750");
        assert_eq!(h["x-ratelimit-reset-tokens"], "13s");
        assert_eq!(h["x-ratelimit-remaining-usd"], "3.5000");
        assert_eq!(h["x-ratelimit-reset-usd"], format!("{}s", 23 * 3600));
        assert!(!h.contains_key("x-ratelimit-limit-concurrent"));
    }

    #[test]
    fn a_request_never_fits_by_the_numbers_its_admission_compared() {
        // $2.01 a day is 2_009_999_999 nano-USD as admissions count it (the float is a
        // hair under 2.01): a request that may cost exactly $2.01 is refused every time.
        let l = TenantLimits {
            tpm: Some(100),
            usd_per_day: Some(2.01),
            ..TenantLimits::default()
        };
        assert!(never_fits(Kind::Spend, &l, 0, 2_010_000_000));
        assert!(!never_fits(Kind::Spend, &l, 0, 2_009_999_999));
        assert!(never_fits(Kind::Tokens, &l, 101, 0));
        assert!(!never_fits(Kind::Tokens, &l, 100, 0));
        assert!(!never_fits(Kind::Concurrent, &l, 1_000, i64::MAX));
        // Without the limit, nothing is over it.
        let none = TenantLimits::default();
        assert!(!never_fits(Kind::Tokens, &none, u64::MAX, 0));
        assert!(!never_fits(Kind::Spend, &none, 0, i64::MAX));
    }
}
