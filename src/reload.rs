//! Hot reload: policies and config replaced while traffic flows, without a restart.
//!
//! A changed policy file is compiled in a fresh sandbox and its `tests` run; only a version
//! that passes replaces the one in service, by swapping the runtime snapshot (every worker
//! thread picks it up on its next request; requests in flight keep the snapshot they hold).
//! A refused version is logged with file, line and reason, counted, and shown on the admin
//! API; the old version keeps serving. A deleted file keeps its last good version.
//!
//! TLS listeners' certificate and key files are re-read the same way: a pair that parses
//! and belongs together serves the next handshakes; any other is refused, logged and
//! counted, and the old pair keeps serving.
//!
//! Triggers: file changes in `policies_dir`, to the config file and to certificate files
//! (debounced), the swap of a Kubernetes ConfigMap volume holding any of them, `SIGHUP`,
//! and `POST /admin/reload`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use log::{error, info, warn};
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::METRICS;
use crate::policy::{self, Policy};
use crate::runtime::{unix_now, ConfigRejection, PolicyStatus, Rejection, Runtime, Shared};
use crate::tls::{CertReload, ListenerCert};

/// Events arriving within this window after the first are handled by one reload, so an
/// editor saving 50 times a second costs at most a few reloads.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// What one reload did, for logs and the admin API.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    /// `name@version` of each version put into service.
    pub loaded: Vec<String>,
    /// Why each refused version was refused.
    pub rejected: Vec<String>,
    /// Problems of a refused config (the old config keeps serving).
    pub config_errors: Vec<String>,
    /// Listeners whose new certificate went into service.
    pub certificates: Vec<String>,
    /// Why each refused certificate was refused (the old one keeps serving).
    pub certificate_errors: Vec<String>,
}

impl ReloadReport {
    /// Take the certificate part of `certs`.
    fn add_certificates(&mut self, certs: ReloadReport) {
        self.certificates = certs.certificates;
        self.certificate_errors = certs.certificate_errors;
    }

    /// Whether nothing offered was refused.
    pub fn is_clean(&self) -> bool {
        self.config_errors.is_empty()
            && self.rejected.is_empty()
            && self.certificate_errors.is_empty()
    }
}

/// Why a change through the admin API was not made.
#[derive(Debug)]
pub enum Change<E> {
    /// The edit itself refused (e.g. no backend of that name).
    Refused(E),
    /// The changed config is invalid: its problems.
    Invalid(Vec<String>),
}

/// Reloads the runtime snapshot; serialised, so two triggers never race.
pub struct Reloader {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    /// The certificates of the TLS listeners (fixed at start, like the listeners).
    certs: Vec<Arc<ListenerCert>>,
    lock: Mutex<()>,
    /// The config file's bytes when it was last put into service: a volume swap re-reads
    /// the config only when they changed.
    config_in_service: Mutex<Option<Vec<u8>>>,
    /// The config the process started with: what the settings read only at start are.
    started: Arc<Config>,
}

impl Reloader {
    /// `config_file`: the config's path and the text the one in service was loaded from.
    pub fn new(
        shared: Arc<Shared>,
        config_file: Option<(PathBuf, String)>,
        certs: Vec<Arc<ListenerCert>>,
    ) -> Self {
        let (config_path, in_service) = match config_file {
            Some((path, text)) => (Some(path), Some(text.into_bytes())),
            None => (None, None),
        };
        Reloader {
            started: shared.load().config.clone(),
            shared,
            config_path,
            certs,
            lock: Mutex::new(()),
            config_in_service: Mutex::new(in_service),
        }
    }

    /// Re-read the config file (when there is one), every policy and every listener
    /// certificate; apply what is valid.
    pub fn reload_all(&self) -> ReloadReport {
        let mut report = match &self.config_path {
            Some(path) => self.reload_config(path),
            None => self.reload_policies(),
        };
        report.add_certificates(self.reload_certificates());
        report
    }

