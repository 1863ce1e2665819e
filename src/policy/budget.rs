//! The instruction budget of a policy call, at no cost to calls that end quickly.
//!
//! Once a count hook is set, Lua 5.4 stops at every VM instruction to count it, whatever
//! the hook's period: measured with callgrind, that was 29% of the instructions of a
//! `least_inflight` decision over 32 backends. So calls run with no hook. A watchdog
//! thread looks at the calls in progress every [`WATCH_EVERY`]; a call it finds running at
//! two looks in a row (so for at least that long) gets a signal, whose handler, on the
//! calling thread, sets the count hook. From then on the call has its whole instruction
//! budget, counted every [`HOOK_EVERY`] instructions, and is stopped when it is spent.
//! `lua_sethook` is meant to be called from a signal handler: the standalone `lua`
//! interpreter stops a script on Ctrl-C the same way.
//!
//! A runaway call is therefore stopped within `WATCH_EVERY`–`2 × WATCH_EVERY` plus the
//! time its budget takes. Instructions do not measure library calls (`utf8.len` of a
//! 10 MB string is one instruction and ~10 ms), so a call still running
//! [`CALL_TIME_LIMIT`] after it started gets a second signal, which stops it at its next
//! instruction whatever budget it has left. The watchdog wakes 1/`WATCH_EVERY` times a
//! second and signals nothing unless a call overruns. Calls on one thread never nest (a policy cannot call
//! into another VM), so the call in progress is a per-thread record.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use mlua::ffi;

/// How often the watchdog looks at the calls in progress.
pub const WATCH_EVERY: Duration = Duration::from_millis(10);
/// Once armed, the hook runs every this many VM instructions.
pub const HOOK_EVERY: u32 = 1000;
/// A call running this long is stopped at its next VM instruction.
pub const CALL_TIME_LIMIT: Duration = Duration::from_secs(1);

/// The signal that arms the hook. Ignored by default, so one that reached a thread with no
/// call in progress, or a process that never installed the handler, does nothing.
const ARM_SIGNAL: libc::c_int = libc::SIGURG;

/// The call in progress on this thread, shared with the signal handler and the hook. Only
/// atomics and const-initialised cells: the handler may run between any two instructions
/// of the thread, and a thread-local with a destructor or lazy initialisation is not safe
/// to touch there.
struct Active {
    state: AtomicPtr<ffi::lua_State>,
    in_call: AtomicBool,
    /// The hook is set on `state`.
    armed: AtomicBool,
    /// Hook runs left before the budget is spent.
    ticks_left: AtomicU64,
    exhausted: AtomicBool,
    /// Stopped by [`CALL_TIME_LIMIT`] rather than by its instructions.
    timed_out: AtomicBool,
    /// This thread's watchdog slot (kept alive by its registration while the thread runs)
    /// and the number of the call in progress: a signal stops the call only if the slot
    /// names this call as out of time, not one that ended just before the signal came.
    slot: AtomicPtr<Slot>,
    call: AtomicU64,
}

thread_local! {
    static ACTIVE: Active = const {
        Active {
            state: AtomicPtr::new(ptr::null_mut()),
            in_call: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            ticks_left: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            slot: AtomicPtr::new(ptr::null_mut()),
            call: AtomicU64::new(0),
        }
    };
    /// Steps of work done outside the VM (pattern matching) that make no whole tick yet.
    static STEPS: Cell<u64> = const { Cell::new(0) };
    /// A place of the call in progress noted by [`note_place`], for an error that carries
    /// none (Lua raises running out of memory without running the message handler).
    static NOTED_PLACE: Cell<Option<String>> = const { Cell::new(None) };
    /// This thread's entry in the watchdog's list, made on its first call.
    static SLOT: Cell<Option<Registration>> = const { Cell::new(None) };
}

/// What the watchdog knows of one thread.
struct Slot {
    thread: libc::pthread_t,
    /// Number of the call in progress, 0 between calls.
    call: AtomicU64,
    /// Calls started on the thread so far.
    calls: AtomicU64,
    /// The call the watchdog found out of time ([`CALL_TIME_LIMIT`]), 0 for none.
    out_of_time: AtomicU64,
}

