//! Per-request state, from `request_filter` to `logging`, and the bookkeeping of upstream
//! attempts: each attempt's outcome feeds the backend's statistics and breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::audit::{AttemptRecord, AuditRecord, AuditTime, Skipped};
use crate::backends::{Backend, InflightGuard, Outcome};
use crate::errors::ClientError;
use crate::limits::Lease;
use crate::logging::{self, Untrusted};
use crate::metrics::METRICS;
use crate::outlier::Pass;
use crate::plan::{Considered, Plan};
use crate::request::RequestMeta;
use crate::runtime::Runtime;
use crate::stream_usage::{self, UsageStripper};
use crate::usage::{Usage, UsageReader};

/// Everything one request carries through the proxy phases.
pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    pub runtime: Option<Arc<Runtime>>,
    pub meta: Option<Arc<RequestMeta>>,
    /// The tenant of a request answered or refused after it was authenticated but before
    /// its metadata was read (a body too large, not JSON, no model); else `meta` has it.
    pub tenant: Option<Arc<str>>,
    /// The client's body, whole; replayed on every attempt.
    pub body: Option<Bytes>,
    pub plan: Option<Plan>,
    /// The policy that refused the request, or failed, when no plan was made.
    pub refused_by: Option<Arc<str>>,
    /// What the request was offered when no plan was made, for its audit record.
    pub refused: Considered,
    /// One entry per finished upstream attempt, in order.
    pub attempts: Vec<Attempt>,
    pub current: Option<Current>,
    /// An error answered by Switchyard itself, decided before `fail_to_proxy` runs.
    pub failure: Option<ClientError>,
    /// The code of the error `reply::reject` answered with, for the access line.
    pub refused_code: Option<&'static str>,
    /// Position of the next backend to try in the plan.
    next_candidate: usize,
    /// Attempts made (a retry on a stale pooled connection does not count).
    tries: usize,
    /// The pooled connection of an attempt was stale: try the same backend once more on a
    /// fresh connection (at most once per request).
    pub retry_same_backend: Option<(Arc<Backend>, Pass)>,
    pub stale_retried: bool,
    /// Status sent to the client (499 when it went away first).
    pub status: u16,
    /// Tokens of the answer, when the response reported (or streamed) them.
    pub usage: Option<Usage>,
    /// The answer (a 200) streamed an error event: the backend failed mid-answer.
    pub stream_error: bool,
    /// Time to the first response byte of the attempt that answered.
    pub ttft: Option<Duration>,
    /// The backend whose response went to the client.
    pub served_by: Option<String>,
    /// The request's hold on its tenant's limits, settled in `logging`.
    pub lease: Option<Lease>,
    /// `x-ratelimit-*` headers for the client.
    pub rate_headers: Vec<(&'static str, String)>,
}

/// The attempt in progress.
pub struct Current {
    pub backend: Arc<Backend>,
    pub started: Instant,
    pub first_byte: Option<Instant>,
    pub last_byte: Option<Instant>,
    /// The body as this backend gets it (the model renamed if the backend maps it).
    pub body: Option<Bytes>,
    /// Reads `usage` from the response as it streams by.
    pub usage_reader: Option<UsageReader>,
    /// Takes out of the client's stream the usage Switchyard asked for on its behalf.
    pub usage_stripper: Option<UsageStripper>,
    /// How the backend's breaker let the attempt through.
    pub pass: Pass,
    /// The backend answered with a success status (2xx).
    pub answered: bool,
    _inflight: InflightGuard,
}

