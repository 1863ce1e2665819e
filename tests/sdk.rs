//! Real clients, unchanged: the official OpenAI Python SDK, the official OpenAI Node SDK
//! and the Anthropic Python SDK each send a plain and a streamed request through
//! Switchyard (with tenant authentication on) to mock backends, and check the content and
//! the usage they parsed (`tests/sdk/*.py`, `tests/sdk/openai_sdk.mjs`). Here we check
//! that each script passed and that the mocks received what the SDKs sent, with the
//! backend's credentials in place of the tenant's.
//!
//! `tests/sdk/setup.sh` installs the SDKs locally the first time (a Python venv in
//! tests/sdk/.venv, node_modules in tests/sdk/node); these tests fail — they do not skip —
//! when that is impossible.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// The tenant key the SDKs are given; only its SHA-256 is configured.
const TENANT_KEY: &str = "sk-switchyard-sdk-test";
/// Content events (= completion tokens) each mock answers with.
const OPENAI_CHUNKS: &str = "7";
const ANTHROPIC_CHUNKS: &str = "5";
/// A script that has not finished by then is killed and fails its test.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

static SETUP: Once = Once::new();

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// `tests/sdk/setup.sh`, once per test binary (the tests wait for it together).
fn setup() {
    SETUP.call_once(|| {
        let status = Command::new("bash")
            .arg(sdk_dir().join("setup.sh"))
            .status()
            .expect("run tests/sdk/setup.sh");
        assert!(
            status.success(),
            "tests/sdk/setup.sh failed ({status}): the SDK tests need python3 with venv, \
             node and npm, and the SDKs from PyPI and npm; see its message above"
        );
    });
    assert!(
        sdk_dir().join(".venv/bin/python").exists()
            && sdk_dir()
                .join("node/node_modules/openai/package.json")
                .exists(),
        "tests/sdk/setup.sh did not install the SDKs (see its output above)"
    );
}

/// Two mocks — one OpenAI-format, one Anthropic-format with its own key — behind the proxy,
/// with one tenant.
struct Stack {
    openai: Proc,
    anthropic: Proc,
    proxy: Proc,
}

async fn stack() -> Stack {
    let openai = mock("oai-mock", &["--chunks", OPENAI_CHUNKS]).await;
    let anthropic = mock("claude-mock", &["--chunks", ANTHROPIC_CHUNKS]).await;
    let config = format!(
        "tenants:\n  - name: sdk\n    key_sha256: [\"{}\"]\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: least_inflight\nbackends:\n{}{}",
        sha256_hex(TENANT_KEY.as_bytes()),
        backend("oai-mock", openai.port, "[gpt-4o-mini]") + "    api_key_env: SY_SDK_OPENAI_KEY\n",
        backend("claude-mock", anthropic.port, "[claude-haiku]")
            + "    provider: anthropic\n    api_key_env: SY_SDK_ANTHROPIC_KEY\n",
    );
    let proxy = proxy_with_env(
        &config,
        &[],
        &[
            ("SY_SDK_OPENAI_KEY", "sk-backend-openai"),
            ("SY_SDK_ANTHROPIC_KEY", "sk-backend-anthropic"),
        ],
    )
    .await;
    Stack {
        openai,
        anthropic,
        proxy,
    }
}

/// Run one SDK script to its end (bounded by [`SCRIPT_TIMEOUT`]); panics with its output
/// and the proxy's last log lines unless it exits 0.
async fn run_script(proxy: &Proc, program: PathBuf, args: Vec<String>) -> String {
    let what = format!("{} {}", program.display(), args.join(" "));
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&program)
            .args(&args)
            .current_dir(sdk_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let deadline = Instant::now() + SCRIPT_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let log = proxy.output();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "{what} failed ({}):\n{stdout}\n{stderr}\nlast lines of the proxy log:\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    stdout
}

fn python() -> PathBuf {
    sdk_dir().join(".venv/bin/python")
}

/// What a mock received: exactly one plain and one streamed request on `path`, each from
/// an SDK whose user agent starts with `agent`, with `credential` = `key`.
fn assert_received(got: &[Value], path: &str, agent: &str, credential: &str, key: &str) {
    assert_eq!(got.len(), 2, "one plain and one streamed request: {got:?}");
    let streams: Vec<bool> = got.iter().map(|r| r["stream"] == true).collect();
    assert_eq!(streams, [false, true], "{got:?}");
    for r in got {
        let h = &r["headers"];
        assert_eq!(r["path"], path);
        assert!(
            h["user-agent"].as_str().unwrap_or("").starts_with(agent),
            "sent by the SDK: {h}"
        );
        assert_eq!(h[credential], key, "the backend's own key: {h}");
        let text = h.to_string();
        assert!(
            !text.contains(TENANT_KEY),
            "the tenant key never goes upstream: {h}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_plain_and_streamed() {
    setup();
    let s = stack().await;
    let out = run_script(
        &s.proxy,
        python(),
        vec![
            sdk_dir().join("openai_sdk.py").display().to_string(),
            s.proxy.url("/v1"),
            TENANT_KEY.into(),
            "gpt-4o-mini".into(),
            "oai-mock".into(),
            OPENAI_CHUNKS.into(),
        ],
    )
    .await;
    assert!(out.contains("openai_sdk.py: ok"), "{out}");
    assert_received(
        &received(&s.openai).await,
        "/v1/chat/completions",
        "OpenAI/Python",
        "authorization",
        "Bearer sk-backend-openai",
    );
    assert!(received(&s.anthropic).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_node_sdk_plain_and_streamed() {
    setup();
    let s = stack().await;
    let out = run_script(
        &s.proxy,
        PathBuf::from("node"),
        vec![
            sdk_dir().join("openai_sdk.mjs").display().to_string(),
            s.proxy.url("/v1"),
            TENANT_KEY.into(),
            "gpt-4o-mini".into(),
            "oai-mock".into(),
            OPENAI_CHUNKS.into(),
        ],
    )
    .await;
    assert!(out.contains("openai_sdk.mjs: ok"), "{out}");
    assert_received(
        &received(&s.openai).await,
        "/v1/chat/completions",
        "OpenAI/JS",
        "authorization",
        "Bearer sk-backend-openai",
    );
    assert!(received(&s.anthropic).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_sdk_plain_and_streamed() {
    setup();
    let s = stack().await;
    let out = run_script(
        &s.proxy,
        python(),
        vec![
            sdk_dir().join("anthropic_sdk.py").display().to_string(),
            s.proxy.url(""),
            TENANT_KEY.into(),
            "claude-haiku".into(),
            "claude-mock".into(),
            ANTHROPIC_CHUNKS.into(),
        ],
    )
    .await;
    assert!(out.contains("anthropic_sdk.py: ok"), "{out}");
    let got = received(&s.anthropic).await;
    assert_received(
        &got,
        "/v1/messages",
        "Anthropic/Python",
        "x-api-key",
        "sk-backend-anthropic",
    );
    for r in &got {
        assert!(
            r["headers"]["anthropic-version"].is_string(),
            "the SDK's anthropic-version is kept: {r}"
        );
    }
    assert!(received(&s.openai).await.is_empty());
}
