//! FAULTS.md, "From a backend" and "From the operator", and the client rows about streams:
//! one test per row, with the real binary and real mock processes, asserting what the client
//! saw and what each backend saw.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// Tries `first`, then `second`, then `third`, among the candidates.
const CHAIN: &str = r#"
local P = {}
local order = { first = 1, second = 2, third = 3 }
function P.route(req, backends)
  table.sort(backends, function(a, b) return order[a.name] < order[b.name] end)
  local names = {}
  for i, b in ipairs(backends) do names[i] = b.name end
  return names
end
return P
"#;

fn chain_config(first: u16, second: Option<u16>, extra: &str) -> String {
    let mut c = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: chain\n{extra}backends:\n{}",
        backend("first", first, "[m]")
    );
    if let Some(s) = second {
        c.push_str(&backend("second", s, "[m]"));
    }
    c
}

fn admin_config(admin: u16) -> String {
    format!("admin: {{ addr: \"127.0.0.1:{admin}\" }}\n")
}

/// The proxy routing by `chain` over `first` (and `second`), with `top` (config lines
/// such as `outlier:`) and the admin API; returns it and its admin port.
async fn chain_proxy(top: &str, first: u16, second: Option<u16>) -> (Proc, u16) {
    let admin = free_port();
    let config = format!(
        "{}{top}{}",
        admin_config(admin),
        chain_config(first, second, "")
    );
    (proxy(&config, &[("chain", CHAIN)]).await, admin)
}

async fn admin_backend(admin: u16, name: &str) -> serde_json::Value {
    let v: serde_json::Value = get_json(format!("http://127.0.0.1:{admin}/admin/backends")).await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()
        .clone()
}

/// A plain request sent in the background, held `latency_ms` by its backend: its status
/// and the backend that served it.
fn in_background(p: &Proc, latency_ms: &'static str) -> tokio::task::JoinHandle<(u16, String)> {
    let url = p.url("/v1/chat/completions");
    tokio::spawn(async move {
        let r = client()
            .post(url)
            .header("x-mock-latency-ms", latency_ms)
            .json(&chat_body("m", "hi", false))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), served_by(r.headers()))
    })
}

