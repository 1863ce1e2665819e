//! The mock's Anthropic Messages API (`POST /v1/messages`): the same answer as the OpenAI
//! endpoints ("Hello from NAME word1 …", one word per streamed event), in Anthropic's
//! shapes. A plain answer is one `message` object; a stream is `message_start`,
//! `content_block_start`, `ping`, one `content_block_delta` per word, `content_block_stop`,
//! `message_delta` (stop reason and the final output count) and `message_stop`, each a
//! named SSE event. Usage is `input_tokens` (the prompt less cache reads),
//! `cache_read_input_tokens` (`x-mock-cached-tokens`), `cache_creation_input_tokens` (0)
//! and `output_tokens`.
//!
//! Requests are checked as Anthropic's API checks them: an `anthropic-version` header, and
//! `model`, `max_tokens` and `messages` in the body; errors use Anthropic's envelope.

use bytes::Bytes;
use http::HeaderMap;
use serde::Serialize;

use super::{named_event, write_json, Completion, ParsedBody};

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    r#type: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<TextBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<()>,
    usage: Usage,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    r#type: &'static str,
    text: &'a str,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

/// Why a `/v1/messages` request would be refused by Anthropic's API, if it would.
pub(super) fn check_request(headers: &HeaderMap, parsed: &ParsedBody) -> Result<(), String> {
    if !headers.contains_key("anthropic-version") {
        return Err("anthropic-version: header is required".to_owned());
    }
    let missing = [
        ("model", parsed.model.is_some()),
        ("max_tokens", parsed.has_max_tokens),
        ("messages", parsed.has_messages),
    ];
    match missing.iter().find(|(_, present)| !present) {
        Some((field, _)) => Err(format!("{field}: Field required")),
        None => Ok(()),
    }
}

fn message<'a>(c: &'a Completion, content: Vec<TextBlock<'a>>, done: bool) -> Message<'a> {
    Message {
        id: &c.id,
        r#type: "message",
        role: "assistant",
        model: &c.model,
        content,
        stop_reason: done.then_some("end_turn"),
        stop_sequence: None,
        usage: usage(
            c,
            if done {
                c.usage.completion_tokens
            } else {
                1.min(c.usage.completion_tokens)
            },
        ),
    }
}

fn usage(c: &Completion, output_tokens: u64) -> Usage {
    let cached = c.cached_tokens();
    Usage {
        input_tokens: c.usage.prompt_tokens - cached,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: cached,
        output_tokens,
    }
}

/// The whole answer as one `message` object.
pub(super) fn full_json(c: &Completion) -> Bytes {
    let text = c.content();
    let block = TextBlock {
        r#type: "text",
        text: &text,
    };
    let mut out = Vec::with_capacity(256 + text.len());
    write_json(&mut out, &message(c, vec![block], true));
    Bytes::from(out)
}

/// Event `index` of those before the content: `message_start`, `content_block_start`, `ping`.
pub(super) fn opening_event(c: &Completion, index: u8) -> Option<Bytes> {
    #[derive(Serialize)]
    struct Start<'a> {
        r#type: &'static str,
        message: Message<'a>,
    }
    #[derive(Serialize)]
    struct BlockStart<'a> {
        r#type: &'static str,
        index: u32,
        content_block: TextBlock<'a>,
    }
    Some(match index {
        0 => named_event(
            "message_start",
            &Start {
                r#type: "message_start",
                message: message(c, Vec::new(), false),
            },
        ),
        1 => named_event(
            "content_block_start",
            &BlockStart {
                r#type: "content_block_start",
                index: 0,
                content_block: TextBlock {
                    r#type: "text",
                    text: "",
                },
            },
        ),
        2 => named_event("ping", &Kind { r#type: "ping" }),
        _ => return None,
    })
}

/// One word of the answer as a `content_block_delta`.
pub(super) fn delta_event(text: &str) -> Bytes {
    #[derive(Serialize)]
    struct Delta<'a> {
        r#type: &'static str,
        index: u32,
        delta: TextBlock<'a>,
    }
    named_event(
        "content_block_delta",
        &Delta {
            r#type: "content_block_delta",
            index: 0,
            delta: TextBlock {
                r#type: "text_delta",
                text,
            },
        },
    )
}

/// Event `index` of those after the content: `content_block_stop`, `message_delta`,
/// `message_stop`.
pub(super) fn closing_event(c: &Completion, index: u8) -> Option<Bytes> {
    #[derive(Serialize)]
    struct BlockStop {
        r#type: &'static str,
        index: u32,
    }
    #[derive(Serialize)]
    struct StopDelta {
        stop_reason: &'static str,
        stop_sequence: Option<()>,
    }
    #[derive(Serialize)]
    struct OutputUsage {
        output_tokens: u64,
    }
    #[derive(Serialize)]
    struct MessageDelta {
        r#type: &'static str,
        delta: StopDelta,
        usage: OutputUsage,
    }
    Some(match index {
        0 => named_event(
            "content_block_stop",
            &BlockStop {
                r#type: "content_block_stop",
                index: 0,
            },
        ),
        1 => named_event(
            "message_delta",
            &MessageDelta {
                r#type: "message_delta",
                delta: StopDelta {
                    stop_reason: "end_turn",
                    stop_sequence: None,
                },
                usage: OutputUsage {
                    output_tokens: c.usage.completion_tokens,
                },
            },
        ),
        2 => named_event(
            "message_stop",
            &Kind {
                r#type: "message_stop",
            },
        ),
        _ => return None,
    })
}

/// An event that is only its type (`ping`, `message_stop`).
#[derive(Serialize)]
struct Kind {
    r#type: &'static str,
}
