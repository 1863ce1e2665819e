//! Wire formats and providers: which API a request speaks, which backends speak it, and
//! what each provider expects upstream.
//!
//! A request is in the OpenAI format, or in Anthropic's Messages format when its path is
//! `/v1/messages` (or below it). A backend's `provider` decides the format it takes —
//! `anthropic` the Messages format, `openai` and `azure` the OpenAI one — and how it is
//! addressed: where its key goes (`Authorization: Bearer`, `x-api-key`, `api-key`), the
//! `anthropic-version` header, and Azure's deployment path with its `api-version` query.

use pingora::http::RequestHeader;

use crate::backends::Backend;
use crate::config::BackendConfig;
use crate::request::RequestMeta;

/// `anthropic-version` sent to an `anthropic` backend when neither the client nor the
/// backend's `api_version` names one.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";
/// `api-version` query sent to an `azure` backend without its own `api_version`.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";
/// The same for the Responses API, which Azure serves from this version on (the general
/// default would get every Responses request refused).
pub const DEFAULT_AZURE_RESPONSES_API_VERSION: &str = "2025-03-01-preview";

/// The API format of a request, from its path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ApiFormat {
    /// Chat completions, completions, embeddings and every other path.
    #[default]
    OpenAi,
    /// Anthropic's Messages API: `/v1/messages` and the paths below it.
    Anthropic,
}

impl ApiFormat {
    pub fn of_path(path: &str) -> ApiFormat {
        match path.strip_prefix("/v1/messages") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => ApiFormat::Anthropic,
            _ => ApiFormat::OpenAi,
        }
    }

    /// `req.format` in a policy.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiFormat::OpenAi => "openai",
            ApiFormat::Anthropic => "anthropic",
        }
    }

    /// The API's name, for messages to clients.
    pub fn api_name(self) -> &'static str {
        match self {
            ApiFormat::OpenAi => "the OpenAI API",
            ApiFormat::Anthropic => "the Anthropic Messages API",
        }
    }

    /// Why a backend of another format was left out (audit and decisions).
    pub fn mismatch_reason(self) -> &'static str {
        match self {
            ApiFormat::OpenAi => {
                "guardrail: an anthropic backend cannot take an OpenAI-format request"
            }
            ApiFormat::Anthropic => {
                "guardrail: only anthropic backends take an Anthropic-format request"
            }
        }
    }
}

/// A backend's `provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
    Azure,
}

impl Provider {
    /// The provider a (validated) backend config names; `openai` for anything else.
    pub fn of(config: &BackendConfig) -> Provider {
        match config.provider.as_str() {
            "anthropic" => Provider::Anthropic,
            "azure" => Provider::Azure,
            _ => Provider::OpenAi,
        }
    }

    /// Whether this provider takes requests in `format` (the wire-format guardrail).
    pub fn speaks(self, format: ApiFormat) -> bool {
        match self {
            Provider::Anthropic => format == ApiFormat::Anthropic,
            Provider::OpenAi | Provider::Azure => format == ApiFormat::OpenAi,
        }
    }
}

/// Whether `backend` may take a request in `format`.
pub fn speaks(backend: &Backend, format: ApiFormat) -> bool {
    Provider::of(&backend.config).speaks(format)
}

/// Whether `backend` may be sent a request for `path`: an Azure deployment is addressed
/// from a `/v1/` path and the request's model; a path of another shape would reach a
/// deployment of the client's choosing.
pub fn takes_path(backend: &Backend, path: &str) -> bool {
    Provider::of(&backend.config) != Provider::Azure || path.starts_with("/v1/")
}

/// Shape the upstream request head for `backend`: its key where its provider expects it,
/// the provider's version header or query, and the path (the backend's URL prefix, and
/// Azure's deployment path). Client credentials must already be removed.
pub fn prepare_upstream(
    upstream: &mut RequestHeader,
    backend: &Backend,
    meta: Option<&RequestMeta>,
) -> pingora::Result<()> {
    let provider = Provider::of(&backend.config);
    if let Some(key) = &backend.api_key {
        match provider {
            Provider::Anthropic => upstream.insert_header("x-api-key", key.expose())?,
            Provider::Azure => upstream.insert_header("api-key", key.expose())?,
            Provider::OpenAi => upstream.insert_header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", key.expose()),
            )?,
        }
    }
    if provider == Provider::Anthropic && upstream.headers.get("anthropic-version").is_none() {
        let version = backend
            .config
            .api_version
            .as_deref()
            .unwrap_or(DEFAULT_ANTHROPIC_VERSION);
        upstream.insert_header("anthropic-version", version)?;
    }
    // Usage is read from the response as it passes; a compressed body could not be read.
    upstream.insert_header(http::header::ACCEPT_ENCODING, "identity")?;

    let path_and_query = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
    let deployment = meta
        .and_then(|m| m.model.as_deref())
        .and_then(|m| backend.models.get(m))
        .map(String::as_str);
    let path = upstream_path(backend, provider, path_and_query, deployment);
    if path != path_and_query {
        let uri: http::Uri = path.parse().map_err(|_| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "bad upstream path")
        })?;
        upstream.set_uri(uri);
    }
    Ok(())
}

