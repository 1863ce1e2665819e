//! Policies swapped while traffic flows: new versions take effect within a second, broken
//! ones are refused, and no request fails either way.

mod common;

use std::time::Duration;

use common::*;

fn always(backend: &str, marker: usize) -> String {
    format!(
        r#"-- version marker {marker}
local P = {{}}
function P.route(req, backends) return "{backend}" end
P.tests = {{ {{ req = {{ model = "m" }}, backends = {{ {{ name = "a" }}, {{ name = "b" }} }}, expect = "{backend}" }} }}
return P
"#
    )
}

async fn setup() -> (Proc, Proc, Proc, u16) {
    setup_with(&[]).await
}

/// Backends `a` (a mock with `a_args`) and `b`, and the proxy routing by `switchable`,
/// which sends everything to `a`; returns them and the admin port.
async fn setup_with(a_args: &[&str]) -> (Proc, Proc, Proc, u16) {
    let a = mock("a", a_args).await;
    let b = mock("b", &[]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: switchable\nbackends:\n{}{}",
        backend("a", a.port, "[m]"),
        backend("b", b.port, "[m]")
    );
    let p = proxy(&config, &[("switchable", &always("a", 0))]).await;
    (a, b, p, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_versions_take_effect_and_broken_ones_are_refused_under_load() {
    let (_a, _b, p, admin) = setup().await;
    let file = p.dir().join("policies/switchable.lua");
    let load = Load::start(p.url("/v1/chat/completions"), 4, 100_000);
    load.wait_for("a", Duration::from_secs(5)).await;

    std::fs::write(&file, always("b", 1)).unwrap();
    let took = load.wait_for("b", Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_secs(1) + Duration::from_millis(500),
        "took {took:?}"
    );

    // A syntax error, then a version whose own tests fail: both refused, b keeps serving.
    std::fs::write(
        &file,
        "local P = {\nfunction P.route(req, backends) return 'a' end\nreturn P",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(load.last_served(), "b");
    // The refusal is on the admin API, naming the line.
    let policies = get_json(format!("http://127.0.0.1:{admin}/admin/policies")).await;
    let reason = policies["policies"][0]["last_rejection"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("switchable.lua:2:"), "{policies}");
    let wrong_tests = always("a", 2).replace("expect = \"a\"", "expect = \"b\"");
    std::fs::write(&file, wrong_tests).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(load.last_served(), "b");

    // Deleting the file keeps the last good version.
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(load.last_served(), "b");

    while load.sent() < 2000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let LoadResult {
        sent,
        errors: failures,
        ..
    } = load.finish().await;
    assert!(sent >= 2000);
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let admin_url = format!("http://127.0.0.1:{admin}");
    let policies: serde_json::Value = get_json(format!("{admin_url}/admin/policies")).await;
    let sw = &policies["policies"][0];
    assert_eq!(sw["name"], "switchable");
    let reason = sw["last_rejection"]["reason"].as_str().unwrap();
    assert!(reason.contains("expected [\"b\"], got [\"a\"]"), "{reason}");
    let metrics = metrics_text(admin).await;
    let rejected = metric(
        &metrics,
        "switchyard_policy_reloads_total{policy=\"switchable\",result=\"rejected\"}",
    );
    assert!(rejected >= 2.0, "{metrics}");
    p.wait_log("switchable.lua:2:").await; // the syntax error names its line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_during_load_lose_no_request() {
    let (_a, _b, p, admin) = setup().await;
    let file = p.dir().join("policies/switchable.lua");
    let load = Load::start(p.url("/v1/chat/completions"), 4, 100_000);
    for i in 1..=100 {
        let target = if i % 2 == 0 { "a" } else { "b" };
        std::fs::write(&file, always(target, i)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last version (100 → "a") wins once the debounce settles.
    load.wait_for("a", Duration::from_secs(3)).await;
    let LoadResult {
        sent,
        errors: failures,
        ..
    } = load.finish().await;
    assert!(sent > 200, "load ran: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Saves are debounced: far fewer versions were loaded than written.
    let loaded = metric(
        &metrics_text(admin).await,
        "switchyard_policy_reloads_total{policy=\"switchable\",result=\"loaded\"}",
    );
    assert!(
        (1.0..=30.0).contains(&loaded),
        "{loaded} loads for 100 saves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_version_it_started_with() {
    let (_a, _b, p, admin) = setup_with(&["--latency-ms", "1500"]).await;
    let version = || async {
        get_json(format!("http://127.0.0.1:{admin}/admin/policies")).await["policies"][0]["version"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = version().await;

    let slow = chat_in_background(&p);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(p.dir().join("policies/switchable.lua"), always("b", 1)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while version().await == first {
        assert!(
            std::time::Instant::now() < deadline,
            "the new version never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = version().await;
    let (status, headers, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!((status, served_by(&headers).as_str()), (200, "b"));

    // The request that started before the swap ends as its version planned it.
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(r.headers()), "a");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let line = p.access_line(&id).await;
    assert!(
        line.contains(&format!("policy=switchable@{first}")),
        "{line}"
    );
    assert!(p.output().contains(&format!("policy=switchable@{second}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_file_holds_up_no_config_reload_or_admin_change() {
    let (a, _b, p, admin) = setup().await;
    let admin_url = format!("http://127.0.0.1:{admin}");
    std::fs::write(
        p.dir().join("policies/switchable.lua"),
        "local P = {\nfunction P.route(req, backends) return 'b' end\nreturn P",
    )
    .unwrap();
    p.wait_log("switchable.lua:2:").await; // refused by the file watcher

    // A backend added through the admin API, and a reload of the config file: both made,
    // with the version of `switchable` in service kept.
    let added = client()
        .post(format!("{admin_url}/admin/backends"))
        .json(&serde_json::json!({
            "name": "c",
            "url": format!("http://127.0.0.1:{}", a.port),
            "models": ["m"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201, "{}", added.text().await.unwrap());
    // The reload is made, and reports the policy it kept as refused (so not clean: 422).
    let reloaded = client()
        .post(format!("{admin_url}/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 422);
    let report: serde_json::Value = reloaded.json().await.unwrap();
    assert!(
        report["config_errors"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert!(
        report["rejected"].to_string().contains("switchable.lua:2:"),
        "{report}"
    );
    let (status, headers, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!((status, served_by(&headers).as_str()), (200, "a"));
    p.wait_log("policy switchable stays at the version in service")
        .await;

    // The file put back as it was: the refusal is over, and `/admin/policies` says so.
    std::fs::write(p.dir().join("policies/switchable.lua"), always("a", 0)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = get_json(format!("{admin_url}/admin/policies")).await;
        if v["policies"][0]["last_rejection"].is_null() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still shown as refused: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
