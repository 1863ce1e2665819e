//! Token usage read from responses as they pass through, without holding them back.
//!
//! A plain JSON answer is copied aside and its `usage` block read at the end; of a larger
//! answer than [`MAX_JSON_BYTES`] only the last [`TAIL_BYTES`] are kept, where `usage` is
//! (it follows the data in both APIs' answers, embeddings included). A stream is scanned line by line as chunks go by — a partial line is kept
//! across chunk boundaries — and the `usage` of any `data:` event taken (OpenAI's final
//! usage chunk, Anthropic's `message_start`/`message_delta`). Malformed events are
//! skipped. When a stream reports no usage, its content events are counted instead, as
//! most servers send one token per event.
//!
//! Prompt tokens mean the whole prompt in both formats: OpenAI's `prompt_tokens` counts
//! cached tokens, while Anthropic's `input_tokens` leaves out cache reads and writes, so
//! those are added (`input_tokens + cache_read_input_tokens + cache_creation_input_tokens`).
//! Anthropic reports counts cumulatively, so a later event's value replaces an earlier one.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

/// Of a larger plain answer, only the tail is kept for its usage.
const MAX_JSON_BYTES: usize = 1024 * 1024;
/// What is kept of a larger plain answer: its end, where the `usage` object is.
const TAIL_BYTES: usize = 64 * 1024;
/// A stream line longer than this is not parsed; only its tail is kept, for a usage
/// object at its end.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// What is kept of an over-long stream line.
const LINE_TAIL_BYTES: usize = 16 * 1024;

/// Tokens of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// The whole prompt, cached tokens included.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache.
    pub cached_tokens: u64,
    /// `false` when the backend reported nothing and `completion_tokens` counts events.
    pub reported: bool,
}

/// Reads usage from one response body.
#[derive(Debug)]
pub struct UsageReader {
    mode: Mode,
    tally: Tally,
    /// What the stream's events showed besides usage.
    events: Events,
}

/// What a stream's events showed besides usage.
#[derive(Debug, Default)]
struct Events {
    /// Events with text: the completion's size when no usage is reported.
    content: u64,
    /// An event carrying an `error` object: the backend failed mid-answer, inside a 200.
    error: bool,
    /// A usage came after text had: the final count, not an opening one (Anthropic's
    /// `message_start` reports one output token).
    usage_after_content: bool,
}

/// What a response body is, for reading its usage (and rewriting a stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Stream,
    Json,
    /// Compressed (although identity was asked for), or neither of the others.
    Unreadable,
}

impl BodyKind {
    /// From the response's `Content-Type` and `Content-Encoding`, and whether the client
    /// asked for a stream: such a stream is read as one whatever its label (some servers
    /// say `text/plain`), unless it says JSON (an error or a plain answer).
    pub fn of(content_type: Option<&str>, encoding: Option<&str>, asked_stream: bool) -> Self {
        let is = |prefix: &str| {
            content_type
                .and_then(|ct| ct.get(..prefix.len()))
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        };
        if encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity")) {
            BodyKind::Unreadable
        } else if is("text/event-stream") || (asked_stream && !is("application/json")) {
            BodyKind::Stream
        } else if is("application/json") {
            BodyKind::Json
        } else {
            BodyKind::Unreadable
        }
    }
}

/// The latest value of each usage field seen, in either format.
#[derive(Debug, Default)]
struct Tally {
    reported: bool,
    /// OpenAI `prompt_tokens` (cached tokens included).
    prompt: Option<u64>,
    /// Anthropic `input_tokens` (without cache reads and writes), or the Responses API's.
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    /// OpenAI `prompt_tokens_details.cached_tokens`.
    cached: Option<u64>,
    output: Option<u64>,
    /// `total_tokens`, counted as input when nothing else is reported.
    total: Option<u64>,
}

