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

/// A chat request through `proxy` with the API key `key`.
async fn post_as(proxy: &Proc, key: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A `redis-server` on a loopback port, without persistence, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    async fn start(port: u16) -> Redis {
        Redis::start_with(port, &[]).await
    }

    /// [`Redis::start`] with more `redis-server` arguments.
    async fn start_with(port: u16, extra: &[&str]) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                // DEBUG SLEEP stalls the server, as a Redis under load or a network
                // hiccup would.
                "--enable-debug-command",
                "local",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (tests/redis/setup.sh installs it)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.connection().await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis
    }

    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?
            .get_multiplexed_async_connection()
            .await
    }

    /// Requests of tenant `acme` in the shared one-minute window.
    async fn requests_counted(&self) -> u64 {
        self.requests_of("acme").await
    }

    /// Requests of `tenant` in the shared one-minute window.
    async fn requests_of(&self, tenant: &str) -> u64 {
        self.entries(tenant, "req").await
    }

    /// Concurrency slots of `tenant` held in Redis.
    async fn slots_held(&self, tenant: &str) -> u64 {
        self.entries(tenant, "conc").await
    }

    /// Entries of `tenant`'s sorted set `what` (`req`, `conc`).
    async fn entries(&self, tenant: &str, what: &str) -> u64 {
        let mut c = self.connection().await.unwrap();
        redis::cmd("ZCARD")
            .arg(format!("switchyard:{{{tenant}}}:{what}"))
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Tenant `acme`'s spend of today, in nano-USD.
    async fn spent_today(&self) -> i64 {
        let day = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            / 86_400_000;
        let mut c = self.connection().await.unwrap();
        redis::cmd("GET")
            .arg(format!("switchyard:{{acme}}:usd:{day}"))
            .query_async::<Option<i64>>(&mut c)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    /// Stall the server for `seconds`, from `redis-cli` (the crate's client gives up on a
    /// command after half a second): the child exits when the server answers again.
    /// Returns once the server has stopped answering.
    async fn stall(&self, seconds: f64) -> Child {
        let mut c = self.connection().await.unwrap();
        let mut child = Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "DEBUG",
                "SLEEP",
                &seconds.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-cli (tests/redis/setup.sh installs it with redis-server)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let ping = redis::cmd("PING");
            let answer = ping.query_async::<String>(&mut c);
            if tokio::time::timeout(Duration::from_millis(50), answer)
                .await
                .is_err()
            {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("DEBUG SLEEP never stalled redis");
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

/// A config of one mock backend (`backend_extra`: more of its YAML lines), tenant `acme`
/// with `limits`, more `tenants` entries, and `redis` (the flow map's inside).
fn config(mock_port: u16, backend_extra: &str, limits: &str, tenants: &str, redis: &str) -> String {
    format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{backend_extra}tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    limits: {limits}\n{tenants}redis: {{ {redis} }}\n",
        backend("m1", mock_port, "[llama-3]"),
        sha256_hex(KEY.as_bytes()),
    )
}

/// A fleet's parts: Redis (installed, started on a free port), one mock backend, and the
/// [`config`] of them with `redis` as the rest of its flow map after the URL.
struct Fleet {
    redis: Redis,
    redis_port: u16,
    mock: Proc,
    config: String,
}

async fn fleet(backend_extra: &str, limits: &str, tenants: &str, redis: &str) -> Fleet {
    install_redis();
    let redis_port = free_port();
    let redis_server = Redis::start(redis_port).await;
    let mock = mock("m1", &[]).await;
    let config = config(
        mock.port,
        backend_extra,
        limits,
        tenants,
        &format!("url: \"redis://127.0.0.1:{redis_port}\", {redis}"),
    );
    Fleet {
        redis: redis_server,
        redis_port,
        mock,
        config,
    }
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
    let Fleet {
        mut redis,
        redis_port,
        config,
        mock: _mock,
    } = fleet("", "{ rpm: 100 }", "", "timeout_ms: 300").await;
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
    let (_refusing, dead) = refusing_port();
    let config = config(
        m.port,
        "",
        "{ rpm: 100 }",
        &format!(
            "  - name: free\n    key_sha256: [\"{}\"]\n",
            sha256_hex(b"sk-free")
        ),
        &format!("url: \"redis://127.0.0.1:{dead}\", on_failure: closed, timeout_ms: 100"),
    );
    let p = proxy(&config, &[]).await;
    let body = chat_body("llama-3", "hi", false);
    for _ in 0..2 {
        let r = post_as(&p, KEY, &body).await;
        assert_eq!(r.status(), 503);
        assert!(r.headers().get("retry-after").is_some());
        assert_eq!(error_code(&r.text().await.unwrap()), "limits_unavailable");
    }
    // A tenant without limits does not need Redis.
    let r = post_as(&p, "sk-free", &body).await;
    assert_eq!(r.status(), 200);
    p.wait_log("fail-closed").await;
    assert!(
        received(&m).await.len() == 1,
        "a refused request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_redis_ran_after_its_answer_timed_out_is_not_counted_twice() {
    // $1000 per million tokens: a request reserving ~1 000 tokens reserves ~$1.
    let Fleet {
        redis,
        config,
        mock: _mock,
        ..
    } = fleet(
        "    cost: { input: 1000, output: 1000 }\n",
        "{ usd_per_day: 100 }",
        "",
        "timeout_ms: 200",
    )
    .await;
    let p = proxy(&config, &[]).await;

    // Redis stalls for a second; the admission is sent meanwhile, its answer times out, and
    // the instance counts the request on its own counters (fail-open). Redis then runs the
    // admission it had received, and later gets the instance's replay of the same request.
    let mut body = chat_body("llama-3", "hi", false);
    body["max_tokens"] = serde_json::json!(1000);
    let send = || async {
        let r = post_as(&p, KEY, &body).await;
        assert_eq!(r.status(), 200);
        let answer: serde_json::Value = r.json().await.unwrap();
        answer["usage"]["prompt_tokens"].as_i64().unwrap()
            + answer["usage"]["completion_tokens"].as_i64().unwrap()
    };
    // One request first, so Redis has the scripts: the stalled call is then one Redis
    // runs as it is (a first call would only learn that the script is not loaded yet).
    let mut used = send().await;
    let mut stalled = redis.stall(1.5).await;
    used += send().await;
    assert!(stalled.wait().unwrap().success(), "DEBUG SLEEP failed");
    p.wait_log("redis unreachable").await;
    p.wait_log("redis reachable again").await;

    // What the request cost, once: $1000 per million tokens is 1e6 nano-USD a token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spent = redis.spent_today().await;
        if spent == used * 1_000_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spend {spent} nano-USD, the request cost {}",
            used * 1_000_000
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_whose_answer_was_lost_for_a_refused_request_gives_its_slot_back() {
    let Fleet {
        redis,
        config,
        mock: _mock,
        ..
    } = fleet(
        "",
        "{ concurrent: 1, rpm: 100 }",
        "",
        "on_failure: closed, timeout_ms: 200",
    )
    .await;
    let p = proxy(&config, &[]).await;
    let body = chat_body("llama-3", "hi", false);
    // One request first, so Redis has the scripts loaded.
    assert_eq!(post_as(&p, KEY, &body).await.status(), 200);
    // Redis stalls: the admission's answer times out and the request is refused
    // (fail-closed), but Redis runs the admission once it wakes, taking the one slot.
    let mut stalled = redis.stall(1.5).await;
    let r = post_as(&p, KEY, &body).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r.text().await.unwrap()), "limits_unavailable");
    assert!(stalled.wait().unwrap().success(), "DEBUG SLEEP failed");
    p.wait_log("redis reachable again").await;
    // The slot was given back: the tenant is not locked out for `lease_seconds`.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post_as(&p, KEY, &body).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
        assert!(
            Instant::now() < deadline,
            "the lost admission's slot is still held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nor does the refused request count toward the minute's requests: the two served
    // do (a 429 at admission never does).
    assert_eq!(redis.requests_counted().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_redis_refuses_on_replay_is_dropped_and_the_rest_are_replayed() {
    install_redis();
    // A snapshot in which tenant acme's request window is a string, not a sorted set:
    // Redis refuses every script that counts an acme request (WRONGTYPE).
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_string();
    {
        let seed = Redis::start_with(
            free_port(),
            &["--dir", &dir_arg, "--dbfilename", "seed.rdb"],
        )
        .await;
        let mut c = seed.connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("switchyard:{acme}:req")
            .arg("not a window")
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("SAVE").query_async(&mut c).await.unwrap();
    }
    let beta = format!(
        "  - name: beta\n    key_sha256: [\"{}\"]\n    limits: {{ rpm: 100 }}\n",
        sha256_hex(b"sk-beta")
    );
    let Fleet {
        mut redis,
        redis_port,
        config,
        mock: _mock,
    } = fleet("", "{ rpm: 100 }", &beta, "timeout_ms: 300").await;
    let p = proxy(&config, &[]).await;
    let body = chat_body("llama-3", "hi", false);
    for key in [KEY, "sk-beta"] {
        assert_eq!(post_as(&p, key, &body).await.status(), 200);
    }

    // Redis goes away; both tenants are counted here meanwhile, acme's requests first.
    redis.stop();
    for key in [KEY, KEY, "sk-beta", "sk-beta", "sk-beta"] {
        assert_eq!(post_as(&p, key, &body).await.status(), 200);
    }
    p.wait_log("redis unreachable").await;

    // It comes back from the snapshot: acme's counts are refused, one by one, and dropped;
    // beta's, journalled behind them, still reach it.
    let redis =
        Redis::start_with(redis_port, &["--dir", &dir_arg, "--dbfilename", "seed.rdb"]).await;
    p.wait_log("redis reachable again").await;
    assert!(
        p.output().contains("redis refused a limit script"),
        "{}",
        p.output()
    );
    assert_eq!(redis.requests_of("beta").await, 3);
    // And the instance counts on Redis again: beta's next request is the fourth there.
    assert_eq!(post_as(&p, "sk-beta", &body).await.status(), 200);
    assert_eq!(redis.requests_of("beta").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequential_client_going_from_instance_to_instance_finds_its_slot_free() {
    // Redis calls get 5 s: a slow call on a busy machine must not be taken for an outage
    // (which would journal the release and hold the slot meanwhile).
    let Fleet {
        redis,
        config,
        mock: _mock,
        ..
    } = fleet("", "{ concurrent: 1 }", "", "timeout_ms: 5000").await;
    let config = config.replace("policy: round_robin", "policy: shed");
    let shed = r#"
local P = {}
function P.route(req, backends)
  if req.header("x-shed") then return nil, 503, "shed" end
  return backends[1].name
end
return P
"#;
    for http2 in [false, true] {
        let config = backends_over_http2(config.clone(), http2);
        let a = proxy(&config, &[("shed", shed)]).await;
        let b = proxy(&config, &[("shed", shed)]).await;
        // One request at a time, each to the other instance than the last: plain,
        // streamed, and refused by the policy after admission. The slot is free in Redis
        // by the time the client has its answer (it was released after the answer ended,
        // and the next request often found it held).
        for i in 0..60 {
            let p = if i % 2 == 0 { &a } else { &b };
            let mut req = client()
                .post(p.url("/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&chat_body("llama-3", "hi", i % 4 >= 2));
            let refused = i % 5 == 4;
            if refused {
                req = req.header("x-shed", "1");
            }
            let r = req.send().await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            let at = format!("request {i} (h2c backend: {http2})");
            assert_eq!(status, if refused { 503 } else { 200 }, "{at}: {text}");
            assert_eq!(redis.slots_held("acme").await, 0, "{at}");
        }
    }
}
