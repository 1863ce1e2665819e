//! A deadline for a client's request head, which Pingora lacks. Its timeout is per read,
//! so a client that sends a byte every few seconds (slowloris), or nothing at all, holds a
//! connection, and a task, for ever.
//!
//! [`HeaderTimeout`] wraps the proxy app, and each connection's stream in [`Deadlined`].
//! A new connection's first request head must arrive whole (up to its blank line) within
//! `proxy.header_timeout_ms` of the connection being accepted (after TLS, which Pingora
//! bounds itself); otherwise the read fails and Pingora closes the connection. On a
//! kept-alive connection the deadline starts again with the next request's first byte,
//! after the previous answer's status line was written (an interim `1xx` does not count;
//! after a `101` the connection is no longer watched). The time a kept-alive connection
//! may sit idle is Pingora's keep-alive timeout, not this one.
//!
//! An HTTP/2 connection (by ALPN) has no HTTP/1 heads: its client must send the HTTP/2
//! connection preface within the deadline. After that, an HTTP/2 connection with no
//! request in progress is closed by Pingora's idle timeout (see `server.rs`), which also
//! covers a stream whose headers never complete: Pingora counts a stream only once its
//! headers have arrived.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use log::warn;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::METRICS;

/// A server app whose connections' request heads must arrive within a deadline.
pub struct HeaderTimeout<A> {
    app: Arc<A>,
    /// The deadline, read for each new connection (it follows config reloads).
    within: Box<dyn Fn() -> Duration + Send + Sync>,
}

