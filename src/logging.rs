//! Logging set-up: `env_logger` formatting, written by a thread of its own.
//!
//! A line per request written straight to stderr costs a system call on the request path
//! (measured at 15–40 µs per request under load), so lines go to a bounded queue drained by
//! a writer thread. Waking that thread for every line still cost two context switches and a
//! `write` per request (measured under load: 2.5 context switches and 2.9 futex calls per
//! request, against 0.5 and 0.3 with the access log off). So the queue tells two kinds of
//! line apart:
//! - ordinary log lines (warnings, errors, `sy.log` from policies, ...) wake the writer at
//!   once, and appear within microseconds as before;
//! - access lines ([`access`], one per request) wake it only when it is idle; while it is
//!   busy or pausing they wait for its next round, at most [`ACCESS_PAUSE`] later. Under
//!   load the writer then runs ~50 times a second, each time writing a batch.
//!
//! If the writer falls far behind, lines are dropped and counted rather than slowing
//! requests down. The writer masks secrets in every line ([`crate::redact`]): dependencies
//! log what they hold, at debug level whole headers. [`flush`] writes out what is queued
//! (the server calls it before the process exits).

use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Bytes of lines waiting for the writer before new ones are dropped.
const QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// A batch buffer that grew past this (a burst) is given back after its write.
const KEEP_BATCH_BYTES: usize = 1024 * 1024;
/// How long the writer pauses after writing a batch before it takes the access lines that
/// came meanwhile (an ordinary line ends the pause at once).
pub const ACCESS_PAUSE: Duration = Duration::from_millis(20);
/// The log target of the per-request access line.
pub const ACCESS_TARGET: &str = "switchyard::access";

/// Set once the writer thread runs: lines are queued only when something writes them out.
static QUEUE: OnceLock<&'static Queue> = OnceLock::new();

/// Install the logger: `RUST_LOG` sets the filter (default `info`), as env_logger reads
/// it, except that Pingora's crates log at most at `info` unless it names them (see
/// [`PingoraCap`]).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_FILTER));
    // Lives as long as the process, like the writer thread that drains it.
    let queue: &'static Queue = Box::leak(Box::new(Queue::new()));
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(queue));
    // Without a writer thread, env_logger writes to stderr itself.
    if spawned.is_ok() && QUEUE.set(queue).is_ok() {
        builder.target(env_logger::Target::Pipe(Box::new(LineWriter {
            line: Vec::with_capacity(LINE_BYTES),
            queue,
        })));
    }
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    let logger = PingoraCap::new(builder.build(), &spec);
    let max = logger.inner.filter();
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

/// The filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info";

/// The prefix of Pingora's crates' log targets (`pingora_core`, `pingora_proxy`, ...).
const PINGORA: &str = "pingora";

/// env_logger's logger, with Pingora's debug and trace lines dropped unless `RUST_LOG`
/// names their crate (`pingora`, or `pingora_proxy`, ...). Those lines quote request and
/// response heads and bodies (prompts and completions): a `RUST_LOG=debug` meant for
/// Switchyard must not write them to its log; `RUST_LOG=debug,pingora=debug` asks for them
/// knowingly. Everything else is env_logger's filter, unchanged.
struct PingoraCap {
    inner: env_logger::Logger,
    /// The directives' names that start with `pingora`.
    named: Vec<String>,
}

impl PingoraCap {
    fn new(inner: env_logger::Logger, spec: &str) -> PingoraCap {
        PingoraCap {
            inner,
            named: pingora_names(spec),
        }
    }

    fn allows(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
            || !m.target().starts_with(PINGORA)
            || self
                .named
                .iter()
                .any(|n| m.target().starts_with(n.as_str()))
    }
}

impl log::Log for PingoraCap {
    fn enabled(&self, m: &log::Metadata) -> bool {
        self.allows(m) && self.inner.enabled(m)
    }

    fn log(&self, record: &log::Record) {
        if self.allows(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The module names in a `RUST_LOG` filter that start with `pingora`: directives are
/// comma-separated `name=level`, `level` or `name`, and a `/regex` may follow them.
fn pingora_names(spec: &str) -> Vec<String> {
    let directives = spec.split('/').next().unwrap_or_default();
    directives
        .split(',')
        .map(|d| d.split('=').next().unwrap_or_default().trim())
        .filter(|name| name.starts_with(PINGORA))
        .map(str::to_string)
        .collect()
}

/// Longest client-supplied text (a model name) written into a log line, in characters.
const MAX_UNTRUSTED_CHARS: usize = 200;

/// Text a client chose (a model name, a path), written into a log line: cut to
/// [`MAX_UNTRUSTED_CHARS`] characters, with control characters escaped, so that it can
/// neither start a forged line nor make one megabytes long.
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0, MAX_UNTRUSTED_CHARS)
    }
}

