//! The mock's OpenAI Responses API (`POST /v1/responses`; Azure's `/openai/responses`):
//! the same answer as the other endpoints ("Hello from NAME word1 …", one word per
//! streamed event), in the Responses API's shapes. A plain answer is one `response`
//! object with a `message` output item; a stream is `response.created`,
//! `response.output_item.added`, `response.content_part.added`, one
//! `response.output_text.delta` per word, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done` and `response.completed`
//! (the whole response again, with its usage), each a named SSE event with its
//! `sequence_number`, and no `[DONE]`. Usage is `input_tokens` (cache reads included, as
//! OpenAI counts them), `input_tokens_details.cached_tokens` (`x-mock-cached-tokens`),
//! `output_tokens` and `total_tokens`.

use bytes::Bytes;
use serde::Serialize;

use super::{named_event, write_json, Completion};

/// Events before the first word.
const OPENING_EVENTS: u8 = 3;

#[derive(Serialize)]
struct Response<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    model: &'a str,
    output: Vec<Item<'a>>,
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Item<'a> {
    r#type: &'static str,
    id: &'a str,
    status: &'static str,
    role: &'static str,
    content: Vec<Part<'a>>,
}

#[derive(Serialize)]
struct Part<'a> {
    r#type: &'static str,
    text: &'a str,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    input_tokens_details: Details,
    output_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct Details {
    cached_tokens: u64,
}

fn part(text: &str) -> Part<'_> {
    Part {
        r#type: "output_text",
        text,
        annotations: [],
    }
}

/// The message item, with `text` as its one part (none while it is still empty at the
/// start of a stream).
fn item<'a>(c: &'a Completion, text: Option<&'a str>) -> Item<'a> {
    Item {
        r#type: "message",
        id: &c.id,
        status: if text.is_some() {
            "completed"
        } else {
            "in_progress"
        },
        role: "assistant",
        content: text.map(part).into_iter().collect(),
    }
}

/// The response object: finished with `text` and its usage, or just begun.
fn response<'a>(c: &'a Completion, text: Option<&'a str>) -> Response<'a> {
    Response {
        id: &c.id,
        object: "response",
        created_at: c.created,
        status: if text.is_some() {
            "completed"
        } else {
            "in_progress"
        },
        model: &c.model,
        output: text.map(|t| item(c, Some(t))).into_iter().collect(),
        usage: text.map(|_| Usage {
            input_tokens: c.usage.prompt_tokens,
            input_tokens_details: Details {
                cached_tokens: c.cached_tokens(),
            },
            output_tokens: c.usage.completion_tokens,
            total_tokens: c.usage.total_tokens,
        }),
    }
}

/// The whole answer as one `response` object.
pub(super) fn full_json(c: &Completion) -> Bytes {
    let text = c.content();
    let mut out = Vec::with_capacity(512 + text.len());
    write_json(&mut out, &response(c, Some(&text)));
    Bytes::from(out)
}

/// An event with the fields every one has, `type` and `sequence_number`, and `body`'s.
#[derive(Serialize)]
struct Event<'a, T> {
    r#type: &'a str,
    sequence_number: u32,
    #[serde(flatten)]
    body: T,
}

/// Where in the response a part or a delta is.
#[derive(Serialize)]
struct Place<'a, T> {
    item_id: &'a str,
    output_index: u32,
    content_index: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct WithResponse<'a> {
    response: Response<'a>,
}

#[derive(Serialize)]
struct WithItem<'a> {
    output_index: u32,
    item: Item<'a>,
}

#[derive(Serialize)]
struct WithPart<'a> {
    part: Part<'a>,
}

#[derive(Serialize)]
struct WithDelta<'a> {
    delta: &'a str,
}

#[derive(Serialize)]
struct WithText<'a> {
    text: &'a str,
}

fn event<T: Serialize>(kind: &str, sequence_number: u32, body: T) -> Bytes {
    let event = Event {
        r#type: kind,
        sequence_number,
        body,
    };
    named_event(kind, &event)
}

fn place<T>(c: &Completion, body: T) -> Place<'_, T> {
    Place {
        item_id: &c.id,
        output_index: 0,
        content_index: 0,
        body,
    }
}

/// Event `index` of those before the content: the response created, its message item
/// and text part added.
pub(super) fn opening_event(c: &Completion, index: u8) -> Option<Bytes> {
    let seq = u32::from(index);
    Some(match index {
        0 => event(
            "response.created",
            seq,
            WithResponse {
                response: response(c, None),
            },
        ),
        1 => event(
            "response.output_item.added",
            seq,
            WithItem {
                output_index: 0,
                item: item(c, None),
            },
        ),
        2 => event(
            "response.content_part.added",
            seq,
            place(c, WithPart { part: part("") }),
        ),
        _ => return None,
    })
}

/// The event carrying word `index`.
pub(super) fn delta_event(c: &Completion, index: u32, word: &str) -> Bytes {
    let seq = u32::from(OPENING_EVENTS) + index;
    event(
        "response.output_text.delta",
        seq,
        place(c, WithDelta { delta: word }),
    )
}

/// Event `index` of those after the content: the text, part and item done, and the
/// response completed with its usage.
pub(super) fn closing_event(c: &Completion, index: u8) -> Option<Bytes> {
    let seq = u32::from(OPENING_EVENTS) + c.chunks + u32::from(index);
    let text = c.content();
    Some(match index {
        0 => event(
            "response.output_text.done",
            seq,
            place(c, WithText { text: &text }),
        ),
        1 => event(
            "response.content_part.done",
            seq,
            place(c, WithPart { part: part(&text) }),
        ),
        2 => event(
            "response.output_item.done",
            seq,
            WithItem {
                output_index: 0,
                item: item(c, Some(&text)),
            },
        ),
        3 => event(
            "response.completed",
            seq,
            WithResponse {
                response: response(c, Some(&text)),
            },
        ),
        _ => return None,
    })
}
