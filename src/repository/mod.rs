//! The repository: a server's sled database, holding each received message
//! until its workflow has finished.
//!
//! # Key layout (one tree, so that every change is one atomic batch)
//!
//! Strings are length-prefixed (`u32` big-endian length, then bytes), so
//! keys never collide whatever the names contain.
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `Q` adaptor seq(u64 BE) | [`StoredItem`] JSON | an unfinished item, in arrival order |
//! | `I` adaptor source id | seq | identity index: recognises a redelivery |
//! | `D` adaptor source id | done time (ms, u64 BE) | done-ledger entry |
//! | `T` done time adaptor source id | empty | done-ledger entries by age, for pruning |
//!
//! # Invariants
//! sled recovers a prefix of its log after a crash, so single-key writes are
//! ordered instead of batched (a `Batch` switches every sled operation of
//! the process to a global lock and cut throughput by an order of magnitude):
//! - store: `Q` before `I`, so an `I` entry always has its item;
//! - completion: `D` and `T` before removing `Q`, then `I`, so a removed
//!   item is always in the done ledger (a crash in between delivers the
//!   item again: at least once, same idempotency key).
//! - An item is acked to the broker only after a [`Repository::flush`] that
//!   covers its write (sled writes are durable only after `flush`; the
//!   flusher runs `flush()` in `spawn_blocking`, never `flush_async`, which
//!   deadlocks in sled 0.34).
//! - Completion removes `Q`/`I` and writes `D`/`T` in one batch.

use crate::event::{EventType, Identity};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Why the repository failed.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot open repository {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("repository write failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("repository item {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("repository flusher has stopped")]
    FlusherGone,
}

/// One unfinished item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredItem {
    /// Position in arrival order (per repository).
    pub seq: u64,
    pub adaptor: String,
    pub source: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event JSON as received.
    pub body: String,
    /// Receipt time, ms since the Unix epoch.
    pub received_ms: u64,
    /// Target calls made so far.
    pub attempts: u32,
    /// Earliest time of the next attempt, ms since the Unix epoch.
    pub next_attempt_ms: u64,
    /// Last transient error, if any.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Set when the item must be parked but the parking publish failed.
    #[serde(default)]
    pub park_reason: Option<String>,
}

impl StoredItem {
    pub fn identity(&self) -> Identity {
        Identity {
            source: self.source.clone(),
            id: self.id.clone(),
        }
    }
    pub fn event_type(&self) -> Option<EventType> {
        EventType::parse(&self.event_type)
    }
}

/// What [`Repository::store`] did with one event.
#[derive(Debug)]
pub enum Stored {
    /// New: written (durable after the next flush).
    New(StoredItem),
    /// Already in the repository (a redelivery of an unfinished item).
    Duplicate,
    /// Already completed (found in the done ledger).
    AlreadyDone,
}

