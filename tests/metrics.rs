//! `/metrics` after a known traffic mix: exact counts, tokens from usage (plain and
//! streamed), and label values that client input cannot multiply.

mod common;

use common::*;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_exactly_and_stay_bounded() {
    let a = mock("a", &["--chunks", "4"]).await;
    let admin = free_port();
    let config = format!(
        "admin: {{ addr: \"127.0.0.1:{admin}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n  - name: a\n    url: http://127.0.0.1:{}\n    models: [m]\n    cost: {{ input: 1000000, output: 2000000 }}\n",
        a.port
    );
    let p = proxy(&config, &[]).await;
    for _ in 0..3 {
        let (status, _, _) = chat(&p, &chat_body("m", "hello", false)).await;
        assert_eq!(status, 200);
    }
    // Streamed with the usage chunk, and without (then the content events are counted).
    let mut with_usage = chat_body("m", "hello", true);
    with_usage["stream_options"] = serde_json::json!({ "include_usage": true });
    let (status, _, body) = chat(&p, &with_usage).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"usage\""));
    let (status, _, _) = chat(&p, &chat_body("m", "hello", true)).await;
    assert_eq!(status, 200);
    // A flood of made-up model names.
    for i in 0..50 {
        let (status, _, _) = chat(&p, &chat_body(&format!("random-model-{i}"), "x", false)).await;
        assert_eq!(status, 404);
    }

    let text = metrics_text(admin).await;
    assert_eq!(
        value(
            &text,
            "switchyard_requests_total{backend=\"a\",model=\"m\",status=\"200\"}"
        ),
        5.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "switchyard_requests_total{backend=\"none\",model=\"other\",status=\"404\"}"
        ),
        50.0
    );
    assert!(
        !text.contains("random-model"),
        "client input never becomes a label"
    );
    // Every answer has 4 completion tokens (the mock's chunks), streamed or not.
    assert_eq!(
        value(
            &text,
            "switchyard_tokens_total{backend=\"a\",direction=\"out\",model=\"m\"}"
        ),
        20.0,
        "{text}"
    );
    let tokens_in = value(
        &text,
        "switchyard_tokens_total{backend=\"a\",direction=\"in\",model=\"m\"}",
    );
    assert!(tokens_in > 0.0);
    // Prices of 1 and 2 USD per token make the spend easy to check.
    let cost = value(
        &text,
        "switchyard_cost_usd_total{backend=\"a\",tenant=\"anonymous\"}",
    );
    assert!(
        (cost - (tokens_in + 2.0 * 20.0)).abs() < 1e-6,
        "cost {cost}, tokens in {tokens_in}"
    );
    assert_eq!(
        value(
            &text,
            "switchyard_policy_decisions_total{backend=\"a\",policy=\"round_robin\"}"
        ),
        5.0
    );
    assert!(text.contains("switchyard_ttft_seconds_bucket{backend=\"a\",le=\"0.01\"}"));
}
