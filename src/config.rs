//! The YAML configuration: what the operator writes, parsed and validated whole.
//!
//! A config is either entirely valid or refused with every problem listed by its path
//! (`backends[2].weight: must be > 0`). Defaults are stated on the fields that carry them
//! and repeated in the README's config reference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod misfits;

/// Default cap on a request body: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client-facing listeners. Default: one on `0.0.0.0:8080`.
    #[serde(default = "default_listen")]
    pub listen: Vec<Listener>,
    /// Admin listener (metrics, reloads, policy versions). Default: none.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Directory holding `*.lua` policies. Default `policies`, relative to the config file.
    #[serde(default = "default_policies_dir")]
    pub policies_dir: PathBuf,
    /// Ordered routes; the first whose `match` fits the request picks the policy.
    pub routes: Vec<Route>,
    pub backends: Vec<BackendConfig>,
    /// Proxy tuning: threads, body limit, timeouts, attempts.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Lua sandbox limits.
    #[serde(default)]
    pub lua: LuaConfig,
    /// Passive outlier detection and 429 cool-downs.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Active health checks. Default: none (backends are healthy until requests say otherwise).
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Client authentication. Default: required when `tenants` are configured, else off.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The routing audit log. Default: none (recent decisions are still kept in memory).
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// Who may call, with what key, and what they may use.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Where tenant limits are counted. Default: none, each instance counts on its own.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}

/// Redis holding every tenant's limit counters, shared by a fleet of instances. Read at
/// start only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, without a password. Either this or `url_env`.
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable holding the URL, for one that carries a password.
    #[serde(default)]
    pub url_env: Option<String>,
    /// What to do while Redis is unreachable: `open` (default) keeps serving on this
    /// instance's own counters; `closed` answers 503.
    #[serde(default)]
    pub on_failure: FailMode,
    /// Time allowed for one Redis call before it counts as unreachable. Default 200 ms.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// Prefix of every key Switchyard writes. Default `switchyard`.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// How long a concurrency slot is held in Redis if its instance dies before releasing
    /// it. Default 600 s.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

fn default_redis_timeout_ms() -> u64 {
    200
}

fn default_redis_prefix() -> String {
    "switchyard".into()
}

fn default_lease_seconds() -> u64 {
    600
}

impl RedisConfig {
    /// The URL, from the config or its environment variable.
    pub fn resolve_url(&self) -> Result<String, String> {
        match (&self.url, &self.url_env) {
            (Some(u), None) => Ok(u.clone()),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("redis.url_env: environment variable `{var}` is not set")),
            _ => Err("redis: exactly one of `url` and `url_env` is required".into()),
        }
    }
}

/// A tenant's limits; each one absent is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Requests per minute (sliding 60 s window).
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute: prompt estimate + `max_tokens` reserved up front, settled to the
    /// reported usage after.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default)]
    pub concurrent: Option<u64>,
    /// Spend per UTC day, in USD, at the backends' `cost` prices.
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    /// Completion tokens reserved for a request that sets no `max_tokens`. Default 1024.
    #[serde(default = "default_reserve_tokens")]
    pub default_max_tokens: u64,
}

impl TenantLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rpm.is_some()
            || self.tpm.is_some()
            || self.concurrent.is_some()
            || self.usd_per_day.is_some()
    }
}

fn default_reserve_tokens() -> u64 {
    1024
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File to append to, or `-` for stdout. Read at start only.
    pub path: PathBuf,
    /// Chain each line to the one before by hash (tamper-evident). Default true.
    #[serde(default = "default_true")]
    pub chain: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `required` or `off`. Default: `required` if any tenant is configured, else `off`.
    #[serde(default)]
    pub mode: AuthMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Resolved at load: `required` with tenants, `off` without.
    #[default]
    Auto,
    Required,
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// SHA-256 (hex) of each of the tenant's API keys; never the keys themselves.
    pub key_sha256: Vec<String>,
    /// The tenant's region, `req.region` when the request carries no region header.
    #[serde(default)]
    pub region: Option<String>,
    /// Model globs the tenant may use. Default: all.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Backend regions (or prefixes: `eu` covers `eu-west`) the tenant's traffic may go
    /// to. Default: all.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// Requests, tokens, concurrency and spend allowed. Default: unlimited.
    #[serde(default)]
    pub limits: Option<TenantLimits>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub addr: String,
    /// Serve TLS with this certificate, HTTP/2 or HTTP/1.1 by ALPN. Default: none (cleartext
    /// HTTP/1.1).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
}

