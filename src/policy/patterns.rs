//! Lua's pattern functions (`string.find`, `match`, `gmatch`, `gsub`) under the policy's
//! instruction budget.
//!
//! Lua's own matcher backtracks in C, where the count hook never runs: `string.find` of
//! `("a?"):rep(28) .. ("a"):rep(28)` over 28 `a`s tries 2^28 ways, and held a worker
//! thread for minutes with the budget armed. This is the same algorithm as Lua 5.4.9's
//! `lstrlib.c`, with the same results and error messages (only an error in a tail call,
//! `return s:match(p)`, names no place: the caller's frame is gone by then), except that
//! every step of the match counts against the budget once the watchdog has armed it
//! ([`budget::spend_tick`]), so a runaway pattern is stopped like a runaway loop. The
//! output of `gsub`, built outside Lua's allocator, is held to the VM's memory cap.
//! One difference stays: an error raised inside a `gsub` replacement function reaches a
//! `pcall` around the `gsub` as mlua's error value, not as the value raised.

use std::cell::Cell;

use mlua::{Function, Lua, LuaString, MultiValue, Table, Value};

use super::budget;

/// Captures one match may hold (`LUA_MAXCAPTURES`).
const MAX_CAPTURES: usize = 32;
/// Nesting of the matcher's recursion (`MAXCCALLS`).
const MAX_DEPTH: u32 = 200;
/// Bytes that make a pattern more than a plain string (`SPECIALS`).
const SPECIALS: &[u8] = b"^$*+?.([%-";
const ESC: u8 = b'%';

/// The Lua side of the functions: the Rust ones return `FAIL, message` for an error Lua's
/// own would raise, and it is raised here, so that `pcall` gets the message as a string,
/// as it would from Lua's (an error mlua raises from Rust reaches Lua as userdata).
const RAISE: &str = r#"
local string, fail, find, match, gmatch, gsub = ...
local error = error
local function raise(...)
  if (...) == fail then error(select(2, ...), 0) end
  return ...
end
string.find = function(...) return raise(find(...)) end
string.match = function(...) return raise(match(...)) end
string.gsub = function(...) return raise(gsub(...)) end
string.gmatch = function(...)
  local next = raise(gmatch(...))
  return function() return raise(next()) end
end
"#;

/// Put the budgeted pattern functions in the string library `string` (the real one, which
/// strings index for method calls). `memory_cap` is the VM's memory limit.
pub(super) fn install(lua: &Lua, string: &Table, memory_cap: usize) -> mlua::Result<()> {
    let fail = lua.create_table()?;
    lua.set_named_registry_value(FAIL, &fail)?;
    let find =
        lua.create_function(|lua, args: MultiValue| raising(lua, find_aux(lua, &args, true)))?;
    let matches =
        lua.create_function(|lua, args: MultiValue| raising(lua, find_aux(lua, &args, false)))?;
    let gmatch = lua.create_function(|lua, args: MultiValue| {
        raising(
            lua,
            gmatch(lua, args).map(|f| MultiValue::from_vec(vec![Value::Function(f)])),
        )
    })?;
    let gsub = lua
        .create_function(move |lua, args: MultiValue| raising(lua, gsub(lua, &args, memory_cap)))?;
    lua.load(RAISE)
        .set_name("=[string]")
        .call::<()>((string, fail, find, matches, gmatch, gsub))
}

/// Registry key of the value that marks an error to raise in [`RAISE`].
const FAIL: &str = "switchyard.patterns.fail";

/// An error as Lua's string library raises it: a message, with the place of the policy
/// code that called the function when it has one.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A call's result for [`RAISE`]: a [`Raised`] error becomes `FAIL, message`; any other
/// error (the budget, the memory cap, one from a `gsub` replacement function) stays one.
fn raising(lua: &Lua, result: mlua::Result<MultiValue>) -> mlua::Result<MultiValue> {
    match result {
        Err(mlua::Error::ExternalError(e)) if e.downcast_ref::<Raised>().is_some() => {
            let fail = lua.named_registry_value::<Table>(FAIL)?;
            Ok(MultiValue::from_vec(vec![
                Value::Table(fail),
                Value::String(lua.create_string(e.to_string())?),
            ]))
        }
        other => other,
    }
}

