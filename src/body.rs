//! Reading the client's request body before the upstream is chosen, bounded in size and
//! time, and kept whole so it can be replayed to a second backend.
//!
//! Pingora replays only what its retry buffer holds, and that buffer stops at 64 KiB. So
//! the whole body is kept here and Pingora's buffer is not used at all: the patched
//! `pingora-proxy` (vendor/pingora-proxy/SWITCHYARD-PATCH.md) calls `request_body_filter`
//! at the end of a body read ahead like this one, where the proxy sends its copy, on the
//! first attempt and on every failover. Any body up to the limit works, chunked or not.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::errors::ClientError;

/// Read the whole body; `None` when the request has none.
pub async fn read(
    session: &mut Session,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Option<Bytes>, ClientError> {
    let head = session.req_header();
    // Every value (a second header could name gzip after a first `identity`), each a list.
    for value in head.headers.get_all(http::header::CONTENT_ENCODING) {
        let list = value.to_str().unwrap_or("?");
        for enc in list.split(',').map(str::trim) {
            if !enc.eq_ignore_ascii_case("identity") {
                return Err(ClientError::UnsupportedEncoding(
                    enc.chars().take(32).collect(),
                ));
            }
        }
    }
    let declared = head
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|len| len > max_bytes) {
        session.set_keepalive(None);
        return Err(ClientError::BodyTooLarge {
            limit_bytes: max_bytes,
        });
    }
    // HTTP/1.0 has no 100 Continue (RFC 9110, 10.1.1): its client does not wait for one.
    let expects_continue = head.version != http::Version::HTTP_10
        && head
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // The backend gets the body with the head, so an expectation is met (or moot) here and
    // never passed on: a backend's `100 Continue` would reach the client otherwise.
    if head.headers.contains_key(http::header::EXPECT) {
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
    }
    if session.is_body_empty() {
        return Ok(None);
    }
    if expects_continue {
        // The client waits for this before it sends the body (curl does for bodies over
        // 1 MiB).
        if session.write_continue_response().await.is_err() {
            session.set_keepalive(None);
            return Err(ClientError::BadBody);
        }
    }

    let deadline = tokio::time::Instant::now() + timeout;
    // A body that arrives in one chunk (most do) is kept as that chunk, without a copy.
    let mut first: Option<Bytes> = None;
    let mut body = BytesMut::new();
    loop {
        let read = first.as_ref().map_or(0, Bytes::len) + body.len();
        let chunk = match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Err(_) => {
                session.set_keepalive(None);
                return Err(ClientError::BodyTimeout);
            }
            // The client went away or sent a malformed body: nothing more can be read.
            Ok(Err(_)) => {
                session.set_keepalive(None);
                return Err(ClientError::BadBody);
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if read + chunk.len() > max_bytes {
            session.set_keepalive(None);
            return Err(ClientError::BodyTooLarge {
                limit_bytes: max_bytes,
            });
        }
        if read == 0 {
            first = Some(chunk);
            continue;
        }
        if let Some(first) = first.take() {
            body.reserve(declared.unwrap_or(16 * 1024).min(max_bytes));
            body.extend_from_slice(&first);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(match first {
        Some(only) => only,
        None => body.freeze(),
    }))
}
