//! Tenants on the wire: API keys, the tenant and region a policy sees, and the governance
//! rules Rust enforces whatever the policy returns.

mod common;

use common::*;

/// Returns the US backend first whatever the tenant, to prove the guardrail removes it.
const GREEDY: &str = r#"
local P = {}
function P.route(req, backends)
  sy.log("tenant=" .. req.tenant .. " region=" .. tostring(req.region))
  local names = { "us-1" }
  for _, b in ipairs(backends) do names[#names + 1] = b.name end
  return names
end
return P
"#;

fn key_hash(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

async fn setup() -> (Proc, Proc, Proc) {
    let eu = mock("eu", &[]).await;
    let us = mock("us", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: greedy\nbackends:\n  - name: eu-1\n    url: http://127.0.0.1:{}\n    models: [llama-3, gpt-4o]\n    region: eu-west\n  - name: us-1\n    url: http://127.0.0.1:{}\n    models: [llama-3, gpt-4o, llama-us]\n    region: us-east\ntenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n    region: eu\n    allowed_models: [\"llama-*\"]\n    allowed_regions: [eu]\n  - name: globex\n    key_sha256: [\"{}\", \"{}\"]\n",
        eu.port,
        us.port,
        key_hash("sk-acme-1"),
        key_hash("sk-globex-1"),
        key_hash("sk-globex-2"),
    );
    let p = proxy(&config, &[("greedy", GREEDY)]).await;
    (eu, us, p)
}

async fn call(
    p: &Proc,
    key: Option<(&str, &str)>,
    model: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client()
        .post(p.url("/v1/chat/completions"))
        .json(&chat_body(model, "hi", false));
    if let Some((header, value)) = key {
        req = req.header(header, value);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_gets_a_generic_401() {
    let (eu, us, p) = setup().await;
    for key in [
        None,
        Some(("authorization", "Bearer sk-wrong")),
        Some(("x-api-key", "sk-acme-2")),
    ] {
        let (status, _, body) = call(&p, key, "llama-3").await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(error_code(&body), "invalid_api_key");
        assert!(body.contains("invalid or missing API key"));
    }
    assert!(received(&eu).await.is_empty() && received(&us).await.is_empty());
    let r = client().get(p.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

/// Refused after its key was checked but before its metadata was read (the body is not
/// JSON, or names no model, or it asks for a path that is not proxied), a request's access
/// line still names its tenant; a refused key names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_before_its_metadata_is_logged_with_its_tenant() {
    let (_eu, _us, p) = setup().await;
    let cases: [(&str, &str, &str, u16, &str); 4] = [
        (
            "sk-acme-1",
            "/v1/chat/completions",
            "{not json",
            400,
            "acme",
        ),
        ("sk-globex-2", "/v1/chat/completions", "{}", 400, "globex"),
        ("sk-acme-1", "/v1/files", "{}", 404, "acme"),
        ("sk-wrong", "/v1/chat/completions", "{}", 401, "-"),
    ];
    for (i, (key, path, body, status, tenant)) in cases.into_iter().enumerate() {
        let id = format!("before-metadata-{i}");
        let r = client()
            .post(p.url(path))
            .header("authorization", format!("Bearer {key}"))
            .header("x-request-id", &id)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{path} {body}");
        let line = p.access_line(&id).await;
        assert!(line.contains(&format!(" tenant={tenant} ")), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_sees_the_tenant_and_cannot_leave_its_regions() {
    let (eu, us, p) = setup().await;
    // The policy logs every call through `sy.log`, which keeps 10 lines a second per VM:
    // few enough calls here that the other tenant's line below is never the one dropped.
    for _ in 0..5 {
        let (status, headers, body) =
            call(&p, Some(("authorization", "Bearer sk-acme-1")), "llama-3").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-switchyard-backend"], "eu-1");
    }
    assert!(
        received(&us).await.is_empty(),
        "the greedy policy's US choice was removed"
    );
    let seen = received(&eu).await;
    assert!(
        seen.iter()
            .all(|r| r["headers"].get("authorization").is_none()),
        "the client key never goes upstream"
    );
    p.wait_log("tenant=acme region=eu").await;

    // Another tenant, either of its keys, through x-api-key: no region restriction.
    let (status, headers, _) = call(&p, Some(("x-api-key", "sk-globex-2")), "gpt-4o").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-switchyard-backend"], "us-1");
    p.wait_log("tenant=globex region=nil").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_and_uses_only_its_models() {
    let (_eu, _us, p) = setup().await;
    let (status, _, body) = call(&p, Some(("authorization", "Bearer sk-acme-1")), "gpt-4o").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "forbidden");
    let (status, _, body) = call(
        &p,
        Some(("authorization", "Bearer sk-acme-1")),
        "no-such-model",
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let models: serde_json::Value = client()
        .get(p.url("/v1/models"))
        .header("authorization", "Bearer sk-acme-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["llama-3"],
        "never lists models the tenant may not use, nor those only outside its regions"
    );
    let r = client()
        .get(p.url("/v1/models/llama-us"))
        .header("authorization", "Bearer sk-acme-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let one = client()
        .get(p.url("/v1/models/llama-3"))
        .header("authorization", "Bearer sk-acme-1")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
}

#[test]
fn a_plaintext_key_in_the_config_is_refused() {
    let err = refused_config(
        "routes: [{ policy: round_robin }]\nbackends: [{ name: a, url: \"http://127.0.0.1:1\", models: [m] }]\ntenants:\n  - name: acme\n    key_sha256: [\"sk-live-plaintext\"]\n",
        &[],
    );
    assert!(
        err.contains("tenants[0].key_sha256[0]: must be 64 hex digits"),
        "{err}"
    );
    assert!(
        !err.contains("sk-live-plaintext"),
        "the value is never echoed: {err}"
    );
}
