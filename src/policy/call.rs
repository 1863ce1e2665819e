//! The call of a policy's `route`, made through Lua's C API.
//!
//! mlua's `Function::call` turns every value that crosses into a reference it keeps (a few
//! hundred instructions each), and reading a list of names back cost more than the policy
//! that made it. Here the arguments are pushed as they are, the fresh candidate array the
//! policy gets is filled in C, and a list of known names is read straight off the stack.
//! Anything else the policy answers (a rejection, an unknown name, a wrong type) is handed
//! back as mlua values, for `vm::chosen_backends` to judge as before.

use std::ffi::c_int;
use std::ptr;
use std::sync::Arc;

use mlua::{ffi, Function, Lua, MultiValue, Value};

use super::tables::Prepared;
use crate::backends::Backend;

/// Return values of `route` that are read: a name or a list, or nil, status, message.
const ANSWER_VALUES: c_int = 3;

/// What `route` answered.
pub(super) enum Answer {
    /// A list of names (or one name) that are all backends of the set, in order.
    Chosen(Vec<Arc<Backend>>),
    /// Anything else, as it came.
    Values(MultiValue),
}

/// Call `route(req, copy of views)` on `lua`'s main state, under the caller's budget.
pub(super) fn route(
    lua: &Lua,
    route: &Function,
    args: &Prepared<'_>,
    max_names: usize,
) -> mlua::Result<Answer> {
    lua.exec_raw_lua(|raw| {
        // SAFETY: the stack is put back as found (`Top`); the only values pushed are the
        // two C functions below, mlua values of this VM, and an integer; Lua errors in the
        // call are caught by `lua_pcall` and never unwind a Rust frame holding anything
        // to drop (`invoke` holds nothing).
        unsafe {
            let state = raw.state();
            let top = Top(state, ffi::lua_gettop(state));
            if ffi::lua_checkstack(state, 8) == 0 {
                return Err(mlua::Error::StackError);
            }
            ffi::lua_pushcfunction(state, error_text);
            let handler = ffi::lua_gettop(state);
            ffi::lua_pushcfunction(state, invoke);
            raw.push(route)?;
            raw.push(args.req)?;
            raw.push(args.views)?;
            ffi::lua_pushinteger(state, args.count as ffi::lua_Integer);
            let status = ffi::lua_pcall(state, 4, ANSWER_VALUES, handler);
            if status != ffi::LUA_OK {
                return Err(error(state, status, || raw.pop::<Value>()));
            }
            let first = top.1 + 2;
            if let Some(chosen) = known_names(state, first, args, max_names) {
                return Ok(Answer::Chosen(chosen));
            }
            let mut values = Vec::with_capacity(ANSWER_VALUES as usize);
            for _ in 0..ANSWER_VALUES {
                // `pop`, not `pop_value`: making a reference may need memory the VM no
                // longer has, which must be an error, not a panic.
                values.push(raw.pop::<Value>()?);
            }
            values.reverse();
            Ok(Answer::Values(MultiValue::from_vec(values)))
        }
    })
}

/// The backends named by the answer at `first`: one name, or a list of at most
/// `max_names` names read up to its first hole, each found by the address of its
/// interned string's bytes (what `LuaString::to_pointer` gives, and reading a string's
/// bytes never allocates). `None` for anything else, which the full reader judges.
unsafe fn known_names(
    state: *mut ffi::lua_State,
    first: c_int,
    args: &Prepared<'_>,
    max_names: usize,
) -> Option<Vec<Arc<Backend>>> {
    let known = |index| unsafe {
        (ffi::lua_type(state, index) == ffi::LUA_TSTRING)
            .then(|| {
                let bytes = ffi::lua_tolstring(state, index, ptr::null_mut());
                args.names.by_address(bytes as usize)
            })
            .flatten()
    };
    unsafe {
        match ffi::lua_type(state, first) {
            ffi::LUA_TSTRING => known(first).map(|b| vec![b.clone()]),
            ffi::LUA_TTABLE => {
                let mut chosen = Vec::with_capacity(max_names.min(8));
                for i in 1..=max_names {
                    ffi::lua_rawgeti(state, first, i as ffi::lua_Integer);
                    let found = known(-1);
                    let end = ffi::lua_type(state, -1) == ffi::LUA_TNIL;
                    ffi::lua_pop(state, 1);
                    match found {
                        Some(b) => chosen.push(b.clone()),
                        None if end => break,
                        None => return None,
                    }
                }
                (!chosen.is_empty()).then_some(chosen)
            }
            _ => None,
        }
    }
}

/// The error `lua_pcall` left on top of the stack, as mlua reports it; `pop` pops it as
/// an mlua value (mlua's `RawLua::pop`).
///
/// # Safety
/// The error value is on top of `state`'s stack.
unsafe fn error(
    state: *mut ffi::lua_State,
    status: c_int,
    pop: impl FnOnce() -> mlua::Result<Value>,
) -> mlua::Error {
    // SAFETY: the value is read where it lies; a string's bytes are copied out without
    // making a reference, which could need memory the VM (at its cap, say) has not got.
    unsafe {
        if ffi::lua_type(state, -1) == ffi::LUA_TSTRING {
            let mut len = 0;
            let bytes = ffi::lua_tolstring(state, -1, &mut len);
            let text = std::slice::from_raw_parts(bytes.cast::<u8>(), len);
            let text = String::from_utf8_lossy(text).into_owned();
            return if status == ffi::LUA_ERRMEM {
                mlua::Error::MemoryError(text)
            } else {
                mlua::Error::RuntimeError(text)
            };
        }
        match pop() {
            // A Rust function's error (a `sy` helper's), as it raised it.
            Ok(Value::Error(e)) => *e,
            // The message handler made every other value its text: only a value it could
            // not turn (no stack left) comes here.
            Ok(other) => mlua::Error::RuntimeError(format!("<{}>", other.type_name())),
            Err(e) => e,
        }
    }
}

/// The message handler: an error value that is not a Rust function's error becomes its
/// text (`__tostring` applies), as mlua's own handler does before adding a traceback.
unsafe extern "C-unwind" fn error_text(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua with the error value on top of the stack.
    unsafe {
        if ffi::lua_type(state, -1) != ffi::LUA_TUSERDATA && ffi::lua_checkstack(state, 2) != 0 {
            ffi::luaL_tolstring(state, -1, ptr::null_mut());
        }
    }
    1
}

/// `invoke(route, req, views, n)`: calls `route(req, copy)` with a fresh array holding
/// `views[1..n]`, so a policy may sort or change its array. Holds nothing to drop: an
/// error in the call unwinds through it with `longjmp`.
unsafe extern "C-unwind" fn invoke(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by `route` above with these four arguments; a C function has
    // LUA_MINSTACK (20) free slots, and this one uses at most 9.
    unsafe {
        let n = ffi::lua_tointeger(state, 4);
        ffi::lua_createtable(state, n as c_int, 0);
        for i in 1..=n {
            ffi::lua_rawgeti(state, 3, i);
            ffi::lua_rawseti(state, 5, i);
        }
        ffi::lua_pushvalue(state, 1);
        ffi::lua_pushvalue(state, 2);
        ffi::lua_pushvalue(state, 5);
        ffi::lua_call(state, 2, ANSWER_VALUES);
    }
    ANSWER_VALUES
}

/// Sets the stack's top back when dropped.
struct Top(*mut ffi::lua_State, c_int);

impl Drop for Top {
    fn drop(&mut self) {
        // SAFETY: the state outlives the call this guards.
        unsafe { ffi::lua_settop(self.0, self.1) }
    }
}
