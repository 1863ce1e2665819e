//! The routing audit: one JSON line per request saying who asked for what, which policy
//! version decided, which backends it was offered and chose, why any were skipped, every
//! attempt and its outcome, and what it cost. No prompt text, no credentials.
//!
//! Lines go to a file (or stdout) from a writer thread fed by a bounded channel, so the
//! request path never waits on a disk. With `chain: true` each line carries the hash of the
//! line before it and its own hash, so an edited or removed line is detected by
//! `switchyard audit verify FILE`. The latest records are also kept in memory for the
//! admin API and the dashboard.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Records kept in memory for `GET /admin/decisions`.
const RECENT: usize = 200;
/// Records waiting for the writer; past this they are dropped and counted.
const QUEUE: usize = 16_384;
/// `prev` of the first line of a chain.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One request, as the audit records it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub time: AuditTime,
    pub request_id: String,
    pub tenant: String,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    /// `name@version` of the policy that decided.
    pub policy: Option<String>,
    /// Backends offered to the policy.
    pub candidates: Vec<String>,
    /// The plan after the guardrails, in order.
    pub plan: Vec<String>,
    /// Backends left out, and why (guardrail, unhealthy, ejected, cooling down, ...).
    pub skipped: Vec<Skipped>,
    pub attempts: Vec<AttemptRecord>,
    /// The backend whose answer the client got.
    pub backend: Option<String>,
    pub status: u16,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub backend: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub backend: String,
    pub outcome: String,
}

/// When a request ended: written as RFC 3339 with milliseconds in UTC
/// (`2026-01-31T12:00:00.000Z`), formatted only when the record is written or shown — most
/// records of a memory-only audit never are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditTime(pub SystemTime);

impl AuditTime {
    pub fn now() -> AuditTime {
        AuditTime(SystemTime::now())
    }
}

impl Serialize for AuditTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let time: chrono::DateTime<chrono::Utc> = self.0.into();
        serializer.serialize_str(&time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }
}

/// Where records go.
#[derive(Debug)]
pub struct Audit {
    sink: Option<SyncSender<Arc<AuditRecord>>>,
    recent: Mutex<VecDeque<Arc<AuditRecord>>>,
    dropped: AtomicU64,
}

impl Audit {
    /// An audit that only keeps recent records in memory.
    pub fn memory_only() -> Audit {
        Audit {
            sink: None,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            dropped: AtomicU64::new(0),
        }
    }

    /// Write to `path` (`-` for stdout), chained or not.
    pub fn to_file(path: &Path, chain: bool) -> std::io::Result<Audit> {
        let mut out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(OpenOptions::new().create(true).append(true).open(path)?)
        };
        let mut prev = if chain && path != Path::new("-") {
            last_hash(path)?.unwrap_or_else(|| GENESIS.to_string())
        } else {
            GENESIS.to_string()
        };
        let (tx, rx) = sync_channel::<Arc<AuditRecord>>(QUEUE);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                for record in rx {
                    let line = if chain {
                        let (line, hash) = chained_line(&record, &prev);
                        prev = hash;
                        line
                    } else {
                        serde_json::to_string(&*record).expect("a record serializes")
                    };
                    if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                        log::error!(target: "switchyard::audit", "cannot write the audit log: {e}");
                    }
                }
            })?;
        Ok(Audit {
            sink: Some(tx),
            ..Audit::memory_only()
        })
    }

    pub fn record(&self, record: AuditRecord) {
        let record = Arc::new(record);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT {
                recent.pop_back();
            }
            recent.push_front(record.clone());
        }
        if let Some(sink) = &self.sink {
            match sink.try_send(record) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        log::error!(target: "switchyard::audit", "audit writer behind: {n} record(s) dropped so far");
                    }
                }
            }
        }
    }

    /// The newest `limit` records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<AuditRecord>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().take(limit).cloned().collect()
    }
}

/// `{...,"prev":"<hash of the line before>","hash":"<hash of this line up to here>"}`.
fn chained_line(record: &AuditRecord, prev: &str) -> (String, String) {
    let mut body = serde_json::to_string(record).expect("a record serializes");
    body.pop(); // the closing brace
    body.push_str(&format!(",\"prev\":\"{prev}\"}}"));
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    body.pop();
    body.push_str(&format!(",\"hash\":\"{hash}\"}}"));
    (body, hash)
}

