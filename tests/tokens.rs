//! The prompt-token estimate on the wire: what a policy reads as `req.tokens` and what a
//! tenant's token limit reserves are the estimator's count of the prompt text — checked
//! against `o200k_base` (tiktoken-rs) for a Chinese and an English prompt, where
//! characters / 4 would be off by ~3× and ~7 %.

mod common;

use common::*;
use serde_json::json;

use switchyard::tokens::estimate;

/// Routes to `long` when `req.tokens` ≥ `params.at`, else to `short`.
const BY_TOKENS: &str = r#"
local P = { name = "by_tokens" }
function P.route(req, backends)
  if req.tokens >= req.params.at then return { "long" } end
  return { "short" }
end
return P
"#;

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/data/tokens/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The estimate of `text`, after checking it is within 5 % of `o200k_base`'s count.
fn checked_estimate(text: &str) -> u64 {
    let estimated = estimate(text);
    let o200k = tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as f64;
    let ratio = estimated as f64 / o200k;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "estimate {estimated}, o200k {o200k}"
    );
    estimated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reads_the_estimate_as_req_tokens() {
    let (long, short) = (mock("long", &[]).await, mock("short", &[]).await);
    let mut config = String::from("routes:\n");
    // The same prompt sent as model `at-N` meets a threshold of exactly its estimate N,
    // as `above-N` one token more.
    let prompts = [fixture("zh.txt"), fixture("en-prose.txt")];
    let estimates: Vec<u64> = prompts.iter().map(|p| checked_estimate(p)).collect();
    for n in &estimates {
        for (model, at) in [("at", *n), ("above", n + 1)] {
            config.push_str(&format!(
                "  - match: {{ model: \"{model}-{n}\" }}\n    policy: by_tokens\n    params: {{ at: {at} }}\n"
            ));
        }
    }
    let models: Vec<String> = estimates
        .iter()
        .flat_map(|n| [format!("at-{n}"), format!("above-{n}")])
        .collect();
    let models = format!("[{}]", models.join(", "));
    config.push_str("backends:\n");
    config.push_str(&backend("long", long.port, &models));
    config.push_str(&backend("short", short.port, &models));
    let p = proxy(&config, &[("by_tokens", BY_TOKENS)]).await;

    for (prompt, n) in prompts.iter().zip(&estimates) {
        let chars = prompt.chars().count().div_ceil(4) as u64;
        assert_ne!(chars, *n, "characters / 4 would pass this test too");
        for (model, want) in [("at", "long"), ("above", "short")] {
            let (status, h, body) =
                chat(&p, &chat_body(&format!("{model}-{n}"), prompt, false)).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(served_by(&h), want, "{model}-{n}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limit_reserves_the_estimate_plus_max_tokens() {
    let m = mock("m1", &[]).await;
    let key = "sk-tokens";
    let config = format!(
        "routes:\n  - policy: round_robin\nbackends:\n{}tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    limits: {{ tpm: 100000 }}\n",
        backend("m1", m.port, "[m]"),
        sha256_hex(key.as_bytes()),
    );
    let p = proxy(&config, &[]).await;
    let system = fixture("en-prose.txt");
    let user = fixture("zh.txt");
    let body = json!({
        "model": "m",
        "max_tokens": 100,
        "messages": [
            { "role": "system", "content": system },
            { "role": "user", "content": [{ "type": "text", "text": user }] },
        ],
    });
    // The whole prompt's estimate: both texts, rounded once.
    let mut prompt = switchyard::tokens::TokenEstimate::default();
    prompt.add(&system);
    prompt.add(&user);
    let prompt = prompt.tokens();
    let apart = checked_estimate(&system) + checked_estimate(&user);
    assert!(prompt <= apart && apart <= prompt + 1);

    let r = client()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let remaining: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 100_000 - (prompt + 100));
}
