//! A sliding window of per-second counters, shared lock-free by every worker thread: the
//! 60 s success/failure window behind a backend's `error_rate`, and the 10 s
//! request/retry window behind the retry budget.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Two counters per second over the last `N` seconds.
#[derive(Debug)]
pub struct Window<const N: usize> {
    slots: [Slot; N],
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    counts: [AtomicU32; 2],
}

impl<const N: usize> Default for Window<N> {
    fn default() -> Self {
        Window {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

impl<const N: usize> Window<N> {
    /// Add to counter `which` (0 or 1) in the slot of second `now`.
    pub fn add(&self, now: u64, which: usize) {
        let slot = &self.slots[(now % N as u64) as usize];
        let seen = slot.second.load(Ordering::Relaxed);
        if seen != now
            && slot
                .second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // First count of a new second in this slot: forget what it held N seconds ago.
            for c in &slot.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        slot.counts[which].fetch_add(1, Ordering::Relaxed);
    }

    /// Both counters summed over the window ending at second `now`.
    pub fn sums(&self, now: u64) -> [u64; 2] {
        let mut sums = [0u64; 2];
        for slot in &self.slots {
            let s = slot.second.load(Ordering::Relaxed);
            if s + N as u64 > now && s <= now {
                for (sum, c) in sums.iter_mut().zip(&slot.counts) {
                    *sum += c.load(Ordering::Relaxed) as u64;
                }
            }
        }
        sums
    }
}

/// Whole seconds on a monotonic clock that starts at 1 (0 means "never" in a slot).
pub fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expire_after_the_window() {
        let w = Window::<3>::default();
        w.add(10, 0);
        w.add(10, 1);
        w.add(11, 1);
        assert_eq!(w.sums(11), [1, 2]);
        assert_eq!(w.sums(12), [1, 2]);
        assert_eq!(w.sums(13), [0, 1], "second 10 has left the window");
        w.add(13, 0); // reuses second 10's slot
        assert_eq!(w.sums(13), [1, 1]);
    }
}