/// `s` with control characters escaped, cut after `max_chars` characters (then followed
/// by its length in bytes).
pub fn write_escaped(f: &mut impl fmt::Write, s: &str, max_chars: usize) -> fmt::Result {
    // Most are short and plain: written as they are. 0xC2 leads the C1 controls.
    if s.len() <= max_chars && !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
        return f.write_str(s);
    }
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            return write!(f, "… ({} bytes)", s.len());
        }
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            f.write_char(c)?;
        }
    }
    Ok(())
}

/// Log one access line (target [`ACCESS_TARGET`], level info) in env_logger's format,
/// without waking a busy writer. Without [`init`] it goes through `log` like any line.
pub fn access(message: fmt::Arguments<'_>) {
    if !log::log_enabled!(target: ACCESS_TARGET, log::Level::Info) {
        return;
    }
    let Some(queue) = QUEUE.get() else {
        log::info!(target: ACCESS_TARGET, "{message}");
        return;
    };
    thread_local! {
        /// Formatted here, then copied into the queue: no allocation per line.
        static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(LINE_BYTES));
    }
    LINE.with(|cell| {
        let mut line = cell.borrow_mut();
        line.clear();
        line.push(b'[');
        with_timestamp(|ts| line.extend_from_slice(ts));
        line.extend_from_slice(b" INFO  ");
        line.extend_from_slice(ACCESS_TARGET.as_bytes());
        line.extend_from_slice(b"] ");
        let _ = line.write_fmt(message);
        line.push(b'\n');
        queue.push(&line, false);
    });
}

/// Write out every line queued so far; waits at most a second for the writer.
pub fn flush() {
    let Some(queue) = QUEUE.get() else { return };
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        {
            let mut s = queue.lock();
            if s.lines.is_empty() && s.writer != Writer::Busy {
                return;
            }
            if s.writer != Writer::Busy {
                s.writer = Writer::Busy;
                queue.wake.notify_one();
            }
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Bytes reserved for a line being formatted: most lines, access lines included, fit.
const LINE_BYTES: usize = 512;

struct Queue {
    state: Mutex<State>,
    /// The writer waits on it while idle or pausing.
    wake: Condvar,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            state: Mutex::new(State {
                lines: Vec::new(),
                urgent: false,
                dropped: 0,
                writer: Writer::Busy,
            }),
            wake: Condvar::new(),
        }
    }
}

struct State {
    /// Whole lines, each ending with a newline. One buffer rather than one allocation per
    /// line: a line allocated by a worker thread and freed by the writer thread costs a
    /// contended lock in the allocator.
    lines: Vec<u8>,
    /// An ordinary line is among `lines`: the writer must not rest before writing it.
    urgent: bool,
    /// Lines dropped since the writer last reported it.
    dropped: u64,
    writer: Writer,
}

/// What the writer thread is doing, which decides whether a new line wakes it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Writing, or woken and about to: nothing to do.
    Busy,
    /// Resting after a batch: only an ordinary line wakes it.
    Pausing,
    /// Nothing queued: any line wakes it.
    Idle,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a line (ending with a newline); `urgent` lines end the writer's pause.
    fn push(&self, line: &[u8], urgent: bool) {
        let mut s = self.lock();
        if s.lines.len() + line.len() > QUEUE_BYTES {
            s.dropped += 1;
            return;
        }
        s.lines.extend_from_slice(line);
        s.urgent |= urgent;
        let wake = match s.writer {
            Writer::Idle => true,
            Writer::Pausing => urgent,
            Writer::Busy => false,
        };
        if wake {
            // Later lines see it busy: one wake-up (one system call) is enough.
            s.writer = Writer::Busy;
        }
        drop(s);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// env_logger's output: collects one formatted record and queues it on flush.
struct LineWriter {
    line: Vec<u8>,
    queue: &'static Queue,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        if self.line.last() != Some(&b'\n') {
            self.line.push(b'\n');
        }
        self.queue.push(&self.line, true);
        self.line.clear();
        if self.line.capacity() > KEEP_BATCH_BYTES {
            self.line = Vec::with_capacity(LINE_BYTES);
        }
        Ok(())
    }
}