/// A TLS listener's certificate and key: PEM files, relative to the config file, re-read
/// when they change and on `SIGHUP`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port`. Default in the demo: 127.0.0.1:9090; keep it off public networks.
    pub addr: String,
    /// Environment variable holding a bearer token required on `/metrics` and `/admin/*`
    /// (the dashboard passes it from its URL fragment, `/#token=...`). Default: none.
    #[serde(default)]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    /// Name of a policy file in `policies_dir` (without `.lua`).
    pub policy: String,
    /// Policy used when `policy` fails (raises, loops, returns garbage). Default: none, the
    /// client gets 500 `policy_error`.
    #[serde(default)]
    pub fallback_policy: Option<String>,
    /// Upstream attempts for one request, first try included. Default 3.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Retry on another backend after a response-header timeout, or a backend's own 504
    /// (the first backend may still be generating, and billing). Default false: the
    /// client gets 504.
    #[serde(default)]
    pub retry_on_timeout: bool,
    /// Requests allowed to wait for capacity when every candidate is at `max_inflight`.
    /// Default 64.
    #[serde(default = "default_queue_max")]
    pub queue_max: usize,
    /// How long a request waits for capacity before 503. Default 5 000 ms.
    #[serde(default = "default_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Values the policy reads as `req.params` (thresholds, percentages, names), so one
    /// policy file serves many routes without edits. Default: empty.
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
}

