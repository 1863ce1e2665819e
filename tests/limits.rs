//! Tenant limits on one instance: requests, tokens and concurrency per tenant, the daily
//! budget, the 429s they give with `Retry-After` and `x-ratelimit-*`, and the settlement of
//! reservations to the usage a backend reports — streamed usage included, which Switchyard
//! asks for on the client's behalf and takes out of the client's stream.

mod common;

use common::*;
use reqwest::header::HeaderMap;

const KEY: &str = "sk-limited";

/// A proxy over one mock whose only tenant has `limits` (a YAML flow map) and whose
/// backend has `cost` (a YAML flow map).
async fn setup(limits: &str, cost: &str) -> (Proc, Proc) {
    setup_backend("m1", "[llama-3]", &format!("    cost: {cost}\n"), limits).await
}

/// A proxy over one mock `name` serving `models`, with `extra` lines of its backend
/// entry, whose only tenant has `limits`.
async fn setup_backend(name: &str, models: &str, extra: &str, limits: &str) -> (Proc, Proc) {
    let m = mock(name, &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{extra}tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    limits: {limits}\n",
        backend(name, m.port, models),
        sha256_hex(KEY.as_bytes()),
    );
    let p = proxy(&config, &[]).await;
    (m, p)
}

/// POST a raw JSON body with the tenant's key; (status, headers, body).
async fn post(p: &Proc, body: &str, extra: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    post_to(p, "/v1/chat/completions", body, extra).await
}

async fn post_to(
    p: &Proc,
    path: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, HeaderMap, String) {
    let mut req = client()
        .post(p.url(path))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
        .to_str()
        .unwrap()
        .to_string()
}

