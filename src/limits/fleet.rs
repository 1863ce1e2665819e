//! Limit counters in Redis, shared by every instance of a fleet. Each admission and
//! settlement is one server-side Lua script, so instances never race each other.
//!
//! Redis is talked to from a small runtime of its own (one thread) that also watches it:
//! the first failed call marks it down, requests fall back to this instance's counters
//! (remembered in a journal), and once Redis answers again the journal is replayed into it
//! before it is used again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, Script};
use anyhow::Context;
use log::{info, warn};

use super::{log_store_down, Ask, Kind, Outcome, Settle, Snapshot, WINDOW_MS};
use crate::config::{FailMode, RedisConfig};
use crate::metrics::REDIS_UP;

/// Most effects remembered while Redis is away; older ones are dropped beyond it.
const JOURNAL_MAX: usize = 100_000;

/// Why a Redis call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallError {
    /// No connection or no answer in time: Redis is now marked down.
    Unreachable,
    /// Redis answered with an error (a script error, out of memory).
    Refused,
}
/// How often an unreachable Redis is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Something counted on this instance while Redis was away, to replay into it.
#[derive(Debug)]
enum Effect {
    Admitted {
        tenant: String,
        id: String,
        at_ms: u64,
        requests: bool,
        tokens: Option<u64>,
        nano: i64,
        day: u64,
    },
    Settled(Settle),
    /// An admission whose answer never came, for a request this instance then refused:
    /// undone if Redis ran it (see [`RedisCounters::withdraw`]).
    Withdrawn(Settle),
}

pub struct RedisCounters {
    conn: ConnectionManager,
    up: AtomicBool,
    fail_open: bool,
    prefix: String,
    lease_ms: u64,
    timeout: Duration,
    journal: Mutex<VecDeque<Effect>>,
    /// The journal overflowed since it was last empty (logged once).
    journal_overflowed: AtomicBool,
    admit: Script,
    settle: Script,
    replay: Script,
}

impl RedisCounters {
    /// Connect (lazily: an unreachable Redis at start is an outage like any other) and start
    /// the thread that talks to it.
    pub fn start(config: &RedisConfig) -> anyhow::Result<Arc<RedisCounters>> {
        let url = config.resolve_url().map_err(anyhow::Error::msg)?;
        let client = ::redis::Client::open(url).context("redis.url")?;
        if let Some(password) = client.get_connection_info().redis_settings().password() {
            crate::redact::register(password);
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("redis-limits")
            .enable_all()
            .build()
            .context("starting the redis runtime")?;
        // The runtime lives as long as the process, like the counters that use it.
        let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(runtime));
        let conn = {
            let _in_runtime = runtime.enter();
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(RETRY_EVERY);
            ConnectionManager::new_lazy_with_config(client, manager).context("redis client")?
        };
        let counters = Arc::new(RedisCounters {
            conn,
            up: AtomicBool::new(true),
            fail_open: config.on_failure == FailMode::Open,
            prefix: config.key_prefix.clone(),
            lease_ms: config.lease_seconds * 1000,
            timeout,
            journal: Mutex::new(VecDeque::new()),
            journal_overflowed: AtomicBool::new(false),
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            replay: Script::new(include_str!("replay.lua")),
        });
        REDIS_UP.set(1);
        runtime.spawn(watch(counters.clone()));
        Ok(counters)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn mark_down(&self, err: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            REDIS_UP.set(0);
            log_store_down(err, self.fail_open);
        }
    }

    /// `{prefix}:{tenant}:what`; the braces keep one tenant's keys on one cluster slot.
    fn key(&self, tenant: &str, what: &str) -> String {
        format!("{}:{{{tenant}}}:{what}", self.prefix)
    }

    fn spend_key(&self, tenant: &str, day: u64) -> String {
        self.key(tenant, &format!("usd:{day}"))
    }

