//! Answers Switchyard writes itself: the request id, and JSON bodies — errors in the OpenAI
//! envelope (Anthropic's for Anthropic-format requests), and `GET /v1/models`.

use bytes::Bytes;
use log::info;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use pingora::Result;

use crate::context::RequestCtx;
use crate::errors::ClientError;
use crate::provider::ApiFormat;

/// Header carrying the request id, to the client and upstream.
pub const REQUEST_ID: &str = "x-request-id";
/// Header naming the backend that produced a response.
pub const SERVED_BY: &str = "x-switchyard-backend";

/// The client's `x-request-id` when it is a sane token, else a fresh UUID.
pub fn request_id(head: &RequestHeader) -> String {
    head.headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Answer the client with an error in the envelope of the request's API format.
pub async fn reject(session: &mut Session, ctx: &mut RequestCtx, error: ClientError) {
    info!(
        target: "switchyard::reject",
        "{} {} -> {} {}",
        ctx.request_id,
        crate::logging::Untrusted(session.req_header().uri.path()),
        error.status(),
        // Its message may quote what the client sent (a model name).
        crate::policy::printable(error.to_string().as_bytes())
    );
    let status = error.status();
    let retry_after = error.retry_after_secs();
    ctx.refused_code = Some(error.code());
    if let ClientError::RateLimited(e) = &error {
        ctx.rate_headers = e.headers.clone();
    }
    let format = ApiFormat::of_path(session.req_header().uri.path());
    respond(session, ctx, status, error.envelope(format), retry_after).await;
}

/// Answer a request Pingora refused before any phase ran (see `refuse_request_head` in
/// `proxy`): the error in OpenAI's envelope and the request id; Pingora closes the
/// connection after it.
pub async fn refuse_head(session: &mut ServerSession, request_id: &str, error: &ClientError) {
    let body = error.envelope(ApiFormat::OpenAi);
    let result = match json_head(error.status(), body.len(), request_id) {
        Ok(h) => session.write_error_response(h, body).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        info!("{request_id} could not answer the client: {e}");
    }
}

/// The head of a JSON answer of Switchyard's own: `len` bytes, and the request id.
fn json_head(status: u16, len: usize, request_id: &str) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(4))?;
    h.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    h.insert_header(http::header::CONTENT_LENGTH, len)?;
    h.insert_header(REQUEST_ID, request_id)?;
    Ok(h)
}

/// Write a complete JSON response from Switchyard itself.
pub async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Bytes,
    retry_after: Option<u64>,
) {
    ctx.status = status;
    if session.is_process_shutting_down() || crate::server::closing() {
        session.set_keepalive(None);
    }
    let build = || -> Result<ResponseHeader> {
        let mut h = json_head(status, body.len(), &ctx.request_id)?;
        if let Some(s) = retry_after {
            h.insert_header(http::header::RETRY_AFTER, s)?;
        }
        for (name, value) in &ctx.rate_headers {
            h.insert_header(*name, value.as_str())?;
        }
        Ok(h)
    };
    let result = match build() {
        Ok(h) => match session.write_response_header(Box::new(h), false).await {
            Ok(()) => session.write_response_body(Some(body), true).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        info!("{} could not answer the client: {e}", ctx.request_id);
    }
}
