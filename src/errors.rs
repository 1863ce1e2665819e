//! Errors a client can see. Each variant says what went wrong in the client's terms; it
//! becomes an HTTP status and an error envelope in exactly one place,
//! [`ClientError::envelope`]: OpenAI's, or Anthropic's for Anthropic-format requests. Internals (upstream bodies, policy source lines, keys) stay in
//! the log, keyed by request id, and never reach the response.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;

use crate::provider::{anthropic_error_type, ApiFormat};
pub use crate::tls::UpstreamTlsFailure;

/// Why a request was answered by Switchyard itself instead of a backend.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The body is not valid JSON.
    #[error("invalid JSON at line {line}, column {column}: {reason}")]
    BadJson {
        line: usize,
        column: usize,
        reason: String,
    },
    /// A field has the wrong JSON type.
    #[error("`{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    /// The request needs a `model` and has none.
    #[error("you must provide a model parameter")]
    MissingModel,
    /// The body is valid JSON but not an object.
    #[error("the request body must be a JSON object")]
    NotAnObject,
    /// A path with a `.` or `..` segment (plain or percent-encoded), an encoded slash or
    /// a backslash, or a target that is not a path: what it names depends on who reads
    /// it, so it is never passed on.
    #[error("the path may not contain `.` or `..` segments, encoded slashes or backslashes")]
    AmbiguousPath,
    /// No configured backend serves the model.
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    /// Backends serve the model, but none in the request's API format.
    #[error("the model `{model}` is not available through {api} here")]
    NotInFormat { model: String, api: &'static str },
    /// The body is over the configured limit.
    #[error("request body is larger than the limit of {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    /// The body could not be read (client closed the connection, or bad framing).
    #[error("the request body could not be read")]
    BadBody,
    /// The request head could not be read (Pingora refused it before any phase ran):
    /// malformed, or framing headers that conflict. Never quotes the head.
    #[error("the request head could not be read: it is malformed or its framing headers conflict")]
    BadHead,
    /// The request head is over Pingora's limits: too many headers, or over 1 MiB.
    #[error("the request has too many headers, or headers too large")]
    HeadTooLarge,
    /// `CONNECT`: Switchyard does not open tunnels.
    #[error("the method is not allowed")]
    MethodNotAllowed,
    /// The client sent the body too slowly.
    #[error("timed out reading the request body")]
    BodyTimeout,
    /// The body uses a content encoding we do not decode.
    #[error("Content-Encoding `{0}` is not supported; send the body uncompressed")]
    UnsupportedEncoding(String),
    /// No API key, or one no tenant has. Deliberately says nothing more.
    #[error("invalid or missing API key")]
    Unauthorized,
    /// No route, or no API at this path.
    #[error("unknown path `{0}`")]
    NotFound(String),
    /// Not one of the model APIs Switchyard forwards (files, batches, realtime sessions,
    /// any GET): so that a tenant's rules hold for every request sent with a backend's key.
    #[error("`{0}` is not served here: Switchyard forwards the model APIs (chat, completions, embeddings, responses, messages, ...), each a POST whose JSON body names a model")]
    NotProxied(String),
    /// The route's policy failed (error, budget, bad return) and no fallback saved it;
    /// `policy` names the versions tried (`name@version`, comma-separated).
    #[error("the routing policy failed for this request")]
    PolicyFailed { policy: Arc<str> },
    /// The policy (`name@version`) refused the request with its own status and message.
    #[error("{message}")]
    PolicyRejected {
        status: u16,
        message: String,
        policy: Arc<str>,
    },
    /// Everything the policy chose was removed by a rule it may not override.
    #[error("{0}")]
    Forbidden(String),
    /// Every backend for the model is at capacity or otherwise not eligible; the client
    /// may retry after `retry_after_secs`.
    #[error("no backend is available for model `{model}`; retry later")]
    NoBackendAvailable {
        model: String,
        retry_after_secs: u64,
    },
    /// Every attempt failed before a response could be relayed.
    #[error("the upstream backend is unavailable")]
    UpstreamUnavailable,
    /// The backend took too long to answer.
    #[error("the upstream backend timed out")]
    UpstreamTimeout,
    /// The backend refused our credentials (its body is never echoed).
    #[error("upstream authentication failed")]
    UpstreamAuthFailed,
    /// Over one of the tenant's limits or its daily budget.
    #[error("{}", .0.message)]
    RateLimited(Box<crate::limits::Exceeded>),
    /// The shared limit counters are unreachable and `redis.on_failure` is `closed`.
    #[error("rate limits cannot be checked right now; retry later")]
    LimitsUnavailable,
    /// The client went away while its request waited in the route's queue (logged as
    /// 499; nothing is sent).
    #[error("the client went away while its request waited")]
    ClientGone,
    /// TLS to the backend failed: its certificate did not verify, or the handshake broke.
    /// Never retried over cleartext.
    #[error("{}", tls_message(.0))]
    UpstreamTls(UpstreamTlsFailure),
}

