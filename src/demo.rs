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

/// The demo's mock backends: the name of the config's backend each serves (on its URL's
/// port), latency before the answer, gap between chunks.
const MOCKS: [(&str, u64, u64); 3] = [
    ("mock-eu-1", 20, 80),
    ("mock-eu-2", 40, 80),
    ("mock-us-1", 120, 150),
];

/// Ports to move the demo to, all on 127.0.0.1; `None` keeps `conf/demo.yaml`'s.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ports {
    /// The proxy.
    pub proxy: Option<u16>,
    /// The dashboard, metrics and admin API.
    pub admin: Option<u16>,
    /// The first mock backend; the others take the next ports, in [`MOCKS`]' order.
    pub mocks: Option<u16>,
}

pub fn run(ports: Ports) -> anyhow::Result<()> {
    let mut config = Config::parse(&demo_config(ports)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (dir, scratch) = policies_dir()?;
    config.policies_dir = dir;
    let mock_ports = start_mocks(&config)?;
    let addr = config.listen[0].addr.clone();
    let mock_ports: Vec<String> = mock_ports.iter().map(u16::to_string).collect();
    println!(
        "Switchyard demo: {} mock backends on 127.0.0.1 ports {}, proxy on http://{addr}",
        MOCKS.len(),
        mock_ports.join(", ")
    );
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

/// `conf/demo.yaml` with its addresses moved to `ports`.
fn demo_config(ports: Ports) -> anyhow::Result<String> {
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(DEMO_CONFIG)?;
    let local = |port: u16| serde_yaml::Value::from(format!("127.0.0.1:{port}"));
    if let Some(port) = ports.proxy {
        yaml["listen"][0]["addr"] = local(port);
    }
    if let Some(port) = ports.admin {
        yaml["admin"]["addr"] = local(port);
    }
    if let Some(first) = ports.mocks {
        let backends = yaml["backends"]
            .as_sequence_mut()
            .context("the demo config lists backends")?;
        for (i, (name, ..)) in MOCKS.into_iter().enumerate() {
            let port = u16::try_from(i)
                .ok()
                .and_then(|i| first.checked_add(i))
                .with_context(|| {
                    format!(
                        "--mock-port {first} leaves no room for {} mocks",
                        MOCKS.len()
                    )
                })?;
            let backend = backends
                .iter_mut()
                .find(|b| b["name"].as_str() == Some(name))
                .with_context(|| format!("the demo config has no backend {name}"))?;
            backend["url"] = serde_yaml::Value::from(format!("http://127.0.0.1:{port}"));
        }
    }
    Ok(serde_yaml::to_string(&yaml)?)
}

/// The port of the configured backend named `name`, which a demo mock serves.
fn mock_port(config: &Config, name: &str) -> anyhow::Result<u16> {
    let backend = config
        .backends
        .iter()
        .find(|b| b.name == name)
        .with_context(|| format!("the demo config has no backend {name}"))?;
    crate::backends::Upstream::parse(&backend.url)
        .map(|u| u.port)
        .map_err(|e| anyhow::anyhow!("the demo backend {name}: {e}"))
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

/// Bind the mocks' ports, those of `config`'s backends they serve, now (so a busy port is
/// reported before anything starts) and serve them on a runtime of their own; the ports.
fn start_mocks(config: &Config) -> anyhow::Result<Vec<u16>> {
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    for (name, latency_ms, chunk_delay_ms) in MOCKS {
        let port = mock_port(config, name)?;
        ports.push(port);
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
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(config: &Config) -> (String, String, Vec<String>) {
        (
            config.listen[0].addr.clone(),
            config
                .admin
                .as_ref()
                .expect("an admin listener")
                .addr
                .clone(),
            config.backends.iter().map(|b| b.url.clone()).collect(),
        )
    }

    #[test]
    fn the_ports_move_every_address_and_nothing_else() {
        let embedded = Config::parse(DEMO_CONFIG).unwrap();
        let unmoved = Config::parse(&demo_config(Ports::default()).unwrap()).unwrap();
        assert_eq!(addresses(&unmoved), addresses(&embedded));
        let mocks = |c: &Config| {
            MOCKS
                .iter()
                .map(|(name, ..)| mock_port(c, name).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(mocks(&embedded), [18101, 18102, 18103]);

        let moved = Ports {
            proxy: Some(28080),
            admin: Some(29090),
            mocks: Some(28101),
        };
        let config = Config::parse(&demo_config(moved).unwrap()).unwrap();
        assert_eq!(
            addresses(&config),
            (
                "127.0.0.1:28080".to_string(),
                "127.0.0.1:29090".to_string(),
                ["28101", "28102", "28103"]
                    .map(|p| format!("http://127.0.0.1:{p}"))
                    .to_vec()
            )
        );
        assert_eq!(mocks(&config), [28101, 28102, 28103]);
        // The rest is the embedded config's.
        assert_eq!(config.routes.len(), embedded.routes.len());
        let names = |c: &Config| {
            c.backends
                .iter()
                .map(|b| b.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&config), names(&embedded));

        let no_room = Ports {
            mocks: Some(u16::MAX - 1),
            ..Ports::default()
        };
        assert!(demo_config(no_room).is_err());
    }
}