impl Tally {
    fn merge(&mut self, u: &RawUsage) {
        self.reported = true;
        let fields = [
            (&mut self.prompt, u.prompt_tokens),
            (&mut self.input, u.input_tokens),
            (&mut self.cache_read, u.cache_read_input_tokens),
            (&mut self.cache_write, u.cache_creation_input_tokens),
            (
                &mut self.cached,
                u.prompt_tokens_details
                    .as_ref()
                    .or(u.input_tokens_details.as_ref())
                    .and_then(|d| d.cached_tokens),
            ),
            (&mut self.output, u.completion_tokens.or(u.output_tokens)),
            (&mut self.total, u.total_tokens),
        ];
        for (slot, value) in fields {
            if let Some(v) = value {
                // A count past any real request's (a backend's bug) is taken as the cap,
                // so sums of counts and the tenant's counters cannot overflow.
                *slot = Some(v.min(crate::limits::MAX_TOKENS));
            }
        }
    }

    fn usage(&self) -> Usage {
        let (read, write) = (self.cache_read.unwrap_or(0), self.cache_write.unwrap_or(0));
        let split = self.prompt.is_some() || self.input.is_some() || self.output.is_some();
        Usage {
            prompt_tokens: self.prompt.unwrap_or_else(|| {
                let input = if split { self.input } else { self.total };
                input.unwrap_or(0) + read + write
            }),
            completion_tokens: self.output.unwrap_or(0),
            cached_tokens: self.cached.unwrap_or(read),
            reported: self.reported,
        }
    }
}

#[derive(Debug)]
enum Mode {
    Json(BytesMut),
    Stream { partial: Vec<u8>, skipping: bool },
    Off,
}

impl UsageReader {
    /// A reader for a response body of this kind.
    pub fn new(kind: BodyKind) -> UsageReader {
        let mode = match kind {
            BodyKind::Stream => Mode::Stream {
                partial: Vec::new(),
                skipping: false,
            },
            BodyKind::Json => Mode::Json(BytesMut::new()),
            BodyKind::Unreadable => Mode::Off,
        };
        UsageReader {
            mode,
            tally: Tally::default(),
            events: Events::default(),
        }
    }

    /// See one body chunk.
    pub fn feed(&mut self, chunk: &Bytes) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Json(buf) => {
                buf.extend_from_slice(chunk);
                if buf.len() > MAX_JSON_BYTES {
                    // A `"usage"` key found in the tail is a key wherever the tail starts:
                    // inside a string its quotes would be escaped.
                    let _ = buf.split_to(buf.len() - TAIL_BYTES);
                }
            }
            Mode::Stream { partial, skipping } => {
                let mut rest: &[u8] = chunk;
                // SSE lines end in LF, CRLF or a lone CR; a CRLF is a line and an empty one.
                while let Some(nl) = memchr::memchr2(b'\n', b'\r', rest) {
                    let line = &rest[..nl];
                    if *skipping {
                        // The end of an over-long line, of which `partial` kept the tail:
                        // a usage object there is its usage (the Responses API's
                        // `response.completed` repeats the whole answer before it).
                        partial.extend_from_slice(line);
                        if let Some(u) = answer_usage(partial) {
                            self.tally.merge(&u);
                        }
                        partial.clear();
                        *skipping = false;
                    } else if partial.is_empty() {
                        read_event(line, &mut self.tally, &mut self.events);
                    } else {
                        partial.extend_from_slice(line);
                        read_event(partial, &mut self.tally, &mut self.events);
                        partial.clear();
                    }
                    rest = &rest[nl + 1..];
                }
                partial.extend_from_slice(rest);
                if partial.len() > MAX_LINE_BYTES {
                    *skipping = true;
                }
                if *skipping && partial.len() > 2 * LINE_TAIL_BYTES {
                    partial.drain(..partial.len() - LINE_TAIL_BYTES);
                }
            }
        }
    }

    /// Whether the stream carried an error event (see [`is_error_event`]).
    pub fn saw_error(&self) -> bool {
        self.events.error
    }

    /// The usage, once the body has ended.
    pub fn finish(mut self) -> Option<Usage> {
        match std::mem::replace(&mut self.mode, Mode::Off) {
            Mode::Json(buf) => {
                let mut tally = Tally::default();
                tally.merge(&answer_usage(&buf)?);
                Some(tally.usage())
            }
            Mode::Stream { .. } if self.tally.reported => {
                // A stream that ended before its final count (an Anthropic stream's first
                // event reports one output token; a client that leaves before the last
                // event must not have the rest for free): the text that went out counts.
                let mut usage = self.tally.usage();
                if !self.events.usage_after_content {
                    usage.completion_tokens = usage.completion_tokens.max(self.events.content);
                }
                Some(usage)
            }
            Mode::Stream { .. } if self.events.content > 0 => Some(Usage {
                completion_tokens: self.events.content,
                ..Usage::default()
            }),
            _ => None,
        }
    }
}