/// The `hash` of the last line of an existing chained file.
fn last_hash(path: &Path) -> std::io::Result<Option<String>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut tail = String::new();
    f.read_to_string(&mut tail)?;
    Ok(tail
        .lines()
        .last()
        .and_then(|l| split_hash(l).map(|(_, h)| h.to_string())))
}

/// A chained line split into what was hashed and the hash.
fn split_hash(line: &str) -> Option<(String, &str)> {
    let start = line.rfind(",\"hash\":\"")?;
    let hash = line.get(start + 9..start + 9 + 64)?;
    if &line[start + 9 + 64..] != "\"}" {
        return None;
    }
    Some((format!("{}}}", &line[..start]), hash))
}

/// Why a chained audit file does not verify.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("line {0}: not a chained audit line (no trailing hash)")]
    NotChained(usize),
    #[error("line {0}: its content does not match its hash (edited)")]
    Edited(usize),
    #[error(
        "line {0}: does not follow the line before it (a line was removed, reordered or inserted)"
    )]
    Broken(usize),
    #[error("cannot read: {0}")]
    Io(String),
}

/// Check a chained audit file; the number of lines when it is intact.
pub fn verify(path: &PathBuf) -> Result<usize, VerifyError> {
    let f = std::fs::File::open(path).map_err(|e| VerifyError::Io(e.to_string()))?;
    let mut prev: Option<String> = None;
    let mut n = 0;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| VerifyError::Io(e.to_string()))?;
        let number = i + 1;
        let (hashed, hash) = split_hash(&line).ok_or(VerifyError::NotChained(number))?;
        if hex::encode(Sha256::digest(hashed.as_bytes())) != hash {
            return Err(VerifyError::Edited(number));
        }
        let expected_prev = prev.as_deref().unwrap_or("");
        let claims = hashed
            .rfind(",\"prev\":\"")
            .and_then(|p| hashed.get(p + 9..p + 9 + 64));
        match (claims, prev.is_some()) {
            (Some(c), true) if c == expected_prev => {}
            (Some(_), false) => {} // the first line may continue an older, rotated file
            _ => return Err(VerifyError::Broken(number)),
        }
        prev = Some(hash.to_string());
        n = number;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            time: AuditTime(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600)),
            request_id: id.into(),
            tenant: "acme".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: Some("m".into()),
            policy: Some("p@abc".into()),
            candidates: vec!["a".into(), "b".into()],
            plan: vec!["a".into(), "b".into()],
            skipped: vec![],
            attempts: vec![AttemptRecord {
                backend: "a".into(),
                outcome: "status 200".into(),
            }],
            backend: Some("a".into()),
            status: 200,
            tokens_in: 1,
            tokens_out: 2,
            cost_usd: 0.0,
            ttft_ms: Some(1.0),
            duration_ms: 2.0,
        }
    }

    fn write_chain(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut prev = GENESIS.to_string();
        let mut text = String::new();
        for i in 0..n {
            let (line, hash) = chained_line(&record(&format!("r{i}")), &prev);
            prev = hash;
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn the_time_is_written_in_rfc3339_with_milliseconds() {
        let mut r = record("r");
        r.time = AuditTime(r.time.0 + std::time::Duration::from_millis(1_250));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["time"], "2026-01-01T00:00:01.250Z");
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (_d, path) = write_chain(5);
        assert_eq!(verify(&path), Ok(5));
    }

    #[test]
    fn an_edited_line_is_caught() {
        let (_d, path) = write_chain(5);
        let text =
            std::fs::read_to_string(&path)
                .unwrap()
                .replacen("\"status\":200", "\"status\":201", 1);
        std::fs::write(&path, text).unwrap();
        assert_eq!(verify(&path), Err(VerifyError::Edited(1)));
    }

    #[test]
    fn a_removed_line_is_caught() {
        let (_d, path) = write_chain(5);
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, l)| l)
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        assert_eq!(verify(&path), Err(VerifyError::Broken(3)));
    }
}
