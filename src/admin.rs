//! The admin listener (`admin.addr`, loopback by default): Prometheus metrics, policy
//! versions, and reloads. JSON in and out; errors in the OpenAI-style envelope.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use sha2::{Digest, Sha256};

use crate::backends::Secret;
use crate::config::{BackendConfig, Config};
use crate::metrics::{self, METRICS};
use crate::reload::{Change, Reloader};
use crate::runtime::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
    pub reloader: Arc<Reloader>,
}

/// Who may use the admin API under a config: read once per config (the token is
/// registered for redaction then), so a reload that names another variable takes effect.
#[derive(Debug)]
pub enum AdminAccess {
    /// No `admin.token_env`: everyone who reaches the listener.
    Open,
    /// Requests with `Authorization: Bearer` and this token.
    Token(Secret),
    /// `admin.token_env` names a variable that is not set, or empty: nobody, until it is
    /// set and the process restarted (a Kubernetes Secret marked optional, for instance).
    Locked,
}

impl AdminAccess {
    pub fn of(config: &Config) -> AdminAccess {
        let Some(var) = config.admin.as_ref().and_then(|a| a.token_env.as_ref()) else {
            return AdminAccess::Open;
        };
        // Read as a backend key is: trimmed, and refused when empty (an empty token would
        // match a request without the header, opening the API it is meant to close).
        match crate::config::api_key_from_env(var) {
            Ok(token) => AdminAccess::Token(Secret::new(token)),
            Err(why) => {
                log::warn!(target: "switchyard::admin", "admin.token_env: {why}; the admin API answers 401 to every request but / and /healthz");
                AdminAccess::Locked
            }
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let head = session.req_header();
        let (method, path) = (head.method.clone(), head.uri.path().to_string());
        let public = method == Method::GET && matches!(path.as_str(), "/" | "/healthz");
        if !public && !self.authorized(head) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
        }
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                // One scrape at a time: another's reset must not fall between this one's
                // refresh and its rendering.
                static SCRAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());
                let text = {
                    let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
                    self.refresh_gauges();
                    metrics::render()
                };
                reply(StatusCode::OK, "text/plain; version=0.0.4", text)
            }
            (Method::GET, "/") => dashboard(),
            (Method::GET, "/admin/decisions") => {
                let limit = query_param(session.req_header().uri.query(), "limit")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(50usize);
                let recent = self.shared.audit.recent(limit.min(200));
                let decisions: Vec<&crate::audit::AuditRecord> =
                    recent.iter().map(|r| r.as_ref()).collect();
                json_reply(StatusCode::OK, json!({ "decisions": decisions }))
            }
            (Method::GET, "/healthz") => json_reply(StatusCode::OK, json!({ "status": "ok" })),
            (Method::GET, "/admin/policies") => json_reply(StatusCode::OK, self.policies()),
            (Method::GET, "/admin/backends") => json_reply(StatusCode::OK, self.backends()),
            (Method::GET, "/admin/config") => json_reply(StatusCode::OK, self.config()),
            (Method::POST, "/admin/backends") => match read_body(session).await {
                Ok(body) => self.add_backend(&body).await,
                Err(resp) => resp,
            },
            (Method::DELETE, p) if p.starts_with("/admin/backends/") => {
                let name = decoded(&p["/admin/backends/".len()..]);
                self.remove_backend(&name).await
            }
            (Method::POST, p) if p.starts_with("/admin/backends/") => {
                let rest = &p["/admin/backends/".len()..];
                match rest.rsplit_once('/') {
                    Some((name, "drain")) => self.drain(&decoded(name), true),
                    Some((name, "undrain")) => self.drain(&decoded(name), false),
                    _ => error(StatusCode::NOT_FOUND, "unknown admin endpoint"),
                }
            }
            (Method::POST, "/admin/reload") => {
                let reloader = self.reloader.clone();
                match tokio::task::spawn_blocking(move || reloader.reload_all()).await {
                    Ok(report) => {
                        let status = if report.is_clean() {
                            StatusCode::OK
                        } else {
                            StatusCode::UNPROCESSABLE_ENTITY
                        };
                        json_reply(status, json!(report))
                    }
                    Err(_) => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "reload failed; see the log",
                    ),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "unknown admin endpoint"),
        }
    }
}