/// Why a match stopped short.
#[derive(Debug)]
enum Stop {
    /// A malformed pattern or replacement, with Lua's message.
    Error(String),
    /// The call's instruction budget is spent.
    Budget,
}

impl Stop {
    fn into_lua(self, lua: &Lua) -> mlua::Error {
        match self {
            Stop::Error(msg) => located(lua, msg),
            Stop::Budget => mlua::Error::runtime("instruction budget exceeded"),
        }
    }
}

/// An error raised as `luaL_error` raises it: with the place of the Lua code that called
/// the string function (two levels up: above the function of [`RAISE`] it was called
/// through), when it has one. A tail call (`return s:match(p)`) left no such place.
fn located(lua: &Lua, msg: impl std::fmt::Display) -> mlua::Error {
    let tail_call = lua.inspect_stack(1, |d| d.is_tail_call()).unwrap_or(true);
    let place = match tail_call {
        true => None,
        false => lua
            .inspect_stack(2, |d| {
                let line = d.current_line()?;
                Some(format!("{}:{line}: ", d.source().short_src?))
            })
            .flatten(),
    };
    let msg = format!("{}{msg}", place.unwrap_or_default());
    mlua::Error::external(Raised(msg))
}

fn error<T>(msg: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::Error(msg.into()))
}

#[derive(Clone, Copy, PartialEq)]
enum Capture {
    Unfinished,
    Position,
    Len(usize),
}

