//! What a request is, as routing sees it: `RequestMeta`, extracted from the HTTP head and
//! the JSON body without copying the prompt. The body itself is kept unchanged elsewhere
//! and forwarded byte for byte.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, LazyLock, OnceLock};

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::errors::ClientError;
use crate::provider::ApiFormat;
use crate::tokens::TokenEstimate;

mod scan;

/// Tenant of a request when no authentication is configured.
pub const ANONYMOUS: &str = "anonymous";

/// [`ANONYMOUS`], shared: a request of no tenant need not copy the name.
pub fn anonymous() -> Arc<str> {
    static NAME: LazyLock<Arc<str>> = LazyLock::new(|| ANONYMOUS.into());
    NAME.clone()
}

/// Headers a policy may never read, and that never go upstream: credentials, and the
/// OpenAI organization and project, which choose the account a backend's key bills.
pub const CREDENTIAL_HEADERS: [http::HeaderName; 6] = [
    http::header::AUTHORIZATION,
    http::HeaderName::from_static("x-api-key"),
    http::HeaderName::from_static("api-key"),
    http::header::PROXY_AUTHORIZATION,
    http::HeaderName::from_static("openai-organization"),
    http::HeaderName::from_static("openai-project"),
];

/// Bytes of the system prompt and first message hashed for the session key: enough to
/// tell conversations apart, little enough that a 1 MiB prompt costs no more than 4 KiB.
const SESSION_PREFIX_BYTES: usize = 4096;

/// The request as a policy sees it (`req` in Lua).
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub model: Option<String>,
    /// Estimated prompt tokens, counted on first use: see [`RequestMeta::tokens`].
    tokens: OnceLock<u64>,
    /// Where the prompt's text is, for the estimate.
    prompt: Prompt,
    pub max_tokens: Option<u64>,
    /// Completions asked for (`n`, OpenAI; 1 when the body does not say; 0 reserves as 1).
    pub choices: u64,
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub asked_usage: bool,
    /// Shared with the tenant (`Tenant::name`), so that a request need not copy it.
    pub tenant: Arc<str>,
    pub region: Option<String>,
    /// The client's `x-session-id`; without one, the key is hashed from the prompt when
    /// first asked for: see [`RequestMeta::session`].
    session_header: Option<String>,
    session: OnceLock<Option<String>>,
    pub path: String,
    /// A standard method is kept without an allocation.
    pub method: http::Method,
    /// The API format, from the path: Anthropic's Messages API or OpenAI's.
    pub format: ApiFormat,
    pub priority: i64,
    /// Request headers in the order they came, credentials removed; the values share the
    /// head's buffer rather than being copied out. A list, not a map: it is made for
    /// every request and looked into only when a policy calls `req.header`, so a map's
    /// hashing would cost more than the few names a lookup compares.
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Byte range of the `model` value (with its quotes) in the body, for renaming it.
    pub model_span: Option<(usize, usize)>,
}

impl RequestMeta {
    /// Fill the head-derived fields from the HTTP request head.
    pub fn from_head(method: &http::Method, path: &str, headers: &http::HeaderMap) -> RequestMeta {
        let kept: Vec<_> = headers
            .iter()
            .filter(|(name, _)| !CREDENTIAL_HEADERS.contains(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        // Names made once: looking a `&str` name up parses it first, on every request.
        static REGION: http::HeaderName = http::HeaderName::from_static("x-switchyard-region");
        static SESSION: http::HeaderName = http::HeaderName::from_static("x-session-id");
        static PRIORITY: http::HeaderName = http::HeaderName::from_static("x-priority");
        let get = |n: &http::HeaderName| {
            kept.iter()
                .find(|(name, _)| name == n)
                .and_then(|(_, v)| v.to_str().ok())
                .map(str::to_string)
        };
        RequestMeta {
            tenant: anonymous(),
            region: get(&REGION).filter(|r| !r.is_empty()),
            session_header: get(&SESSION).filter(|s| !s.is_empty()),
            priority: get(&PRIORITY)
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0),
            path: path.to_string(),
            method: method.clone(),
            format: ApiFormat::of_path(path),
            headers: kept,
            choices: 1,
            ..RequestMeta::default()
        }
    }

    /// Estimated prompt tokens (0 without a body). Counted the first time something asks
    /// — the policy reading `req.tokens`, a tenant's token or spend limit, a stream's
    /// accounting without usage — and kept: a request nothing asks pays nothing, which
    /// for a large prompt routed by round robin is ~10 instructions a byte saved.
    pub fn tokens(&self) -> u64 {
        *self.tokens.get_or_init(|| {
            let (tokens, session) = self.prompt.estimate();
            // Already set if the key was asked for first: the same key either way.
            let _ = self.session.set(session);
            tokens
        })
    }

    /// The session key: the client's `x-session-id`, else 16 hex digits of xxh3 over the
    /// first [`SESSION_PREFIX_BYTES`] of the system prompt and first message (so a
    /// conversation keeps its key as it grows); `None` without either. Hashed the first
    /// time something asks (only a policy reading `req.session` does) and kept.
    pub fn session(&self) -> Option<&str> {
        if let Some(s) = &self.session_header {
            return Some(s);
        }
        self.session
            .get_or_init(|| self.prompt.session_key())
            .as_deref()
    }

    /// Whether the session key has been hashed from the prompt yet.
    #[cfg(test)]
    pub(crate) fn session_hashed(&self) -> bool {
        self.session.get().is_some()
    }

    /// Whether the estimate has been counted yet.
    #[cfg(test)]
    pub(crate) fn tokens_counted(&self) -> bool {
        self.tokens.get().is_some()
    }

    /// Completion tokens to reserve for this request: `max_tokens` (or `default` without
    /// one) for each of the `n` completions asked for.
    pub fn completion_reserve(&self, default: u64) -> u64 {
        self.max_tokens
            .unwrap_or(default)
            .saturating_mul(self.choices.max(1))
    }

    /// A request header by (case-insensitive) name; credentials are never present.
    pub fn header(&self, name: &str) -> Option<&str> {
        // Header names are kept in lower case, so a name that cannot be one is absent.
        self.headers
            .iter()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.to_str().ok())
    }