fn write_lines(queue: &Queue) {
    // Not `stderr().lock()`: holding the lock while idle would block every `eprintln!`.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    let mut batch: Vec<u8> = Vec::new();
    let mut s = queue.lock();
    loop {
        while s.lines.is_empty() {
            s.writer = Writer::Idle;
            s = queue.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.writer = Writer::Busy;
        std::mem::swap(&mut s.lines, &mut batch);
        s.urgent = false;
        let dropped = std::mem::take(&mut s.dropped);
        drop(s);

        // Scrubbed line by line, so that a mask never runs past the end of its line.
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &batch) {
            let _ = out.write_all(&crate::redact::scrub(&batch[start..=end]));
            start = end + 1;
        }
        batch.clear();
        if batch.capacity() > KEEP_BATCH_BYTES {
            batch = Vec::new();
        }
        if dropped > 0 {
            let _ = writeln!(
                out,
                "[switchyard] {dropped} log line(s) dropped: the log writer fell behind"
            );
        }
        let _ = out.flush();

        // Rest a moment, so that the access lines of a busy proxy are taken in batches
        // rather than each with a wake-up of its own; an ordinary line ends the rest.
        s = queue.lock();
        if s.urgent {
            continue;
        }
        s.writer = Writer::Pausing;
        let until = Instant::now() + ACCESS_PAUSE;
        while s.writer == Writer::Pausing {
            let now = Instant::now();
            if now >= until {
                break;
            }
            s = queue
                .wake
                .wait_timeout(s, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Calls `f` with the current time as env_logger prints it (`2026-01-31T12:00:00Z`),
/// formatted once per second per thread.
fn with_timestamp(f: impl FnOnce(&[u8])) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let secs = crate::runtime::unix_now();
    CACHED.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let time =
                chrono::DateTime::<chrono::Utc>::from_timestamp(secs as i64, 0).unwrap_or_default();
            *cached = (
                secs,
                time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
        }
        f(cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_logs_at_most_info_unless_named() {
        use log::Level::*;
        // (RUST_LOG, target, level, written)
        let cases = [
            ("debug", "pingora_core::protocols", Debug, false),
            ("debug", "pingora_proxy", Info, true),
            ("debug", "switchyard::reload", Debug, true),
            (
                "trace,switchyard=trace",
                "pingora_proxy::proxy_h1",
                Trace,
                false,
            ),
            ("warn", "pingora_proxy", Info, false),
            ("warn", "pingora_proxy", Warn, true),
            (
                "debug,pingora=debug",
                "pingora_core::connectors",
                Debug,
                true,
            ),
            ("debug,pingora=debug", "pingora_proxy", Trace, false),
            (
                "debug, pingora_proxy=trace",
                "pingora_proxy::proxy_h1",
                Trace,
                true,
            ),
            // Naming one crate leaves the others capped, even when it asks for less.
            ("debug,pingora_core=warn", "pingora_proxy", Debug, false),
            ("debug,pingora_core=warn", "pingora_core", Info, false),
            ("debug/access", "pingora_proxy", Debug, false),
            // What env_logger makes of an empty or unparsable filter is kept: errors only.
            ("", "switchyard", Error, true),
            ("", "switchyard", Warn, false),
            ("foo=bar", "switchyard", Error, true),
        ];
        for (spec, target, level, written) in cases {
            let inner = env_logger::Builder::new().parse_filters(spec).build();
            let logger = PingoraCap::new(inner, spec);
            let m = log::Metadata::builder().target(target).level(level).build();
            assert_eq!(
                log::Log::enabled(&logger, &m),
                written,
                "RUST_LOG={spec:?}: {target} at {level}"
            );
        }
    }

    #[test]
    fn untrusted_text_is_one_short_line() {
        assert_eq!(Untrusted("gpt-4o").to_string(), "gpt-4o");
        assert_eq!(
            Untrusted("m\n[2026-11-22T22:00:00Z INFO  switchyard::access] forged").to_string(),
            "m\\n[2026-11-22T22:00:00Z INFO  switchyard::access] forged"
        );
        assert_eq!(Untrusted("a\u{85}b\u{1b}").to_string(), "a\\u{85}b\\u{1b}");
        let long = "é".repeat(100_000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(200)), "{shown:.40}");
        assert!(shown.ends_with("… (200000 bytes)"), "{shown:.40}");
        assert_eq!(
            shown.chars().count(),
            200 + "… (200000 bytes)".chars().count()
        );
    }

    #[test]
    fn timestamps_look_like_env_loggers() {
        let mut ts = String::new();
        with_timestamp(|t| ts = String::from_utf8(t.to_vec()).unwrap());
        // 2026-01-31T12:00:00Z
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }

    #[test]
    fn access_lines_wait_for_a_busy_writer_and_ordinary_lines_do_not() {
        let q = Queue {
            state: Mutex::new(State {
                lines: Vec::new(),
                urgent: false,
                dropped: 0,
                writer: Writer::Pausing,
            }),
            wake: Condvar::new(),
        };
        q.push(b"access\n", false);
        assert!(
            q.lock().writer == Writer::Pausing,
            "an access line lets it rest"
        );
        q.push(b"warning\n", true);
        assert!(q.lock().writer == Writer::Busy, "an ordinary line wakes it");
        q.lock().writer = Writer::Idle;
        q.push(b"access\n", false);
        assert!(
            q.lock().writer == Writer::Busy,
            "an idle writer is woken by any line"
        );
        assert_eq!(q.lock().lines, b"access\nwarning\naccess\n");
    }
}