/// The path and query `backend` gets for the client's `path_and_query`: behind the URL's
/// prefix; for Azure, `/v1/REST` becomes `/openai/deployments/DEPLOYMENT/REST` (the
/// deployment is the model's upstream name; `/openai/REST` without a model, and for the
/// Responses API), with the backend's `api-version` replacing any the client sent (without
/// one, the default for the API asked for).
fn upstream_path(
    backend: &Backend,
    provider: Provider,
    path_and_query: &str,
    deployment: Option<&str>,
) -> String {
    let prefix = backend.upstream.path_prefix.as_str();
    if provider != Provider::Azure {
        return format!("{prefix}{path_and_query}");
    }
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let rest = path.strip_prefix("/v1/");
    let responses = rest.is_some_and(|r| r == "responses" || r.starts_with("responses/"));
    let path = match (rest, deployment) {
        // The Responses API has no deployment path: Azure serves it at `/openai/responses`,
        // the deployment named by the body's `model` (renamed to it on the way).
        (Some(rest), _) if responses => format!("/openai/{rest}"),
        (Some(rest), Some(d)) => format!("/openai/deployments/{d}/{rest}"),
        (Some(rest), None) => format!("/openai/{rest}"),
        (None, _) => path.to_string(),
    };
    let version = backend
        .config
        .api_version
        .as_deref()
        .unwrap_or(if responses {
            DEFAULT_AZURE_RESPONSES_API_VERSION
        } else {
            DEFAULT_AZURE_API_VERSION
        });
    let mut out = format!("{prefix}{path}?");
    for pair in query.split('&') {
        // Compared decoded: `api%2Dversion` is the same parameter to Azure.
        let name = pair.split('=').next().unwrap_or("");
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        if !pair.is_empty() && !name.eq_ignore_ascii_case("api-version") {
            out.push_str(pair);
            out.push('&');
        }
    }
    out.push_str("api-version=");
    out.push_str(version);
    out
}

