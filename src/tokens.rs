//! Prompt-token estimate for `req.tokens` and tenant token reservations, without a
//! tokenizer: one pass over the text splits it into the pieces a GPT-style pre-tokenizer
//! would (words, 1–3 digit groups, punctuation runs, whitespace runs), counts them by kind,
//! length and script, and weighs the counts with weights fitted to `o200k_base` (GPT-4o).
//!
//! A real BPE (`tiktoken-rs`) is ~100× slower per request and needs tables of ~20 MiB; the
//! measurements behind the choice, and the accuracy per kind of text, are in the README
//! (Performance). The weights are fitted by the ignored test `tokens::tests::fit_weights`
//! on the corpus described there; `estimate_tracks_o200k_per_class` pins the accuracy.

/// Longest word (in letters) with a weight of its own; longer words share the last weight
/// and add [`LONG_LETTERS`] per extra letter.
const WORD_BUCKETS: usize = 16;

// Feature indices. Words are pieces of letters as the pre-tokenizer cuts them (a new piece
// at a lower→upper case change, so `RequestMeta` is two), with an optional one-character
// punctuation or space prefix.
/// ASCII/Latin words of 1..=16 letters: index `WORD + letters - 1`.
const WORD: usize = 0;
/// Letters beyond the 16th in one word (identifiers, base64, hex).
const LONG_LETTERS: usize = WORD + WORD_BUCKETS;
/// Accented and other 2-byte Latin letters (é, ß, ł), also counted in the word's length.
const LATIN_EXT: usize = LONG_LETTERS + 1;
/// Capital letters after a word's first (`HTTP`, `MAX_LEN`): all-caps splits finer.
const CAPS: usize = LATIN_EXT + 1;
/// Letters of words next to a digit (`5feceb66`, `sha256`, `v1beta`): hashes and ids,
/// rarely in the vocabulary.
const ALNUM_LETTERS: usize = CAPS + 1;
/// Cyrillic words and letters.
const CYRILLIC_WORDS: usize = ALNUM_LETTERS + 1;
const CYRILLIC_CHARS: usize = CYRILLIC_WORDS + 1;
/// Other 2-byte alphabets (Greek, Armenian, Hebrew, Arabic): words and letters.
const ALPHA2_WORDS: usize = CYRILLIC_CHARS + 1;
const ALPHA2_CHARS: usize = ALPHA2_WORDS + 1;
/// Han and kana: runs between punctuation, and characters.
const CJK_RUNS: usize = ALPHA2_CHARS + 1;
const CJK_CHARS: usize = CJK_RUNS + 1;
/// Hangul words and syllables.
const HANGUL_WORDS: usize = CJK_CHARS + 1;
const HANGUL_CHARS: usize = HANGUL_WORDS + 1;
/// Other 3-byte scripts (Indic, Thai, Georgian, ...): words and characters.
const OTHER3_WORDS: usize = HANGUL_CHARS + 1;
const OTHER3_CHARS: usize = OTHER3_WORDS + 1;
/// Non-ASCII punctuation and symbols (“ ” — … → ✓, CJK and fullwidth punctuation).
const SYMBOL_CHARS: usize = OTHER3_CHARS + 1;
/// Characters outside the Basic Multilingual Plane: emoji, mostly.
const EMOJI_CHARS: usize = SYMBOL_CHARS + 1;
/// Groups of up to three digits (`2026` is `202` `6`).
const DIGIT_GROUPS: usize = EMOJI_CHARS + 1;
/// A space before digits, a piece of its own.
const SPACE_BEFORE_DIGITS: usize = DIGIT_GROUPS + 1;
/// Runs of punctuation not absorbed into a word, and their ASCII characters.
const PUNCT_RUNS: usize = SPACE_BEFORE_DIGITS + 1;
const PUNCT_CHARS: usize = PUNCT_RUNS + 1;
/// A single punctuation character that prefixes a word: one that joins identifiers and
/// paths (`.len`, `_id`, `/v1`, `-rf`), and any other (`"key`, `(self`).
const JOINER_PREFIX: usize = PUNCT_CHARS + 1;
const PUNCT_PREFIX: usize = JOINER_PREFIX + 1;
/// Line breaks right after punctuation, which join its piece (`{\n`, `;\n`).
const PUNCT_NEWLINE: usize = PUNCT_PREFIX + 1;
/// Runs of spaces or tabs that are pieces of their own (indentation), and their length.
const SPACE_RUNS: usize = PUNCT_NEWLINE + 1;
const SPACE_CHARS: usize = SPACE_RUNS + 1;
/// Line-break runs (with the spaces before them), and their line breaks.
const NEWLINE_RUNS: usize = SPACE_CHARS + 1;
const NEWLINE_CHARS: usize = NEWLINE_RUNS + 1;
/// Number of features.
const FEATURES: usize = NEWLINE_CHARS + 1;

