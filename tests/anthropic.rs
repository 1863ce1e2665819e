//! Anthropic-format traffic (`POST /v1/messages`), the Responses API and Azure backends on
//! the wire: a policy routes by `req.format`, the wire-format guardrail keeps each format
//! on backends that speak it, each provider gets its own headers and path, and usage
//! (cache tokens included) is counted in the metrics and the audit.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

const MODEL: &str = "claude-sonnet";

/// Names every backend, in an order that depends on the request's format: Anthropic
/// requests to `claude-b` (after `gateway`, an OpenAI-format backend the guardrail must
/// drop), OpenAI requests to `claude-b` first (dropped too) and then `gateway`.
const BY_FORMAT: &str = r#"
local P = {}
function P.route(req, backends)
  if req.format == "anthropic" then return { "gateway", "claude-b", "claude-a" } end
  return { "claude-b", "gateway" }
end
P.tests = {
  { req = { model = "m", path = "/v1/messages" }, backends = { { name = "claude-b" } },
    expect = { "gateway", "claude-b", "claude-a" } },
  { req = { model = "m" }, backends = { { name = "gateway" } }, expect = { "claude-b", "gateway" } },
}
return P
"#;

fn messages_body(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": 128,
        "stream": stream,
        "system": [{ "type": "text", "text": "You are terse." }],
        "messages": [{ "role": "user", "content": [{ "type": "text", "text": "Say hello." }] }],
    })
}

