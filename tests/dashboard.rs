//! The admin dashboard (`GET /` on the admin listener) in a real browser: Debian's
//! headless Chromium, driven by playwright-core (`tests/browser/`), against the real
//! binary and mock backends under live traffic. The browser script checks what a person
//! would see and saves `test-output/dashboard/dashboard.png`.
//!
//! Needs node, npm and Chromium; `tests/browser/setup.sh` installs what is missing and
//! this test fails — it does not skip — when they cannot be had.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The traffic loop stops by itself after this long, or this many requests.
const TRAFFIC_MAX: Duration = Duration::from_secs(120);
const TRAFFIC_MAX_REQUESTS: u64 = 20_000;
/// Concurrent clients in the traffic loop, and each one's pause between requests.
const TRAFFIC_WORKERS: usize = 4;
const TRAFFIC_PAUSE: Duration = Duration::from_millis(40);

/// Saved over the running `least_inflight` while traffic flows: its own test fails, so
/// the reload is refused, the old version keeps serving, and the page shows why.
const LEAST_INFLIGHT_BROKEN: &str = r#"
local P = { name = "least_inflight" }
function P.route(req, backends) return backends[#backends].name end
P.tests = { { name = "fewest in flight first", req = { model = "m" },
              backends = { { name = "a", inflight = 0 }, { name = "b", inflight = 5 } },
              expect = { "a" } } }
return P
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_backends_traffic_policies_and_decisions_in_a_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    run_setup(&browser_dir);

    // Three backends that differ in speed (and one that fails now and then), and a fourth
    // that the operator drains, so every column and badge has something to show.
    let fast = mock(
        "vllm-eu-1",
        &args("--latency-ms 12 --chunks 24 --chunk-delay-ms 2"),
    )
    .await;
    let slow = mock(
        "vllm-eu-2",
        &args("--latency-ms 45 --chunks 16 --chunk-delay-ms 3"),
    )
    .await;
    let flaky = mock(
        "openai-us",
        &args("--latency-ms 90 --chunks 12 --chunk-delay-ms 5 --fail-rate 0.03"),
    )
    .await;
    let spare = mock("tgi-spare", &[]).await;
    let admin = free_port();
    let backends = [
        backend("vllm-eu-1", fast.port, "[llama-3.1-8b]")
            + "    weight: 5\n    region: eu-west\n    max_inflight: 64\n",
        backend("vllm-eu-2", slow.port, "[llama-3.1-8b]") + "    weight: 3\n    region: eu-west\n",
        backend("openai-us", flaky.port, "[llama-3.1-8b, gpt-4o-mini]")
            + "    weight: 2\n    region: us-east\n",
        backend("tgi-spare", spare.port, "[llama-3.1-8b, gpt-4o-mini]") + "    region: eu-west\n",
    ]
    .concat();
    let config = format!(
        r#"admin: {{ addr: "127.0.0.1:{admin}" }}
routes:
  - match: {{ path_prefix: /v1/, model: "gpt-4o-mini" }}
    policy: least_inflight
  - match: {{ path_prefix: /v1/ }}
    policy: weighted
backends:
{backends}"#
    );
    let proxy = proxy(&config, &[]).await;
    let admin_url = format!("http://127.0.0.1:{admin}");

    let drained = client()
        .post(format!("{admin_url}/admin/backends/tgi-spare/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200, "drain tgi-spare");

    // A refused hot swap: the old least_inflight keeps serving, the reason is on the page.
    std::fs::write(
        proxy.dir().join("policies/least_inflight.lua"),
        LEAST_INFLIGHT_BROKEN,
    )
    .unwrap();
    wait_for_rejection(&admin_url, "least_inflight").await;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn(traffic_loop(
        proxy.url("/v1/chat/completions"),
        stop.clone(),
        sent.clone(),
    ));
    // A few seconds of traffic first, so latencies and the decision log are filled in.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outdir = root.join("test-output/dashboard");
    let _ = std::fs::remove_file(outdir.join("dashboard.png"));
    let script = browser_dir.join("dashboard.mjs");
    let dashboard_url = format!("{admin_url}/");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .arg(&dashboard_url)
            .arg(&outdir)
            .env("DASHBOARD_EXPECT_TRAFFIC", "vllm-eu-1,vllm-eu-2,openai-us")
            .env("DASHBOARD_EXPECT_REJECTED", "least_inflight")
            .env("DASHBOARD_EXPECT_STATUS", "tgi-spare=draining")
            // Long enough for the chart to show a stretch of history in the screenshot.
            .env("DASHBOARD_SETTLE_MS", "25000")
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run node (install nodejs and npm): {e}"));
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let log = proxy.output();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "the browser checks failed ({}):\n{stdout}\n{stderr}\nlast lines of the proxy log:\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    println!("{stdout}");
    assert!(
        sent.load(Ordering::Relaxed) > 50,
        "the traffic loop sent requests"
    );

    let png = std::fs::read(root.join("test-output/dashboard/dashboard.png"))
        .expect("the browser script saved test-output/dashboard/dashboard.png");
    let (width, height) = png_size(&png).expect("dashboard.png is a PNG");
    assert_eq!((width, height), (1366, 768), "a laptop-sized screenshot");
    assert!(
        png.len() > 30_000,
        "a screenshot with content, not a blank page: {} bytes",
        png.len()
    );
}

/// `tests/browser/setup.sh`: Chromium from Debian, playwright-core from npm.
fn run_setup(browser_dir: &Path) {
    let status = Command::new("bash")
        .arg(browser_dir.join("setup.sh"))
        .status()
        .expect("run tests/browser/setup.sh");
    assert!(
        status.success(),
        "tests/browser/setup.sh failed ({status}): the dashboard test needs node, npm and \
         Chromium (apt-get install chromium nodejs npm) and playwright-core from npm; \
         see its message above"
    );
    let playwright: PathBuf = browser_dir.join("node_modules/playwright-core/package.json");
    assert!(
        playwright.exists(),
        "playwright-core is not in tests/browser/node_modules"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing"
    );
}

/// Wait until `GET /admin/policies` reports a refused version of `name`.
async fn wait_for_rejection(admin_url: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = get_json(format!("{admin_url}/admin/policies")).await;
        let refused = v["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == name && !p["last_rejection"].is_null());
        if refused {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the broken {name} was not refused: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Steady, bounded chat traffic (plain and streamed, two models) until `stop`, the time
/// limit or the request limit.
async fn traffic_loop(url: String, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deadline = Instant::now() + TRAFFIC_MAX;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..TRAFFIC_WORKERS {
        let (client, url, stop, sent) = (client.clone(), url.clone(), stop.clone(), sent.clone());
        workers.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && sent.fetch_add(1, Ordering::Relaxed) < TRAFFIC_MAX_REQUESTS
            {
                i += 1;
                let model = if (i + w as u64).is_multiple_of(5) {
                    "gpt-4o-mini"
                } else {
                    "llama-3.1-8b"
                };
                let stream = rand::random::<f64>() < 0.35;
                let body = chat_body(model, &format!("worker {w} request {i}"), stream);
                if let Ok(r) = client.post(&url).json(&body).send().await {
                    let _ = r.bytes().await;
                }
                tokio::time::sleep(TRAFFIC_PAUSE).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// Command-line arguments from one string.
fn args(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&png[16..20]), be(&png[20..24])))
}
