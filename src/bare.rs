//! Bare Pingora pass-throughs, for benchmarks only. Measured beside Switchyard, they show
//! what Switchyard's own work costs.
//!
//! - [`Bare`]: no body read, no Lua, no metadata, fixed round robin.
//! - [`BarePolicy`]: the same, plus exactly the three parts the throughput target names,
//!   done by Switchyard's own code: the body read whole ([`crate::body::read`]), the request
//!   metadata extracted ([`RequestMeta`]), and the route's Lua policy asked for the backend
//!   ([`plan::decide`]), after the screening that decision needs (the tenant, from the
//!   API key when `auth` is on, and the backends that serve the model). Nothing else of
//!   Switchyard: no limits, logging, metrics, usage accounting, header rewriting, retries
//!   or upstream timeouts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::{Error, ErrorType};

use crate::config::Config;
use crate::plan::{self, Plan};
use crate::request::RequestMeta;
use crate::runtime::Runtime;

pub struct Bare {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Ok(Box::new(HttpPeer::new(
            self.upstreams[i],
            false,
            String::new(),
        )))
    }
}

pub struct BarePolicy {
    runtime: Arc<Runtime>,
}

#[derive(Default)]
pub struct PolicyCtx {
    body: Option<Bytes>,
    /// Holds the in-flight slot taken on the chosen backend until the request ends.
    plan: Option<Plan>,
}

fn refused(what: impl std::fmt::Debug) -> Box<Error> {
    Error::explain(ErrorType::InternalError, format!("{what:?}"))
}

#[async_trait]
impl ProxyHttp for BarePolicy {
    type CTX = PolicyCtx;
    fn new_ctx(&self) -> PolicyCtx {
        PolicyCtx::default()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut PolicyCtx,
    ) -> pingora::Result<bool> {
        let runtime = &self.runtime;
        let head = session.req_header();
        let tenant = runtime
            .tenants
            .authenticate(&head.headers)
            .map_err(refused)?;
        let mut meta = RequestMeta::from_head(&head.method, head.uri.path(), &head.headers);
        let proxy = &runtime.config.proxy;
        let body = crate::body::read(
            session,
            proxy.max_body_bytes,
            Duration::from_millis(proxy.body_timeout_ms),
        )
        .await
        .map_err(refused)?;
        if let Some(b) = &body {
            meta.read_json_body(b).map_err(refused)?;
        }
        let meta = Arc::new(meta);
        let screened = plan::screen(runtime, tenant, &meta).map_err(refused)?;
        let mut considered = plan::Considered::default();
        let plan = plan::decide(runtime, &screened, &meta, "bare", &mut considered);
        ctx.plan = Some(plan.map_err(refused)?);
        ctx.body = body;
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut PolicyCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let plan = ctx.plan.as_ref().expect("request_filter made the plan");
        Ok(Box::new(plan.backends[0].peer()))
    }

    /// The body read whole goes upstream at its end, as in Switchyard (the patched
    /// pingora-proxy calls this once for a body read ahead).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut PolicyCtx,
    ) -> pingora::Result<()> {
        if ctx.body.is_some() {
            *body = if end_of_stream {
                ctx.body.clone()
            } else {
                Some(Bytes::new())
            };
        }
        Ok(())
    }
}

/// Serve a round-robin pass-through on `listen` over `upstreams` until killed; with
/// `config`, the pass-through with Switchyard's body read, metadata and policy decision
/// over that config's routes and backends instead.
pub fn run(
    listen: &str,
    upstreams: Vec<SocketAddr>,
    config: Option<Config>,
    threads: usize,
) -> anyhow::Result<()> {
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 1024,
        upgrade_sock: format!("/tmp/switchyard-bare-{}.sock", std::process::id()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    match config {
        Some(config) => {
            let runtime = Runtime::build(config, None).map_err(|problems| {
                anyhow::anyhow!("cannot start:\n  {}", problems.join("\n  "))
            })?;
            let runtime = Arc::new(runtime);
            serve(&mut server, listen, BarePolicy { runtime });
        }
        None => {
            anyhow::ensure!(
                !upstreams.is_empty(),
                "at least one --upstream (or --config) is required"
            );
            let next = AtomicUsize::new(0);
            serve(&mut server, listen, Bare { upstreams, next });
        }
    }
    server.run_forever()
}

/// Add a proxy service running `app` on `listen`.
fn serve<P>(server: &mut Server, listen: &str, app: P)
where
    P: ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, app);
    svc.add_tcp(listen);
    server.add_service(svc);
}