fn number(h: &HeaderMap, name: &str) -> i64 {
    header(h, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

const PLAIN: &str =
    r#"{"model":"llama-3","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_count_down_then_429_without_reaching_the_backend() {
    let (m, p) = setup("{ rpm: 3 }", "{ input: 0, output: 0 }").await;
    for left in [2, 1, 0] {
        let (status, h, body) = post(&p, PLAIN, &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(number(&h, "x-ratelimit-limit-requests"), 3);
        assert_eq!(number(&h, "x-ratelimit-remaining-requests"), left);
    }
    let (status, h, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&body), "rate_limit_exceeded");
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    assert!((55..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(number(&h, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(
        header(&h, "x-ratelimit-reset-requests"),
        format!("{retry}s")
    );
    assert!(h.get("x-switchyard-backend").is_none());
    assert_eq!(
        received(&m).await.len(),
        3,
        "the refused request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_backend_could_serve_is_refused_for_that_and_not_counted() {
    let (_m, p) = setup("{ rpm: 1 }", "{ input: 0, output: 0 }").await;
    let unknown = PLAIN.replace("llama-3", "no-such-model");
    for _ in 0..2 {
        let (status, _, body) = post(&p, &unknown, &[]).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(error_code(&body), "model_not_found");
    }
    // The tenant's one request a minute is still there.
    let (status, h, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(number(&h, "x-ratelimit-remaining-requests"), 0);
    let (status, _, body) = post(&p, &unknown, &[]).await;
    assert_eq!(status, 404, "a 404 stays a 404 once over the limit: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_reservation_lets_exactly_one_of_two_concurrent_requests_through() {
    // One request reserves its prompt estimate + max_tokens (100): a bit over 100 tokens.
    let (m, p) = setup("{ tpm: 150 }", "{ input: 0, output: 0 }").await;
    let slow = [("x-mock-latency-ms", "600")];
    let (a, b) = tokio::join!(post(&p, PLAIN, &slow), post(&p, PLAIN, &slow));
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 429], "{} / {}", a.2, b.2);
    let (ok, refused) = if a.0 == 200 { (a, b) } else { (b, a) };
    let reserved = 150 - number(&ok.1, "x-ratelimit-remaining-tokens");
    assert!(reserved > 100 && reserved <= 150, "reserved {reserved}");
    assert_eq!(error_code(&refused.2), "rate_limit_exceeded");
    assert_eq!(number(&refused.1, "x-ratelimit-limit-tokens"), 150);
    assert!(refused.1.get("retry-after").is_some());
    assert_eq!(received(&m).await.len(), 1);

    // Settled to the reported usage (a few tokens), the next one fits at once.
    let (status, _, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 200, "{body}");
    // A request that can never fit says so.
    let huge = PLAIN.replace("\"max_tokens\":100", "\"max_tokens\":1000");
    let (status, h, body) = post(&p, &huge, &[]).await;
    assert_eq!(status, 429);
    assert!(body.contains("request too large"), "{body}");
    assert_eq!(error_code(&body), "rate_limit_exceeded");
    // Retrying cannot help: no Retry-After, and OpenAI's SDKs are told not to.
    assert!(h.get("retry-after").is_none(), "{h:?}");
    assert_eq!(header(&h, "x-should-retry"), "false");
    assert_eq!(number(&h, "x-ratelimit-limit-tokens"), 150);
    // Two completions of up to 100 tokens each reserve 200: never within 150 either.
    let two = PLAIN.replace("\"max_tokens\":100", "\"max_tokens\":100,\"n\":2");
    assert_ne!(two, PLAIN);
    let (status, h, body) = post(&p, &two, &[]).await;
    assert_eq!(status, 429);
    assert!(body.contains("request too large"), "{body}");
    assert!(h.get("retry-after").is_none(), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_fits_is_told_so_whichever_limit_refuses_it_first() {
    // The minute's one request is used: the next is refused by `rpm` before its tokens are
    // looked at, yet one reserving more than `tpm` could never pass and must say so.
    let (_m, p) = setup("{ rpm: 1, tpm: 150 }", "{ input: 0, output: 0 }").await;
    let (status, _, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, h, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("requests per minute"), "{body}");
    assert!(h.get("retry-after").is_some(), "{h:?}");
    let huge = PLAIN.replace("\"max_tokens\":100", "\"max_tokens\":1000");
    let (status, h, body) = post(&p, &huge, &[]).await;
    assert_eq!(status, 429);
    assert!(body.contains("request too large"), "{body}");
    assert!(h.get("retry-after").is_none(), "{h:?}");
    assert_eq!(header(&h, "x-should-retry"), "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_capped_and_released() {
    let (_m, p) = setup("{ concurrent: 1 }", "{ input: 0, output: 0 }").await;
    let slow = [("x-mock-latency-ms", "600")];
    let (a, b) = tokio::join!(post(&p, PLAIN, &slow), post(&p, PLAIN, &slow));
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 429]);
    let refused = if a.0 == 429 { &a } else { &b };
    assert_eq!(error_code(&refused.2), "rate_limit_exceeded");
    let retry: u64 = header(&refused.1, "retry-after").parse().unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    assert_eq!(number(&refused.1, "x-ratelimit-limit-concurrent"), 1);
    assert_eq!(number(&refused.1, "x-ratelimit-remaining-concurrent"), 0);
    // Both finished: the slot is free again.
    assert_eq!(post(&p, PLAIN, &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_is_settled_and_the_client_sees_only_what_it_asked_for() {
    let (m, p) = setup("{ tpm: 100000 }", "{ input: 0, output: 0 }").await;
    let asked_none = r#"{"model":"llama-3","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"tell me"}]}"#;
    // What the backend must get: the same body, asking for usage.
    let asked_usage = format!(
        "{},\"stream_options\":{{\"include_usage\":true}}}}",
        &asked_none[..asked_none.len() - 1]
    );

    let (status, h, stream) = post(&p, asked_none, &[]).await;
    assert_eq!(status, 200);
    let reserved = 100_000 - number(&h, "x-ratelimit-remaining-tokens");
    assert!(stream.contains("data: [DONE]"), "{stream}");
    assert!(
        !stream.contains("usage"),
        "the client did not ask for usage but got it:\n{stream}"
    );
    let sent = received(&m).await;
    assert_eq!(
        sent[0]["body_sha256"],
        sha256_hex(asked_usage.as_bytes()),
        "the backend was not asked for the usage chunk"
    );

    // With a trailing slash, the same API: the backend is asked for the usage chunk too.
    let (status, _, stream) = post_to(&p, "/v1/chat/completions/", asked_none, &[]).await;
    assert_eq!(status, 200, "{stream}");
    assert!(!stream.contains("usage"), "{stream}");
    assert_eq!(
        received(&m).await[1]["body_sha256"],
        sha256_hex(asked_usage.as_bytes()),
        "the backend was not asked for the usage chunk on a path with a trailing slash"
    );

    // The same request with the option set by the client: the backend sees the same bytes
    // (so reports the same usage) and the client gets the usage chunk.
    let (status, h, stream) = post(&p, &asked_usage, &[]).await;
    assert_eq!(status, 200);
    let usage_line = stream
        .lines()
        .find(|l| l.contains("\"usage\":{"))
        .unwrap_or_else(|| panic!("no usage chunk for a client that asked:\n{stream}"));
    let usage: serde_json::Value =
        serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    let total = usage["usage"]["total_tokens"].as_i64().unwrap();
    assert!(total > 0);
    // At this admission the first two requests count what their backend reported (the
    // same bytes, the same usage), not their reservations; this one reserves as much as
    // the first did.
    assert_eq!(
        number(&h, "x-ratelimit-remaining-tokens"),
        100_000 - 2 * total - reserved,
        "the first requests were not settled to the usage their backend streamed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_budget_stops_the_tenant_and_says_when_it_resets() {
    // $0.01 per output token: a request reserves 50 tokens = $0.50 and really spends
    // 8 chunks = $0.08. With $1 a day, the budget holds after a handful.
    let (m, p) = setup("{ usd_per_day: 1.0 }", "{ input: 0, output: 10000 }").await;
    let body = PLAIN.replace("\"max_tokens\":100", "\"max_tokens\":50");
    let mut served = 0;
    let refused = loop {
        let (status, h, text) = post(&p, &body, &[]).await;
        match status {
            200 => served += 1,
            429 => break (h, text),
            s => panic!("{s}: {text}"),
        }
        assert!(served < 20, "the budget never stopped the tenant");
    };
    assert_eq!(served, 7, "0.08 × 7 + 0.50 > 1.00 refuses the 8th");
    let (h, text) = refused;
    assert_eq!(error_code(&text), "budget_exceeded");
    assert!(text.contains("00:00 UTC"), "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    assert!(retry.abs_diff(to_midnight) <= 2, "{retry} vs {to_midnight}");
    assert_eq!(header(&h, "x-ratelimit-reset-usd"), format!("{retry}s"));
    let left: f64 = header(&h, "x-ratelimit-remaining-usd").parse().unwrap();
    assert!((left - 0.44).abs() < 1e-6, "remaining {left}");
    assert_eq!(received(&m).await.len(), 7);
    // A request that could never fit says so, not that the budget was reached.
    let huge = PLAIN.replace("\"max_tokens\":100", "\"max_tokens\":500");
    let (status, h, text) = post(&p, &huge, &[]).await;
    assert_eq!(status, 429);
    assert!(
        text.contains("request too large: it may cost $5.0"),
        "{text}"
    );
    assert_eq!(error_code(&text), "budget_exceeded");
    assert!(h.get("retry-after").is_none(), "{h:?}");
    assert_eq!(header(&h, "x-should-retry"), "false");
    assert!(h.contains_key("x-ratelimit-remaining-usd"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_count_reserves_nothing_and_uses_nothing() {
    let (m, p) = setup_backend(
        "claude",
        "[claude]",
        "    provider: anthropic\n    cost: { input: 1000, output: 1000 }\n",
        "{ tpm: 150, usd_per_day: 0.01 }",
    )
    .await;
    // A prompt of ~2 000 tokens against a limit of 150: a message with it could never fit,
    // but counting its tokens generates nothing and is not billed.
    let prompt = "word ".repeat(1600);
    let send = |path: &'static str, body: serde_json::Value| {
        let url = p.url(path);
        async move {
            let r = client()
                .post(url)
                .header("x-api-key", KEY)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
                .await
                .unwrap();
            let (status, h) = (r.status().as_u16(), r.headers().clone());
            (status, h, r.text().await.unwrap())
        }
    };
    let count = serde_json::json!({
        "model": "claude",
        "messages": [{ "role": "user", "content": prompt }],
    });
    for _ in 0..3 {
        let (status, h, text) = send("/v1/messages/count_tokens", count.clone()).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("\"input_tokens\""), "{text}");
        assert_eq!(number(&h, "x-ratelimit-remaining-tokens"), 150);
    }
    assert_eq!(received(&m).await.len(), 3);
    // The message with the same prompt is refused as too large, as before.
    let mut message = count.clone();
    message["max_tokens"] = serde_json::json!(10);
    let (status, _, text) = send("/v1/messages", message).await;
    assert_eq!(status, 429, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_gives_its_reservation_back() {
    let (_m, p) = setup("{ tpm: 1000 }", "{ input: 0, output: 0 }").await;
    let big = PLAIN.replace("\"max_tokens\":100", "\"max_tokens\":600");
    let (status, h, _) = post(&p, &big, &[("x-mock-status", "400")]).await;
    assert_eq!(status, 400);
    let reserved = 1000 - number(&h, "x-ratelimit-remaining-tokens");
    assert!(reserved > 600, "reserved {reserved}");
    // The 400 used nothing: the same request fits again, as if the first never happened.
    let (status, h, body) = post(&p, &big, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(number(&h, "x-ratelimit-remaining-tokens"), 1000 - reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_the_backend_works_is_charged_its_prompt() {
    let (_m, p) = setup("{ tpm: 1000 }", "{ input: 0, output: 0 }").await;
    let long = PLAIN.replace("\"hi\"", &format!("\"{}\"", "word ".repeat(400)));
    let gone = client()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .header("x-request-id", "leaves-early")
        .header("x-mock-latency-ms", "3000")
        .timeout(std::time::Duration::from_millis(300))
        .body(long)
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    let line = p.access_line("leaves-early").await;
    assert!(line.contains("status=499"), "{line}");
    let tokens_in: u64 = line
        .split("tokens_in=")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(tokens_in >= 300, "its prompt estimate: {line}");
    // Its prompt counts against the minute, as a stream that broke off does.
    let (status, h, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 200, "{body}");
    let remaining = number(&h, "x-ratelimit-remaining-tokens");
    assert!(remaining <= 1000 - 100 - 300, "remaining {remaining}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_read_max_output_tokens_and_price_only_reachable_backends() {
    // The Responses API names its cap `max_output_tokens`.
    let (_m, p) = setup("{ tpm: 5000 }", "{ input: 0, output: 0 }").await;
    let capped = PLAIN.replace("\"max_tokens\":100", "\"max_output_tokens\":16");
    let (status, h, body) = post(&p, &capped, &[]).await;
    assert_eq!(status, 200, "{body}");
    let reserved = 5000 - number(&h, "x-ratelimit-remaining-tokens");
    assert!((16..100).contains(&reserved), "reserved {reserved}");

    // A daily budget is reserved at the prices of backends the tenant may use: a dear
    // backend outside its regions does not count.
    let eu = mock("eu", &[]).await;
    let us = mock("us", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}    region: eu-west\n    cost: {{ input: 1, output: 1 }}\n{}    region: us-east\n    cost: {{ input: 1000000, output: 1000000 }}\ntenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    allowed_regions: [eu]\n    limits: {{ usd_per_day: 1 }}\n",
        backend("eu", eu.port, "[llama-3]"),
        backend("us", us.port, "[llama-3]"),
        sha256_hex(KEY.as_bytes()),
    );
    let p = proxy(&config, &[]).await;
    let (status, h, body) = post(&p, PLAIN, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h["x-switchyard-backend"], "eu");
}
