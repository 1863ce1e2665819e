//! Active health checks: every backend probed with `GET health.path` on an interval, with
//! rise/fall hysteresis so a flapping backend does not flap the routing. An unhealthy
//! backend is not a candidate; it comes back after `rise` successes in a row. The probe
//! itself is Pingora's `HttpHealthCheck`; the loop is a background service.
//!
//! Each backend's check is built once and kept while the backend and the health settings
//! stay the same: building one builds a connector, which reads and parses the system's
//! root certificates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::backends::Backend;
use crate::config::HealthConfig;
use crate::runtime::Shared;

/// A backend's health as the checks see it. Healthy until a check says otherwise.
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    hysteresis: Mutex<Hysteresis>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthy: AtomicBool::new(true),
            hysteresis: Mutex::new(Hysteresis::default()),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Healthy again, with no streak counted: for a backend whose checks were switched
    /// off, which no probe will ever bring back.
    pub fn reset(&self) {
        let mut h = self.hysteresis.lock().unwrap_or_else(|e| e.into_inner());
        h.streak = 0;
        self.healthy.store(true, Ordering::Relaxed);
    }

    /// Feed one probe result; returns the new state when it changed.
    pub fn observe(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        let mut h = self.hysteresis.lock().unwrap_or_else(|e| e.into_inner());
        let changed = h.observe(ok, rise, fall, self.is_healthy());
        if let Some(state) = changed {
            self.healthy.store(state, Ordering::Relaxed);
        }
        changed
    }
}

/// Counts results that disagree with the current state; flips after `rise`/`fall` of them.
#[derive(Debug, Default)]
struct Hysteresis {
    streak: u32,
}

impl Hysteresis {
    fn observe(&mut self, ok: bool, rise: u32, fall: u32, healthy: bool) -> Option<bool> {
        if ok == healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed {
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// The background service that probes every backend of the current config.
pub struct HealthService {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // By backend id (a reload builds new backends, with new ids), the check built for
        // it: kept while the backend and the settings it was built with stay.
        let mut built: HashMap<u64, Built> = HashMap::new();
        loop {
            let runtime = self.shared.load();
            let interval = match &runtime.config.health {
                Some(config) => {
                    let mut old = std::mem::take(&mut built);
                    for b in &runtime.backends.backends {
                        let kept = old.remove(&b.id).filter(|c| c.fits(b, config));
                        built.insert(b.id, kept.unwrap_or_else(|| Built::new(b, config)));
                    }
                    let checks = built.values().map(|c| probe(c, config));
                    futures::future::join_all(checks).await;
                    Duration::from_millis(config.interval_ms)
                }
                // Checks may be switched on by a config reload; look again now and then.
                // Meanwhile every backend is healthy as far as checks go, whatever a
                // probe said before they were switched off.
                None => {
                    built.clear();
                    for b in &runtime.backends.backends {
                        b.stats.health.reset();
                    }
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// A backend's check, with what it was built from.
struct Built {
    backend: Arc<Backend>,
    path: String,
    timeout_ms: u64,
    /// `None` when checks are switched off for the backend (an empty path).
    check: Option<HttpHealthCheck>,
}

impl Built {
    fn new(backend: &Arc<Backend>, config: &HealthConfig) -> Built {
        let path = probe_path(backend, config).to_string();
        let check = (!path.is_empty()).then(|| http_check(backend, &path, config));
        Built {
            backend: backend.clone(),
            path,
            timeout_ms: config.timeout_ms,
            check,
        }
    }

    fn fits(&self, backend: &Backend, config: &HealthConfig) -> bool {
        self.path == probe_path(backend, config) && self.timeout_ms == config.timeout_ms
    }
}

fn probe_path<'a>(backend: &'a Backend, config: &'a HealthConfig) -> &'a str {
    backend
        .config
        .health_path
        .as_deref()
        .unwrap_or(&config.path)
}

fn http_check(backend: &Backend, path: &str, config: &HealthConfig) -> HttpHealthCheck {
    let u = &backend.upstream;
    let mut check = HttpHealthCheck::new(&u.authority, u.tls);
    if let Ok(mut req) = pingora::http::RequestHeader::build(
        "GET",
        format!("{}{path}", u.path_prefix).as_bytes(),
        None,
    ) {
        let _ = req.insert_header(http::header::HOST, u.authority.as_str());
        check.req = req;
    }
    // The probe reaches the backend exactly as requests do (TLS trust, SNI, HTTP/2); the
    // check replaces the peer's address with the target's.
    check.peer_template = backend.peer();
    let timeout = Duration::from_millis(config.timeout_ms);
    check.peer_template.options.connection_timeout = Some(timeout);
    check.peer_template.options.read_timeout = Some(timeout);
    // Any 2xx is healthy (Pingora's default takes only 200: a 204 would fail).
    check.validator = Some(Box::new(|resp: &pingora::http::ResponseHeader| {
        if resp.status.is_success() {
            Ok(())
        } else {
            pingora::Error::e_explain(
                pingora::ErrorType::CustomCode("status", resp.status.as_u16()),
                format!("answered {}", resp.status.as_u16()),
            )
        }
    }));
    check
}

async fn probe(built: &Built, config: &HealthConfig) {
    let Some(check) = &built.check else {
        // Checks switched off for this backend: healthy as far as they go.
        built.backend.stats.health.reset();
        return;
    };
    let backend = &built.backend;
    let path = &built.path;
    let timeout = Duration::from_millis(config.timeout_ms);
    let outcome = match pingora::lb::Backend::new(&backend.addr.get().to_string()) {
        Ok(target) => match tokio::time::timeout(timeout * 2, check.check(&target)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer in time".to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match backend
        .stats
        .health
        .observe(outcome.is_ok(), config.rise, config.fall)
    {
        Some(true) => {
            info!(target: "switchyard::health", "backend {} is healthy again", backend.name())
        }
        Some(false) => {
            let why = outcome.err().unwrap_or_default();
            warn!(target: "switchyard::health", "backend {} is unhealthy ({} failed checks of {path}; the last: {why})", backend.name(), config.fall)
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_needs_fall_failures_and_rise_successes_in_a_row() {
        let h = Health::default();
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None, "a success breaks the streak");
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(
            h.observe(false, 2, 3),
            None,
            "flapping does not bring it back"
        );
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), Some(true));
        assert!(h.is_healthy());
    }
}
