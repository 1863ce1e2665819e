//! Limits that hold across a fleet: two Switchyard processes share a real `redis-server`
//! (Debian's, installed by `tests/redis/setup.sh` and started here on a loopback port), so
//! a tenant's requests per minute are counted once whichever instance they reach. With
//! Redis stopped, both keep serving on their own counters (fail-open) and say so; when it is
//! back, what they counted meanwhile is replayed into it.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "sk-fleet";

/// A `redis-server` on a loopback port, without persistence, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    async fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (tests/redis/setup.sh installs it)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap()
    }

    /// Requests of tenant `acme` in the shared one-minute window.
    async fn requests_counted(&self) -> u64 {
        let mut c = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("ZCARD")
            .arg("switchyard:{acme}:req")
            .query_async(&mut c)
            .await
            .unwrap()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn install_redis() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/redis/setup.sh");
    let status = Command::new("bash").arg(script).status().unwrap();
    assert!(status.success(), "tests/redis/setup.sh failed ({status})");
}

/// Send `n` requests, alternating between the two instances, 6 at a time; how many
/// got 200 (everything else must be a 429 from the limit). All carry the same
/// `x-request-id`, as retries of one client may: each must still count.
async fn send(a: &Proc, b: &Proc, n: usize) -> usize {
    let body = chat_body("llama-3", "hi", false);
    let mut ok = 0;
    for batch in (0..n).collect::<Vec<_>>().chunks(6) {
        let calls = batch.iter().map(|i| {
            let p = if i % 2 == 0 { a } else { b };
            client()
                .post(p.url("/v1/chat/completions"))
                .bearer_auth(KEY)
                .header("x-request-id", "one-id-for-all")
                .json(&body)
                .send()
        });
        for r in futures::future::join_all(calls).await {
            match r.expect("the proxy answers").status().as_u16() {
                200 => ok += 1,
                429 => {}
                s => panic!("unexpected status {s}"),
            }
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_enforce_one_limit_through_redis_and_fail_open_without_it() {
    install_redis();
    let redis_port = free_port();
    let mut redis = Redis::start(redis_port).await;
    let m = mock("m1", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    limits: {{ rpm: 100 }}\nredis: {{ url: \"redis://127.0.0.1:{redis_port}\", timeout_ms: 300 }}\n",
        backend("m1", m.port, "[llama-3]"),
        sha256_hex(KEY.as_bytes()),
    );
    let a = proxy(&config, &[]).await;
    let b = proxy(&config, &[]).await;

    // 300 requests over both instances: the shared limit lets exactly 100 through.
    assert_eq!(send(&a, &b, 300).await, 100);
    assert_eq!(redis.requests_counted().await, 100);

    // Redis goes away: both instances keep serving on their own counters, and say so.
    redis.stop();
    assert_eq!(send(&a, &b, 20).await, 20, "fail-open should keep serving");
    for p in [&a, &b] {
        p.wait_log("redis unreachable").await;
        assert!(p.output().contains("fail-open"), "{}", p.output());
    }

    // Redis is back (empty: no persistence). What the instances counted meanwhile is
    // replayed into it, so the fleet's window holds those 20 and 80 more get through.
    let redis = Redis::start(redis_port).await;
    for p in [&a, &b] {
        p.wait_log("redis reachable again").await;
    }
    assert_eq!(redis.requests_counted().await, 20);
    assert_eq!(send(&a, &b, 120).await, 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_limited_tenants_while_redis_is_unreachable() {
    let m = mock("m1", &[]).await;
    let dead = free_port();
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    limits: {{ rpm: 100 }}\n  - name: free\n    key_sha256: [\"{}\"]\nredis: {{ url: \"redis://127.0.0.1:{dead}\", on_failure: closed, timeout_ms: 100 }}\n",
        backend("m1", m.port, "[llama-3]"),
        sha256_hex(KEY.as_bytes()),
        sha256_hex(b"sk-free"),
    );
    let p = proxy(&config, &[]).await;
    let body = chat_body("llama-3", "hi", false);
    for _ in 0..2 {
        let r = client()
            .post(p.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().get("retry-after").is_some());
        assert_eq!(error_code(&r.text().await.unwrap()), "limits_unavailable");
    }
    // A tenant without limits does not need Redis.
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth("sk-free")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    p.wait_log("fail-closed").await;
    assert!(
        received(&m).await.len() == 1,
        "a refused request reached the backend"
    );
}
