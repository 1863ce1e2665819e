//! FAULTS.md, "From the client": the rows about how a request arrives (its head, its body
//! and its framing), over raw sockets, since an HTTP client library would not send them.
//! Each asserts what the client got, that the connection was closed where the row says
//! so, and that nothing reached the backend.

mod common;

use std::io;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(mock_port: u16, admin_port: u16, proxy: &str) -> String {
    format!(
        "proxy: {{ threads: 2, grace_period_seconds: 0{proxy} }}\nadmin: {{ addr: \"127.0.0.1:{admin_port}\" }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}",
        backend("b", mock_port, "[m]")
    )
}

/// A mock, and the proxy in front of it with `proxy` added to its `proxy:` settings;
/// returns them and the proxy's admin port.
async fn setup(proxy_settings: &str) -> (Proc, Proc, u16) {
    let m = mock("b", &[]).await;
    let admin = free_port();
    let p = proxy(&config(m.port, admin, proxy_settings), &[]).await;
    (m, p, admin)
}

fn head(extra_headers: &str, content_length: Option<usize>) -> String {
    let length = content_length.map_or(String::new(), |n| format!("content-length: {n}\r\n"));
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{length}{extra_headers}\r\n"
    )
}

/// Everything the proxy sends until it closes the connection; fails if it is still open
/// after `within`.
async fn until_closed(conn: &mut TcpStream, within: Duration) -> String {
    read_to_close(conn, within).await.0
}

/// Everything the proxy sends until it closes the connection, and the error that ended
/// it, if one did (a reset) rather than the proxy's FIN; fails if it is still open after
/// `within`.
async fn read_to_close(conn: &mut TcpStream, within: Duration) -> (String, Option<io::Error>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = Instant::now() + within;
    loop {
        let ended = match tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection is still open after {within:?}; got so far:\n{}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) => None,
            Ok(Err(e)) => Some(e),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                continue;
            }
        };
        return (String::from_utf8_lossy(&got).into_owned(), ended);
    }
}

/// Send `bytes` on a new connection, all of them before reading; the answer, which must end
/// with the proxy's orderly close (a FIN, not a reset: a proxy that closes with the
/// client's bytes unread resets the connection, and a client's stack may then drop the
/// answer before it is read; Linux's keeps it).
async fn exchange_closed_cleanly(port: u16, bytes: &[u8]) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(bytes)
        .await
        .expect("the proxy reads what it was sent before it closes");
    match read_to_close(&mut conn, Duration::from_secs(10)).await {
        (answer, None) => answer,
        (answer, Some(e)) => panic!("the connection ended with {e}, not a FIN, after:\n{answer}"),
    }
}

/// Send `bytes` on a new connection; the answer, read until the proxy closes.
async fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The proxy may answer and close before it has read everything (that is what some
    // of these tests are about): a failed write still leaves its answer to read.
    let _ = conn.write_all(bytes).await;
    until_closed(&mut conn, Duration::from_secs(10)).await
}

fn code_of(answer: &str) -> String {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    // A chunked answer's body starts with a size line.
    let json = body.find('{').map_or(body, |i| &body[i..]);
    let json = json.rfind('}').map_or(json, |i| &json[..=i]);
    error_code(json)
}

