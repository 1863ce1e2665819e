//! The core proxy on the wire: the real binary in front of real mock backends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// A policy that tries backends in a fixed order given by the `order` header-free list.
const FIXED_ORDER: &str = r#"
local P = {}
function P.route(req, backends)
  return { "first", "second" }
end
return P
"#;

fn routes(policy: &str) -> String {
    format!("routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: {policy}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_streamed_completions_reach_the_client_intact() {
    let m = mock("m1", &["--chunks", "5"]).await;
    let p = proxy(
        &format!(
            "{}backends:\n{}",
            routes("round_robin"),
            backend("b1", m.port, "[gpt-test]")
        ),
        &[],
    )
    .await;

    let (status, headers, body) = chat(&p, &chat_body("gpt-test", "hello", false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-switchyard-backend"], "b1");
    assert!(!headers["x-request-id"].is_empty());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from m1 word1 word2"
    );

    let (status, headers, body) = chat(&p, &chat_body("gpt-test", "hello", true)).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events.len(),
        1 + 5 + 1,
        "role chunk, 5 content chunks, [DONE]: {body}"
    );
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let text: String = events[1..6]
        .iter()
        .map(|e| {
            let v: serde_json::Value =
                serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, "Hello from m1 word1 word2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_relayed_chunk_by_chunk() {
    let m = mock("slow", &["--chunks", "4", "--chunk-delay-ms", "250"]).await;
    let p = proxy(
        &format!(
            "{}backends:\n{}",
            routes("round_robin"),
            backend("b1", m.port, "[m]")
        ),
        &[],
    )
    .await;
    let started = Instant::now();
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut all = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push(started.elapsed());
        all.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(all.trim_end().ends_with("data: [DONE]"), "{all}");
    // The mock spaces 4 chunks 250 ms apart: the first must arrive long before the last.
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(
        arrivals.len() >= 4,
        "expected separate reads, got {}",
        arrivals.len()
    );
    assert!(
        last - first >= Duration::from_millis(600),
        "first {first:?}, last {last:?}: the stream was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_kib_prompt_reaches_the_backend_byte_for_byte_first_try_and_on_failover() {
    let (_refusing, dead_port) = refusing_port();
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let good = mock("good", &[]).await;
    let prompt = "lorem ipsum dolor sit amet ".repeat(200 * 1024 / 27);
    let body = serde_json::to_vec(&chat_body("m", &prompt, false)).unwrap();
    assert!(body.len() > 200 * 1024);
    let want = sha256_hex(&body);

    for (label, first_port) in [
        ("first try", good.port),
        ("after 503", failing.port),
        ("after connect refused", dead_port),
    ] {
        let config = format!(
            "{}backends:\n{}{}",
            routes("fixed_order"),
            backend("first", first_port, "[m]"),
            backend("second", good.port, "[m]")
        );
        let p = proxy(&config, &[("fixed_order", FIXED_ORDER)]).await;
        let r = post_chat_bytes(&p, body.clone(), &[]).await;
        assert_eq!(r.status(), 200, "{label}");
        assert_eq!(
            r.headers()["x-mock-body-sha256"],
            want.as_str(),
            "{label}: body changed on the way"
        );
        assert_eq!(r.headers()["x-mock-backend"], "good", "{label}");
    }
    // The 503 backend saw the same bytes once; the good one got each body exactly once per request.
    let seen_by_failing = received(&failing).await;
    assert_eq!(seen_by_failing.len(), 1);
    assert_eq!(seen_by_failing[0]["body_sha256"], want.as_str());
    let seen_by_good = received(&good).await;
    assert_eq!(seen_by_good.len(), 3);
    assert!(seen_by_good
        .iter()
        .all(|r| r["body_sha256"] == want.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_of_any_size_reach_the_backend_byte_for_byte_first_try_and_on_failover() {
    // Pingora's own replay buffer stops at 64 KiB: these bodies are under it, just over
    // it, and well over it, sent in 8 KiB chunks with no Content-Length.
    let (_refusing, dead_port) = refusing_port();
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let good = mock("good", &[]).await;
    let mut sent_to_failing = Vec::new();
    for (label, first_port, http2) in [
        ("first try", good.port, false),
        ("after 503", failing.port, false),
        ("after connect refused", dead_port, false),
        // Both backends over h2c: the body crosses from chunked HTTP/1.1 to HTTP/2.
        ("after 503, h2c backends", failing.port, true),
    ] {
        let backends = backends_over_http2(
            backend("first", first_port, "[m]") + &backend("second", good.port, "[m]"),
            http2,
        );
        let config = format!("{}backends:\n{backends}", routes("fixed_order"));
        let p = proxy(&config, &[("fixed_order", FIXED_ORDER)]).await;
        for kib in [40, 70, 2048] {
            let body = serde_json::to_vec(&chat_body("m", &"x".repeat(kib * 1024), false)).unwrap();
            let r = post_chat_bytes(&p, body_without_length(&body, 8 * 1024), &[]).await;
            assert_eq!(r.status(), 200, "{label}, {kib} KiB");
            assert_eq!(
                r.headers()["x-mock-body-sha256"],
                sha256_hex(&body).as_str(),
                "{label}, {kib} KiB: body changed on the way"
            );
            assert_eq!(r.headers()["x-mock-backend"], "good", "{label}, {kib} KiB");
            let version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
            assert_eq!(r.headers()["x-mock-http-version"], version, "{label}");
            if first_port == failing.port {
                sent_to_failing.push(sha256_hex(&body));
            }
        }
    }
    // The 503 backend got each body whole too, before the failover.
    assert_eq!(received_body_sha256s(&failing).await, sent_to_failing);
    assert_eq!(received(&good).await.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_200_kib_prompt_fails_over_and_streams_incrementally() {
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let good = mock("good", &["--chunks", "3", "--chunk-delay-ms", "200"]).await;
    let config = format!(
        "{}backends:\n{}{}",
        routes("fixed_order"),
        backend("first", failing.port, "[m]"),
        backend("second", good.port, "[m]")
    );
    let p = proxy(&config, &[("fixed_order", FIXED_ORDER)]).await;
    // The client asks for usage itself, so the body goes upstream byte for byte.
    let mut body = chat_body("m", &"y".repeat(200 * 1024), true);
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    let body = serde_json::to_vec(&body).unwrap();
    let started = Instant::now();
    let r = post_chat_bytes(&p, body.clone(), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-mock-body-sha256"],
        sha256_hex(&body).as_str()
    );
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(c) = stream.next().await {
        arrivals.push(started.elapsed());
        text.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert!(
        *arrivals.last().unwrap() - arrivals[0] >= Duration::from_millis(300),
        "{arrivals:?}"
    );
    // It did fail over: the first backend had the whole prompt first.
    assert_eq!(received_body_sha256s(&failing).await, [sha256_hex(&body)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_requests_evenly_over_3_backends() {
    let mocks = [
        mock("a", &[]).await,
        mock("b", &[]).await,
        mock("c", &[]).await,
    ];
    let config = format!(
        "{}backends:\n{}{}{}",
        routes("round_robin"),
        backend("a", mocks[0].port, "[m]"),
        backend("b", mocks[1].port, "[m]"),
        backend("c", mocks[2].port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..300 {
        let (status, headers, _) = chat(&p, &chat_body("m", "hi", false)).await;
        assert_eq!(status, 200);
        *counts.entry(served_by(&headers)).or_insert(0) += 1;
    }
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((95..=105).contains(&n), "{name} got {n} of 300: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_inflight_sends_new_requests_away_from_a_busy_backend() {
    let slow = mock("slow", &["--latency-ms", "600"]).await;
    let fast1 = mock("fast1", &[]).await;
    let fast2 = mock("fast2", &[]).await;
    let config = format!(
        "{}backends:\n{}{}{}",
        routes("least_inflight"),
        backend("slow", slow.port, "[m]"),
        backend("fast1", fast1.port, "[m]"),
        backend("fast2", fast2.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    // 8 clients, 25 requests each, concurrently.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = p.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut served = Vec::new();
            for _ in 0..25 {
                let r = c
                    .post(&url)
                    .json(&chat_body("m", "hi", false))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                served.push(served_by(r.headers()));
            }
            served
        }));
    }
    let mut total = 0;
    let mut to_slow = 0;
    for t in tasks {
        for name in t.await.unwrap() {
            total += 1;
            to_slow += (name == "slow") as usize;
        }
    }
    assert_eq!(total, 200);
    // Round robin would send ~67 there; least_inflight sends only while it is idle.
    assert!(to_slow <= 15, "slow backend got {to_slow} of 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_swapped_and_the_model_renamed_for_the_backend() {
    let m = mock("m1", &[]).await;
    let config = format!(
        "{}backends:\n  - name: b1\n    url: http://127.0.0.1:{}\n    models: {{ public-name: upstream-name }}\n    api_key_env: SWITCHYARD_TEST_BACKEND_KEY\n",
        routes("round_robin"),
        m.port
    );
    // At debug level, where Pingora's own lines quote heads and bodies: neither key nor
    // the answer may be written to the log.
    let p = proxy_with_env(
        &config,
        &[],
        &[
            ("SWITCHYARD_TEST_BACKEND_KEY", "sk-backend-123"),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .header("authorization", "Bearer sk-client-secret")
        .header("x-api-key", "client-key")
        .header("api-key", "client-key-2")
        .json(&chat_body("public-name", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = received(&m).await;
    let headers = &seen[0]["headers"];
    assert_eq!(headers["authorization"], "Bearer sk-backend-123");
    assert!(
        headers.get("x-api-key").is_none() && headers.get("api-key").is_none(),
        "{headers}"
    );
    assert_eq!(seen[0]["model"], "upstream-name");
    assert_eq!(
        headers["x-request-id"],
        r.headers()["x-request-id"].to_str().unwrap()
    );
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let answer: serde_json::Value = r.json().await.unwrap();
    let id = answer["id"].as_str().unwrap();
    // The access line is written after every line the request made (one queue, in order).
    p.access_line(&request_id).await;
    let log = p.output();
    for secret in ["sk-backend-123", "sk-client-secret", "client-key", id] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_get_the_openai_envelope() {
    let m = mock("m1", &[]).await;
    let p = proxy(
        &format!(
            "{}backends:\n{}",
            routes("round_robin"),
            backend("b1", m.port, "[m, other]")
        ),
        &[],
    )
    .await;
    let post = |body: &'static str| {
        let url = p.url("/v1/chat/completions");
        async move {
            let r = client()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let id = r.headers().get("x-request-id").is_some();
            (status, r.text().await.unwrap(), id)
        }
    };
    let (status, body, has_id) = post("{\n  \"model\": \"m\",\n  \"messages\": [ }").await;
    assert_eq!(status, 400);
    assert!(has_id);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 3, column"),
        "{body}"
    );

    let (status, body, _) = post(r#"{"model":"nobody-serves-this","messages":[]}"#).await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "model_not_found");
    assert!(!body.contains("other"), "never lists models: {body}");

    let (status, body, _) = post(r#"{"messages":[]}"#).await;
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["param"], "model");

    let (status, body, _) = post(r#"{"model":42,"messages":[]}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("`model` must be a string"), "{body}");
    let (status, body, _) = post(r#"{"model":"m","messages":"hi"}"#).await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["param"],
        "messages",
        "{body}"
    );

    // A body cut off just after an escape's backslash (it once crashed the handler).
    let (status, body, has_id) = post(r#"{"model":"m\"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(has_id);
    assert!(body.contains("line 1, column"), "{body}");

    // Nothing above reached the backend.
    assert!(received(&m).await.is_empty());

    let models: serde_json::Value = get_json(p.url("/v1/models")).await;
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m", "other"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_with_413() {
    let m = mock("m1", &[]).await;
    let p = proxy(
        &format!(
            "{}backends:\n{}",
            routes("round_robin"),
            backend("b1", m.port, "[m]")
        ),
        &[],
    )
    .await;
    // The default limit is 8 MiB.
    let body = serde_json::to_vec(&chat_body("m", &"z".repeat(9 * 1024 * 1024), false)).unwrap();
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match r {
        Ok(r) => {
            assert_eq!(r.status(), 413);
            assert_eq!(error_code(&r.text().await.unwrap()), "request_too_large");
        }
        // The proxy may answer and close while the client is still sending, and the client
        // then reports the failed send rather than the answer: the answer is in the log.
        Err(e) => {
            assert!(e.is_request() || e.is_body(), "{e}");
            p.wait_log("POST /v1/chat/completions status=413 ").await;
        }
    }
    assert!(received(&m).await.is_empty());
    // And the proxy serves on.
    let (status, _, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_pass_throughs_serve_and_the_policy_one_asks_the_policy() {
    // `switchyard bare` is what benches/load.sh and instructions.sh measure Switchyard
    // against: it must serve, and with `--config` route as the config's policy says.
    let first = mock("first", &["--chunks", "3"]).await;
    let second = mock("second", &["--chunks", "3"]).await;
    let upstreams = [first.port, second.port].map(|p| format!("127.0.0.1:{p}"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "bare",
        "--listen",
        &listen,
        "--upstream",
        &upstreams[0],
        "--upstream",
        &upstreams[1],
    ];
    let bare = spawn(&args, port, None, &[]);
    wait_ready(&bare.url("/health")).await;
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (status, headers, body) = chat(&bare, &chat_body("m", "hi", false)).await;
        assert_eq!(status, 200, "{body}");
        served.insert(headers["x-mock-backend"].to_str().unwrap().to_string());
    }
    assert_eq!(served.len(), 2, "round robin over both: {served:?}");

    let dir = tempfile::tempdir().unwrap();
    let policies = write_policies(
        dir.path(),
        &[("second_only", &FIXED_ORDER.replace("\"first\", ", ""))],
    );
    let config = dir.path().join("switchyard.yaml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "listen: [{{ addr: \"127.0.0.1:{port}\" }}]\npolicies_dir: {}\n{}backends:\n{}{}",
            policies.display(),
            routes("second_only"),
            backend("first", first.port, "[m]"),
            backend("second", second.port, "[m]")
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "bare",
        "--listen",
        &listen,
        "--config",
        config.to_str().unwrap(),
    ];
    let with_policy = spawn(&args, port, Some(dir), &[]);
    wait_ready(&with_policy.url("/health")).await;
    for stream in [false, true, false] {
        let (status, headers, body) = chat(&with_policy, &chat_body("m", "hi", stream)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-mock-backend"], "second", "the policy chose");
        if stream {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_bind_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let m = mock("m1", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
        backend("m1", m.port, "[m]")
    );
    let mut p = spawn_proxy(port, &config, &[], &[], &[]);
    let status = p
        .wait_exit(Duration::from_secs(10))
        .expect("the process ends instead of serving nothing");
    assert!(!status.success());
    let log = p.output();
    assert!(
        log.contains(&format!(
            "listen[0].addr: cannot listen on 127.0.0.1:{port}"
        )),
        "{log}"
    );
}
