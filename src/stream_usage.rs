//! Usage for streams whose client did not ask for it.
//!
//! An OpenAI-format stream reports its token usage only when the request says
//! `stream_options: {include_usage: true}`. Accounting and limits need that usage, so
//! Switchyard asks for it upstream when the client did not — and then takes out of the
//! client's stream what the client did not ask for: the final chunk that has no choices and
//! only `usage`, and the `"usage": null` every other chunk then carries. The client sees
//! exactly the stream it would have without Switchyard.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use crate::backends::Backend;
use crate::provider::ApiFormat;
use crate::request::RequestMeta;
use crate::usage::{every_usage_is_null, USAGE_KEY};

/// A partial line longer than this is passed on rather than held back.
const MAX_HELD_BYTES: usize = 64 * 1024;

/// Whether to ask this backend for the usage chunk of this request.
pub fn should_add(meta: &RequestMeta, backend: &Backend) -> bool {
    meta.stream
        && !meta.asked_usage
        && backend.config.stream_usage
        && crate::provider::speaks(backend, ApiFormat::OpenAi)
        // `/v1/chat/completions/` is the same API.
        && meta.path.trim_end_matches('/').ends_with("/completions")
}

/// The body with `stream_options.include_usage` set to true; every other byte is kept.
/// The common case (no `stream_options` at all) is a splice before the closing brace; a
/// body that has `stream_options` gets only that object rewritten in place.
pub fn add_include_usage(body: &Bytes) -> Bytes {
    let trimmed_end = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let splice_at_end = |body: &Bytes| {
        if body.get(trimmed_end) != Some(&b'}') {
            return body.clone();
        }
        let insert = b",\"stream_options\":{\"include_usage\":true}";
        let mut out = BytesMut::with_capacity(body.len() + insert.len());
        out.extend_from_slice(&body[..trimmed_end]);
        out.extend_from_slice(insert);
        out.extend_from_slice(&body[trimmed_end..]);
        out.freeze()
    };
    if memmem::find(body, b"\"stream_options\"").is_none() {
        return splice_at_end(body);
    }
    use serde_json::value::RawValue;
    /// Present, even as `null` (which `Option` alone would read as absent).
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        serde::Deserialize::deserialize(d).map(Some)
    }
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        stream_options: Option<&'a RawValue>,
    }
    let Ok(top) = serde_json::from_slice::<Top>(body) else {
        return body.clone();
    };
    // Only in some nested object: the top level has none.
    let Some(raw) = top.stream_options else {
        return splice_at_end(body);
    };
    let mut options = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get())
        .unwrap_or_default();
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let Ok(options) = serde_json::to_vec(&options) else {
        return body.clone();
    };
    // The raw value borrows from `body`: its place is a pointer difference.
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    let end = start + raw.get().len();
    let mut out = BytesMut::with_capacity(body.len() + options.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&options);
    out.extend_from_slice(&body[end..]);
    out.freeze()
}

/// Takes the usage Switchyard asked for out of an SSE stream, chunk by chunk. Complete
/// lines pass at once; only a line split across chunks is held until its end arrives.
#[derive(Debug, Default)]
pub struct UsageStripper {
    held: Vec<u8>,
    /// The blank line that ended a dropped event is dropped too.
    drop_blank: bool,
    /// The stream ends its lines with a bare CR (SSE allows it): it is passed on as it
    /// comes, rather than held waiting for a line feed that never arrives.
    pass_through: bool,
}

impl UsageStripper {
    /// The chunk as the client gets it.
    pub fn filter(&mut self, chunk: &Bytes) -> Bytes {
        if self.pass_through || chunk.is_empty() {
            // (An empty chunk after a held CR would look like a bare CR line end.)
            return chunk.clone();
        }
        let Some(last_nl) = memchr::memrchr(b'\n', chunk) else {
            // A CR not followed by LF, in this chunk or ending the one before.
            let bare_cr = memchr::memchr_iter(b'\r', chunk)
                .any(|i| chunk.get(i + 1).is_some_and(|&next| next != b'\n'))
                || (self.held.last() == Some(&b'\r') && chunk.first() != Some(&b'\n'));
            if bare_cr || self.held.len() + chunk.len() > MAX_HELD_BYTES {
                self.pass_through = bare_cr;
                let mut out = std::mem::take(&mut self.held);
                out.extend_from_slice(chunk);
                return Bytes::from(out);
            }
            self.held.extend_from_slice(chunk);
            return Bytes::new();
        };
        let (lines, rest) = chunk.split_at(last_nl + 1);
        let untouched = self.held.is_empty() && !self.drop_blank && USAGE_KEY.find(lines).is_none();
        let out = if untouched {
            chunk.slice(..last_nl + 1)
        } else if self.held.is_empty() {
            self.strip(lines)
        } else {
            let mut joined = std::mem::take(&mut self.held);
            joined.extend_from_slice(lines);
            self.strip(&joined)
        };
        self.held.extend_from_slice(rest);
        out
    }

