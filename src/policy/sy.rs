//! `sy`, the helper table every policy sees: consistent hashing with bounded load, weighted
//! random choice, randomness, time, a rate-limited log, and a view of every configured
//! backend for governance policies.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mlua::{Function, Lua, Table, Value};

use super::tables::fresh_backend;
use super::vm::CallContext;

/// Load factor of `sy.hash`: no backend takes more than 1.25× the average in-flight load.
const HASH_LOAD_FACTOR: f64 = 1.25;
/// `sy.log` lines allowed per VM per second; the rest are counted and reported once.
const LOG_LINES_PER_SEC: u32 = 10;

/// Per-VM state of `sy.log`'s rate limit.
#[derive(Default)]
pub(super) struct LogLimiter {
    window_start: Option<Instant>,
    lines: u32,
    dropped: u32,
}

pub(super) fn build(lua: &Lua) -> mlua::Result<Table> {
    let sy = lua.create_table()?;
    sy.raw_set(
        "now_ms",
        lua.create_function(|_, ()| {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            Ok(ms as i64)
        })?,
    )?;
    sy.raw_set(
        "random",
        lua.create_function(|_, n: Option<i64>| {
            Ok(match n {
                Some(n) if n >= 1 => Value::Integer(rand::random_range(1..=n)),
                _ => Value::Number(rand::random::<f64>()),
            })
        })?,
    )?;
    sy.raw_set("log", lua.create_function(log)?)?;
    sy.raw_set(
        "weighted",
        lua.create_function(|_, backends: Table| weighted(&backends))?,
    )?;
    sy.raw_set(
        "hash",
        lua.create_function(|_, (key, backends): (Value, Table)| hash(&key, &backends))?,
    )?;
    sy.raw_set("backends", lua.create_function(all_backends)?)?;
    Ok(sy)
}

/// `sy.log(msg)`: an info line tagged with the policy name and version, at most
/// [`LOG_LINES_PER_SEC`] per second per VM.
fn log(lua: &Lua, msg: Value) -> mlua::Result<()> {
    let Some(mut limiter) = lua.app_data_mut::<LogLimiter>() else {
        return Ok(());
    };
    let policy = lua
        .app_data_ref::<CallContext>()
        .map(|c| c.policy.to_string())
        .unwrap_or_else(|| "?".into());
    let now = Instant::now();
    if limiter
        .window_start
        .is_none_or(|s| now.duration_since(s).as_secs() >= 1)
    {
        if limiter.dropped > 0 {
            log::info!(target: "switchyard::policy", "[{policy}] ({} sy.log lines dropped by the rate limit)", limiter.dropped);
        }
        limiter.window_start = Some(now);
        limiter.lines = 0;
        limiter.dropped = 0;
    }
    if limiter.lines >= LOG_LINES_PER_SEC {
        // Dropped before anything of the message is copied.
        limiter.dropped += 1;
        return Ok(());
    }
    limiter.lines += 1;
    let text = match &msg {
        Value::String(s) => super::printable(&s.as_bytes()),
        other => super::printable(format!("{other:?}").as_bytes()),
    };
    log::info!(target: "switchyard::policy", "[{policy}] {text}");
    Ok(())
}

fn name_of(entry: &Table) -> mlua::Result<String> {
    entry.get::<String>("name")
}

/// `sy.weighted(backends)`: a name chosen at random in proportion to `weight`.
fn weighted(backends: &Table) -> mlua::Result<Option<String>> {
    let mut entries = Vec::with_capacity(backends.raw_len().min(super::PREALLOCATED));
    let mut total = 0.0;
    for entry in backends.sequence_values::<Table>() {
        let entry = entry?;
        let w = entry.get::<Option<f64>>("weight")?.unwrap_or(1.0).max(0.0);
        total += w;
        entries.push((entry, w));
    }
    if entries.is_empty() {
        return Ok(None);
    }
    if total <= 0.0 {
        return name_of(&entries[rand::random_range(0..entries.len())].0).map(Some);
    }
    let mut pick = rand::random::<f64>() * total;
    for (entry, w) in &entries {
        if pick < *w {
            return name_of(entry).map(Some);
        }
        pick -= w;
    }
    name_of(&entries[entries.len() - 1].0).map(Some)
}