    /// Re-read every TLS listener's certificate and key; a changed pair that loads serves
    /// the next handshakes, any other keeps the pair in service.
    pub fn reload_certificates(&self) -> ReloadReport {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = ReloadReport::default();
        for cert in &self.certs {
            let result = match cert.reload() {
                CertReload::Unchanged => continue,
                CertReload::StillRefused(why) => {
                    // Logged and counted when first refused; still part of this report.
                    report
                        .certificate_errors
                        .push(format!("listener {}: {why}", cert.listener));
                    continue;
                }
                CertReload::Loaded => {
                    info!(target: "switchyard::reload", "listener {}: new certificate from {} in service", cert.listener, cert.cert_path.display());
                    report.certificates.push(cert.listener.clone());
                    "loaded"
                }
                CertReload::Refused(e) => {
                    error!(target: "switchyard::reload", "listener {}: certificate refused, the old one keeps serving: {e}", cert.listener);
                    report
                        .certificate_errors
                        .push(format!("listener {}: {e}", cert.listener));
                    "rejected"
                }
            };
            METRICS
                .certificate_reloads
                .with_label_values(&[cert.listener.as_str(), result])
                .inc();
        }
        report
    }

    /// A mounted volume was swapped whole (a ConfigMap or Secret update, which may change
    /// any file): re-read the policies as for a saved policy file, so each refused version
    /// is reported as such, then the config file if its content changed, and the listener
    /// certificates (unchanged ones are passed over).
    pub fn reload_volume(&self) -> ReloadReport {
        let changed_config = self.config_path.as_ref().filter(|path| {
            let now = std::fs::read(path).ok();
            let in_service = self
                .config_in_service
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            !(now.is_some() && *in_service == now)
        });
        // A new config comes first: it loads the policies too, and their tests may name
        // backends it adds. Only if it is refused are the policies checked on their own,
        // against the config in service.
        let mut report = match changed_config {
            Some(path) => {
                let config = self.reload_config(path);
                if config.config_errors.is_empty() {
                    config
                } else {
                    let mut policies = self.reload_policies();
                    policies.config_errors = config.config_errors;
                    policies.rejected.extend(config.rejected);
                    policies
                }
            }
            None => self.reload_policies(),
        };
        report.add_certificates(self.reload_certificates());
        report
    }

    /// Re-read every policy the routes name; swap in the new versions that pass.
    pub fn reload_policies(&self) -> ReloadReport {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.shared.load();
        let mut report = ReloadReport::default();
        let mut policies = current.policies.clone();
        let backends = current.config.backend_names();
        for name in current.config.policy_names() {
            let path = current.config.policies_dir.join(format!("{name}.lua"));
            let serving = current.policies.get(&name).map(|p| p.version.clone());
            let candidate = match Policy::read(&path) {
                Ok(p) => p,
                Err(e) => {
                    warn!(
                        target: "switchyard::reload",
                        "policy {name}: cannot read {} ({e}); keeping version {}",
                        path.display(),
                        serving.as_deref().unwrap_or("-")
                    );
                    continue;
                }
            };
            if serving.as_deref() == Some(candidate.version.as_str()) {
                // The file holds the version in service again: no refusal is pending.
                self.settled(&name);
                continue;
            }
            let version = candidate.version.clone();
            match policy::validate(candidate, &current.config.lua, &backends) {
                Ok(p) => {
                    self.loaded(&p, serving.as_deref(), &mut report);
                    policies.insert(Arc::new(p));
                }
                Err(why) => self.rejected(&name, &version, serving.as_deref(), why, &mut report),
            }
        }
        if !report.loaded.is_empty() {
            self.shared.store(Runtime {
                policies,
                ..(*current).clone()
            });
        }
        report
    }