    /// Whatever is still held, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.held))
    }

    fn strip(&mut self, lines: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(lines.len());
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', lines) {
            let line = &lines[start..=end];
            start = end + 1;
            let content = line.trim_ascii_end();
            if content.is_empty() && self.drop_blank {
                self.drop_blank = false;
                continue;
            }
            self.drop_blank = false;
            let Some(data) = content.strip_prefix(b"data:") else {
                out.extend_from_slice(line);
                continue;
            };
            if USAGE_KEY.find(data).is_none() {
                out.extend_from_slice(line);
            } else if !every_usage_is_null(data) && is_usage_only(data) {
                self.drop_blank = true;
            } else {
                remove_null_usage(line, &mut out);
            }
        }
        // `lines` ends with a newline (the caller splits there); anything after is kept.
        out.extend_from_slice(&lines[start..]);
        out.freeze()
    }
}

/// The chunk `include_usage` adds: no choices, a usage object. Anything else, a `usage`
/// that is not an object included, is the backend's own and passes as it is.
fn is_usage_only(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<std::collections::BTreeMap<String, serde::de::IgnoredAny>>,
    }
    serde_json::from_slice::<Chunk>(data.trim_ascii())
        .is_ok_and(|c| c.usage.is_some() && c.choices.is_none_or(|c| c.is_empty()))
}