/// `sy.hash(key, backends)`: rendezvous (highest random weight) hashing with bounded load.
///
/// Each backend scores `hash(key, name)`, scaled by weight; the key goes to the best-scoring
/// backend whose in-flight count stays within 1.25× the average (plus one) after this
/// request. A key
/// keeps its backend while the set is unchanged, removing a backend moves only its keys,
/// and one hot key spills over to its second choice instead of overloading the first.
fn hash(key: &Value, backends: &Table) -> mlua::Result<Option<String>> {
    // The key is hashed once, in place, and its digest combined with each name: a long
    // key costs one pass, not one per backend (work the instruction budget cannot see).
    let key_digest = match key {
        Value::String(s) => xxhash_rust::xxh3::xxh3_64(&s.as_bytes()),
        Value::Integer(i) => xxhash_rust::xxh3::xxh3_64(i.to_string().as_bytes()),
        Value::Number(n) => xxhash_rust::xxh3::xxh3_64(n.to_string().as_bytes()),
        Value::Nil => return weighted(backends),
        other => {
            return Err(mlua::Error::runtime(format!(
                "sy.hash: key must be a string, not a {}",
                other.type_name()
            )))
        }
    };
    let mut scored = Vec::with_capacity(backends.raw_len().min(super::PREALLOCATED));
    let mut total_inflight = 0.0;
    for entry in backends.sequence_values::<Table>() {
        let entry = entry?;
        // Kept as Lua's string (no copy) until one is chosen: a list may repeat one huge
        // name many times.
        let name = entry.get::<mlua::LuaString>("name")?;
        let weight = entry.get::<Option<f64>>("weight")?.unwrap_or(1.0).max(1e-9);
        let inflight = entry.get::<Option<f64>>("inflight")?.unwrap_or(0.0);
        total_inflight += inflight;
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&name.as_bytes(), key_digest);
        // Map the hash to (0, 1), then -w / ln(u): weighted rendezvous score.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        scored.push((-weight / u.ln(), name, inflight));
    }
    if scored.is_empty() {
        return Ok(None);
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    // One request of slack: at near-zero load the bound alone would be 1, and a session
    // would leave its backend whenever its previous request was still being counted.
    let cap = ((total_inflight + 1.0) / scored.len() as f64 * HASH_LOAD_FACTOR).ceil() + 1.0;
    let chosen = scored
        .iter()
        .find(|(_, _, inflight)| inflight + 1.0 <= cap)
        .unwrap_or(&scored[0]);
    Ok(Some(chosen.1.to_str()?.to_string()))
}