// ---- From a backend -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_moves_on_and_counts_as_a_failure() {
    let (_refusing, dead) = refusing_port();
    let live = mock("live", &[]).await;
    let admin = free_port();
    let config = format!(
        "{}{}outlier: {{ consecutive_failures: 3 }}\n",
        admin_config(admin),
        chain_config(dead, Some(live.port), "")
    );
    let p = proxy(&config, &[("chain", CHAIN)]).await;
    for _ in 0..5 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-switchyard-backend"], "second");
    }
    let first = admin_backend(admin, "first").await;
    assert_eq!(first["why_not"], "ejected", "{first}");
    let metrics = metrics_text(admin).await;
    assert!(
        metrics.contains(
            "switchyard_upstream_attempts_total{backend=\"first\",outcome=\"failure\"} 3"
        ),
        "{metrics}"
    );
    assert!(first["error_rate"].as_f64().unwrap() > 0.5);
    assert!(p
        .output()
        .contains("backend first ejected after repeated failures"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_moves_on_and_counts_as_a_failure() {
    // A listener that never accepts, with its queue full: a connection to it is never
    // established (the kernel drops the SYNs), as with a host that has gone silent.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = socket.listen(0).unwrap();
    let addr = silent.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            queued.push(c);
        }
    }
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr)
        )
        .await
        .is_err(),
        "the silent listener still completes connections"
    );

    let live = mock("live", &[]).await;
    let admin = free_port();
    let p = proxy(
        &format!(
            "proxy: {{ threads: 2, grace_period_seconds: 0, connect_timeout_ms: 300 }}\n{}{}",
            admin_config(admin),
            chain_config(addr.port(), Some(live.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    let started = Instant::now();
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    let took = started.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-backend"], "second");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let metrics = metrics_text(admin).await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_upstream_attempts_total{backend=\"first\",outcome=\"failure\"}"
        ),
        1.0,
        "{metrics}"
    );

    // With no other candidate, a connect timeout is a failure to connect: 503 with
    // `Retry-After`, as for a refused connection (not 504, which is a backend too slow
    // to answer).
    let alone = proxy(
        &format!(
            "proxy: {{ threads: 2, grace_period_seconds: 0, connect_timeout_ms: 300 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
            backend("first", addr.port(), "[m]")
        ),
        &[],
    )
    .await;
    let r = post_chat(&alone, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(error_code(&r.text().await.unwrap()), "upstream_unavailable");
    drop(queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_headers_within_the_ttfb_timeout_is_504_or_the_next_candidate_if_the_route_allows() {
    let hung = mock("hung", &["--latency-ms", "5000"]).await;
    let live = mock("live", &["--chunks", "3", "--chunk-delay-ms", "700"]).await;
    // The head must come within ttfb_timeout_ms, for a stream as for a plain answer; the
    // chunks after it have the (longer) idle timeout.
    let proxy_conf = "proxy: { threads: 2, grace_period_seconds: 0, ttfb_timeout_ms: 300, idle_timeout_ms: 3000 }\n";
    let p = proxy(
        &format!(
            "{proxy_conf}{}",
            chain_config(hung.port, Some(live.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    for stream in [false, true] {
        let started = Instant::now();
        let r = post_chat(&p, &chat_body("m", "hi", stream), &[]).await;
        assert_eq!(r.status(), 504, "stream: {stream}");
        assert_eq!(error_code(&r.text().await.unwrap()), "upstream_timeout");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "stream: {stream}, {:?}",
            started.elapsed()
        );
    }
    assert!(received(&live).await.is_empty(), "not retried by default");

    // Over HTTP/1.1 and HTTP/2 (h2c) to the backends.
    for http2 in [false, true] {
        let backends = backends_over_http2(
            chain_config(hung.port, Some(live.port), "    retry_on_timeout: true\n"),
            http2,
        );
        let p = proxy(&format!("{proxy_conf}{backends}"), &[("chain", CHAIN)]).await;
        let started = Instant::now();
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 200, "http2: {http2}");
        assert_eq!(r.headers()["x-switchyard-backend"], "second");
        assert!(started.elapsed() < Duration::from_secs(2), "http2: {http2}");
        // The stream's chunks come 700 ms apart, more than the TTFB timeout, less than the
        // idle one: it is served whole.
        let r = post_chat(&p, &chat_body("m", "hi", true), &[]).await;
        assert_eq!(r.status(), 200, "http2: {http2}");
        assert_eq!(r.headers()["x-switchyard-backend"], "second");
        let version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
        assert_eq!(r.headers()["x-mock-http-version"], version);
        let (text, broken) = read_stream(r).await;
        assert!(
            !broken && text.trim_end().ends_with("data: [DONE]"),
            "http2: {http2}: {text}"
        );
    }

    // A plain answer whose head came and whose body then stalls is cut by the idle
    // timeout (3 s), not the TTFB one (300 ms).
    let p = proxy(
        &format!("{proxy_conf}{}", chain_config(live.port, None, "")),
        &[("chain", CHAIN)],
    )
    .await;
    let started = Instant::now();
    let r = post_chat(
        &p,
        &chat_body("m", "hi", false),
        &[("x-mock-fault", "stall-mid-stream")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the body was cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_cools_the_backend_down_and_moves_on_or_is_relayed_when_none_is_left() {
    let limited = mock(
        "limited",
        &["--rate-limit-rate", "1", "--retry-after-s", "30"],
    )
    .await;
    let live = mock("live", &[]).await;
    let admin = free_port();
    let p = proxy(
        &format!(
            "{}{}",
            admin_config(admin),
            chain_config(limited.port, Some(live.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-backend"], "second");
    let first = admin_backend(admin, "first").await;
    assert_eq!(first["why_not"], "cooling down");
    assert_eq!(
        first["error_rate"].as_f64().unwrap(),
        0.0,
        "a 429 is not a failure"
    );
    // While it cools down it is not tried at all.
    for _ in 0..5 {
        assert_eq!(
            post_chat(&p, &chat_body("m", "hi", false), &[])
                .await
                .status(),
            200
        );
    }
    assert_eq!(received(&limited).await.len(), 1);

    // A Retry-After longer than `max_cooldown_ms` is cut to it.
    let p = proxy(
        &format!(
            "outlier: {{ max_cooldown_ms: 400 }}\n{}",
            chain_config(limited.port, Some(live.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    let tried = received(&limited).await.len();
    assert_eq!(
        post_chat(&p, &chat_body("m", "hi", false), &[])
            .await
            .status(),
        200
    );
    assert_eq!(received(&limited).await.len(), tried + 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        post_chat(&p, &chat_body("m", "hi", false), &[])
            .await
            .status(),
        200
    );
    assert_eq!(
        received(&limited).await.len(),
        tried + 2,
        "tried again once the capped cool-down was over"
    );

    // The only backend rate-limits: its 429 and Retry-After reach the client.
    let only = mock("only", &["--rate-limit-rate", "1", "--retry-after-s", "7"]).await;
    let p = proxy(&chain_config(only.port, None, ""), &[("chain", CHAIN)]).await;
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_moves_on_within_the_attempt_cap() {
    let a = mock("a", &["--fail-rate", "1"]).await;
    let b = mock("b", &["--fail-rate", "1"]).await;
    let c = mock("c", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: chain\n    max_attempts: 2\nbackends:\n{}{}{}",
        backend("first", a.port, "[m]"),
        backend("second", b.port, "[m]"),
        backend("third", c.port, "[m]")
    );
    let p = proxy(&config, &[("chain", CHAIN)]).await;
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(
        r.status(),
        503,
        "the second (last allowed) attempt's answer is relayed"
    );
    assert_eq!(r.headers()["x-switchyard-backend"], "second");
    assert_eq!(received(&a).await.len(), 1);
    assert_eq!(received(&b).await.len(), 1);
    assert!(
        received(&c).await.is_empty(),
        "the attempt cap stops before the third"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_502_or_503_before_any_body_byte_moves_on_and_counts_as_a_failure() {
    for status in ["500", "502", "503"] {
        let failing = mock("failing", &["--fail-rate", "1", "--fail-status", status]).await;
        let live = mock("live", &[]).await;
        let (p, admin) = chain_proxy(
            "outlier: { consecutive_failures: 2, base_ejection_ms: 60000 }\n",
            failing.port,
            Some(live.port),
        )
        .await;
        for i in 0..2 {
            let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
            assert_eq!(r.status(), 200, "{status}, request {i}");
            assert_eq!(r.headers()["x-switchyard-backend"], "second", "{status}");
        }
        assert_eq!(received(&failing).await.len(), 2, "{status}");
        // Two failures in a row: outlier detection ejected it.
        assert_eq!(
            admin_backend(admin, "first").await["why_not"],
            "ejected",
            "{status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_broken_at_once_is_stale_and_after_a_while_the_backends_failure() {
    let first = mock("first", &[]).await;
    let second = mock("second", &[]).await;
    let (p, admin) = chain_proxy("", first.port, Some(second.port)).await;
    // A reused connection that breaks at once is taken for one the backend closed in the
    // pool: tried again on a fresh connection to the same backend, uncounted.
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.headers()["x-switchyard-backend"], "first");
    let r = post_chat(
        &p,
        &chat_body("m", "hi", false),
        &[("x-mock-fault", "close")],
    )
    .await;
    assert_eq!(r.status(), 503, "every attempt was closed on");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let record = decision(admin, &id).await;
    let outcomes: Vec<&str> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.len(), 3, "{record}");
    assert_eq!(outcomes[0], "stale pooled connection", "{record}");
    assert_eq!(received(&first).await.len(), 3);
    assert_eq!(received(&second).await.len(), 1);
    for m in [&first, &second] {
        let reset = client().post(m.url("/mock/reset")).send().await.unwrap();
        assert_eq!(reset.status(), 200);
    }

    // The first request leaves a connection to `first` in the pool; the second reuses it,
    // and `first` closes it 1.2 s later without an answer: not a stale connection (those
    // fail at once), so it is not tried again on `first` but counted and moved on (to
    // `second`, which the same headers make fail too).
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.headers()["x-switchyard-backend"], "first");
    let r = post_chat(
        &p,
        &chat_body("m", "hi", false),
        &[("x-mock-latency-ms", "1200"), ("x-mock-fault", "close")],
    )
    .await;
    assert_eq!(r.status(), 503);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(received(&first).await.len(), 2, "tried once on `first`");
    assert_eq!(received(&second).await.len(), 1, "then on `second`");
    let record = decision(admin, &id).await;
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{record}");
    assert_eq!(attempts[0]["backend"], "first", "{record}");
    assert_ne!(
        attempts[0]["outcome"], "stale pooled connection",
        "{record}"
    );
    let error_rate = admin_backend(admin, "first").await["error_rate"]
        .as_f64()
        .unwrap();
    assert!(error_rate > 0.0, "counted against `first`: {error_rate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_connection_retry_comes_on_top_of_the_largest_attempt_cap() {
    // Sixteen backends (the most `max_attempts` allows) on one mock, tried by name.
    let m = mock("m", &[]).await;
    let by_name = "local P = {}\n\
        function P.route(req, backends)\n\
          table.sort(backends, function(a, b) return a.name < b.name end)\n\
          local names = {}\n\
          for i, b in ipairs(backends) do names[i] = b.name end\n\
          return names\n\
        end\n\
        return P\n";
    let backends: String = (1..=16)
        .map(|i| backend(&format!("b{i:02}"), m.port, "[m]"))
        .collect();
    let admin = free_port();
    let config = format!(
        "{}outlier: {{ consecutive_failures: 100 }}\nroutes:\n  - policy: by_name\n    max_attempts: 16\nbackends:\n{backends}",
        admin_config(admin)
    );
    let p = proxy(&config, &[("by_name", by_name)]).await;
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.headers()["x-switchyard-backend"], "b01");
    let r = post_chat(
        &p,
        &chat_body("m", "hi", false),
        &[("x-mock-fault", "close")],
    )
    .await;
    assert_eq!(r.status(), 503);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let record = decision(admin, &id).await;
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        17,
        "the stale retry and all 16 attempts: {record}"
    );
    assert_eq!(
        attempts[0]["outcome"], "stale pooled connection",
        "{record}"
    );
    assert_eq!(attempts[16]["backend"], "b16", "{record}");
    assert_eq!(received(&m).await.len(), 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_5xx_eject_the_backend_and_it_is_tried_no_more() {
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let live = mock("live", &[]).await;
    let admin = free_port();
    let p = proxy(
        &format!(
            "{}outlier: {{ consecutive_failures: 3, base_ejection_ms: 60000 }}\n{}",
            admin_config(admin),
            chain_config(failing.port, Some(live.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    for _ in 0..6 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 200, "every request saved by the next candidate");
        assert_eq!(r.headers()["x-switchyard-backend"], "second");
    }
    // Three 503s in a row ejected it: the later requests never reached it.
    assert_eq!(received(&failing).await.len(), 3);
    assert_eq!(admin_backend(admin, "first").await["why_not"], "ejected");
    let metrics = metrics_text(admin).await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_upstream_attempts_total{backend=\"first\",outcome=\"failure\"}"
        ),
        3.0,
        "{metrics}"
    );
    p.wait_log("backend first ejected after repeated failures")
        .await;
}

/// Both backends fail while the client asks the mocks for 503s, then recover.
async fn eject_both(max_ejected_percent: u32, panic_mode: bool) -> (Proc, u16, Proc, Proc) {
    let (one, two) = (mock("one", &[]).await, mock("two", &[]).await);
    let (p, admin) = chain_proxy(
        &format!(
            "outlier: {{ consecutive_failures: 2, base_ejection_ms: 60000, \
             max_ejected_percent: {max_ejected_percent}, panic_mode: {panic_mode} }}\n"
        ),
        one.port,
        Some(two.port),
    )
    .await;
    let failing = [("x-mock-status", "503")];
    for _ in 0..2 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &failing).await;
        assert_eq!(
            r.status(),
            503,
            "both candidates failed: the last 503 is relayed"
        );
    }
    // The relayed attempt's outcome is counted as its request ends, just after the client
    // has the answer; its in-flight slot goes after it.
    for name in ["first", "second"] {
        until_backend(admin, name, "inflight", 0.into()).await;
    }
    (p, admin, one, two)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_ejected_percent_of_the_backends_are_ejected() {
    let (p, admin, _one, two) = eject_both(50, false).await;
    assert_eq!(admin_backend(admin, "first").await["why_not"], "ejected");
    // The second failed as often, but ejecting it too would pass 50%.
    assert!(admin_backend(admin, "second").await["why_not"].is_null());
    let before = received(&two).await.len();
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(r.headers()), "second");
    assert_eq!(received(&two).await.len(), before + 1);
}

async fn assert_both_ejected(admin: u16) {
    for name in ["first", "second"] {
        assert_eq!(
            admin_backend(admin, name).await["why_not"],
            "ejected",
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_ejected_the_answer_is_a_fast_503_or_with_panic_mode_a_backend() {
    // By default (FAULTS.md): a fast 503 with `Retry-After`, no backend tried.
    let (p, admin, one, two) = eject_both(100, false).await;
    assert_both_ejected(admin).await;
    let before = (received(&one).await.len(), received(&two).await.len());
    let started = Instant::now();
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 503);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert_eq!(r.headers()["retry-after"], "1");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_backend_available", "{body}");
    assert_eq!(received(&one).await.len(), before.0);
    assert_eq!(received(&two).await.len(), before.1);
    let record = decision(admin, &id).await;
    assert_eq!(
        record["skipped"],
        serde_json::json!([
            { "backend": "first", "reason": "ejected" },
            { "backend": "second", "reason": "ejected" },
        ]),
        "{record}"
    );
    drop((p, one, two));

    // With `panic_mode`, both are tried anyway.
    let (p, admin, one, two) = eject_both(100, true).await;
    assert_both_ejected(admin).await;
    let before = (received(&one).await.len(), received(&two).await.len());
    // Both are still ejected for a minute, and both answer again: panic mode saves the
    // request instead of refusing it.
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        served_by(r.headers()),
        "first",
        "the policy's order is kept"
    );
    assert_eq!(received(&one).await.len(), before.0 + 1);
    assert_eq!(received(&two).await.len(), before.1);
    p.wait_log("panic mode: every backend for this request is unhealthy or ejected")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_does_not_keep_the_others_out_of_panic_mode() {
    let (one, two) = (mock("one", &[]).await, mock("two", &[]).await);
    let (p, admin) = chain_proxy(
        "outlier: { consecutive_failures: 2, base_ejection_ms: 60000, panic_mode: true }\n",
        one.port,
        Some(two.port),
    )
    .await;
    set_draining(admin, "second", true).await;
    for _ in 0..2 {
        let r = post_chat(
            &p,
            &chat_body("m", "hi", false),
            &[("x-mock-status", "503")],
        )
        .await;
        assert_eq!(r.status(), 503);
    }
    // The relayed answer's outcome is recorded as its request ends, just after the client
    // has it.
    until_backend(admin, "first", "why_not", "ejected".into()).await;
    // `first` is the only backend in rotation, ejected, and answers again.
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(r.headers()), "first");
    assert!(
        received(&two).await.is_empty(),
        "the drained one gets nothing"
    );
}

/// Once a request is at `first`, send another through the chain whose 429s (30 s) put
/// `second` in a cool-down while the first waits for its answer.
async fn cool_down_second_while_first_answers(p: &Proc, admin: u16) {
    until_backend(admin, "first", "inflight", 1.into()).await;
    let limited = [("x-mock-status", "429"), ("x-mock-retry-after", "30")];
    let r = post_chat(p, &chat_body("m", "hi", false), &limited).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        admin_backend(admin, "second").await["why_not"],
        "cooling down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_relayed_when_the_next_candidate_went_out_of_rotation_meanwhile() {
    let (one, two) = (mock("one", &[]).await, mock("two", &[]).await);
    let (p, admin) = chain_proxy("", one.port, Some(two.port)).await;
    // The first request's 429 from `first` comes after 600 ms...
    let slow = [
        ("x-mock-status", "429"),
        ("x-mock-retry-after", "7"),
        ("x-mock-latency-ms", "600"),
    ];
    let url = p.url("/v1/chat/completions");
    let first = tokio::spawn(async move {
        let mut r = client().post(url).json(&chat_body("m", "hi", false));
        for (k, v) in slow {
            r = r.header(k, v);
        }
        let r = r.send().await.unwrap();
        let retry_after = r.headers().get("retry-after").cloned();
        (r.status(), retry_after, r.text().await.unwrap())
    });
    // ...and meanwhile (once it is at `first`) a second request's 429s put both backends
    // in a cool-down.
    cool_down_second_while_first_answers(&p, admin).await;
    // `second` cannot take the first request: `first`'s own answer is relayed, not a 503.
    let (status, retry_after, body) = first.await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after.unwrap(), "7");
}

/// A 503 `no_backend_available` whose `Retry-After` is when a 30 s cool-down ends.
async fn back_after_the_30_s_cool_down(r: reqwest::Response) {
    assert_eq!(r.status(), 503);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((28..=30).contains(&wait), "Retry-After: {wait}");
    assert_eq!(error_code(&r.text().await.unwrap()), "no_backend_available");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_every_backend_cools_down_retry_after_says_when_the_first_is_back() {
    let one = mock("one", &[]).await;
    let p = proxy(&chain_config(one.port, None, ""), &[("chain", CHAIN)]).await;
    let limited = [("x-mock-status", "429"), ("x-mock-retry-after", "30")];
    let r = post_chat(&p, &chat_body("m", "hi", false), &limited).await;
    assert_eq!(r.status(), 429, "the only backend's 429 is relayed");
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    back_after_the_30_s_cool_down(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_naming_only_a_backend_out_for_now_gets_a_503_to_retry_or_a_wait_not_a_403() {
    let (one, two) = (mock("one", &[]).await, mock("two", &[]).await);
    let pinned = "local P = {}\nfunction P.route(req, backends) return \"second\" end\nreturn P\n";
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: pinned\nbackends:\n{}{}",
        backend("first", one.port, "[m]"),
        backend("second", two.port, "[m]")
    );
    let p = proxy(&config, &[("pinned", pinned)]).await;
    let limited = [("x-mock-status", "429"), ("x-mock-retry-after", "30")];
    let r = post_chat(&p, &chat_body("m", "hi", false), &limited).await;
    assert_eq!(
        r.status(),
        429,
        "the only backend named: its 429 is relayed"
    );
    // `second` cools down; the policy still names only it. That is for later, not never.
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    back_after_the_30_s_cool_down(r).await;
    assert!(received(&one).await.is_empty());

    // Named while it is only full (max_inflight 1, one slow request in it): the request
    // waits in the route's queue for it, as when every candidate is full.
    let two = mock("two", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: pinned\nbackends:\n{}{}    max_inflight: 1\n",
        backend("first", one.port, "[m]"),
        backend("second", two.port, "[m]")
    );
    let p = proxy(&config, &[("pinned", pinned)]).await;
    let slow = in_background(&p, "500");
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(&two).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached `second`"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(
        (r.status().as_u16(), served_by(r.headers()).as_str()),
        (200, "second")
    );
    assert_eq!(slow.await.unwrap(), (200, "second".to_string()));
    assert!(received(&one).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_gone_out_of_rotation_uses_up_no_try_of_the_attempt_cap() {
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let (two, three) = (mock("two", &[]).await, mock("three", &[]).await);
    let admin = free_port();
    let config = format!(
        "{}routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: chain\n    max_attempts: 2\noutlier: {{ consecutive_failures: 100 }}\nbackends:\n{}{}{}",
        admin_config(admin),
        backend("first", failing.port, "[m]"),
        backend("second", two.port, "[m]"),
        backend("third", three.port, "[m]")
    );
    let p = proxy(&config, &[("chain", CHAIN)]).await;
    // The first request, planned over all three, gets `first`'s 503 after 600 ms...
    let slow = in_background(&p, "600");
    // ...and meanwhile a second request's 429 from `second` cools it down.
    cool_down_second_while_first_answers(&p, admin).await;
    // `second` is skipped without using up the second try: `third` serves it.
    let (status, served) = slow.await.unwrap();
    assert_eq!((status, served.as_str()), (200, "third"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_does_not_teach_time_to_first_token() {
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let (p, admin) = chain_proxy("", failing.port, None).await;
    for stream in [false, true] {
        let r = post_chat(&p, &chat_body("m", "hi", stream), &[]).await;
        assert_eq!(r.status(), 503);
    }
    assert_eq!(admin_backend(admin, "first").await["ttft_ms"], 0.0);
    let metrics = metrics_text(admin).await;
    assert!(
        !metrics.contains("switchyard_ttft_seconds_count{backend=\"first\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_when_the_retry_budget_is_spent() {
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let live = mock("live", &[]).await;
    // No share of traffic, a floor of 1 retry a second: 10 retries in the 10 s window.
    // Ejection is kept out of the way, so every request tries the failing backend first.
    let p = proxy(
        &format!(
            "proxy: {{ threads: 2, grace_period_seconds: 0, retry_budget_percent: 0, retry_budget_min_per_sec: 1 }}\noutlier: {{ consecutive_failures: 1000 }}\n{}",
            chain_config(failing.port, Some(live.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    let mut saved = 0;
    for i in 0..15 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        match r.status().as_u16() {
            200 => {
                assert_eq!(r.headers()["x-switchyard-backend"], "second");
                saved += 1;
            }
            // The budget is spent: the first backend's own answer is relayed.
            503 => assert!(i >= 10, "request {i} was not retried"),
            s => panic!("status {s}"),
        }
    }
    assert_eq!(saved, 10);
    assert_eq!(received(&failing).await.len(), 15);
    assert_eq!(received(&live).await.len(), 10);
    p.wait_log("retry budget exhausted; not retrying").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_from_the_backend_is_relayed_unchanged_and_is_no_failure() {
    let a = mock("a", &[]).await;
    let b = mock("b", &[]).await;
    let admin = free_port();
    let p = proxy(
        &format!(
            "{}{}",
            admin_config(admin),
            chain_config(a.port, Some(b.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    let r = post_chat(
        &p,
        &chat_body("m", "hi", false),
        &[("x-mock-status", "400")],
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers()["x-mock-backend"],
        "a",
        "the backend's own answer"
    );
    // Byte for byte what the backend answers.
    let direct = client()
        .post(a.url("/v1/chat/completions"))
        .header("x-mock-status", "400")
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), direct);
    assert!(received(&b).await.is_empty(), "not retried");
    assert_eq!(
        admin_backend(admin, "first").await["error_rate"]
            .as_f64()
            .unwrap(),
        0.0
    );
}

/// A backend may answer before it has read the body (a 413 by the head's length, say) and
/// then stop reading: HTTP/1.1 closes the connection, HTTP/2 resets the stream with
/// `NO_ERROR` (RFC 9113 §8.1). The answer is the backend's, relayed as any other; sending
/// the rest of the body fails, and that is no failure of the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_before_the_body_was_read_is_relayed_over_http1_and_http2() {
    let a = mock("a", &[]).await;
    let b = mock("b", &[]).await;
    // Far over HTTP/2's initial 64 KiB window and the sockets' buffers: the backend stops
    // reading long before the body is sent.
    let prompt = "lorem ipsum dolor sit amet ".repeat(4 * 1024 * 1024 / 27);
    let body = serde_json::to_vec(&chat_body("m", &prompt, false)).unwrap();
    // Asked directly with a small body: a client that does not read the answer while it
    // sends (reqwest) may fail on the closed connection before it sees it.
    let direct = post_chat(
        &a,
        &chat_body("m", "hi", false),
        &[("x-mock-fault", "early")],
    )
    .await;
    assert_eq!(direct.status(), 413);
    let direct = direct.bytes().await.unwrap();
    for http2 in [false, true] {
        let admin = free_port();
        let config = backends_over_http2(
            format!(
                "{}{}",
                admin_config(admin),
                chain_config(a.port, Some(b.port), "")
            ),
            http2,
        );
        let p = proxy(&config, &[("chain", CHAIN)]).await;
        for _ in 0..3 {
            let r = post_chat_bytes(&p, body.clone(), &[("x-mock-fault", "early")]).await;
            assert_eq!(r.status(), 413, "http2: {http2}");
            assert_eq!(r.headers()["x-mock-backend"], "a", "http2: {http2}");
            assert_eq!(r.bytes().await.unwrap(), direct, "http2: {http2}");
        }
        assert!(received(&b).await.is_empty(), "http2: {http2}: not retried");
        let first = admin_backend(admin, "first").await;
        assert_eq!(
            first["error_rate"].as_f64(),
            Some(0.0),
            "http2: {http2}: {first}"
        );
    }
}

/// The same with a 503 given before the body was read: the next candidate gets the whole
/// body, first try over HTTP/1.1 and over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_503_moves_on_with_the_whole_body_over_http1_and_http2() {
    let a = mock("a", &["--early", "--fail-rate", "1"]).await;
    let b = mock("b", &[]).await;
    let prompt = "lorem ipsum dolor sit amet ".repeat(4 * 1024 * 1024 / 27);
    let body = serde_json::to_vec(&chat_body("m", &prompt, false)).unwrap();
    let want = sha256_hex(&body);
    for http2 in [false, true] {
        let config = backends_over_http2(chain_config(a.port, Some(b.port), ""), http2);
        let p = proxy(&config, &[("chain", CHAIN)]).await;
        let r = post_chat_bytes(&p, body.clone(), &[]).await;
        assert_eq!(r.status(), 200, "http2: {http2}");
        assert_eq!(r.headers()["x-mock-backend"], "b", "http2: {http2}");
        assert_eq!(
            r.headers()["x-mock-body-sha256"],
            want.as_str(),
            "http2: {http2}"
        );
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let line = p.access_line(&id).await;
        assert!(line.contains("attempts=[first:status 503"), "{line}");
    }
    // `a` answered both without reading either body.
    let seen = received(&a).await;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r["body_bytes"] == 0), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_or_403_from_the_backend_becomes_502_and_its_body_is_never_shown() {
    let a = mock("a", &[]).await;
    let p = proxy(&chain_config(a.port, None, ""), &[("chain", CHAIN)]).await;
    for status in ["401", "403"] {
        let r = post_chat(
            &p,
            &chat_body("m", "hi", false),
            &[("x-mock-status", status)],
        )
        .await;
        assert_eq!(r.status(), 502, "{status}");
        let body = r.text().await.unwrap();
        assert_eq!(error_code(&body), "upstream_auth_failed");
        assert!(!body.contains("mock"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_is_not_retried_and_ends_the_stream_without_done() {
    let a = mock("a", &["--chunks", "6"]).await;
    let b = mock("b", &[]).await;
    let p = proxy(&chain_config(a.port, Some(b.port), ""), &[("chain", CHAIN)]).await;
    let r = post_chat(
        &p,
        &chat_body("m", "hi", true),
        &[("x-mock-fault", "reset-mid-stream")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let (text, broken) = read_stream(r).await;
    assert!(broken, "the client sees the stream end abnormally: {text}");
    assert!(text.contains("data: "), "part of the stream arrived");
    assert!(!text.contains("[DONE]"), "never a made-up end");
    assert!(
        received(&b).await.is_empty(),
        "never retried once bytes went out"
    );
    // No usage came: the prompt estimate (one token for "hi") and the content events that
    // went out are what the request is counted as having used.
    let line = p.log_line(" POST /v1/chat/completions status=").await;
    assert!(line.contains(" tokens_in=1 tokens_out="), "{line}");
    assert!(!line.contains(" tokens_out=0 "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_hits_the_idle_timeout_and_ends_without_done() {
    let a = mock("a", &["--chunks", "6"]).await;
    let second = mock("second", &[]).await;
    let p = proxy(
        &format!(
            "proxy: {{ threads: 2, grace_period_seconds: 0, idle_timeout_ms: 400 }}\n{}",
            chain_config(a.port, Some(second.port), "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    let started = Instant::now();
    let r = post_chat(
        &p,
        &chat_body("m", "hi", true),
        &[("x-mock-fault", "stall-mid-stream")],
    )
    .await;
    let (text, broken) = read_stream(r).await;
    assert!(broken && !text.contains("[DONE]"), "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Bytes had reached the client: the next candidate is not tried.
    assert!(received(&second).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sse_is_forwarded_as_it_is() {
    // A raw backend that streams events no parser would accept.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Its usage comes after the bad events: reading it must survive them.
    let raw = "data: {not json\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\nevent: weird\ndata: \u{1}\u{2}\n\ndata: {\"usage\":\"broken\"}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // One stream per connection, for the two requests below.
        for _ in 0..2 {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            let _ = s.read(&mut buf).await.unwrap();
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            s.write_all(head.as_bytes()).await.unwrap();
            for part in raw.split_inclusive("\n\n") {
                s.write_all(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
        }
    });
    let p = proxy(&chain_config(port, None, ""), &[("chain", CHAIN)]).await;
    // The client asks for usage itself, so the stream is not changed on its way.
    let mut body = chat_body("m", "hi", true);
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    let r = post_chat(&p, &body, &[]).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.text().await.unwrap(), raw);
    let line = p.access_line(&request_id).await;
    assert!(line.contains("tokens_in=5 tokens_out=7"), "{line}");

    // A client that did not ask: Switchyard asks for usage, reads it past the bad events,
    // and takes out only the usage chunk it asked for.
    let r = post_chat(&p, &chat_body("m", "hi", true), &[]).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n";
    assert_eq!(r.text().await.unwrap(), raw.replace(usage, ""));
    let line = p.access_line(&request_id).await;
    assert!(line.contains("tokens_in=5 tokens_out=7"), "{line}");
}

/// A backend that answers one request with `head` (a status line and headers, without the
/// blank line) and `body`, with a Content-Length.
async fn one_answer(head: &'static str, body: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let _ = s.read(&mut buf).await.unwrap();
        let answer = format!("{head}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        s.write_all(answer.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    port
}

const USAGE_STREAM: &str =
    "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}],\"usage\":null}\n\n\
    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}\n\n\
    data: [DONE]\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_labelled_text_plain_is_still_read_and_stripped() {
    let port = one_answer("HTTP/1.1 200 OK\r\ncontent-type: text/plain", USAGE_STREAM).await;
    let p = proxy(&chain_config(port, None, ""), &[("chain", CHAIN)]).await;
    // The client did not ask for usage: Switchyard did, and takes it out again.
    let r = post_chat(&p, &chat_body("m", "hi", true), &[]).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        r.text().await.unwrap(),
        "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\ndata: [DONE]\n\n"
    );
    let line = p.access_line(&request_id).await;
    assert!(line.contains("tokens_in=11 tokens_out=7"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_about_the_backend_connection_and_account_stay_with_the_backend() {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
        connection: keep-alive, x-backend-hop\r\nx-backend-hop: 1\r\nkeep-alive: timeout=5\r\n\
        upgrade: h2c\r\nx-ratelimit-remaining-tokens: 29000000\r\n\
        anthropic-ratelimit-requests-remaining: 99\r\nopenai-organization: operator-org\r\n\
        anthropic-organization-id: operator-org\r\nset-cookie: __cf_bm=shared\r\n\
        x-kept: yes";
    let port = one_answer(head, "{\"choices\":[]}").await;
    let p = proxy(&chain_config(port, None, ""), &[("chain", CHAIN)]).await;
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 200);
    let headers = r.headers();
    for gone in [
        "x-backend-hop",
        "keep-alive",
        "upgrade",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-requests-remaining",
        "openai-organization",
        "anthropic-organization-id",
        "set-cookie",
    ] {
        assert!(headers.get(gone).is_none(), "{gone}: {headers:?}");
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(r.text().await.unwrap(), "{\"choices\":[]}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_event_inside_a_200_stream_is_relayed_and_counted_as_a_failure() {
    const FAILED: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\n\
        data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream";
    let port = one_answer(head, FAILED).await;
    let admin = free_port();
    let config = format!("{}{}", admin_config(admin), chain_config(port, None, ""));
    let p = proxy(&config, &[("chain", CHAIN)]).await;
    let r = post_chat(&p, &chat_body("m", "hi", true), &[]).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.text().await.unwrap(), FAILED, "relayed as it came");
    let line = p.access_line(&request_id).await;
    assert!(
        line.contains("status=200") && line.contains("attempts=[first:error event in the stream]"),
        "{line}"
    );
    let failures = "switchyard_upstream_attempts_total{backend=\"first\",outcome=\"failure\"}";
    assert_eq!(metric(&metrics_text(admin).await, failures), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_answer_is_relayed_byte_for_byte_never_rewritten() {
    // Labelled gzip (though we asked for identity): whatever its bytes look like, they are
    // not Switchyard's to edit.
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip";
    let port = one_answer(head, USAGE_STREAM).await;
    let p = proxy(&chain_config(port, None, ""), &[("chain", CHAIN)]).await;
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.bytes().await.unwrap(), USAGE_STREAM.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_down_is_a_fast_503_with_retry_after() {
    let ((_refusing1, d1), (_refusing2, d2)) = (refusing_port(), refusing_port());
    let p = proxy(&chain_config(d1, Some(d2), ""), &[("chain", CHAIN)]).await;
    for _ in 0..8 {
        let started = Instant::now();
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_secs(1));
        let body = r.text().await.unwrap();
        let code = error_code(&body);
        assert!(
            ["upstream_unavailable", "no_backend_available"].contains(&code.as_str()),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_cancels_the_upstream_request() {
    let a = mock("a", &["--chunks", "50", "--chunk-delay-ms", "100"]).await;
    let p = proxy(&chain_config(a.port, None, ""), &[("chain", CHAIN)]).await;
    let r = post_chat(&p, &chat_body("m", "hi", true), &[]).await;
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(mock_stats(&a).await["inflight"], 1);
    drop(stream);
    let dropped = Instant::now();
    loop {
        if mock_stats(&a).await["inflight"] == 0 {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_millis(100),
            "upstream still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        dropped.elapsed() < Duration::from_millis(100),
        "closed in {:?}",
        dropped.elapsed()
    );
    // Logged as the client's doing, under the request's id.
    let line = p.access_line(&request_id).await;
    assert!(line.contains("attempts=[first:client closed]"), "{line}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_stream_is_let_go_after_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // As fast as the mock can write: ~20 MB of events, far more than the socket buffers
    // between the mock and a client that reads nothing hold.
    let a = mock("a", &["--chunks", "100000"]).await;
    let p = proxy(
        &format!(
            "proxy: {{ threads: 2, grace_period_seconds: 0, write_timeout_ms: 1000 }}\n{}",
            chain_config(a.port, None, "")
        ),
        &[("chain", CHAIN)],
    )
    .await;
    // Warm the proxy up, so that what it allocates for its first stream is not counted.
    let warm = post_chat(&p, &chat_body("m", "hi", true), &[("x-mock-chunks", "3")]).await;
    assert_eq!(warm.status(), 200);
    read_stream(warm).await;
    let before = rss_kib(p.pid());

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket
        .connect(format!("127.0.0.1:{}", p.port).parse().unwrap())
        .await
        .unwrap();
    let body = chat_body("m", "hi", true).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // The write timeout cannot have started before the request was sent.
    let sent = Instant::now();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 512];
    let n = conn.read(&mut first).await.unwrap();
    let head = String::from_utf8_lossy(&first[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("x-request-id in the first read")
        .trim()
        .to_string();
    assert_eq!(mock_stats(&a).await["inflight"], 1);

    // The client reads nothing more. Once every buffer on the way is full, the proxy's
    // writes stall; after the write timeout it gives up on the client and the upstream.
    let mut peak = 0;
    loop {
        peak = peak.max(rss_kib(p.pid()));
        if mock_stats(&a).await["inflight"] == 0 {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "the upstream request is still open {:?} after the request was sent",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "{:?}",
        sent.elapsed()
    );
    // Buffering is bounded: the proxy holds a few chunks, not the stream (~19 MB).
    assert!(
        peak < before + 8 * 1024,
        "memory grew from {before} KiB to {peak} KiB"
    );
    // The access line says what happened, under the request's id.
    let line = p.access_line(&request_id).await;
    assert!(
        line.contains("attempts=[first:client closed]")
            && line.contains("WriteTimedout")
            && line.contains("status=499"),
        "{line}"
    );
    // The client's connection is closed, without a `[DONE]` it never got.
    let mut rest = Vec::new();
    // Ended (a reset as well as a clean close), not still open.
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the client's connection is still open");
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_out_requests_get_a_fast_503_and_probing_brings_one_back() {
    let (p1, p2) = (free_port(), free_port());
    let mut one = mock_on(p1, "one", &[]).await;
    let mut two = mock_on(p2, "two", &[]).await;
    let admin = free_port();
    let config = format!(
        "{}health: {{ interval_ms: 100, timeout_ms: 200, rise: 2, fall: 2 }}\n{}",
        admin_config(admin),
        chain_config(p1, Some(p2), "")
    );
    let p = proxy(&config, &[("chain", CHAIN)]).await;
    one.kill();
    two.kill();
    let deadline = Instant::now() + Duration::from_secs(3);
    for name in ["first", "second"] {
        while admin_backend(admin, name).await["healthy"] != false {
            assert!(Instant::now() < deadline, "{name} never marked unhealthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Every backend is out: a fast 503, nothing tried (the record has no attempts, and
    // says why each was left out).
    for _ in 0..4 {
        let started = Instant::now();
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 503);
        assert!(r.headers().get("retry-after").is_some());
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(error_code(&r.text().await.unwrap()), "no_backend_available");
        let record = decision(admin, &id).await;
        assert_eq!(record["attempts"], serde_json::json!([]), "{record}");
        assert_eq!(
            record["skipped"],
            serde_json::json!([
                { "backend": "first", "reason": "unhealthy" },
                { "backend": "second", "reason": "unhealthy" },
            ]),
            "{record}"
        );
    }
    // The checks keep probing: the second comes back, is marked healthy, and serves,
    // with no reload.
    let _back = mock_on(p2, "two", &[]).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while admin_backend(admin, "second").await["healthy"] != true {
        assert!(Instant::now() < deadline, "the second never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin_backend(admin, "first").await["healthy"], false);
    for _ in 0..3 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(served_by(r.headers()), "second");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_dead_backend_out_and_bring_it_back() {
    let port = free_port();
    let mut flappy = mock_on(port, "flappy", &[]).await;
    let steady = mock("steady", &[]).await;
    let admin = free_port();
    let config = format!(
        "{}health: {{ interval_ms: 100, timeout_ms: 200, rise: 2, fall: 2 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}",
        admin_config(admin),
        backend("flappy", port, "[m]"),
        backend("steady", steady.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    flappy.kill();
    becomes_healthy(admin, "flappy", false).await;
    for _ in 0..10 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.headers()["x-switchyard-backend"], "steady");
    }
    let _back = mock_on(port, "flappy", &[]).await;
    becomes_healthy(admin, "flappy", true).await;
    let mut served = std::collections::HashSet::new();
    for _ in 0..10 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        served.insert(served_by(r.headers()));
    }
    assert!(served.contains("flappy"), "traffic returns after recovery");
}

/// Waits (5 s at most) until the admin API shows `name` with `healthy`.
async fn becomes_healthy(admin: u16, name: &str, healthy: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin_backend(admin, name).await["healthy"] != healthy {
        assert!(
            Instant::now() < deadline,
            "{name} never became healthy: {healthy}"
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Sets the answers of `mock`'s next health checks (`ok,fail,...`, repeated).
async fn set_health(mock: &Proc, pattern: &str) {
    let url = mock.url(&format!("/mock/health?pattern={pattern}"));
    let r = client().post(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Polls `name`'s `healthy` until `mock` has answered `checks` more health checks,
/// asserting it is `healthy` at every look.
async fn stays_healthy_for(admin: u16, name: &str, mock: &Proc, checks: u64, healthy: bool) {
    let health_checks = || async { mock_stats(mock).await["health_checks"].as_u64().unwrap() };
    let until = health_checks().await + checks;
    let deadline = Instant::now() + Duration::from_secs(10);
    while health_checks().await < until {
        assert_eq!(
            admin_backend(admin, name).await["healthy"],
            healthy,
            "{name} flipped with a pattern that never meets rise/fall"
        );
        assert!(Instant::now() < deadline, "health checks stopped");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_backend_needs_fall_failures_and_rise_successes_in_a_row() {
    let flappy = mock("flappy", &[]).await;
    let steady = mock("steady", &[]).await;
    set_health(&flappy, "ok,fail").await;
    let admin = free_port();
    let config = format!(
        "{}health: {{ interval_ms: 50, timeout_ms: 200, rise: 2, fall: 2 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}",
        admin_config(admin),
        backend("flappy", flappy.port, "[m]"),
        backend("steady", steady.port, "[m]")
    );
    let _p = proxy(&config, &[]).await;
    // One failure at a time never reaches `fall` (with fall 1 it would go down, and with
    // rise 2 never come back while the pattern alternates).
    stays_healthy_for(admin, "flappy", &flappy, 12, true).await;

    // Two failures in a row take it out; one success at a time never reaches `rise`.
    set_health(&flappy, "fail,fail,ok").await;
    becomes_healthy(admin, "flappy", false).await;
    stays_healthy_for(admin, "flappy", &flappy, 12, false).await;

    set_health(&flappy, "ok").await;
    becomes_healthy(admin, "flappy", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_can_override_the_health_check_path_or_switch_checks_off() {
    let a = mock("a", &[]).await;
    let b = mock("b", &[]).await;
    let (_refusing, unchecked_dead) = refusing_port();
    // A health endpoint that answers 204 to every probe (for 5 s at most).
    let no_content = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let no_content_port = no_content.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, no_content.accept()).await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                }
            });
        }
    });
    let admin = free_port();
    let config = format!(
        "{}health: {{ interval_ms: 100, timeout_ms: 200, rise: 1, fall: 1 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}    health_path: /no-such-path\n{}    health_path: \"\"\n{}",
        admin_config(admin),
        backend("a", a.port, "[m]"),
        backend("b", b.port, "[m]"),
        backend("c", unchecked_dead, "[m]"),
        backend("d", no_content_port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while admin_backend(admin, "b").await["healthy"] != false {
        assert!(
            Instant::now() < deadline,
            "b's own path (a 404) never marked it unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin_backend(admin, "a").await["healthy"], true);
    assert_eq!(
        admin_backend(admin, "c").await["healthy"],
        true,
        "no checks for c, dead as it is"
    );
    // The log says why b is out.
    p.wait_log("backend b is unhealthy (1 failed checks of /no-such-path; the last: ")
        .await;
    assert!(p.output().contains("answered 404"), "{}", p.output());
    // Any 2xx is healthy: after several probes, d's 204s still are.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(admin_backend(admin, "d").await["healthy"], true);
}

// ---- From the operator ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_valid_backend_set_and_refuses_an_invalid_one_whole() {
    let a = mock("a", &[]).await;
    let b = mock("b", &[]).await;
    let admin = free_port();
    let routes = "routes:\n  - match: { path_prefix: /v1/ }\n    policy: round_robin\n";
    let p = proxy(
        &format!(
            "{}{routes}backends:\n{}",
            admin_config(admin),
            backend("a", a.port, "[m]")
        ),
        &[],
    )
    .await;
    let path = p.dir().join("switchyard.yaml");
    let original = std::fs::read_to_string(&path).unwrap();
    let reload = || async {
        client()
            .post(format!("http://127.0.0.1:{admin}/admin/reload"))
            .send()
            .await
            .unwrap()
    };

    // Invalid: a duplicate name and a weight of 0. Refused whole; `a` keeps serving.
    let bad = original.replace(
        "backends:\n",
        &format!(
            "backends:\n{}    weight: 0\n{}",
            backend("b", b.port, "[m]"),
            backend("b", b.port, "[m]")
        ),
    );
    std::fs::write(&path, &bad).unwrap();
    let r = reload().await;
    assert_eq!(r.status(), 422);
    let report: serde_json::Value = r.json().await.unwrap();
    let problems = report["config_errors"].to_string();
    assert!(
        problems.contains("weight: must be > 0") && problems.contains("duplicate backend name"),
        "{problems}"
    );
    for _ in 0..4 {
        assert_eq!(
            post_chat(&p, &chat_body("m", "hi", false), &[])
                .await
                .headers()["x-switchyard-backend"],
            "a"
        );
    }
    // The refusal is counted and shown with its problems until a config is loaded.
    let policies = || get_json(format!("http://127.0.0.1:{admin}/admin/policies"));
    let shown = policies().await["last_config_rejection"]["problems"].to_string();
    assert!(shown.contains("duplicate backend name"), "{shown}");
    let rejected = "switchyard_config_reloads_total{result=\"rejected\"}";
    assert!(metric(&metrics_text(admin).await, rejected) >= 1.0);

    // Valid: only `b` now.
    let good = original.replace(&backend("a", a.port, "[m]"), &backend("b", b.port, "[m]"));
    std::fs::write(&path, good).unwrap();
    assert_eq!(reload().await.status(), 200);
    assert!(policies().await["last_config_rejection"].is_null());
    let loaded = "switchyard_config_reloads_total{result=\"loaded\"}";
    assert!(metric(&metrics_text(admin).await, loaded) >= 1.0);
    for _ in 0..4 {
        assert_eq!(
            post_chat(&p, &chat_body("m", "hi", false), &[])
                .await
                .headers()["x-switchyard-backend"],
            "b"
        );
    }
}

/// Poll `/admin/backends` until `name`'s `field` is `want` (within 5 s).
async fn until_backend(admin: u16, name: &str, field: &str, want: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = admin_backend(admin, name).await;
        if b[field] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}.{field} is not {want}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_drops_state_that_no_longer_applies_to_a_backend() {
    let good = mock("good", &[]).await;
    let bad = mock("bad", &["--fail-rate", "1"]).await;
    let admin = free_port();
    let head = format!(
        "{}routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\noutlier: {{ consecutive_failures: 2, base_ejection_ms: 60000 }}\n",
        admin_config(admin)
    );
    let probed = format!(
        "{}health: {{ interval_ms: 100, rise: 1, fall: 1 }}\nbackends:\n{}{}{}    health_path: /nope\n",
        head,
        backend("p", good.port, "[m]"),
        backend("q", bad.port, "[m]"),
        backend("h", good.port, "[m]")
    );
    let p = proxy(&probed, &[]).await;
    // `h` fails its checks; `q` fails requests until it is ejected (each one failed over).
    until_backend(admin, "h", "healthy", false.into()).await;
    for _ in 0..6 {
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        assert_eq!(r.status(), 200);
    }
    until_backend(admin, "q", "why_not", "ejected".into()).await;

    // The checks are switched off, and `p` and `q` swap servers.
    let path = p.dir().join("switchyard.yaml");
    let swapped = format!(
        "{}backends:\n{}{}{}    health_path: /nope\n",
        head,
        backend("p", bad.port, "[m]"),
        backend("q", good.port, "[m]"),
        backend("h", good.port, "[m]")
    );
    std::fs::write(&path, swapped).unwrap();
    let reloaded = client()
        .post(format!("http://127.0.0.1:{admin}/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    // No probe will ever bring `h` back, so nothing holds it down; `q` is another server
    // now, and not the one that was ejected.
    until_backend(admin, "h", "healthy", true.into()).await;
    until_backend(admin, "h", "eligible", true.into()).await;
    let q = admin_backend(admin, "q").await;
    assert_eq!(q["eligible"], true, "{q}");
    let served: Vec<String> = {
        let mut served = Vec::new();
        for _ in 0..6 {
            let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
            assert_eq!(r.status(), 200);
            served.push(served_by(r.headers()));
        }
        served
    };
    assert!(served.iter().any(|b| b == "q"), "{served:?}");
    assert!(served.iter().any(|b| b == "h"), "{served:?}");
}

#[test]
fn a_missing_key_variable_is_a_start_up_error_naming_it_and_no_value() {
    let err = refused_config(
        "routes: [{ policy: round_robin }]\nbackends: [{ name: a, url: \"http://127.0.0.1:1\", models: [m], api_key_env: SWITCHYARD_TEST_UNSET_KEY }]\n",
        &["SWITCHYARD_TEST_UNSET_KEY"],
    );
    assert!(
        err.contains("environment variable `SWITCHYARD_TEST_UNSET_KEY` is not set"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_streams_finish_and_stops_accepting() {
    let a = mock("a", &["--chunks", "8", "--chunk-delay-ms", "150"]).await;
    let config = format!(
        "proxy: {{ threads: 2, grace_period_seconds: 3 }}\n{}",
        chain_config(a.port, None, "")
    );
    let mut p = proxy(&config, &[("chain", CHAIN)]).await;
    // Under load: four streams and sixteen slow plain requests in flight.
    let url = p.url("/v1/chat/completions");
    let in_flight: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("x-mock-latency-ms", "400")
                    .json(&chat_body("m", "hi", i < 4))
                    .send()
                    .await
                    .expect("an answer");
                let status = r.status().as_u16();
                let text = r.text().await.expect("the answer finishes cleanly");
                (status, text)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(&a).await.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "not every stream reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.signal("TERM");
    // While the streams are still going (each takes 1.6 s), the process is alive and new
    // connections are refused: the listener closed at the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        p.wait_exit(Duration::from_millis(50)).is_none(),
        "exited before its streams ended"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .is_err(),
        "still accepting after SIGTERM"
    );
    for (i, answer) in in_flight.into_iter().enumerate() {
        let (status, text) = answer.await.unwrap();
        assert_eq!(status, 200, "{text}");
        if i < 4 {
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
    }
    assert!(
        p.wait_exit(Duration::from_secs(10)).is_some(),
        "exits after the grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_start_up_does_not_end_the_process() {
    // A log rotation or a config push can signal a proxy that is still compiling its
    // policies and binding its listeners, before its reload service has taken SIGHUP over.
    let a = mock("a", &[]).await;
    let mut p = spawn_proxy(
        free_port(),
        &chain_config(a.port, None, ""),
        &[("chain", CHAIN)],
        &[],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut hangups = 0;
    // Signalled again and again from its first log line until its files are watched.
    loop {
        if let Some(status) = p.exited() {
            panic!(
                "ended by SIGHUP number {hangups} during start-up ({status}):\n{}",
                p.output()
            );
        }
        let log = p.output();
        if log.contains("watching ") {
            break;
        }
        if log.contains("starting") {
            p.signal("HUP");
            hangups += 1;
        }
        assert!(Instant::now() < deadline, "not up in 15 s:\n{log}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(hangups > 0, "no SIGHUP was sent during start-up");
    wait_ready(&p.url("/v1/models")).await;
    let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(r.status(), 200);
    assert!(p.exited().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_504_moves_on_only_where_timeouts_may_be_retried() {
    for (extra, retried) in [("", false), ("    retry_on_timeout: true\n", true)] {
        let failing = mock("failing", &["--fail-rate", "1", "--fail-status", "504"]).await;
        let live = mock("live", &[]).await;
        let config = chain_config(failing.port, Some(live.port), extra);
        let p = proxy(&config, &[("chain", CHAIN)]).await;
        let r = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
        if retried {
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-switchyard-backend"], "second");
            assert_eq!(received(&live).await.len(), 1);
        } else {
            // The first backend may still be generating: its 504 is the answer.
            assert_eq!(r.status(), 504);
            assert_eq!(r.headers()["x-switchyard-backend"], "first");
            assert!(received(&live).await.is_empty(), "a 504 was retried");
        }
    }
}
