//! Assembling and running the Pingora server from a config: the proxy service on every
//! listener (cleartext HTTP/1.1, or TLS with HTTP/2 and HTTP/1.1), with server settings (threads, grace period, keep-alive pool) taken from the
//! config's `proxy:` section.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server};

use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::audit::Audit;
use crate::config::Config;
use crate::dns::DnsService;
use crate::header_timeout::HeaderTimeout;
use crate::health::HealthService;
use crate::proxy::Switchyard;
use crate::reload::{ReloadService, Reloader};
use crate::runtime::{Runtime, Shared};
use crate::tls::ListenerCert;

/// Pingora retries at most this often per request; our own cap is the route's
/// `max_attempts`, which config validation keeps within it, plus the one uncounted retry of
/// a stale pooled connection.
const PINGORA_MAX_RETRIES: usize = crate::config::MAX_ATTEMPTS as usize + 1;

/// `SIGHUP` means "reload" to Switchyard, but until the reload service has taken it over
/// (after the policies are compiled and tested and the listeners bound) its default action
/// would end the process: a log rotation or a config push during start-up would kill it.
/// Ignored from here on; the reload service installs its handler over this, and looks at
/// every file once when it starts, so a change signalled before then is not missed.
#[allow(unsafe_code)]
fn ignore_hangup() {
    // SAFETY: with `SIG_IGN`, `signal` installs no handler code; it only changes the
    // disposition of a signal nothing in the process handles yet.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// How the process was started.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running instance (Pingora graceful upgrade).
    pub upgrade: bool,
    /// A directory of this run's own (the demo's policies outside a checkout), removed when
    /// the server stops.
    pub scratch: Option<tempfile::TempDir>,
}