    /// Run one admission script. `Err` means Redis is unreachable (now marked down).
    pub async fn admit(&self, ask: &Ask<'_>) -> Result<Outcome, ()> {
        let l = ask.limits;
        let limit = |v: Option<u64>| v.map_or(-1, |v| v as i64);
        let mut call = self.admit.prepare_invoke();
        call.key(self.key(ask.tenant, "req"))
            .key(self.key(ask.tenant, "tok"))
            .key(self.key(ask.tenant, "tokn"))
            .key(self.key(ask.tenant, "toksum"))
            .key(self.key(ask.tenant, "conc"))
            .key(self.spend_key(ask.tenant, ask.day))
            .key(self.key(ask.tenant, "usdmarks"))
            .arg(ask.id)
            .arg(limit(l.rpm))
            .arg(limit(l.tpm))
            .arg(limit(l.concurrent))
            .arg(ask.budget_nano().unwrap_or(-1))
            .arg(ask.tokens)
            .arg(ask.nano)
            .arg(self.lease_ms)
            .arg(WINDOW_MS)
            .arg(ask.day);
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self
            .call(call.invoke_async(&mut conn))
            .await
            .map_err(|_| ())?;
        let [admitted, kind, retry_ms, requests, tokens, inflight, spent] = reply[..] else {
            self.mark_down("unexpected reply from the admission script");
            return Err(());
        };
        let snapshot = Snapshot {
            requests: requests as u64,
            tokens: tokens.max(0) as u64,
            inflight: inflight as u64,
            spent_nano: spent,
        };
        if admitted == 1 {
            return Ok(Outcome::Admitted(snapshot));
        }
        let kind = match kind {
            1 => Kind::Concurrent,
            2 => Kind::Requests,
            3 => Kind::Tokens,
            _ => Kind::Spend,
        };
        Ok(Outcome::Refused {
            kind,
            retry_ms: retry_ms.max(0) as u64,
            snapshot,
        })
    }

    /// Settle a request; remembered for later if Redis is away, or if earlier effects are
    /// still waiting to be replayed (they go first).
    pub async fn settle(&self, s: Settle) {
        let queued = !self.journal.lock().expect("journal poisoned").is_empty();
        if self.is_up() && !queued && self.run_settle(&s).await.is_ok() {
            return;
        }
        self.remember(Effect::Settled(s));
    }

    /// Give back what an admission whose answer never came may have taken in Redis (its
    /// concurrency slot, tokens and spend), for a request this instance then refused; a
    /// no-op where Redis never ran it. Journaled while Redis is away, as settlements are.
    pub async fn withdraw(&self, ask: &Ask<'_>) {
        let s = Settle {
            tenant: ask.tenant.to_string(),
            id: ask.id.to_string(),
            concurrent: ask.limits.concurrent.is_some(),
            tokens: ask.limits.tpm.map(|_| 0),
            nano_delta: -ask.nano,
            day: ask.day,
        };
        let queued = !self.journal.lock().expect("journal poisoned").is_empty();
        if self.is_up() && !queued && self.run_settle_as(&s, true).await.is_ok() {
            return;
        }
        self.remember(Effect::Withdrawn(s));
    }

    async fn run_settle(&self, s: &Settle) -> Result<(), CallError> {
        self.run_settle_as(s, false).await
    }

    /// The settlement script; `withdrawal`: its spend only if the admission was counted.
    async fn run_settle_as(&self, s: &Settle, withdrawal: bool) -> Result<(), CallError> {
        let mut call = self.settle.prepare_invoke();
        call.key(self.key(&s.tenant, "tok"))
            .key(self.key(&s.tenant, "tokn"))
            .key(self.key(&s.tenant, "toksum"))
            .key(self.key(&s.tenant, "conc"))
            .key(self.spend_key(&s.tenant, s.day))
            .key(self.key(&s.tenant, "usdmarks"))
            .key(self.key(&s.tenant, "req"))
            .arg(&s.id)
            .arg(s.tokens.map_or(-1, |t| t as i64))
            .arg(s.nano_delta)
            .arg(WINDOW_MS)
            .arg(u8::from(withdrawal));
        let mut conn = self.conn.clone();
        let _: i64 = self.call(call.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// A request admitted on this instance's counters while Redis was away.
    pub fn remember_admission(&self, ask: &Ask, now_ms: u64) {
        let l = ask.limits;
        self.remember(Effect::Admitted {
            tenant: ask.tenant.to_string(),
            id: ask.id.to_string(),
            at_ms: now_ms,
            requests: l.rpm.is_some(),
            tokens: l.tpm.map(|_| ask.tokens),
            nano: if l.usd_per_day.is_some() { ask.nano } else { 0 },
            day: ask.day,
        });
    }

    fn remember(&self, e: Effect) {
        let mut journal = self.journal.lock().expect("journal poisoned");
        if journal.len() >= JOURNAL_MAX {
            journal.pop_front();
            if !self.journal_overflowed.swap(true, Ordering::Relaxed) {
                warn!(target: "switchyard::limits", "{JOURNAL_MAX} counts are waiting for redis; the oldest are dropped from now on and will not be replayed");
            }
        }
        journal.push_back(e);
    }

    /// Await a Redis call within the timeout. A connection failure or timeout marks Redis
    /// down; an error Redis answered (a script error, out of memory) fails only this call,
    /// which then falls back like an outage, without taking every tenant off Redis.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e))
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal() =>
            {
                self.mark_down(&e.to_string());
                Err(CallError::Unreachable)
            }
            Ok(Err(e)) => {
                warn!(target: "switchyard::limits", "redis refused a limit script: {e}");
                Err(CallError::Refused)
            }
            Err(_) => {
                self.mark_down(&format!("no answer within {} ms", self.timeout.as_millis()));
                Err(CallError::Unreachable)
            }
        }
    }

