//! Lua's pattern functions (`string.find`, `match`, `gmatch`, `gsub`) under the policy's
//! instruction budget.
//!
//! Lua's own matcher backtracks in C, where the count hook never runs: `string.find` of
//! `("a?"):rep(28) .. ("a"):rep(28)` over 28 `a`s tries 2^28 ways, and held a worker
//! thread for minutes with the budget armed. These functions are Lua 5.4.9's `lstrlib.c`
//! ported to Rust, as Lua C functions with the same arguments, results and errors, except
//! that their work counts against the budget once the watchdog has armed it
//! ([`budget::spend`]), so a runaway pattern is stopped like a runaway loop: each pass of
//! the matcher is a step, as is each 32 bytes of text compared, scanned or copied in bulk
//! (a long literal, a set `[...]`, a back-reference, a plain search, `gsub`'s output), and
//! the steps of many short calls add up.
//!
//! They are C functions (not mlua callbacks) so that a call costs what Lua's costs and an
//! error is the value Lua's would raise. Lua raises errors with `longjmp`, which skips Rust
//! frames without running their destructors; so nothing with a destructor is alive across
//! a Lua API call that may raise (one that allocates, `luaL_error`, `lua_call`). The
//! matcher only borrows the subject and the pattern, which stay on the Lua stack (or in
//! the `gmatch` iterator's upvalues) for the whole call; `gsub` builds its result in a
//! `luaL_Buffer`, in Lua's memory, so under the VM's memory cap.

use std::ffi::{c_char, c_int, CStr};
use std::slice;

use mlua::ffi::{self, lua_State};
use mlua::{Lua, Table};

use super::budget;

/// Captures one match may hold (`LUA_MAXCAPTURES`).
const MAX_CAPTURES: usize = 32;
/// Nesting of the matcher's recursion (`MAXCCALLS`).
const MAX_DEPTH: u32 = 200;
/// Bytes that make a pattern more than a plain string (`SPECIALS`).
const SPECIALS: &[u8] = b"^$*+?.([%-";
const ESC: u8 = b'%';
/// Steps a match hands to the budget at once.
const STEPS_AT_ONCE: u64 = 64;
/// Bytes of text compared, scanned or copied in bulk that count as one step.
const BYTES_A_STEP: u64 = 32;

/// Put the budgeted pattern functions in the string library `string` (the real one, which
/// strings index for method calls).
pub(super) fn install(lua: &Lua, string: &Table) -> mlua::Result<()> {
    let functions: [(&str, ffi::lua_CFunction); 4] = [
        ("find", str_find),
        ("match", str_match),
        ("gmatch", str_gmatch),
        ("gsub", str_gsub),
    ];
    for (name, function) in functions {
        // SAFETY: each keeps the rules of a Lua C function and of the module's doc.
        string.raw_set(name, unsafe { lua.create_c_function(function)? })?;
    }
    Ok(())
}