/// `line` into `out` without its `,"usage":null` (any spacing); a line without it is
/// unchanged.
fn remove_null_usage(line: &[u8], out: &mut BytesMut) {
    let mut rest = line;
    while let Some(at) = USAGE_KEY.find(rest) {
        let after = &rest[at + 7..];
        let after = after.trim_ascii_start();
        let null_end = after
            .strip_prefix(b":")
            .map(<[u8]>::trim_ascii_start)
            .filter(|v| v.starts_with(b"null"))
            .map(|v| rest.len() - v.len() + 4);
        let before = rest[..at].trim_ascii_end();
        match (null_end, before.last()) {
            (Some(end), Some(b',')) => {
                out.extend_from_slice(&before[..before.len() - 1]);
                rest = &rest[end..];
            }
            (Some(end), Some(b'{')) => {
                // First member: drop it and the comma after it.
                out.extend_from_slice(before);
                let tail = rest[end..].trim_ascii_start();
                rest = tail
                    .strip_prefix(b",")
                    .map_or(tail, <[u8]>::trim_ascii_start);
            }
            _ => {
                out.extend_from_slice(&rest[..at + 7]);
                rest = &rest[at + 7..];
            }
        }
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the client gets of `stream` when it comes in `chunks`.
    fn stripped<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut stripper = UsageStripper::default();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&stripper.filter(&Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&stripper.finish());
        out
    }

    #[test]
    fn an_empty_chunk_after_a_held_cr_is_not_a_bare_cr_line_end() {
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5}}\r\n\r";
        let rest = "\ndata: {\"choices\":[{}],\"usage\":null}\r\n\r\ndata: [DONE]\r\n\r\n";
        let out = stripped([usage.as_bytes(), b"", rest.as_bytes()]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"choices\":[{}]}\r\n\r\ndata: [DONE]\r\n\r\n"
        );
    }

    /// However a stream is cut into chunks, the client gets what it would get in one; and a
    /// mangled stream, cut anywhere, is never a crash.
    #[test]
    fn where_a_stream_is_cut_does_not_change_what_the_client_gets() {
        let openai = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"he\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"llo\"}}], \"usage\" : null}\n\n",
            ": a comment\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        let crlf = openai.replace('\n', "\r\n");
        let bare_cr = openai.replace('\n', "\r");
        let streams = [openai.to_string(), crlf, bare_cr];
        // Seeded, so that a failure repeats.
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x2545_F491_4F6C_DD1D);
        let mut next = move || rand::Rng::random::<u32>(&mut rng) as usize;
        for stream in &streams {
            let bytes = stream.as_bytes();
            let whole = stripped([bytes]);
            for _ in 0..2_000 {
                let mut cuts: Vec<usize> =
                    (0..1 + next() % 6).map(|_| next() % bytes.len()).collect();
                cuts.sort_unstable();
                let mut chunks = Vec::new();
                let mut from = 0;
                for cut in cuts.into_iter().chain([bytes.len()]) {
                    chunks.push(&bytes[from..cut]);
                    from = cut;
                }
                assert_eq!(
                    String::from_utf8_lossy(&stripped(chunks.iter().copied())),
                    String::from_utf8_lossy(&whole),
                    "{chunks:?}"
                );
            }
        }
        // The usage Switchyard asked for is out, and the nulls it added.
        let whole = String::from_utf8(stripped([openai.as_bytes()])).unwrap();
        assert!(
            !whole.contains("usage") && whole.ends_with("data: [DONE]\n\n"),
            "{whole}"
        );

        let alphabet = b"data: {}[]\"usage\":null\r\n,";
        for round in 0..5_000 {
            let mut bytes = streams[round % 2].as_bytes().to_vec();
            for _ in 0..1 + next() % 4 {
                let at = next() % bytes.len();
                bytes[at] = alphabet[next() % alphabet.len()];
            }
            let cut = next() % bytes.len();
            stripped([&bytes[..cut], &bytes[cut..]]);
        }
    }

    #[test]
    fn adds_the_option_by_splice_or_by_rewrite() {
        let spliced =
            add_include_usage(&Bytes::from_static(b"{\"model\":\"m\",\"stream\":true}\n"));
        let v: serde_json::Value = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let rewritten = add_include_usage(&Bytes::from_static(
            b"{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":false,\"x\":1}}",
        ));
        let v: serde_json::Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        // Only `stream_options` changes: numbers, escapes and key order stay as sent.
        let body = "{\"seed\":123456789012345678901234,\"top_p\":1e0,\"stream\":true,\
                    \"stream_options\":{\"include_usage\":false},\"messages\":[{\"role\":\"user\",\
                    \"content\":\"caf\\u00e9\"}],\"model\":\"m\"}";
        let rewritten = add_include_usage(&Bytes::from(body));
        assert_eq!(
            std::str::from_utf8(&rewritten).unwrap(),
            body.replace("\"include_usage\":false", "\"include_usage\":true")
        );
        // `null` is replaced, not followed by a second `stream_options`.
        let null = add_include_usage(&Bytes::from_static(
            b"{\"stream_options\":null,\"stream\":true}",
        ));
        assert_eq!(
            &null[..],
            b"{\"stream_options\":{\"include_usage\":true},\"stream\":true}"
        );
        // A `stream_options` nested elsewhere is not the request's: the flag is added.
        let nested = "{\"metadata\":{\"stream_options\":1},\"stream\":true}";
        let v: serde_json::Value =
            serde_json::from_slice(&add_include_usage(&Bytes::from(nested))).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["metadata"]["stream_options"], 1);
    }

    fn strip_all(stream: &str, piece: usize) -> String {
        let mut s = UsageStripper::default();
        let mut out = Vec::new();
        for chunk in stream.as_bytes().chunks(piece) {
            out.extend_from_slice(&s.filter(&Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&s.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_stream_is_what_the_client_would_have_got_without_the_option() {
        let upstream = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
                        data: {\"usage\": null, \"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                        data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
                        data: [DONE]\n\n";
        let expected = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                        data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                        data: [DONE]\n\n";
        for piece in [1, 2, 7, 50, 4096] {
            assert_eq!(strip_all(upstream, piece), expected, "piece {piece}");
        }
    }

    #[test]
    fn a_stream_of_bare_cr_lines_is_passed_on_as_it_comes() {
        let mut s = UsageStripper::default();
        let first = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{}}]}\r\r");
        assert_eq!(s.filter(&first), first, "not held for a line feed");
        let second = Bytes::from_static(b"data: [DONE]\r\r");
        assert_eq!(s.filter(&second), second);
        assert!(s.finish().is_empty());
        // Flushed a line at a time, each CR at a chunk's end: told by the next chunk.
        let mut s = UsageStripper::default();
        assert!(s.filter(&Bytes::from_static(b"data: 1\r")).is_empty());
        assert_eq!(&s.filter(&Bytes::from_static(b"\r"))[..], b"data: 1\r\r");
        assert_eq!(
            &s.filter(&Bytes::from_static(b"data: 2\r"))[..],
            b"data: 2\r"
        );
        // A CRLF stream split between its CR and LF is still read line by line.
        let upstream =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\n\r\ndata: [DONE]\r\n\r\n";
        for piece in [1, 2, 5, 4096] {
            assert_eq!(
                strip_all(upstream, piece),
                "data: [DONE]\r\n\r\n",
                "piece {piece}"
            );
        }
    }

    #[test]
    fn only_events_whose_every_usage_is_null_skip_the_parse() {
        assert!(every_usage_is_null(
            br#"{"usage": null,"x":{"usage" :null},"choices":[]}"#
        ));
        assert!(!every_usage_is_null(
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
        ));
        // `"usage"` as a value is not a key, and is passed over.
        assert!(every_usage_is_null(br#"{"type":"usage","usage":null}"#));
        assert!(!every_usage_is_null(
            br#"{"type":"usage","usage":{"prompt_tokens":1}}"#
        ));
        // A nested null usage does not hide the real one.
        let stream = "data: {\"x\":{\"usage\":null},\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        assert_eq!(strip_all(stream, 4096), "data: [DONE]\n\n");
    }

    #[test]
    fn content_mentioning_usage_is_left_alone() {
        let stream =
            "data: {\"choices\":[{\"delta\":{\"content\":\"the \\\"usage\\\": null field\"}}]}\n\n";
        assert_eq!(strip_all(stream, 4096), stream);
    }
}
