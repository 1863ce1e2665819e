//! Passive outlier detection, 429 cool-downs and draining: whether a backend may take new
//! requests, learned from the requests themselves.
//!
//! - **Ejection**: `consecutive_failures` failures in a row (connect errors, 5xx, timeouts)
//!   eject a backend for a base time that doubles with each ejection (capped). When it
//!   ends, one probe request is let through (half-open): success closes the breaker,
//!   failure ejects it again for longer.
//! - **Cool-down**: a 429 takes the backend out for its `Retry-After` (capped, with a
//!   default); that is not a failure.
//! - **Drain**: an operator takes the backend out of rotation; requests in flight finish.
//!
//! The hot path reads one atomic flag; the mutex is taken only while something is tripped.
//! Time is `tokio::time::Instant`, so the transitions are tested on paused time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::OutlierConfig;

/// Whether a backend can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed breaker, no cool-down: a normal candidate.
    Open,
    /// The ejection ended: one probe request may go.
    Probe,
    /// Ejected, probing, cooling down or draining: not a candidate.
    Closed(Why),
}

/// How an attempt was let through; its outcome is recorded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// An ordinary request to a backend in rotation.
    Normal,
    /// The one half-open request after an ejection: its outcome ends or renews it.
    Probe,
    /// Sent in panic mode to a backend that is out (see `plan::eligible`): it neither ends
    /// nor renews an ejection.
    Panic,
}

/// Why a backend is not a candidate (for logs and the admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Ejected,
    CoolingDown,
    Draining,
}

#[derive(Debug, Default)]
pub struct Breaker {
    /// Set while ejected, probing or cooling down; the fast path reads only this.
    tripped: AtomicBool,
    draining: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    probing: bool,
    cooldown_until: Option<Instant>,
}

impl State {
    fn tripped(&self) -> bool {
        self.ejected_until.is_some() || self.probing || self.cooldown_until.is_some()
    }
}

impl Breaker {
    pub fn admission(&self, now: Instant) -> Admission {
        if self.draining.load(Ordering::Relaxed) {
            return Admission::Closed(Why::Draining);
        }
        if !self.tripped.load(Ordering::Acquire) {
            return Admission::Open;
        }
        let mut s = self.lock();
        if let Some(until) = s.cooldown_until {
            if now < until {
                return Admission::Closed(Why::CoolingDown);
            }
            s.cooldown_until = None;
        }
        let admission = match s.ejected_until {
            Some(until) if now < until => Admission::Closed(Why::Ejected),
            Some(_) if s.probing => Admission::Closed(Why::Ejected),
            Some(_) => Admission::Probe,
            None => Admission::Open,
        };
        self.tripped.store(s.tripped(), Ordering::Release);
        admission
    }

    /// A request is about to be sent. `None` if the backend may not take it after all
    /// (its single half-open probe is already out, it is cooling down or draining). In
    /// `panic` mode an ejected backend takes it anyway.
    pub fn begin(&self, now: Instant, panic: bool) -> Option<Pass> {
        match self.admission(now) {
            Admission::Open => Some(Pass::Normal),
            Admission::Probe => {
                let mut s = self.lock();
                if !s.probing {
                    s.probing = true;
                    Some(Pass::Probe)
                } else {
                    panic.then_some(Pass::Panic)
                }
            }
            Admission::Closed(Why::Ejected) => panic.then_some(Pass::Panic),
            Admission::Closed(Why::CoolingDown | Why::Draining) => None,
        }
    }

    /// Whether [`Breaker::begin`] would let a request through now, without taking the
    /// half-open probe.
    pub fn would_admit(&self, now: Instant, panic: bool) -> bool {
        match self.admission(now) {
            Admission::Open => true,
            Admission::Probe => panic || !self.lock().probing,
            Admission::Closed(Why::Ejected) => panic,
            Admission::Closed(Why::CoolingDown | Why::Draining) => false,
        }
    }

    /// A successful attempt, let through as `pass`.
    pub fn record_success(&self, pass: Pass) {
        if !self.tripped.load(Ordering::Acquire) {
            // Common case: nothing to reset but the failure streak.
            let mut s = self.lock();
            s.consecutive_failures = 0;
            return;
        }
        let mut s = self.lock();
        s.consecutive_failures = 0;
        if pass == Pass::Probe && s.probing {
            s.probing = false;
            s.ejected_until = None;
            s.ejections = s.ejections.saturating_sub(1);
        }
        self.tripped.store(s.tripped(), Ordering::Release);
    }