/// A route parameter: a scalar or a list of scalars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<ParamValue>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Request path prefix. Default: any path.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Glob on the request's `model` (`*` and `?`). Default: any model.
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// `http://host:port` (an optional path prefix is kept and prepended upstream).
    pub url: String,
    /// `openai` (default) | `anthropic` | `azure`.
    #[serde(default = "default_provider")]
    pub provider: String,
    /// Models served: a list, or a map from the name clients use to the name upstream knows.
    pub models: Models,
    #[serde(default)]
    pub region: Option<String>,
    /// Relative share for weighted policies. Default 1; must be > 0.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Concurrent requests allowed; 0 (default) is unbounded.
    #[serde(default)]
    pub max_inflight: u32,
    /// Price per 1M tokens. Default 0/0.
    #[serde(default)]
    pub cost: Cost,
    /// Ask for the usage chunk of streams the client did not ask it for (OpenAI-format
    /// backends), and strip it from the client's stream. Default true; turn off for a
    /// server that rejects `stream_options`.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    /// Environment variable holding the backend's API key, injected where its provider
    /// expects it (`Authorization: Bearer`, `x-api-key`, `api-key`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Overrides `health.path` for this backend; `""` switches its active checks off.
    #[serde(default)]
    pub health_path: Option<String>,
    /// `azure`: the `api-version` query (default `2024-10-21`, `2025-03-01-preview` for the
    /// Responses API); `anthropic`: the `anthropic-version` header sent when the client sent
    /// none (default `2023-06-01`). Not allowed for `openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// For an `https://` backend: PEM file of the CAs its certificate is verified against,
    /// instead of the system roots. Relative to the config file. Default: the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Speak HTTP/2 to the backend: offered by ALPN over TLS (HTTP/1.1 if the backend
    /// declines), h2c with prior knowledge over `http://`. Default false (HTTP/1.1).
    #[serde(default)]
    pub http2: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Models {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

impl Models {
    /// `(name clients use, name upstream knows)` pairs.
    pub fn pairs(&self) -> Vec<(String, String)> {
        match self {
            Models::List(l) => l.iter().map(|m| (m.clone(), m.clone())).collect(),
            Models::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    #[serde(default)]
    pub input: f64,
    #[serde(default)]
    pub output: f64,
}

impl Cost {
    /// What `prompt` input and `completion` output tokens cost at these prices (USD per
    /// million tokens), in USD.
    pub fn usd(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.input + completion as f64 * self.output) / 1e6
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Worker threads of the proxy service. Default: the number of CPUs.
    pub threads: Option<usize>,
    /// Largest request body accepted. Default 8 MiB.
    pub max_body_bytes: usize,
    /// TCP connect timeout to a backend. Default 2000 ms.
    pub connect_timeout_ms: u64,
    /// Time allowed from sending the request to the response headers. Default 60 000 ms.
    pub ttfb_timeout_ms: u64,
    /// Gap allowed between two reads of a response body (streams). Default 60 000 ms.
    pub idle_timeout_ms: u64,
    /// Time allowed for reading the client's body. Default 30 000 ms.
    pub body_timeout_ms: u64,
    /// Time allowed for a request's head, from its first byte. Default 30 000 ms.
    pub header_timeout_ms: u64,
    /// Longest one write to a client may wait (a client that stops reading). Default
    /// 60 000 ms.
    pub write_timeout_ms: u64,
    /// How long a kept-alive client connection may sit idle between requests (HTTP/1).
    /// Default 60.
    pub keepalive_timeout_seconds: u64,
    /// Seconds a SIGTERM'd server keeps serving in-flight requests. Default 30.
    pub grace_period_seconds: u64,
    /// Idle upstream connections kept per process. Default 1024.
    pub upstream_keepalive_pool_size: usize,
    /// Retries allowed as a percentage of requests (10 s window). Default 20.
    pub retry_budget_percent: u32,
    /// Retries per second always allowed, whatever the traffic. Default 5.
    pub retry_budget_min_per_sec: u32,
    /// How often backend host names are looked up again (0: only when the config is
    /// loaded). Default 30.
    pub dns_refresh_seconds: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            threads: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            connect_timeout_ms: 2_000,
            ttfb_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 30_000,
            header_timeout_ms: 30_000,
            write_timeout_ms: 60_000,
            keepalive_timeout_seconds: 60,
            grace_period_seconds: 30,
            upstream_keepalive_pool_size: 1024,
            retry_budget_percent: 20,
            retry_budget_min_per_sec: 5,
            dns_refresh_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LuaConfig {
    /// VM instructions a `route` call may run once the watchdog found it still running
    /// (see `policy::budget`). Default 1 000 000.
    pub instruction_budget: u64,
    /// Memory one Lua VM may hold. Default 32 MiB.
    pub memory_limit_bytes: usize,
}

impl Default for LuaConfig {
    fn default() -> Self {
        LuaConfig {
            instruction_budget: 1_000_000,
            memory_limit_bytes: 32 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (connect errors, 5xx, timeouts) that eject a backend. Default 5.
    pub consecutive_failures: u32,
    /// First ejection; each further one doubles it. Default 10 000 ms.
    pub base_ejection_ms: u64,
    /// Longest ejection. Default 300 000 ms.
    pub max_ejection_ms: u64,
    /// Most backends (percent of the set) ejected at once. Default 50.
    pub max_ejected_percent: u32,
    /// Cool-down after a 429 without `Retry-After`. Default 1 000 ms.
    pub default_cooldown_ms: u64,
    /// Longest cool-down whatever `Retry-After` says. Default 60 000 ms.
    pub max_cooldown_ms: u64,
    /// When every backend for a request is out only because it is unhealthy or ejected,
    /// try them all anyway ("panic mode") instead of answering a fast 503 with
    /// `Retry-After`. Default false.
    pub panic_mode: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
            default_cooldown_ms: 1_000,
            max_cooldown_ms: 60_000,
            panic_mode: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "HealthSpec")]
pub struct HealthConfig {
    /// Path probed with GET on every backend. Default `/health`.
    pub path: String,
    /// Time between probes. Default 5 000 ms.
    pub interval_ms: u64,
    /// Probe timeout (connect and answer). Default 1 000 ms.
    pub timeout_ms: u64,
    /// Successes in a row that bring an unhealthy backend back. Default 2.
    pub rise: u32,
    /// Failures in a row that mark a healthy backend down. Default 3.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/health".into(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
        }
    }
}

/// `health:` as written: each time in milliseconds (`interval_ms: 5000`) or, as DESIGN.md
/// writes it, as a duration with its unit (`interval: 5s`, `timeout: 500ms`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSpec {
    path: Option<String>,
    interval: Option<String>,
    interval_ms: Option<u64>,
    timeout: Option<String>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

impl TryFrom<HealthSpec> for HealthConfig {
    type Error = String;

    fn try_from(spec: HealthSpec) -> Result<HealthConfig, String> {
        let default = HealthConfig::default();
        Ok(HealthConfig {
            path: spec.path.unwrap_or(default.path),
            interval_ms: millis("interval", spec.interval, spec.interval_ms)?
                .unwrap_or(default.interval_ms),
            timeout_ms: millis("timeout", spec.timeout, spec.timeout_ms)?
                .unwrap_or(default.timeout_ms),
            rise: spec.rise.unwrap_or(default.rise),
            fall: spec.fall.unwrap_or(default.fall),
        })
    }
}

/// A time given as `name: 5s` or as `name_ms: 5000` (not both), in milliseconds.
fn millis(name: &str, with_unit: Option<String>, ms: Option<u64>) -> Result<Option<u64>, String> {
    match (with_unit, ms) {
        (Some(_), Some(_)) => Err(format!("health: give `{name}` or `{name}_ms`, not both")),
        (Some(text), None) => humantime::parse_duration(&text)
            .map(|d| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            .map_err(|e| {
                format!("health.{name}: `{text}` is not a duration such as `5s` or `500ms` ({e})")
            }),
        (None, ms) => Ok(ms),
    }
}

fn default_listen() -> Vec<Listener> {
    vec![Listener {
        addr: "0.0.0.0:8080".into(),
        tls: None,
    }]
}
fn default_policies_dir() -> PathBuf {
    PathBuf::from("policies")
}
fn default_provider() -> String {
    "openai".into()
}
fn default_weight() -> f64 {
    1.0
}
fn default_queue_max() -> usize {
    64
}
fn default_queue_timeout_ms() -> u64 {
    5_000
}
fn default_max_attempts() -> u32 {
    3
}

/// Most attempts a route may allow per request (Pingora's retry loop is set to match).
pub const MAX_ATTEMPTS: u32 = 16;

/// The longest backend name; a policy's answer is read no further than this per name.
pub const MAX_BACKEND_NAME_BYTES: usize = 1024;

/// A refused config: every problem, each with the path of the value at fault.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid config ({} problem(s)):", self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }

    /// `Ok` when there are no problems, else all of them.
    fn unless_any(problems: Vec<String>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Which files [`Config::file_problems`] loads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Files {
    Policies,
    All,
}

impl Config {
    /// Read, parse and validate a config file to start with: every file it names must load
    /// (policies, listener certificate pairs, backend CA files). Relative paths are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_text(path).map(|(config, _)| config)
    }

    /// [`Config::load`], with the text it was loaded from (what a reload compares against).
    pub fn load_with_text(path: &Path) -> Result<(Config, String), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        let config = Config::from_text_at(&text, path, Files::All)?;
        Ok((config, text))
    }

    /// Parse and validate the text of the config file at `path`, for a reload: the policy
    /// files it names must exist. Listener certificates are not looked at (listeners only
    /// change with a restart, and the certificate reloader keeps the pair in service while
    /// files on disk are being replaced); backend CA files are loaded when the backends are
    /// built.
    pub fn from_file_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::from_text_at(text, path, Files::Policies)
    }

    /// Parse the text of the config file at `path` and check it, `which` files included:
    /// every problem is listed at once, those of the files with the others.
    fn from_text_at(text: &str, path: &Path, which: Files) -> Result<Config, ConfigError> {
        let mut config = Config::parse_unchecked(text)?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        let mut problems = config.problems();
        problems.extend(config.file_problems(which));
        ConfigError::unless_any(problems).map(|()| config)
    }

    /// Parse and validate YAML text (paths are left as written).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::parse_unchecked(text)?;
        ConfigError::unless_any(config.problems()).map(|()| config)
    }

    /// The YAML read into a config, without the semantic checks. When it does not fit the
    /// config's types, every misfit is listed (YAML that does not parse is one problem).
    fn parse_unchecked(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml::from_str(text).map_err(|e| {
            // serde_yaml's message names the place itself ("… at line 2 column 1").
            let message = e.to_string();
            // (A message of the config's own, such as `health`'s, comes with the document's
            // start, line 1 column 1, which is not its place.)
            let at = match e.location() {
                Some(l) if !message.contains(" at line ") && (l.line(), l.column()) != (1, 1) => {
                    format!(" (line {}, column {})", l.line(), l.column())
                }
                _ => String::new(),
            };
            let first = format!("{message}{at}");
            match serde_yaml::from_str::<serde_yaml::Value>(text) {
                Ok(yaml) => ConfigError {
                    problems: misfits::all(&yaml, &first),
                },
                Err(_) => ConfigError::one(first),
            }
        })?;
        if config.auth.mode == AuthMode::Auto {
            config.auth.mode = if config.tenants.is_empty() {
                AuthMode::Off
            } else {
                AuthMode::Required
            };
        }
        Ok(config)
    }

    /// Make relative file paths (policies, certificates, CA files) relative to `dir`, the
    /// config file's directory.
    fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        resolve(&mut self.policies_dir);
        for tls in self.listen.iter_mut().filter_map(|l| l.tls.as_mut()) {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        for ca in self.backends.iter_mut().filter_map(|b| b.ca_file.as_mut()) {
            resolve(ca);
        }
    }

    /// Check an in-memory config (e.g. one changed through the admin API) as a reloaded
    /// file is.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = self.problems();
        problems.extend(self.file_problems(Files::Policies));
        ConfigError::unless_any(problems)
    }

    /// Every semantic problem, by path. Empty when the config is valid.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listen.is_empty() {
            out.push("listen: at least one listener is required".into());
        }
        for (i, l) in self.listen.iter().enumerate() {
            if l.addr.parse::<std::net::SocketAddr>().is_err() {
                out.push(format!(
                    "listen[{i}].addr: `{}` is not an address like 0.0.0.0:8080",
                    l.addr
                ));
            }
        }
        let mut bound: Vec<(std::net::SocketAddr, String)> = Vec::new();
        for (i, l) in self.listen.iter().enumerate() {
            if let Ok(addr) = l.addr.parse::<std::net::SocketAddr>() {
                if let Some((_, first)) = bound.iter().find(|(a, _)| a == &addr) {
                    out.push(format!("listen[{i}].addr: `{addr}` is already {first}"));
                }
                bound.push((addr, format!("listen[{i}].addr")));
            }
        }
        if let Some(a) = &self.admin {
            match a.addr.parse::<std::net::SocketAddr>() {
                Err(_) => out.push(format!(
                    "admin.addr: `{}` is not an address like 127.0.0.1:9090",
                    a.addr
                )),
                // Two services on one port would share its connections at random.
                Ok(addr) => {
                    if let Some((_, first)) = bound.iter().find(|(a, _)| a == &addr) {
                        out.push(format!("admin.addr: `{addr}` is already {first}"));
                    }
                }
            }
        }
        if self.routes.is_empty() {
            out.push("routes: at least one route is required".into());
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !is_policy_name(&r.policy) {
                out.push(format!(
                    "routes[{i}].policy: `{}` is not a policy name",
                    r.policy
                ));
            }
            if let Some(f) = &r.fallback_policy {
                if !is_policy_name(f) {
                    out.push(format!(
                        "routes[{i}].fallback_policy: `{f}` is not a policy name"
                    ));
                }
            }
            if !(1..=MAX_ATTEMPTS).contains(&r.max_attempts) {
                out.push(format!(
                    "routes[{i}].max_attempts: must be from 1 to {MAX_ATTEMPTS}"
                ));
            }
            if let Some(p) = &r.matcher.path_prefix {
                if !p.starts_with('/') {
                    out.push(format!(
                        "routes[{i}].match.path_prefix: must start with `/`"
                    ));
                }
            }
        }
        if self.backends.is_empty() {
            out.push("backends: at least one backend is required".into());
        }
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let at = format!("backends[{i}]");
            if b.name.is_empty() {
                out.push(format!("{at}.name: must not be empty"));
            } else if b.name.len() > MAX_BACKEND_NAME_BYTES {
                out.push(format!(
                    "{at}.name: must be at most {MAX_BACKEND_NAME_BYTES} bytes"
                ));
            } else if !names.insert(b.name.as_str()) {
                out.push(format!("{at}.name: duplicate backend name `{}`", b.name));
            }
            if let Err(why) = crate::backends::Upstream::parse(&b.url) {
                out.push(format!("{at}.url: {why}"));
            }
            if !matches!(b.provider.as_str(), "openai" | "anthropic" | "azure") {
                out.push(format!(
                    "{at}.provider: `{}` is not one of openai, anthropic, azure",
                    b.provider
                ));
            }
            if let Some(v) = &b.api_version {
                if b.provider == "openai" {
                    out.push(format!(
                        "{at}.api_version: only `azure` and `anthropic` backends take one"
                    ));
                } else if !crate::provider::is_plain_token(v) {
                    out.push(format!(
                        "{at}.api_version: `{v}` must be letters, digits, `-`, `_` or `.`"
                    ));
                }
            }
            if b.provider == "azure" {
                for (_, deployment) in b.models.pairs() {
                    if !crate::provider::is_plain_token(&deployment) {
                        out.push(format!(
                            "{at}.models: `{deployment}` is not an Azure deployment name (letters, digits, `-`, `_`, `.`)"
                        ));
                    }
                }
            }
            if !(b.weight > 0.0 && b.weight.is_finite()) {
                out.push(format!("{at}.weight: must be > 0"));
            }
            if b.models.pairs().is_empty() {
                out.push(format!("{at}.models: at least one model is required"));
            }
            if ![b.cost.input, b.cost.output]
                .iter()
                .all(|p| p.is_finite() && *p >= 0.0)
            {
                out.push(format!("{at}.cost: prices must be >= 0"));
            }
            if b.ca_file.is_some() && !b.url.starts_with("https://") {
                out.push(format!(
                    "{at}.ca_file: only an https:// backend is verified with a CA file"
                ));
            }
            if let Some(path) = &b.health_path {
                if !path.is_empty() && !path.starts_with('/') {
                    out.push(format!(
                        "{at}.health_path: must start with `/` (or be empty to switch checks off)"
                    ));
                }
            }
            if let Some(var) = &b.api_key_env {
                if let Err(e) = api_key_from_env(var) {
                    out.push(format!("{at}.api_key_env: {e}"));
                }
            }
        }
        let mut tenant_names = HashSet::new();
        let mut key_hashes = HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if !tenant_names.insert(t.name.as_str()) || t.name == crate::request::ANONYMOUS {
                out.push(format!(
                    "tenants[{i}].name: `{}` is a duplicate or reserved name",
                    t.name
                ));
            }
            if t.key_sha256.is_empty() {
                out.push(format!(
                    "tenants[{i}].key_sha256: at least one key hash is required"
                ));
            }
            for (j, h) in t.key_sha256.iter().enumerate() {
                if crate::tenants::decode_hash(h).is_none() {
                    out.push(format!("tenants[{i}].key_sha256[{j}]: must be 64 hex digits (the SHA-256 of the key, not the key)"));
                } else if !key_hashes.insert(h.trim().to_ascii_lowercase()) {
                    out.push(format!(
                        "tenants[{i}].key_sha256[{j}]: the same key is configured twice"
                    ));
                }
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            let Some(l) = &t.limits else { continue };
            for (name, v) in [("rpm", l.rpm), ("tpm", l.tpm), ("concurrent", l.concurrent)] {
                if v == Some(0) {
                    out.push(format!(
                        "tenants[{i}].limits.{name}: must be > 0 (leave it out for no limit)"
                    ));
                }
            }
            if l.usd_per_day.is_some_and(|u| !(u.is_finite() && u > 0.0)) {
                out.push(format!("tenants[{i}].limits.usd_per_day: must be > 0"));
            }
        }
        if let Some(r) = &self.redis {
            match r.resolve_url() {
                Err(e) => out.push(e),
                Ok(url) => match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                    Err(_) => out.push("redis.url: not a redis:// URL".into()),
                    Ok(info) if r.url.is_some() && info.redis_settings().password().is_some() => {
                        out.push("redis.url: holds a password; put the URL in an environment variable named by `url_env`".into())
                    }
                    Ok(_) => {}
                },
            }
            if r.timeout_ms == 0 {
                out.push("redis.timeout_ms: must be > 0".into());
            }
            if r.lease_seconds == 0 {
                out.push("redis.lease_seconds: must be > 0".into());
            }
        }
        if self.auth.mode == AuthMode::Required && self.tenants.is_empty() {
            out.push("auth.mode: `required` needs at least one tenant".into());
        }
        let p = &self.proxy;
        if p.threads == Some(0) {
            out.push("proxy.threads: must be >= 1".into());
        }
        if p.max_body_bytes == 0 {
            out.push("proxy.max_body_bytes: must be > 0".into());
        }
        for (name, v) in [
            ("connect_timeout_ms", p.connect_timeout_ms),
            ("ttfb_timeout_ms", p.ttfb_timeout_ms),
            ("idle_timeout_ms", p.idle_timeout_ms),
            ("body_timeout_ms", p.body_timeout_ms),
            ("header_timeout_ms", p.header_timeout_ms),
            ("write_timeout_ms", p.write_timeout_ms),
            ("keepalive_timeout_seconds", p.keepalive_timeout_seconds),
        ] {
            if v == 0 {
                out.push(format!("proxy.{name}: must be > 0"));
            }
        }
        let o = &self.outlier;
        if o.consecutive_failures == 0 {
            out.push("outlier.consecutive_failures: must be >= 1".into());
        }
        if o.base_ejection_ms == 0 || o.max_ejection_ms < o.base_ejection_ms {
            out.push("outlier.base_ejection_ms: must be > 0 and <= max_ejection_ms".into());
        }
        if o.max_ejected_percent > 100 {
            out.push("outlier.max_ejected_percent: must be <= 100".into());
        }
        if let Some(h) = &self.health {
            if !h.path.starts_with('/') {
                out.push("health.path: must start with `/`".into());
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 || h.rise == 0 || h.fall == 0 {
                out.push("health: interval_ms, timeout_ms, rise and fall must be > 0".into());
            }
        }
        if self.lua.instruction_budget < 1000 {
            out.push("lua.instruction_budget: must be >= 1000".into());
        }
        if self.lua.memory_limit_bytes < 1024 * 1024 {
            out.push("lua.memory_limit_bytes: must be >= 1 MiB".into());
        }
        out
    }

    /// Problems with the files the config names, by path: every policy a route names
    /// must exist, and with [`Files::All`] every listener certificate pair and backend CA
    /// file must load and the audit file's directory must exist.
    fn file_problems(&self, which: Files) -> Vec<String> {
        let mut problems = Vec::new();
        let all = which == Files::All;
        for (i, l) in self.listen.iter().enumerate().filter(|_| all) {
            if let Some(tls) = &l.tls {
                if let Err(e) = crate::tls::ListenerCert::load(&l.addr, &tls.cert, &tls.key) {
                    problems.push(format!("listen[{i}].tls: {e}"));
                }
            }
        }
        for (i, b) in self.backends.iter().enumerate().filter(|_| all) {
            if let Some(ca) = &b.ca_file {
                if let Err(e) = crate::tls::load_ca_file(ca) {
                    problems.push(format!("backends[{i}].ca_file: {e}"));
                }
            }
        }
        // The audit file is opened at start: its directory must be there (read at start
        // only, so a reload does not look).
        if let Some(audit) = self.audit.as_ref().filter(|_| all) {
            let dir = audit
                .path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                problems.push(format!(
                    "audit.path: the directory {} does not exist",
                    dir.display()
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let named = std::iter::once(("policy", &r.policy))
                .chain(r.fallback_policy.iter().map(|f| ("fallback_policy", f)));
            for (field, name) in named {
                let file = self.policies_dir.join(format!("{name}.lua"));
                if !file.is_file() {
                    problems.push(format!(
                        "routes[{i}].{field}: policy `{name}` not found ({} is missing)",
                        file.display()
                    ));
                }
            }
        }
        problems
    }

    /// Every model any backend serves (client-facing names), sorted.
    pub fn model_names(&self) -> Vec<String> {
        let mut set: Vec<String> = self
            .backends
            .iter()
            .flat_map(|b| b.models.pairs().into_iter().map(|(m, _)| m))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        set.sort();
        set
    }

    /// The configured backends' names, in order.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    /// The policy names the routes use, primary and fallback.
    pub fn policy_names(&self) -> Vec<String> {
        let mut seen: HashMap<&str, ()> = HashMap::new();
        let mut out = Vec::new();
        for r in &self.routes {
            for n in std::iter::once(&r.policy).chain(r.fallback_policy.iter()) {
                if seen.insert(n, ()).is_none() {
                    out.push(n.clone());
                }
            }
        }
        out
    }
}

fn is_policy_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A backend's key from the environment variable `var`: its value without surrounding
/// whitespace (a key file mounted as a variable often ends in a newline). An error names
/// the variable, never the value: unset, empty, or not sendable in a header.
pub fn api_key_from_env(var: &str) -> Result<String, String> {
    let value = std::env::var(var).map_err(|e| match e {
        std::env::VarError::NotPresent => format!("environment variable `{var}` is not set"),
        std::env::VarError::NotUnicode(_) => {
            format!("environment variable `{var}` is not valid UTF-8")
        }
    })?;
    let key = value.trim();
    if key.is_empty() {
        return Err(format!("environment variable `{var}` is empty"));
    }
    if http::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
        return Err(format!(
            "environment variable `{var}` holds characters a header cannot carry"
        ));
    }
    Ok(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_key_is_trimmed_and_an_empty_or_unsendable_one_refused_by_name() {
        std::env::set_var("SWITCHYARD_CONFIG_TEST_KEY_NL", "  sk-abc123\n");
        std::env::set_var("SWITCHYARD_CONFIG_TEST_KEY_EMPTY", " \n");
        std::env::set_var("SWITCHYARD_CONFIG_TEST_KEY_CTRL", "sk-a\u{1}SECRET");
        assert_eq!(
            api_key_from_env("SWITCHYARD_CONFIG_TEST_KEY_NL").as_deref(),
            Ok("sk-abc123")
        );
        for (var, why) in [
            ("SWITCHYARD_CONFIG_TEST_KEY_EMPTY", "is empty"),
            (
                "SWITCHYARD_CONFIG_TEST_KEY_CTRL",
                "characters a header cannot carry",
            ),
            ("SWITCHYARD_CONFIG_TEST_KEY_UNSET", "is not set"),
        ] {
            let e = api_key_from_env(var).unwrap_err();
            assert!(e.contains(var) && e.contains(why), "{e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    const GOOD: &str = r#"
listen: [{ addr: "127.0.0.1:8080" }]
routes:
  - match: { path_prefix: /v1/ }
    policy: round_robin
backends:
  - name: a
    url: http://127.0.0.1:9001
    models: [m]
  - name: b
    url: http://127.0.0.1:9002
    models: { m: upstream-m }
    weight: 2
"#;

    #[test]
    fn health_times_in_milliseconds_or_with_their_unit_as_design_md_writes_them() {
        let health = |line: &str| {
            Config::parse(&format!("{GOOD}{line}\n")).map(|c| c.health.expect("a health section"))
        };
        // DESIGN.md's line as it is.
        let h = health("health: { path: /health, interval: 5s, timeout: 1s, rise: 2, fall: 3 }")
            .unwrap();
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.rise, h.fall),
            (5_000, 1_000, 2, 3)
        );
        let h = health("health: { interval: 1m 30s, timeout: 250ms }").unwrap();
        assert_eq!((h.interval_ms, h.timeout_ms), (90_000, 250));
        let h = health("health: { interval_ms: 700 }").unwrap();
        assert_eq!((h.interval_ms, h.timeout_ms), (700, 1_000));
        assert_eq!(health("health: {}").unwrap(), HealthConfig::default());
        for (line, says) in [
            (
                "health: { interval: 5s, interval_ms: 5000 }",
                "give `interval` or `interval_ms`, not both",
            ),
            (
                "health: { timeout: soon }",
                "health.timeout: `soon` is not a duration",
            ),
            (
                "health: { interval: 0s }",
                "interval_ms, timeout_ms, rise and fall must be > 0",
            ),
            ("health: { every: 5s }", "unknown field `every`"),
        ] {
            let problems = health(line).unwrap_err().problems;
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{line}: {problems:?}"
            );
        }
    }

    #[test]
    fn listeners_apart_finite_prices_and_attempts_within_pingoras_loop() {
        let text = GOOD
            .replace(
                "listen: [{ addr: \"127.0.0.1:8080\" }]",
                "listen: [{ addr: \"127.0.0.1:8080\" }, { addr: \"127.0.0.1:8080\" }]\n\
                 admin: { addr: \"127.0.0.1:8080\" }",
            )
            .replace(
                "    policy: round_robin",
                "    policy: round_robin\n    max_attempts: 17",
            )
            .replace(
                "    weight: 2",
                "    weight: 2\n    cost: { input: .nan, output: 1 }",
            );
        let problems = Config::parse(&text).unwrap_err().problems;
        for expected in [
            "listen[1].addr: `127.0.0.1:8080` is already listen[0].addr",
            "admin.addr: `127.0.0.1:8080` is already listen[0].addr",
            "routes[0].max_attempts: must be from 1 to 16",
            "backends[1].cost: prices must be >= 0",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "{expected}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn the_audit_file_must_be_in_a_directory_that_exists() {
        let text = format!("{GOOD}audit: {{ path: /nonexistent/dir/audit.log }}\n");
        let problems = Config::from_text_at(&text, Path::new("sy.yaml"), Files::All)
            .unwrap_err()
            .problems;
        assert!(
            problems.contains(&"audit.path: the directory /nonexistent/dir does not exist".into()),
            "{problems:?}"
        );
        let stdout = format!("{GOOD}audit: {{ path: \"-\" }}\n");
        let problems = Config::from_text_at(&stdout, Path::new("sy.yaml"), Files::All)
            .err()
            .map(|e| e.problems)
            .unwrap_or_default();
        assert!(
            !problems.iter().any(|p| p.starts_with("audit")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_yaml_error_names_its_place_once() {
        for (text, place) in [
            ("listen: 5\n", "line 1 column 9"),
            ("listen: []\nfoo: 1\n", "line 2 column 1"),
            ("listen: [{ addr: \"127.0.0.1:1\" }\n", "line 2 column 1"),
        ] {
            // The first problem names the place (the others, the sections missing, none).
            let problems = Config::parse(text).unwrap_err().problems;
            assert!(problems[0].contains(place), "{problems:?}");
            // Not a second time in another form ("… (line 1, column 9)").
            assert!(!problems[0].contains(", column"), "{problems:?}");
            assert!(
                problems[1..].iter().all(|p| !p.contains("line")),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[0].weight, 1.0);
        assert_eq!(c.backends[0].provider, "openai");
        assert_eq!(c.proxy.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.routes[0].max_attempts, 3);
        assert_eq!(
            c.backends[1].models.pairs(),
            vec![("m".to_string(), "upstream-m".to_string())]
        );
        assert_eq!(c.model_names(), vec!["m".to_string()]);
    }

    #[test]
    fn every_problem_is_listed_by_path() {
        let bad = r#"
routes:
  - policy: "no such/policy"
backends:
  - name: a
    url: ftp://x
    models: [m]
    weight: 0
  - name: a
    url: http://127.0.0.1:1
    models: [m]
    provider: gopher
    api_key_env: SWITCHYARD_TEST_SURELY_UNSET_VAR
"#;
        let err = Config::parse(bad).unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "routes[0].policy:",
            "backends[0].url:",
            "backends[0].weight: must be > 0",
            "backends[1].name: duplicate backend name `a`",
            "backends[1].provider:",
            "backends[1].api_key_env: environment variable `SWITCHYARD_TEST_SURELY_UNSET_VAR` is not set",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        assert_eq!(err.problems.len(), 6, "{all}");
    }

    #[test]
    fn a_missing_policy_file_is_listed_with_the_other_problems() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let text = format!(
            "policies_dir: {}\nlisten: [{{ addr: \"127.0.0.1:8080\" }}]\nroutes:\n  - policy: nowhere\nbackends:\n  - {{ name: a, url: \"http://127.0.0.1:1\", models: [m], weight: 0 }}\n",
            dir.path().display()
        );
        std::fs::write(&path, &text).unwrap();
        for err in [
            Config::load(&path).unwrap_err(),
            Config::from_file_text(&text, &path).unwrap_err(),
        ] {
            let all = err.problems.join("\n");
            assert!(all.contains("backends[0].weight: must be > 0"), "{all}");
            assert!(
                all.contains("routes[0].policy: policy `nowhere` not found"),
                "{all}"
            );
            assert_eq!(err.problems.len(), 2, "{all}");
        }
    }

    #[test]
    fn unknown_field_is_refused_with_location() {
        let err = Config::parse("routes: []\nbackends: []\nbogus: 1\n").unwrap_err();
        let problem = &err.problems[0];
        assert!(problem.contains("unknown field `bogus`"), "{problem}");
        assert!(problem.ends_with("at line 3 column 1"), "{problem}");
    }
}