/// Removes the thread's slot when the thread ends, before it can no longer take a signal.
struct Registration(Arc<Slot>);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut slots = watched().lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| !Arc::ptr_eq(s, &self.0));
    }
}

fn watched() -> &'static Mutex<Vec<Arc<Slot>>> {
    static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());
    &SLOTS
}

/// Run `f`, a call into Lua on `state` (the state the call runs on), under a budget of
/// `instructions`.
pub fn run<R>(state: *mut ffi::lua_State, instructions: u64, f: impl FnOnce() -> R) -> R {
    let _call = enter(state, instructions);
    f()
}

/// A policy call under the budget: made by [`enter`], ends when dropped.
struct Call {
    slot: Arc<Slot>,
}

/// The Lua state that `lua`'s calls run on, where the hook must be set.
pub fn state_of(lua: &mlua::Lua) -> mlua::Result<*mut ffi::lua_State> {
    let mut state = ptr::null_mut();
    // SAFETY: the closure only reads the pointer.
    unsafe { lua.exec_raw::<()>((), |s| state = s)? };
    Ok(state)
}

/// Start a call of `instructions` on `state`, the Lua state that will run it.
fn enter(state: *mut ffi::lua_State, instructions: u64) -> Call {
    start_watchdog();
    let slot = SLOT.with(|cell| {
        let registration = cell.take().unwrap_or_else(register);
        let slot = registration.0.clone();
        cell.set(Some(registration));
        slot
    });
    ACTIVE.with(|a| {
        a.state.store(state, Relaxed);
        a.ticks_left
            .store((instructions / u64::from(HOOK_EVERY)).max(1), Relaxed);
        a.exhausted.store(false, Relaxed);
        a.timed_out.store(false, Relaxed);
        a.in_call.store(true, Relaxed);
    });
    STEPS.set(0);
    NOTED_PLACE.take();
    let number = slot.calls.fetch_add(1, Relaxed) + 1;
    ACTIVE.with(|a| {
        a.slot.store(Arc::as_ptr(&slot).cast_mut(), Relaxed);
        a.call.store(number, Relaxed);
    });
    slot.call.store(number, Relaxed);
    Call { slot }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.slot.call.store(0, Relaxed);
        ACTIVE.with(|a| {
            // No handler arms the hook after this store; one that ran before it did so
            // completely, since it interrupts this thread.
            a.in_call.store(false, Relaxed);
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
            if a.armed.swap(false, Relaxed) {
                // SAFETY: the state is alive (its VM is making this call) and on this thread.
                unsafe { ffi::lua_sethook(a.state.load(Relaxed), None, 0, 0) };
            }
        });
    }
}

/// The call in progress on this thread ran out of instructions or time (for `pcall`, which
/// must not catch that).
pub fn exhausted() -> bool {
    ACTIVE.with(|a| a.exhausted.load(Relaxed))
}

/// The call in progress (or the last) on this thread was stopped by [`CALL_TIME_LIMIT`].
pub fn timed_out() -> bool {
    ACTIVE.with(|a| a.timed_out.load(Relaxed))
}

fn register() -> Registration {
    let slot = Arc::new(Slot {
        // SAFETY: no preconditions.
        thread: unsafe { libc::pthread_self() },
        call: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        out_of_time: AtomicU64::new(0),
    });
    watched()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(slot.clone());
    Registration(slot)
}

