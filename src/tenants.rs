//! Tenants: who sent a request, found from the client's API key, and what they may use.
//!
//! Keys are configured only as SHA-256 hashes. A presented key is hashed and compared
//! against every configured hash in constant time (no early exit), so response timing
//! says nothing about how close a guess was. The tenant's region and allowed models and
//! regions are enforced in Rust, before and after the policy runs.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wildmatch::WildMatch;

use crate::backends::Backend;
use crate::config::{AuthMode, Config, TenantConfig, TenantLimits};

/// A tenant ready for lookups.
#[derive(Debug)]
pub struct Tenant {
    /// Shared: every request of the tenant carries it.
    pub name: Arc<str>,
    pub region: Option<String>,
    /// Globs; empty = every model.
    allowed_models: Vec<WildMatch>,
    /// Region names or prefixes (`eu` covers `eu-west`); empty = every region.
    allowed_regions: Vec<String>,
    /// Requests, tokens, concurrency and spend allowed; `None` when unlimited.
    pub limits: Option<TenantLimits>,
}

impl Tenant {
    fn anonymous() -> Tenant {
        Tenant {
            name: crate::request::anonymous(),
            region: None,
            allowed_models: Vec::new(),
            allowed_regions: Vec::new(),
            limits: None,
        }
    }

    pub fn may_use_model(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|g| g.matches(model))
    }

    /// Whether the tenant may send traffic to this backend's region. A backend without a
    /// region is refused to a tenant restricted to regions.
    pub fn may_use_backend(&self, backend: &Backend) -> bool {
        if self.allowed_regions.is_empty() {
            return true;
        }
        let Some(region) = backend.config.region.as_deref() else {
            return false;
        };
        self.allowed_regions
            .iter()
            .any(|a| region_covers(a, region))
    }
}

/// `eu` covers `eu` and `eu-west`, not `europe`.
pub fn region_covers(allowed: &str, region: &str) -> bool {
    region == allowed
        || (region.starts_with(allowed) && region.as_bytes().get(allowed.len()) == Some(&b'-'))
}

/// Why a request was not authenticated. Both get the same generic 401 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Wrong,
}

/// The tenants of one config.
#[derive(Debug)]
pub struct Tenants {
    mode: AuthMode,
    tenants: Vec<Tenant>,
    /// (key hash, index into `tenants`), scanned whole on every lookup.
    keys: Vec<([u8; 32], usize)>,
    anonymous: Tenant,
}

impl Tenants {
    pub fn new(config: &Config) -> Tenants {
        let mut tenants = Vec::new();
        let mut keys = Vec::new();
        for (i, t) in config.tenants.iter().enumerate() {
            for hash in &t.key_sha256 {
                if let Some(bytes) = decode_hash(hash) {
                    keys.push((bytes, i));
                }
            }
            tenants.push(from_config(t));
        }
        Tenants {
            mode: config.auth.mode,
            tenants,
            keys,
            anonymous: Tenant::anonymous(),
        }
    }

    /// The tenant a request belongs to, from the first key presented of
    /// `Authorization: Bearer KEY` (the scheme in any case), `x-api-key` (Anthropic's SDKs)
    /// and `api-key` (Azure OpenAI's).
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<&Tenant, AuthFailure> {
        if self.mode == AuthMode::Off {
            return Ok(&self.anonymous);
        }
        let header = |name| {
            headers
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
        };
        let bearer = header(http::header::AUTHORIZATION.as_str()).and_then(bearer_token);
        let presented = [bearer, header("x-api-key"), header("api-key")]
            .into_iter()
            .flatten()
            .map(str::trim)
            .find(|k| !k.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found: Option<usize> = None;
        for (hash, index) in &self.keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(*index);
            }
        }
        found.map(|i| &self.tenants[i]).ok_or(AuthFailure::Wrong)
    }
}

fn from_config(t: &TenantConfig) -> Tenant {
    Tenant {
        name: t.name.as_str().into(),
        region: t.region.clone(),
        allowed_models: t.allowed_models.iter().map(|g| WildMatch::new(g)).collect(),
        allowed_regions: t.allowed_regions.clone(),
        limits: t.limits.clone().filter(TenantLimits::any),
    }
}

/// A 64-digit hex SHA-256, as configured.
pub fn decode_hash(hex_digest: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_digest.trim()).ok()?;
    bytes.try_into().ok()
}

/// The token of an `Authorization: Bearer TOKEN` value (the scheme in any case, as RFC 9110
/// has it).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml_tenants: &str) -> Config {
        Config::parse(&format!(
            "routes: [{{ policy: p }}]\nbackends: [{{ name: a, url: \"http://127.0.0.1:1\", models: [m] }}]\n{yaml_tenants}"
        ))
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn finds_the_tenant_by_bearer_x_api_key_or_api_key() {
        let hash = hex::encode(Sha256::digest(b"sk-acme"));
        let t = Tenants::new(&config(&format!(
            "tenants:\n  - name: acme\n    key_sha256: [\"{hash}\"]\n    region: eu\n"
        )));
        for presented in [
            &[("authorization", "Bearer sk-acme")][..],
            &[("authorization", "BEARER sk-acme")],
            &[("x-api-key", "sk-acme")],
            &[("api-key", " sk-acme ")],
            // An empty bearer does not hide the key given in another header.
            &[("authorization", "Bearer "), ("x-api-key", "sk-acme")],
            &[
                ("authorization", "Basic c2s6YWNtZQ=="),
                ("api-key", "sk-acme"),
            ],
        ] {
            let found = t.authenticate(&headers(presented));
            assert_eq!(found.map(|t| &*t.name), Ok("acme"), "{presented:?}");
        }
        assert_eq!(
            t.authenticate(&headers(&[("authorization", "Bearer ")]))
                .unwrap_err(),
            AuthFailure::Missing
        );
        assert_eq!(
            t.authenticate(&headers(&[("authorization", "Bearer sk-nope")]))
                .unwrap_err(),
            AuthFailure::Wrong
        );
        assert_eq!(
            t.authenticate(&headers(&[])).unwrap_err(),
            AuthFailure::Missing
        );
    }

    #[test]
    fn auth_off_is_anonymous() {
        let t = Tenants::new(&config("auth: { mode: \"off\" }\n"));
        assert_eq!(&*t.authenticate(&headers(&[])).unwrap().name, "anonymous");
    }

    #[test]
    fn regions_cover_their_subregions_only() {
        assert!(region_covers("eu", "eu-west"));
        assert!(region_covers("eu", "eu"));
        assert!(!region_covers("eu", "europe"));
        assert!(!region_covers("eu-west", "eu"));
    }
}
