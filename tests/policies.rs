//! Policy failures and the sandbox on the wire: every bad policy costs one request a 500
//! `policy_error`, never the process or the next request.

mod common;

use common::*;

const RAISES: &str = r#"
local P = {}
function P.route(req, backends)
  error("boom")
end
return P
"#;
const LOOPS: &str = r#"
local P = {}
function P.route(req, backends)
  while true do end
end
return P
"#;
const LOOPS_UNDER_PCALL: &str = r#"
local P = {}
function P.route(req, backends)
  while true do pcall(function() while true do end end) end
end
return P
"#;
// A loop of library calls over a 2 MB string: a few instructions a call, and ~2 ms of
// work each that the instruction budget does not see (its budget would last ~10 minutes).
const SLOW_CALLS: &str = r#"
local P = {}
local text, len = ("a"):rep(2000000), utf8.len
function P.route(req, backends)
  while true do len(text) end
end
return P
"#;
const ALLOCATES: &str = r#"
local P = {}
function P.route(req, backends)
  local t = {}
  local i = 0
  while true do i = i + 1; t[i] = string.rep("x", 1024) .. i end
end
return P
"#;
// A content rule whose pattern backtracks: on this client's header it tries 2^28 ways, in
// the string library's matcher, where no Lua instruction runs.
const BACKTRACKS: &str = r#"
local P = {}
function P.route(req, backends)
  local text = req.header("x-text") or ""
  if text:find(("a?"):rep(28) .. ("a"):rep(28) .. "b") then return nil, 403, "no" end
  return backends[1].name
end
return P
"#;
const UNKNOWN_NAME: &str = r#"
local P = {}
function P.route(req, backends) return "no-such-backend" end
return P
"#;
const RETURNS_NUMBER: &str = r#"
local P = {}
function P.route(req, backends) return 42 end
return P
"#;
const RETURNS_NIL: &str = r#"
local P = {}
function P.route(req, backends) return nil end
return P
"#;
const ESCAPES: &str = r#"
local P = {}
function P.route(req, backends)
  local what = req.header("x-escape")
  if what == "os" then os.execute("touch /tmp/switchyard-escaped") end
  if what == "io" then io.open("/etc/passwd") end
  if what == "require" then require("os") end
  if what == "load" then load("return 1")() end
  if what == "dump" then string.dump(P.route) end
  if what == "global" then counter = 1 end
  if what == "metatable" then setmetatable({}, {}) end
  if what == "randomseed" then math.randomseed(1) end
  return backends[1].name
end
return P
"#;
const REJECTS: &str = r#"
local P = {}
function P.route(req, backends)
  if req.priority < 0 then return nil, 429, "low priority traffic is shed" end
  return backends[1].name
end
return P
"#;

fn config(port: u16, admin: u16) -> String {
    let mut routes = String::from("routes:\n");
    for (model, policy, fallback) in [
        ("raises", "raises", None),
        ("loops", "loops", None),
        ("loops-pcall", "loops_under_pcall", None),
        ("slow-calls", "slow_calls", None),
        ("allocates", "allocates", None),
        ("backtracks", "backtracks", None),
        ("unknown", "unknown_name", None),
        ("number", "returns_number", None),
        ("nil", "returns_nil", None),
        ("escapes", "escapes", None),
        ("rejects", "rejects", None),
        ("saved", "raises", Some("round_robin")),
    ] {
        routes.push_str(&format!(
            "  - match: {{ model: \"{model}\" }}\n    policy: {policy}\n"
        ));
        if let Some(f) = fallback {
            routes.push_str(&format!("    fallback_policy: {f}\n"));
        }
    }
    routes.push_str("  - match: { path_prefix: /v1/ }\n    policy: round_robin\n");
    let models =
        "[raises, loops, loops-pcall, slow-calls, allocates, backtracks, unknown, number, nil, escapes, rejects, saved, ok]";
    let admin = format!("admin: {{ addr: \"127.0.0.1:{admin}\" }}\n");
    format!(
        "{routes}{admin}backends:\n{}lua:\n  memory_limit_bytes: 8388608\n",
        backend("b1", port, models)
    )
}

/// The mock, the proxy and the proxy's admin port.
async fn start() -> (Proc, Proc, u16) {
    let m = mock("m1", &[]).await;
    let admin = free_port();
    let p = proxy(
        &config(m.port, admin),
        &[
            ("raises", RAISES),
            ("loops", LOOPS),
            ("loops_under_pcall", LOOPS_UNDER_PCALL),
            ("slow_calls", SLOW_CALLS),
            ("allocates", ALLOCATES),
            ("backtracks", BACKTRACKS),
            ("unknown_name", UNKNOWN_NAME),
            ("returns_number", RETURNS_NUMBER),
            ("returns_nil", RETURNS_NIL),
            ("escapes", ESCAPES),
            ("rejects", REJECTS),
        ],
    )
    .await;
    (m, p, admin)
}