    /// Read `model`, `stream`, `max_tokens`, where the prompt's text is (for the estimate,
    /// counted when first asked for) and (unless the client sent `x-session-id`) the
    /// session key from a JSON body. The prompt's text is skipped, its places kept.
    pub fn read_json_body(&mut self, body: &Bytes) -> Result<(), ClientError> {
        // Most bodies are read in one pass (`scan`); what it leaves, every error included,
        // is parsed with serde_json, which names the place of an error. (Filled in place:
        // moving the fields out of an `Option` cost ~2.6 k instructions of shuffles.)
        let mut fields = Fields::default();
        let scanned = simdutf8::basic::from_utf8(body)
            .is_ok_and(|text| scan::read(text.as_bytes(), &mut fields).is_some());
        if !scanned {
            fields = Fields::parse(body)?;
        }
        self.model_span = fields.model.as_ref().map(|m| (m.start, m.end));
        self.model = match &fields.model {
            None => None,
            Some(m) => Some(model_name(&body[m.clone()])?),
        };
        self.stream = fields.stream.unwrap_or(false);
        self.asked_usage = fields.include_usage.unwrap_or(false);
        // The largest of the names given (`None` is the least): a server that reads
        // another one than the client meant must not use more than was reserved for it.
        self.max_tokens = fields
            .max_completion_tokens
            .max(fields.max_tokens)
            .max(fields.max_output_tokens);
        self.choices = fields.n.unwrap_or(1);

        // Where the prompt's text is: its values' places in the body, read when first asked.
        // (Plain pushes: an array's `into_iter().flatten()` here cost ~1.5 k instructions.)
        let mut spans = fields.messages;
        let mut push = |text: Option<Range<usize>>, session: bool| {
            if let Some(text) = text {
                spans.push(Span { text, session });
            }
        };
        push(fields.prompt, true);
        push(fields.input, true);
        push(fields.system, true);
        // Counted, but not part of the session key (which keys already in use would change).
        push(fields.instructions, false);
        // Tool definitions are input tokens too; their JSON text is counted as it is.
        let definitions = match (fields.tools, fields.functions) {
            (None, None) => Vec::new(),
            (tools, functions) => tools.into_iter().chain(functions).collect(),
        };
        self.prompt = Prompt {
            body: body.clone(),
            spans,
            definitions,
        };
        self.tokens = OnceLock::new();
        self.session = OnceLock::new();
        Ok(())
    }
}

/// The model's name from its JSON value: a string, else the request is refused.
fn model_name(raw: &[u8]) -> Result<String, ClientError> {
    let raw = std::str::from_utf8(raw).map_err(|_| ClientError::wrong_type("model", "a string"))?;
    if let Some(text) = unescaped_string(raw) {
        return Ok(text.to_string());
    }
    serde_json::from_str::<Cow<str>>(raw)
        .map(Cow::into_owned)
        .map_err(|_| ClientError::wrong_type("model", "a string"))
}

/// The text of a JSON string without escapes: what lies between its quotes, with no
/// parse. `None` for another value or a string with escapes.
fn unescaped_string(json: &str) -> Option<&str> {
    let text = json.strip_prefix('"')?.strip_suffix('"')?;
    memchr::memchr(b'\\', text.as_bytes())
        .is_none()
        .then_some(text)
}

