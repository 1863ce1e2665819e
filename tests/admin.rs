//! The admin API on the wire: backends added and removed at run time, the effective config
//! with secrets masked, the optional bearer token, and trace context sent upstream.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_and_removed_at_run_time_take_and_lose_traffic() {
    let a = mock("a", &[]).await;
    let b = mock("b", &[]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\", token_env: SWITCHYARD_TEST_ADMIN_TOKEN }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}tenants:\n  - name: acme\n    key_sha256: [\"{}\"]\n",
        backend("a", a.port, "[m]"),
        sha256_hex(b"sk-acme")
    );
    let p = proxy_with_env(
        &config,
        &[],
        &[("SWITCHYARD_TEST_ADMIN_TOKEN", "admin-secret")],
    )
    .await;
    let base = format!("http://127.0.0.1:{admin}");
    let auth = ("authorization", "Bearer admin-secret");
    let send = |n: usize| {
        let url = p.url("/v1/chat/completions");
        async move {
            let mut served = Vec::new();
            for _ in 0..n {
                let r = client()
                    .post(&url)
                    .header("authorization", "Bearer sk-acme")
                    .json(&chat_body("m", "hi", false))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                served.push(served_by(r.headers()));
            }
            served
        }
    };

    // Without the token: refused; the page and /healthz stay open.
    for path in ["/admin/backends", "/metrics", "/admin/config"] {
        assert_eq!(
            client()
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            401,
            "{path}"
        );
    }
    assert_eq!(
        client()
            .get(format!("{base}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    assert!(send(4).await.iter().all(|s| s == "a"));
    let added = client()
        .post(format!("{base}/admin/backends"))
        .header(auth.0, auth.1)
        .json(&serde_json::json!({ "name": "b", "url": format!("http://127.0.0.1:{}", b.port), "models": ["m"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    assert!(
        send(6).await.iter().any(|s| s == "b"),
        "the new backend takes traffic on the next requests"
    );

    // A backend the config would refuse is refused whole, with the reason.
    let bad = client()
        .post(format!("{base}/admin/backends"))
        .header(auth.0, auth.1)
        .json(&serde_json::json!({ "name": "c", "url": "ftp://nowhere", "models": ["m"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    assert!(bad
        .text()
        .await
        .unwrap()
        .contains("must start with http://"));

    let scrape = || metrics_text_with(admin, Some("admin-secret"));
    assert!(scrape()
        .await
        .contains("switchyard_backend_healthy{backend=\"a\"} 1"));
    let removed = client()
        .delete(format!("{base}/admin/backends/a"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    let before = received(&a).await.len();
    assert!(send(6).await.iter().all(|s| s == "b"));
    assert_eq!(
        received(&a).await.len(),
        before,
        "a removed backend gets nothing more"
    );

    let config: serde_json::Value = client()
        .get(format!("{base}/admin/config"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["tenants"][0]["key_sha256"][0], "***");
    assert_eq!(config["backends"].as_array().unwrap().len(), 1);
    let text = config.to_string();
    assert!(!text.contains(&sha256_hex(b"sk-acme")) && !text.contains("admin-secret"));
    let metrics = scrape().await;
    assert!(
        metrics.contains("switchyard_backend_healthy{backend=\"b\"} 1"),
        "{metrics}"
    );
    // The removed backend's gauges are gone, not frozen at their last value.
    assert!(
        !metrics.contains("switchyard_backend_healthy{backend=\"a\"}")
            && !metrics.contains("switchyard_backend_inflight{backend=\"a\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_is_passed_through_or_created() {
    let a = mock("a", &[]).await;
    let p = proxy(
        &format!(
            "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
            backend("a", a.port, "[m]")
        ),
        &[],
    )
    .await;
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    client()
        .post(p.url("/v1/chat/completions"))
        .header("traceparent", given)
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    client()
        .post(p.url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    let seen = received(&a).await;
    assert_eq!(seen[0]["headers"]["traceparent"], given);
    let created = seen[1]["headers"]["traceparent"].as_str().unwrap();
    assert!(
        created.starts_with("00-") && created.len() == 55 && created.ends_with("-01"),
        "{created}"
    );
    assert!(seen[1]["headers"]["x-request-id"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_admin_token_and_names_what_waits_for_a_restart() {
    let a = mock("a", &[]).await;
    let admin = free_port();
    let rest = format!(
        "routes:\n  - policy: round_robin\nbackends:\n{}",
        backend("a", a.port, "[m]")
    );
    let p = proxy_with_env(
        &format!("admin: {{ addr: \"127.0.0.1:{admin}\", token_env: SY_TEST_TOKEN_OLD }}\n{rest}"),
        &[],
        &[
            ("SY_TEST_TOKEN_OLD", "old-admin-secret"),
            ("SY_TEST_TOKEN_NEW", "new-admin-secret"),
        ],
    )
    .await;
    let policies = format!("http://127.0.0.1:{admin}/admin/policies");
    let status_with = |token: &'static str| {
        let url = policies.clone();
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status_with("old-admin-secret").await, 200);
    assert_eq!(status_with("new-admin-secret").await, 401);

    // The token moves to another variable, and settings read only at start change too.
    let path = p.dir().join("switchyard.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = text
        .replace("SY_TEST_TOKEN_OLD", "SY_TEST_TOKEN_NEW")
        .replace("threads: 2", "threads: 3");
    assert_ne!(changed, text);
    std::fs::write(&path, changed).unwrap();
    // The watcher sees the file change; the signal makes sure (a second reload is a no-op).
    p.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status_with("new-admin-secret").await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new token never worked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status_with("old-admin-secret").await, 401);
    let log = p
        .wait_log("`proxy.threads` changed since the process started")
        .await;
    assert!(!log.contains("`listen`"), "listen did not change:\n{log}");

    // A config without `admin:` cannot open the listener that still runs.
    let text = std::fs::read_to_string(&path).unwrap();
    let without_admin: String = text
        .lines()
        .filter(|l| !l.starts_with("admin:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_admin, text);
    std::fs::write(&path, without_admin).unwrap();
    p.signal("HUP");
    p.wait_log("`admin.addr`, `proxy.threads` changed since the process started")
        .await;
    assert_eq!(status_with("new-admin-secret").await, 200);
    let open = client().get(&policies).send().await.unwrap();
    assert_eq!(open.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_at_the_same_time_are_all_kept() {
    let a = mock("a", &[]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
        backend("a", a.port, "[m]"),
    );
    let _p = proxy(&config, &[]).await;
    let url = format!("http://127.0.0.1:{admin}/admin/backends");
    // Each change is made to the config in service when it is applied, not to a copy taken
    // before another change landed.
    let adds = (0..8).map(|i| {
        let url = url.clone();
        let body = serde_json::json!({
            "name": format!("x{i}"),
            "url": format!("http://127.0.0.1:{}", a.port),
            "models": ["m"],
        });
        async move {
            client()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let statuses = futures_util::future::join_all(adds).await;
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    let listed: serde_json::Value = get_json(url.clone()).await;
    let mut names: Vec<String> = listed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut expected: Vec<String> = (0..8).map(|i| format!("x{i}")).collect();
    expected.insert(0, "a".into());
    assert_eq!(names, expected);
    // A second add of a name is refused, and a removal of an unknown one is 404.
    let again = serde_json::json!({ "name": "x0", "url": format!("http://127.0.0.1:{}", a.port), "models": ["m"] });
    assert_eq!(
        client()
            .post(&url)
            .json(&again)
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        client()
            .delete(format!("{url}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_named_with_a_space_is_drained_and_removed_by_its_encoded_name() {
    let a = mock("a", &[]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
        backend("a", a.port, "[m]")
    );
    let _p = proxy(&config, &[]).await;
    let base = format!("http://127.0.0.1:{admin}/admin/backends");
    let added = client()
        .post(&base)
        .json(&serde_json::json!({ "name": "sp ace", "url": format!("http://127.0.0.1:{}", a.port), "models": ["m"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let drained = client()
        .post(format!("{base}/sp%20ace/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200, "{}", drained.text().await.unwrap());
    let removed = client()
        .delete(format!("{base}/sp%20ace"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_admin_token_locks_the_admin_api_instead_of_opening_it() {
    let a = mock("a", &[]).await;
    let admin = free_port();
    let p = proxy_with_env(
        &format!(
            "admin: {{ addr: \"127.0.0.1:{admin}\", token_env: SY_TEST_TOKEN_EMPTY }}\n\
             routes:\n  - policy: round_robin\nbackends:\n{}",
            backend("a", a.port, "[m]")
        ),
        &[],
        &[("SY_TEST_TOKEN_EMPTY", "")],
    )
    .await;
    p.wait_log("`SY_TEST_TOKEN_EMPTY` is empty").await;
    let policies = format!("http://127.0.0.1:{admin}/admin/policies");
    let bare = client().get(&policies).send().await.unwrap();
    assert_eq!(bare.status(), 401);
    let empty_bearer = client()
        .get(&policies)
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    assert_eq!(empty_bearer.status(), 401);
    let health = client()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