impl Admin {
    /// With `admin.token_env` set, every request but the page and `/healthz` needs
    /// `Authorization: Bearer TOKEN` (compared in constant time).
    fn authorized(&self, head: &pingora::http::RequestHeader) -> bool {
        let runtime = self.shared.load();
        let token = match runtime.admin_access.as_ref() {
            AdminAccess::Open => return true,
            AdminAccess::Locked => return false,
            AdminAccess::Token(token) => token.expose(),
        };
        let presented = head
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::tenants::bearer_token)
            .unwrap_or("");
        use subtle::ConstantTimeEq;
        let (a, b) = (
            Sha256::digest(presented.as_bytes()),
            Sha256::digest(token.as_bytes()),
        );
        bool::from(a.ct_eq(&b))
    }

    /// Gauges are read from the live state when scraped, not kept up to date per request.
    /// They are cleared first, so a backend removed by the API or a reload leaves none.
    fn refresh_gauges(&self) {
        let runtime = self.shared.load();
        METRICS.backend_inflight.reset();
        METRICS.backend_healthy.reset();
        for b in &runtime.backends.backends {
            METRICS
                .backend_inflight
                .with_label_values(&[b.name()])
                .set(b.stats.inflight() as i64);
            let up = b.stats.health.is_healthy() && !b.stats.breaker.is_ejected();
            METRICS
                .backend_healthy
                .with_label_values(&[b.name()])
                .set(i64::from(up));
        }
    }

    /// The effective config, with tenants' key hashes masked.
    fn config(&self) -> serde_json::Value {
        let runtime = self.shared.load();
        let mut value = serde_json::to_value(runtime.config.as_ref()).unwrap_or_default();
        if let Some(tenants) = value.get_mut("tenants").and_then(|t| t.as_array_mut()) {
            for t in tenants {
                if let Some(keys) = t.get_mut("key_sha256").and_then(|k| k.as_array_mut()) {
                    for k in keys {
                        *k = json!("***");
                    }
                }
            }
        }
        value
    }

    /// `POST /admin/backends`: add a backend (the hook an autoscaler calls). The body is a
    /// backend as in the config file, in JSON.
    async fn add_backend(&self, body: &[u8]) -> Response<Vec<u8>> {
        let backend: BackendConfig = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("not a backend: {e}")),
        };
        let name = backend.name.clone();
        self.change(StatusCode::CREATED, &name, "added", move |config| {
            if config.backends.iter().any(|b| b.name == backend.name) {
                return Err((StatusCode::CONFLICT, "a backend of that name exists"));
            }
            config.backends.push(backend);
            Ok(())
        })
        .await
    }

    /// `DELETE /admin/backends/{name}`: stop sending it traffic; requests in flight finish.
    async fn remove_backend(&self, name: &str) -> Response<Vec<u8>> {
        let removed = name.to_string();
        self.change(StatusCode::OK, name, "removed", move |config| {
            let before = config.backends.len();
            config.backends.retain(|b| b.name != removed);
            if config.backends.len() == before {
                return Err((StatusCode::NOT_FOUND, "no backend of that name"));
            }
            Ok(())
        })
        .await
    }

    /// Make a change to the config in service (see [`Reloader::change`]) and answer with
    /// its outcome: `ok` when made.
    async fn change(
        &self,
        ok: StatusCode,
        name: &str,
        what: &str,
        edit: impl FnOnce(&mut Config) -> Result<(), (StatusCode, &'static str)> + Send + 'static,
    ) -> Response<Vec<u8>> {
        let reloader = self.reloader.clone();
        match tokio::task::spawn_blocking(move || reloader.change(edit)).await {
            Ok(Ok(())) => {
                log::info!(target: "switchyard::admin", "backend {name} {what}");
                json_reply(ok, json!({ "name": name, "result": what }))
            }
            Ok(Err(Change::Refused((status, message)))) => error(status, message),
            Ok(Err(Change::Invalid(problems))) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "error": { "message": "the change was refused", "type": "admin_error", "param": null, "code": "invalid_config" },
                    "problems": problems,
                }),
            ),
            Err(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the change failed; see the log",
            ),
        }
    }

    /// Each backend's config (without secrets) and live state.
    fn backends(&self) -> serde_json::Value {
        let runtime = self.shared.load();
        let now = tokio::time::Instant::now();
        let list: Vec<serde_json::Value> = runtime
            .backends
            .backends
            .iter()
            .map(|b| {
                let s = &b.stats;
                let mut models: Vec<&String> = b.models.keys().collect();
                models.sort();
                json!({
                    "name": b.name(),
                    "url": b.config.url,
                    "provider": b.config.provider,
                    "region": b.config.region,
                    "weight": b.config.weight,
                    "max_inflight": b.config.max_inflight,
                    "models": models,
                    "tags": b.config.tags,
                    "cost": { "input": b.config.cost.input, "output": b.config.cost.output },
                    "healthy": s.health.is_healthy(),
                    "draining": s.breaker.is_draining(),
                    "eligible": b.eligibility(now).is_ok(),
                    "why_not": b.eligibility(now).err().map(|w| w.as_str()),
                    "inflight": s.inflight(),
                    "latency_ms": s.latency_ms(),
                    "ttft_ms": s.ttft_ms(),
                    "tps": s.tps(),
                    "error_rate": s.error_rate(),
                })
            })
            .collect();
        json!({ "backends": list })
    }

    fn drain(&self, name: &str, draining: bool) -> Response<Vec<u8>> {
        let runtime = self.shared.load();
        let Some(b) = runtime.backends.get(name) else {
            return error(StatusCode::NOT_FOUND, "no backend of that name");
        };
        b.stats.breaker.set_draining(draining);
        log::info!(target: "switchyard::admin", "backend {name} {}", if draining { "draining" } else { "back in rotation" });
        json_reply(
            StatusCode::OK,
            json!({ "name": name, "draining": draining, "inflight": b.stats.inflight() }),
        )
    }

    fn policies(&self) -> serde_json::Value {
        let runtime = self.shared.load();
        let status = self.shared.policy_status();
        let list: Vec<serde_json::Value> = runtime
            .policies
            .iter()
            .map(|p| {
                let s = status.get(&p.name);
                json!({
                    "name": p.name,
                    "version": p.version,
                    "file": p.path.display().to_string(),
                    "loaded_at": s.map(|s| s.loaded_at),
                    "last_rejection": s.and_then(|s| s.last_rejection.clone()),
                })
            })
            .collect();
        let config_rejection = self
            .shared
            .config_rejection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        json!({ "policies": list, "last_config_rejection": config_rejection })
    }
}