/// Anthropic's error `type` for an HTTP status, as its API and SDKs use them.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Letters, digits, `-`, `_` and `.` (1 to 64 bytes): safe as they are in a header, a
/// path segment and a query. Azure deployment names and API versions are of this form.
pub fn is_plain_token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn backend(provider: &str, url: &str, extra: &str) -> std::sync::Arc<Backend> {
        let yaml = format!(
            "routes: [{{ policy: p }}]\nbackends:\n  - name: b\n    url: {url}\n    provider: {provider}\n    models: {{ m: up-m }}\n{extra}"
        );
        let config = Config::parse(&yaml).unwrap();
        let set = crate::backends::BackendSet::build(&config, None).unwrap();
        set.backends[0].clone()
    }

    fn prepared(b: &Backend, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", path.as_bytes(), None).unwrap();
        for (n, v) in headers {
            h.insert_header(n.to_string(), *v).unwrap();
        }
        let mut meta = RequestMeta::from_head(&http::Method::POST, path, &h.headers);
        meta.model = Some("m".into());
        prepare_upstream(&mut h, b, Some(&meta)).unwrap();
        h
    }

    #[test]
    fn formats_come_from_the_path() {
        assert_eq!(ApiFormat::of_path("/v1/messages"), ApiFormat::Anthropic);
        assert_eq!(
            ApiFormat::of_path("/v1/messages/count_tokens"),
            ApiFormat::Anthropic
        );
        assert_eq!(ApiFormat::of_path("/v1/messagesx"), ApiFormat::OpenAi);
        assert_eq!(
            ApiFormat::of_path("/v1/chat/completions"),
            ApiFormat::OpenAi
        );
        assert!(Provider::Anthropic.speaks(ApiFormat::Anthropic));
        assert!(!Provider::Anthropic.speaks(ApiFormat::OpenAi));
        assert!(Provider::Azure.speaks(ApiFormat::OpenAi));
        assert!(!Provider::OpenAi.speaks(ApiFormat::Anthropic));
    }

    #[test]
    fn anthropic_keeps_the_clients_version_or_sends_the_default() {
        let b = backend("anthropic", "http://127.0.0.1:9/base", "");
        let h = prepared(&b, "/v1/messages", &[]);
        assert_eq!(h.headers["anthropic-version"], DEFAULT_ANTHROPIC_VERSION);
        assert_eq!(h.uri.path(), "/base/v1/messages");
        let h = prepared(&b, "/v1/messages", &[("anthropic-version", "2099-01-01")]);
        assert_eq!(h.headers["anthropic-version"], "2099-01-01");
        let b = backend(
            "anthropic",
            "http://127.0.0.1:9",
            "    api_version: 2024-02-02\n",
        );
        assert_eq!(
            prepared(&b, "/v1/messages", &[]).headers["anthropic-version"],
            "2024-02-02"
        );
    }

    #[test]
    fn azure_gets_the_deployment_path_and_api_version() {
        let b = backend("azure", "http://127.0.0.1:9/", "");
        let h = prepared(
            &b,
            "/v1/chat/completions?api-version=evil&x=1&api%2Dversion=evil&API-Version=evil",
            &[],
        );
        assert_eq!(
            h.uri.path_and_query().unwrap().as_str(),
            format!("/openai/deployments/up-m/chat/completions?x=1&api-version={DEFAULT_AZURE_API_VERSION}")
        );
        // Without an `api_version`, the Responses API gets the first version serving it.
        let h = prepared(&b, "/v1/responses?api-version=evil", &[]);
        assert_eq!(
            h.uri.path_and_query().unwrap().as_str(),
            format!("/openai/responses?api-version={DEFAULT_AZURE_RESPONSES_API_VERSION}")
        );
        let b = backend(
            "azure",
            "http://127.0.0.1:9/p",
            "    api_version: 2025-01-01\n",
        );
        let h = prepared(&b, "/v1/embeddings", &[]);
        assert_eq!(
            h.uri.path_and_query().unwrap().as_str(),
            "/p/openai/deployments/up-m/embeddings?api-version=2025-01-01"
        );
        // The Responses API is served outside the deployments, the deployment in the body.
        for (path, upstream) in [
            ("/v1/responses", "/p/openai/responses"),
            (
                "/v1/responses/resp_1/input_items",
                "/p/openai/responses/resp_1/input_items",
            ),
        ] {
            let h = prepared(&b, path, &[]);
            assert_eq!(
                h.uri.path_and_query().unwrap().as_str(),
                format!("{upstream}?api-version=2025-01-01")
            );
        }
        assert!(h.headers.get("anthropic-version").is_none());
    }

    #[test]
    fn openai_paths_are_only_prefixed() {
        let b = backend("openai", "http://127.0.0.1:9/pre", "");
        let h = prepared(&b, "/v1/chat/completions?a=b", &[]);
        assert_eq!(
            h.uri.path_and_query().unwrap().as_str(),
            "/pre/v1/chat/completions?a=b"
        );
        assert_eq!(h.headers["accept-encoding"], "identity");
    }

    #[test]
    fn each_provider_gets_its_key_where_it_expects_it() {
        std::env::set_var("SWITCHYARD_PROVIDER_TEST_KEY", "sk-backend");
        let key = "    api_key_env: SWITCHYARD_PROVIDER_TEST_KEY\n";
        for (provider, header, value) in [
            ("openai", "authorization", "Bearer sk-backend"),
            ("anthropic", "x-api-key", "sk-backend"),
            ("azure", "api-key", "sk-backend"),
        ] {
            let b = backend(provider, "http://127.0.0.1:9", key);
            let h = prepared(&b, "/v1/x", &[]);
            assert_eq!(h.headers[header], value, "{provider}");
            let others = ["authorization", "x-api-key", "api-key"];
            for other in others.iter().filter(|o| **o != header) {
                assert!(h.headers.get(*other).is_none(), "{provider}: {other}");
            }
        }
    }

    #[test]
    fn anthropic_error_types_follow_the_status() {
        assert_eq!(anthropic_error_type(400), "invalid_request_error");
        assert_eq!(anthropic_error_type(404), "not_found_error");
        assert_eq!(anthropic_error_type(503), "overloaded_error");
        assert_eq!(anthropic_error_type(502), "api_error");
    }
}
