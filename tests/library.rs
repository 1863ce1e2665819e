//! Each built-in policy's distinctive behaviour, shown with measured traffic through the
//! real binary to real mock backends.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

fn route(policy: &str, params: &str) -> String {
    format!("routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: {policy}\n    params: {{ {params} }}\n")
}

/// A backend entry with extra YAML lines (already indented by 4).
fn backend_with(name: &str, port: u16, extra: &str) -> String {
    format!("{}{extra}", backend(name, port, "[m]"))
}

/// Send `n` requests from `workers` concurrent clients; `headers` builds each request's
/// headers from its index. Returns (backend that served, status, latency) per request, in index order.
async fn traffic(
    p: &Proc,
    n: usize,
    workers: usize,
    body: serde_json::Value,
    headers: impl Fn(usize) -> Vec<(String, String)> + Send + Sync + Clone + 'static,
) -> Vec<(String, u16, Duration)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (url, next, body, headers) = (
            p.url("/v1/chat/completions"),
            next.clone(),
            body.clone(),
            headers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                let mut req = c.post(&url).json(&body);
                for (k, v) in headers(i) {
                    req = req.header(k, v);
                }
                let started = Instant::now();
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let served = r
                    .headers()
                    .get("x-switchyard-backend")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let _ = r.bytes().await;
                out.push((i, (served, status, started.elapsed())));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    // In the order the requests were numbered: result `i` is request `i`'s.
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

fn no_headers(_: usize) -> Vec<(String, String)> {
    Vec::new()
}

fn shares(results: &[(String, u16, Duration)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (b, status, _) in results {
        assert_eq!(*status, 200, "every request succeeds");
        *m.entry(b.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_splits_1000_requests_by_weight() {
    let (a, b, c) = (
        mock("a", &[]).await,
        mock("b", &[]).await,
        mock("c", &[]).await,
    );
    let config = format!(
        "{}backends:\n{}{}{}",
        route("weighted", ""),
        backend_with("a", a.port, "    weight: 5\n"),
        backend_with("b", b.port, "    weight: 3\n"),
        backend_with("c", c.port, "    weight: 2\n")
    );
    let p = proxy(&config, &[]).await;
    let counts = shares(&traffic(&p, 1000, 4, chat_body("m", "hi", false), no_headers).await);
    for (name, want) in [("a", 500), ("b", 300), ("c", 200)] {
        let got = counts[name] as i64;
        assert!(
            (got - want).abs() <= 50,
            "{name}: {got} vs {want}: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_moves_traffic_away_from_a_slow_backend() {
    let slow = mock("slow", &["--latency-ms", "200"]).await;
    let (f1, f2) = (mock("fast1", &[]).await, mock("fast2", &[]).await);
    let config = format!(
        "{}backends:\n{}{}{}",
        route("latency", ""),
        backend("slow", slow.port, "[m]"),
        backend("fast1", f1.port, "[m]"),
        backend("fast2", f2.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let counts = shares(&traffic(&p, 300, 4, chat_body("m", "hi", false), no_headers).await);
    let to_slow = counts.get("slow").copied().unwrap_or(0);
    assert!(to_slow < 30, "slow got {to_slow} of 300: {counts:?}");
    assert!(to_slow >= 1, "the slow backend is still probed: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_picks_the_cheapest_and_fails_over_when_it_errors() {
    let mut cheap = mock("cheap", &[]).await;
    let (mid, premium) = (mock("mid", &[]).await, mock("premium", &[]).await);
    let config = format!(
        "{}backends:\n{}{}{}",
        route("cost", ""),
        backend_with(
            "premium",
            premium.port,
            "    cost: { input: 2.5, output: 10 }\n"
        ),
        backend_with(
            "cheap",
            cheap.port,
            "    cost: { input: 0.1, output: 0.3 }\n"
        ),
        backend_with("mid", mid.port, "    cost: { input: 0.5, output: 1.5 }\n")
    );
    let p = proxy(&config, &[]).await;
    let counts = shares(&traffic(&p, 40, 2, chat_body("m", "hi", false), no_headers).await);
    assert_eq!(counts.get("cheap"), Some(&40), "{counts:?}");

    cheap.kill();
    // Every request still succeeds: the policy's second choice takes over.
    let counts = shares(&traffic(&p, 40, 2, chat_body("m", "hi", false), no_headers).await);
    assert_eq!(counts.get("mid"), Some(&40), "{counts:?}");
    assert!(received(&premium).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_sends_a_20000_token_prompt_to_the_long_context_pool() {
    let (long, cheap, other) = (
        mock("long", &[]).await,
        mock("cheap", &[]).await,
        mock("other", &[]).await,
    );
    let config = format!(
        "{}backends:\n{}{}{}",
        route("content", "long_tokens: 8000"),
        backend_with("long", long.port, "    tags: { context: long }\n"),
        backend_with("cheap", cheap.port, "    tags: { tier: cheap }\n"),
        backend("other", other.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let big = chat_body("m", &"word ".repeat(16_000), false); // ≈ 15 000 tokens estimated
    let counts = shares(&traffic(&p, 10, 2, big, no_headers).await);
    assert_eq!(counts.get("long"), Some(&10), "{counts:?}");
    let counts = shares(
        &traffic(
            &p,
            10,
            2,
            chat_body("m", "short question", false),
            no_headers,
        )
        .await,
    );
    assert_eq!(counts.get("cheap"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_never_sends_eu_traffic_to_the_us() {
    let eu = mock("eu", &[]).await;
    let us = mock("us", &[]).await;
    let (_refusing, dead) = refusing_port();
    let config = format!(
        "{}backends:\n{}{}",
        route("governance", ""),
        backend_with("eu-1", eu.port, "    region: eu-west\n"),
        backend_with("us-1", us.port, "    region: us-east\n")
    );
    let p = proxy(&config, &[]).await;
    let eu_header = |_| vec![("x-switchyard-region".to_string(), "eu".to_string())];
    let counts = shares(&traffic(&p, 20, 2, chat_body("m", "hi", false), eu_header).await);
    assert_eq!(counts.get("eu-1"), Some(&20), "{counts:?}");
    assert!(received(&us).await.is_empty());

    // Every EU backend down: the request fails, and still never reaches the US.
    let config = format!(
        "{}backends:\n{}{}",
        route("governance", ""),
        backend_with("eu-1", dead, "    region: eu-west\n"),
        backend_with("us-1", us.port, "    region: us-east\n")
    );
    let p = proxy(&config, &[]).await;
    for (_, status, _) in traffic(&p, 10, 2, chat_body("m", "hi", false), eu_header).await {
        assert!(status == 502 || status == 503, "got {status}");
    }
    assert!(
        received(&us).await.is_empty(),
        "no EU request may reach the US backend"
    );
    // An EU caller on a route with no EU backend at all: 403.
    let config = format!(
        "{}backends:\n{}",
        route("governance", ""),
        backend_with("us-1", us.port, "    region: us-east\n")
    );
    let p = proxy(&config, &[]).await;
    let results = traffic(&p, 3, 1, chat_body("m", "hi", false), eu_header).await;
    assert!(results.iter().all(|(_, s, _)| *s == 403), "{results:?}");
    assert!(received(&us).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_holds_a_10_percent_split_sticky_per_session() {
    let (s1, s2, can) = (
        mock("s1", &[]).await,
        mock("s2", &[]).await,
        mock("can", &[]).await,
    );
    let config = format!(
        "{}backends:\n{}{}{}",
        route("canary", "percent: 10"),
        backend("stable-1", s1.port, "[m]"),
        backend("stable-2", s2.port, "[m]"),
        backend_with("canary-1", can.port, "    tags: { track: canary }\n")
    );
    let p = proxy(&config, &[]).await;
    let session = |i: usize| vec![("x-session-id".to_string(), format!("session-{i}"))];
    let results = traffic(&p, 1000, 4, chat_body("m", "hi", false), session).await;
    let counts = shares(&results);
    let canary = counts.get("canary-1").copied().unwrap_or(0);
    assert!(
        (70..=130).contains(&canary),
        "canary got {canary} of 1000: {counts:?}"
    );

    // Sticky: each session again lands on the side it did.
    let again = traffic(&p, 1000, 4, chat_body("m", "hi", false), session).await;
    let moved: Vec<usize> = (0..1000)
        .filter(|&i| (results[i].0 == "canary-1") != (again[i].0 == "canary-1"))
        .collect();
    assert!(moved.is_empty(), "sessions that changed sides: {moved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_keeps_sessions_and_bounds_a_hot_key() {
    let (a, b, c) = (
        mock("a", &[]).await,
        mock("b", &[]).await,
        mock("c", &[]).await,
    );
    let config = format!(
        "{}backends:\n{}{}{}",
        route("affinity", ""),
        backend("a", a.port, "[m]"),
        backend("b", b.port, "[m]"),
        backend("c", c.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let session = |i: usize| {
        vec![(
            "x-session-id".to_string(),
            format!("conversation-{}", i % 1000),
        )]
    };
    let first = traffic(&p, 1000, 4, chat_body("m", "hi", false), session).await;
    let counts = shares(&first);
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(
            (270..=400).contains(&n),
            "{name} got {n} of 1000 sessions: {counts:?}"
        );
    }
    // The same 1000 conversations again (sequentially, so load does not interfere): same backends.
    let mut home = HashMap::new();
    for (i, (b, _, _)) in traffic(&p, 1000, 1, chat_body("m", "hi", false), session)
        .await
        .into_iter()
        .enumerate()
    {
        home.insert(i, b);
    }
    let again = traffic(&p, 1000, 1, chat_body("m", "hi", false), session).await;
    let moved = again
        .iter()
        .enumerate()
        .filter(|(i, (b, _, _))| &home[i] != b)
        .count();
    assert_eq!(moved, 0, "sessions moved between backends");

    // One hot session, 12 requests at once on slow backends: the bounded load spills it.
    let hot = |_| {
        vec![
            ("x-session-id".to_string(), "hot".to_string()),
            ("x-mock-latency-ms".to_string(), "400".to_string()),
        ]
    };
    let results = traffic(&p, 12, 12, chat_body("m", "hi", false), hot).await;
    let counts = shares(&results);
    let max = counts.values().copied().max().unwrap();
    assert!(
        max <= 7,
        "one backend took {max} of 12 concurrent requests for one key: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictive_beats_round_robin_on_mean_latency() {
    let fast = mock("fast", &["--latency-ms", "10"]).await;
    let mid = mock("mid", &["--latency-ms", "80"]).await;
    let slow = mock("slow", &["--latency-ms", "250"]).await;
    let config = format!(
        "routes:\n  - match: {{ model: \"p\" }}\n    policy: predictive\n  - match: {{ model: \"r\" }}\n    policy: round_robin\nbackends:\n{}{}{}",
        backend("fast", fast.port, "[p, r]"),
        backend("mid", mid.port, "[p, r]"),
        backend("slow", slow.port, "[p, r]")
    );
    let p = proxy(&config, &[]).await;
    let mean = |r: &[(String, u16, Duration)]| {
        r.iter().map(|x| x.2.as_secs_f64()).sum::<f64>() / r.len() as f64
    };
    let predictive = traffic(&p, 80, 4, chat_body("p", "hi", false), no_headers).await;
    let round_robin = traffic(&p, 80, 4, chat_body("r", "hi", false), no_headers).await;
    shares(&predictive);
    shares(&round_robin);
    let (mp, mr) = (mean(&predictive), mean(&round_robin));
    assert!(
        mp < mr * 0.7,
        "predictive mean {:.0} ms vs round robin {:.0} ms",
        mp * 1e3,
        mr * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_follows_its_chain() {
    let (b1, b2) = (mock("backup", &[]).await, mock("secondary", &[]).await);
    let (_refusing, dead) = refusing_port();
    let config = format!(
        "{}backends:\n{}{}{}",
        route("failover", ""),
        backend_with("secondary", b2.port, "    tags: { order: \"3\" }\n"),
        backend_with("primary", dead, "    tags: { order: \"1\" }\n"),
        backend_with("backup", b1.port, "    tags: { order: \"2\" }\n")
    );
    let p = proxy(&config, &[]).await;
    let counts = shares(&traffic(&p, 20, 2, chat_body("m", "hi", false), no_headers).await);
    assert_eq!(counts.get("backup"), Some(&20), "{counts:?}");
    assert!(received(&b2).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_cannot_route_around_the_guardrails() {
    let ok = mock("ok", &[]).await;
    let forbidden = mock("forbidden", &[]).await;
    // `forbidden` is configured, but does not serve model m.
    let evil = r#"
local P = {}
function P.route(req, backends)
  if req.header("x-only-forbidden") then return "forbidden" end
  return { "forbidden", backends[1].name }
end
return P
"#;
    let config = format!(
        "{}backends:\n{}{}",
        route("evil", ""),
        backend("ok", ok.port, "[m]"),
        backend("forbidden", forbidden.port, "[other-model]")
    );
    let p = proxy(&config, &[("evil", evil)]).await;
    let counts = shares(&traffic(&p, 20, 2, chat_body("m", "hi", false), no_headers).await);
    assert_eq!(counts.get("ok"), Some(&20));
    let only = |_| vec![("x-only-forbidden".to_string(), "1".to_string())];
    let results = traffic(&p, 5, 1, chat_body("m", "hi", false), only).await;
    assert!(results.iter().all(|(_, s, _)| *s == 403), "{results:?}");
    assert!(
        received(&forbidden).await.is_empty(),
        "the forbidden backend never got a request"
    );
}