/// What happened to one upstream attempt.
pub type Attempt = AttemptRecord;

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            request_id: String::new(),
            started: Instant::now(),
            runtime: None,
            meta: None,
            tenant: None,
            body: None,
            plan: None,
            refused_by: None,
            refused: Considered::default(),
            attempts: Vec::new(),
            current: None,
            failure: None,
            refused_code: None,
            next_candidate: 0,
            tries: 0,
            retry_same_backend: None,
            stale_retried: false,
            status: 0,
            usage: None,
            stream_error: false,
            ttft: None,
            served_by: None,
            lease: None,
            rate_headers: Vec::new(),
        }
    }

    /// Whether the plan has another backend to try, within the route's attempt cap.
    pub fn has_next_attempt(&self) -> bool {
        self.plan
            .as_ref()
            .is_some_and(|p| self.next_candidate < p.backends.len() && self.tries < p.max_attempts)
    }

    /// Whether a next attempt could start now: the attempt cap allows one, and one of the
    /// plan's remaining backends is still in rotation and has room. Checked before giving
    /// up a backend's answer to try another: a candidate that went out of rotation since
    /// the plan was made (a 429 cool-down, an ejection, full) would lose the answer for
    /// nothing.
    pub fn next_attempt_can_start(&self) -> bool {
        let Some(plan) = self.plan.as_ref() else {
            return false;
        };
        if !self.has_next_attempt() {
            return false;
        }
        // Candidates that cannot begin are skipped without using up a try: any of the
        // rest will do.
        let now = tokio::time::Instant::now();
        plan.backends[self.next_candidate..]
            .iter()
            .any(|b| b.can_begin(now, plan.panic))
    }

    /// The plan's next backend, if the attempt cap allows one.
    pub fn next_backend(&mut self) -> Option<Arc<Backend>> {
        if !self.has_next_attempt() {
            return None;
        }
        let backend = self
            .plan
            .as_ref()?
            .backends
            .get(self.next_candidate)
            .cloned();
        self.next_candidate += 1;
        backend
    }

    /// Start an attempt on `backend`, counted in flight until it ends. `repeat_of` is the
    /// pass of the attempt this one repeats after a stale pooled connection (a repeat is
    /// not counted as a try). Fails (with the reason) when the backend is full, or went out
    /// of rotation since the plan was made (its one half-open probe already out, ejected
    /// outside panic mode, cooling down or draining).
    pub fn begin_attempt(
        &mut self,
        backend: Arc<Backend>,
        repeat_of: Option<Pass>,
    ) -> Result<(), &'static str> {
        let reserved = self.plan.as_mut().and_then(|p| p.reserved.take());
        let inflight = match reserved {
            Some(guard) if self.tries == 0 => guard,
            _ => backend.try_start_request().ok_or("at max_inflight")?,
        };
        let pass = match repeat_of {
            Some(pass) => pass,
            None => {
                let panic = self.plan.as_ref().is_some_and(|p| p.panic);
                let now = tokio::time::Instant::now();
                let pass = backend.stats.breaker.begin(now, panic);
                pass.ok_or("out of rotation since the plan was made")?
            }
        };
        if repeat_of.is_none() {
            self.tries += 1;
        }
        let mut usage_stripper = None;
        let body = match (&self.body, &self.meta) {
            (Some(body), Some(meta)) => {
                let body = crate::plan::body_for(body, meta, &backend);
                if stream_usage::should_add(meta, &backend) {
                    usage_stripper = Some(UsageStripper::default());
                    Some(stream_usage::add_include_usage(&body))
                } else {
                    Some(body)
                }
            }
            (body, _) => body.clone(),
        };
        self.current = Some(Current {
            _inflight: inflight,
            pass,
            answered: false,
            backend,
            started: Instant::now(),
            first_byte: None,
            last_byte: None,
            body,
            usage_reader: None,
            usage_stripper,
        });
        Ok(())
    }

    /// Record a backend that was skipped without being tried.
    pub fn skip(&mut self, backend: &Backend, why: &str) {
        self.attempts.push(Attempt {
            backend: backend.name().to_string(),
            outcome: format!("skipped: {why}"),
        });
    }

    /// Close the current attempt: its outcome feeds the backend's error rate, latency and
    /// breaker (failures may eject it).
    pub fn finish_attempt(&mut self, outcome: Outcome, what: impl Into<String>) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let stats = &cur.backend.stats;
        stats.record_outcome(outcome);
        let label = match outcome {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Neutral => "neutral",
        };
        METRICS
            .attempts
            .with_label_values(&[cur.backend.name(), label])
            .inc();
        match outcome {
            Outcome::Success => {
                stats.record_latency(cur.started.elapsed());
                stats.breaker.record_success(cur.pass);
            }
            Outcome::Failure => {
                if let Some(rt) = &self.runtime {
                    let outlier = &rt.config.outlier;
                    let may_eject = rt.backends.may_eject(outlier.max_ejected_percent);
                    if stats.breaker.record_failure(
                        tokio::time::Instant::now(),
                        outlier,
                        may_eject,
                        cur.pass,
                    ) {
                        log::warn!(
                            target: "switchyard::outlier",
                            "{} backend {} ejected after repeated failures",
                            self.request_id,
                            cur.backend.name()
                        );
                    }
                }
            }
            // Unless it is tried again at once on a fresh connection, a probe that taught
            // nothing hands the probe on.
            Outcome::Neutral if self.retry_same_backend.is_none() => {
                stats.breaker.release(cur.pass);
            }
            Outcome::Neutral => {}
        }
        self.attempts.push(Attempt {
            backend: cur.backend.name().to_string(),
            outcome: what.into(),
        });
    }

    pub fn backend_name(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.backend.name())
    }

    /// Take the usage of a completed response; its decode rate feeds the backend's `tps`.
    pub fn read_usage(&mut self) {
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        let Some(reader) = cur.usage_reader.take() else {
            return;
        };
        self.stream_error = reader.saw_error();
        let Some(mut usage) = reader.finish() else {
            return;
        };
        if !usage.reported {
            // A stream that reported no usage (or broke off) used at least its prompt: the
            // estimate stands for it in limits, metrics, the access log and the audit.
            usage.prompt_tokens = self.meta.as_ref().map_or(0, |m| m.tokens());
        }
        // Only a stream's first and last bytes bracket the decoding; a plain answer arrives
        // all at once, and its transfer time says nothing about tokens per second.
        let streamed = self.meta.as_ref().is_some_and(|m| m.stream);
        if let (true, Some(first), Some(last)) = (streamed, cur.first_byte, cur.last_byte) {
            let decoding = last - first;
            if usage.completion_tokens > 1 && decoding > Duration::from_millis(1) {
                cur.backend
                    .stats
                    .record_tps(usage.completion_tokens as f64 / decoding.as_secs_f64());
            }
        }
        self.usage = Some(usage);
    }

    /// A client that went away while a backend had its request (before the answer's head,
    /// or before a stream's first content event) has had its prompt read: the estimate
    /// stands for it, as for a stream that broke off later. Call after
    /// [`Self::read_usage`].
    pub fn count_abandoned(&mut self) {
        // A plain answer cut off after its head was generated whole: its usage is unknown
        // and its reservation stands.
        let before_output =
            self.served_by.is_none() || self.meta.as_ref().is_some_and(|m| m.stream);
        // A token count or a moderation is free however it ends.
        let billed = self
            .meta
            .as_ref()
            .is_some_and(|m| !crate::plan::is_free_api(&m.path));
        if self.usage.is_none()
            && self.status == 499
            && self.current.is_some()
            && before_output
            && billed
        {
            self.usage = Some(Usage {
                prompt_tokens: self.meta.as_ref().map_or(0, |m| m.tokens()),
                completion_tokens: 0,
                cached_tokens: 0,
                reported: false,
            });
        }
    }

    /// Count the request in the request, duration, token and cost metrics; `cost_usd` is
    /// [`Self::cost_usd`].
    pub fn count(&self, served_by: &str, cost_usd: f64) {
        let model = match (
            self.meta.as_deref().and_then(|m| m.model.as_deref()),
            &self.runtime,
        ) {
            (None, _) => "none",
            (Some(m), Some(rt)) if rt.backends.knows_model(m) => m,
            // Label values never come from raw client input.
            (Some(_), _) => "other",
        };
        let mut status = itoa::Buffer::new();
        METRICS
            .requests
            .with_label_values(&[served_by, model, status.format(self.status)])
            .inc();
        METRICS
            .request_duration
            .with_label_values(&[served_by])
            .observe(self.started.elapsed().as_secs_f64());
        if let (Some(usage), Some(meta)) = (&self.usage, &self.meta) {
            METRICS
                .tokens
                .with_label_values(&[served_by, model, "in"])
                .inc_by(usage.prompt_tokens);
            METRICS
                .tokens
                .with_label_values(&[served_by, model, "out"])
                .inc_by(usage.completion_tokens);
            METRICS
                .cost_usd
                .with_label_values(&[&meta.tenant, served_by])
                .inc_by(cost_usd);
        }
    }

    /// What the request really used, to settle its limits: tokens and nano-USD, given what
    /// it cost ([`Self::cost_usd`]). Nothing when no backend answered or it answered an
    /// error without usage; the reservation stands (`None`) when a backend answered but its
    /// usage is unknown. A stream that reported no usage (or broke off) counts its prompt
    /// estimate and its content events (see [`Self::read_usage`]); a request its client
    /// left before any output, its prompt estimate (see [`Self::count_abandoned`]).
    pub fn settlement(&self, cost_usd: f64) -> (Option<u64>, Option<i64>) {
        if self.current.is_none() || (self.served_by.is_none() && self.usage.is_none()) {
            return (Some(0), Some(0));
        }
        let Some(usage) = self.usage else {
            return if self.status >= 400 && self.status != 499 {
                (Some(0), Some(0))
            } else {
                (None, None)
            };
        };
        (
            Some(usage.prompt_tokens + usage.completion_tokens),
            Some(crate::limits::nano_usd(cost_usd)),
        )
    }

    /// What the answer cost at the serving backend's prices (0 without usage).
    pub fn cost_usd(&self) -> f64 {
        match (&self.usage, &self.current) {
            (Some(u), Some(cur)) => cur
                .backend
                .config
                .cost
                .usd(u.prompt_tokens, u.completion_tokens),
            _ => 0.0,
        }
    }

    /// The request's access line: `method` and `path` as the client sent them (`-` when
    /// its head could not be read), then what this context knows, then `error` (empty, or
    /// ` error="…"`).
    pub fn log_access(&self, method: &str, path: &str, error: impl std::fmt::Display) {
        let meta = self.meta.as_deref();
        logging::access(format_args!(
            "{} {} {} status={} tenant={} model={} policy={} attempts=[{}] tokens_in={} tokens_out={} ms={:.1}{}",
            self.request_id,
            method,
            Untrusted(path),
            self.status,
            self.tenant_name(),
            Untrusted(meta.and_then(|m| m.model.as_deref()).unwrap_or("-")),
            self.policy_tag().unwrap_or("-"),
            AttemptList(&self.attempts),
            self.usage.map_or(0, |u| u.prompt_tokens),
            self.usage.map_or(0, |u| u.completion_tokens),
            self.started.elapsed().as_secs_f64() * 1e3,
            error,
        ));
    }

    /// The request's tenant, `-` when it was refused before it was authenticated.
    pub fn tenant_name(&self) -> &str {
        match (&self.meta, &self.tenant) {
            (Some(meta), _) => &meta.tenant,
            (None, Some(tenant)) => tenant,
            (None, None) => "-",
        }
    }

    /// `name@version` of the policy that routed the request, or refused it, or failed.
    pub fn policy_tag(&self) -> Option<&str> {
        match &self.plan {
            Some(plan) => Some(&plan.policy),
            None => self.refused_by.as_deref(),
        }
    }

    /// The audit record of this request, taking what it needs out of the context: call
    /// last, in `logging`. `cost_usd` is what the answer cost (see [`Self::cost_usd`],
    /// which needs the serving attempt, so it is read before that attempt is finished).
    pub fn take_audit_record(&mut self, method: &str, path: &str, cost_usd: f64) -> AuditRecord {
        let meta = self.meta.as_deref();
        let policy = self.policy_tag().map(str::to_string);
        let (considered, plan_names) = match self.plan.take() {
            Some(p) => (
                Considered {
                    candidates: p.candidates,
                    skipped: p.skipped,
                },
                p.backends.iter().map(|b| b.name().to_string()).collect(),
            ),
            None => (std::mem::take(&mut self.refused), Vec::new()),
        };
        let candidates = considered
            .candidates
            .iter()
            .map(|b| b.name().to_string())
            .collect();
        let skipped = considered
            .skipped
            .into_iter()
            .map(|(backend, reason)| Skipped { backend, reason })
            .collect();
        AuditRecord {
            time: AuditTime::now(),
            request_id: std::mem::take(&mut self.request_id),
            tenant: self.tenant_name().to_string(),
            method: method.to_string(),
            path: truncated(path, 256),
            model: meta
                .and_then(|m| m.model.as_deref())
                .map(|m| truncated(m, 256)),
            policy,
            candidates,
            plan: plan_names,
            skipped,
            attempts: std::mem::take(&mut self.attempts),
            backend: self.served_by.take(),
            status: self.status,
            tokens_in: self.usage.map_or(0, |u| u.prompt_tokens),
            tokens_out: self.usage.map_or(0, |u| u.completion_tokens),
            cost_usd,
            ttft_ms: self.ttft.map(|t| t.as_secs_f64() * 1e3),
            duration_ms: self.started.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// At most `max_chars` characters of `s`.
fn truncated(s: &str, max_chars: usize) -> String {
    if s.len() <= max_chars {
        return s.to_string();
    }
    s.chars().take(max_chars).collect()
}

/// The attempts of a request as the access log shows them: `a:status 503,b:status 200`.
struct AttemptList<'a>(&'a [Attempt]);

impl std::fmt::Display for AttemptList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}", a.backend, a.outcome)?;
        }
        Ok(())
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}