/// Tokens per feature, fitted to `o200k_base` by `tokens::tests::fit_weights`.
#[rustfmt::skip]
const WEIGHTS: [f64; FEATURES] = [
    0.8611, // 1-letter word
    0.8611, // 2-letter word
    0.8611, // 3-letter word
    0.9347, // 4-letter word
    1.0082, // 5-letter word
    1.0817, // 6-letter word
    1.2844, // 7-letter word
    1.4870, // 8-letter word
    1.6897, // 9-letter word
    1.8924, // 10-letter word
    2.0951, // 11-letter word
    2.2977, // 12-letter word
    2.5004, // 13-letter word
    2.7031, // 14-letter word
    2.9057, // 15-letter word
    3.1084, // 16-letter word
    0.2027, // letters beyond 16
    1.0317, // accented latin
    0.2002, // capitals after the first
    0.2259, // letters of words next to digits
    0.7883, // cyrillic words
    0.1276, // cyrillic letters
    1.9564, // greek/hebrew/arabic words
    0.0571, // greek/hebrew/arabic letters
    0.0000, // han/kana runs
    0.6896, // han/kana characters
    2.1852, // hangul words
    0.0000, // hangul syllables
    0.0000, // indic/thai words
    0.3552, // indic/thai characters
    0.9441, // non-ASCII symbols
    1.7324, // emoji
    1.0196, // digit groups
    1.1170, // spaces before digits
    0.8832, // punctuation runs
    0.0953, // punctuation characters
    0.1670, // joiner prefixes (_ . / - : @ $ #)
    1.0402, // other punctuation prefixes
    0.0000, // line breaks after punctuation
    0.7774, // space runs
    0.0097, // spaces in runs
    0.0000, // line-break runs
    0.9861, // line breaks
];

/// What a byte starts (or continues) as far as the piece splitter cares.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Lower,
    Upper,
    Digit,
    /// Space, tab, vertical tab, form feed.
    Space,
    /// `\r` or `\n`.
    Newline,
    /// ASCII punctuation and symbols, and control characters.
    Punct,
    /// A UTF-8 continuation byte: part of the character before it.
    Cont,
    /// U+00C0..U+033F: Latin letters with accents, IPA, combining marks.
    Latin,
    /// U+0400..U+052F.
    Cyrillic,
    /// U+0340..U+03FF and U+0530..U+07FF: Greek, Armenian, Hebrew, Arabic, ...
    Alpha2,
    /// U+0080..U+00BF, U+2000..U+2FFF, U+3000..U+303F, U+F000..U+FFFF: punctuation and
    /// symbols (the U+3000 block is told apart from Han by its second byte).
    Symbol,
    /// U+3040..U+9FFF: kana and Han.
    Cjk,
    /// U+A000..U+DFFF: Hangul syllables, mostly.
    Hangul,
    /// U+0800..U+1FFF and U+E000..U+EFFF: Indic, Thai, Georgian, ...
    Other3,
    /// A 4-byte character: emoji, mostly.
    Emoji,
}