/// One SSE line: `data: {json}`. Reads its usage, or counts it as a content event.
///
/// Most events of a stream have neither usage nor anything else to read but whether they
/// carry text, so they are scanned, not parsed: only an event with a `"usage"` that is not
/// `null` is parsed (measured: parsing every event was a quarter of a streamed request's
/// instructions in Switchyard).
fn read_event(line: &[u8], tally: &mut Tally, events: &mut Events) {
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    let data = data.trim_ascii_start();
    if data.is_empty() || data == b"[DONE]" {
        return;
    }
    if !every_usage_is_null(data) {
        if let Ok(event) = serde_json::from_slice::<UsageEvent>(data) {
            let nested = event.message.or(event.response).and_then(|m| m.usage);
            if let Some(u) = event.usage.as_ref().or(nested.as_ref()) {
                tally.merge(u);
                events.usage_after_content |= events.content > 0;
            }
        }
    }
    if is_content_event(data) {
        events.content += 1;
    } else if is_error_event(data) {
        events.error = true;
    }
}

/// An event that carries an `error` object (OpenAI's and vLLM's `{"error": {…}}`,
/// Anthropic's `{"type":"error","error":{…}}`, the Responses API's `response.failed`); an
/// `"error": null` is no error. Only events without text are looked at.
fn is_error_event(data: &[u8]) -> bool {
    values_of(data, &ERROR_KEY).any(|v| v.starts_with(b"{"))
}

/// Searchers built once: building one costs more than searching an event.
pub(crate) static USAGE_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"usage\""));
static CONTENT_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"content\""));
static TEXT_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\""));
static TYPE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
static ERROR_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));

/// The values of the key `finder` finds in a JSON text, whatever the spacing. A quote cannot
/// appear unescaped inside a JSON string, so the key's quoted name followed by a colon is a
/// key, not text.
fn values_of<'a>(data: &'a [u8], finder: &'a Finder<'static>) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = data;
    std::iter::from_fn(move || loop {
        let at = finder.find(rest)?;
        rest = &rest[at + finder.needle().len()..];
        if let Some(value) = rest.trim_ascii_start().strip_prefix(b":") {
            return Some(value.trim_ascii_start());
        }
    })
}

/// Whether every `"usage"` in the event is a key whose value is `null` (or there is none):
/// then the event carries no usage and need not be parsed. Once `include_usage` is asked
/// for, every chunk of an OpenAI stream carries `"usage":null`.
pub(crate) fn every_usage_is_null(data: &[u8]) -> bool {
    values_of(data, &USAGE_KEY).all(|v| v.starts_with(b"null"))
}

/// An event with text in it: a non-empty `content` (chat delta) or `text` (legacy
/// completions) string, an Anthropic `content_block_delta`, or a Responses API
/// `response.output_text.delta` (its other events repeat text already counted, or none).
fn is_content_event(data: &[u8]) -> bool {
    if let Some(kind) = values_of(data, &TYPE_KEY)
        .next()
        .filter(|t| t.starts_with(b"\"response."))
    {
        return kind.starts_with(b"\"response.output_text.delta\"");
    }
    let non_empty_string = |v: &[u8]| v.starts_with(b"\"") && !v[1..].starts_with(b"\"");
    values_of(data, &CONTENT_KEY).any(non_empty_string)
        || values_of(data, &TEXT_KEY).any(non_empty_string)
        || values_of(data, &TYPE_KEY).any(|v| v.starts_with(b"\"content_block_delta\""))
}