    /// Replay the journal into Redis, oldest first. While Redis is unreachable the rest is
    /// kept; an effect Redis refuses (logged by `call`) is dropped, or it would hold back
    /// every effect behind it for good.
    async fn replay_journal(&self) -> Result<usize, ()> {
        let mut done = 0;
        loop {
            let Some(effect) = self.journal.lock().expect("journal poisoned").pop_front() else {
                self.journal_overflowed.store(false, Ordering::Relaxed);
                return Ok(done);
            };
            let result = match &effect {
                Effect::Settled(s) => self.run_settle(s).await,
                Effect::Withdrawn(s) => self.run_settle_as(s, true).await,
                Effect::Admitted {
                    tenant,
                    id,
                    at_ms,
                    requests,
                    tokens,
                    nano,
                    day,
                } => {
                    let mut call = self.replay.prepare_invoke();
                    call.key(self.key(tenant, "req"))
                        .key(self.key(tenant, "tok"))
                        .key(self.key(tenant, "tokn"))
                        .key(self.key(tenant, "toksum"))
                        .key(self.spend_key(tenant, *day))
                        .key(self.key(tenant, "usdmarks"))
                        .arg(id)
                        .arg(*at_ms)
                        .arg(u8::from(*requests))
                        .arg(tokens.map_or(-1, |t| t as i64))
                        .arg(*nano)
                        .arg(WINDOW_MS);
                    let mut conn = self.conn.clone();
                    self.call(call.invoke_async::<i64>(&mut conn))
                        .await
                        .map(|_| ())
                }
            };
            match result {
                Ok(()) => done += 1,
                Err(CallError::Refused) => {}
                Err(CallError::Unreachable) => {
                    self.journal
                        .lock()
                        .expect("journal poisoned")
                        .push_front(effect);
                    return Err(());
                }
            }
        }
    }
}

/// While Redis is marked down, try it every [`RETRY_EVERY`]; when it answers, replay what
/// was counted here meanwhile, then use it again.
async fn watch(counters: Arc<RedisCounters>) {
    loop {
        tokio::time::sleep(RETRY_EVERY).await;
        if counters.is_up() {
            // Effects remembered behind others while it was up (see `settle`).
            let waiting = !counters
                .journal
                .lock()
                .expect("journal poisoned")
                .is_empty();
            if waiting {
                let _ = counters.replay_journal().await;
            }
            continue;
        }
        let mut conn = counters.conn.clone();
        let ping = ::redis::cmd("PING");
        let answer = tokio::time::timeout(counters.timeout, ping.query_async::<String>(&mut conn));
        if !matches!(answer.await, Ok(Ok(_))) {
            continue;
        }
        // `call` marks it down on failure; it is already down, so nothing is logged twice.
        match counters.replay_journal().await {
            Ok(n) => {
                counters.up.store(true, Ordering::Relaxed);
                // What was counted here while the flag changed.
                let _ = counters.replay_journal().await;
                if counters.is_up() {
                    REDIS_UP.set(1);
                    info!(target: "switchyard::limits", "redis reachable again; {n} counts made while it was away were replayed into it; limits are fleet-wide again");
                }
            }
            Err(()) => {
                warn!(target: "switchyard::limits", "redis answered but replaying local counts failed; trying again");
            }
        }
    }
}
