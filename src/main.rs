//! The `switchyard` command line: serve a config, run the demo or a mock backend, check
//! policies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use switchyard::config::{Config, LuaConfig};
use switchyard::mock::MockOptions;
use switchyard::policy::{testing, Policy};

/// mimalloc rather than glibc's allocator: a request allocates and frees many small
/// buffers, often on different threads (measured with callgrind: malloc and free were ~20%
/// of the instructions per request with glibc). See `switchyard::alloc`.
#[global_allocator]
static ALLOCATOR: switchyard::alloc::MiMalloc = switchyard::alloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A programmable load balancer for AI inference traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a config file.
    Run {
        /// The YAML config file (re-read on SIGHUP, `POST /admin/reload`, or when it changes).
        #[arg(long, short)]
        config: PathBuf,
        /// Take over the listening sockets of a running instance (graceful upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Serve the embedded demo config with three mock backends started in-process.
    Demo {
        /// The proxy's port (conf/demo.yaml's: 8080).
        #[arg(long)]
        port: Option<u16>,
        /// The port of the dashboard, metrics and admin API (9090).
        #[arg(long)]
        admin_port: Option<u16>,
        /// The first mock backend's port; the other two take the next ports (18101).
        #[arg(long)]
        mock_port: Option<u16>,
    },
    /// Serve the mock backend, OpenAI- and Anthropic-compatible (for tests, benchmarks and
    /// trying things).
    Mock {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Its name: in `x-mock-backend`, `/health`, the models' `owned_by` and its answers.
        #[arg(long, default_value = "mock")]
        name: String,
        /// Delay before the response headers.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Content chunks of a streamed answer (words of a plain one).
        #[arg(long, default_value_t = 8)]
        chunks: u32,
        /// Gap between streamed chunks.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
        /// Share of requests answered --fail-status (0..1).
        #[arg(long, default_value_t = 0.0, value_parser = share)]
        fail_rate: f64,
        /// The status of the --fail-rate share: 500 to 599.
        #[arg(long, default_value_t = 503, value_parser = clap::value_parser!(u16).range(500..=599))]
        fail_status: u16,
        /// Share of requests answered 429 with Retry-After (0..1).
        #[arg(long, default_value_t = 0.0, value_parser = share)]
        rate_limit_rate: f64,
        /// Retry-After seconds on a 429.
        #[arg(long, default_value_t = 1)]
        retry_after_s: u64,
        /// Answer every request at once, without reading its body: --fail-status or 429 as
        /// the rates draw, else 413 (as a server that refuses a body by its head).
        #[arg(long)]
        early: bool,
        /// Serve TLS with this PEM certificate chain (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Compile policies and run their `tests` tables; with `--config`, validate the config
    /// file first. Exit non-zero on any failure.
    Check {
        /// A config file: validated as `run` would (except that backend hosts are not
        /// resolved); its routes' policies are checked, from its `policies_dir`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Policy files (default: the config's policies, else every `*.lua` in ./policies).
        files: Vec<PathBuf>,
    },
    /// Work with audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Benchmark-only bare Pingora round-robin pass-through (no body read, no Lua); with
    /// --config, plus Switchyard's body read, metadata extraction and policy decision over
    /// that config's routes and backends, and nothing else.
    #[command(hide = true)]
    Bare {
        #[arg(long)]
        listen: String,
        #[arg(long = "upstream", required_unless_present = "config")]
        upstreams: Vec<SocketAddr>,
        #[arg(long, conflicts_with = "upstreams")]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check a chained audit file: every line intact and in order. Exit non-zero if not.
    Verify { file: PathBuf },
}

fn main() -> ExitCode {
    switchyard::logging::init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config, upgrade } => {
            let (loaded, text) = Config::load_with_text(&config)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            switchyard::server::run(
                loaded,
                Some((config, text)),
                switchyard::server::RunOptions {
                    upgrade,
                    scratch: None,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            port,
            admin_port,
            mock_port,
        } => {
            switchyard::demo::run(switchyard::demo::Ports {
                proxy: port,
                admin: admin_port,
                mocks: mock_port,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mock {
            port,
            host,
            name,
            latency_ms,
            chunks,
            chunk_delay_ms,
            fail_rate,
            fail_status,
            rate_limit_rate,
            retry_after_s,
            early,
            tls_cert,
            tls_key,
        } => {
            let opts = MockOptions {
                name,
                latency_ms,
                chunks,
                chunk_delay_ms,
                fail_rate,
                fail_status: http::StatusCode::from_u16(fail_status)?,
                rate_limit_rate,
                retry_after_s,
                early,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let tls = match (&tls_cert, &tls_key) {
                (Some(cert), Some(key)) => Some(switchyard::mock::tls_acceptor(cert, key)?),
                _ => None,
            };
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                    .await
                    .with_context(|| format!("mock cannot listen on {host}:{port}"))?;
                log::info!(
                    "mock backend {} on {}{}",
                    opts.name,
                    listener.local_addr()?,
                    if tls.is_some() { " (TLS)" } else { "" }
                );
                switchyard::mock::serve_with_tls(listener, opts, tls).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config, files } => check(config, files),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match switchyard::audit::verify(&file) {
            Ok(lines) => {
                println!("ok: {} line(s), chain intact", lines);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("FAILED: {}: {e}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Bare {
            listen,
            upstreams,
            config,
            threads,
        } => {
            let config = match config {
                Some(path) => Some(
                    Config::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                ),
                None => None,
            };
            switchyard::bare::run(&listen, upstreams, config, threads)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `switchyard check`: the config's problems, if one is given; then one line per policy
/// case and a summary per policy.
fn check(config: Option<PathBuf>, mut files: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut limits = LuaConfig::default();
    // With a config, a test case may not return a name none of its backends has.
    let mut configured: Option<Vec<String>> = None;
    if let Some(path) = config {
        let loaded = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                println!("FAIL config {}: {e}", path.display());
                return Ok(ExitCode::FAILURE);
            }
        };
        println!(
            "ok   config {}: {} listener(s), {} route(s), {} backend(s)",
            path.display(),
            loaded.listen.len(),
            loaded.routes.len(),
            loaded.backends.len()
        );
        if files.is_empty() {
            files = loaded
                .policy_names()
                .iter()
                .map(|name| loaded.policies_dir.join(format!("{name}.lua")))
                .collect();
        }
        configured = Some(loaded.backend_names());
        limits = loaded.lua;
    }
    if files.is_empty() {
        for entry in std::fs::read_dir("policies").context("reading ./policies")? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "lua") {
                files.push(path);
            }
        }
        files.sort();
    }
    let mut failed = 0;
    for file in &files {
        let policy = match Policy::read(file) {
            Ok(p) => p,
            Err(e) => {
                println!("FAIL {e}");
                failed += 1;
                continue;
            }
        };
        let report = testing::run(&policy, &limits, configured.as_deref());
        let label = format!(
            "{} ({}, version {})",
            policy.name,
            file.display(),
            policy.version
        );
        if let Some(e) = &report.load_error {
            println!("FAIL {label}: {e}");
            failed += 1;
            continue;
        }
        for case in &report.cases {
            let name = case
                .name
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default();
            if case.passed {
                println!(
                    "  ok   {}#{}{name}: {}",
                    policy.name, case.index, case.actual
                );
            } else {
                println!(
                    "  FAIL {}#{}{name}: expected {}, got {}",
                    policy.name, case.index, case.expected, case.actual
                );
            }
        }
        let bad = report.cases.iter().filter(|c| !c.passed).count();
        if bad == 0 {
            println!("ok   {label}: {} case(s) passed", report.cases.len());
        } else {
            println!(
                "FAIL {label}: {bad} of {} case(s) failed",
                report.cases.len()
            );
            failed += 1;
        }
    }
    println!("{} passed, {} failed", files.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A share of requests, from 0 to 1.
fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{text}` is not a share from 0 to 1")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_share_is_from_0_to_1() {
        assert_eq!(super::share("0.25"), Ok(0.25));
        assert_eq!(super::share("1"), Ok(1.0));
        for bad in ["5", "-0.1", "NaN", "half"] {
            assert!(super::share(bad).is_err(), "{bad}");
        }
    }
}
