//! The admin listener (`admin.addr`, loopback by default): Prometheus metrics, policy
//! versions, and reloads. JSON in and out; errors in the OpenAI-style envelope.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::{self, METRICS};
use crate::reload::Reloader;
use crate::runtime::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let head = session.req_header();
        let (method, path) = (head.method.clone(), head.uri.path().to_string());
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                self.refresh_gauges();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    metrics::render(),
                )
            }
            (Method::GET, "/healthz") => json_reply(StatusCode::OK, json!({ "status": "ok" })),
            (Method::GET, "/admin/policies") => json_reply(StatusCode::OK, self.policies()),
            (Method::POST, "/admin/reload") => {
                let reloader = self.reloader.clone();
                match tokio::task::spawn_blocking(move || reloader.reload_all()).await {
                    Ok(report) => {
                        let ok = report.config_errors.is_empty() && report.rejected.is_empty();
                        let status = if ok {
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
    /// Gauges are read from the live counters when scraped, not kept up to date per request.
    fn refresh_gauges(&self) {
        let runtime = self.shared.load();
        for b in &runtime.backends.backends {
            METRICS
                .backend_inflight
                .with_label_values(&[b.name()])
                .set(b.stats.inflight() as i64);
        }
    }

    fn policies(&self) -> serde_json::Value {
        let runtime = self.shared.load();
        let status = self
            .shared
            .policy_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
        json!({ "policies": list })
    }
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
