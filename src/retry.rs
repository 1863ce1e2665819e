//! The retry budget: retries may not exceed a share of live traffic, so a failing fleet is
//! not hammered with a multiple of its normal load. Counted over a sliding 10 s window;
//! a small floor of retries per second is always allowed so a quiet route can still fail
//! over.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

const WINDOW_SECS: usize = 10;

#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [Slot; WINDOW_SECS],
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    /// Count a request (first attempts only).
    pub fn record_request(&self) {
        self.slot(now_secs())
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Take one retry from the budget if it allows: retries in the window stay under
    /// `percent` of requests, or under `min_per_sec` per second.
    pub fn try_retry(&self, percent: u32, min_per_sec: u32) -> bool {
        let now = now_secs();
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let sec = s.second.load(Ordering::Relaxed);
            if sec + WINDOW_SECS as u64 > now && sec <= now {
                requests += s.requests.load(Ordering::Relaxed) as u64;
                retries += s.retries.load(Ordering::Relaxed) as u64;
            }
        }
        let allowed =
            (requests * percent as u64 / 100).max(min_per_sec as u64 * WINDOW_SECS as u64);
        if retries >= allowed {
            return false;
        }
        self.slot(now).retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn slot(&self, now: u64) -> &Slot {
        let slot = &self.slots[(now % WINDOW_SECS as u64) as usize];
        let seen = slot.second.load(Ordering::Relaxed);
        if seen != now
            && slot
                .second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }
}

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_share_of_traffic_with_a_floor() {
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.record_request();
        }
        // 20% of 1000 = 200, above the floor of 1/s * 10 s.
        let granted = (0..500).filter(|_| b.try_retry(20, 1)).count();
        assert_eq!(granted, 200);
        let quiet = RetryBudget::default();
        let granted = (0..100).filter(|_| quiet.try_retry(20, 2)).count();
        assert_eq!(granted, 20, "the floor: 2 per second over 10 s");
    }
}
