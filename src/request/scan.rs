//! The routing fields of a JSON request body, read in one pass over its bytes.
//!
//! serde_json read a 1 KiB chat body's fields in ~4.6 k instructions (the whole metadata
//! ~6.7 k), stepping through the prompt's text eight bytes at a time and through generic
//! visitors; this reads the same fields from the bodies clients send in ~2.5 k: a string is skipped
//! with `memchr` (SIMD) and only the fields routing needs are looked at. It handles the
//! usual shapes and nothing else: on anything unusual — any error, a field given twice, an
//! escaped key, a field of another type than expected, deep nesting — it gives up, and
//! [`Fields::parse`] reads the body with serde_json, which also names an error's place. So
//! it may only ever accept valid JSON, and must read from it exactly what serde_json
//! would: the tests compare the two on generated, truncated and mangled bodies.

use std::ops::Range;

use super::Fields;

/// Nesting followed here; deeper bodies are left to serde_json (which refuses them past
/// 127 levels, and `check_depth` past `MAX_JSON_DEPTH`).
const DEPTH: usize = 48;

/// Read the fields of `body` (valid UTF-8) into `f` (empty); `None` when serde_json must
/// read it (`f` is then partly filled).
pub(super) fn read(body: &[u8], f: &mut Fields) -> Option<()> {
    let mut s = Scan { b: body, i: 0 };
    let mut seen = 0;
    s.ws();
    s.object(|s, key| match key {
        b"model" => first(&mut seen, 0, &mut f.model, s.nullable(1)),
        b"stream" => first(&mut seen, 1, &mut f.stream, s.boolean()),
        b"max_tokens" => first(&mut seen, 2, &mut f.max_tokens, s.integer()),
        b"max_completion_tokens" => first(&mut seen, 3, &mut f.max_completion_tokens, s.integer()),
        b"max_output_tokens" => first(&mut seen, 4, &mut f.max_output_tokens, s.integer()),
        b"n" => first(&mut seen, 5, &mut f.n, s.integer()),
        b"prompt" => first(&mut seen, 6, &mut f.prompt, s.nullable(1)),
        b"input" => first(&mut seen, 7, &mut f.input, s.nullable(1)),
        b"system" => first(&mut seen, 8, &mut f.system, s.nullable(1)),
        b"instructions" => first(&mut seen, 9, &mut f.instructions, s.nullable(1)),
        b"tools" => first(&mut seen, 10, &mut f.tools, s.nullable(1)),
        b"functions" => first(&mut seen, 11, &mut f.functions, s.nullable(1)),
        b"messages" => {
            once(&mut seen, 12)?;
            if !s.null() {
                s.array(|s| message(s, f))?;
            }
            Some(())
        }
        b"stream_options" => {
            once(&mut seen, 13)?;
            if !s.null() {
                let mut include_usage = None;
                s.object(|s, key| {
                    if key == b"include_usage" {
                        include_usage.is_none().then_some(())?;
                        include_usage = Some(s.boolean()?);
                    } else {
                        s.skip(2)?;
                    }
                    Some(())
                })?;
                f.include_usage = include_usage.flatten();
            }
            Some(())
        }
        _ => s.skip(1).map(drop),
    })?;
    s.ws();
    (s.i == body.len()).then_some(())
}

/// Mark field `bit` of `seen` as read; `None` if it was already: serde refuses a field
/// given twice.
fn once(seen: &mut u32, bit: u32) -> Option<()> {
    let first = *seen & 1 << bit == 0;
    *seen |= 1 << bit;
    first.then_some(())
}

/// Put a field's value (`None`: not of its type) in `slot`, unless the field came before.
fn first<T>(
    seen: &mut u32,
    bit: u32,
    slot: &mut Option<T>,
    value: Option<Option<T>>,
) -> Option<()> {
    once(seen, bit)?;
    *slot = value?;
    Some(())
}

