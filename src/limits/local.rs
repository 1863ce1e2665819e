//! Limit counters held by this instance alone: used without Redis, and while Redis is
//! unreachable (fail-open). The same rules as the Redis scripts, so a fleet of one behaves
//! like a fleet of many.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::{Ask, Kind, Outcome, Settle, Snapshot, DAY_MS, WINDOW_MS};

/// One tenant's counters.
#[derive(Debug, Default)]
struct Counters {
    /// Admission times (ms) in the last minute.
    requests: VecDeque<u64>,
    /// Token entries in the last minute, oldest first.
    tokens: VecDeque<TokenEntry>,
    /// Sequence number of the front entry of `tokens` (entries are numbered in order).
    front_seq: u64,
    /// Entry sequence numbers by the xxh3 hash of their request id, so a settlement finds
    /// its reservation without a walk through the window.
    seq_by_id: HashMap<u64, u64>,
    token_sum: u64,
    inflight: u64,
    /// The UTC day `spent_nano` belongs to.
    day: u64,
    spent_nano: i64,
}

/// Tokens counted for one request in the window.
#[derive(Debug)]
struct TokenEntry {
    /// Admitted (or settled after its reservation left the window) at, in ms.
    at: u64,
    id: String,
    tokens: u64,
}

fn id_hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

impl Counters {
    fn push_tokens(&mut self, at: u64, id: &str, tokens: u64) {
        let seq = self.front_seq + self.tokens.len() as u64;
        self.seq_by_id.insert(id_hash(id), seq);
        self.tokens.push_back(TokenEntry {
            at,
            id: id.to_string(),
            tokens,
        });
        self.token_sum = self.token_sum.saturating_add(tokens);
    }

    /// The window's entry for request `id`, if it is still in the window. A mapping is
    /// removed only when its entry leaves the window (entries leave in order), so no
    /// mapping means no entry.
    fn tokens_of(&mut self, id: &str) -> Option<&mut TokenEntry> {
        let seq = *self.seq_by_id.get(&id_hash(id))?;
        let at = seq.checked_sub(self.front_seq).map(|i| i as usize);
        match at {
            Some(i) if self.tokens.get(i).is_some_and(|e| e.id == id) => self.tokens.get_mut(i),
            // Another id with the same hash took the mapping: look the slow way.
            _ => self.tokens.iter_mut().find(|e| e.id == id),
        }
    }

    fn expire(&mut self, now: u64) {
        let cutoff = now.saturating_sub(WINDOW_MS);
        while self.requests.front().is_some_and(|&t| t <= cutoff) {
            self.requests.pop_front();
        }
        while self.tokens.front().is_some_and(|e| e.at <= cutoff) {
            let e = self.tokens.pop_front().expect("front exists");
            let hash = id_hash(&e.id);
            if self.seq_by_id.get(&hash) == Some(&self.front_seq) {
                self.seq_by_id.remove(&hash);
            }
            self.front_seq += 1;
            self.token_sum = self.token_sum.saturating_sub(e.tokens);
        }
        let day = now / DAY_MS;
        if day != self.day {
            self.day = day;
            self.spent_nano = 0;
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.len() as u64,
            tokens: self.token_sum,
            inflight: self.inflight,
            spent_nano: self.spent_nano,
        }
    }

    /// When `needed` more tokens fit under `limit`, as ms from `now`.
    fn tokens_free_in(&self, needed: u64, limit: u64, now: u64) -> u64 {
        if needed > limit {
            return WINDOW_MS;
        }
        let mut sum = self.token_sum;
        for e in &self.tokens {
            sum = sum.saturating_sub(e.tokens);
            if sum.saturating_add(needed) <= limit {
                return (e.at + WINDOW_MS).saturating_sub(now);
            }
        }
        0
    }
}

/// Every tenant's counters, behind one lock held for microseconds.
#[derive(Debug, Default)]
pub struct LocalCounters {
    tenants: Mutex<HashMap<String, Counters>>,
}