impl<A> HeaderTimeout<A> {
    pub fn new(app: A, within: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        HeaderTimeout {
            app: Arc::new(app),
            within: Box::new(within),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderTimeout<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let within = (self.within)();
        let stream = if stream.selected_alpn_proto() == Some(ALPN::H2) {
            Deadlined::h2(stream, within)
        } else {
            Deadlined::new(stream, within)
        };
        self.app.process_new(Box::new(stream), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// A client connection whose request heads are read under a deadline.
pub struct Deadlined {
    inner: Stream,
    within: Duration,
    /// While a request head is being read (or awaited); `None` once it is complete.
    head: Option<Head>,
    /// The connection was switched to another protocol (`101`), or speaks HTTP/2: no
    /// more heads.
    switched: bool,
}

/// The state of a request head being read.
#[derive(Default)]
struct Head {
    /// Set by the head's first byte, a blank line before the request line included: a
    /// client dripping blank lines is a slow head too.
    deadline: Option<Pin<Box<Sleep>>>,
    /// A byte other than CR or LF was read: blank lines before the request line are
    /// skipped by the parser, so they must not end the head here either.
    started: bool,
    /// The last line read has ended (its line feed came, and since then nothing but CR):
    /// a blank line now ends the head, whether lines end in CRLF or, as httparse also
    /// takes, LF.
    after_line_feed: bool,
    /// The deadline passed (logged once).
    expired: bool,
    /// HTTP/2: bytes of the connection preface still to come. The head is the preface.
    preface_left: Option<usize>,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which an HTTP/2 client sends first (RFC 9113, 3.4).
const H2_PREFACE_BYTES: usize = 24;

impl Head {
    /// Scan newly read bytes; true when they complete the head. Line by line (`memchr`
    /// finds the line feeds): a head's lines are scanned, not its bytes one by one.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        if let Some(left) = &mut self.preface_left {
            *left = left.saturating_sub(bytes.len());
            return *left == 0;
        }
        let mut from = 0;
        for lf in memchr::memchr_iter(b'\n', bytes) {
            // A line that is empty or only CR, as far as this read has it.
            let blank = bytes[from..lf].iter().all(|&b| b == b'\r');
            if !blank {
                self.started = true;
            } else if self.after_line_feed && self.started {
                return true;
            }
            self.after_line_feed = true;
            from = lf + 1;
        }
        if bytes[from..].iter().any(|&b| b != b'\r') {
            self.started = true;
            self.after_line_feed = false;
        }
        false
    }
}

impl Deadlined {
    /// An HTTP/1 connection just accepted: the clock for its first head runs from now.
    pub fn new(inner: Stream, within: Duration) -> Self {
        Deadlined {
            inner,
            within,
            head: Some(Head {
                deadline: Some(Box::pin(tokio::time::sleep(within))),
                ..Head::default()
            }),
            switched: false,
        }
    }

    /// An HTTP/2 connection just accepted: its preface must come within `within`.
    pub fn h2(inner: Stream, within: Duration) -> Self {
        Deadlined {
            inner,
            within,
            head: Some(Head {
                deadline: Some(Box::pin(tokio::time::sleep(within))),
                preface_left: Some(H2_PREFACE_BYTES),
                ..Head::default()
            }),
            switched: true,
        }
    }

    /// The error a read gets once the deadline passed, logged and counted the first time.
    fn expired(&mut self) -> io::Error {
        let within = self.within;
        if let Some(head) = &mut self.head {
            if !head.expired {
                head.expired = true;
                let peer = self
                    .inner
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().map(|a| a.to_string()))
                    .unwrap_or_else(|| "-".into());
                let what = if head.preface_left.is_some() {
                    "HTTP/2 connection preface"
                } else {
                    "request headers"
                };
                warn!(target: "switchyard::client", "closing the connection from {peer}: its {what} did not arrive within {} ms", within.as_millis());
                METRICS
                    .connections_closed
                    .with_label_values(&["header_timeout"])
                    .inc();
            }
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "request headers not complete within {} ms",
                within.as_millis()
            ),
        )
    }

    /// A write is about to go out: see [`next_head`].
    fn writing(&mut self, bytes: &[u8]) {
        if self.head.is_none() && !self.switched {
            match next_head(bytes) {
                Some(true) => self.head = Some(Head::default()),
                Some(false) => self.switched = true,
                None => {}
            }
        }
    }
}

/// What a write after a complete head means: the status line of a final answer, that the
/// next read starts a new request head (`Some(true)`); a `101`, that the connection now
/// carries another protocol and no more heads come (`Some(false)`); anything else (body
/// bytes, an interim `1xx`), nothing.
fn next_head(bytes: &[u8]) -> Option<bool> {
    if !bytes.starts_with(b"HTTP/1.") {
        return None;
    }
    match bytes.get(9..12)? {
        b"101" => Some(false),
        [b'1', ..] => None,
        _ => Some(true),
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let within = this.within;
        let Some(head) = this.head.as_mut() else {
            return read;
        };
        // Every arm returns unless the deadline has passed.
        match read {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let late = match &head.deadline {
                    None => {
                        head.deadline = Some(Box::pin(tokio::time::sleep(within)));
                        false
                    }
                    Some(d) => d.deadline() <= Instant::now(),
                };
                if !late {
                    if head.scan(new) {
                        this.head = None;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            Poll::Pending => {
                let due = head.deadline.as_mut();
                if !due.is_some_and(|d| d.as_mut().poll(cx).is_ready()) {
                    return Poll::Pending;
                }
            }
            failed => return failed,
        }
        Poll::Ready(Err(this.expired()))
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing(buf);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.writing(first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// Everything else Pingora asks of a stream is the wrapped stream's.

impl fmt::Debug for Deadlined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadlined")
            .field("inner", &self.inner)
            .field("within", &self.within)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Shutdown for Deadlined {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Deadlined {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Deadlined {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Deadlined {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Deadlined {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Deadlined {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Deadlined {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(chunks: &[&[u8]]) -> Option<usize> {
        let mut head = Head::default();
        chunks.iter().position(|c| head.scan(c))
    }

    #[test]
    fn a_head_ends_at_its_blank_line_however_its_lines_end_and_reads_split_it() {
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"]), Some(0));
        assert_eq!(ends(&[b"GET / HTTP/1.1\nhost: x\n\n"]), Some(0));
        assert_eq!(
            ends(&[b"GET / HTTP/1.1\r\nhost: x\r\n", b"\r", b"\n"]),
            Some(2)
        );
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\n", b"host: x\r\n"]), None);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nhost: x\r\nx-a: \r\r\n"]), None);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nhost: x\r", b"\n\r\n"]), Some(1));
        assert_eq!(
            ends(&[b"GET / HTTP/1.1\r\nhost: x", b"\r\n", b"x-a: b\r\n\r\n"]),
            Some(2)
        );
        // Blank lines before the request line are skipped, as the parser skips them.
        assert_eq!(ends(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(ends(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(0));
    }

    #[test]
    fn a_final_answer_starts_watching_for_the_next_head_an_interim_one_does_not_and_101_ends_it() {
        assert_eq!(next_head(b"HTTP/1.1 200 OK\r\n"), Some(true));
        assert_eq!(next_head(b"HTTP/1.0 404 Not Found\r\n"), Some(true));
        assert_eq!(next_head(b"HTTP/1.1 100 Continue\r\n"), None);
        assert_eq!(next_head(b"HTTP/1.1 103 Early Hints\r\n"), None);
        assert_eq!(
            next_head(b"HTTP/1.1 101 Switching Protocols\r\n"),
            Some(false)
        );
        assert_eq!(next_head(b"data: {}\n\n"), None);
    }
}
