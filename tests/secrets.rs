//! No configured secret leaks. A proxy runs with every kind of secret it knows — backend
//! keys of each provider from the environment, tenant keys, the admin token, a Redis URL
//! with a password — through plain, streamed, refused, failing and rate-limited traffic and
//! the whole admin API; then everything it produced is searched for each secret: its log
//! (at debug level), the audit log, `/metrics`, every admin answer and every response a
//! client got.

mod common;

use common::*;

const UPSTREAM_OPENAI: &str = "sk-upstream-openai-5f1d2c9e7a";
const UPSTREAM_ANTHROPIC: &str = "sk-ant-upstream-8b3e6f0a41";
const CLIENT_KEY: &str = "sk-client-tenant-7c2a9d4e13";
const ADMIN_TOKEN: &str = "admin-token-3e8f1b6c52";
const REDIS_PASSWORD: &str = "redis-pass-9a4c7e2b06";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_appears_in_logs_metrics_audit_or_answers() {
    let openai = mock("openai", &[]).await;
    let anthropic = mock("anthropic", &[]).await;
    let admin = free_port();
    let (_refusing, dead_redis) = refusing_port();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\", token_env: SY_ADMIN_TOKEN }}\n\
         audit: {{ path: \"{}\" }}\n\
         redis: {{ url_env: SY_REDIS_URL, timeout_ms: 100 }}\n\
         routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\n\
         backends:\n\
         {}    api_key_env: SY_OPENAI_KEY\n    cost: {{ input: 1, output: 2 }}\n\
         {}    provider: anthropic\n    api_key_env: SY_ANTHROPIC_KEY\n\
         tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    limits: {{ rpm: 12 }}\n",
        audit.display(),
        backend("openai", openai.port, "[gpt-4o]"),
        backend("anthropic", anthropic.port, "[claude-3]"),
        sha256_hex(CLIENT_KEY.as_bytes()),
    );
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{dead_redis}/0");
    let p = proxy_with_env(
        &config,
        &[],
        &[
            ("SY_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SY_REDIS_URL", redis_url.as_str()),
            ("SY_OPENAI_KEY", UPSTREAM_OPENAI),
            ("SY_ANTHROPIC_KEY", UPSTREAM_ANTHROPIC),
            ("RUST_LOG", "trace,pingora=trace"),
        ],
    )
    .await;

    let mut seen = String::new();
    let keep = |r: reqwest::Response| {
        let head = format!("{:?}\n", r.headers());
        async move { head + &r.text().await.unwrap_or_default() }
    };
    let c = client();
    let chat = |body: serde_json::Value, key: &str, extra: Option<(&str, &str)>| {
        let mut req = c
            .post(p.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        if let Some((k, v)) = extra {
            req = req.header(k, v);
        }
        req.send()
    };
    // Plain, streamed, backend refusing our key (401), backend failing, wrong client key.
    for (body, extra) in [
        (chat_body("gpt-4o", "hello", false), None),
        (chat_body("gpt-4o", "hello", true), None),
        (
            chat_body("gpt-4o", "hello", false),
            Some(("x-mock-status", "401")),
        ),
        (
            chat_body("gpt-4o", "hello", false),
            Some(("x-mock-status", "500")),
        ),
    ] {
        seen += &keep(chat(body, CLIENT_KEY, extra).await.unwrap()).await;
    }
    seen += &keep(
        chat(chat_body("gpt-4o", "hi", false), "sk-wrong", None)
            .await
            .unwrap(),
    )
    .await;
    // Anthropic format, plain and streamed, with the key in x-api-key.
    for stream in [false, true] {
        let r = c
            .post(p.url("/v1/messages"))
            .header("x-api-key", CLIENT_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&serde_json::json!({
                "model": "claude-3", "max_tokens": 16, "stream": stream,
                "messages": [{ "role": "user", "content": "hello" }],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        seen += &keep(r).await;
    }
    // Over the rate limit (the limit counts locally: Redis is unreachable, fail-open).
    let mut limited = false;
    for _ in 0..12 {
        let r = chat(chat_body("gpt-4o", "x", false), CLIENT_KEY, None)
            .await
            .unwrap();
        limited |= r.status() == 429;
        seen += &keep(r).await;
    }
    assert!(limited, "the rpm limit never answered 429");

    // The whole admin API, with the token.
    let base = format!("http://127.0.0.1:{admin}");
    for path in [
        "/metrics",
        "/admin/config",
        "/admin/backends",
        "/admin/policies",
        "/admin/decisions",
        "/healthz",
        "/",
    ] {
        let r = c
            .get(format!("{base}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        seen += &keep(r).await;
    }
    let r = c
        .post(format!("{base}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    seen += &keep(r).await;

    // The secrets were really in use: the backends got their own keys.
    let got = received(&openai).await;
    assert!(
        got.iter()
            .any(|r| r["headers"]["authorization"] == format!("Bearer {UPSTREAM_OPENAI}")),
        "the OpenAI backend never got its key"
    );
    let got = received(&anthropic).await;
    assert!(got
        .iter()
        .any(|r| r["headers"]["x-api-key"] == UPSTREAM_ANTHROPIC));

    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // the audit writer
    let log = p.wait_log("redis unreachable").await; // the Redis failure path was exercised
    let audit = std::fs::read_to_string(&audit).unwrap();
    assert!(audit.lines().count() >= 20, "audit log too short");
    for (what, text) in [("log", &log), ("audit", &audit), ("answers", &seen)] {
        for secret in [
            UPSTREAM_OPENAI,
            UPSTREAM_ANTHROPIC,
            CLIENT_KEY,
            ADMIN_TOKEN,
            REDIS_PASSWORD,
        ] {
            assert!(
                !text.contains(secret),
                "the {what} contains the secret `{secret}`"
            );
        }
    }
}
