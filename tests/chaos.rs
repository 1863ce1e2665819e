//! Whole-fleet behaviour under trouble: a chaos run, a graceful binary upgrade under load,
//! draining, and waiting for capacity.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_no_request_that_could_be_served() {
    let restart_port = free_port();
    let mut flaky = mock_on(restart_port, "flaky", &[]).await;
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let limited = mock(
        "limited",
        &["--rate-limit-rate", "0.5", "--retry-after-s", "1"],
    )
    .await;
    let healthy = mock("healthy", &[]).await;
    // Generous retry budget and attempts: with three of four backends in trouble, saving
    // every request takes retries (FAULTS: the budget is for a failing fleet, not this).
    let config = format!(
        "health: {{ interval_ms: 100, timeout_ms: 200, rise: 1, fall: 1 }}\noutlier: {{ consecutive_failures: 2, base_ejection_ms: 500, max_ejected_percent: 75 }}\nproxy: {{ threads: 2, grace_period_seconds: 0, retry_budget_percent: 400 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\n    max_attempts: 4\nbackends:\n{}{}{}{}",
        backend("flaky", restart_port, "[m]"),
        backend("failing", failing.port, "[m]"),
        backend("limited", limited.port, "[m]"),
        backend("healthy", healthy.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let load = Load::start(p.url("/v1/chat/completions"), 4, usize::MAX);
    tokio::time::sleep(Duration::from_millis(500)).await;
    flaky.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = mock_on(restart_port, "flaky", &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let LoadResult {
        ok, errors, served, ..
    } = load.finish().await;
    assert!(ok > 200, "the load ran: {ok}");
    assert!(
        errors.is_empty(),
        "{} client-visible errors of {}: {:?}",
        errors.len(),
        ok + errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        !served.iter().any(|b| b == "failing"),
        "the 503 backend never served"
    );
    assert!(
        !received(&restarted).await.is_empty(),
        "the restarted backend gets traffic again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_refuses_no_connection() {
    let a = mock("a", &[]).await;
    let port = free_port();
    let config = format!(
        "proxy: {{ threads: 2, grace_period_seconds: 2 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
        backend("a", a.port, "[m]")
    );
    let mut old = proxy_on(port, &config, &[], &[], &[]).await;
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let load = Load::start(url.clone(), 4, usize::MAX);
    // And two clients that open a new connection for every request and send it 50 ms
    // after connecting (a client one round trip away), so connections are accepted, and
    // requests on their way, all through the handover (bounded: 10 s at most).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fresh: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let body = serde_json::to_string(&chat_body("m", "hi", false)).unwrap();
                let request = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let until = Instant::now() + Duration::from_secs(10);
                let (mut ok, mut errors) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    let exchange = async {
                        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        s.write_all(request.as_bytes()).await?;
                        let mut answer = Vec::new();
                        s.read_to_end(&mut answer).await?;
                        Ok::<_, std::io::Error>(answer)
                    };
                    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                        Ok(Ok(a)) if a.starts_with(b"HTTP/1.1 200 ") => ok += 1,
                        Ok(Ok(a)) => errors.push(format!(
                            "answer {:?}",
                            String::from_utf8_lossy(&a[..a.len().min(60)])
                        )),
                        Ok(Err(e)) => errors.push(format!("{e}")),
                        Err(_) => errors.push("no answer in 5 s".into()),
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The new process waits on the upgrade socket for the old one's listeners.
    let _new = proxy_on(port, &config, &[], &[], &["--upgrade"]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    old.signal("QUIT");
    assert!(
        old.wait_exit(Duration::from_secs(15)).is_some(),
        "the old process hands over and exits"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let LoadResult { ok, errors, .. } = load.finish().await;
    assert!(ok > 100, "{ok}");
    assert!(
        errors.is_empty(),
        "{} errors during the upgrade: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    for client in fresh {
        let (ok, errors) = client.await.unwrap();
        assert!(ok > 20, "{ok} requests on new connections");
        assert!(
            errors.is_empty(),
            "{} errors on new connections during the upgrade: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_stops_new_traffic_while_in_flight_requests_finish() {
    let a = mock("a", &["--latency-ms", "600"]).await;
    let b = mock("b", &[]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}",
        backend("a", a.port, "[m]"),
        backend("b", b.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    // Put a slow request in flight on `a`.
    let mut slow = None;
    for _ in 0..2 {
        let t = chat_in_background(&p);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if mock_stats(&a).await["inflight"] == 1 {
            slow = Some(t);
            break;
        }
        assert_eq!(t.await.unwrap().status(), 200);
    }
    let slow = slow.expect("one request went to a");
    set_draining(admin, "a", true).await;
    for _ in 0..10 {
        let (status, headers, _) = chat(&p, &chat_body("m", "hi", false)).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-switchyard-backend"], "b");
    }
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 200, "the in-flight request finished");
    assert_eq!(r.headers()["x-switchyard-backend"], "a");
    set_draining(admin, "a", false).await;
    let mut served = std::collections::HashSet::new();
    for _ in 0..4 {
        let (_, headers, _) = chat(&p, &chat_body("m", "hi", false)).await;
        served.insert(served_by(&headers));
    }
    assert!(served.contains("a"));
}

/// One backend `a` that takes one request at a time, behind a route whose queue holds 4
/// for `queue_timeout_ms`.
async fn one_at_a_time(a: &Proc, queue_timeout_ms: u64) -> Proc {
    one_at_a_time_with(a, queue_timeout_ms, "").await
}

/// [`one_at_a_time`], with `extra` config lines first.
async fn one_at_a_time_with(a: &Proc, queue_timeout_ms: u64, extra: &str) -> Proc {
    let config = format!(
        "{extra}routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\n    queue_max: 4\n    queue_timeout_ms: {queue_timeout_ms}\nbackends:\n{}    max_inflight: 1\n",
        backend("a", a.port, "[m]")
    );
    proxy(&config, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_capacity_then_get_503_with_retry_after() {
    let a = mock("a", &["--latency-ms", "300"]).await;
    let p = one_at_a_time(&a, 2000).await;
    // Three at once on a backend that takes one: they queue and all succeed, one by one.
    let started = Instant::now();
    let tasks: Vec<_> = (0..3).map(|_| chat_in_background(&p)).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status(), 200);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "served one at a time"
    );

    // With a short queue timeout, the waiting request gives up with 503 and Retry-After,
    // and its audit record says why: its one backend was full. (The audit goes to a file:
    // a port of its own for the admin API could be taken by this binary's other tests'
    // client connections between `free_port` and the proxy's bind.)
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let audit = format!("audit: {{ path: \"{}\" }}\n", log.display());
    let p = one_at_a_time_with(&a, 100, &audit).await;
    let first = chat_in_background(&p);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(first.await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(&id)) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no audit line for {id}: {text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["status"], 503);
    assert_eq!(
        record["skipped"],
        serde_json::json!([{ "backend": "a", "reason": "at max_inflight" }]),
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_whose_client_left_never_reaches_a_backend() {
    let a = mock("a", &["--latency-ms", "800"]).await;
    let p = one_at_a_time(&a, 5000).await;
    let first = chat_in_background(&p);
    // The first holds the only slot (the mock has it) before the second comes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while received(&a).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The second waits for the first's slot; its client gives up before it frees.
    let gave_up = client()
        .post(p.url("/v1/chat/completions"))
        .header("x-request-id", "left-the-queue")
        .timeout(Duration::from_millis(300))
        .json(&chat_body("m", "hi", false))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    assert_eq!(first.await.unwrap().status(), 200);
    let line = p.access_line("left-the-queue").await;
    // Logged when the client left, and the freed slot never went to it: no attempt.
    assert!(
        line.contains("status=499") && line.contains("attempts=[]"),
        "{line}"
    );
    assert_eq!(received(&a).await.len(), 1);
}