/// Send `bytes` one every 100 ms (each read is quick, the whole is slow) until they are
/// all sent, a write fails (the proxy closed), or `within` has passed.
async fn drip(conn: &mut TcpStream, bytes: impl IntoIterator<Item = u8>, within: Duration) {
    let started = Instant::now();
    for b in bytes {
        if started.elapsed() > within || conn.write_all(&[b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send one chat request on a kept-alive connection and read its answer; its status.
async fn chat_on(conn: &mut TcpStream, request: &str) -> u16 {
    conn.write_all(request.as_bytes()).await.unwrap();
    status_of(&read_answer(conn, String::new()).await)
}

/// Read on from `so_far` until a whole chat completion has arrived; all of it.
async fn read_answer(conn: &mut TcpStream, mut so_far: String) -> String {
    let mut buf = [0u8; 4096];
    while !so_far.contains("chat.completion") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {so_far}");
        so_far.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    so_far
}

/// Connections closed for a slow head, from the admin listener's metrics.
async fn header_timeouts(admin: u16) -> f64 {
    metric(
        &metrics_text(admin).await,
        "switchyard_client_connections_closed_total{reason=\"header_timeout\"}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_sent_very_slowly_are_cut_off_by_the_header_timeout() {
    let (m, p, admin) = setup(", header_timeout_ms: 600").await;
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // A head that never ends.
    drip(
        &mut conn,
        b"x-slow: ".iter().copied().cycle(),
        Duration::from_secs(3),
    )
    .await;
    let closed_after = started.elapsed();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the connection is still open"
    );
    assert!(
        closed_after >= Duration::from_millis(500) && closed_after < Duration::from_millis(2500),
        "closed after {closed_after:?}"
    );
    p.wait_log("did not arrive within 600 ms").await;
    assert_eq!(header_timeouts(admin).await, 1.0);
    assert!(received(&m).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_lines_before_a_slow_request_line_do_not_end_its_head() {
    let (m, p, _) = setup(", header_timeout_ms: 600").await;
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    // The parser skips blank lines before a request line: they are not the head's end.
    conn.write_all(b"\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let request = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n";
    drip(&mut conn, request.iter().copied(), Duration::from_secs(10)).await;
    let answer = until_closed(&mut conn, Duration::from_secs(2)).await;
    assert!(
        answer.is_empty(),
        "served after {:?}: {answer}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(received(&m).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let (m, p, admin) = setup(", header_timeout_ms: 500").await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let answer = until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "{answer}");
    let open = started.elapsed();
    assert!(open >= Duration::from_millis(450), "closed after {open:?}");
    assert_eq!(header_timeouts(admin).await, 1.0);
    // A client that speaks at once is served as before.
    let body = chat_body("m", "hi", false).to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    assert_eq!(
        chat_on(&mut conn, &format!("{}{body}", head("", Some(body.len())))).await,
        200
    );
    assert_eq!(received(&m).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_deadline_starts_with_each_requests_first_byte_on_a_kept_alive_connection() {
    let (m, p, admin) = setup(", header_timeout_ms: 500").await;
    let body = chat_body("m", "hi", false).to_string();
    let request = format!("{}{body}", head("", Some(body.len())));
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    assert_eq!(chat_on(&mut conn, &request).await, 200);
    // Idle longer than the header timeout before the next request: idleness between
    // requests is the keep-alive timeout's business, not this one's.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(chat_on(&mut conn, &request).await, 200);
    // A third request whose head drips is cut off, on the same connection.
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nx-")
        .await
        .unwrap();
    let started = Instant::now();
    drip(
        &mut conn,
        b"slow: ".iter().copied().cycle(),
        Duration::from_secs(3),
    )
    .await;
    let rest = until_closed(&mut conn, Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "{rest}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(received(&m).await.len(), 2);
    assert_eq!(header_timeouts(admin).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_idle_past_the_keepalive_timeout_is_closed() {
    let (_m, p, _admin) = setup(", keepalive_timeout_seconds: 1").await;
    let body = chat_body("m", "hi", false).to_string();
    let request = format!("{}{body}", head("", Some(body.len())));
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    // Within the timeout the connection serves again; after it, it is closed.
    assert_eq!(chat_on(&mut conn, &request).await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(chat_on(&mut conn, &request).await, 200);
    // Idle from its answer on (the proxy's clock starts a little before ours).
    let idle = Instant::now();
    let rest = until_closed(&mut conn, Duration::from_secs(4)).await;
    assert!(rest.is_empty(), "{rest}");
    let idle = idle.elapsed();
    assert!(idle >= Duration::from_millis(800), "{idle:?}");
}

/// Send a chat request that waits for `100 Continue` before its body; the 100 and the
/// final answer.
async fn expecting_continue(port: u16) -> (String, String) {
    let body = chat_body("m", "hi", false).to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let expect = head("expect: 100-continue\r\n", Some(body.len()));
    conn.write_all(expect.as_bytes()).await.unwrap();
    // Nothing of the body is sent until the proxy says to go on.
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
        .await
        .expect("100 Continue, without waiting for the body")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    let (interim, rest) = interim.split_once("\r\n\r\n").unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    (
        interim.to_string(),
        read_answer(&mut conn, rest.to_string()).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_100_continue_gets_it_before_sending_its_body() {
    let (m, p, _admin) = setup("").await;
    let (interim, answer) = expecting_continue(p.port).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    assert_eq!(status_of(&answer), 200, "{answer}");
    // The backend got the body with the head, and no expectation to answer.
    let seen = received(&m).await;
    assert_eq!(seen.len(), 1);
    assert!(seen[0]["headers"].get("expect").is_none(), "{}", seen[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_100_continue_a_failing_backend_is_still_skipped_for_the_next() {
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let live = mock("live", &[]).await;
    let config = format!(
        "proxy: {{ threads: 2 }}\nroutes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: round_robin\nbackends:\n{}{}",
        backend("failing", failing.port, "[m]"),
        backend("live", live.port, "[m]")
    );
    let p = proxy(&config, &[]).await;
    // Round robin leads with each backend in turn: one of the two fails over.
    for _ in 0..2 {
        let (interim, answer) = expecting_continue(p.port).await;
        assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert!(answer.contains("x-switchyard-backend: live"), "{answer}");
    }
    // The failing backend was tried (and answered 503) before the one that served.
    assert!(!received(&failing).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_over_the_limit_is_413_before_the_body_is_sent() {
    let (m, p, admin) = setup(", max_body_bytes: 1000").await;
    // The head alone: the answer must not wait for a body that is never sent.
    let answer = exchange(p.port, head("", Some(5000)).as_bytes()).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(code_of(&answer), "request_too_large");
    assert!(received(&m).await.is_empty());
    assert_counted(&p, admin, &answer, 413, "request_too_large").await;
}

/// `chunks` chunks of 8 KiB of a JSON body's prefix, without the last chunk.
fn open_chunked_body(chunks: usize) -> Vec<u8> {
    let mut out = head("transfer-encoding: chunked\r\n", None).into_bytes();
    let prefix = br#"{"model":"m","messages":[{"role":"user","content":""#;
    out.extend_from_slice(format!("{:x}\r\n", prefix.len()).as_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(b"\r\n");
    for _ in 0..chunks {
        out.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        out.extend_from_slice(&[b'a'; 8192]);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_growing_past_the_limit_is_413_when_it_crosses_it() {
    let (m, p, admin) = setup(", max_body_bytes: 20000").await;
    let answer = exchange(p.port, &open_chunked_body(3)).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(code_of(&answer), "request_too_large");
    assert!(received(&m).await.is_empty());
    assert_counted(&p, admin, &answer, 413, "request_too_large").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_very_slowly_is_408_after_the_body_timeout() {
    let (m, p, admin) = setup(", body_timeout_ms: 500").await;
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    conn.write_all(format!("{}{{\"model\":", head("", Some(100))).as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let answer = until_closed(&mut conn, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert_eq!(code_of(&answer), "request_timeout");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(received(&m).await.is_empty());
    assert_counted(&p, admin, &answer, 408, "request_timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_body_is_415() {
    let (m, p, admin) = setup("").await;
    let body = b"\x1f\x8b\x08\x00\x00\x00\x00\x00";
    let mut request = head("content-encoding: gzip\r\n", Some(body.len())).into_bytes();
    request.extend_from_slice(body);
    let mut conn = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    conn.write_all(&request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_of(&answer), 415, "{answer}");
    assert_eq!(code_of(&answer), "unsupported_encoding");
    assert!(received(&m).await.is_empty());
    assert_counted(&p, admin, &answer, 415, "unsupported_encoding").await;
}

/// A refused request is counted: its answer's request id is on an access line with its
/// status and code, and `switchyard_requests_total` has a request of that status.
async fn assert_counted(p: &Proc, admin: u16, answer: &str, status: u16, code: &str) {
    let id = answer
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("x-request-id: ")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no request id: {answer}"));
    let line = p.access_line(id.trim()).await;
    assert!(line.contains(&format!(" status={status} ")), "{line}");
    assert!(line.ends_with(&format!(" error=\"{code}\"")), "{line}");
    let label = format!("status=\"{status}\"");
    let counted: f64 = metrics_text(admin)
        .await
        .lines()
        .filter(|l| l.starts_with("switchyard_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= 1.0, "no request counted with {label}");
}

/// A refusal of a request whose head Pingora could not take (the connection is closed:
/// `exchange` fails otherwise) is still Switchyard's: the envelope with `code`, a request
/// id, an access line with that id, and the request counted by its status.
async fn assert_refused_head(p: &Proc, admin: u16, answer: &str, status: u16, code: &str) {
    assert_eq!(status_of(answer), status, "{answer}");
    assert_eq!(code_of(answer), code, "{answer}");
    let lower = answer.to_lowercase();
    assert!(lower.contains("connection: close"), "{answer}");
    let id = lower
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id: {answer}"))
        .trim()
        .to_string();
    let line = p.log_line(&format!("{id} - - status={status} ")).await;
    assert!(line.ends_with(&format!(" error=\"{code}\"")), "{line}");
    let series =
        format!("switchyard_requests_total{{backend=\"none\",model=\"none\",status=\"{status}\"}}");
    assert!(
        metric(&metrics_text(admin).await, &series) >= 1.0,
        "{series}"
    );
    // Its audit record: refused before anything was read, so nothing about the request.
    let record = decision(admin, &id).await;
    assert_eq!(record["status"], status, "{record}");
    assert_eq!(record["tenant"], "-", "{record}");
    assert_eq!(record["backend"], serde_json::Value::Null, "{record}");
    assert_eq!(record["attempts"], serde_json::json!([]), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_are_431_and_the_connection_closed() {
    let (m, p, admin) = setup("").await;
    let many: String = (0..300).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = exchange(p.port, head(&many, Some(0)).as_bytes()).await;
    assert_refused_head(&p, admin, &answer, 431, "request_header_fields_too_large").await;
    assert!(received(&m).await.is_empty());

    // A head over Pingora's 1 MiB, just over or far over: refused and the connection
    // closed in order, the 431 read by a client that sent it all before reading (the
    // proxy reads and drops the rest before it closes).
    for size in [1024 * 1024 + 1024, 8 * 1024 * 1024] {
        let large = format!("x-large: {}\r\n", "v".repeat(size));
        let answer = exchange_closed_cleanly(p.port, head(&large, Some(0)).as_bytes()).await;
        assert_eq!(status_of(&answer), 431, "{size}: {answer}");
        assert_eq!(code_of(&answer), "request_header_fields_too_large");
    }
    assert!(received(&m).await.is_empty());
    let (status, _, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_or_connect_is_refused_in_the_envelope_and_the_connection_closed() {
    let m = mock("b", &[]).await;
    let admin = free_port();
    // With Pingora's debug lines asked for, where it logged the refused head's first 2 KiB.
    let env = [("RUST_LOG", "debug,pingora=debug")];
    let p = proxy_with_env(&config(m.port, admin, ""), &[], &env).await;
    // A header line with no colon, which may carry a credential: never quoted back, nor
    // written to the log.
    let bad =
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization Bearer sk-secret\r\n\r\n";
    let answer = exchange(p.port, bad.as_bytes()).await;
    assert_refused_head(&p, admin, &answer, 400, "invalid_request").await;
    assert!(!answer.contains("sk-secret"), "{answer}");
    assert!(!p.output().contains("sk-secret"));

    let connect = "CONNECT 127.0.0.1:443 HTTP/1.1\r\nhost: 127.0.0.1:443\r\n\r\n";
    let answer = exchange(p.port, connect.as_bytes()).await;
    assert_refused_head(&p, admin, &answer, 405, "method_not_allowed").await;
    assert!(received(&m).await.is_empty());
    let (status, _, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_or_normalised_and_the_connection_closed() {
    let (m, p, admin) = setup("").await;
    // Two different lengths: refused.
    let answer = exchange(p.port, head("content-length: 5\r\n", Some(3)).as_bytes()).await;
    assert_refused_head(&p, admin, &answer, 400, "invalid_request").await;
    assert!(received(&m).await.is_empty());

    // Both a length and chunked framing: the chunked framing wins (RFC 9112 6.3), and the
    // connection is closed after the answer, so nothing smuggled can follow.
    let body = chat_body("m", "hi", false).to_string();
    let mut request = head("transfer-encoding: chunked\r\n", Some(3)).into_bytes();
    request.extend_from_slice(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
    let answer = exchange(p.port, &request).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    let seen = received(&m).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["body_sha256"], sha256_hex(body.as_bytes()).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_100_000_deep_is_400_and_the_proxy_serves_on() {
    let (m, p, _) = setup("").await;
    let body = format!(
        "{{\"model\":\"m\",\"messages\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (status, _, text) = {
        let r = post_chat_bytes(&p, body, &[]).await;
        (r.status().as_u16(), (), r.text().await.unwrap())
    };
    assert_eq!(status, 400, "{text}");
    assert_eq!(error_code(&text), "invalid_request");
    assert!(text.contains("nest"), "{text}");
    assert!(received(&m).await.is_empty());
    let (status, _, _) = chat(&p, &chat_body("m", "hi", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_credentials_in_the_json_never_change_the_upstream() {
    let (m, p, _) = setup("").await;
    let mut body = chat_body("m", "hi", false);
    body["api_base"] = "http://127.0.0.1:1/".into();
    body["base_url"] = "http://127.0.0.1:1/".into();
    body["api_key"] = "sk-client-supplied".into();
    let (status, headers, _) = chat(&p, &body).await;
    assert_eq!(status, 200);
    assert_eq!(served_by(&headers), "b");
    let seen = received(&m).await;
    assert_eq!(seen.len(), 1);
    // The configured backend got the body as it was sent: Switchyard reads no address
    // from it.
    assert_eq!(
        seen[0]["body_sha256"],
        sha256_hex(body.to_string().as_bytes()).as_str()
    );
}