/// Build the runtime snapshot (policies compiled, tests run) and serve until signalled.
/// `config_file`, when given, is the config's path and the text it was loaded from: the
/// file is watched and re-read on change and on `SIGHUP`.
pub fn run(
    config: Config,
    config_file: Option<(PathBuf, String)>,
    opts: RunOptions,
) -> anyhow::Result<()> {
    ignore_hangup();
    log::info!(
        "switchyard {} starting: policies from {}",
        env!("CARGO_PKG_VERSION"),
        config.policies_dir.display()
    );
    let runtime = Runtime::build(config, None)
        .map_err(|problems| anyhow::anyhow!("cannot start:\n  {}", problems.join("\n  ")))?;
    let config = runtime.config.clone();
    let audit = match &config.audit {
        Some(a) => Audit::to_file(&a.path, a.chain)
            .map_err(|e| anyhow::anyhow!("audit.path: cannot open {}: {e}", a.path.display()))?,
        None => Audit::memory_only(),
    };
    let limiter = crate::limits::Limiter::new(&config)?;
    if !opts.upgrade {
        addresses_free(&config)?;
    }
    let shared = Arc::new(Shared::new(runtime, audit, limiter));

    let mut server = Server::new_with_opt_and_conf(
        Opt {
            upgrade: opts.upgrade,
            ..Opt::default()
        },
        server_conf(&config),
    );
    server.bootstrap();

    let mut app =
        pingora::proxy::http_proxy(&server.configuration, Switchyard::new(shared.clone()));
    // An HTTP/2 connection with no request in progress is closed after the keep-alive
    // timeout, as an idle HTTP/1 one is (that one is set per request, in the proxy).
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(Duration::from_secs(config.proxy.keepalive_timeout_seconds));
    app.server_options = Some(options);
    let heads = shared.clone();
    let app = HeaderTimeout::new(app, move || {
        Duration::from_millis(heads.load().config.proxy.header_timeout_ms)
    });
    let mut proxy = Service::new("switchyard".to_string(), app);
    let mut certs = Vec::new();
    for listener in &config.listen {
        match &listener.tls {
            None => proxy.add_tcp(&listener.addr),
            Some(tls) => {
                let cert = Arc::new(
                    ListenerCert::load(&listener.addr, &tls.cert, &tls.key)
                        .map_err(|e| anyhow::anyhow!("cannot start: {}.tls: {e}", listener.addr))?,
                );
                proxy.add_tls_with_settings(&listener.addr, None, tls_settings(cert.clone())?);
                certs.push(cert);
            }
        }
    }
    server.add_service(proxy);

    let reloader = Arc::new(Reloader::new(shared.clone(), config_file, certs));
    server.add_service(background_service(
        "health",
        HealthService {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "dns",
        DnsService {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "reload",
        ReloadService {
            reloader: reloader.clone(),
        },
    ));
    if let Some(admin) = &config.admin {
        let mut svc = Service::new("switchyard admin".to_string(), Admin { shared, reloader });
        svc.add_tcp(&admin.addr);
        server.add_service(svc);
        log::info!("admin API and /metrics on {}", admin.addr);
    }
    log::info!(
        "switchyard listening on {}",
        config
            .listen
            .iter()
            .map(|l| match l.tls {
                Some(_) => format!("{} (TLS, h2 and http/1.1)", l.addr),
                None => l.addr.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    watch_for_shutdown(&server);
    server.run(RunArgs::default());
    // `exit` runs no destructors.
    drop(opts.scratch);
    // The access log's last lines may still be queued (see `logging`).
    crate::logging::flush();
    std::process::exit(0)
}

/// A TLS listener: its certificate resolved per handshake through `cert` (so a reload
/// reaches new connections), HTTP/2 preferred by ALPN, HTTP/1.1 for clients without it.
fn tls_settings(cert: Arc<ListenerCert>) -> anyhow::Result<TlsSettings> {
    // The paths are unused: the resolver supplies the certificate.
    let mut settings = TlsSettings::intermediate("", "")?;
    settings.set_cert_resolver(cert);
    settings.enable_h2();
    Ok(settings)
}

/// Set once the process is handing over (graceful upgrade) or terminating.
static CLOSING: AtomicBool = AtomicBool::new(false);

/// Whether responses should now close their connections: the process is about to stop,
/// and a kept-alive connection would be dropped under a client's next request.
pub fn closing() -> bool {
    CLOSING.load(Ordering::Relaxed)
}

/// Pingora serves for a while after SIGQUIT (listeners already handed to the new process)
/// and SIGTERM before it drops idle connections; from the first moment, answer with
/// `Connection: close` so clients reconnect instead of racing that drop.
fn watch_for_shutdown(server: &Server) {
    let mut phases = server.watch_execution_phase();
    let spawned = std::thread::Builder::new()
        .name("shutdown-watch".into())
        .spawn(move || {
            while let Ok(phase) = phases.blocking_recv() {
                if matches!(
                    phase,
                    ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::GracefulTerminate
                        | ExecutionPhase::ShutdownStarted
                ) {
                    CLOSING.store(true, Ordering::Relaxed);
                    log::info!("shutting down: answering with Connection: close");
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot watch for shutdown ({e}); connections stay keep-alive until the end");
    }
}

/// Refuse to start when a listener's address cannot be bound (in use by another process,
/// or by two of ours). Pingora binds in its services' threads, where a failure ends that
/// thread only: the process would stay up with nothing listening.
fn addresses_free(config: &Config) -> anyhow::Result<()> {
    let addresses = config
        .listen
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listen[{i}].addr"), l.addr.as_str()))
        .chain(
            config
                .admin
                .iter()
                .map(|a| ("admin.addr".to_string(), a.addr.as_str())),
        );
    // Held together, so that two of ours that overlap (0.0.0.0:P and 127.0.0.1:P) collide.
    let mut held = Vec::new();
    for (at, addr) in addresses {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => held.push(listener),
            Err(e) => anyhow::bail!("cannot start: {at}: cannot listen on {addr}: {e}"),
        }
    }
    Ok(())
}

fn server_conf(config: &Config) -> ServerConf {
    let p = &config.proxy;
    let threads = p
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let port = config
        .listen
        .first()
        .and_then(|l| l.addr.rsplit(':').next())
        .unwrap_or("0");
    ServerConf {
        threads,
        grace_period_seconds: Some(p.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(p.grace_period_seconds.max(1)),
        upstream_keepalive_pool_size: p.upstream_keepalive_pool_size,
        max_retries: PINGORA_MAX_RETRIES,
        // One instance per port may upgrade into another; keep their sockets apart.
        upgrade_sock: format!("/tmp/switchyard-upgrade-{port}.sock"),
        pid_file: format!("/tmp/switchyard-{port}.pid"),
        ..ServerConf::default()
    }
}
