//! The routing audit on the wire: a failed-over request's record names every attempt and
//! why, the chain verifies, and an edited line is caught.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_names_every_attempt_and_the_chain_catches_an_edit() {
    let live = mock("live", &[]).await;
    let (_refusing, dead) = refusing_port();
    let admin = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let chain = r#"
local P = {}
function P.route(req, backends)
  if req.header("x-shed") then return nil, 429, "shed" end
  if req.header("x-fail") then error("boom") end
  return { "dead", "live" }
end
return P
"#;
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\naudit: {{ path: \"{}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: chain\nbackends:\n{}{}",
        log.display(),
        backend("dead", dead, "[m]"),
        // Priced, so that the record's cost is checked.
        backend("live", live.port, "[m]") + "    cost: { input: 1000000, output: 2000000 }\n"
    );
    let p = proxy(&config, &[("chain", chain)]).await;
    let r = post_chat(
        &p,
        &chat_body("m", "a secret prompt", false),
        &[("authorization", "Bearer sk-never-logged")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // A record is made after the answer is sent, so the next request could be recorded
    // first: each is waited for, to check the order below.
    decision(admin, &id).await;
    for _ in 0..3 {
        let (status, headers, _) = chat(&p, &chat_body("m", "hi", false)).await;
        assert_eq!(status, 200);
        decision(admin, headers["x-request-id"].to_str().unwrap()).await;
    }
    let shed = post_chat(&p, &chat_body("m", "hi", false), &[("x-shed", "1")]).await;
    assert_eq!(shed.status(), 429);
    let shed_id = shed.headers()["x-request-id"].to_str().unwrap().to_string();
    decision(admin, &shed_id).await;
    let failed = post_chat(&p, &chat_body("m", "hi", false), &[("x-fail", "1")]).await;
    assert_eq!(failed.status(), 500);
    let failed_id = failed.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    decision(admin, &failed_id).await;
    // With both backends drained, nothing may take a request: the 503's record says why.
    for name in ["dead", "live"] {
        set_draining(admin, name, true).await;
    }
    let none = post_chat(&p, &chat_body("m", "hi", false), &[]).await;
    assert_eq!(none.status(), 503);
    let none_id = none.headers()["x-request-id"].to_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&id))
        .expect("the request has an audit line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["backend"], "live");
    assert_eq!(
        v["policy"].as_str().unwrap().split('@').next(),
        Some("chain")
    );
    assert_eq!(v["candidates"], serde_json::json!(["dead", "live"]));
    // A request the policy refused names it too.
    let refused = text.lines().find(|l| l.contains(&shed_id)).unwrap();
    let refused: serde_json::Value = serde_json::from_str(refused).unwrap();
    assert_eq!(refused["status"], 429);
    assert_eq!(refused["policy"], v["policy"]);
    // ... and what it was offered: each backend a candidate or skipped with its reason
    // (`dead` may be ejected by now).
    let offered = refused["candidates"].as_array().unwrap();
    assert!(offered.contains(&"live".into()), "{refused}");
    if !offered.contains(&"dead".into()) {
        assert_eq!(
            refused["skipped"],
            serde_json::json!([{ "backend": "dead", "reason": "ejected" }]),
            "{refused}"
        );
    }
    // So does a request whose policy failed.
    let failed = text.lines().find(|l| l.contains(&failed_id)).unwrap();
    let failed: serde_json::Value = serde_json::from_str(failed).unwrap();
    assert_eq!(failed["status"], 500);
    assert_eq!(failed["policy"], v["policy"]);
    assert!(
        failed["candidates"]
            .as_array()
            .unwrap()
            .contains(&"live".into()),
        "{failed}"
    );
    let none = text.lines().find(|l| l.contains(&none_id)).unwrap();
    let none: serde_json::Value = serde_json::from_str(none).unwrap();
    assert_eq!(none["status"], 503);
    assert_eq!(none["candidates"], serde_json::json!([]));
    assert_eq!(
        none["skipped"],
        serde_json::json!([
            { "backend": "dead", "reason": "draining" },
            { "backend": "live", "reason": "draining" },
        ]),
        "{none}"
    );
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["backend"], "dead");
    assert!(
        attempts[0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("connect"),
        "{line}"
    );
    assert_eq!(attempts[1]["backend"], "live");
    assert_eq!(v["status"], 200);
    assert!(v["tokens_out"].as_u64().unwrap() > 0);
    // $1 per input token and $2 per output token, at the serving backend's prices.
    let expected = v["tokens_in"].as_f64().unwrap() + 2.0 * v["tokens_out"].as_f64().unwrap();
    assert!(
        (v["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-6,
        "cost {} for {} in and {} out: {line}",
        v["cost_usd"],
        v["tokens_in"],
        v["tokens_out"]
    );
    assert!(
        !text.contains("secret prompt") && !text.contains("sk-never-logged"),
        "no prompt, no credentials"
    );

    // The same decisions are on the admin API, newest first.
    let d: serde_json::Value =
        get_json(format!("http://127.0.0.1:{admin}/admin/decisions?limit=10")).await;
    // Seven chat requests (the last three refused), and the harness's readiness probe
    // (GET /v1/models) before them.
    let decisions = d["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 8);
    assert_eq!(decisions[0]["request_id"], none_id.as_str(), "newest first");
    assert_eq!(decisions[1]["request_id"], failed_id.as_str());
    assert_eq!(decisions[2]["request_id"], shed_id.as_str());
    assert_eq!(decisions[6]["request_id"], id.as_str());

    let verify = |path: &std::path::Path| {
        std::process::Command::new(BIN)
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = verify(&log);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{} line(s)", text.lines().count()))
    );

    let edited = dir.path().join("edited.log");
    std::fs::write(
        &edited,
        text.replacen("\"status\":200", "\"status\":500", 1),
    )
    .unwrap();
    let out = verify(&edited);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("line 1: its content does not match its hash"));
}