/// `/metrics` once `series` has reached `want` (logging runs just after a response ends).
async fn metrics_when(admin: u16, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(admin).await;
        if metric(&text, series) == want || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn skip_reason(record: &Value, backend: &str) -> String {
    record["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["backend"] == backend)
        .map(|s| s["reason"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{backend} not skipped in {record}"))
}

/// `(event name, data)` of each event of an Anthropic stream.
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').expect("event and data lines");
            (
                name.strip_prefix("event: ")
                    .expect("event line")
                    .to_string(),
                serde_json::from_str(data.strip_prefix("data: ").expect("data line")).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_messages_are_routed_by_policy_with_anthropic_headers_and_usage_counted() {
    let claude_a = mock("claude-a", &[]).await;
    let claude_b = mock("claude-b", &["--chunks", "6"]).await;
    let gateway = mock("gateway", &[]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: by_format\nbackends:\n{}{}{}",
        backend("claude-a", claude_a.port, &format!("[{MODEL}]"))
            + "    provider: anthropic\n    api_key_env: SY_TEST_KEY_A\n",
        backend("claude-b", claude_b.port, &format!("[{MODEL}]"))
            + "    provider: anthropic\n    api_key_env: SY_TEST_KEY_B\n    cost: { input: 1000000, output: 2000000 }\n",
        backend("gateway", gateway.port, &format!("[{MODEL}]"))
            + "    api_key_env: SY_TEST_KEY_GW\n",
    );
    let p = proxy_with_env(
        &config,
        &[("by_format", BY_FORMAT)],
        &[
            ("SY_TEST_KEY_A", "sk-ant-a"),
            ("SY_TEST_KEY_B", "sk-ant-b"),
            ("SY_TEST_KEY_GW", "sk-gateway"),
        ],
    )
    .await;

    // Streamed, as the Anthropic SDK sends it: the client's key in x-api-key, its version.
    let r = client()
        .post(p.url("/v1/messages"))
        .header("x-api-key", "sk-client-never-forwarded")
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-cached-tokens", "5")
        .json(&messages_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(r.headers()), "claude-b");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body_bytes: u64 = r.headers()["x-mock-body-bytes"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (text, broken) = read_stream(r).await;
    assert!(!broken);
    let events = named_events(&text);
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");
    let answer: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, e)| e["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(answer, "Hello from claude-b word1 word2 word3");

    // A second one without anthropic-version: the mock (like Anthropic) refuses a request
    // without it, so a 200 shows the default was added.
    let r = client()
        .post(p.url("/v1/messages"))
        .json(&messages_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let plain: Value = r.json().await.unwrap();
    assert_eq!(plain["type"], "message");
    assert_eq!(plain["usage"]["output_tokens"], 6);

    let got = received(&claude_b).await;
    assert_eq!(got.len(), 2, "{got:?}");
    for (i, req) in got.iter().enumerate() {
        let h = &req["headers"];
        assert_eq!(req["path"], "/v1/messages");
        assert_eq!(
            h["x-api-key"], "sk-ant-b",
            "the backend's key, not the client's"
        );
        assert!(h.get("authorization").is_none(), "{h}");
        assert_eq!(h["anthropic-version"], "2023-06-01", "request {i}");
        assert_eq!(h["accept-encoding"], "identity");
    }
    assert_eq!(got[0]["stream"], true);
    assert!(received(&gateway).await.is_empty());
    assert!(received(&claude_a).await.is_empty());

    // The guardrail dropped the OpenAI-format backend the policy named first, and says so.
    let d = decision(admin, &request_id).await;
    assert_eq!(d["candidates"], json!(["claude-a", "claude-b"]));
    assert_eq!(d["plan"], json!(["claude-b", "claude-a"]));
    assert!(
        skip_reason(&d, "gateway").starts_with("guardrail: only anthropic backends"),
        "{d}"
    );
    // Usage: the whole prompt (input plus the 5 cache-read tokens) and 6 output tokens.
    let prompt = body_bytes.div_ceil(4);
    assert_eq!(d["tokens_in"], prompt, "{d}");
    assert_eq!(d["tokens_out"], 6);
    assert_eq!(d["backend"], "claude-b");

    // The same request in the OpenAI format: claude-b is dropped, the gateway serves it.
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .json(&chat_body(MODEL, "Say hello.", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(r.headers()), "gateway");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let d = decision(admin, &id).await;
    assert_eq!(d["candidates"], json!(["gateway"]));
    for name in ["claude-a", "claude-b"] {
        assert!(
            skip_reason(&d, name).starts_with("guardrail: an anthropic backend"),
            "{d}"
        );
    }
    let g = &received(&gateway).await[0]["headers"];
    assert_eq!(g["authorization"], "Bearer sk-gateway");
    assert!(g.get("x-api-key").is_none() && g.get("anthropic-version").is_none());

    // Tokens and cost in the metrics: both Anthropic answers on claude-b, 6 tokens each.
    let series = |dir: &str| {
        format!(
            "switchyard_tokens_total{{backend=\"claude-b\",direction=\"{dir}\",model=\"{MODEL}\"}}"
        )
    };
    let m = metrics_when(admin, &series("out"), 12.0).await;
    assert_eq!(metric(&m, &series("out")), 12.0, "{m}");
    let tokens_in = metric(&m, &series("in"));
    let plain_in = plain["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(tokens_in, (prompt + plain_in) as f64, "{m}");
    let cost = metric(
        &m,
        "switchyard_cost_usd_total{backend=\"claude-b\",tenant=\"anonymous\"}",
    );
    assert!(
        (cost - (tokens_in + 2.0 * 12.0)).abs() < 1e-6,
        "{cost} {tokens_in}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_clients_get_anthropic_errors_and_formats_never_cross() {
    let claude = mock("claude", &[]).await;
    let openai = mock("openai", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}",
        backend("claude", claude.port, "[claude-only]") + "    provider: anthropic\n",
        backend("openai", openai.port, "[gpt-only]"),
    );
    let p = proxy(&config, &[]).await;
    let post = |path: &'static str, body: Value| {
        let url = p.url(path);
        async move {
            let r = client().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    let mut body = messages_body(false);
    body["model"] = json!("gpt-only");
    let (status, v) = post("/v1/messages", body).await;
    assert_eq!(status, 404);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not available through the Anthropic Messages API"),
        "{v}"
    );
    let (status, v) = post(
        "/v1/chat/completions",
        chat_body("claude-only", "hi", false),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not available through the OpenAI API"));
    let (status, v) = post("/v1/messages", json!({ "max_tokens": 5, "messages": [] })).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        received(&claude).await.len() + received(&openai).await.len(),
        0
    );

    // An Anthropic backend's own errors reach the client as they are.
    let mut body = messages_body(false);
    body["model"] = json!("claude-only");
    let r = client()
        .post(p.url("/v1/messages"))
        .header("x-mock-status", "400")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(served_by(r.headers()), "claude");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_backends_get_api_key_and_the_deployment_path() {
    let azure = mock("azure", &["--chunks", "3"]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
        backend("azure", azure.port, "{ gpt-4o: gpt-4o-prod }")
            + "    provider: azure\n    api_version: 2024-06-01\n    api_key_env: SY_TEST_AZURE_KEY\n",
    );
    let p = proxy_with_env(&config, &[], &[("SY_TEST_AZURE_KEY", "azure-secret")]).await;
    let r = client()
        .post(p.url("/v1/chat/completions?api-version=client-choice"))
        .header("authorization", "Bearer sk-client")
        .json(&chat_body("gpt-4o", "hi", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (text, broken) = read_stream(r).await;
    assert!(!broken && text.contains("[DONE]"), "{text}");
    let got = received(&azure).await;
    assert_eq!(
        got[0]["path"],
        "/openai/deployments/gpt-4o-prod/chat/completions"
    );
    assert_eq!(got[0]["query"], "api-version=2024-06-01");
    assert_eq!(got[0]["headers"]["api-key"], "azure-secret");
    assert!(got[0]["headers"].get("authorization").is_none());
    assert_eq!(got[0]["model"], "gpt-4o-prod");
    // Switchyard asked the Azure backend for usage; its three completion tokens are counted.
    let series = "switchyard_tokens_total{backend=\"azure\",direction=\"out\",model=\"gpt-4o\"}";
    let m = metrics_when(admin, series, 3.0).await;
    assert_eq!(metric(&m, series), 3.0, "{m}");
}

#[test]
fn api_version_is_refused_where_it_means_nothing() {
    let err = refused_config(
        "routes:\n  - policy: round_robin\nbackends:\n  - name: a\n    url: http://127.0.0.1:9\n    models: [m]\n    api_version: 2024-01-01\n  - name: z\n    url: http://127.0.0.1:9\n    provider: azure\n    models: { m: \"bad name\" }\n",
        &[],
    );
    assert!(
        err.contains("backends[0].api_version: only `azure` and `anthropic`"),
        "{err}"
    );
    assert!(
        err.contains("backends[1].models: `bad name` is not an Azure deployment name"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_is_relayed_plain_and_streamed_with_usage_counted_on_openai_and_azure() {
    let openai = mock("openai", &["--chunks", "4"]).await;
    let azure = mock("azure", &["--chunks", "4"]).await;
    let admin = free_port();
    // No `api_version` on the Azure backend: the Responses API gets the version serving it.
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}",
        backend("openai", openai.port, "[gpt-4o]"),
        backend("azure", azure.port, "{ gpt-az: az-deployment }")
            + "    provider: azure\n    api_key_env: SY_TEST_AZURE_KEY\n",
    );
    let p = proxy_with_env(&config, &[], &[("SY_TEST_AZURE_KEY", "azure-secret")]).await;
    let ask = |model: &str, stream: bool| {
        client()
            .post(p.url("/v1/responses"))
            .json(&json!({ "model": model, "input": "Say hello.", "stream": stream }))
            .send()
    };

    let r = ask("gpt-4o", false).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(r.headers()), "openai");
    let plain: Value = r.json().await.unwrap();
    assert_eq!(plain["object"], "response");
    assert_eq!(
        plain["output"][0]["content"][0]["text"],
        "Hello from openai word1"
    );
    assert_eq!(plain["usage"]["output_tokens"], 4);

    for (model, name) in [("gpt-4o", "openai"), ("gpt-az", "azure")] {
        let r = ask(model, true).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(served_by(r.headers()), name);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let (text, broken) = read_stream(r).await;
        assert!(!broken, "{text}");
        // Named events, as Anthropic's, and no `[DONE]`.
        assert!(!text.contains("[DONE]"), "{text}");
        let events = named_events(&text);
        assert_eq!(events.first().unwrap().0, "response.created");
        let (last, completed) = events.last().unwrap();
        assert_eq!(last, "response.completed");
        assert_eq!(completed["response"]["usage"]["output_tokens"], 4);
        let answer: String = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, e)| e["delta"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(answer, format!("Hello from {name} word1"));
        let numbers: Vec<u64> = events
            .iter()
            .map(|(_, e)| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    }

    let got = received(&azure).await;
    assert_eq!(got[0]["path"], "/openai/responses");
    assert_eq!(got[0]["query"], "api-version=2025-03-01-preview");
    assert_eq!(got[0]["model"], "az-deployment");
    assert_eq!(got[0]["headers"]["api-key"], "azure-secret");
    assert_eq!(received(&openai).await[1]["path"], "/v1/responses");

    // Usage counted from the plain answer and from each stream's `response.completed`.
    let series = |b: &str, m: &str| {
        format!("switchyard_tokens_total{{backend=\"{b}\",direction=\"out\",model=\"{m}\"}}")
    };
    let m = metrics_when(admin, &series("openai", "gpt-4o"), 8.0).await;
    assert_eq!(metric(&m, &series("openai", "gpt-4o")), 8.0, "{m}");
    let m = metrics_when(admin, &series("azure", "gpt-az"), 4.0).await;
    assert_eq!(metric(&m, &series("azure", "gpt-az")), 4.0, "{m}");
}
