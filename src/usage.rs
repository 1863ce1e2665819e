//! Token usage read from responses as they pass through, without holding them back.
//!
//! A plain JSON answer is copied aside (up to [`MAX_JSON_BYTES`]) and its `usage` block read
//! at the end. A stream is scanned line by line as chunks go by — a partial line is kept
//! across chunk boundaries — and the `usage` of any `data:` event taken (OpenAI's final
//! usage chunk, Anthropic's `message_start`/`message_delta`). Malformed events are
//! skipped. When a stream reports no usage, its content events are counted instead, as
//! most servers send one token per event.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Larger plain answers are relayed but not parsed for usage.
const MAX_JSON_BYTES: usize = 1024 * 1024;
/// A stream line longer than this is not a usage event; it is skipped, not buffered.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Tokens of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// `false` when the backend reported nothing and `completion_tokens` counts events.
    pub reported: bool,
}

/// Reads usage from one response body.
#[derive(Debug)]
pub struct UsageReader {
    mode: Mode,
    usage: Usage,
    content_events: u64,
}

#[derive(Debug)]
enum Mode {
    Json(BytesMut),
    Stream { partial: Vec<u8>, skipping: bool },
    Off,
}

impl UsageReader {
    /// A reader for a response with this content type.
    pub fn new(content_type: Option<&str>) -> UsageReader {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let mode = if ct.starts_with("text/event-stream") {
            Mode::Stream {
                partial: Vec::new(),
                skipping: false,
            }
        } else if ct.starts_with("application/json") {
            Mode::Json(BytesMut::new())
        } else {
            Mode::Off
        };
        UsageReader {
            mode,
            usage: Usage::default(),
            content_events: 0,
        }
    }

    /// See one body chunk.
    pub fn feed(&mut self, chunk: &Bytes) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Json(buf) => {
                if buf.len() + chunk.len() > MAX_JSON_BYTES {
                    self.mode = Mode::Off;
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            Mode::Stream { partial, skipping } => {
                let mut rest: &[u8] = chunk;
                while let Some(nl) = memchr::memchr(b'\n', rest) {
                    let line = &rest[..nl];
                    if *skipping {
                        *skipping = false;
                    } else if partial.is_empty() {
                        read_event(line, &mut self.usage, &mut self.content_events);
                    } else {
                        partial.extend_from_slice(line);
                        read_event(partial, &mut self.usage, &mut self.content_events);
                        partial.clear();
                    }
                    rest = &rest[nl + 1..];
                }
                if !*skipping {
                    if partial.len() + rest.len() > MAX_LINE_BYTES {
                        partial.clear();
                        *skipping = true;
                    } else {
                        partial.extend_from_slice(rest);
                    }
                }
            }
        }
    }

    /// The usage, once the body has ended.
    pub fn finish(mut self) -> Option<Usage> {
        match std::mem::replace(&mut self.mode, Mode::Off) {
            Mode::Json(buf) => {
                let body: UsageBody = serde_json::from_slice(&buf).ok()?;
                let mut usage = Usage::default();
                merge(&mut usage, &body.usage?);
                Some(usage)
            }
            Mode::Stream { .. } if self.usage.reported => Some(self.usage),
            Mode::Stream { .. } if self.content_events > 0 => Some(Usage {
                completion_tokens: self.content_events,
                ..Usage::default()
            }),
            _ => None,
        }
    }
}

/// One SSE line: `data: {json}`. Reads its usage, or counts it as a content event.
fn read_event(line: &[u8], usage: &mut Usage, content_events: &mut u64) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    let data = data.trim_ascii_start();
    if data.is_empty() || data == b"[DONE]" {
        return;
    }
    let Ok(event) = serde_json::from_slice::<StreamEvent>(data) else {
        return;
    };
    if let Some(u) = event
        .usage
        .as_ref()
        .or(event.message.as_ref().and_then(|m| m.usage.as_ref()))
    {
        merge(usage, u);
    }
    if event.has_content() {
        *content_events += 1;
    }
}

fn merge(into: &mut Usage, u: &RawUsage) {
    into.reported = true;
    if let Some(p) = u.prompt_tokens.or(u.input_tokens) {
        into.prompt_tokens = p;
    }
    if let Some(c) = u.completion_tokens.or(u.output_tokens) {
        into.completion_tokens = c;
    }
    let cached = u
        .prompt_tokens_details
        .as_ref()
        .and_then(|d| d.cached_tokens)
        .or(u.cache_read_input_tokens);
    if let Some(c) = cached {
        into.cached_tokens = c;
    }
}

#[derive(Deserialize)]
struct UsageBody {
    usage: Option<RawUsage>,
}

/// OpenAI (`prompt_tokens`, …) and Anthropic (`input_tokens`, …) usage fields.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamEvent {
    usage: Option<RawUsage>,
    message: Option<Message>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Delta>,
    /// Legacy completions stream `text` instead of a delta.
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    usage: Option<RawUsage>,
}

impl StreamEvent {
    fn has_content(&self) -> bool {
        let text = |c: &Choice| {
            let delta = c.delta.as_ref().and_then(|d| d.content.as_deref());
            delta.or(c.text.as_deref()).is_some_and(|t| !t.is_empty())
        };
        self.choices.iter().any(text) || self.kind.as_deref() == Some("content_block_delta")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(reader: &mut UsageReader, body: &str, piece: usize) {
        for chunk in body.as_bytes().chunks(piece) {
            reader.feed(&Bytes::copy_from_slice(chunk));
        }
    }

    #[test]
    fn reads_usage_from_a_plain_answer() {
        let mut r = UsageReader::new(Some("application/json"));
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
    fn reads_the_final_usage_chunk_across_chunk_boundaries() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\n";
        for piece in [1, 3, 16, 1000] {
            let mut r = UsageReader::new(Some("text/event-stream; charset=utf-8"));
            feed_all(&mut r, body, piece);
            let u = r.finish().unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.reported),
                (9, 2, true),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn counts_events_when_a_stream_reports_no_usage_and_tolerates_garbage() {
        let body = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {not json\n\n: comment\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n";
        let mut r = UsageReader::new(Some("text/event-stream"));
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
    fn reads_anthropic_stream_usage() {
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n\
                    event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        let mut r = UsageReader::new(Some("text/event-stream"));
        feed_all(&mut r, body, 11);
        let u = r.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (25, 15));
    }

    #[test]
    fn a_huge_line_is_skipped_not_buffered() {
        let mut r = UsageReader::new(Some("text/event-stream"));
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