    /// Re-read the config file and build a whole new snapshot; a config with any problem
    /// (or a policy that fails and has no version in service to keep) is refused whole.
    pub fn reload_config(&self, path: &Path) -> ReloadReport {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.shared.load();
        let mut report = ReloadReport::default();
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())]);
        let built = text.as_ref().map_err(Clone::clone).and_then(|text| {
            Config::from_file_text(text, path)
                .map_err(|e| e.problems)
                .and_then(|config| Runtime::build_keeping(config, Some(&current)))
        });
        match built {
            Ok((runtime, kept)) => {
                // A policy whose file fails keeps its version in service; the reload
                // reports it as refused, as the file watcher does.
                for k in kept {
                    let serving = runtime.policies.get(&k.name).map(|p| p.version.clone());
                    self.rejected(&k.name, &k.version, serving.as_deref(), k.why, &mut report);
                }
                for p in runtime.policies.iter() {
                    let before = current.policies.get(&p.name).map(|o| o.version.clone());
                    if before.as_deref() != Some(p.version.as_str()) {
                        self.loaded(p, before.as_deref(), &mut report);
                    }
                }
                info!(target: "switchyard::reload", "config {} reloaded: {} backend(s), {} route(s)", path.display(), runtime.config.backends.len(), runtime.config.routes.len());
                let unapplied = read_at_start_only_changed(&self.started, &runtime.config);
                if !unapplied.is_empty() {
                    warn!(target: "switchyard::reload", "config {}: {} changed since the process started; read only at start, so the change takes effect with a restart or a graceful upgrade", path.display(), unapplied.join(", "));
                }
                METRICS.config_reloads.with_label_values(&["loaded"]).inc();
                *self
                    .shared
                    .config_rejection
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                self.shared.store(runtime);
                *self
                    .config_in_service
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = text.ok().map(String::into_bytes);
            }
            Err(problems) => {
                error!(target: "switchyard::reload", "config {} refused; the old config keeps serving:\n  {}", path.display(), problems.join("\n  "));
                METRICS
                    .config_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                *self
                    .shared
                    .config_rejection
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(ConfigRejection {
                    at: unix_now(),
                    problems: problems.clone(),
                });
                report.config_errors = problems;
            }
        }
        report
    }

    /// Change the config in service (through the admin API) with `edit`, and put the
    /// result into service, validated as a file would be. The edit is made to the config in
    /// service at that moment, one change or reload at a time, so that none undoes another.
    /// The config file stays the source of truth: its next reload replaces changes made
    /// this way.
    pub fn change<E>(
        &self,
        edit: impl FnOnce(&mut Config) -> Result<(), E>,
    ) -> Result<(), Change<E>> {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.shared.load();
        let mut config = (*current.config).clone();
        edit(&mut config).map_err(Change::Refused)?;
        config.validate().map_err(|e| Change::Invalid(e.problems))?;
        let runtime = Runtime::build(config, Some(&current)).map_err(Change::Invalid)?;
        self.shared.store(runtime);
        Ok(())
    }

    fn loaded(&self, p: &Policy, before: Option<&str>, report: &mut ReloadReport) {
        info!(
            target: "switchyard::reload",
            "policy {} version {} in service (was {})",
            p.name,
            p.version,
            before.unwrap_or("-")
        );
        METRICS
            .policy_reloads
            .with_label_values(&[p.name.as_str(), "loaded"])
            .inc();
        let mut status = self.shared.policy_status();
        let entry = status
            .entry(p.name.clone())
            .or_insert_with(|| PolicyStatus {
                version: String::new(),
                loaded_at: 0,
                last_rejection: None,
            });
        entry.version = p.version.clone();
        entry.loaded_at = unix_now();
        // A refused version before this one is no longer what the file holds.
        entry.last_rejection = None;
        report.loaded.push(p.tag.to_string());
    }

    /// The policy's file holds the version in service: a refusal shown for it is over.
    fn settled(&self, name: &str) {
        let mut status = self.shared.policy_status();
        if let Some(entry) = status.get_mut(name) {
            if entry.last_rejection.take().is_some() {
                info!(target: "switchyard::reload", "policy {name}: the file holds version {} in service again", entry.version);
            }
        }
    }

    fn rejected(
        &self,
        name: &str,
        version: &str,
        serving: Option<&str>,
        why: String,
        report: &mut ReloadReport,
    ) {
        warn!(
            target: "switchyard::reload",
            "policy {name} version {version} rejected, version {} keeps serving: {why}",
            serving.unwrap_or("-")
        );
        METRICS
            .policy_reloads
            .with_label_values(&[name, "rejected"])
            .inc();
        let mut status = self.shared.policy_status();
        if let Some(entry) = status.get_mut(name) {
            entry.last_rejection = Some(Rejection {
                version: version.to_string(),
                at: unix_now(),
                reason: why.clone(),
            });
        }
        report.rejected.push(why);
    }
}