impl LocalCounters {
    /// Check every limit of `ask` and, if all allow it, count the request.
    pub fn admit(&self, ask: &Ask, now: u64) -> Outcome {
        let mut tenants = self.tenants.lock().expect("limit counters poisoned");
        let c = tenants.entry(ask.tenant.to_string()).or_default();
        c.expire(now);
        let l = ask.limits;
        let refuse = |kind, retry_ms| Outcome::Refused {
            kind,
            retry_ms,
            snapshot: c.snapshot(),
        };
        if l.concurrent.is_some_and(|max| c.inflight >= max) {
            return refuse(Kind::Concurrent, 1_000);
        }
        if let Some(max) = l.rpm {
            if c.requests.len() as u64 >= max {
                let oldest = c.requests.front().copied().unwrap_or(now);
                return refuse(Kind::Requests, (oldest + WINDOW_MS).saturating_sub(now));
            }
        }
        if let Some(max) = l.tpm {
            if c.token_sum.saturating_add(ask.tokens) > max {
                return refuse(Kind::Tokens, c.tokens_free_in(ask.tokens, max, now));
            }
        }
        if let Some(budget) = ask.budget_nano() {
            if c.spent_nano.saturating_add(ask.nano) > budget {
                return refuse(Kind::Spend, (c.day + 1) * DAY_MS - now);
            }
        }
        if l.rpm.is_some() {
            c.requests.push_back(now);
        }
        if l.tpm.is_some() {
            c.push_tokens(now, ask.id, ask.tokens);
        }
        if l.concurrent.is_some() {
            c.inflight += 1;
        }
        if l.usd_per_day.is_some() {
            c.spent_nano = c.spent_nano.saturating_add(ask.nano);
        }
        Outcome::Admitted(c.snapshot())
    }