/// What routing reads from a JSON body: values, and where in the body the model and the
/// prompt's text are. Made by `scan::fields` or, for what it leaves, [`Fields::parse`].
#[derive(Debug, Default, PartialEq)]
struct Fields {
    /// The `model` value (with its quotes, if a string).
    model: Option<Range<usize>>,
    stream: Option<bool>,
    /// `stream_options.include_usage`.
    include_usage: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    /// Each message's content, in order.
    messages: Vec<Span>,
    /// Messages other than system ones read so far.
    conversation: usize,
    prompt: Option<Range<usize>>,
    input: Option<Range<usize>>,
    system: Option<Range<usize>>,
    instructions: Option<Range<usize>>,
    tools: Option<Range<usize>>,
    functions: Option<Range<usize>>,
}

impl Fields {
    /// Add a message, by its role and where its content is.
    fn add_message(&mut self, system: bool, content: Option<Range<usize>>) {
        // The system prompt and the first message identify a conversation.
        if let Some(text) = content {
            self.messages.push(Span {
                text,
                session: system || self.conversation == 0,
            });
        }
        if !system {
            self.conversation += 1;
        }
    }

    /// Parse `body` with serde_json (the bodies `scan::read` leaves): its fields raw, then
    /// each into its expected type, so that an error names the field whose type is wrong
    /// (or gives the syntax error's place).
    fn parse(body: &[u8]) -> Result<Fields, ClientError> {
        check_depth(body)?;
        // serde reads an array into the fields in order (`["m"]` as model `m`): only an
        // object is a request. Anything else is said to be invalid JSON or not an object.
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | None => {}
            Some(_) => {
                serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(json_error)?;
                return Err(ClientError::NotAnObject);
            }
        }
        let raw: RawFields = serde_json::from_slice(body).map_err(json_error)?;
        fn typed<'a, T: Deserialize<'a>>(
            raw: Option<&'a RawValue>,
            field: &'static str,
            expected: &'static str,
        ) -> Result<Option<T>, ClientError> {
            raw.map(|r| serde_json::from_str::<T>(r.get()))
                .transpose()
                .map_err(|_| ClientError::wrong_type(field, expected))
        }
        let integer = "a non-negative integer";
        let stream = typed::<Option<bool>>(raw.stream, "stream", "a boolean")?;
        let max_tokens = typed::<Option<u64>>(raw.max_tokens, "max_tokens", integer)?;
        let max_completion_tokens =
            typed::<Option<u64>>(raw.max_completion_tokens, "max_tokens", integer)?;
        let max_output_tokens =
            typed::<Option<u64>>(raw.max_output_tokens, "max_output_tokens", integer)?;
        let n = typed::<Option<u64>>(raw.n, "n", "a positive integer")?;
        let messages: Option<Vec<MessagePeek>> =
            typed(raw.messages, "messages", "an array of message objects")?;
        let stream_options: Option<StreamOptionsPeek> =
            typed(raw.stream_options, "stream_options", "an object")?;
        // RawValue borrows from `body`, so its offset in the body is a pointer difference.
        let span = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
            start..start + raw.get().len()
        };
        let mut fields = Fields {
            model: raw.model.map(span),
            stream: stream.flatten(),
            include_usage: stream_options.and_then(|o| o.include_usage),
            max_tokens: max_tokens.flatten(),
            max_completion_tokens: max_completion_tokens.flatten(),
            max_output_tokens: max_output_tokens.flatten(),
            n: n.flatten(),
            prompt: raw.prompt.map(span),
            input: raw.input.map(span),
            system: raw.system.map(span),
            instructions: raw.instructions.map(span),
            tools: raw.tools.map(span),
            functions: raw.functions.map(span),
            ..Fields::default()
        };
        for m in messages.iter().flatten() {
            fields.add_message(m.role.as_deref() == Some("system"), m.content.map(span));
        }
        Ok(fields)
    }
}

