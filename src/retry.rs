//! The retry budget: retries may not exceed a share of live traffic, so a failing fleet is
//! not hammered with a multiple of its normal load. Counted over a sliding 10 s window;
//! a small floor of retries per second is always allowed so a quiet route can still fail
//! over.

use crate::window::{now_secs, Window};

const WINDOW_SECS: usize = 10;

#[derive(Debug, Default)]
pub struct RetryBudget {
    /// Requests (0) and retries (1) per second.
    window: Window<WINDOW_SECS>,
}

impl RetryBudget {
    /// Count a request (first attempts only).
    pub fn record_request(&self) {
        self.window.add(now_secs(), 0);
    }

    /// Take one retry from the budget if it allows: retries in the window stay under
    /// `percent` of requests, or under `min_per_sec` per second.
    pub fn try_retry(&self, percent: u32, min_per_sec: u32) -> bool {
        let now = now_secs();
        let [requests, retries] = self.window.sums(now);
        let allowed =
            (requests * percent as u64 / 100).max(min_per_sec as u64 * WINDOW_SECS as u64);
        if retries >= allowed {
            return false;
        }
        self.window.add(now, 1);
        true
    }
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