/// The background service that turns file events and `SIGHUP` into reloads.
pub struct ReloadService {
    pub reloader: Arc<Reloader>,
}

/// What a file event asks for (`Config` includes the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Wanted {
    Certificates,
    Policies,
    /// A ConfigMap-style volume swap: policies, and the config if it changed.
    Volume,
    /// Everything (the config file changed, or `SIGHUP`).
    Config,
}

/// The entry a Kubernetes ConfigMap (or Secret, or projected) volume swaps on update. The
/// kubelet writes the new files into a fresh hidden directory, points a new `..data_tmp`
/// symlink at it and renames that over `..data`; the visible files are symlinks through
/// `..data` and are never written themselves, so this rename is the only event saying
/// that they changed.
const ATOMIC_WRITER_DATA: &str = "..data";

/// What an event on `path` (in a watched directory) asks for, if anything: the config file
/// a config reload (which re-reads the policies too), a `*.lua` file a policy reload, and
/// the directory's `..data` a volume reload.
fn wanted(path: &Path, config_name: Option<&OsStr>) -> Option<Wanted> {
    let name = path.file_name()?;
    if config_name == Some(name) {
        Some(Wanted::Config)
    } else if name == ATOMIC_WRITER_DATA {
        Some(Wanted::Volume)
    } else if path.extension().is_some_and(|e| e == "lua") {
        Some(Wanted::Policies)
    } else {
        None
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Wanted>();
        let config_file = self.reloader.config_path.clone();
        let config_name = config_file
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_os_string());
        let cert_files: Vec<PathBuf> = self
            .reloader
            .certs
            .iter()
            .flat_map(|c| [c.cert_path.clone(), c.key_path.clone()])
            .collect();
        let cert_names: Vec<_> = cert_files
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect();
        let mut watcher = match notify::recommended_watcher(
            move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                for path in &event.paths {
                    if let Some(w) = wanted(path, config_name.as_deref()) {
                        let _ = tx.send(w);
                    } else if cert_names
                        .iter()
                        .any(|n| path.file_name() == Some(n.as_os_str()))
                    {
                        let _ = tx.send(Wanted::Certificates);
                    }
                }
            },
        ) {
            Ok(w) => w,
            Err(e) => {
                error!(target: "switchyard::reload", "cannot watch files ({e}); reload with SIGHUP or POST /admin/reload");
                return;
            }
        };
        let mut watched: Vec<PathBuf> = Vec::new();
        let watch_dirs = |watcher: &mut notify::RecommendedWatcher,
                          watched: &mut Vec<PathBuf>,
                          runtime: &Runtime| {
            let mut dirs = vec![runtime.config.policies_dir.clone()];
            let parents = config_file
                .iter()
                .chain(&cert_files)
                .filter_map(|p| p.parent());
            for dir in parents {
                dirs.push(if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir.to_path_buf()
                });
            }
            for dir in dirs {
                if !watched.contains(&dir) {
                    match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                        Ok(()) => watched.push(dir),
                        Err(e) => {
                            warn!(target: "switchyard::reload", "cannot watch {}: {e}", dir.display())
                        }
                    }
                }
            }
        };
        watch_dirs(&mut watcher, &mut watched, &self.reloader.shared.load());
        // Taken over first: until then a SIGHUP would end the process.
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // A file saved after the config was loaded but before the watches were in place
        // raised no event: look once, as for a swapped volume (files that did not change
        // are passed over, silently).
        let reloader = self.reloader.clone();
        let _ = tokio::task::spawn_blocking(move || reloader.reload_volume()).await;
        info!(target: "switchyard::reload", "watching {} for changes", watched.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "));
        loop {
            let first = tokio::select! {
                _ = shutdown.changed() => return,
                _ = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    info!(target: "switchyard::reload", "SIGHUP: reloading");
                    Wanted::Config
                }
                Some(w) = rx.recv() => w,
            };
            tokio::time::sleep(DEBOUNCE).await;
            let mut wanted = BTreeSet::from([first]);
            while let Ok(w) = rx.try_recv() {
                wanted.insert(w);
            }
            let reloader = self.reloader.clone();
            // Compiling and testing policies is CPU work; keep it off the async workers.
            let report = tokio::task::spawn_blocking(move || {
                if wanted.contains(&Wanted::Config) {
                    reloader.reload_all();
                    return;
                }
                if wanted.contains(&Wanted::Volume) {
                    reloader.reload_volume();
                } else if wanted.contains(&Wanted::Policies) {
                    reloader.reload_policies();
                }
                if wanted.contains(&Wanted::Certificates) {
                    reloader.reload_certificates();
                }
            })
            .await;
            if let Err(e) = report {
                error!(target: "switchyard::reload", "reload panicked: {e}");
            }
            watch_dirs(&mut watcher, &mut watched, &self.reloader.shared.load());
        }
    }
}