/// `MatchState`: one subject, one pattern, the captures of the match being tried.
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: u32,
    level: usize,
    captures: [(usize, Capture); MAX_CAPTURES],
    /// Steps until the next tick is spent.
    steps: u32,
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8]) -> Matcher<'a> {
        Matcher {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            captures: [(0, Capture::Unfinished); MAX_CAPTURES],
            steps: budget::HOOK_EVERY,
        }
    }

    /// `reprepstate`, before each try.
    fn reset(&mut self) {
        self.depth = MAX_DEPTH;
        self.level = 0;
    }

    /// One step of work: every `HOOK_EVERY` of them spend a tick of the budget.
    #[inline]
    fn step(&mut self) -> Result<(), Stop> {
        self.steps -= 1;
        if self.steps == 0 {
            self.steps = budget::HOOK_EVERY;
            if !budget::spend_tick() {
                return Err(Stop::Budget);
            }
        }
        Ok(())
    }

    /// The pattern's byte at `i`; 0 past its end, where C reads the terminating NUL.
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// The subject's byte at `i`; 0 past its end.
    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn check_capture(&self, c: u8) -> Result<usize, Stop> {
        let l = i32::from(c) - i32::from(b'1');
        if l < 0 || l as usize >= self.level || self.captures[l as usize].1 == Capture::Unfinished {
            return error(format!("invalid capture index %{}", l + 1));
        }
        Ok(l as usize)
    }

    fn capture_to_close(&self) -> Result<usize, Stop> {
        match (0..self.level)
            .rev()
            .find(|&l| self.captures[l].1 == Capture::Unfinished)
        {
            Some(l) => Ok(l),
            None => error("invalid pattern capture"),
        }
    }

    /// Where the single-character class at `p` ends.
    fn class_end(&self, mut p: usize) -> Result<usize, Stop> {
        let c = self.p(p);
        p += 1;
        match c {
            ESC => {
                if p >= self.pat.len() {
                    return error("malformed pattern (ends with '%')");
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return error("malformed pattern (missing ']')");
                    }
                    let c = self.p(p);
                    p += 1;
                    if c == ESC && p < self.pat.len() {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    /// Whether `c` is in the set `[...]` from `p` (its `[`) to `ec` (its `]`).
    fn match_bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if self.p(p) == ESC {
                p += 1;
                if match_class(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.p(p - 2) <= c && c <= self.p(p) {
                    return sig;
                }
            } else if self.p(p) == c {
                return sig;
            }
        }
    }

    fn single_match(&self, s: usize, p: usize, ep: usize) -> bool {
        if s >= self.src.len() {
            return false;
        }
        let c = self.src[s];
        match self.p(p) {
            b'.' => true,
            ESC => match_class(c, self.p(p + 1)),
            b'[' => self.match_bracket_class(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn match_balance(&mut self, s: usize, p: usize) -> Result<Option<usize>, Stop> {
        if p + 1 >= self.pat.len() {
            return error("malformed pattern (missing arguments to '%b')");
        }
        if s >= self.src.len() || self.src[s] != self.pat[p] {
            return Ok(None);
        }
        let (open, close) = (self.pat[p], self.pat[p + 1]);
        let mut depth = 1;
        for i in s + 1..self.src.len() {
            self.step()?;
            let c = self.src[i];
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(i + 1));
                }
            } else if c == open {
                depth += 1;
            }
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, Stop> {
        let mut i = 0;
        while self.single_match(s + i, p, ep) {
            self.step()?;
            i += 1;
        }
        loop {
            if let Some(end) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(end));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Result<Option<usize>, Stop> {
        loop {
            if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            if !self.single_match(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: Capture) -> Result<Option<usize>, Stop> {
        if self.level >= MAX_CAPTURES {
            return error("too many captures");
        }
        self.captures[self.level] = (s, what);
        self.level += 1;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.level -= 1;
        }
        Ok(res)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Result<Option<usize>, Stop> {
        let l = self.capture_to_close()?;
        self.captures[l].1 = Capture::Len(s - self.captures[l].0);
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.captures[l].1 = Capture::Unfinished;
        }
        Ok(res)
    }

    fn match_capture(&self, s: usize, c: u8) -> Result<Option<usize>, Stop> {
        let l = self.check_capture(c)?;
        let (init, Capture::Len(len)) = self.captures[l] else {
            // A position capture: C compares (size_t)-2 bytes, which never fit.
            return Ok(None);
        };
        Ok(
            (self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len])
                .then_some(s + len),
        )
    }

    /// `match`: where the pattern from `p` matches the subject from `s` up to, if it does.
    fn do_match(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, Stop> {
        if self.depth == 0 {
            return error("pattern too complex");
        }
        self.depth -= 1;
        self.step()?;
        let res = loop {
            if p == self.pat.len() {
                break Some(s);
            }
            match self.p(p) {
                b'(' => {
                    break if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, Capture::Position)?
                    } else {
                        self.start_capture(s, p + 1, Capture::Unfinished)?
                    };
                }
                b')' => break self.end_capture(s, p + 1)?,
                b'$' if p + 1 == self.pat.len() => {
                    break (s == self.src.len()).then_some(s);
                }
                ESC if self.p(p + 1) == b'b' => match self.match_balance(s, p + 2)? {
                    Some(end) => {
                        s = end;
                        p += 4;
                    }
                    None => break None,
                },
                ESC if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return error("missing '[' after '%f' in pattern");
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    if !self.match_bracket_class(previous, p, ep - 1)
                        && self.match_bracket_class(self.s(s), p, ep - 1)
                    {
                        p = ep;
                    } else {
                        break None;
                    }
                }
                ESC if self.p(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.p(p + 1))? {
                        Some(end) => {
                            s = end;
                            p += 2;
                        }
                        None => break None,
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let suffix = self.p(ep);
                    if !self.single_match(s, p, ep) {
                        if matches!(suffix, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        break None;
                    }
                    match suffix {
                        b'?' => match self.do_match(s + 1, ep + 1)? {
                            Some(end) => break Some(end),
                            None => p = ep + 1,
                        },
                        b'+' => break self.max_expand(s + 1, p, ep)?,
                        b'*' => break self.max_expand(s, p, ep)?,
                        b'-' => break self.min_expand(s, p, ep)?,
                        _ => {
                            s += 1;
                            p = ep;
                        }
                    }
                }
            }
        };
        self.depth += 1;
        Ok(res)
    }

    /// Capture `i` of a match from `s` to `e` (the whole match when there are none).
    fn capture(&self, lua: &Lua, i: usize, s: usize, e: usize) -> mlua::Result<Value> {
        if i >= self.level {
            if i != 0 {
                return Err(located(lua, format!("invalid capture index %{}", i + 1)));
            }
            return Ok(Value::String(lua.create_string(&self.src[s..e])?));
        }
        match self.captures[i] {
            (_, Capture::Unfinished) => Err(located(lua, "unfinished capture")),
            (init, Capture::Position) => Ok(Value::Integer(init as i64 + 1)),
            (init, Capture::Len(len)) => Ok(Value::String(
                lua.create_string(&self.src[init..init + len])?,
            )),
        }
    }

    /// The match's captures, or the whole match (`s..e`) when it has none and `whole`.
    fn captures(&self, lua: &Lua, s: usize, e: usize, whole: bool) -> mlua::Result<MultiValue> {
        let n = if self.level == 0 && whole {
            1
        } else {
            self.level
        };
        (0..n).map(|i| self.capture(lua, i, s, e)).collect()
    }
}

/// `%a`, `%d` and the others in the C locale; any other `cl` stands for itself.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace includes the vertical tab, Rust's is_ascii_whitespace does not.
        b's' => matches!(c, b' ' | b'\t'..=b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return cl == c,
    };
    if cl.is_ascii_lowercase() {
        res
    } else {
        !res
    }
}

/// Argument `n` of `f`, as `luaL_checklstring` takes it (numbers become strings).
fn check_string(lua: &Lua, args: &MultiValue, n: usize, f: &str) -> mlua::Result<LuaString> {
    let v = args.get(n - 1).cloned().unwrap_or(Value::Nil);
    match v {
        Value::String(s) => Ok(s),
        Value::Integer(_) | Value::Number(_) => Ok(lua
            .coerce_string(v)?
            .expect("a number converts to a string")),
        other => Err(bad_argument(
            lua,
            n,
            f,
            &format!("string expected, got {}", type_name(args, n, &other)),
        )),
    }
}

/// Argument `n` of `f`, as `luaL_optinteger` takes it.
fn opt_integer(lua: &Lua, args: &MultiValue, n: usize, f: &str, default: i64) -> mlua::Result<i64> {
    let v = match args.get(n - 1) {
        None | Some(Value::Nil) => return Ok(default),
        Some(v) => v.clone(),
    };
    if let Some(i) = lua.coerce_integer(v.clone())? {
        return Ok(i);
    }
    let msg = if lua.coerce_number(v.clone())?.is_some() {
        "number has no integer representation".to_string()
    } else {
        format!("number expected, got {}", type_name(args, n, &v))
    };
    Err(bad_argument(lua, n, f, &msg))
}

fn type_name(args: &MultiValue, n: usize, v: &Value) -> &'static str {
    if args.len() < n {
        "no value"
    } else {
        v.type_name()
    }
}

fn bad_argument(lua: &Lua, mut n: usize, f: &str, msg: &str) -> mlua::Error {
    // `luaL_argerror`: the function (of `RAISE`) as its caller named it; in a method call
    // the subject is not counted.
    let (name, what) = lua
        .inspect_stack(1, |d| {
            let names = d.names();
            (names.name.map(|n| n.into_owned()), names.name_what)
        })
        .unwrap_or_default();
    let name = name.unwrap_or_else(|| format!("string.{f}"));
    if what == Some("method") {
        n -= 1;
        if n == 0 {
            return located(lua, format!("calling '{name}' on bad self"));
        }
    }
    located(lua, format!("bad argument #{n} to '{name}' ({msg})"))
}

/// `posrelatI`: a 1-based position, negative from the end, as a 0-based offset (which may
/// be past the end).
fn start_offset(pos: i64, len: usize) -> usize {
    if pos > 0 {
        (pos as u64 - 1).try_into().unwrap_or(usize::MAX)
    } else if pos == 0 || pos.unsigned_abs() > len as u64 {
        0
    } else {
        len - pos.unsigned_abs() as usize
    }
}

/// `string.find` (`find`) and `string.match`.
fn find_aux(lua: &Lua, args: &MultiValue, find: bool) -> mlua::Result<MultiValue> {
    let f = if find { "find" } else { "match" };
    let s = check_string(lua, args, 1, f)?;
    let p = check_string(lua, args, 2, f)?;
    let init = start_offset(opt_integer(lua, args, 3, f, 1)?, s.as_bytes().len());
    let (src, pat) = (s.as_bytes(), p.as_bytes());
    if init > src.len() {
        return Ok(MultiValue::from_vec(vec![Value::Nil]));
    }
    let plain = args
        .get(3)
        .is_some_and(|v| !matches!(v, Value::Nil | Value::Boolean(false)));
    if find && (plain || !pat.iter().any(|b| SPECIALS.contains(b))) {
        return Ok(match memchr::memmem::find(&src[init..], &pat) {
            Some(at) => MultiValue::from_vec(vec![
                Value::Integer((init + at) as i64 + 1),
                Value::Integer((init + at + pat.len()) as i64),
            ]),
            None => MultiValue::from_vec(vec![Value::Nil]),
        });
    }
    let anchor = pat.first() == Some(&b'^');
    let mut m = Matcher::new(&src, &pat[usize::from(anchor)..]);
    let mut s1 = init;
    loop {
        m.reset();
        if let Some(end) = m.do_match(s1, 0).map_err(|stop| stop.into_lua(lua))? {
            if find {
                let mut found = m.captures(lua, 0, 0, false)?;
                found.push_front(Value::Integer(end as i64));
                found.push_front(Value::Integer(s1 as i64 + 1));
                return Ok(found);
            }
            return m.captures(lua, s1, end, true);
        }
        s1 += 1;
        if s1 > src.len() || anchor {
            return Ok(MultiValue::from_vec(vec![Value::Nil]));
        }
    }
}

/// `string.gmatch`: an iterator over the matches from `init` on.
fn gmatch(lua: &Lua, args: MultiValue) -> mlua::Result<Function> {
    let s = check_string(lua, &args, 1, "gmatch")?;
    let p = check_string(lua, &args, 2, "gmatch")?;
    let len = s.as_bytes().len();
    let init = start_offset(opt_integer(lua, &args, 3, "gmatch", 1)?, len).min(len + 1);
    let next = Cell::new(init);
    let last_match = Cell::new(None);
    lua.create_function(move |lua, ()| {
        let (src, pat) = (s.as_bytes(), p.as_bytes());
        let mut m = Matcher::new(&src, &pat);
        let found = (|| {
            for start in next.get()..=src.len() {
                m.reset();
                match m.do_match(start, 0).map_err(|stop| stop.into_lua(lua))? {
                    Some(end) if Some(end) != last_match.get() => {
                        next.set(end);
                        last_match.set(Some(end));
                        return m.captures(lua, start, end, true);
                    }
                    _ => {}
                }
            }
            next.set(src.len() + 1);
            Ok(MultiValue::new())
        })();
        raising(lua, found)
    })
}

/// `string.gsub`.
fn gsub(lua: &Lua, args: &MultiValue, memory_cap: usize) -> mlua::Result<MultiValue> {
    let subject = check_string(lua, args, 1, "gsub")?;
    let p = check_string(lua, args, 2, "gsub")?;
    let (src, pat) = (subject.as_bytes(), p.as_bytes());
    let repl = args.get(2).cloned().unwrap_or(Value::Nil);
    let max = opt_integer(lua, args, 4, "gsub", src.len() as i64 + 1)?;
    let repl = match repl {
        Value::String(_) | Value::Integer(_) | Value::Number(_) => {
            Replacement::Text(lua.coerce_string(repl)?.expect("a string or number"))
        }
        Value::Table(t) => Replacement::Table(t),
        Value::Function(f) => Replacement::Function(f),
        other => {
            let got = type_name(args, 3, &other);
            return Err(bad_argument(
                lua,
                3,
                "gsub",
                &format!("string/function/table expected, got {got}"),
            ));
        }
    };
    let anchor = pat.first() == Some(&b'^');
    let mut m = Matcher::new(&src, &pat[usize::from(anchor)..]);
    let mut out = Output::new(lua, memory_cap);
    let (mut at, mut last_match, mut n, mut changed) = (0, None, 0i64, false);
    while n < max {
        m.reset();
        match m.do_match(at, 0).map_err(|stop| stop.into_lua(lua))? {
            Some(end) if Some(end) != last_match => {
                n += 1;
                changed |= repl.add(lua, &m, &mut out, at, end)?;
                at = end;
                last_match = Some(end);
            }
            _ if at < src.len() => {
                out.push(&src[at..at + 1])?;
                at += 1;
            }
            _ => break,
        }
        if anchor {
            break;
        }
    }
    let result = if changed {
        out.push(&src[at..])?;
        Value::String(lua.create_string(&out.bytes)?)
    } else {
        Value::String(subject.clone())
    };
    Ok(MultiValue::from_vec(vec![result, Value::Integer(n)]))
}

/// The replacement argument of `gsub`.
enum Replacement {
    Text(LuaString),
    Table(Table),
    Function(Function),
}

impl Replacement {
    /// Add the replacement of the match `s..e` to `out`; whether it changed the subject.
    fn add(
        &self,
        lua: &Lua,
        m: &Matcher,
        out: &mut Output,
        s: usize,
        e: usize,
    ) -> mlua::Result<bool> {
        let value = match self {
            Replacement::Text(text) => {
                add_text(lua, m, out, &text.as_bytes(), s, e)?;
                return Ok(true);
            }
            Replacement::Table(t) => t.get::<Value>(m.capture(lua, 0, s, e)?)?,
            Replacement::Function(f) => f.call::<Value>(m.captures(lua, s, e, true)?)?,
        };
        match value {
            Value::Nil | Value::Boolean(false) => {
                out.push(&m.src[s..e])?;
                Ok(false)
            }
            v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
                out.push(
                    &lua.coerce_string(v)?
                        .expect("a string or number")
                        .as_bytes(),
                )?;
                Ok(true)
            }
            other => Err(located(
                lua,
                format!("invalid replacement value (a {})", other.type_name()),
            )),
        }
    }
}

/// `add_s`: a replacement string with `%0`–`%9` and `%%` in it.
fn add_text(
    lua: &Lua,
    m: &Matcher,
    out: &mut Output,
    text: &[u8],
    s: usize,
    e: usize,
) -> mlua::Result<()> {
    let mut rest = text;
    while let Some(at) = memchr::memchr(ESC, rest) {
        out.push(&rest[..at])?;
        let c = rest.get(at + 1).copied().unwrap_or(0);
        match c {
            ESC => out.push(b"%")?,
            b'0' => out.push(&m.src[s..e])?,
            b'1'..=b'9' => match m.capture(lua, usize::from(c - b'1'), s, e)? {
                Value::Integer(position) => out.push(position.to_string().as_bytes())?,
                Value::String(capture) => out.push(&capture.as_bytes())?,
                _ => unreachable!("a capture is a string or a position"),
            },
            _ => return Err(located(lua, "invalid use of '%' in replacement string")),
        }
        rest = rest.get(at + 2..).unwrap_or_default();
    }
    out.push(rest)
}

/// The result of `gsub` as it is built: in Rust's memory, so held to what the VM's memory
/// cap leaves.
struct Output {
    bytes: Vec<u8>,
    room: usize,
}

impl Output {
    fn new(lua: &Lua, memory_cap: usize) -> Output {
        let room = match memory_cap {
            0 => usize::MAX,
            cap => cap.saturating_sub(lua.used_memory()),
        };
        Output {
            bytes: Vec::new(),
            room,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> mlua::Result<()> {
        if self.bytes.len() + bytes.len() > self.room {
            return Err(mlua::Error::MemoryError("not enough memory".into()));
        }
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::{LuaOptions, StdLib};

    /// Lua's own string library, and one with these functions in it.
    fn states() -> (Lua, Lua) {
        let make = || Lua::new_with(StdLib::STRING | StdLib::TABLE, LuaOptions::new()).unwrap();
        let (theirs, ours) = (make(), make());
        install(&ours, &ours.globals().get("string").unwrap(), 0).unwrap();
        (theirs, ours)
    }

    /// A call's results, or its error's message, as text to compare.
    fn show(result: mlua::Result<MultiValue>) -> String {
        fn message(e: &mlua::Error) -> String {
            match e {
                mlua::Error::CallbackError { cause, .. } => message(cause),
                mlua::Error::RuntimeError(m) => m.lines().next().unwrap_or_default().into(),
                other => format!("{other:?}"),
            }
        }
        match result {
            Ok(values) => values
                .iter()
                .map(|v| match v {
                    Value::String(s) => format!("{:?}", String::from_utf8_lossy(&s.as_bytes())),
                    Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("error: {}", message(&e)),
        }
    }

    /// Call `string[f]` with `args` (Lua source of each argument) in both states.
    fn both(states: &(Lua, Lua), f: &str, args: &str) -> (String, String) {
        let call = |lua: &Lua| {
            let code = format!(
                "local f = string.{f}\nlocal repl = {{ a = 'A', b = 1, c = true }}\n\
                 local function upper(...) local x = ... if x == 'a' then return false end \
                 return select('#', ...) .. ':' .. tostring(x) end\n\
                 if f == string.gmatch then\n\
                   local out, it = {{}}, f({args})\n\
                   for _ = 1, 40 do local r = table.pack(it()) if r[1] == nil then break end \
                   for i = 1, r.n do out[#out + 1] = tostring(r[i]) end out[#out + 1] = '|' end\n\
                   return table.concat(out, ',')\n\
                 end\n\
                 local r = table.pack(f({args}))\n\
                 return table.unpack(r, 1, r.n)"
            );
            show(lua.load(code).call::<MultiValue>(()))
        };
        (call(&states.0), call(&states.1))
    }

    /// A little deterministic generator (xorshift), so failures repeat.
    struct Gen(u64);
    impl Gen {
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            from[(self.0 % from.len() as u64) as usize]
        }
    }

    /// Generated patterns and subjects give what Lua's own functions give: the same
    /// positions, captures, replacements, iterations and error messages.
    #[test]
    fn results_and_errors_are_lua_s_own() {
        let states = states();
        let tokens = [
            "a", "b", ".", "%a", "%d", "%s", "%S", "%w", "%p", "%x", "%z", "%.", "%%", "[ab]",
            "[^a]", "[a-c]", "[a-]", "[-a]", "[%a-z]", "[^%d.]", "[%d%]]", "[]]", "[^]", "[", "]",
            "*", "+", "-", "?", "(", ")", "()", "%1", "%2", "%0", "^", "$", "%b()", "%b(",
            "%f[%w]", "%f[^%s]", "%f", "%", "\\0", "1", " ",
        ];
        let subjects = [
            "",
            "a",
            "aab",
            "ab(b)c 1.",
            "((a)(b))",
            "  x1 ",
            "abcabc",
            "a\\0b]",
            "]]^$",
            "AbC12 3.x",
            "a\\vb\\t",
        ];
        let inits = ["", ", 1", ", 2", ", -1", ", -3", ", 0", ", 20", ", 3.0"];
        let mut g = Gen(0x5eed);
        let (mut compared, mut errors, mut found) = (0, 0, 0);
        for _ in 0..6000 {
            let n = 1 + g.0 as usize % 7;
            let pattern: String = (0..n).map(|_| g.pick(&tokens)).collect();
            let subject = g.pick(&subjects);
            let init = g.pick(&inits);
            let plain = g.pick(&["", ", true"]);
            let repl = g.pick(&["'<%0|%1>'", "'%%-%2'", "'x%'", "7", "repl", "upper", "{}"]);
            let max = g.pick(&["", ", 1", ", 0"]);
            for (f, args) in [
                ("find", format!("'{subject}', '{pattern}'{init}{plain}")),
                ("match", format!("'{subject}', '{pattern}'{init}")),
                ("gmatch", format!("'{subject}', '{pattern}'{init}")),
                ("gsub", format!("'{subject}', '{pattern}', {repl}{max}")),
            ] {
                let (theirs, ours) = both(&states, f, &args);
                assert_eq!(ours, theirs, "string.{f}({args})");
                compared += 1;
                if ours.starts_with("error: ") {
                    errors += 1;
                } else if ours != "Nil" && ours != "\"\"" {
                    found += 1;
                }
            }
        }
        assert_eq!(compared, 24_000);
        // Most calls run to a result (and many find something): the comparison is of what
        // the functions do, not of errors the harness makes.
        assert!(errors < compared / 3, "{errors} errors");
        assert!(found > compared / 5, "{found} calls found something");
    }

    /// The arguments are taken as Lua takes them, and refused with its messages.
    #[test]
    fn arguments_are_taken_and_refused_as_lua_does() {
        let states = states();
        for (f, args) in [
            ("find", "12345, 34"),
            ("find", "'a.b', '.', 1, true"),
            ("find", "'a.b', '.', '2'"),
            ("find", "'abc', 'b', 1.5"),
            ("find", "'abc', 'b', 'x'"),
            ("find", "'abc', 'b', 1e300"),
            ("find", "'abc', 'b', -1e18"),
            ("find", "nil, 'b'"),
            ("find", "'abc'"),
            ("find", "{}, 'b'"),
            ("match", "'key=val', '(%w+)=(%w+)'"),
            ("match", "'  trim  ', '^%s*(.-)%s*$'"),
            ("match", "'hello', '()ll()'"),
            ("match", "'x', '(()'"),
            ("gsub", "'hello world', '(%w+)', '%1 %1'"),
            ("gsub", "'abc', '%w', '%1'"),
            ("gsub", "'abc', '', '-'"),
            ("gsub", "'abc', 'b', nil"),
            ("gsub", "'abc', 'b', true"),
            ("gsub", "'abc', 'b', 'x', 1.5"),
            ("gsub", "'abc', '()b', '%1'"),
            ("gsub", "'abc', '()b', { [2] = 'two' }"),
            ("gsub", "'abc', 'b', function() return {} end"),
            ("gsub", "'abc', 'b', function() error('inner', 0) end"),
            ("gmatch", "'one two', '%a+'"),
            ("gmatch", "'one two', '%a+', 4"),
            ("gmatch", "'one two', '%a+', 99"),
            ("gmatch", "'abc', '^a'"),
            ("gmatch", "'abc', ''"),
        ] {
            let (theirs, ours) = both(&states, f, args);
            assert_eq!(ours, theirs, "string.{f}({args})");
        }
        // At and around the limits on captures and on the matcher's depth.
        for (item, counts) in [("(a)", 31..=33), ("a?", 197..=201), ("(a?)", 95..=101)] {
            for n in counts {
                let args = format!("'{}', '{}'", "a".repeat(300), item.repeat(n));
                let (theirs, ours) = both(&states, "find", &args);
                assert_eq!(ours, theirs, "string.find({args})");
            }
        }
    }

    /// Errors reach `pcall` as Lua's do: strings, naming the function as it was called and
    /// the place of the call. Only a tail call's place is lost (Lua's C functions keep
    /// their caller's frame in a tail call; a Lua function does not).
    #[test]
    fn errors_reach_pcall_as_strings_naming_the_call_and_its_place() {
        let calls = r#"
local out = {}
local function try(f, ...)
  local ok, e = pcall(f, ...)
  out[#out + 1] = type(e) .. " " .. tostring(e)
end
try(string.find, "x", "[")
try(function() local r = ("x"):find("[") return r end)
try(function() local r = ("x"):find({}) return r end)
try(function() local r = string.find({}) return r end)
try(function() local find = string.gsub local r = find("x", "x", true) return r end)
try(function() local r = ("x"):gsub("x", "%2") return r end)
try(function() for _ in ("x"):gmatch("(") do end end)
return table.concat(out, "\n")
"#;
        let (theirs, ours) = states();
        let run = |lua: &Lua| {
            lua.load(calls)
                .set_name("=policy.lua")
                .eval::<String>()
                .unwrap()
        };
        let got = run(&ours);
        assert_eq!(got, run(&theirs));
        assert!(
            got.contains("string policy.lua:11: bad argument #3 to 'find'"),
            "{got}"
        );
        let tail = "return select(2, pcall(function() return ('x'):find('[') end))";
        assert_eq!(
            ours.load(tail).eval::<String>().unwrap(),
            "malformed pattern (missing ']')"
        );
    }

    /// `gsub` builds its result outside Lua's allocator, so it checks the cap itself.
    #[test]
    fn gsub_s_result_is_held_to_the_memory_cap() {
        let lua = Lua::new_with(StdLib::STRING, LuaOptions::new()).unwrap();
        install(&lua, &lua.globals().get("string").unwrap(), 4 << 20).unwrap();
        lua.set_memory_limit(4 << 20).unwrap();
        let grow = "return #string.gsub(string.rep('x', 1e5), 'x', string.rep('y', 100))";
        match lua.load(grow).call::<usize>(()) {
            Err(e) => assert!(e.to_string().contains("not enough memory"), "{e}"),
            Ok(n) => panic!("a {n}-byte result under a 4 MiB cap"),
        }
        let fits = "return #string.gsub(string.rep('x', 1e4), 'x', string.rep('y', 100))";
        assert_eq!(lua.load(fits).call::<usize>(()).unwrap(), 1_000_000);
    }
}