/// Handle to the repository; cheap to clone.
#[derive(Clone)]
pub struct Repository {
    db: sled::Db,
    flush_tx: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Repository {
    /// Open (or create) the repository at `path`. Must be called inside a
    /// tokio runtime (it spawns the group-commit flusher).
    pub fn open(path: &Path) -> Result<Repository, RepositoryError> {
        let open_err = |reason: String| RepositoryError::Open {
            path: path.to_owned(),
            reason,
        };
        std::fs::create_dir_all(path).map_err(|e| open_err(e.to_string()))?;
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("lock") => open_err(format!(
                    "{io}; is another provring process using this data directory?"
                )),
                other => open_err(other.to_string()),
            })?;
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_flusher(db.clone(), flush_rx));
        Ok(Repository { db, flush_tx })
    }

    /// Make every write made before this call durable. Concurrent callers
    /// share one `flush()` (group commit).
    pub async fn flush(&self) -> Result<(), RepositoryError> {
        let (tx, rx) = oneshot::channel();
        self.flush_tx
            .send(tx)
            .map_err(|_| RepositoryError::FlusherGone)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(RepositoryError::Corrupt {
                key: "(flush)".into(),
                reason,
            }),
            Err(_) => Err(RepositoryError::FlusherGone),
        }
    }

    /// Flush synchronously (for shutdown and tools; blocks the thread).
    pub fn flush_blocking(&self) -> Result<(), RepositoryError> {
        self.db.flush()?;
        Ok(())
    }

    /// Write new events for `adaptor`, skipping redeliveries and completed
    /// ones. Synchronous: call from `spawn_blocking`. One writer per adaptor.
    pub fn store(
        &self,
        adaptor: &str,
        events: Vec<crate::event::Event>,
    ) -> Result<Vec<Stored>, RepositoryError> {
        let now = now_ms();
        let mut out = Vec::with_capacity(events.len());
        let mut seen_in_batch = std::collections::HashSet::new();
        for event in events {
            let ident = identity_suffix(adaptor, &event.identity);
            if self.db.contains_key(key(b'D', &ident))? {
                out.push(Stored::AlreadyDone);
                continue;
            }
            let index_key = key(b'I', &ident);
            if !seen_in_batch.insert(index_key.clone()) || self.db.contains_key(&index_key)? {
                out.push(Stored::Duplicate);
                continue;
            }
            let seq = self.db.generate_id()?;
            let item = StoredItem {
                seq,
                adaptor: adaptor.to_owned(),
                source: event.identity.source,
                id: event.identity.id,
                event_type: event.event_type.as_str().to_owned(),
                body: event.body,
                received_ms: now,
                attempts: 0,
                next_attempt_ms: now,
                last_error: None,
                park_reason: None,
            };
            self.db.insert(item_key(adaptor, seq), encode(&item))?;
            self.db.insert(index_key, &seq.to_be_bytes())?;
            out.push(Stored::New(item));
        }
        Ok(out)
    }

    /// Save an item's new attempt count and schedule.
    pub fn update(&self, item: &StoredItem) -> Result<(), RepositoryError> {
        self.db
            .insert(item_key(&item.adaptor, item.seq), encode(item))?;
        Ok(())
    }

    /// The workflow of `item` has finished (delivered or parked): remove it
    /// and remember its identity in the done ledger.
    pub fn complete(&self, item: &StoredItem) -> Result<(), RepositoryError> {
        let ident = identity_suffix(&item.adaptor, &item.identity());
        let now = now_ms();
        let mut by_time = vec![b'T'];
        by_time.extend_from_slice(&now.to_be_bytes());
        by_time.extend_from_slice(&ident);
        self.db.insert(key(b'D', &ident), &now.to_be_bytes())?;
        self.db.insert(by_time, &[])?;
        self.db.remove(item_key(&item.adaptor, item.seq))?;
        self.db.remove(key(b'I', &ident))?;
        Ok(())
    }

    /// Unfinished items of `adaptor` with `seq >= from`, in arrival order,
    /// at most `limit`.
    pub fn pending(
        &self,
        adaptor: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredItem>, RepositoryError> {
        let prefix = item_prefix(adaptor);
        let start = item_key(adaptor, from);
        let mut out = Vec::new();
        for entry in self.db.range(start..) {
            let (k, v) = entry?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Number of unfinished items of `adaptor` (scans its keys).
    pub fn count(&self, adaptor: &str) -> usize {
        self.db.scan_prefix(item_prefix(adaptor)).count()
    }

    /// Number of unfinished items of all adaptors.
    pub fn count_all(&self) -> usize {
        self.db.scan_prefix([b'Q']).count()
    }

    /// Number of done-ledger entries.
    pub fn done_count(&self) -> usize {
        self.db.scan_prefix([b'D']).count()
    }

    /// Forget done-ledger entries older than `ttl`, then the oldest beyond
    /// `max_entries`. Returns how many were removed.
    pub fn prune_done(&self, ttl: Duration, max_entries: usize) -> Result<usize, RepositoryError> {
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        let total = self.done_count();
        let mut excess = total.saturating_sub(max_entries);
        let mut removed = 0;
        for entry in self.db.scan_prefix([b'T']) {
            let (k, _) = entry?;
            let Some(ts) = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            if ts >= cutoff && excess == 0 {
                break;
            }
            excess = excess.saturating_sub(1);
            // `D` first: a `T` without its `D` is harmless, the reverse
            // would never be pruned.
            self.db.remove(key(b'D', &k[9..]))?;
            self.db.remove(&k)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Size of the database on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

async fn run_flusher(
    db: sled::Db,
    mut rx: mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiters.push(more);
        }
        let db = db.clone();
        let result = match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("flush task failed: {e}")),
        };
        if let Err(reason) = &result {
            tracing::error!(%reason, "Repository flush failed.");
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

fn push_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn identity_suffix(adaptor: &str, identity: &Identity) -> Vec<u8> {
    let mut buf =
        Vec::with_capacity(12 + adaptor.len() + identity.source.len() + identity.id.len());
    push_str(&mut buf, adaptor);
    push_str(&mut buf, &identity.source);
    push_str(&mut buf, &identity.id);
    buf
}

fn key(tag: u8, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + suffix.len());
    k.push(tag);
    k.extend_from_slice(suffix);
    k
}

fn item_prefix(adaptor: &str) -> Vec<u8> {
    let mut k = vec![b'Q'];
    push_str(&mut k, adaptor);
    k
}

fn item_key(adaptor: &str, seq: u64) -> Vec<u8> {
    let mut k = item_prefix(adaptor);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn encode(item: &StoredItem) -> Vec<u8> {
    // Serialising a struct of strings and integers to a Vec cannot fail.
    serde_json::to_vec(item).unwrap_or_default()
}

fn decode(k: &[u8], v: &[u8]) -> Result<StoredItem, RepositoryError> {
    serde_json::from_slice(v).map_err(|e| RepositoryError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType, Identity};

    fn event(id: &str) -> Event {
        Event {
            identity: Identity {
                source: "/s".into(),
                id: id.into(),
            },
            event_type: EventType::AccountCreate,
            body: "{}".into(),
        }
    }

    #[tokio::test]
    async fn stores_once_completes_and_remembers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path()).expect("open");
        let out = repo
            .store("a", vec![event("1"), event("2"), event("1")])
            .expect("store");
        assert!(matches!(out[0], Stored::New(_)));
        assert!(matches!(out[1], Stored::New(_)));
        assert!(matches!(out[2], Stored::Duplicate));
        repo.flush().await.expect("flush");
        let out = repo.store("a", vec![event("2")]).expect("store");
        assert!(matches!(out[0], Stored::Duplicate));
        // Same identity on another adaptor is another item.
        let out = repo.store("b", vec![event("2")]).expect("store");
        assert!(matches!(out[0], Stored::New(_)));

        let pending = repo.pending("a", 0, 10).expect("pending");
        assert_eq!(pending.len(), 2);
        assert!(pending[0].seq < pending[1].seq);
        repo.complete(&pending[0]).expect("complete");
        assert_eq!(repo.count("a"), 1);
        let out = repo.store("a", vec![event("1")]).expect("store");
        assert!(matches!(out[0], Stored::AlreadyDone));
        assert_eq!(repo.done_count(), 1);
        assert_eq!(
            repo.prune_done(Duration::from_secs(3600), 0)
                .expect("prune"),
            1
        );
        assert_eq!(repo.done_count(), 0);
    }

    #[tokio::test]
    async fn a_locked_repository_names_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Repository::open(dir.path()).expect("open");
        let err = Repository::open(dir.path())
            .err()
            .expect("second open fails");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