/// The settings of `new` that differ from `started` (the config the process started
/// with) but are read only at start: the listeners (addresses, TLS and certificate paths),
/// the admin listener's address, the audit file, Redis, the server's threads, grace
/// period and upstream pool, and the HTTP/2 half of the keep-alive timeout (HTTP/1
/// connections take a new value at once).
fn read_at_start_only_changed(started: &Config, new: &Config) -> Vec<&'static str> {
    fn differ<T: serde::Serialize>(a: &T, b: &T) -> bool {
        serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
    }
    let (o, n) = (&started.proxy, &new.proxy);
    [
        ("`listen`", differ(&started.listen, &new.listen)),
        (
            "`admin.addr`",
            differ(
                &started.admin.as_ref().map(|a| &a.addr),
                &new.admin.as_ref().map(|a| &a.addr),
            ),
        ),
        ("`audit`", differ(&started.audit, &new.audit)),
        ("`redis`", differ(&started.redis, &new.redis)),
        ("`proxy.threads`", o.threads != n.threads),
        (
            "`proxy.grace_period_seconds`",
            o.grace_period_seconds != n.grace_period_seconds,
        ),
        (
            "`proxy.upstream_keepalive_pool_size`",
            o.upstream_keepalive_pool_size != n.upstream_keepalive_pool_size,
        ),
        (
            "`proxy.keepalive_timeout_seconds` (for HTTP/2 connections)",
            o.keepalive_timeout_seconds != n.keepalive_timeout_seconds,
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_at_start_are_named_when_a_reload_changes_them() {
        let config = |proxy: &str| {
            let text = format!(
                "listen: [{{ addr: \"127.0.0.1:8080\" }}]\n{proxy}\
                 backends: [{{ name: a, url: \"http://127.0.0.1:9\", models: [m] }}]\n\
                 routes: [{{ match: {{ path_prefix: /v1/ }}, policy: round_robin }}]\n"
            );
            Config::from_file_text(&text, Path::new("sy.yaml")).expect("a valid config")
        };
        let started = config("");
        assert!(read_at_start_only_changed(&started, &config("")).is_empty());
        assert_eq!(
            read_at_start_only_changed(
                &started,
                &config("proxy: { keepalive_timeout_seconds: 5, threads: 3 }\n")
            ),
            [
                "`proxy.threads`",
                "`proxy.keepalive_timeout_seconds` (for HTTP/2 connections)"
            ]
        );
        // Settings a reload applies are not named.
        assert!(read_at_start_only_changed(
            &started,
            &config("proxy: { header_timeout_ms: 900 }\n")
        )
        .is_empty());
    }

    #[test]
    fn configmap_data_swap_asks_for_a_volume_reload() {
        let config = Some(OsStr::new("config.yaml"));
        let at = |p: &str| wanted(Path::new(p), config);
        assert_eq!(at("/etc/switchyard/..data"), Some(Wanted::Volume));
        assert_eq!(at("/etc/switchyard/config.yaml"), Some(Wanted::Config));
        assert_eq!(
            at("/etc/switchyard/round_robin.lua"),
            Some(Wanted::Policies)
        );
        // The kubelet's temporary link and timestamped directories are steps on the way.
        assert_eq!(at("/etc/switchyard/..data_tmp"), None);
        assert_eq!(at("/etc/switchyard/..2026_11_22_10_00_00.123456789"), None);
        assert_eq!(at("/etc/switchyard/notes.txt"), None);
        assert_eq!(wanted(Path::new("/p/..data"), None), Some(Wanted::Volume));
    }
}
