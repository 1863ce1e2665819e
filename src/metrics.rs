//! Prometheus metrics, under the names DESIGN.md fixes. Label values come from config (backend,
//! policy and configured model names) or from a closed set of words, never from raw client
//! input: a model no backend serves is counted as `other`.

use std::sync::LazyLock;

use prometheus::{
    register_counter_vec_with_registry, register_histogram_vec_with_registry,
    register_int_counter_vec_with_registry, register_int_gauge_vec_with_registry,
    register_int_gauge_with_registry, CounterVec, Encoder, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Registry, TextEncoder,
};

/// Latency buckets in seconds, 10 ms to 60 s: LLM requests range from a cached embedding
/// to a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Time-to-first-token buckets in seconds, 10 ms to 30 s.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub attempts: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub backend_inflight: IntGaugeVec,
    pub backend_healthy: IntGaugeVec,
    pub tokens: IntCounterVec,
    pub cost_usd: CounterVec,
    pub policy_decisions: IntCounterVec,
    pub policy_errors: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub certificate_reloads: IntCounterVec,
    pub connections_closed: IntCounterVec,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        requests: register_int_counter_vec_with_registry!(
            "switchyard_requests_total",
            "Requests answered, by the backend that served them (`none` if Switchyard answered), model and status",
            &["backend", "model", "status"],
            r
        )
        .expect("metric registers"),
        attempts: register_int_counter_vec_with_registry!(
            "switchyard_upstream_attempts_total",
            "Upstream attempts by backend and outcome (success, failure, neutral = 429 or client gone), retried ones included",
            &["backend", "outcome"],
            r
        )
        .expect("metric registers"),
        request_duration: register_histogram_vec_with_registry!(
            "switchyard_request_duration_seconds",
            "Time from request start to the end of the response",
            &["backend"],
            LATENCY_BUCKETS.to_vec(),
            r
        )
        .expect("metric registers"),
        ttft: register_histogram_vec_with_registry!(
            "switchyard_ttft_seconds",
            "Time from sending upstream to the first response body byte",
            &["backend"],
            TTFT_BUCKETS.to_vec(),
            r
        )
        .expect("metric registers"),
        tokens: register_int_counter_vec_with_registry!(
            "switchyard_tokens_total",
            "Tokens by backend, model and direction (in = prompt, out = completion), from usage",
            &["backend", "model", "direction"],
            r
        )
        .expect("metric registers"),
        cost_usd: register_counter_vec_with_registry!(
            "switchyard_cost_usd_total",
            "Spend in USD from usage and the backends' configured prices",
            &["tenant", "backend"],
            r
        )
        .expect("metric registers"),
        backend_inflight: register_int_gauge_vec_with_registry!(
            "switchyard_backend_inflight",
            "Requests in flight to each backend",
            &["backend"],
            r
        )
        .expect("metric registers"),
        backend_healthy: register_int_gauge_vec_with_registry!(
            "switchyard_backend_healthy",
            "1 when the backend passes its health checks and is not ejected, else 0",
            &["backend"],
            r
        )
        .expect("metric registers"),
        policy_decisions: register_int_counter_vec_with_registry!(
            "switchyard_policy_decisions_total",
            "First choices made by each policy",
            &["policy", "backend"],
            r
        )
        .expect("metric registers"),
        policy_errors: register_int_counter_vec_with_registry!(
            "switchyard_policy_errors_total",
            "Policy failures by kind (runtime, budget, memory, bad_return, unknown_backend, load)",
            &["policy", "kind"],
            r
        )
        .expect("metric registers"),
        policy_reloads: register_int_counter_vec_with_registry!(
            "switchyard_policy_reloads_total",
            "Policy versions offered by a reload, by result (loaded, rejected)",
            &["policy", "result"],
            r
        )
        .expect("metric registers"),
        config_reloads: register_int_counter_vec_with_registry!(
            "switchyard_config_reloads_total",
            "Config file reloads, by result (loaded, rejected: the old config keeps serving)",
            &["result"],
            r
        )
        .expect("metric registers"),
        rate_limited: register_int_counter_vec_with_registry!(
            "switchyard_rate_limited_total",
            "Requests refused with 429 by a tenant limit (requests, tokens, concurrent, usd)",
            &["tenant", "limit"],
            r
        )
        .expect("metric registers"),
        certificate_reloads: register_int_counter_vec_with_registry!(
            "switchyard_tls_certificate_reloads_total",
            "Changed TLS listener certificates offered by a reload, by listener address and result (loaded, rejected)",
            &["listener", "result"],
            r
        )
        .expect("metric registers"),
        connections_closed: register_int_counter_vec_with_registry!(
            "switchyard_client_connections_closed_total",
            "Client connections Switchyard closed before a request was read, by reason (header_timeout)",
            &["reason"],
            r
        )
        .expect("metric registers"),
        registry: r,
    }
});

/// Whether the shared limit counters in Redis are reachable; registered (so exported) only
/// once Redis is configured, so an alert on 0 never fires for an instance without Redis.
pub static REDIS_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "switchyard_redis_up",
        "1 while the limit counters in Redis are reachable, 0 while this instance counts alone",
        METRICS.registry
    )
    .expect("metric registers")
});

/// The text exposition of every metric.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut out)
        .expect("text encoding of metrics cannot fail");
    out
}