/// The `usage` object of a whole JSON answer. Only that object is parsed, not the answer
/// (whose text made a full parse cost ~3 instructions a byte): it is the last `"usage"` key
/// with an object for a value, which in both APIs' answers is the top-level one — nothing
/// nested in an answer has a `usage` object, and text cannot hold an unescaped quote.
fn answer_usage(body: &[u8]) -> Option<RawUsage> {
    let object = values_of(body, &USAGE_KEY)
        .filter(|v| v.starts_with(b"{"))
        .last()?;
    // What follows the object (the rest of the answer) is not read.
    RawUsage::deserialize(&mut serde_json::Deserializer::from_slice(object)).ok()
}

/// OpenAI (`prompt_tokens`, …) and Anthropic (`input_tokens`, …) usage fields.
#[derive(Deserialize)]
struct RawUsage {
    /// Alone, as in a rerank answer (`{"usage":{"total_tokens":812}}`): all of it input.
    total_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

/// A stream event with usage: OpenAI's final chunk, Anthropic's `message_start` (usage in
/// `message`) and `message_delta`, the Responses API's `response.completed` (usage in
/// `response`).
#[derive(Deserialize)]
struct UsageEvent {
    usage: Option<RawUsage>,
    message: Option<Message>,
    response: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    usage: Option<RawUsage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(reader: &mut UsageReader, body: &str, piece: usize) {
        for chunk in body.as_bytes().chunks(piece) {
            reader.feed(&Bytes::copy_from_slice(chunk));
        }
    }

    /// (prompt, completion) tokens of a plain answer fed in pieces of `piece` bytes.
    fn answer_tokens(body: &str, piece: usize) -> Option<(u64, u64)> {
        let mut r = UsageReader::new(BodyKind::Json);
        feed_all(&mut r, body, piece);
        r.finish().map(|u| (u.prompt_tokens, u.completion_tokens))
    }

    #[test]
    fn the_body_kind_follows_the_labels_and_what_the_client_asked_for() {
        use BodyKind::*;
        let of = BodyKind::of;
        assert_eq!(
            of(Some("Text/Event-Stream; charset=utf-8"), None, false),
            Stream
        );
        assert_eq!(of(Some("text/plain"), None, true), Stream);
        assert_eq!(of(None, None, true), Stream);
        assert_eq!(of(Some("application/json"), None, true), Json);
        assert_eq!(of(Some("APPLICATION/JSON"), Some("identity"), false), Json);
        assert_eq!(of(Some("text/plain"), None, false), Unreadable);
        assert_eq!(
            of(Some("text/event-stream"), Some("gzip"), true),
            Unreadable
        );
    }

    #[test]
    fn reads_usage_from_a_plain_answer() {
        let mut r = UsageReader::new(BodyKind::Json);
        feed_all(
            &mut r,
            r#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}}"#,
            7,
        );
        assert_eq!(
            r.finish(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 5,
                cached_tokens: 4,
                reported: true
            })
        );
    }

    #[test]
    fn counts_past_any_request_s_are_capped_so_their_sums_cannot_overflow() {
        let max = u64::MAX;
        let mut r = UsageReader::new(BodyKind::Json);
        feed_all(
            &mut r,
            &format!(
                r#"{{"usage":{{"input_tokens":{max},"cache_read_input_tokens":{max},"cache_creation_input_tokens":{max},"output_tokens":{max}}}}}"#
            ),
            9,
        );
        let cap = crate::limits::MAX_TOKENS;
        let usage = r.finish().unwrap();
        assert_eq!(usage.prompt_tokens, 3 * cap);
        assert_eq!(usage.completion_tokens, cap);
    }