/// One element of `messages`: an object whose `role` (a string without escapes, or null)
/// and `content` (any value) are read.
fn message(s: &mut Scan<'_>, f: &mut Fields) -> Option<()> {
    let mut role: Option<bool> = None; // Some(whether it is "system") once read
    let mut content: Option<Option<Range<usize>>> = None;
    s.object(|s, key| {
        match key {
            b"role" => {
                role.is_none().then_some(())?;
                role = Some(if s.null() {
                    false
                } else {
                    let (text, escaped) = s.string()?;
                    if escaped {
                        return None;
                    }
                    &s.b[text] == b"system"
                });
            }
            b"content" => {
                content.is_none().then_some(())?;
                content = Some(s.nullable(3)?);
            }
            _ => {
                s.skip(3)?;
            }
        }
        Some(())
    })?;
    f.add_message(role.unwrap_or(false), content.flatten());
    Some(())
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    /// Step over JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn next(&mut self) -> Option<u8> {
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..]
            .starts_with(word)
            .then(|| self.i += word.len())
    }

    /// Step over `null` if it is next.
    fn null(&mut self) -> bool {
        self.literal(b"null").is_some()
    }

    /// An object (`{` next), calling `member` with each key (without escapes) and the
    /// scan at its value, which `member` must step over.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let (key, escaped) = self.string()?;
            if escaped {
                return None;
            }
            self.ws();
            self.eat(b':')?;
            self.ws();
            let b = self.b;
            member(self, &b[key])?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// An array (`[` next), calling `element` with the scan at each element, which
    /// `element` must step over.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            element(self)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A string (`"` next): where its text is (between the quotes), and whether it has
    /// escapes. Checked as serde_json checks a string it skips: no control characters,
    /// escapes well formed (a `\u` escape's code point is not checked).
    fn string(&mut self) -> Option<(Range<usize>, bool)> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            let rest = &self.b[i..];
            let at = memchr::memchr2(b'"', b'\\', rest)?;
            if has_control(&rest[..at]) {
                return None;
            }
            i += at;
            if self.b[i] == b'"' {
                self.i = i + 1;
                return Some((start..i, escaped));
            }
            escaped = true;
            i += match *self.b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
                b'u' if self.b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => 6,
                _ => return None,
            };
        }
    }

    /// A number, checked against JSON's grammar.
    fn number(&mut self) -> Option<()> {
        let digits = |s: &mut Self| {
            let start = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            (s.i > start).then_some(())
        };
        let _ = self.eat(b'-');
        match self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => digits(self)?,
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            digits(self)?;
        }
        Some(())
    }

    /// `true`, `false` or `null`.
    fn boolean(&mut self) -> Option<Option<bool>> {
        match self.b.get(self.i)? {
            b't' => self.literal(b"true").map(|_| Some(true)),
            b'f' => self.literal(b"false").map(|_| Some(false)),
            _ => self.null().then_some(None),
        }
    }

    /// A non-negative integer that fits in 64 bits, or `null`: what serde reads into an
    /// `Option<u64>` without complaint (a fraction or an exponent makes a float, which it
    /// refuses).
    fn integer(&mut self) -> Option<Option<u64>> {
        if self.null() {
            return Some(None);
        }
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(&d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        let leading_zero = digits > 1 && self.b[start] == b'0';
        let float = matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E'));
        (digits > 0 && !leading_zero && !float).then_some(Some(n))
    }

    /// Any value but `null`, as its place in the body (`depth` containers deep); `null`
    /// reads as absent, as serde reads it into an `Option`.
    fn nullable(&mut self, depth: usize) -> Option<Option<Range<usize>>> {
        if self.null() {
            return Some(None);
        }
        self.skip(depth).map(Some)
    }

    /// Step over a value of any kind, `depth` containers deep, checking its syntax; where
    /// it is.
    fn skip(&mut self, depth: usize) -> Option<Range<usize>> {
        let start = self.i;
        // Containers open inside the value, and which of them are objects (bit k: the
        // (k + 1)th).
        let mut open = 0usize;
        let mut objects = 0u64;
        loop {
            // A value starts here.
            match *self.b.get(self.i)? {
                c @ (b'{' | b'[') => {
                    open += 1;
                    if depth + open > DEPTH {
                        return None;
                    }
                    let bit = 1u64 << (open - 1);
                    let object = c == b'{';
                    if object {
                        objects |= bit;
                    } else {
                        objects &= !bit;
                    }
                    self.i += 1;
                    self.ws();
                    if self.eat(if object { b'}' } else { b']' }).is_some() {
                        open -= 1;
                    } else {
                        if object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // After a value: close the containers that end here, or go on to the next
            // element of the innermost.
            loop {
                if open == 0 {
                    return Some(start..self.i);
                }
                self.ws();
                let object = objects & (1u64 << (open - 1)) != 0;
                match self.next()? {
                    b',' => {
                        self.ws();
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if object => open -= 1,
                    b']' if !object => open -= 1,
                    _ => return None,
                }
            }
        }
    }

    /// An object's key and colon, in a value being skipped (any key: serde_json skips
    /// them as it skips strings).
    fn key(&mut self) -> Option<()> {
        self.string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(())
    }
}

/// Whether `s` holds a control character, which a JSON string may not: eight bytes at a
/// time, as serde_json checks (a byte below 0x20 is the only one whose subtraction of
/// 0x20 borrows into its top bit while that bit is clear; bytes above one do not borrow).
fn has_control(s: &[u8]) -> bool {
    const ONES: u64 = u64::MAX / 255;
    let mut words = s.chunks_exact(8);
    let mut found = 0u64;
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        found |= x.wrapping_sub(ONES * 0x20) & !x;
    }
    found & (ONES * 0x80) != 0 || words.remainder().iter().any(|&b| b < 0x20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: &[u8]) -> Option<Fields> {
        let mut f = Fields::default();
        read(body, &mut f).map(|()| f)
    }

    /// Bodies of the usual shapes, which the scan must read itself.
    const USUAL: &[&str] = &[
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#,
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"n":2,
            "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},
            {"role":"assistant","content":null},{"role":"user","content":"again"}]}"#,
        "{\n  \"model\": \"m\",\n  \"messages\": [\n    {\"role\": \"user\", \"content\": \"a \\\"quoted\\\" \\u00e9 \\n word\"}\n  ],\n  \"temperature\": 0.7\n}\n",
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"data:x","detail":"low"}}]}]}"#,
        r#"{"model":"claude","max_tokens":1024,"system":[{"type":"text","text":"sys"}],"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"r"}]}]}]}"#,
        r#"{"model":"m","input":[{"role":"user","content":"x"}],"instructions":"be kind","max_output_tokens":100,"tools":[{"type":"function","name":"f","parameters":{"type":"object","properties":{"a":{"type":"integer","minimum":-1.5e3}}}}]}"#,
        r#"{"model":"m","prompt":[[1,2,3],[4]],"max_tokens":null,"stream":false,"n":null,"functions":[{"name":"g"}]}"#,
        r#"{"model":null,"messages":[],"prompt":"p","input":null,"system":null,"stream_options":null}"#,
        r#"{"model":"m","stream_options":{},"messages":[{"content":"no role"},{"role":null,"content":"x","name":"bob","tool_calls":[{"id":"1","function":{"arguments":"{}"}}]}]}"#,
        r#"{"model":"m","metadata":{"a":[true,false,null,0,-0,1.25,3E+2,4e-1,{"b":[]}]},"logit_bias":{"50256":-100},"user":"\u00e9\ud83d\ude00"}"#,
        r#"  {"model":"日本語モデル","messages":[{"role":"user","content":"こんにちは 👋"}]}  "#,
        r#"{"model":5,"messages":[{"role":"user","content":"m is not a string: refused after"}]}"#,
        r#"{}"#,
    ];

    /// Bodies the scan must leave to serde_json, valid or not.
    const UNUSUAL: &[&str] = &[
        r#"{"model":"a","model":"b"}"#,
        r#"{"messages":[{"role":"user","role":"system"}]}"#,
        r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
        r#"{"mod\u0065l":"m"}"#,
        r#"{"model":"m","messages":[{"role":"sys\u0074em","content":"x"}]}"#,
        r#"{"stream":"true"}"#,
        r#"{"max_tokens":1.0}"#,
        r#"{"max_tokens":1e3}"#,
        r#"{"max_tokens":-1}"#,
        r#"{"max_tokens":012}"#,
        r#"{"max_tokens":18446744073709551616}"#,
        r#"{"messages":{"role":"user"}}"#,
        r#"{"messages":["hi"]}"#,
        r#"{"messages":[{"role":1}]}"#,
        r#"{"stream_options":[true]}"#,
        "{\"model\":\"a\u{1}b\"}",
        "{\"x\":\"tab\there\"}",
        r#"{"x":01}"#,
        r#"{"x":-}"#,
        r#"{"x":1.}"#,
        r#"{"x":1e}"#,
        r#"{"x":nul}"#,
        r#"{"x":tru}"#,
        r#"{"x":"\x"}"#,
        r#"{"x":"\u12G4"}"#,
        r#"{"x":[1,]}"#,
        r#"{"x":{"a":1,}}"#,
        r#"{"x":{"a" 1}}"#,
        r#"{"x":1}}"#,
        r#"{"x":1} x"#,
        r#"["m"]"#,
        r#""m""#,
        "",
        "{",
    ];

    fn deep(levels: usize) -> String {
        format!(
            r#"{{"model":"m","x":{}1{}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    }

    #[test]
    fn reads_the_usual_bodies_as_serde_does() {
        for body in USUAL
            .iter()
            .copied()
            .map(String::from)
            .chain([deep(DEPTH - 1)])
        {
            let scanned = fields(body.as_bytes())
                .unwrap_or_else(|| panic!("the scan left a usual body to serde: {body}"));
            let parsed = Fields::parse(body.as_bytes()).expect("valid");
            assert_eq!(scanned, parsed, "{body}");
        }
        // Read, not only agreed on: a chat's model, stream flag and messages.
        let body = USUAL[1].as_bytes();
        let f = fields(body).unwrap();
        assert_eq!(&body[f.model.clone().unwrap()], br#""m""#);
        assert_eq!(
            (f.stream, f.include_usage, f.max_tokens, f.n),
            (Some(true), Some(true), Some(50), Some(2))
        );
        let texts: Vec<_> = f
            .messages
            .iter()
            .map(|s| (&body[s.text.clone()], s.session))
            .collect();
        assert_eq!(
            texts,
            [
                (&br#""be brief""#[..], true),
                (br#""hi""#, true),
                (br#""again""#, false)
            ]
        );
    }

    #[test]
    fn finds_a_control_character_anywhere() {
        for len in 0..40 {
            for at in 0..len {
                for c in [0x00, 0x01, 0x09, 0x0a, 0x1f] {
                    let mut s = vec![b'a'; len];
                    s[at] = c;
                    assert!(has_control(&s), "{c:#x} at {at} of {len}");
                }
            }
            for other in [0x20, 0x7f, 0x80, 0xc3, 0xff] {
                assert!(!has_control(&vec![other; len]), "{other:#x} x {len}");
            }
        }
    }

    #[test]
    fn leaves_unusual_bodies_to_serde() {
        for body in UNUSUAL
            .iter()
            .copied()
            .map(String::from)
            .chain([deep(DEPTH)])
        {
            assert_eq!(fields(body.as_bytes()), None, "{body}");
        }
    }

    /// Every truncation, byte replaced, byte removed and byte doubled of the usual bodies:
    /// whatever the scan reads, serde_json reads the same.
    #[test]
    fn whatever_it_reads_of_a_mangled_body_serde_reads_the_same() {
        let mut read = 0;
        let mut check = |body: &[u8]| {
            if std::str::from_utf8(body).is_err() {
                return;
            }
            if let Some(scanned) = fields(body) {
                read += 1;
                let parsed = Fields::parse(body);
                assert_eq!(
                    parsed.as_ref().ok(),
                    Some(&scanned),
                    "{}: serde says {parsed:?}",
                    String::from_utf8_lossy(body)
                );
            }
        };
        let replacements = b"\"\\{}[],:0-.eEnt \n\x01au+/";
        for seed in USUAL {
            let seed = seed.as_bytes();
            for i in 0..seed.len() {
                check(&seed[..i]);
                let mut removed = seed.to_vec();
                removed.remove(i);
                check(&removed);
                let mut doubled = seed.to_vec();
                doubled.insert(i, seed[i]);
                check(&doubled);
                for &r in replacements {
                    let mut replaced = seed.to_vec();
                    replaced[i] = r;
                    check(&replaced);
                }
            }
        }
        assert!(
            read > 1000,
            "the scan read only {read} of the mangled bodies"
        );
    }
}