/// `sy.backends{ model = m, all = true }`: configured backends serving `m` (every backend
/// when no model is given), each with `healthy` and `eligible`. Without `all`, only those
/// eligible now.
fn all_backends(lua: &Lua, opts: Option<Table>) -> mlua::Result<Table> {
    let (model, include_all) = match &opts {
        Some(t) => (
            t.get::<Option<String>>("model")?,
            t.get::<Option<bool>>("all")?.unwrap_or(false),
        ),
        None => (None, false),
    };
    let (set, test_listing) = match lua.app_data_ref::<CallContext>() {
        Some(c) => (c.all.clone(), c.test_listing.clone()),
        None => (None, None),
    };
    let Some(set) = set else {
        return match test_listing {
            Some(listing) => listing.call(opts),
            None => lua.create_table(),
        };
    };
    let out = lua.create_table()?;
    let readonly: Function = lua.named_registry_value("switchyard.readonly")?;
    let now = tokio::time::Instant::now();
    for b in set.each_serving(model.as_deref()) {
        let why_not = b.eligibility(now).err().map(|why| why.as_str());
        if include_all || why_not.is_none() {
            out.raw_push(fresh_backend(lua, &readonly, b, why_not)?)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(lua: &Lua, list: &[(&str, f64, f64)]) -> Table {
        let t = lua.create_table().unwrap();
        for (name, weight, inflight) in list {
            let e = lua.create_table().unwrap();
            e.set("name", *name).unwrap();
            e.set("weight", *weight).unwrap();
            e.set("inflight", *inflight).unwrap();
            t.raw_push(e).unwrap();
        }
        t
    }

    #[test]
    fn a_sparse_list_whose_length_is_astronomical_is_read_to_its_first_hole() {
        // Only hashed keys: `#t` is then 2^45, while the list holds 46 entries.
        let lua = Lua::new();
        let far: String = (2..=45)
            .map(|i| format!("[{}] = {{ name = 'x' }}, ", 1u64 << i))
            .collect();
        let literal = format!("return {{ [1] = {{ name = 'a' }}, [2] = {{ name = 'b' }}, {far}}}");
        let t: Table = lua.load(literal).eval().unwrap();
        assert!(t.raw_len() > 1 << 40, "{}", t.raw_len());
        let picked = weighted(&t).unwrap().unwrap();
        assert!(picked == "a" || picked == "b", "{picked}");
        let key = Value::String(lua.create_string("k").unwrap());
        let picked = hash(&key, &t).unwrap().unwrap();
        assert!(picked == "a" || picked == "b", "{picked}");
    }

    #[test]
    fn hash_is_stable_and_spreads_keys() {
        let lua = Lua::new();
        let b = backends(&lua, &[("a", 1.0, 0.0), ("b", 1.0, 0.0), ("c", 1.0, 0.0)]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = Value::String(lua.create_string(format!("session-{i}")).unwrap());
            let first = hash(&key, &b).unwrap().unwrap();
            assert_eq!(
                hash(&key, &b).unwrap().unwrap(),
                first,
                "same key, same backend"
            );
            *counts.entry(first).or_insert(0) += 1;
        }
        for (name, n) in counts {
            assert!((800..1200).contains(&n), "{name} got {n} of 3000");
        }
    }

    #[test]
    fn hash_spills_a_hot_key_past_an_overloaded_backend() {
        let lua = Lua::new();
        let key = Value::String(lua.create_string("hot").unwrap());
        let idle = backends(&lua, &[("a", 1.0, 0.0), ("b", 1.0, 0.0), ("c", 1.0, 0.0)]);
        let home = hash(&key, &idle).unwrap().unwrap();
        let loaded: Vec<(&str, f64, f64)> = ["a", "b", "c"]
            .iter()
            .map(|n| (*n, 1.0, if *n == home { 10.0 } else { 0.0 }))
            .collect();
        let moved = hash(&key, &backends(&lua, &loaded)).unwrap().unwrap();
        assert_ne!(moved, home);
    }

    #[test]
    fn hash_keeps_a_key_home_at_low_load() {
        let lua = Lua::new();
        let key = Value::String(lua.create_string("s").unwrap());
        let idle = backends(&lua, &[("a", 1.0, 0.0), ("b", 1.0, 0.0), ("c", 1.0, 0.0)]);
        let home = hash(&key, &idle).unwrap().unwrap();
        // The key's previous request still counted in flight on its home backend.
        let busy: Vec<(&str, f64, f64)> = ["a", "b", "c"]
            .iter()
            .map(|n| (*n, 1.0, if *n == home { 1.0 } else { 0.0 }))
            .collect();
        assert_eq!(hash(&key, &backends(&lua, &busy)).unwrap().unwrap(), home);
    }

    #[test]
    fn weighted_follows_weights() {
        let lua = Lua::new();
        let b = backends(&lua, &[("a", 3.0, 0.0), ("b", 1.0, 0.0)]);
        let a = (0..4000)
            .filter(|_| weighted(&b).unwrap().unwrap() == "a")
            .count();
        assert!((2800..3200).contains(&a), "a got {a} of 4000");
    }
}