const fn class_of(b: u8) -> Class {
    match b {
        b'a'..=b'z' => Class::Lower,
        b'A'..=b'Z' => Class::Upper,
        b'0'..=b'9' => Class::Digit,
        b' ' | b'\t' | 0x0b | 0x0c => Class::Space,
        b'\r' | b'\n' => Class::Newline,
        0x00..=0x7f => Class::Punct,
        0x80..=0xbf => Class::Cont,
        0xc2 => Class::Symbol,
        0xc3..=0xcc => Class::Latin,
        0xcd..=0xcf => Class::Alpha2,
        0xd0..=0xd4 => Class::Cyrillic,
        0xd5..=0xdf => Class::Alpha2,
        0xe0 | 0xe1 | 0xee => Class::Other3,
        0xe2 | 0xef => Class::Symbol,
        0xe3..=0xe9 => Class::Cjk,
        0xea..=0xed => Class::Hangul,
        0xf0..=0xff => Class::Emoji,
        _ => Class::Punct, // 0xc0, 0xc1: never in a &str
    }
}

static CLASSES: [Class; 256] = {
    let mut t = [Class::Punct; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = class_of(i as u8);
        i += 1;
    }
    t
};

/// The class of the character starting at `i` (a lead byte): the CJK symbols and
/// punctuation block (U+3000..U+303F: `。`, `、`, `「`) shares its lead byte with kana.
#[inline]
fn class_at(b: &[u8], i: usize) -> Class {
    let c = CLASSES[b[i] as usize];
    if c == Class::Cjk && b[i] == 0xe3 && b.get(i + 1) == Some(&0x80) {
        Class::Symbol
    } else {
        c
    }
}

#[inline]
fn is_letter(c: Class) -> bool {
    matches!(
        c,
        Class::Lower
            | Class::Upper
            | Class::Latin
            | Class::Cyrillic
            | Class::Alpha2
            | Class::Cjk
            | Class::Hangul
            | Class::Other3
    )
}

/// Prompt-token estimate accumulated over the pieces of text of one request.
#[derive(Debug, Clone)]
pub struct TokenEstimate {
    counts: [u64; FEATURES],
}

impl Default for TokenEstimate {
    fn default() -> TokenEstimate {
        TokenEstimate {
            counts: [0; FEATURES],
        }
    }
}