    /// Release the request's concurrency slot and replace its reservation with what it
    /// really used.
    pub fn settle(&self, s: &Settle, now: u64) {
        let mut tenants = self.tenants.lock().expect("limit counters poisoned");
        let Some(c) = tenants.get_mut(&s.tenant) else {
            return;
        };
        c.expire(now);
        if s.concurrent {
            c.inflight = c.inflight.saturating_sub(1);
        }
        if let Some(actual) = s.tokens {
            match c.tokens_of(&s.id) {
                Some(entry) => {
                    let reserved = std::mem::replace(&mut entry.tokens, actual);
                    c.token_sum = c.token_sum.saturating_sub(reserved).saturating_add(actual);
                }
                // The reservation left the window already: the usage counts from now.
                None if actual > 0 => c.push_tokens(now, &s.id, actual),
                None => {}
            }
        }
        if c.day == s.day {
            c.spent_nano = c.spent_nano.saturating_add(s.nano_delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantLimits;

    fn limits(rpm: Option<u64>, tpm: Option<u64>, concurrent: Option<u64>) -> TenantLimits {
        TenantLimits {
            rpm,
            tpm,
            concurrent,
            usd_per_day: None,
            default_max_tokens: 0,
        }
    }

    fn ask<'a>(id: &'a str, l: &'a TenantLimits, tokens: u64) -> Ask<'a> {
        Ask {
            tenant: "t",
            id,
            limits: l,
            tokens,
            nano: 0,
            day: 0,
        }
    }

    const T0: u64 = 1_000 * DAY_MS;

    /// Settle request `id` of tenant `t` at `tokens` (no slot, no spend) at `now`.
    fn settle_tokens(c: &LocalCounters, id: &str, tokens: u64, now: u64) {
        c.settle(
            &Settle {
                tenant: "t".into(),
                id: id.into(),
                concurrent: false,
                tokens: Some(tokens),
                nano_delta: 0,
                day: T0 / DAY_MS,
            },
            now,
        )
    }

    #[test]
    fn requests_per_minute_slide() {
        let c = LocalCounters::default();
        let l = limits(Some(2), None, None);
        assert!(matches!(
            c.admit(&ask("a", &l, 0), T0),
            Outcome::Admitted(_)
        ));
        assert!(matches!(
            c.admit(&ask("b", &l, 0), T0 + 10_000),
            Outcome::Admitted(_)
        ));
        match c.admit(&ask("c", &l, 0), T0 + 20_000) {
            Outcome::Refused { kind, retry_ms, .. } => {
                assert_eq!(kind, Kind::Requests);
                assert_eq!(retry_ms, 40_000, "the oldest leaves the window at T0+60s");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            c.admit(&ask("d", &l, 0), T0 + 60_001),
            Outcome::Admitted(_)
        ));
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let c = LocalCounters::default();
        let l = limits(None, Some(1_000), None);
        assert!(matches!(
            c.admit(&ask("a", &l, 600), T0),
            Outcome::Admitted(_)
        ));
        // The reservation holds: a second 600 does not fit.
        assert!(matches!(
            c.admit(&ask("b", &l, 600), T0 + 1),
            Outcome::Refused {
                kind: Kind::Tokens,
                ..
            }
        ));
        // Settled to 100 used: now it fits.
        c.settle(
            &Settle {
                tenant: "t".into(),
                id: "a".into(),
                concurrent: false,
                tokens: Some(100),
                nano_delta: 0,
                day: T0 / DAY_MS,
            },
            T0 + 2,
        );
        match c.admit(&ask("b", &l, 600), T0 + 3) {
            Outcome::Admitted(s) => assert_eq!(s.tokens, 700),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_settlement_finds_its_reservation_among_many_and_after_it_left_the_window() {
        let c = LocalCounters::default();
        let l = limits(None, Some(1_000_000), None);
        let ids: Vec<String> = (0..5_000).map(|i| format!("r{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let at = T0 + i as u64 * 10; // 5 000 requests over 50 s
            assert!(matches!(
                c.admit(&ask(id, &l, 10), at),
                Outcome::Admitted(_)
            ));
        }
        let settle = |id: &str, tokens: u64, now: u64| settle_tokens(&c, id, tokens, now);
        let counted = |now: u64| match c.admit(&ask("probe", &limits(None, Some(1), None), 2), now)
        {
            Outcome::Refused { snapshot, .. } => snapshot.tokens,
            o => panic!("{o:?}"),
        };
        assert_eq!(counted(T0 + 50_000), 50_000);
        settle("r2500", 3, T0 + 50_000);
        assert_eq!(
            counted(T0 + 50_000),
            50_000 - 7,
            "the middle entry is settled"
        );
        // 30 s later the first half left the window; r100 left it with its reservation,
        // so its usage counts from now.
        let later = T0 + 80_000;
        let before = counted(later);
        settle("r100", 4, later);
        assert_eq!(counted(later), before + 4);
        settle("r4999", 0, later);
        assert_eq!(counted(later), before + 4 - 10);
    }

    #[test]
    fn usage_far_past_any_limit_saturates_and_leaves_the_window_without_wrapping() {
        let c = LocalCounters::default();
        let l = limits(None, Some(1_000), None);
        assert!(matches!(
            c.admit(&ask("a", &l, 10), T0),
            Outcome::Admitted(_)
        ));
        let settle = |id: &str, tokens: u64, now: u64| settle_tokens(&c, id, tokens, now);
        // One settled in the window, one after its reservation left it: the sum saturates.
        settle("a", 5_000, T0 + 1_000);
        settle("gone", u64::MAX, T0 + 2_000);
        assert!(matches!(
            c.admit(&ask("b", &l, 1), T0 + 3_000),
            Outcome::Refused { .. }
        ));
        // Once both leave the window the tenant is admitted again, not locked out by a sum
        // that wrapped around.
        match c.admit(&ask("c", &l, 1), T0 + 2_000 + WINDOW_MS + 1) {
            Outcome::Admitted(_) => {}
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn concurrency_is_released_on_settle() {
        let c = LocalCounters::default();
        let l = limits(None, None, Some(1));
        assert!(matches!(
            c.admit(&ask("a", &l, 0), T0),
            Outcome::Admitted(_)
        ));
        assert!(matches!(
            c.admit(&ask("b", &l, 0), T0),
            Outcome::Refused {
                kind: Kind::Concurrent,
                ..
            }
        ));
        c.settle(
            &Settle {
                tenant: "t".into(),
                id: "a".into(),
                concurrent: true,
                tokens: None,
                nano_delta: 0,
                day: T0 / DAY_MS,
            },
            T0,
        );
        assert!(matches!(
            c.admit(&ask("b", &l, 0), T0),
            Outcome::Admitted(_)
        ));
    }

    #[test]
    fn the_daily_budget_resets_at_utc_midnight() {
        let c = LocalCounters::default();
        let l = TenantLimits {
            usd_per_day: Some(1.0),
            ..limits(None, None, None)
        };
        let mut a = ask("a", &l, 0);
        a.nano = 800_000_000;
        assert!(matches!(c.admit(&a, T0 + 5_000), Outcome::Admitted(_)));
        a.id = "b";
        match c.admit(&a, T0 + 6_000) {
            Outcome::Refused { kind, retry_ms, .. } => {
                assert_eq!(kind, Kind::Spend);
                assert_eq!(retry_ms, DAY_MS - 6_000);
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(c.admit(&a, T0 + DAY_MS), Outcome::Admitted(_)));
    }
}
