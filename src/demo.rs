//! `switchyard demo`: the embedded demo config served with three mock backends started in
//! this process, so a new user sees routing happen with no API keys and no set-up.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;
use crate::mock::{self, MockOptions};
use crate::server::{self, RunOptions};

/// The demo config (`conf/demo.yaml`), built into the binary.
pub const DEMO_CONFIG: &str = include_str!("../conf/demo.yaml");

/// The built-in policies, so the demo runs outside a checkout too.
pub const BUILTIN_POLICIES: &[(&str, &str)] = &[
    ("round_robin", include_str!("../policies/round_robin.lua")),
    (
        "least_inflight",
        include_str!("../policies/least_inflight.lua"),
    ),
    ("weighted", include_str!("../policies/weighted.lua")),
    (
        "random_two_choices",
        include_str!("../policies/random_two_choices.lua"),
    ),
    ("latency", include_str!("../policies/latency.lua")),
    ("cost", include_str!("../policies/cost.lua")),
    ("content", include_str!("../policies/content.lua")),
    ("governance", include_str!("../policies/governance.lua")),
    ("canary", include_str!("../policies/canary.lua")),
    ("affinity", include_str!("../policies/affinity.lua")),
    ("predictive", include_str!("../policies/predictive.lua")),
    ("failover", include_str!("../policies/failover.lua")),
];

/// The demo's mock backends: port, name, latency before the answer, gap between chunks.
const MOCKS: [(u16, &str, u64, u64); 3] = [
    (18101, "mock-eu-1", 20, 80),
    (18102, "mock-eu-2", 40, 80),
    (18103, "mock-us-1", 120, 150),
];

pub fn run() -> anyhow::Result<()> {
    let mut config = Config::parse(DEMO_CONFIG).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (dir, scratch) = policies_dir()?;
    config.policies_dir = dir;
    start_mocks()?;
    let addr = config.listen[0].addr.clone();
    println!("Switchyard demo: 3 mock backends on 127.0.0.1:18101-18103, proxy on http://{addr}");
    println!(
        "Policies from {}; routes in the embedded conf/demo.yaml.",
        config.policies_dir.display()
    );
    println!();
    println!("A plain request (round robin over three backends; see x-switchyard-backend):");
    println!("  curl -si http://{addr}/v1/chat/completions -H 'content-type: application/json' \\");
    println!("    -d '{{\"model\":\"demo-small\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
    println!();
    println!("A streamed request (least in flight, falling back to round robin):");
    println!("  curl -sN http://{addr}/v1/chat/completions -H 'content-type: application/json' \\");
    println!("    -d '{{\"model\":\"demo-large\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
    println!();
    println!("The models: curl -s http://{addr}/v1/models");
    if let Some(admin) = &config.admin {
        println!(
            "The live dashboard: http://{}/  (metrics at /metrics)",
            admin.addr
        );
    }
    println!();
    let opts = RunOptions {
        upgrade: false,
        scratch,
    };
    server::run(config, None, opts)
}

/// `./policies` when run from a checkout, else the built-in policies written to a new
/// temporary directory, returned too: the server removes it when it stops.
fn policies_dir() -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let local = Path::new("policies");
    if BUILTIN_POLICIES
        .iter()
        .all(|(name, _)| local.join(format!("{name}.lua")).is_file())
    {
        return Ok((local.to_path_buf(), None));
    }
    let scratch = tempfile::Builder::new()
        .prefix("switchyard-demo-")
        .tempdir()
        .context("creating a temporary directory for the demo's policies")?;
    for (name, source) in BUILTIN_POLICIES {
        let file = scratch.path().join(format!("{name}.lua"));
        std::fs::write(&file, source).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok((scratch.path().to_path_buf(), Some(scratch)))
}

/// Bind the mocks' ports now (so a busy port is reported before anything starts) and
/// serve them on a runtime of their own.
fn start_mocks() -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for (port, name, latency_ms, chunk_delay_ms) in MOCKS {
        let l = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("demo mock {name} cannot listen on 127.0.0.1:{port}"))?;
        l.set_nonblocking(true)?;
        let opts = MockOptions {
            name: name.to_string(),
            latency_ms,
            chunk_delay_ms,
            ..MockOptions::default()
        };
        listeners.push((l, opts));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("demo-mocks".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, opts) in listeners {
                    let l = tokio::net::TcpListener::from_std(l)
                        .expect("a bound std listener converts");
                    tasks.push(tokio::spawn(mock::serve(l, opts)));
                }
                for t in tasks {
                    if let Ok(Err(e)) = t.await {
                        log::error!("demo mock stopped: {e}");
                    }
                }
            })
        })?;
    Ok(())
}