fn tls_message(failure: &UpstreamTlsFailure) -> &'static str {
    match failure {
        UpstreamTlsFailure::CertificateInvalid => {
            "the upstream backend's TLS certificate could not be verified"
        }
        UpstreamTlsFailure::Handshake => "the TLS handshake with the upstream backend failed",
    }
}

impl ClientError {
    pub fn wrong_type(field: &'static str, expected: &'static str) -> Self {
        ClientError::WrongType { field, expected }
    }

    /// The policy that failed or refused the request (`name@version`), for the logs.
    pub fn policy(&self) -> Option<&Arc<str>> {
        match self {
            ClientError::PolicyFailed { policy } | ClientError::PolicyRejected { policy, .. } => {
                Some(policy)
            }
            _ => None,
        }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> u16 {
        use ClientError::*;
        match self {
            BadJson { .. }
            | WrongType { .. }
            | MissingModel
            | NotAnObject
            | AmbiguousPath
            | BadHead
            | BadBody => 400,
            MethodNotAllowed => 405,
            HeadTooLarge => 431,
            ModelNotFound(_) | NotInFormat { .. } | NotFound(_) | NotProxied(_) => 404,
            BodyTooLarge { .. } => 413,
            BodyTimeout => 408,
            UnsupportedEncoding(_) => 415,
            PolicyFailed { .. } => 500,
            PolicyRejected { status, .. } => *status,
            Forbidden(_) => 403,
            Unauthorized => 401,
            NoBackendAvailable { .. } => 503,
            UpstreamAuthFailed | UpstreamTls(_) => 502,
            UpstreamUnavailable => 503,
            UpstreamTimeout => 504,
            RateLimited(_) => 429,
            LimitsUnavailable => 503,
            ClientGone => 499,
        }
    }

    /// OpenAI `type` and `code` of this error.
    fn kind(&self) -> (&'static str, &'static str) {
        use ClientError::*;
        match self {
            BadJson { .. }
            | WrongType { .. }
            | MissingModel
            | NotAnObject
            | AmbiguousPath
            | BadHead
            | BadBody => ("invalid_request_error", "invalid_request"),
            HeadTooLarge => ("invalid_request_error", "request_header_fields_too_large"),
            MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            ModelNotFound(_) | NotInFormat { .. } => ("invalid_request_error", "model_not_found"),
            NotFound(_) | NotProxied(_) => ("invalid_request_error", "not_found"),
            BodyTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            BodyTimeout => ("invalid_request_error", "request_timeout"),
            UnsupportedEncoding(_) => ("invalid_request_error", "unsupported_encoding"),
            PolicyFailed { .. } => ("server_error", "policy_error"),
            PolicyRejected { status, .. } if *status == 429 => {
                ("rate_limit_error", "policy_rejected")
            }
            PolicyRejected { .. } => ("invalid_request_error", "policy_rejected"),
            Forbidden(_) => ("permission_error", "forbidden"),
            Unauthorized => ("invalid_request_error", "invalid_api_key"),
            NoBackendAvailable { .. } => ("server_error", "no_backend_available"),
            UpstreamUnavailable => ("server_error", "upstream_unavailable"),
            UpstreamTimeout => ("server_error", "upstream_timeout"),
            UpstreamAuthFailed => ("server_error", "upstream_auth_failed"),
            RateLimited(e) if e.kind == crate::limits::Kind::Spend => {
                ("insufficient_quota", "budget_exceeded")
            }
            RateLimited(_) => ("rate_limit_error", "rate_limit_exceeded"),
            LimitsUnavailable => ("server_error", "limits_unavailable"),
            ClientGone => ("invalid_request_error", "client_closed"),
            UpstreamTls(UpstreamTlsFailure::CertificateInvalid) => {
                ("server_error", "upstream_certificate_invalid")
            }
            UpstreamTls(UpstreamTlsFailure::Handshake) => ("server_error", "upstream_tls_failed"),
        }
    }

    /// The envelope's `code`.
    pub fn code(&self) -> &'static str {
        self.kind().1
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ClientError::WrongType { field, .. } => Some(field),
            ClientError::MissingModel
            | ClientError::ModelNotFound(_)
            | ClientError::NotInFormat { .. } => Some("model"),
            _ => None,
        }
    }

    /// What a request Pingora refused before any phase ran gets: `status` is Pingora's
    /// (400 for a head it could not read, 405 for `CONNECT`), `error` its reason.
    pub fn refused_head(status: u16, error: Option<&pingora::Error>) -> ClientError {
        if status == 405 {
            return ClientError::MethodNotAllowed;
        }
        // Pingora's reasons, as it words them: its own limit on the head's size (the
        // context), and httparse's "too many headers" (the cause). Only those two parts
        // are looked at: the rest of its message quotes the client's head.
        let too_large = error.is_some_and(|e| {
            e.context
                .as_ref()
                .is_some_and(|c| c.as_str().starts_with("Request header larger than"))
                || e.cause
                    .as_ref()
                    .is_some_and(|c| c.to_string() == "too many headers")
        });
        if too_large {
            ClientError::HeadTooLarge
        } else {
            ClientError::BadHead
        }
    }

    /// No backend can take a request for `model` now; retry in a second.
    pub fn no_backend(model: &str) -> ClientError {
        ClientError::NoBackendAvailable {
            model: model.to_string(),
            retry_after_secs: 1,
        }
    }

    /// Seconds a client should wait before retrying, when that is known.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ClientError::NoBackendAvailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ClientError::UpstreamUnavailable | ClientError::LimitsUnavailable => Some(1),
            ClientError::RateLimited(e) => e.retry_after_secs,
            // A policy that sheds load says "later", not when: a second, as for a 503 of
            // Switchyard's own.
            ClientError::PolicyRejected {
                status: 429 | 503, ..
            } => Some(1),
            _ => None,
        }
    }

    /// The error body in the request's format: OpenAI's envelope
    /// `{"error":{"message","type","param","code"}}`, or Anthropic's
    /// `{"type":"error","error":{"type","message"}}` (its `type` from the status, as
    /// Anthropic's API uses them).
    pub fn envelope(&self, format: ApiFormat) -> Bytes {
        let body = match format {
            ApiFormat::OpenAi => {
                let (kind, code) = self.kind();
                json!({
                    "error": {
                        "message": self.to_string(),
                        "type": kind,
                        "param": self.param(),
                        "code": code,
                    }
                })
            }
            ApiFormat::Anthropic => json!({
                "type": "error",
                "error": {
                    "type": anthropic_error_type(self.status()),
                    "message": self.to_string(),
                }
            }),
        };
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_head_is_431_only_for_pingoras_own_reasons_never_for_what_the_client_wrote() {
        use pingora::{Error, ErrorType::InvalidHTTPHeader};
        #[derive(Debug)]
        struct TooMany;
        impl std::fmt::Display for TooMany {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("too many headers") // httparse::Error::TooManyHeaders
            }
        }
        impl std::error::Error for TooMany {}

        let too_many = Error::because(InvalidHTTPHeader, "buf: \"POST / HTTP/1.1 ...\"", TooMany);
        let too_large = Error::explain(InvalidHTTPHeader, "Request header larger than 1048575");
        // A malformed head whose bytes say the same words: Pingora quotes it in the context.
        let quoting = Error::explain(
            InvalidHTTPHeader,
            "buf: \"GET / HTTP/1.1\\r\\nx: too many headers Request header larger than\"",
        );
        assert_eq!(
            ClientError::refused_head(400, Some(&too_many)),
            ClientError::HeadTooLarge
        );
        assert_eq!(
            ClientError::refused_head(400, Some(&too_large)),
            ClientError::HeadTooLarge
        );
        assert_eq!(
            ClientError::refused_head(400, Some(&quoting)),
            ClientError::BadHead
        );
        assert_eq!(ClientError::refused_head(400, None), ClientError::BadHead);
        assert_eq!(
            ClientError::refused_head(405, None),
            ClientError::MethodNotAllowed
        );
        assert_eq!(ClientError::HeadTooLarge.status(), 431);
        assert_eq!(ClientError::MethodNotAllowed.code(), "method_not_allowed");
    }

    #[test]
    fn envelope_has_the_openai_shape() {
        let e = ClientError::ModelNotFound("nope".into());
        let v: serde_json::Value = serde_json::from_slice(&e.envelope(ApiFormat::OpenAi)).unwrap();
        assert_eq!(e.status(), 404);
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    }

    #[test]
    fn anthropic_requests_get_anthropics_envelope() {
        let e = ClientError::NotInFormat {
            model: "gpt-4o".into(),
            api: ApiFormat::Anthropic.api_name(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&e.envelope(ApiFormat::Anthropic)).unwrap();
        assert_eq!(e.status(), 404);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`gpt-4o` is not available through the Anthropic Messages API"));
        let v: serde_json::Value =
            serde_json::from_slice(&ClientError::Unauthorized.envelope(ApiFormat::Anthropic))
                .unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
    }

    #[test]
    fn bad_json_names_line_and_column() {
        let e = ClientError::BadJson {
            line: 3,
            column: 7,
            reason: "expected value".into(),
        };
        assert_eq!(
            e.to_string(),
            "invalid JSON at line 3, column 7: expected value"
        );
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn upstream_tls_failures_are_502_with_their_own_codes() {
        for (failure, code) in [
            (
                UpstreamTlsFailure::CertificateInvalid,
                "upstream_certificate_invalid",
            ),
            (UpstreamTlsFailure::Handshake, "upstream_tls_failed"),
        ] {
            let e = ClientError::UpstreamTls(failure);
            let v: serde_json::Value =
                serde_json::from_slice(&e.envelope(ApiFormat::OpenAi)).unwrap();
            assert_eq!(e.status(), 502);
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], "server_error");
        }
    }

    #[test]
    fn policy_failure_is_500_policy_error() {
        let failed = ClientError::PolicyFailed {
            policy: "p@abc".into(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&failed.envelope(ApiFormat::OpenAi)).unwrap();
        assert_eq!(failed.status(), 500);
        assert_eq!(v["error"]["code"], "policy_error");
        assert!(v["error"]["param"].is_null());
    }
}