impl TokenEstimate {
    /// Count one piece of prompt text (a message, a content part, a prompt string).
    pub fn add(&mut self, text: &str) {
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            i = match class_at(b, i) {
                Class::Digit => self.digits(b, i),
                Class::Space => self.spaces(b, i),
                Class::Newline => self.newlines(b, i),
                Class::Punct | Class::Symbol | Class::Emoji => self.punctuation(b, i),
                Class::Cont => i + 1, // not reached: every piece ends on a character boundary
                _ => self.word(b, i),
            };
        }
    }

    /// The estimate so far, rounded up: at least 1 once any text was added.
    pub fn tokens(&self) -> u64 {
        let sum: f64 = self
            .counts
            .iter()
            .zip(WEIGHTS)
            .map(|(&n, w)| n as f64 * w)
            .sum();
        sum.ceil() as u64
    }

    /// A word piece from `i`: letters of any script, split at a lower→upper case change.
    fn word(&mut self, b: &[u8], mut i: usize) -> usize {
        let after_digit = i > 0 && b[i - 1].is_ascii_digit();
        let (mut latin, mut latin_ext, mut caps) = (0u64, 0u64, 0u64);
        let (mut cyrillic, mut alpha2, mut cjk, mut hangul, mut other3) = (0, 0, 0, 0, 0);
        let mut seen_lower = false;
        while i < b.len() {
            match CLASSES[b[i] as usize] {
                Class::Lower => {
                    seen_lower = true;
                    latin += 1;
                }
                Class::Upper => {
                    if seen_lower {
                        break;
                    }
                    caps += u64::from(latin > 0);
                    latin += 1;
                }
                Class::Latin => {
                    latin += 1;
                    latin_ext += 1;
                }
                Class::Cyrillic => cyrillic += 1,
                Class::Alpha2 => alpha2 += 1,
                Class::Cjk if b[i] == 0xe3 && b.get(i + 1) == Some(&0x80) => break,
                Class::Cjk => cjk += 1,
                Class::Hangul => hangul += 1,
                Class::Other3 => other3 += 1,
                Class::Cont => {}
                _ => break,
            }
            i += 1;
        }
        let c = &mut self.counts;
        if latin > 0 {
            let len = latin.min(WORD_BUCKETS as u64) as usize;
            c[WORD + len - 1] += 1;
            c[LONG_LETTERS] += latin - len as u64;
            c[LATIN_EXT] += latin_ext;
            c[CAPS] += caps;
            if after_digit || b.get(i).is_some_and(u8::is_ascii_digit) {
                c[ALNUM_LETTERS] += latin;
            }
        }
        for (chars, words, n) in [
            (CYRILLIC_CHARS, CYRILLIC_WORDS, cyrillic),
            (ALPHA2_CHARS, ALPHA2_WORDS, alpha2),
            (CJK_CHARS, CJK_RUNS, cjk),
            (HANGUL_CHARS, HANGUL_WORDS, hangul),
            (OTHER3_CHARS, OTHER3_WORDS, other3),
        ] {
            c[chars] += n;
            c[words] += u64::from(n > 0);
        }
        i
    }

    /// Digits from `i`, in groups of up to three.
    fn digits(&mut self, b: &[u8], i: usize) -> usize {
        let end = run_end(b, i, |c| c == Class::Digit);
        self.counts[DIGIT_GROUPS] += (end - i).div_ceil(3) as u64;
        end
    }

    /// Spaces from `i`. The last space joins a following word or punctuation run; the rest
    /// is a piece of its own. Before digits the last space is a piece too; before a line
    /// break the spaces belong to the line-break run.
    fn spaces(&mut self, b: &[u8], i: usize) -> usize {
        let end = run_end(b, i, |c| c == Class::Space);
        let len = (end - i) as u64;
        let c = &mut self.counts;
        match b.get(end).map(|_| class_at(b, end)) {
            Some(Class::Newline) => return self.newlines(b, i),
            None => {
                c[SPACE_RUNS] += 1;
                c[SPACE_CHARS] += len;
            }
            Some(next) => {
                if len > 1 {
                    c[SPACE_RUNS] += 1;
                    c[SPACE_CHARS] += len - 1;
                }
                c[SPACE_BEFORE_DIGITS] += u64::from(next == Class::Digit);
            }
        }
        end
    }

    /// Whitespace from `i` up to and including its last line break: one piece.
    fn newlines(&mut self, b: &[u8], i: usize) -> usize {
        let mut last_break = i;
        let mut breaks = 0;
        let mut j = i;
        while j < b.len() {
            match CLASSES[b[j] as usize] {
                Class::Newline => {
                    last_break = j;
                    breaks += 1;
                }
                Class::Space => {}
                _ => break,
            }
            j += 1;
        }
        self.counts[NEWLINE_RUNS] += 1;
        self.counts[NEWLINE_CHARS] += breaks;
        last_break + 1
    }

    /// Punctuation, symbols and emoji from `i`, with the line breaks right after them. A
    /// single character before a letter is the word's prefix instead.
    fn punctuation(&mut self, b: &[u8], mut i: usize) -> usize {
        let (mut ascii, mut symbols, mut emoji) = (0u64, 0u64, 0u64);
        let start = i;
        while i < b.len() {
            match class_at(b, i) {
                Class::Punct => ascii += 1,
                Class::Symbol => symbols += 1,
                Class::Emoji => emoji += 1,
                Class::Cont => {}
                _ => break,
            }
            i += 1;
        }
        let c = &mut self.counts;
        c[SYMBOL_CHARS] += symbols;
        c[EMOJI_CHARS] += emoji;
        let next_is_letter = b.get(i).is_some_and(|_| is_letter(class_at(b, i)));
        if ascii + symbols + emoji == 1 && next_is_letter && i - start == 1 {
            let joiner = matches!(
                b[start],
                b'_' | b'.' | b'/' | b'-' | b':' | b'@' | b'$' | b'#'
            );
            c[if joiner { JOINER_PREFIX } else { PUNCT_PREFIX }] += 1;
            return i;
        }
        c[PUNCT_RUNS] += 1;
        c[PUNCT_CHARS] += ascii;
        let end = run_end(b, i, |c| c == Class::Newline);
        c[PUNCT_NEWLINE] += u64::from(end > i);
        end
    }
}

