//! Backend addresses. A backend named by host name is resolved when it is first configured
//! (so no request waits on DNS) and again every `proxy.dns_refresh_seconds` by a
//! background service, so a hosted provider or a Kubernetes service that moves to new
//! addresses is followed without a reload. A reload keeps the address of a backend whose
//! name and URL host stay the same. A name that stops resolving keeps its last address,
//! and the log says so once.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::runtime::Shared;

/// Longest a refresh waits for one name's answer.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a backend's connections go now.
#[derive(Debug)]
pub struct Address {
    /// The name looked up (an IP literal without brackets is never looked up again).
    host: String,
    port: u16,
    current: ArcSwap<SocketAddr>,
    /// Whether the last refresh failed (its failure is logged once, and its recovery).
    failing: AtomicBool,
    /// A lookup is running (one that outlived its timeout too): no second one is started.
    looking: AtomicBool,
}

impl Address {
    /// Resolve `host` (an IP literal or a name) now, blocking: at load time.
    pub fn resolve(host: &str, port: u16) -> Result<Address, String> {
        let found = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .collect::<Vec<_>>();
        let first = *found
            .first()
            .ok_or_else(|| format!("`{host}` resolves to no address"))?;
        Ok(Address {
            host: host.to_string(),
            port,
            current: ArcSwap::from_pointee(first),
            failing: AtomicBool::new(false),
            looking: AtomicBool::new(false),
        })
    }

    /// Whether this is the address of `host:port`.
    pub fn is_for(&self, host: &str, port: u16) -> bool {
        self.host == host && self.port == port
    }

    pub fn get(&self) -> SocketAddr {
        **self.current.load()
    }

    /// Whether the host is a name (an IP literal never changes).
    pub fn is_name(&self) -> bool {
        self.host.parse::<IpAddr>().is_err()
    }

    /// Adopt the answer of a fresh lookup: the current address while it is still among
    /// those found (connections to it stay pooled), else the first found. Returns the
    /// address given up when it changed.
    fn adopt(&self, found: &[SocketAddr]) -> Option<SocketAddr> {
        let current = self.get();
        if found.is_empty() || found.contains(&current) {
            return None;
        }
        self.current.store(Arc::new(found[0]));
        Some(current)
    }

    /// Look the name up again and adopt the answer; a failure keeps the last address.
    /// `backend` names the backend in the log. Does nothing while an earlier lookup is
    /// still running: `getaddrinfo` cannot be cancelled, and a resolver that hangs must
    /// not gather a blocking thread per round.
    pub async fn refresh(self: &Arc<Self>, backend: &str) {
        self.refresh_by(backend, LOOKUP_TIMEOUT, |host, port| {
            (host, port).to_socket_addrs().map(Iterator::collect)
        })
        .await
    }

    /// [`Address::refresh`] with `lookup` asked for the addresses and waited for `within`
    /// (the system resolver there; a test's stand-in that hangs or answers at will here).
    async fn refresh_by<L>(self: &Arc<Self>, backend: &str, within: Duration, lookup: L)
    where
        L: FnOnce(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + 'static,
    {
        if self.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let lookup = tokio::task::spawn_blocking(move || {
            let found = lookup(&me.host, me.port);
            me.looking.store(false, Ordering::Release);
            found
        });
        let found = match tokio::time::timeout(within, lookup).await {
            Ok(Ok(Ok(addrs))) => Ok(addrs),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(format!("the lookup failed: {e}")),
            Err(_) => Err(format!("no answer in {} ms", within.as_millis())),
        };
        let found = found.and_then(|f| {
            if f.is_empty() {
                Err("no address".to_string())
            } else {
                Ok(f)
            }
        });
        match found {
            Ok(found) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(target: "switchyard::dns", "backend {backend}: `{}` resolves again", self.host);
                }
                if let Some(old) = self.adopt(&found) {
                    info!(target: "switchyard::dns", "backend {backend}: `{}` now resolves to {} (was {old})", self.host, self.get());
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(target: "switchyard::dns", "backend {backend}: cannot resolve `{}` ({e}); keeping {}", self.host, self.get());
                }
            }
        }
    }
}

/// The background service that looks every named backend up again on an interval.
pub struct DnsService {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for DnsService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last = Instant::now();
        loop {
            // The interval is read every second: a reload may change it, or switch
            // refreshing on or off, and takes effect at once.
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let runtime = self.shared.load();
            let every = runtime.config.proxy.dns_refresh_seconds;
            if every == 0 || last.elapsed() < Duration::from_secs(every) {
                continue;
            }
            last = Instant::now();
            let named = runtime
                .backends
                .backends
                .iter()
                .filter(|b| b.addr.is_name());
            futures::future::join_all(named.map(|b| b.addr.refresh(b.name()))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_still_found_is_kept_and_a_gone_one_replaced_by_the_first() {
        let a = Address::resolve("127.0.0.1", 80).unwrap();
        assert!(!a.is_name());
        assert_eq!(a.adopt(&[addr("127.0.0.2:80"), addr("127.0.0.1:80")]), None);
        assert_eq!(a.get(), addr("127.0.0.1:80"));
        assert_eq!(
            a.adopt(&[addr("127.0.0.3:80"), addr("127.0.0.2:80")]),
            Some(addr("127.0.0.1:80"))
        );
        assert_eq!(a.get(), addr("127.0.0.3:80"));
        assert_eq!(a.adopt(&[]), None, "no answer keeps the last address");
        assert_eq!(a.get(), addr("127.0.0.3:80"));
    }

    #[tokio::test]
    async fn a_lookup_that_hangs_keeps_the_address_and_is_not_started_again_until_it_ends() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::mpsc;
        let a = Arc::new(Address::resolve("127.0.0.1", 80).unwrap());
        let started = Arc::new(AtomicUsize::new(0));
        let (release, released) = mpsc::channel::<()>();
        let hangs = {
            let started = started.clone();
            move |_: &str, _: u16| {
                started.fetch_add(1, Ordering::SeqCst);
                released.recv().ok();
                Ok(vec![addr("127.0.0.2:80")])
            }
        };
        let within = Duration::from_millis(100);
        a.refresh_by("b", within, hangs).await;
        let waited = std::time::Instant::now();
        while started.load(Ordering::SeqCst) == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "the lookup never ran"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(a.get(), addr("127.0.0.1:80"), "kept while the lookup hangs");
        assert!(a.failing.load(Ordering::Relaxed));

        // Later rounds start nothing while it still hangs.
        for _ in 0..3 {
            let started = started.clone();
            let answers = move |_: &str, _: u16| {
                started.fetch_add(1, Ordering::SeqCst);
                Ok(vec![addr("127.0.0.9:80")])
            };
            a.refresh_by("b", within, answers).await;
        }
        assert_eq!(a.get(), addr("127.0.0.1:80"));
        assert_eq!(started.load(Ordering::SeqCst), 1);

        // Once it ends, the next round looks the name up again.
        release.send(()).unwrap();
        while a.looking.load(Ordering::Acquire) {
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "the lookup never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        a.refresh_by("b", within, |_, _| Ok(vec![addr("127.0.0.3:80")]))
            .await;
        assert_eq!(a.get(), addr("127.0.0.3:80"));
        assert!(!a.failing.load(Ordering::Relaxed));
    }

    #[test]
    fn names_and_literals() {
        assert!(Address::resolve("localhost", 80).unwrap().is_name());
        assert!(!Address::resolve("::1", 80).unwrap().is_name());
        assert!(Address::resolve("", 80).is_err());
    }
}