async fn send(p: &Proc, model: &str, escape: Option<&str>) -> (u16, String) {
    let mut req = client()
        .post(p.url("/v1/chat/completions"))
        .header("x-text", "a".repeat(28))
        .json(&chat_body(model, "hi", false));
    if let Some(e) = escape {
        req = req.header("x-escape", e);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_policy_costs_one_request_a_500_and_the_next_succeeds() {
    let (_m, p, admin) = start().await;
    for model in [
        "raises",
        "loops",
        "loops-pcall",
        "slow-calls",
        "allocates",
        "backtracks",
        "unknown",
        "number",
        "nil",
    ] {
        let started = std::time::Instant::now();
        let (status, body) = send(&p, model, None).await;
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(5),
            "{model}: {took:?}"
        );
        assert_eq!(status, 500, "{model}: {body}");
        assert_eq!(error_code(&body), "policy_error", "{model}");
        assert!(
            !body.contains("boom") && !body.contains(".lua"),
            "no internals to the client: {body}"
        );
        let (status, body) = send(&p, "ok", None).await;
        assert_eq!(status, 200, "request after {model}: {body}");
    }
    for line in [
        "raises.lua:4: boom",
        // A runaway call is stopped at a line of the policy's own.
        "exceeded its instruction budget of 1000000 instructions at loops.lua:4",
        "instructions at loops_under_pcall.lua:4",
        // Library calls the budget does not count are stopped by the time limit.
        "ran longer than 1000 ms at slow_calls.lua:5",
        "instructions at backtracks.lua:5",
        // The memory cap names where the policy was last seen growing.
        "exceeded the Lua memory limit of 8388608 bytes at allocates.lua:6",
        "unknown backend `no-such-backend`",
        "returned a number (42)",
        "returned nil",
    ] {
        p.wait_log(line).await;
    }
    // Each failure's line names the policy's version, as the admin API shows it.
    let log = p.output();
    let raised = log
        .lines()
        .find(|l| l.contains("raises.lua:4: boom"))
        .unwrap();
    let policies = get_json(format!("http://127.0.0.1:{admin}/admin/policies")).await;
    let version = policies["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "raises")
        .unwrap()["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(raised.contains(&format!("raises@{version}")), "{raised}");
    // The access line of a failed request names the policy that failed, and the error.
    let failed = format!("status=500 tenant=anonymous model=raises policy=raises@{version} ");
    let line = p.log_line(&failed).await;
    assert!(line.ends_with(" error=\"policy_error\""), "{line}");
    // And each is counted by kind.
    let text = metrics_text(admin).await;
    for (policy, kind) in [
        ("raises", "runtime"),
        ("loops", "budget"),
        ("allocates", "memory"),
        ("backtracks", "budget"),
        ("unknown_name", "unknown_backend"),
        ("returns_number", "bad_return"),
        ("returns_nil", "bad_return"),
    ] {
        let series =
            format!("switchyard_policy_errors_total{{kind=\"{kind}\",policy=\"{policy}\"}}");
        assert_eq!(metric(&text, &series), 1.0, "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_has_no_way_out() {
    let (_m, p, _) = start().await;
    for escape in [
        "os",
        "io",
        "require",
        "load",
        "dump",
        "global",
        "metatable",
        "randomseed",
    ] {
        let (status, body) = send(&p, "escapes", Some(escape)).await;
        assert_eq!(status, 500, "{escape}: {body}");
        assert_eq!(error_code(&body), "policy_error");
    }
    assert!(!std::path::Path::new("/tmp/switchyard-escaped").exists());
    let (status, _) = send(&p, "escapes", None).await;
    assert_eq!(status, 200);
    p.wait_log("globals are read-only").await;
    // Each way out is simply not there: a nil value, at its line.
    for line in [
        "escapes.lua:5: attempt to index a nil value (global 'os')",
        "escapes.lua:6: attempt to index a nil value (global 'io')",
        "escapes.lua:7: attempt to call a nil value (global 'require')",
        "escapes.lua:8: attempt to call a nil value (global 'load')",
        "escapes.lua:9: attempt to call a nil value (field 'dump')",
        "escapes.lua:11: attempt to call a nil value (global 'setmetatable')",
        "escapes.lua:12: attempt to call a nil value (field 'randomseed')",
    ] {
        p.wait_log(line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_policy_saves_the_request_and_a_rejection_is_relayed() {
    let (_m, p, _) = start().await;
    let (status, body) = send(&p, "saved", None).await;
    assert_eq!(status, 200, "{body}");

    let r = post_chat(
        &p,
        &chat_body("rejects", "hi", false),
        &[("x-priority", "-1")],
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1", "shed load is for later");
    let body = r.text().await.unwrap();
    assert!(body.contains("low priority traffic is shed"), "{body}");
    // Its access line names the policy that refused it, and so does a saved request's
    // the fallback that saved it.
    p.wait_log("status=429 tenant=anonymous model=rejects policy=rejects@")
        .await;
    p.wait_log("status=200 tenant=anonymous model=saved policy=round_robin@")
        .await;
    let (status, _) = send(&p, "rejects", None).await;
    assert_eq!(status, 200);
}

#[test]
fn check_runs_policy_tests_and_fails_on_a_wrong_expectation() {
    // Every policy shipped in policies/ passes its own tests.
    let repo = env!("CARGO_MANIFEST_DIR");
    let shipped = std::fs::read_dir(format!("{repo}/policies"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "lua")
        })
        .count();
    let out = std::process::Command::new(BIN)
        .arg("check")
        .current_dir(repo)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{shipped} passed, 0 failed")),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("wrong.lua");
    std::fs::write(
        &bad,
        r#"local P = {}
function P.route(req, backends) return backends[1].name end
P.tests = { { req = { model = "m" }, backends = { { name = "a" }, { name = "b" } }, expect = "b" } }
return P"#,
    )
    .unwrap();
    let broken = dir.path().join("broken.lua");
    std::fs::write(&broken, "local P = {\nreturn P").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check")
        .arg(&bad)
        .arg(&broken)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains(r#"expected ["b"], got ["a"]"#), "{text}");
    assert!(
        text.contains("broken.lua:2:"),
        "compile error names the line: {text}"
    );
    assert!(text.contains("0 passed, 2 failed"), "{text}");
}

#[test]
fn a_wrong_config_is_refused_whole_with_every_problem_listed() {
    // What `switchyard run` says of `yaml` as it exits non-zero.
    let refused = |yaml: &str| refused_config(yaml, &[]);
    let err = refused(
        "routes:\n  - policy: missing_policy\nbackends:\n  - name: a\n    url: ftp://x\n    models: [m]\n    weight: 0\n  - name: a\n    url: http://127.0.0.1:1\n    models: [m]\n",
    );
    for needle in [
        "routes[0].policy: policy `missing_policy` not found",
        "backends[0].url",
        "backends[0].weight: must be > 0",
        "backends[1].name: duplicate backend name `a`",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }

    // Valid shape, but the policy file does not exist.
    let err = refused("routes:\n  - policy: missing_policy\nbackends:\n  - name: a\n    url: http://127.0.0.1:1\n    models: [m]\n");
    assert!(
        err.contains("routes[0].policy: policy `missing_policy` not found"),
        "{err}"
    );

    // Keys that do not exist and values of the wrong type: each misfit by its path.
    let err = refused("routes:\n  - policy: round_robin\n    max_atempts: 3\nbackends:\n  - name: a\n    url: http://127.0.0.1:1\n    models: [m]\n    weight: heavy\nproxy: { max_body_bytes: lots }\n");
    for needle in [
        "(3 problem(s))",
        "routes[0]: unknown field `max_atempts`",
        "backends[0].weight: invalid type",
        "proxy.max_body_bytes: invalid type",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
}

#[test]
fn check_with_a_config_validates_it_and_checks_the_policies_its_routes_use() {
    let dir = tempfile::tempdir().unwrap();
    let policies = write_policies(dir.path(), &[]);
    let path = dir.path().join("c.yaml");
    let check = |yaml: &str| {
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };

    // Valid, with a backend host that only resolves where it will run (a cluster's Service
    // name): check does not resolve it, and checks only the two policies the route uses.
    let good = "policies_dir: policies\nroutes:\n  - policy: least_inflight\n    fallback_policy: round_robin\nbackends:\n  - name: a\n    url: http://model-server.inference.svc.cluster.local:8000\n    models: [m]\n";
    let (ok, text) = check(good);
    assert!(ok, "{text}");
    assert!(text.contains("ok   config"), "{text}");
    assert!(text.contains("2 passed, 0 failed"), "{text}");

    // Every problem by its path, and no policy run.
    let (ok, text) = check("routes:\n  - policy: missing_policy\nbackends:\n  - name: a\n    url: ftp://x\n    models: [m]\n    weight: 0\n");
    assert!(!ok);
    for needle in [
        "FAIL config",
        "backends[0].url",
        "backends[0].weight: must be > 0",
    ] {
        assert!(text.contains(needle), "missing {needle}: {text}");
    }
    let (ok, text) = check(&good.replace("policy: least_inflight", "policy: missing_policy"));
    assert!(!ok);
    assert!(
        text.contains("routes[0].policy: policy `missing_policy` not found"),
        "{text}"
    );

    // A policy the config uses whose own tests fail.
    std::fs::write(
        policies.join("least_inflight.lua"),
        r#"local P = {}
function P.route(req, backends) return backends[1].name end
P.tests = { { req = { model = "m" }, backends = { { name = "a" }, { name = "b" } }, expect = "b" } }
return P"#,
    )
    .unwrap();
    let (ok, text) = check(good);
    assert!(!ok, "{text}");
    assert!(text.contains("FAIL least_inflight"), "{text}");
    assert!(text.contains("1 passed, 1 failed"), "{text}");
}
