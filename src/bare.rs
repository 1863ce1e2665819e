//! A bare Pingora pass-through, for benchmarks only: no body read, no Lua, no metadata,
//! fixed round robin. Measured beside Switchyard, it shows what Switchyard's own work costs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

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

/// Serve a round-robin pass-through on `listen` over `upstreams` until killed.
pub fn run(listen: &str, upstreams: Vec<SocketAddr>, threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(!upstreams.is_empty(), "at least one --upstream is required");
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
    let mut svc = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare {
            upstreams,
            next: AtomicUsize::new(0),
        },
    );
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever()
}