    /// A failed attempt, let through as `pass`. `may_eject` is false when ejecting this
    /// backend would take the share of ejected backends over the cap. Returns true if the
    /// backend was ejected.
    pub fn record_failure(
        &self,
        now: Instant,
        config: &OutlierConfig,
        may_eject: bool,
        pass: Pass,
    ) -> bool {
        let mut s = self.lock();
        s.consecutive_failures += 1;
        let failed_probe = pass == Pass::Probe && std::mem::take(&mut s.probing);
        let eject = failed_probe
            || (s.consecutive_failures >= config.consecutive_failures
                && s.ejected_until.is_none()
                && may_eject);
        if eject {
            s.ejections += 1;
            let factor = 1u32 << (s.ejections - 1).min(16);
            let time = Duration::from_millis(config.base_ejection_ms)
                .saturating_mul(factor)
                .min(Duration::from_millis(config.max_ejection_ms));
            s.ejected_until = Some(now + time);
            s.consecutive_failures = 0;
        }
        self.tripped.store(s.tripped(), Ordering::Release);
        eject
    }

    /// An attempt let through as `pass` ended with nothing learned (the client left, or it
    /// never started): if it was the probe, the next request may probe instead.
    pub fn release(&self, pass: Pass) {
        if pass != Pass::Probe {
            return;
        }
        let mut s = self.lock();
        s.probing = false;
        self.tripped.store(s.tripped(), Ordering::Release);
    }

    /// A 429 to an attempt let through as `pass`: out of rotation for `retry_after`
    /// (capped), or the default when absent.
    pub fn cool_down(
        &self,
        now: Instant,
        retry_after: Option<Duration>,
        config: &OutlierConfig,
        pass: Pass,
    ) {
        let wait = retry_after
            .unwrap_or(Duration::from_millis(config.default_cooldown_ms))
            .min(Duration::from_millis(config.max_cooldown_ms));
        let mut s = self.lock();
        let until = now + wait;
        s.cooldown_until = Some(s.cooldown_until.map_or(until, |u| u.max(until)));
        // A probe answered 429: the backend is alive; let the ejection end.
        if pass == Pass::Probe && s.probing {
            s.probing = false;
            s.ejected_until = None;
        }
        self.tripped.store(true, Ordering::Release);
    }