/// Install the signal handler and start the watchdog thread, once per process.
fn start_watchdog() {
    static START: Once = Once::new();
    START.call_once(|| {
        // SAFETY: a handler that only touches atomics and calls `lua_sethook`.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(ARM_SIGNAL, &action, ptr::null_mut()) != 0 {
                log::error!(
                    "cannot install the policy watchdog's signal handler: {}; runaway \
                     policies will not be stopped",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
        let spawned = std::thread::Builder::new()
            .name("policy-watchdog".into())
            .spawn(watchdog);
        if let Err(e) = spawned {
            log::error!(
                "cannot start the policy watchdog: {e}; runaway policies will not be stopped"
            );
        }
    });
}

fn watchdog() {
    // Looks at one call after which it has run out of time.
    let time_up = (CALL_TIME_LIMIT.as_millis() / WATCH_EVERY.as_millis()).max(2) as u32;
    // (slot, the call in progress at the last look, looks at it since the first).
    let mut seen: Vec<(Arc<Slot>, u64, u32)> = Vec::new();
    loop {
        std::thread::sleep(WATCH_EVERY);
        // Held while signalling, so no watched thread can finish ending meanwhile.
        let slots = watched().lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|(s, ..)| slots.iter().any(|t| Arc::ptr_eq(s, t)));
        for slot in slots.iter() {
            let call = slot.call.load(Relaxed);
            let entry = match seen.iter_mut().find(|(s, ..)| Arc::ptr_eq(s, slot)) {
                Some(entry) => entry,
                None => {
                    seen.push((slot.clone(), 0, 0));
                    seen.last_mut().expect("just pushed")
                }
            };
            if call == 0 || call != entry.1 {
                *entry = (slot.clone(), call, 0);
                continue;
            }
            entry.2 = entry.2.saturating_add(1);
            // The first signal arms the budget; the second, once the time is up, ends the
            // call it names.
            if entry.2 == time_up {
                slot.out_of_time.store(call, Relaxed);
            }
            if entry.2 == 1 || entry.2 == time_up {
                // SAFETY: the thread is registered, so it has not ended.
                unsafe { libc::pthread_kill(slot.thread, ARM_SIGNAL) };
            }
        }
    }
}

/// Runs on the thread of the call: sets the count hook if a call is in progress; if the
/// watchdog named this call out of time, no budget is left and the hook runs at the next
/// instruction.
extern "C" fn on_signal(_: libc::c_int) {
    let _ = ACTIVE.try_with(|a| {
        if !a.in_call.load(Relaxed) {
            return;
        }
        let slot = a.slot.load(Relaxed);
        // SAFETY: set by `enter` to this thread's slot, which its registration keeps alive
        // for as long as the thread runs.
        let out_of_time =
            !slot.is_null() && unsafe { (*slot).out_of_time.load(Relaxed) } == a.call.load(Relaxed);
        let every = if out_of_time {
            a.armed.store(true, Relaxed);
            a.timed_out.store(true, Relaxed);
            a.ticks_left.store(0, Relaxed);
            1
        } else if !a.armed.swap(true, Relaxed) {
            HOOK_EVERY as libc::c_int
        } else {
            return;
        };
        // SAFETY: `lua_sethook` may be called from a signal handler; the state is the one
        // running the call, which is not over (`in_call`).
        unsafe {
            ffi::lua_sethook(
                a.state.load(Relaxed),
                Some(count_hook),
                ffi::LUA_MASKCOUNT,
                every,
            )
        };
    });
}

/// Count `steps` of work done outside the Lua VM, where the hook cannot see it (pattern
/// matching), each worth an instruction: every [`HOOK_EVERY`] of them spend a tick, once the
/// budget is armed. False once the budget is spent.
pub fn spend(steps: u64) -> bool {
    let total = STEPS.get() + steps;
    STEPS.set(total % u64::from(HOOK_EVERY));
    spend_ticks(total / u64::from(HOOK_EVERY))
}

/// Spend `n` ticks of the call's budget ([`HOOK_EVERY`] instructions each) if it is armed.
/// False once the budget is spent.
fn spend_ticks(n: u64) -> bool {
    ACTIVE.with(|a| {
        if n == 0 || !a.armed.load(Relaxed) {
            return true;
        }
        let left = a.ticks_left.load(Relaxed);
        if left < n {
            a.ticks_left.store(0, Relaxed);
            a.exhausted.store(true, Relaxed);
            false
        } else {
            a.ticks_left.store(left - n, Relaxed);
            true
        }
    })
}

/// The error a call out of instructions is stopped with, after the place it was at.
pub const EXCEEDED: &std::ffi::CStr = c"instruction budget exceeded";
/// The error a call out of time ([`CALL_TIME_LIMIT`]) is stopped with.
pub const OUT_OF_TIME: &std::ffi::CStr = c"time limit exceeded";

/// The count hook: spends one tick of the budget, and raises an error once none is left.
unsafe extern "C-unwind" fn count_hook(state: *mut ffi::lua_State, _: *mut ffi::lua_Debug) {
    if !spend_ticks(1) {
        // SAFETY: raised from a hook, as Lua allows; nothing of this frame needs dropping.
        // In a hook, level 0 is the function that was running.
        unsafe { raise_exceeded(state, 0) }
    }
}