    #[test]
    fn a_plain_answer_s_usage_is_its_usage_object_wherever_it_is() {
        let read = |body: &str| answer_tokens(body, 5);
        // Text that quotes a usage object is text.
        let text = r#"\"usage\": {\"prompt_tokens\": 999}"#;
        assert_eq!(
            read(&format!(
                r#"{{"usage" : {{"prompt_tokens":3,"completion_tokens":4}},"choices":[{{"message":{{"content":"{text}"}}}}]}}"#
            )),
            Some((3, 4))
        );
        assert_eq!(
            read(&format!(
                r#"{{"choices":[{{"message":{{"content":"{text}"}}}}],"usage":{{"input_tokens":5,"output_tokens":6}}}}"#
            )),
            Some((5, 6))
        );
        assert_eq!(read(r#"{"choices":[],"usage":null}"#), None);
        assert_eq!(read(r#"{"choices":[]}"#), None);
        assert_eq!(read(r#"{"usage":{"prompt_tokens":"many"}}"#), None);
    }

    #[test]
    fn reads_the_final_usage_chunk_across_chunk_boundaries_whatever_ends_the_lines() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\n";
        for eol in ["\n", "\r\n", "\r"] {
            let body = body.replace('\n', eol);
            for piece in [1, 3, 16, 1000] {
                let mut r = UsageReader::new(BodyKind::Stream);
                feed_all(&mut r, &body, piece);
                let u = r.finish().unwrap();
                assert_eq!(
                    (u.prompt_tokens, u.completion_tokens, u.reported),
                    (9, 2, true),
                    "piece {piece}, lines ending {eol:?}"
                );
            }
        }
    }

    #[test]
    fn counts_events_when_a_stream_reports_no_usage_and_tolerates_garbage() {
        let body = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {not json\n\n: comment\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, body, 5);
        assert_eq!(
            r.finish(),
            Some(Usage {
                completion_tokens: 2,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn content_events_are_found_by_scanning_as_a_parse_would_find_them() {
        for (event, content) in [
            (r#"{"choices":[{"delta":{"content":"a"}}]}"#, true),
            (r#"{"choices":[{"delta":{"content" :  "a"}}]}"#, true),
            (
                r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
                false,
            ),
            (
                r#"{"choices":[{"delta":{"content":null,"tool_calls":[]}}]}"#,
                false,
            ),
            (r#"{"choices":[{"text":"x"}]}"#, true),
            (
                r#"{"choices":[{"delta":{"content":""}}],"note":"\"content\":\"x\""}"#,
                false,
            ),
            (r#"{"role":"content","choices":[]}"#, false),
            (
                r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"hi"}}"#,
                true,
            ),
            (
                r#"{"type":"content_block_start","content_block":{"type":"text","text":""}}"#,
                false,
            ),
            (r#"{"type":"ping"}"#, false),
        ] {
            assert_eq!(is_content_event(event.as_bytes()), content, "{event}");
        }
        assert!(every_usage_is_null(br#"{"choices":[],"usage" : null}"#));
        assert!(every_usage_is_null(
            br#"{"choices":[{"delta":{"content":"\"usage\": 1"}}]}"#
        ));
        assert!(!every_usage_is_null(
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
        ));
    }

    #[test]
    fn content_with_escapes_counts_like_any_other() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"q\\\" \\u00e9\"}}]}\n\n\
                    data: {\"choices\":[{\"text\":\"line\\nbreak\"}]}\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, body, 4096);
        assert_eq!(r.finish().map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn reads_anthropic_stream_usage() {
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n\
                    event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, body, 11);
        let u = r.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (25, 15));
    }

    #[test]
    fn an_anthropic_stream_cut_before_its_last_event_counts_the_text_that_went_out() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n";
        let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, &format!("{start}{}", delta.repeat(40)), 64);
        let u = r.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (25, 40));
        // With its final count, that count stands, even below the events.
        let end = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, &format!("{start}{}{end}", delta.repeat(40)), 64);
        let u = r.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (25, 30));
    }

    #[test]
    fn a_usage_of_total_tokens_alone_is_all_input() {
        let read = |body: &str| answer_tokens(body, 4);
        assert_eq!(
            read(r#"{"results":[],"usage":{"total_tokens":812}}"#),
            Some((812, 0))
        );
        assert_eq!(
            read(r#"{"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}}"#),
            Some((8, 3))
        );
        assert_eq!(
            read(r#"{"usage":{"input_tokens":8,"output_tokens":3,"total_tokens":11}}"#),
            Some((8, 3))
        );
    }

    #[test]
    fn reads_responses_api_stream_usage_and_counts_only_its_text_deltas() {
        let delta = "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
        let done = "data: {\"type\":\"response.output_text.done\",\"text\":\"Hi Hi Hi\"}\n\n";
        let completed = "data: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi Hi Hi\"}]}],\"usage\":{\"input_tokens\":11,\"output_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":0}}}}\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(
            &mut r,
            &format!("{delta}{delta}{delta}{done}{completed}"),
            13,
        );
        let u = r.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (11, 7));
        // Without usage, the three text deltas are the count (not `done` or `completed`).
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, &format!("{delta}{delta}{delta}{done}"), 13);
        assert_eq!(r.finish().unwrap().completion_tokens, 3);
    }

    #[test]
    fn a_huge_responses_completed_event_still_gives_its_usage() {
        let text = "word ".repeat(40_000);
        let completed = format!(
            "data: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"content\":[{{\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":9,\"output_tokens\":40000}}}}}}\n\n"
        );
        assert!(completed.len() > 2 * MAX_LINE_BYTES);
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, &completed, 4096);
        let u = r.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (9, 40_000));
    }

    #[test]
    fn an_error_event_inside_a_stream_is_seen() {
        let ok = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"error\":null}\n\n";
        let mut r = UsageReader::new(BodyKind::Stream);
        feed_all(&mut r, ok, 5);
        assert!(!r.saw_error(), "null is no error, text is no error");
        for failed in [
            "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n",
        ] {
            let mut r = UsageReader::new(BodyKind::Stream);
            feed_all(&mut r, &format!("{ok}{failed}"), 7);
            assert!(r.saw_error(), "{failed}");
        }
    }

    #[test]
    fn a_plain_answer_over_a_mib_still_gives_its_usage() {
        // Embeddings of 2 MB, with the usage at the end as the API sends it.
        let vector = format!("[{}]", vec!["0.0123456"; 1536].join(","));
        let data: Vec<String> = (0..130)
            .map(|i| format!("{{\"object\":\"embedding\",\"index\":{i},\"embedding\":{vector}}}"))
            .collect();
        let body = format!(
            "{{\"object\":\"list\",\"data\":[{}],\"model\":\"e\",\"usage\":{{\"prompt_tokens\":5000,\"total_tokens\":5000}}}}",
            data.join(",")
        );
        assert!(body.len() > MAX_JSON_BYTES + TAIL_BYTES, "{}", body.len());
        let mut r = UsageReader::new(BodyKind::Json);
        feed_all(&mut r, &body, 16 * 1024);
        assert_eq!(r.finish().unwrap().prompt_tokens, 5000);
    }

    #[test]
    fn anthropic_cache_reads_and_writes_count_as_prompt_tokens() {
        let plain = r#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],
            "usage":{"input_tokens":10,"cache_creation_input_tokens":200,"cache_read_input_tokens":1000,"output_tokens":7}}"#;
        let mut r = UsageReader::new(BodyKind::Json);
        feed_all(&mut r, plain, 9);
        assert_eq!(
            r.finish(),
            Some(Usage {
                prompt_tokens: 1210,
                completion_tokens: 7,
                cached_tokens: 1000,
                reported: true
            })
        );
        // Streamed: input and cache counts in message_start, the final output count (and,
        // in newer API versions, the same cumulative input counts) in message_delta.
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n\
                    event: ping\ndata: {\"type\":\"ping\"}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n\
                    event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":1000,\"output_tokens\":15}}\n\n\
                    event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for piece in [1, 7, 4096] {
            let mut r = UsageReader::new(BodyKind::Stream);
            feed_all(&mut r, body, piece);
            let u = r.finish().unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
                (1010, 15, 1000),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn a_huge_line_is_skipped_not_buffered() {
        let mut r = UsageReader::new(BodyKind::Stream);
        let huge = format!("data: {}\n\n", "x".repeat(MAX_LINE_BYTES * 2));
        feed_all(&mut r, &huge, 4096);
        feed_all(
            &mut r,
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n",
            4096,
        );
        assert_eq!(r.finish().unwrap().completion_tokens, 3);
    }
}