/// Why a match stopped short.
#[derive(Debug)]
enum Stop {
    /// A malformed pattern, with Lua's message.
    Error(&'static CStr),
    /// `%N` names capture N, which does not exist.
    BadCapture(i32),
    /// The call's instruction budget is spent.
    Budget,
}

/// Raise `stop` as a Lua error, as `lstrlib.c` would (the budget as the count hook does).
unsafe fn raise(l: *mut lua_State, stop: Stop) -> ! {
    unsafe {
        match stop {
            Stop::Error(msg) => ffi::luaL_error(l, c"%s".as_ptr(), msg.as_ptr()),
            Stop::BadCapture(n) => {
                ffi::luaL_error(l, c"invalid capture index %%%d".as_ptr(), n as c_int)
            }
            // At the nearest Lua caller's place, as the count hook raises it.
            Stop::Budget => budget::raise_exceeded(l, 1),
        };
    }
    unreachable!("luaL_error does not return")
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
    /// Steps taken and not yet handed to the budget.
    steps: u64,
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8]) -> Matcher<'a> {
        Matcher {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            captures: [(0, Capture::Unfinished); MAX_CAPTURES],
            steps: 0,
        }
    }

    /// `reprepstate`, before each try.
    fn reset(&mut self) {
        self.depth = MAX_DEPTH;
        self.level = 0;
    }

    /// One step of work (about one Lua instruction's worth).
    #[inline]
    fn step(&mut self) -> Result<(), Stop> {
        self.charge(1)
    }

    /// `n` steps of work, handed to the budget [`STEPS_AT_ONCE`] or more at a time.
    #[inline]
    fn charge(&mut self, n: u64) -> Result<(), Stop> {
        self.steps += n;
        if self.steps >= STEPS_AT_ONCE {
            self.flush()?;
        }
        Ok(())
    }

    /// Hand the steps counted so far to the budget; done before a call returns, so that
    /// many short calls add up.
    fn flush(&mut self) -> Result<(), Stop> {
        match budget::spend(std::mem::take(&mut self.steps)) {
            true => Ok(()),
            false => Err(Stop::Budget),
        }
    }

    /// Steps for work over `bytes` bytes of text, done a machine word or more at a time.
    fn charge_bytes(&mut self, bytes: usize) -> Result<(), Stop> {
        self.charge(bytes as u64 / BYTES_A_STEP)
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
            return Err(Stop::BadCapture(l + 1));
        }
        Ok(l as usize)
    }

    fn capture_to_close(&self) -> Result<usize, Stop> {
        match (0..self.level)
            .rev()
            .find(|&l| self.captures[l].1 == Capture::Unfinished)
        {
            Some(l) => Ok(l),
            None => Err(Stop::Error(c"invalid pattern capture")),
        }
    }

    /// Where the single-character class at `p` ends. A set `[...]` costs steps for its
    /// length, as does each later test of a character against it.
    fn class_end(&mut self, mut p: usize) -> Result<usize, Stop> {
        let (start, c) = (p, self.p(p));
        p += 1;
        match c {
            ESC => {
                if p >= self.pat.len() {
                    return Err(Stop::Error(c"malformed pattern (ends with '%')"));
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return Err(Stop::Error(c"malformed pattern (missing ']')"));
                    }
                    let c = self.p(p);
                    p += 1;
                    if c == ESC && p < self.pat.len() {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        self.charge_bytes(p - start)?;
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
            return Err(Stop::Error(
                c"malformed pattern (missing arguments to '%b')",
            ));
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
        let test = 1 + (ep - p) as u64 / BYTES_A_STEP;
        let mut i = 0;
        while self.single_match(s + i, p, ep) {
            self.charge(test)?;
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
        let test = (ep - p) as u64 / BYTES_A_STEP;
        loop {
            if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            self.charge(test)?;
            if !self.single_match(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: Capture) -> Result<Option<usize>, Stop> {
        if self.level >= MAX_CAPTURES {
            return Err(Stop::Error(c"too many captures"));
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

    fn match_capture(&mut self, s: usize, c: u8) -> Result<Option<usize>, Stop> {
        let l = self.check_capture(c)?;
        let (init, Capture::Len(len)) = self.captures[l] else {
            // A position capture: C compares (size_t)-2 bytes, which never fit.
            return Ok(None);
        };
        self.charge_bytes(len)?;
        Ok(
            (self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len])
                .then_some(s + len),
        )
    }

    /// `match`: where the pattern from `p` matches the subject from `s` up to, if it does.
    fn do_match(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, Stop> {
        if self.depth == 0 {
            return Err(Stop::Error(c"pattern too complex"));
        }
        self.depth -= 1;
        let res = loop {
            self.step()?;
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
                        return Err(Stop::Error(c"missing '[' after '%f' in pattern"));
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

/// A capture's value: the text it took, or a position (`()`).
enum Cap<'a> {
    Text(&'a [u8]),
    Position(i64),
}

/// `get_onecapture`: capture `i` of the match `s..e` (the whole match when there are none).
unsafe fn capture<'a>(l: *mut lua_State, m: &Matcher<'a>, i: usize, s: usize, e: usize) -> Cap<'a> {
    if i >= m.level {
        if i != 0 {
            unsafe { raise(l, Stop::BadCapture(i as i32 + 1)) };
        }
        return Cap::Text(&m.src[s..e]);
    }
    match m.captures[i] {
        (_, Capture::Unfinished) => unsafe { raise(l, Stop::Error(c"unfinished capture")) },
        (init, Capture::Position) => Cap::Position(init as i64 + 1),
        (init, Capture::Len(len)) => Cap::Text(&m.src[init..init + len]),
    }
}

unsafe fn push_capture(l: *mut lua_State, m: &Matcher, i: usize, s: usize, e: usize) {
    unsafe {
        match capture(l, m, i, s, e) {
            Cap::Text(text) => push_bytes(l, text),
            Cap::Position(at) => ffi::lua_pushinteger(l, at),
        }
    }
}

/// `push_captures`: the match's captures, or the whole match `s..e` when it has none and
/// `whole`. Returns how many it pushed.
unsafe fn push_captures(l: *mut lua_State, m: &Matcher, whole: bool, s: usize, e: usize) -> c_int {
    let n = if m.level == 0 && whole { 1 } else { m.level };
    unsafe {
        ffi::luaL_checkstack(l, n as c_int, c"too many captures".as_ptr());
        for i in 0..n {
            push_capture(l, m, i, s, e);
        }
    }
    n as c_int
}

unsafe fn push_bytes(l: *mut lua_State, bytes: &[u8]) {
    unsafe { ffi::lua_pushlstring(l, bytes.as_ptr().cast(), bytes.len()) };
}

/// Argument `arg` as `luaL_checklstring` takes it (a number becomes a string in place). The
/// bytes stay valid while the argument is on the stack.
unsafe fn check_bytes<'a>(l: *mut lua_State, arg: c_int) -> &'a [u8] {
    let mut len = 0;
    unsafe {
        let p = ffi::luaL_checklstring(l, arg, &mut len);
        slice::from_raw_parts(p.cast(), len)
    }
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

unsafe extern "C-unwind" fn str_find(l: *mut lua_State) -> c_int {
    unsafe { find_aux(l, true) }
}

unsafe extern "C-unwind" fn str_match(l: *mut lua_State) -> c_int {
    unsafe { find_aux(l, false) }
}

/// `str_find_aux`: `string.find` (`find`) and `string.match`.
unsafe fn find_aux(l: *mut lua_State, find: bool) -> c_int {
    unsafe {
        let src = check_bytes(l, 1);
        let pat = check_bytes(l, 2);
        let init = start_offset(ffi::luaL_optinteger(l, 3, 1), src.len());
        if init > src.len() {
            ffi::lua_pushnil(l);
            return 1;
        }
        if find && (ffi::lua_toboolean(l, 4) != 0 || !pat.iter().any(|b| SPECIALS.contains(b))) {
            let found = memchr::memmem::find(&src[init..], pat);
            let scanned = found.map_or(src.len() - init, |at| at + pat.len());
            if !budget::spend((scanned + pat.len()) as u64 / BYTES_A_STEP) {
                raise(l, Stop::Budget);
            }
            if let Some(at) = found {
                ffi::lua_pushinteger(l, (init + at) as i64 + 1);
                ffi::lua_pushinteger(l, (init + at + pat.len()) as i64);
                return 2;
            }
        } else {
            let anchor = pat.first() == Some(&b'^');
            let mut m = Matcher::new(src, &pat[usize::from(anchor)..]);
            let mut s1 = init;
            loop {
                m.reset();
                match m.do_match(s1, 0).and_then(|end| m.flush().map(|()| end)) {
                    Err(stop) => raise(l, stop),
                    Ok(Some(end)) if find => {
                        ffi::lua_pushinteger(l, s1 as i64 + 1);
                        ffi::lua_pushinteger(l, end as i64);
                        return push_captures(l, &m, false, 0, 0) + 2;
                    }
                    Ok(Some(end)) => return push_captures(l, &m, true, s1, end),
                    Ok(None) => {}
                }
                s1 += 1;
                if s1 > src.len() || anchor {
                    break;
                }
            }
        }
        ffi::lua_pushnil(l);
        1
    }
}

/// Where a `gmatch` iterator is, kept in a userdata beside the subject and the pattern
/// (its upvalues 1 and 2). Plain data: Lua frees it without dropping it.
struct GmatchState {
    src: *const u8,
    src_len: usize,
    pat: *const u8,
    pat_len: usize,
    /// Where the next match is looked for.
    next: usize,
    /// The end of the last match, which an empty match may not end at again.
    last_match: Option<usize>,
}

unsafe extern "C-unwind" fn str_gmatch(l: *mut lua_State) -> c_int {
    unsafe {
        let src = check_bytes(l, 1);
        let pat = check_bytes(l, 2);
        let init = start_offset(ffi::luaL_optinteger(l, 3, 1), src.len()).min(src.len() + 1);
        // Keep the strings as upvalues, so the iterator's pointers stay valid.
        ffi::lua_settop(l, 2);
        let state = ffi::lua_newuserdatauv(l, size_of::<GmatchState>(), 0).cast::<GmatchState>();
        state.write(GmatchState {
            src: src.as_ptr(),
            src_len: src.len(),
            pat: pat.as_ptr(),
            pat_len: pat.len(),
            next: init,
            last_match: None,
        });
        ffi::lua_pushcclosure(l, gmatch_next, 3);
        1
    }
}

/// `gmatch_aux`: the next match's captures, or nothing.
unsafe extern "C-unwind" fn gmatch_next(l: *mut lua_State) -> c_int {
    unsafe {
        let state = &mut *ffi::lua_touserdata(l, ffi::lua_upvalueindex(3)).cast::<GmatchState>();
        let src = slice::from_raw_parts(state.src, state.src_len);
        let pat = slice::from_raw_parts(state.pat, state.pat_len);
        let mut m = Matcher::new(src, pat);
        for start in state.next..=src.len() {
            m.reset();
            match m.do_match(start, 0) {
                Err(stop) => raise(l, stop),
                Ok(Some(end)) if Some(end) != state.last_match => {
                    if let Err(stop) = m.flush() {
                        raise(l, stop);
                    }
                    state.next = end;
                    state.last_match = Some(end);
                    return push_captures(l, &m, true, start, end);
                }
                Ok(_) => {}
            }
        }
        state.next = src.len() + 1;
        if let Err(stop) = m.flush() {
            raise(l, stop);
        }
        0
    }
}

/// `str_gsub`.
unsafe extern "C-unwind" fn str_gsub(l: *mut lua_State) -> c_int {
    unsafe {
        let src = check_bytes(l, 1);
        let pat = check_bytes(l, 2);
        let replacement = ffi::lua_type(l, 3);
        let max = ffi::luaL_optinteger(l, 4, src.len() as i64 + 1);
        if !matches!(
            replacement,
            ffi::LUA_TNUMBER | ffi::LUA_TSTRING | ffi::LUA_TFUNCTION | ffi::LUA_TTABLE
        ) {
            return type_error(l, 3, c"string/function/table");
        }
        // Used through one raw pointer only: once initialised it points into itself.
        let mut buffer: ffi::luaL_Buffer = std::mem::zeroed();
        let b = &raw mut buffer;
        ffi::luaL_buffinit(l, b);
        let anchor = pat.first() == Some(&b'^');
        let mut m = Matcher::new(src, &pat[usize::from(anchor)..]);
        let (mut at, mut last_match, mut n, mut changed) = (0, None, 0, false);
        while n < max {
            m.reset();
            match m.do_match(at, 0) {
                Err(stop) => raise(l, stop),
                Ok(Some(end)) if Some(end) != last_match => {
                    n += 1;
                    changed |= add_value(l, &mut m, b, at, end, replacement);
                    at = end;
                    last_match = Some(end);
                }
                Ok(_) if at < src.len() => {
                    ffi::luaL_addchar(b, src[at] as c_char);
                    at += 1;
                }
                Ok(_) => break,
            }
            if anchor {
                break;
            }
        }
        if changed {
            add_bytes(l, &mut m, b, &src[at..]);
            ffi::luaL_pushresult(b);
        } else {
            ffi::lua_pushvalue(l, 1);
        }
        if let Err(stop) = m.flush() {
            raise(l, stop);
        }
        ffi::lua_pushinteger(l, n);
        2
    }
}

/// Copy `bytes` to the buffer `b`, counting the copy against the budget.
unsafe fn add_bytes(l: *mut lua_State, m: &mut Matcher, b: *mut ffi::luaL_Buffer, bytes: &[u8]) {
    unsafe {
        if let Err(stop) = m.charge_bytes(bytes.len()) {
            raise(l, stop);
        }
        ffi::luaL_addlstring(b, bytes.as_ptr().cast(), bytes.len());
    }
}

/// `add_value`: add the replacement of the match `s..e` to `b`; whether it changed the
/// subject (a function or table that gives `nil` or `false` keeps the match).
unsafe fn add_value(
    l: *mut lua_State,
    m: &mut Matcher,
    b: *mut ffi::luaL_Buffer,
    s: usize,
    e: usize,
    replacement: c_int,
) -> bool {
    unsafe {
        match replacement {
            ffi::LUA_TFUNCTION => {
                ffi::lua_pushvalue(l, 3);
                let n = push_captures(l, m, true, s, e);
                ffi::lua_call(l, n, 1);
            }
            ffi::LUA_TTABLE => {
                push_capture(l, m, 0, s, e);
                ffi::lua_gettable(l, 3);
            }
            _ => {
                add_text(l, m, b, s, e);
                return true;
            }
        }
        if ffi::lua_toboolean(l, -1) == 0 {
            ffi::lua_pop(l, 1);
            let src = m.src;
            add_bytes(l, m, b, &src[s..e]);
            false
        } else if ffi::lua_isstring(l, -1) == 0 {
            let kind = ffi::luaL_typename(l, -1);
            ffi::luaL_error(l, c"invalid replacement value (a %s)".as_ptr(), kind);
            unreachable!("luaL_error does not return")
        } else {
            ffi::luaL_addvalue(b);
            true
        }
    }
}

/// `add_s`: the replacement string (argument 3), with `%0`–`%9` and `%%` in it.
unsafe fn add_text(
    l: *mut lua_State,
    m: &mut Matcher,
    b: *mut ffi::luaL_Buffer,
    s: usize,
    e: usize,
) {
    let src = m.src;
    unsafe {
        let mut len = 0;
        let text = ffi::lua_tolstring(l, 3, &mut len);
        let mut rest = slice::from_raw_parts(text.cast::<u8>(), len);
        while let Some(at) = memchr::memchr(ESC, rest) {
            add_bytes(l, m, b, &rest[..at]);
            // An escape is a step even when it adds nothing (`%0` of an empty match).
            if let Err(stop) = m.step() {
                raise(l, stop);
            }
            match rest.get(at + 1).copied().unwrap_or(0) {
                ESC => ffi::luaL_addchar(b, ESC as c_char),
                b'0' => add_bytes(l, m, b, &src[s..e]),
                c @ b'1'..=b'9' => match capture(l, m, usize::from(c - b'1'), s, e) {
                    Cap::Text(text) => add_bytes(l, m, b, text),
                    Cap::Position(position) => {
                        ffi::lua_pushinteger(l, position);
                        ffi::luaL_addvalue(b);
                    }
                },
                _ => {
                    ffi::luaL_error(
                        l,
                        c"invalid use of '%c' in replacement string".as_ptr(),
                        c_int::from(ESC),
                    );
                }
            }
            rest = rest.get(at + 2..).unwrap_or_default();
        }
        add_bytes(l, m, b, rest);
    }
}

/// `luaL_typeerror`: argument `arg` is not of the type named `expected`.
unsafe fn type_error(l: *mut lua_State, arg: c_int, expected: &CStr) -> c_int {
    unsafe {
        let got = if ffi::luaL_getmetafield(l, arg, c"__name".as_ptr()) == ffi::LUA_TSTRING {
            ffi::lua_tolstring(l, -1, std::ptr::null_mut())
        } else if ffi::lua_type(l, arg) == ffi::LUA_TLIGHTUSERDATA {
            c"light userdata".as_ptr()
        } else {
            ffi::luaL_typename(l, arg)
        };
        let msg = ffi::lua_pushfstring(l, c"%s expected, got %s".as_ptr(), expected.as_ptr(), got);
        ffi::luaL_argerror(l, arg, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::{LuaOptions, MultiValue, StdLib, Value};

    /// Lua's own string library, and one with these functions in it.
    fn states() -> (Lua, Lua) {
        let make = || Lua::new_with(StdLib::STRING | StdLib::TABLE, LuaOptions::new()).unwrap();
        let (theirs, ours) = (make(), make());
        install(&ours, &ours.globals().get("string").unwrap()).unwrap();
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
    /// the place of the call, also in a tail call; an error raised by a replacement
    /// function passes through `gsub` as it was raised.
    #[test]
    fn errors_reach_pcall_as_strings_naming_the_call_and_its_place() {
        let calls = r#"
local out = {}
local function try(f, ...)
  local ok, e = pcall(f, ...)
  out[#out + 1] = type(e) .. " " .. tostring(type(e) == "table" and e.code or e)
end
try(string.find, "x", "[")
try(function() local r = ("x"):find("[") return r end)
try(function() local r = ("x"):find({}) return r end)
try(function() local r = string.find({}) return r end)
try(function() local find = string.gsub local r = find("x", "x", true) return r end)
try(function() local r = ("x"):gsub("x", "%2") return r end)
try(function() for _ in ("x"):gmatch("(") do end end)
try(function() return ("x"):find("[") end)
try(function() return ("x"):find({}) end)
try(function() local r = ("x"):gsub("x", function() error({ code = 7 }) end) return r end)
try(function() local r = ("x"):gsub("x", function() return {} end) return r end)
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
        assert!(got.contains("\ntable 7\n"), "{got}");
    }

    /// `gsub` builds its result in Lua's memory, under the VM's cap.
    #[test]
    fn gsub_s_result_counts_against_the_memory_cap() {
        let lua = Lua::new_with(StdLib::STRING, LuaOptions::new()).unwrap();
        install(&lua, &lua.globals().get("string").unwrap()).unwrap();
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