/// The live dashboard: one self-contained page (no CDN), refreshed from the JSON endpoints.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard page: never cached, and allowed to load nothing from anywhere else.
fn dashboard() -> Response<Vec<u8>> {
    let mut page = reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        DASHBOARD.as_bytes().to_vec(),
    );
    let headers = page.headers_mut();
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
        ),
    );
    page
}

/// The request body, up to 1 MiB.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > 1024 * 1024 {
                    return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB"));
                }
            }
            Ok(None) => return Ok(body),
            Err(_) => return Err(error(StatusCode::BAD_REQUEST, "cannot read the body")),
        }
    }
}

/// A query-string value, by name.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

fn json_reply(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", value.to_string().into_bytes())
}

fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_reply(
        status,
        json!({ "error": { "message": message, "type": "admin_error", "param": null, "code": status.as_u16().to_string() } }),
    )
}

/// A backend name from a path segment, percent-decoded (`sp%20ace` is `sp ace`).
fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin: &str) -> Config {
        serde_yaml::from_str(&format!("{admin}routes: []\nbackends: []\n")).unwrap()
    }

    #[test]
    fn the_admin_token_is_read_with_its_config_and_masked_from_then_on() {
        let var = "SY_UNIT_TEST_ADMIN_TOKEN";
        let token = "unit-test-admin-token-4f1c";
        std::env::set_var(var, token);
        let line = format!("the token {token} reached the log");
        assert!(matches!(AdminAccess::of(&config("")), AdminAccess::Open));
        let with_token = config(&format!(
            "admin: {{ addr: \"127.0.0.1:1\", token_env: {var} }}\n"
        ));
        match AdminAccess::of(&with_token) {
            AdminAccess::Token(t) => assert_eq!(t.expose(), token),
            other => panic!("{other:?}"),
        }
        let scrubbed =
            String::from_utf8(crate::redact::scrub(line.as_bytes()).into_owned()).unwrap();
        assert!(!scrubbed.contains(token), "{scrubbed}");
        let unset = config("admin: { addr: \"127.0.0.1:1\", token_env: SY_UNIT_TEST_NOT_SET }\n");
        assert!(matches!(AdminAccess::of(&unset), AdminAccess::Locked));
    }

    #[test]
    fn an_empty_admin_token_locks_the_api_and_a_mounted_one_is_trimmed() {
        let var = "SY_UNIT_TEST_ADMIN_TOKEN_FORMS";
        let with_token = config(&format!(
            "admin: {{ addr: \"127.0.0.1:1\", token_env: {var} }}\n"
        ));
        for empty in ["", " \n"] {
            std::env::set_var(var, empty);
            let access = AdminAccess::of(&with_token);
            assert!(
                matches!(access, AdminAccess::Locked),
                "{empty:?}: {access:?}"
            );
        }
        std::env::set_var(var, "mounted-secret-token\n");
        match AdminAccess::of(&with_token) {
            AdminAccess::Token(t) => assert_eq!(t.expose(), "mounted-secret-token"),
            other => panic!("{other:?}"),
        }
    }
}