    /// How long the backend still cools down after a 429, if it does.
    pub fn cooling_for(&self, now: Instant) -> Option<Duration> {
        if !self.tripped.load(Ordering::Acquire) {
            return None;
        }
        self.lock()
            .cooldown_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ejected now (probe pending or not)?
    pub fn is_ejected(&self) -> bool {
        self.tripped.load(Ordering::Acquire) && self.lock().ejected_until.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection_ms: 1_000,
            max_ejection_ms: 10_000,
            max_ejected_percent: 50,
            default_cooldown_ms: 1_000,
            max_cooldown_ms: 30_000,
            panic_mode: false,
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn consecutive_failures_eject_then_one_probe_is_let_through() {
        let b = Breaker::default();
        let c = config();
        assert!(!b.record_failure(Instant::now(), &c, true, Pass::Normal));
        b.record_success(Pass::Normal); // a success resets the streak
        assert!(!b.record_failure(Instant::now(), &c, true, Pass::Normal));
        assert!(!b.record_failure(Instant::now(), &c, true, Pass::Normal));
        assert!(
            b.record_failure(Instant::now(), &c, true, Pass::Normal),
            "third in a row ejects"
        );
        assert_eq!(b.admission(Instant::now()), Admission::Closed(Why::Ejected));

        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(b.admission(Instant::now()), Admission::Closed(Why::Ejected));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(b.admission(Instant::now()), Admission::Probe);
        assert_eq!(
            b.begin(Instant::now(), false),
            Some(Pass::Probe),
            "the probe goes"
        );
        assert_eq!(
            b.begin(Instant::now(), false),
            None,
            "only one probe at a time"
        );
        b.record_success(Pass::Probe);
        assert_eq!(b.admission(Instant::now()), Admission::Open);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_failed_probe_ejects_for_longer_up_to_the_cap() {
        let b = Breaker::default();
        let c = config();
        for _ in 0..3 {
            b.record_failure(Instant::now(), &c, true, Pass::Normal);
        }
        // Ejections last 1, 2, 4, 8, then 10 (the cap) seconds.
        for ejection_ms in [1_000, 2_000, 4_000, 8_000, 10_000, 10_000] {
            tokio::time::advance(Duration::from_millis(ejection_ms - 1)).await;
            assert_eq!(
                b.admission(Instant::now()),
                Admission::Closed(Why::Ejected),
                "{ejection_ms}"
            );
            tokio::time::advance(Duration::from_millis(1)).await;
            let pass = b.begin(Instant::now(), false);
            assert_eq!(pass, Some(Pass::Probe), "probe after {ejection_ms} ms");
            assert!(
                b.record_failure(Instant::now(), &c, true, Pass::Probe),
                "a failed probe ejects again"
            );
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn panic_mode_passes_an_ejected_backend_without_touching_its_ejection() {
        let b = Breaker::default();
        let c = config();
        for _ in 0..3 {
            b.record_failure(Instant::now(), &c, true, Pass::Normal);
        }
        assert_eq!(b.begin(Instant::now(), false), None);
        assert_eq!(b.begin(Instant::now(), true), Some(Pass::Panic));
        // Neither outcome of a panic pass ends or renews the ejection.
        b.record_success(Pass::Panic);
        assert!(!b.record_failure(Instant::now(), &c, true, Pass::Panic));
        assert_eq!(b.admission(Instant::now()), Admission::Closed(Why::Ejected));

        // Once it ends, the probe goes first; panic passes go beside it, and only the
        // probe's outcome decides.
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(b.begin(Instant::now(), true), Some(Pass::Probe));
        assert_eq!(b.begin(Instant::now(), true), Some(Pass::Panic));
        assert!(!b.record_failure(Instant::now(), &c, true, Pass::Panic));
        b.record_success(Pass::Probe);
        assert_eq!(b.admission(Instant::now()), Admission::Open);

        // A probe that taught nothing (its client left) lets the next request probe.
        for _ in 0..3 {
            b.record_failure(Instant::now(), &c, true, Pass::Normal);
        }
        tokio::time::advance(Duration::from_millis(2_000)).await;
        assert_eq!(b.begin(Instant::now(), false), Some(Pass::Probe));
        b.release(Pass::Probe);
        assert_eq!(b.begin(Instant::now(), false), Some(Pass::Probe));
        b.record_success(Pass::Probe);

        // Panic mode never overrides a cool-down or a drain.
        b.cool_down(Instant::now(), None, &c, Pass::Normal);
        assert_eq!(b.begin(Instant::now(), true), None);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        b.set_draining(true);
        assert_eq!(b.begin(Instant::now(), true), None);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_ejection_cap_keeps_a_backend_in() {
        let b = Breaker::default();
        let c = config();
        for _ in 0..10 {
            assert!(!b.record_failure(Instant::now(), &c, false, Pass::Normal));
        }
        assert_eq!(b.admission(Instant::now()), Admission::Open);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_429_cools_down_for_retry_after_capped_and_is_no_failure() {
        let b = Breaker::default();
        let c = config();
        b.cool_down(
            Instant::now(),
            Some(Duration::from_secs(5)),
            &c,
            Pass::Normal,
        );
        assert_eq!(
            b.admission(Instant::now()),
            Admission::Closed(Why::CoolingDown)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.admission(Instant::now()), Admission::Open);

        b.cool_down(
            Instant::now(),
            Some(Duration::from_secs(3600)),
            &c,
            Pass::Normal,
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            b.admission(Instant::now()),
            Admission::Open,
            "capped at max_cooldown_ms"
        );

        b.cool_down(Instant::now(), None, &c, Pass::Normal);
        assert_eq!(
            b.admission(Instant::now()),
            Admission::Closed(Why::CoolingDown)
        );
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(
            b.admission(Instant::now()),
            Admission::Open,
            "default cool-down"
        );
    }

    #[test]
    fn draining_closes_admission() {
        let b = Breaker::default();
        b.set_draining(true);
        assert_eq!(
            b.admission(Instant::now()),
            Admission::Closed(Why::Draining)
        );
        b.set_draining(false);
        assert_eq!(b.admission(Instant::now()), Admission::Open);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&future).unwrap();
        assert!(d > Duration::from_secs(110) && d <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