/// Raise `file.lua:LINE: instruction budget exceeded` ([`EXCEEDED`], or [`OUT_OF_TIME`]
/// for a call out of time), the place being that
/// of the innermost policy function from stack level `level` out (a C function, such as a
/// pattern function, has none, and Switchyard's own Lua helpers are passed over).
///
/// # Safety
/// `state` is running a call, and the caller holds nothing that needs dropping: the error
/// is a `longjmp`.
pub unsafe fn raise_exceeded(state: *mut ffi::lua_State, level: libc::c_int) -> ! {
    let what = if timed_out() { OUT_OF_TIME } else { EXCEEDED };
    unsafe {
        match policy_frame(state, level) {
            Some(ar) => ffi::lua_pushfstring(
                state,
                c"%s:%d: %s".as_ptr(),
                ar.short_src.as_ptr(),
                ar.currentline,
                what.as_ptr(),
            ),
            None => ffi::lua_pushstring(state, what.as_ptr()),
        };
        ffi::lua_error(state)
    }
}

/// The innermost stack level from `level` out that runs a policy's own code: one with a
/// current line (a C function, such as a pattern function, has none) that is not one of
/// Switchyard's own Lua helpers (`pcall`, the `req` view, the collection sampler).
///
/// # Safety
/// `state` is running a call on this thread. `lua_getstack` and `lua_getinfo` with "Sl"
/// only read its call stack and the functions' prototypes; Lua keeps the current line
/// saved wherever it can raise an error or allocate.
unsafe fn policy_frame(
    state: *mut ffi::lua_State,
    mut level: libc::c_int,
) -> Option<ffi::lua_Debug> {
    unsafe {
        // SAFETY: all zeros is a valid `lua_Debug` (null pointers, zero numbers).
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        while ffi::lua_getstack(state, level, &mut ar) != 0 {
            ffi::lua_getinfo(state, c"Sl".as_ptr(), &mut ar);
            let ours = std::ffi::CStr::from_ptr(ar.short_src.as_ptr()) == c"switchyard";
            if ar.currentline > 0 && !ours {
                return Some(ar);
            }
            level += 1;
        }
        None
    }
}

/// Note where the call in progress on this thread is in its policy's own code
/// (`file.lua:LINE`), for [`take_noted_place`]; nothing between calls. Called from inside
/// the call (a garbage collector's finalizer), so the place is the call's current one.
pub fn note_place() {
    let Some(state) = ACTIVE.with(|a| a.in_call.load(Relaxed).then(|| a.state.load(Relaxed)))
    else {
        return;
    };
    // SAFETY: the state is alive (its VM is making this call) and on this thread.
    let place = unsafe { policy_frame(state, 0) }.map(|ar| {
        // SAFETY: `short_src` is a NUL-terminated buffer that `lua_getinfo` filled.
        let file = unsafe { std::ffi::CStr::from_ptr(ar.short_src.as_ptr()) };
        format!("{}:{}", file.to_string_lossy(), ar.currentline)
    });
    if place.is_some() {
        NOTED_PLACE.set(place);
    }
}

/// The last place [`note_place`] noted in the call in progress (or the last call), if any.
pub fn take_noted_place() -> Option<String> {
    NOTED_PLACE.take()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog's bookkeeping: a call is numbered while it runs, and a thread's entry
    /// leaves the list when the thread ends, before it can no longer take a signal.
    #[test]
    fn a_call_is_numbered_while_it_runs_and_a_thread_s_slot_goes_when_it_ends() {
        let handle = std::thread::spawn(|| {
            let this_slot = || {
                SLOT.with(|cell| {
                    let r = cell.take().expect("registered");
                    let slot = r.0.clone();
                    cell.set(Some(r));
                    slot
                })
            };
            run(ptr::null_mut(), 1000, || {
                assert_eq!(this_slot().call.load(Relaxed), 1);
            });
            this_slot()
        });
        let slot = handle.join().unwrap();
        assert_eq!(slot.call.load(Relaxed), 0);
        assert_eq!(slot.calls.load(Relaxed), 1);
        let slots = watched().lock().unwrap();
        assert!(!slots.iter().any(|s| Arc::ptr_eq(s, &slot)));
    }
}