/// The end of the run from `i` of bytes whose class passes `keep`.
#[inline]
fn run_end(b: &[u8], mut i: usize, keep: impl Fn(Class) -> bool) -> usize {
    while i < b.len() && keep(CLASSES[b[i] as usize]) {
        i += 1;
    }
    i
}

/// The estimate for one text.
pub fn estimate(text: &str) -> u64 {
    let mut e = TokenEstimate::default();
    e.add(text);
    e.tokens()
}

#[cfg(test)]
mod tests {
    //! The corpus: this repository's README (prose), Rust and Lua sources (code), YAML and
    //! JSON files (config), and `tests/data/tokens/` — English prose, numbers, hashes and
    //! base64, a JSON request, ten European languages, Hindi, Chinese, Japanese, Korean
    //! and emoji.
    use super::*;
    use std::path::{Path, PathBuf};

    /// One file of the corpus, cut into chunks of at least [`CHUNK_BYTES`] at line breaks.
    struct Sample {
        class: &'static str,
        file: String,
        counts: [u64; FEATURES],
        o200k: usize,
        cl100k: usize,
        chars: usize,
        chunk: usize,
    }

    const CHUNK_BYTES: usize = 512;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn files_under(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                files_under(&p, exts, out);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
            {
                out.push(p);
            }
        }
    }

    fn class_of_fixture(name: &str) -> &'static str {
        match name {
            "en-prose.txt" => "prose",
            "numbers.csv" | "access.log" => "numbers",
            "tools.json" => "config",
            "zh.txt" | "ja.txt" | "ko.txt" => "cjk",
            "emoji.txt" | "emoji-2.txt" => "emoji",
            "hi.txt" => "other-script",
            "ids.txt" => "ids",
            _ => "european",
        }
    }

    fn corpus() -> Vec<(&'static str, String, String)> {
        let r = root();
        let mut out = Vec::new();
        let mut add = |class: &'static str, paths: Vec<PathBuf>| {
            for p in paths {
                let text = std::fs::read_to_string(&p).expect("corpus file is UTF-8");
                let name = p.strip_prefix(&r).unwrap_or(&p).display().to_string();
                out.push((class, name, text));
            }
        };
        add("prose", vec![r.join("README.md")]);
        let mut code = Vec::new();
        files_under(&r.join("src"), &["rs"], &mut code);
        files_under(&r.join("policies"), &["lua"], &mut code);
        add("code", code);
        let mut config = Vec::new();
        files_under(&r.join("conf"), &["yaml", "yml", "json"], &mut config);
        files_under(&r.join("docker"), &["yaml", "yml"], &mut config);
        add("config", config);
        let mut fixtures = Vec::new();
        files_under(
            &r.join("tests/data/tokens"),
            &["txt", "csv", "log", "json"],
            &mut fixtures,
        );
        for p in fixtures {
            let name = p.file_name().and_then(|n| n.to_str()).expect("file name");
            add(class_of_fixture(name), vec![p.clone()]);
        }
        out
    }

    fn chunks(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + CHUNK_BYTES).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let end = text[end..].find('\n').map_or(text.len(), |n| end + n + 1);
            // A short tail joins the chunk before it.
            let end = if text.len() - end < CHUNK_BYTES / 2 {
                text.len()
            } else {
                end
            };
            out.push(&text[start..end]);
            start = end;
        }
        out
    }

    fn samples() -> Vec<Sample> {
        let o200k = tiktoken_rs::o200k_base_singleton();
        let cl100k = tiktoken_rs::cl100k_base_singleton();
        let mut out = Vec::new();
        for (class, file, text) in corpus() {
            for (chunk, t) in chunks(&text).into_iter().enumerate() {
                let mut e = TokenEstimate::default();
                e.add(t);
                out.push(Sample {
                    class,
                    file: file.clone(),
                    counts: e.counts,
                    o200k: o200k.encode_ordinary(t).len(),
                    cl100k: cl100k.encode_ordinary(t).len(),
                    chars: t.chars().count(),
                    chunk,
                });
            }
        }
        out
    }

    fn dot(counts: &[u64; FEATURES], w: &[f64; FEATURES]) -> f64 {
        counts.iter().zip(w).map(|(&n, w)| n as f64 * w).sum()
    }

    /// Accuracy of `estimate` over one class: the ratio estimate / true tokens for the
    /// whole class, and the lowest and highest ratio of a file and of a chunk.
    #[derive(Debug)]
    struct Accuracy {
        total: f64,
        file_mean: f64,
        file_min: (f64, String),
        file_max: (f64, String),
        chunk_min: f64,
        chunk_max: f64,
        tokens: usize,
        files: usize,
    }

    fn accuracy(
        samples: &[&Sample],
        estimate: impl Fn(&Sample) -> f64,
        truth: impl Fn(&Sample) -> usize,
    ) -> Accuracy {
        let mut by_file: Vec<(String, f64, usize)> = Vec::new();
        let (mut chunk_min, mut chunk_max) = (f64::MAX, 0f64);
        for s in samples {
            let (e, t) = (estimate(s), truth(s));
            let r = e / t.max(1) as f64;
            chunk_min = chunk_min.min(r);
            chunk_max = chunk_max.max(r);
            match by_file.last_mut() {
                Some(f) if f.0 == s.file => {
                    f.1 += e;
                    f.2 += t;
                }
                _ => by_file.push((s.file.clone(), e, t)),
            }
        }
        let ratios: Vec<(f64, String)> = by_file
            .iter()
            .map(|(f, e, t)| (e / (*t).max(1) as f64, f.clone()))
            .collect();
        let est: f64 = by_file.iter().map(|f| f.1).sum();
        let tokens: usize = by_file.iter().map(|f| f.2).sum();
        let by = |a: &&(f64, String), b: &&(f64, String)| a.0.total_cmp(&b.0);
        Accuracy {
            total: est / tokens.max(1) as f64,
            file_mean: ratios.iter().map(|r| r.0).sum::<f64>() / ratios.len() as f64,
            file_min: ratios.iter().min_by(by).cloned().expect("a file"),
            file_max: ratios.iter().max_by(by).cloned().expect("a file"),
            chunk_min,
            chunk_max,
            tokens,
            files: ratios.len(),
        }
    }

    const CLASSES_IN_ORDER: [&str; 9] = [
        "prose",
        "code",
        "config",
        "numbers",
        "ids",
        "european",
        "cjk",
        "other-script",
        "emoji",
    ];

    fn of_class<'a>(samples: &'a [Sample], class: &str) -> Vec<&'a Sample> {
        samples.iter().filter(|s| s.class == class).collect()
    }

    /// The committed weights keep the estimate, per class of text, within this share of
    /// `o200k_base`'s count for the whole class and for every file: (class, whole, file).
    /// With the weights fitted on 2026-11-22 the classes were within 2 % and the files
    /// within 5 % (numbers, ids, CJK, emoji), 7 % (prose, code, config) and 16 %
    /// (European languages: Italian is under-counted, French over); the margins leave
    /// room for the repository's own files to change. Characters / 4 fails most classes.
    const TOLERANCE: [(&str, f64, f64); 9] = [
        ("prose", 0.05, 0.10),
        ("code", 0.05, 0.15),
        ("config", 0.05, 0.15),
        ("numbers", 0.05, 0.05),
        ("ids", 0.05, 0.05),
        ("european", 0.05, 0.20),
        ("cjk", 0.05, 0.10),
        ("other-script", 0.05, 0.10),
        ("emoji", 0.05, 0.10),
    ];

    #[test]
    fn estimate_tracks_o200k_per_class() {
        let samples = samples();
        let mut failures = Vec::new();
        for (class, total, file) in TOLERANCE {
            let a = accuracy(
                &of_class(&samples, class),
                |s| dot(&s.counts, &WEIGHTS),
                |s| s.o200k,
            );
            assert!(a.files > 0, "no {class} files in the corpus");
            if (a.total - 1.0).abs() > total {
                failures.push(format!("{class}: whole class at {:.3}", a.total));
            }
            for (r, f) in [&a.file_min, &a.file_max] {
                if (r - 1.0).abs() > file {
                    failures.push(format!("{class}: {f} at {r:.3}"));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "estimate / o200k out of tolerance:\n{}",
            failures.join("\n")
        );
    }

    fn feature_name(i: usize) -> String {
        if i < LONG_LETTERS {
            return format!("{}-letter word", i + 1);
        }
        [
            "letters beyond 16",
            "accented latin",
            "capitals after the first",
            "letters of words next to digits",
            "cyrillic words",
            "cyrillic letters",
            "greek/hebrew/arabic words",
            "greek/hebrew/arabic letters",
            "han/kana runs",
            "han/kana characters",
            "hangul words",
            "hangul syllables",
            "indic/thai words",
            "indic/thai characters",
            "non-ASCII symbols",
            "emoji",
            "digit groups",
            "spaces before digits",
            "punctuation runs",
            "punctuation characters",
            "joiner prefixes (_ . / - : @ $ #)",
            "other punctuation prefixes",
            "line breaks after punctuation",
            "space runs",
            "spaces in runs",
            "line-break runs",
            "line breaks",
        ][i - LONG_LETTERS]
            .to_string()
    }

    /// Word lengths past which each extra letter may cost more: the cost of a word is
    /// fitted as `a + Σ b_k · max(0, letters − KNOTS[k])` with every `b_k` ≥ 0, so longer
    /// words never cost less, instead of one free weight per length (which overfits).
    const KNOTS: [u64; 4] = [3, 6, 9, 12];

    /// The fitted model's columns: word count, the hinges, then the other features.
    fn design(counts: &[u64; FEATURES]) -> Vec<f64> {
        let mut row = Vec::with_capacity(1 + KNOTS.len() + FEATURES - LATIN_EXT);
        row.push(counts[WORD..LONG_LETTERS].iter().sum::<u64>() as f64);
        for knot in KNOTS {
            let hinge: u64 = (1..=WORD_BUCKETS as u64)
                .map(|len| counts[WORD + len as usize - 1] * len.saturating_sub(knot))
                .sum();
            row.push((hinge + counts[LONG_LETTERS]) as f64);
        }
        row.extend(counts[LATIN_EXT..].iter().map(|&n| n as f64));
        row
    }

    /// Weights per feature from the fitted model's coefficients.
    fn expand(beta: &[f64]) -> [f64; FEATURES] {
        let mut w = [0f64; FEATURES];
        for len in 1..=WORD_BUCKETS as u64 {
            w[WORD + len as usize - 1] = beta[0]
                + KNOTS
                    .iter()
                    .zip(&beta[1..])
                    .map(|(&k, b)| b * len.saturating_sub(k) as f64)
                    .sum::<f64>();
        }
        w[LONG_LETTERS] = beta[1..=KNOTS.len()].iter().sum();
        w[LATIN_EXT..].copy_from_slice(&beta[1 + KNOTS.len()..]);
        w
    }

    /// Weighted least squares on relative error, every class weighing the same, weights
    /// kept non-negative (a column whose weight would go negative is dropped and the rest
    /// refitted).
    fn fit(samples: &[&Sample]) -> [f64; FEATURES] {
        let mut per_class = std::collections::HashMap::new();
        for s in samples {
            *per_class.entry(s.class).or_insert(0usize) += 1;
        }
        let rows: Vec<Vec<f64>> = samples.iter().map(|s| design(&s.counts)).collect();
        let columns = rows[0].len();
        let mut active: Vec<usize> = (0..columns)
            .filter(|&j| rows.iter().any(|r| r[j] > 0.0))
            .collect();
        loop {
            let n = active.len();
            let mut a = vec![vec![0f64; n + 1]; n];
            for (s, x) in samples.iter().zip(&rows) {
                let w = 1.0 / (s.o200k.max(1) as f64 * (per_class[s.class] as f64).sqrt());
                let w2 = w * w;
                for (r, &j) in active.iter().enumerate() {
                    for (c, &k) in active.iter().enumerate() {
                        a[r][c] += w2 * x[j] * x[k];
                    }
                    a[r][n] += w2 * x[j] * s.o200k as f64;
                }
            }
            for (r, row) in a.iter_mut().enumerate() {
                row[r] *= 1.0 + 1e-9; // keeps nearly collinear columns solvable
            }
            let beta = solve(a);
            match (0..n).min_by(|&x, &y| beta[x].total_cmp(&beta[y])) {
                Some(r) if beta[r] < 0.0 => {
                    active.remove(r);
                }
                _ => {
                    let mut full = vec![0f64; columns];
                    for (r, &j) in active.iter().enumerate() {
                        full[j] = beta[r];
                    }
                    return expand(&full);
                }
            }
        }
    }

    /// Gaussian elimination with partial pivoting on an augmented matrix.
    fn solve(mut a: Vec<Vec<f64>>) -> Vec<f64> {
        let n = a.len();
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
                .expect("rows");
            a.swap(col, pivot);
            let p = a[col][col];
            assert!(p.abs() > 1e-300, "singular system at feature column {col}");
            for row in col + 1..n {
                let f = a[row][col] / p;
                for k in col..=n {
                    a[row][k] -= f * a[col][k];
                }
            }
        }
        let mut x = vec![0f64; n];
        for row in (0..n).rev() {
            let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
            x[row] = (a[row][n] - s) / a[row][row];
        }
        x
    }

    fn report(title: &str, samples: &[Sample], estimate: impl Fn(&Sample) -> f64 + Copy) {
        println!("\n{title}");
        println!(
            "{:<13} {:>5} {:>7} | {:>6} {:>6} {:>13} | {:>6} {:>13} | {:>6} {:>13}",
            "class",
            "files",
            "tokens",
            "o200k",
            "mean",
            "file min-max",
            "cl100k",
            "file min-max",
            "chars/4",
            "file min-max"
        );
        for class in CLASSES_IN_ORDER {
            let s = of_class(samples, class);
            let o = accuracy(&s, estimate, |s| s.o200k);
            let c = accuracy(&s, estimate, |s| s.cl100k);
            let q = accuracy(&s, |s| s.chars as f64 / 4.0, |s| s.o200k);
            println!(
                "{class:<13} {:>5} {:>7} | {:>6.3} {:>6.3} {:>6.3}-{:<6.3} | {:>6.3} {:>6.3}-{:<6.3} | {:>6.3} {:>6.3}-{:<6.3}",
                o.files,
                o.tokens,
                o.total,
                o.file_mean,
                o.file_min.0,
                o.file_max.0,
                c.total,
                c.file_min.0,
                c.file_max.0,
                q.total,
                q.file_min.0,
                q.file_max.0,
            );
            println!(
                "{:<13} chunks {:.3}-{:.3}; lowest file {}, highest {}",
                "", o.chunk_min, o.chunk_max, o.file_min.1, o.file_max.1
            );
        }
    }

    /// Fits the weights and prints them, with the accuracy per class (in-sample, and on
    /// held-out chunks for a fit on the other half). Paste the array into [`WEIGHTS`]:
    /// `cargo test --release --lib tokens::tests::fit_weights -- --ignored --nocapture`
    #[test]
    #[ignore = "a tool: prints weights to paste, asserts nothing"]
    fn fit_weights() {
        let samples = samples();
        // Honesty check first: fit on even chunks, measure on odd ones.
        let even: Vec<&Sample> = samples.iter().filter(|s| s.chunk % 2 == 0).collect();
        let half = fit(&even);
        let odd: Vec<Sample> = samples
            .iter()
            .filter(|s| s.chunk % 2 == 1)
            .map(|s| Sample {
                class: s.class,
                file: s.file.clone(),
                ..*s
            })
            .collect();
        report(
            "fitted on even chunks, measured on odd chunks (held out):",
            &odd,
            |s| dot(&s.counts, &half),
        );

        let all: Vec<&Sample> = samples.iter().collect();
        let w = fit(&all);
        report("fitted on everything, in-sample:", &samples, |s| {
            dot(&s.counts, &w)
        });
        report("committed WEIGHTS:", &samples, |s| dot(&s.counts, &WEIGHTS));
        println!("\nconst WEIGHTS: [f64; FEATURES] = [");
        for (i, w) in w.iter().enumerate() {
            println!("    {w:.4}, // {}", feature_name(i));
        }
        println!("];");
    }
}
