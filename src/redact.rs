//! The last line of defence for secrets in the log.
//!
//! Our own code never formats a key (`Secret` prints `***`), but dependencies log what they
//! hold: Pingora's debug log prints whole upstream request headers, the backend's key
//! included. Every log line is therefore scrubbed by the log writer thread (off the
//! request path) before it is written: each secret value Switchyard knows (backend keys,
//! the admin token, the Redis password) and the value of any credential header printed in
//! `"name": "value"` form (which also covers client keys, known to us only by their hash)
//! become `***`.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use memchr::memmem;

/// Shorter values are not secrets worth matching (and would mangle ordinary text).
const MIN_SECRET_LEN: usize = 6;

/// Searchers for the credential headers' values as `Debug` of a header map prints them
/// (`"authorization": "`), built once: building one costs more than a search of a short
/// line, and every log line is searched for each.
static FIELD_FINDERS: LazyLock<Vec<memmem::Finder<'static>>> = LazyLock::new(|| {
    crate::request::CREDENTIAL_HEADERS
        .iter()
        .map(|h| memmem::Finder::new(format!("\"{}\": \"", h.as_str()).as_bytes()).into_owned())
        .collect()
});

/// The registered secrets, each with its searcher.
static SECRETS: LazyLock<ArcSwap<Vec<memmem::Finder<'static>>>> =
    LazyLock::new(|| ArcSwap::from_pointee(Vec::new()));

/// Never let `value` reach the log.
pub fn register(value: &str) {
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    SECRETS.rcu(|current| {
        let mut next = Vec::clone(current);
        if !next.iter().any(|s| s.needle() == value.as_bytes()) {
            next.push(memmem::Finder::new(value.as_bytes()).into_owned());
        }
        Arc::new(next)
    });
}

/// The line with every secret and credential header value replaced by `***` (a copy
/// only when there is something to replace).
pub fn scrub(line: &[u8]) -> Cow<'_, [u8]> {
    let secrets = SECRETS.load();
    let mut line = Cow::Borrowed(line);
    for secret in secrets.iter() {
        if secret.find(&line).is_some() {
            line = Cow::Owned(replace_all(&line, secret));
        }
    }
    for field in FIELD_FINDERS.iter() {
        if field.find(&line).is_some() {
            line = Cow::Owned(mask_values(&line, field));
        }
    }
    line
}

fn replace_all(line: &[u8], secret: &memmem::Finder<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = secret.find(rest) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"***");
        rest = &rest[at + secret.needle().len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// `"field": "value"` → `"field": "***"`, for every occurrence.
fn mask_values(line: &[u8], field: &memmem::Finder<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = field.find(rest) {
        let value_start = at + field.needle().len();
        out.extend_from_slice(&rest[..value_start]);
        let value = &rest[value_start..];
        // The value ends at the first quote not escaped by a backslash.
        let mut end = 0;
        while end < value.len() && value[end] != b'"' {
            end += if value[end] == b'\\' { 2 } else { 1 };
        }
        out.extend_from_slice(b"***");
        rest = &value[end.min(value.len())..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_credential_headers_are_masked() {
        register("sk-registered-secret-1");
        register("abc"); // too short to be matched
        let line = br#"DEBUG send {"host": "h", "authorization": "Bearer sk-x\"y", "x-api-key": "k1"} key sk-registered-secret-1 abc"#;
        let out = String::from_utf8(scrub(line).into_owned()).unwrap();
        assert_eq!(
            out,
            r#"DEBUG send {"host": "h", "authorization": "***", "x-api-key": "***"} key *** abc"#
        );
    }
}