/// Where a prompt's text is: the JSON values holding it (a message's `content`, `prompt`,
/// `input`, `system`), as places in the body. They are parsed for their text only when the
/// estimate or the session key is first asked for: the request's own parse skips them,
/// checking their syntax without reading them.
#[derive(Debug, Clone, Default)]
struct Prompt {
    body: Bytes,
    spans: Vec<Span>,
    /// Tool (and function) definitions, counted as their JSON text.
    definitions: Vec<Range<usize>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Span {
    /// A JSON value in the body: a string, an array of strings or token ids, or content
    /// parts or blocks (see [`TextPeek`]).
    text: Range<usize>,
    /// Part of what identifies the conversation (hashed for the session key).
    session: bool,
}

impl Prompt {
    /// Call `f` on each piece of the spans `which` selects, in order, with whether its
    /// span identifies the conversation. Text without escapes is a slice of the body;
    /// text with escapes is decoded.
    fn visit(&self, which: impl Fn(&Span) -> bool, f: &mut dyn FnMut(Piece<'_>, bool)) {
        for span in self.spans.iter().filter(|s| which(s)) {
            // The body was parsed whole before the spans were kept, so each is UTF-8 and
            // JSON; a span that is not reads as no text.
            let Ok(json) = simdutf8::basic::from_utf8(&self.body[span.text.clone()]) else {
                continue;
            };
            // Most content is a string without escapes, read with no parse.
            if let Some(text) = unescaped_string(json) {
                f(Piece::Text(text), span.session);
                continue;
            }
            if let Ok(text) = serde_json::from_str::<TextPeek>(json) {
                text.visit(&mut |piece| f(piece, span.session));
            }
        }
    }

    /// The estimate, and the session key on the way (it costs little more once the text
    /// is read): see [`Prompt::session_key`].
    fn estimate(&self) -> (u64, Option<String>) {
        let mut tokens = TokenEstimate::default();
        let mut session = SessionHasher::default();
        self.visit(|_| true, &mut |piece, identifies| match piece {
            Piece::Text(t) => {
                tokens.add(t);
                if identifies {
                    session.add(t.as_bytes());
                }
            }
            Piece::Ids(n) => tokens.add_tokens(n),
        });
        for definitions in &self.definitions {
            tokens.add_bytes(&self.body[definitions.clone()]);
        }
        (tokens.tokens(), session.key())
    }

    /// The session key of the pieces that identify the conversation; `None` if there
    /// are none.
    fn session_key(&self) -> Option<String> {
        let mut session = SessionHasher::default();
        self.visit(|s| s.session, &mut |piece, _| {
            if let Piece::Text(t) = piece {
                session.add(t.as_bytes());
            }
        });
        session.key()
    }
}

/// Deepest JSON nesting accepted, as serde_json allows for typed values. Backends parse
/// the body too, and some recurse: a body nested 100 000 deep is refused here.
const MAX_JSON_DEPTH: usize = 128;

/// Refuse JSON nested deeper than [`MAX_JSON_DEPTH`]. Strings are skipped with `memchr`,
/// so the cost is small for chat bodies, which are mostly string content.
fn check_depth(body: &[u8]) -> Result<(), ClientError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Jump to the closing quote, stepping over escapes.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i..]) {
                        // A body that ends in the escape is unterminated too.
                        Some(off) if body[i + off] == b'\\' => i = (i + off + 2).min(body.len()),
                        Some(off) => {
                            i += off;
                            break;
                        }
                        None => return Ok(()), // unterminated: the parser reports it
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    let line = 1 + body[..i].iter().filter(|&&b| b == b'\n').count();
                    let column = i - body[..i]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |p| p + 1)
                        + 1;
                    return Err(ClientError::BadJson {
                        line,
                        column,
                        reason: format!("nesting deeper than {MAX_JSON_DEPTH} levels"),
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

fn json_error(e: serde_json::Error) -> ClientError {
    ClientError::BadJson {
        line: e.line(),
        column: e.column(),
        reason: match e.classify() {
            serde_json::error::Category::Eof => "unexpected end of input".into(),
            _ => {
                // serde's message ends with " at line X column Y"; we report those ourselves.
                let msg = e.to_string();
                match msg.rfind(" at line ") {
                    Some(i) => msg[..i].to_string(),
                    None => msg,
                }
            }
        },
    }
}

/// The session key of a body: xxh3 of its first [`SESSION_PREFIX_BYTES`] of system prompt
/// and first message (SipHash, std's default, cost 3 instructions a byte here).
#[derive(Default)]
struct SessionHasher {
    hasher: xxhash_rust::xxh3::Xxh3Default,
    bytes: usize,
}

impl SessionHasher {
    /// Add a piece of text, given as its UTF-8 bytes.
    fn add(&mut self, text: &[u8]) {
        let room = SESSION_PREFIX_BYTES.saturating_sub(self.bytes);
        if room == 0 {
            return;
        }
        let take = floor_char_boundary(text, room);
        self.hasher.update(&text[..take]);
        // Ends the piece, so that "ab" + "c" and "a" + "bc" differ.
        self.hasher.update(&[0xff]);
        self.bytes += take.max(1);
    }

    /// 16 hex digits; `None` if no text was added. (`hex` costs about a third of
    /// `format!` here.)
    fn key(&self) -> Option<String> {
        (self.bytes > 0).then(|| hex::encode(self.hasher.digest().to_be_bytes()))
    }
}

/// The largest length up to `max` that ends `utf8` between characters.
pub(crate) fn floor_char_boundary(utf8: &[u8], max: usize) -> usize {
    if max >= utf8.len() {
        return utf8.len();
    }
    let mut i = max;
    // A continuation byte (0b10xxxxxx) is never the first byte of a character.
    while i > 0 && utf8[i] & 0xc0 == 0x80 {
        i -= 1;
    }
    i
}

/// The parts of an OpenAI (or Anthropic) request body that routing reads, raw, for
/// [`Fields::parse`]: everything else is skipped without allocation.
#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    /// The Responses API's system prompt.
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    /// Tool definitions (and the older `functions`).
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    functions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptionsPeek {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A message as the request's parse reads it: its role, and where its content is.
#[derive(Deserialize)]
struct MessagePeek<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// Text in any of the shapes the APIs allow: a string, an array of strings (or token ids),
/// or an array of content parts (OpenAI) or content blocks (Anthropic) with `text` — or
/// `thinking`, or a tool result's nested `content`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TextPeek<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<PartPeek<'a>>),
    Other(IgnoredAny),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PartPeek<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    /// One token id of a prompt given as ids (`"prompt": [1, 2, 3]`).
    Id(#[allow(dead_code)] u64),
    /// One prompt of a batch given as ids (`"prompt": [[1, 2], [3]]`).
    Ids(Vec<IgnoredAny>),
    Part {
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        thinking: Option<Cow<'a, str>>,
        /// A `tool_result` block's content: a string or more blocks (nesting is bounded
        /// by [`MAX_JSON_DEPTH`]).
        #[serde(borrow, default)]
        content: Option<Box<TextPeek<'a>>>,
    },
    Other(IgnoredAny),
}

/// A piece of a prompt: text, or a number of token ids.
enum Piece<'t> {
    Text(&'t str),
    Ids(u64),
}

impl TextPeek<'_> {
    /// Call `f` on each piece.
    fn visit(&self, f: &mut dyn FnMut(Piece<'_>)) {
        match self {
            TextPeek::Text(t) => f(Piece::Text(t)),
            TextPeek::Parts(parts) => {
                for p in parts {
                    match p {
                        PartPeek::Text(t) => f(Piece::Text(t)),
                        PartPeek::Id(_) => f(Piece::Ids(1)),
                        PartPeek::Ids(ids) => f(Piece::Ids(ids.len() as u64)),
                        PartPeek::Part {
                            text,
                            thinking,
                            content,
                        } => {
                            for t in [text, thinking].into_iter().flatten() {
                                f(Piece::Text(t));
                            }
                            if let Some(c) = content {
                                c.visit(f);
                            }
                        }
                        PartPeek::Other(_) => {}
                    }
                }
            }
            TextPeek::Other(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(body: &str) -> Result<RequestMeta, ClientError> {
        let mut m = RequestMeta::from_head(
            &http::Method::POST,
            "/v1/chat/completions",
            &http::HeaderMap::new(),
        );
        m.read_json_body(&Bytes::copy_from_slice(body.as_bytes()))
            .map(|_| m)
    }

    /// The estimate for exactly these pieces of text.
    fn estimate(texts: &[&str]) -> u64 {
        let mut e = TokenEstimate::default();
        texts.iter().for_each(|t| e.add(t));
        e.tokens()
    }

    #[test]
    fn reads_the_routing_fields() {
        let m = meta(r#"{"model":"gpt-4o","stream":true,"max_tokens":50,
            "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there, friend"}]}"#)
            .unwrap();
        assert_eq!(m.model.as_deref(), Some("gpt-4o"));
        assert!(m.stream);
        assert_eq!(m.max_tokens, Some(50));
        assert_eq!(m.tokens(), estimate(&["be brief", "hello there, friend"]));
        assert_eq!(m.tokens(), 6, "o200k_base counts 2 + 4");
        assert!(m.session().is_some());
        assert_eq!(&*m.tenant, ANONYMOUS);
        // A name with escapes is decoded; its place in the body is the whole value.
        let body = r#"{"model":"gpt\u002d4o \"mini\"","messages":[]}"#;
        let m = meta(body).unwrap();
        assert_eq!(m.model.as_deref(), Some(r#"gpt-4o "mini""#));
        let (start, end) = m.model_span.unwrap();
        assert_eq!(&body[start..end], r#""gpt\u002d4o \"mini\"""#);
    }

    #[test]
    fn content_parts_and_prompt_count_as_tokens() {
        let m = meta(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#).unwrap();
        assert_eq!(m.tokens(), estimate(&["abcdefgh"]));
        assert_ne!(
            m.tokens(),
            estimate(&["abcdefgh", "x"]),
            "the image is not text"
        );
        let m = meta(r#"{"model":"m","prompt":"abcd"}"#).unwrap();
        assert_eq!(m.tokens(), 1);
        let m = meta(r#"{"model":"m","input":["abcd","efgh"]}"#).unwrap();
        assert_eq!(m.tokens(), 2);
        // The Responses API's instructions are prompt too.
        let m = meta(r#"{"model":"m","instructions":"abcdefgh","input":"abcd"}"#).unwrap();
        assert_eq!(m.tokens(), estimate(&["abcd", "abcdefgh"]));
        // Token ids count one each, alone or in a batch.
        let m = meta(r#"{"model":"m","prompt":[1,2,3,4,5]}"#).unwrap();
        assert_eq!(m.tokens(), 5);
        let m = meta(r#"{"model":"m","input":[[1,2,3],[4,5]],"prompt":"abcd"}"#).unwrap();
        assert_eq!(m.tokens(), 6);
        // Tool definitions count as their JSON text, and are not part of the session key.
        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;
        let plain = r#"{"model":"m","messages":[{"role":"user","content":"abcd"}]}"#;
        let with_tools = format!(
            r#"{{"model":"m","tools":{tools},"messages":[{{"role":"user","content":"abcd"}}]}}"#
        );
        let (plain, with_tools) = (meta(plain).unwrap(), meta(&with_tools).unwrap());
        assert_eq!(with_tools.tokens(), estimate(&["abcd", tools]));
        assert!(with_tools.tokens() > plain.tokens() + 10);
        assert_eq!(with_tools.session(), plain.session());
        let functions = format!(r#"{{"model":"m","functions":{tools}}}"#);
        assert_eq!(meta(&functions).unwrap().tokens(), estimate(&[tools]));
    }

    #[test]
    fn the_estimate_waits_for_a_reader_and_counts_decoded_text() {
        // Text with escapes is counted as decoded, text without as it lies in the body.
        let m = meta(
            r#"{"model":"m","messages":[{"role":"system","content":"line one\nline \"two\""},{"role":"user","content":"plain words here"}]}"#,
        )
        .unwrap();
        assert!(!m.tokens_counted());
        let expected = estimate(&["line one\nline \"two\"", "plain words here"]);
        assert_eq!(m.tokens(), expected);
        assert!(m.tokens_counted());
        // A copy keeps the count; a copy made before counting counts the same.
        assert_eq!(m.clone().tokens(), expected);
        let fresh = meta(r#"{"model":"m","prompt":"plain words here"}"#).unwrap();
        let copy = fresh.clone();
        assert_eq!(copy.tokens(), fresh.tokens());
    }

    #[test]
    fn anthropic_bodies_count_system_blocks_and_tool_results() {
        let mut m =
            RequestMeta::from_head(&http::Method::POST, "/v1/messages", &http::HeaderMap::new());
        m.read_json_body(&Bytes::from_static(
            br#"{"model":"claude","max_tokens":64,"stream":true,
            "system":[{"type":"text","text":"abcd","cache_control":{"type":"ephemeral"}}],
            "messages":[{"role":"user","content":[
                {"type":"text","text":"efgh"},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},
                {"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"ijkl"}]},
                {"type":"tool_result","tool_use_id":"t2","content":"mnop"}]},
              {"role":"assistant","content":[{"type":"thinking","thinking":"qrst","signature":"s"},
                {"type":"tool_use","id":"t3","name":"f","input":{"q":"not counted"}}]}]}"#,
        ))
        .unwrap();
        assert_eq!(m.format, ApiFormat::Anthropic);
        assert_eq!(m.model.as_deref(), Some("claude"));
        assert!(m.stream);
        assert_eq!(m.max_tokens, Some(64));
        let counted = ["abcd", "efgh", "ijkl", "mnop", "qrst"];
        assert_eq!(m.tokens(), estimate(&counted));
        assert_ne!(
            m.tokens(),
            estimate(&[&counted[..], &["not counted"]].concat())
        );
        assert!(m.session().is_some());
        assert_eq!(meta(r#"{"model":"m"}"#).unwrap().format, ApiFormat::OpenAi);
    }

    #[test]
    fn same_conversation_same_session_key() {
        let a = meta(r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"}]}"#).unwrap();
        let b = meta(r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"},{"role":"assistant","content":"A"},{"role":"user","content":"more"}]}"#).unwrap();
        let c = meta(r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"other"}]}"#).unwrap();
        assert_eq!(a.session(), b.session());
        assert_ne!(a.session(), c.session());
    }

    #[test]
    fn session_keys_stay_the_same_from_version_to_version() {
        // Instances of a fleet, old and new during an upgrade, must agree on a
        // conversation's key, or sticky routing moves it. Pinned to the value the eager
        // hash gave before the key was worked out on demand.
        let body = r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"},{"role":"assistant","content":"A"}]}"#;
        let m = meta(body).unwrap();
        assert_eq!(m.session(), Some("bab780360d2e6f27"));
        // The estimate works the key out on the way: the same key.
        let m = meta(body).unwrap();
        m.tokens();
        assert!(m.session_hashed());
        assert_eq!(m.session(), Some("bab780360d2e6f27"));
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let err = meta("{\n  \"model\": \"m\",\n  oops\n}").unwrap_err();
        match err {
            ClientError::BadJson { line, column, .. } => assert_eq!((line, column), (3, 3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_an_object_is_a_request() {
        for body in [r#"["m", true]"#, r#""m""#, "null", " 42 "] {
            assert_eq!(meta(body).unwrap_err(), ClientError::NotAnObject, "{body}");
        }
        // Not JSON at all is still said to be so, at its place.
        assert!(matches!(
            meta("[\"m\",").unwrap_err(),
            ClientError::BadJson { line: 1, .. }
        ));
        assert_eq!(
            meta(" \n{\"model\":\"m\"}").unwrap().model.as_deref(),
            Some("m")
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_at_its_place() {
        let body =
            b"{\"model\":\"m\",\n\"messages\":[{\"role\":\"user\",\"content\":\"ab\xffc\"}]}";
        let mut m = RequestMeta::from_head(
            &http::Method::POST,
            "/v1/chat/completions",
            &http::HeaderMap::new(),
        );
        match m.read_json_body(&Bytes::from_static(body)).unwrap_err() {
            ClientError::BadJson {
                line,
                column,
                reason,
            } => assert_eq!(
                (line, column, &*reason),
                (2, 41, "invalid unicode code point")
            ),
            other => panic!("{other:?}"),
        }
        // Text in several scripts, checked whole, is read as before.
        let m =
            meta(r#"{"model":"m","messages":[{"role":"user","content":"héllo wörld 日本語 👋"}]}"#)
                .unwrap();
        assert_eq!(m.tokens(), estimate(&["héllo wörld 日本語 👋"]));
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, field) in [
            (r#"{"model":5}"#, "model"),
            (r#"{"model":"m","messages":"hi"}"#, "messages"),
            (r#"{"model":"m","stream":"yes"}"#, "stream"),
            (r#"{"model":"m","max_tokens":-1}"#, "max_tokens"),
            (r#"{"model":"m","max_completion_tokens":1.5}"#, "max_tokens"),
            (r#"{"model":"m","n":"two"}"#, "n"),
            (
                r#"{"model":"m","stream_options":{"include_usage":"yes"}}"#,
                "stream_options",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"},7]}"#,
                "messages",
            ),
        ] {
            match meta(body)
                .err()
                .unwrap_or_else(|| panic!("accepted: {body}"))
            {
                ClientError::WrongType { field: f, .. } => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn nulls_and_absent_fields_read_as_before() {
        let m = meta(r#"{"model":"m","stream":null,"max_tokens":null,"prompt":null,"messages":null,"stream_options":null}"#)
            .unwrap();
        assert!(!m.stream && m.max_tokens.is_none() && m.tokens() == 0);
        let m = meta(r#"{"model":"m","max_tokens":7,"max_completion_tokens":9}"#).unwrap();
        assert_eq!(m.max_tokens, Some(9));
        assert_eq!((m.choices, m.completion_reserve(100)), (1, 9));
        // Whichever name the backend reads, no more than reserved.
        let m = meta(r#"{"model":"m","max_completion_tokens":1,"max_tokens":100000}"#).unwrap();
        assert_eq!(m.max_tokens, Some(100_000));
        let m = meta(r#"{"model":"m","n":3}"#).unwrap();
        assert_eq!(m.completion_reserve(100), 300);
        // A message of an unknown shape is passed over, as before.
        let m = meta(r#"{"model":"m","messages":[{"role":"user","content":{"x":1}},{"role":"user","content":"hello there"}]}"#)
            .unwrap();
        assert!(m.tokens() > 0);
    }

    #[test]
    fn every_truncated_body_is_an_error_not_a_crash() {
        // Cut anywhere, escapes included (a body ending in a backslash once read past its
        // end).
        let body = r#"{"model":"m\"x","messages":[{"role":"user","content":"a\\b\"c\u00e9"}]}"#;
        assert!(meta(body).is_ok());
        for end in 0..body.len() {
            let cut = &body[..end];
            assert!(
                matches!(meta(cut), Err(ClientError::BadJson { .. })),
                "{cut}"
            );
        }
    }

    /// Bodies of each API, mangled at random (bytes taken out, put in or changed, cut
    /// short): each is read or refused, and a read one answers every lazy question
    /// (estimate, session key), never a crash.
    #[test]
    fn mangled_bodies_are_read_or_refused_never_a_crash() {
        let seeds = [
            (
                "/v1/chat/completions",
                r#"{"model":"m","stream":true,"max_tokens":5,"messages":[{"role":"system","content":"be \"brief\" \u00e9\n"},{"role":"user","content":[{"type":"text","text":"h\u00e9llo \ud83d\ude00"},{"type":"image_url","image_url":{"url":"x"}}]}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"user":"u1"}"#,
            ),
            (
                "/v1/responses",
                r#"{"model":"m","instructions":"sys","input":[{"role":"user","content":[{"type":"input_text","text":"hi\\there"}]}],"max_output_tokens":9}"#,
            ),
            (
                "/v1/completions",
                r#"{"model":"m","prompt":["one","tw\"o"],"max_tokens":3,"stream":false}"#,
            ),
            (
                "/v1/messages",
                r#"{"model":"m","max_tokens":7,"system":[{"type":"text","text":"s\u0041"}],"messages":[{"role":"user","content":[{"type":"text","text":"caf\u00e9"}]},{"role":"assistant","content":"ok"}]}"#,
            ),
        ];
        let alphabet = "\"\\{}[]:,0123456789-+.eE \n\tnulltruefalseu\u{e9}\u{1f600}".as_bytes();
        // Seeded, so that a failure repeats.
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rand::Rng::random::<u32>(&mut rng) as usize;
        let mut read = 0;
        for round in 0..20_000 {
            let (path, seed) = seeds[round % seeds.len()];
            let mut body = seed.as_bytes().to_vec();
            for _ in 0..1 + next() % 3 {
                let at = next() % (body.len() + 1);
                let byte = alphabet[next() % alphabet.len()];
                match next() % 8 {
                    0 | 1 if at < body.len() => {
                        body.remove(at);
                    }
                    2 | 3 => body.insert(at, byte),
                    4 | 5 if at < body.len() => body[at] = byte,
                    6 => body.truncate(at),
                    _ => {}
                }
            }
            let mut m = RequestMeta::from_head(&http::Method::POST, path, &http::HeaderMap::new());
            if m.read_json_body(&Bytes::from(body)).is_ok() {
                read += 1;
                m.tokens();
                m.session();
                m.completion_reserve(100);
            }
        }
        // Enough of them were read for the lazy parts to have run on mangled text.
        assert!(read > 2_000, "{read} of 20 000 read");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(meta(&deep), Err(ClientError::BadJson { .. })));
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_nesting() {
        let text = format!("{}\\\" {}", "[{".repeat(500), "}]".repeat(500));
        let body =
            serde_json::json!({ "model": "m", "messages": [{ "role": "user", "content": text }] });
        assert!(meta(&body.to_string()).is_ok());
        let nested = format!(
            "{{\"model\":\"m\",\"x\":{}1{}}}",
            "[".repeat(128),
            "]".repeat(128)
        );
        assert!(meta(&nested).is_err(), "129 levels with the outer object");
        let ok = format!(
            "{{\"model\":\"m\",\"x\":{}1{}}}",
            "[".repeat(127),
            "]".repeat(127)
        );
        assert!(meta(&ok).is_ok(), "128 levels");
    }

    #[test]
    fn credentials_are_not_visible() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer sk-secret".parse().unwrap());
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("X-Priority", "7".parse().unwrap());
        h.insert("x-session-id", "s1".parse().unwrap());
        let m = RequestMeta::from_head(&http::Method::POST, "/v1/x", &h);
        assert_eq!(m.header("Authorization"), None);
        assert_eq!(m.header("x-api-key"), None);
        assert_eq!(m.priority, 7);
        assert_eq!(m.session(), Some("s1"));
        // Other headers are found by any case; a name that cannot be a header is absent.
        assert_eq!(m.header("X-SESSION-ID"), Some("s1"));
        assert_eq!(m.header("x-priority"), Some("7"));
        assert_eq!(m.header("not a header"), None);
        // With several values, the first; a value that is not text is absent.
        h.append("x-tag", "one".parse().unwrap());
        h.append("x-tag", "two".parse().unwrap());
        h.insert("x-bytes", http::HeaderValue::from_bytes(b"\xff").unwrap());
        let m = RequestMeta::from_head(&http::Method::POST, "/v1/x", &h);
        assert_eq!(m.header("X-Tag"), Some("one"));
        assert_eq!(m.header("x-bytes"), None);
    }
}
