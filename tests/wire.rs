//! DESIGN.md, "On the wire": the client can never choose the upstream URL or credentials,
//! and a tenant's rules hold for every request sent with a backend's key. Requests that
//! name no model, climb out of the path with dot segments or ask for a protocol upgrade
//! never reach a backend as they came; framing headers reach it once.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One mock serving `m`, behind a proxy with a `/v1/` route and a catch-all one.
async fn setup() -> (Proc, Proc) {
    let m = mock("b", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\n  - match: {{ path_prefix: / }}\n    policy: round_robin\nbackends:\n{}",
        backend("b", m.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    (m, p)
}

/// Send `request` (with `Connection: close` in it) and read the answer to its end.
async fn exchange(port: u16, request: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got))
        .await
        .expect("the proxy answers and closes within 10 s")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

fn post(path: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_that_name_a_model_go_upstream() {
    let (m, p) = setup().await;
    // A files, batches or stored-completions call names no model: it would reach the
    // backend's account with its key, whatever the tenant's rules.
    for path in ["/v1/files", "/v1/batches", "/v1/chat/completions?limit=100"] {
        let r = client().get(p.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body = r.text().await.unwrap();
        assert_eq!(error_code(&body), "not_found", "{body}");
        assert!(body.contains("GET /v1/"), "{body}");
    }
    // Nor does any other API, whatever its body names: a realtime session would mint a
    // credential of the backend's account.
    for path in [
        "/v1/realtime/sessions",
        "/v1/batches",
        "/v1/chat/completions/x",
    ] {
        let r = client()
            .post(p.url(path))
            .header("content-type", "text/plain")
            .body(BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    // A JSON body without a model is told to name one.
    let r = client()
        .post(p.url("/v1/images/generations"))
        .json(&serde_json::json!({ "prompt": "a cat" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model", "{body}");
    // Valid JSON that is not an object is not a request.
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .json(&serde_json::json!(["m", true]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["message"], "the request body must be a JSON object",
        "{body}"
    );
    assert!(received(&m).await.is_empty(), "nothing reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_api_is_answered_by_switchyard_under_every_spelling() {
    let (m, p) = setup().await;
    let list = get_json(p.url("/v1/models/")).await;
    assert_eq!(list["data"][0]["id"], "m", "{list}");
    let one = get_json(p.url("/v1/models/m")).await;
    assert_eq!(one["id"], "m", "{one}");
    assert_eq!(one["object"], "model", "{one}");
    let r = client().get(p.url("/v1/models/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(&r.text().await.unwrap()), "model_not_found");
    assert!(received(&m).await.is_empty(), "nothing reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_refused_and_upgrades_are_not_passed_on() {
    let (m, p) = setup().await;
    for path in [
        "/v1/../v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/%2e%2e/%2E%2e/admin",
        "/v1/.%2e/chat/completions",
        "/v1/..%2f..%2fadmin",
        "x/../v1/chat/completions",
    ] {
        let answer = exchange(p.port, &post(path, "", BODY)).await;
        assert_eq!(status_of(&answer), 400, "{path}: {answer}");
        assert!(answer.contains("`.` or `..` segments"), "{answer}");
    }
    assert!(received(&m).await.is_empty());

    // A WebSocket upgrade is served as an ordinary request: the backend never sees the
    // upgrade, so no tunnel can open with its key.
    let answer = exchange(
        p.port,
        &post(
            "/v1/chat/completions",
            "upgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n",
            BODY,
        )
        .replace("connection: close", "connection: Upgrade, close"),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let got = received(&m).await;
    assert_eq!(got.len(), 1);
    let headers = &got[0]["headers"];
    assert!(headers.get("upgrade").is_none(), "{headers}");

    // Nor does the client choose which account of the backend's key is billed.
    let r = client()
        .post(p.url("/v1/chat/completions"))
        .header("openai-organization", "org-victim")
        .header("openai-project", "proj-victim")
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = received(&m).await;
    let headers = &got[1]["headers"];
    assert!(headers.get("openai-organization").is_none(), "{headers}");
    assert!(headers.get("openai-project").is_none(), "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_headers_reach_the_backend_once_and_expectations_stay_here() {
    let (m, p) = setup().await;
    // Two equal Content-Lengths (Pingora accepts them) and an HTTP/1.0 client's Expect.
    let request = post("/v1/chat/completions", "", BODY)
        .replace("HTTP/1.1", "HTTP/1.0")
        .replace(
            "connection: close\r\n",
            &format!("content-length: {}\r\nexpect: 100-continue\r\n", BODY.len()),
        );
    let answer = exchange(p.port, &request).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    let got = received(&m).await;
    assert_eq!(got.len(), 1);
    let headers = &got[0]["headers"];
    assert_eq!(
        headers["content-length"],
        BODY.len().to_string(),
        "{headers}"
    );
    assert!(headers.get("expect").is_none(), "{headers}");

    // Every Content-Encoding counts, not only the first.
    let answer = exchange(
        p.port,
        &post(
            "/v1/chat/completions",
            "content-encoding: identity\r\ncontent-encoding: gzip\r\n",
            BODY,
        ),
    )
    .await;
    assert_eq!(status_of(&answer), 415, "{answer}");
    assert_eq!(
        received(&m).await.len(),
        1,
        "the refused one did not reach it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_backend_is_addressed_only_from_v1_paths() {
    let m = mock("az", &[]).await;
    let config = format!(
        "routes:\n  - match: {{ path_prefix: / }}\n    policy: round_robin\nbackends:\n  - name: az\n    url: http://127.0.0.1:{}\n    provider: azure\n    models: {{ m: dep-m }}\n",
        m.port
    );
    let p = proxy(&config, &[]).await;
    let r = client()
        .post(p.url("/openai/deployments/secret/chat/completions"))
        .json(&serde_json::json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        received(&m).await.is_empty(),
        "the client chose no deployment"
    );
    let (status, _, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!(status, 200);
    let got = received(&m).await;
    assert_eq!(got[0]["path"], "/openai/deployments/dep-m/chat/completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_cannot_forge_or_flood_the_access_log() {
    let (_m, p) = setup().await;
    let forged = "nosuch\n[2026-11-22T22:00:00Z INFO  switchyard::access] FORGED status=200";
    let (status, headers, _) = chat(&p, &chat_body(forged, "hi", false)).await;
    assert_eq!(status, 404);
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    let line = p.access_line(&request_id).await;
    assert!(line.contains("model=nosuch\\n[2026"), "{line}");
    let long = "x".repeat(100_000);
    let (status, headers, _) = chat(&p, &chat_body(&long, "hi", false)).await;
    assert_eq!(status, 404);
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    let line = p.access_line(&request_id).await;
    assert!(line.len() < 1_000, "{} bytes", line.len());
    assert!(
        !p.output()
            .lines()
            .any(|l| l.starts_with("[2026-11-22T22:00:00Z")),
        "a line began inside the model name"
    );
}

/// A body read before the backend was chosen reaches it in the request head's TCP segment:
/// the backend counts the segments it received (`TCP_INFO`), which on a fresh connection
/// are the handshake's two and then the request's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_head_and_a_body_read_ahead_reach_the_backend_in_one_segment() {
    use std::os::fd::AsRawFd;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = format!(
        "routes:\n  - policy: round_robin\nbackends:\n{}    health_path: \"\"\n",
        backend("raw", port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    let backend = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // The head, then as many bytes as its Content-Length says.
        let whole = |got: &[u8]| {
            let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))?
                .trim()
                .parse()
                .ok()?;
            (got.len() >= end + length).then_some(())
        };
        while whole(&got).is_none() {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed before the whole request came");
            got.extend_from_slice(&buf[..n]);
        }
        // SAFETY: `info` is a plain C struct of the size passed; the socket is open.
        let segments = unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let rc = libc::getsockopt(
                conn.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            );
            assert_eq!(rc, 0, "TCP_INFO");
            info.tcpi_segs_in
        };
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        conn.write_all(answer.as_bytes()).await.unwrap();
        (String::from_utf8_lossy(&got).into_owned(), segments)
    });
    let answer = exchange(p.port, &post("/v1/chat/completions", "", BODY)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let (request, segments) = backend.await.unwrap();
    assert!(request.ends_with(BODY), "{request}");
    assert_eq!(
        segments, 3,
        "SYN, the handshake's ACK, and one for head and body"
    );
}

/// The patched Pingora sends a request's head and a body it already has in one write (see
/// vendor/pingora-core/SWITCHYARD-PATCH.md): one system call, one packet and, to a TLS
/// backend, one record fewer per request. Shown on Pingora's own HTTP/1 client session
/// over a socket that records each write.
mod one_write {
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use pingora::http::RequestHeader;
    use pingora::protocols::http::v1::client::HttpSession;
    use pingora::protocols::l4::stream::Stream;
    use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A socket that keeps every write it is given, apart, and has nothing to read.
    #[derive(Debug, Default, Clone)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Writes {
        fn taken(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl AsyncRead for Writes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context,
            _: &mut ReadBuf,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            // At most 16 KiB a write, as a socket whose buffer is full takes less.
            let n = buf.len().min(16 * 1024);
            self.0.lock().unwrap().push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl VirtualSocket for Writes {
        fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
            Ok(())
        }
    }

    fn session() -> (HttpSession, Writes) {
        let writes = Writes::default();
        let stream = Stream::from(VirtualSocketStream::new(Box::new(writes.clone())));
        (HttpSession::new(Box::new(stream)), writes)
    }

    fn request(framing: (&'static str, &'static str)) -> Box<RequestHeader> {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        req.insert_header("host", "backend").unwrap();
        req.insert_header(framing.0, framing.1).unwrap();
        Box::new(req)
    }

    const HEAD_END: &[u8] = b"\r\n\r\n";

    fn head_len(bytes: &[u8]) -> usize {
        bytes.windows(4).position(|w| w == HEAD_END).unwrap() + 4
    }

    #[tokio::test]
    async fn a_held_head_goes_out_with_a_body_of_known_length() {
        let body = vec![b'x'; 1000];
        let (mut s, writes) = session();
        s.hold_request_header();
        s.write_request_header(request(("content-length", "1000")))
            .await
            .unwrap();
        assert!(writes.taken().is_empty(), "the head waits for the body");
        assert_eq!(s.write_body(&body).await.unwrap(), Some(1000));
        s.finish_body().await.unwrap();
        let got = writes.taken();
        assert_eq!(got.len(), 1, "head and body in one write");
        assert!(got[0].ends_with(&body) && head_len(&got[0]) == got[0].len() - 1000);

        // Not held (as for a body still streaming in): the head first, at once.
        let (mut s, writes) = session();
        s.write_request_header(request(("content-length", "1000")))
            .await
            .unwrap();
        assert_eq!(writes.taken().len(), 1, "the head alone");
        s.write_body(&body).await.unwrap();
        assert_eq!(writes.taken(), vec![body]);
    }

    #[tokio::test]
    async fn a_held_head_is_never_lost() {
        // A body of known length that does not come: the head goes out at the body's end,
        // which is an error (as it was with the head sent at once).
        let (mut s, writes) = session();
        s.hold_request_header();
        s.write_request_header(request(("content-length", "10")))
            .await
            .unwrap();
        assert!(s.finish_body().await.is_err(), "10 bytes were promised");
        let got = writes.taken().concat();
        assert_eq!(head_len(&got), got.len(), "the head, whole");

        // A chunked body is not held for: the head is written at once.
        let (mut s, writes) = session();
        s.hold_request_header();
        s.write_request_header(request(("transfer-encoding", "chunked")))
            .await
            .unwrap();
        assert_eq!(writes.taken().len(), 1);
        s.write_body(b"abc").await.unwrap();
        s.finish_body().await.unwrap();
        assert_eq!(writes.taken().concat(), b"3\r\nabc\r\n0\r\n\r\n");

        // A body larger than what is copied (64 KiB) follows the head, whole and in order,
        // however few bytes each write takes.
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut s, writes) = session();
        s.hold_request_header();
        s.write_request_header(request(("content-length", "200000")))
            .await
            .unwrap();
        assert_eq!(s.write_body(&body).await.unwrap(), Some(200_000));
        let got = writes.taken().concat();
        assert_eq!(&got[head_len(&got)..], &body[..]);
    }
}
