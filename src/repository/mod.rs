//! The repository: a server's sled database, holding each received message
//! until its workflow has finished.
//!
//! # Key layout (one tree)
//!
//! Strings are length-prefixed (`u32` big-endian length, then bytes), so
//! keys never collide whatever the names contain. `seq` is a `u64`
//! big-endian from sled's id generator (monotonic across restarts).
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `M` `hashkey` | 16 bytes | random SipHash key of this repository |
//! | `B` adaptor seq | [`record`] of items | one group-committed batch of events |
//! | `S` adaptor seq idx(u32) | [`ItemState`] JSON | retry schedule of one item, if it has one |
//! | `X` adaptor seq | bitmap | which items of a batch have finished |
//! | `D` time(ms) seq | identity hashes | done ledger: events of a finished batch |
//!
//! The unit of storage is the batch: one write per group commit instead of
//! several per event (sled costs ~20 µs a write; per-event keys capped the
//! pipeline near 18k msg/s on two cores). Identities are indexed in memory
//! as keyed SipHash-128 hashes, rebuilt from `B`, `X` and `D` at open.
//!
//! # Invariants
//! sled recovers a prefix of its log after a crash, and writes are ordered
//! so that every prefix is consistent:
//! - an event is acked only after the [`Repository::flush`] that covers its
//!   `B` write (the flusher runs `flush()` in `spawn_blocking`, never
//!   `flush_async`, which deadlocks in sled 0.34);
//! - a finished batch writes its `D` record before its `X`, `S` and `B`
//!   entries are removed, so a removed event is always in the done ledger;
//! - finished items of an unfinished batch are saved in `X` on a short tick
//!   and at shutdown; a crash in between delivers them again (at least once,
//!   same idempotency key).
//!
//! No sled `Batch` or transaction is used: either switches every sled
//! operation of the process to a global lock (measured: 3× slower).

mod backup;
mod handover;
mod marker;
pub mod record;
mod rekey;
mod timeout;

pub use backup::{CopiesView, ItemKey, check_record};
pub use record::RecordError;
pub use rekey::Rekeyed;
pub use timeout::{Claim, ClaimRefused, OverdueItem};

use crate::crypto::KeyRing;
use crate::event::{Event, EventType, Identity};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Largest batch record written; bigger batches are split (sled stores
/// large values as separate blob files).
const RECORD_MAX_BYTES: usize = 48 * 1024;

/// Why the repository failed.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot open repository {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("repository operation failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("repository record {key} is unreadable: {reason}")]
    Corrupt {
        key: String,
        reason: record::RecordError,
    },
    #[error("repository flush failed: {0}")]
    Flush(String),
    #[error("repository flusher has stopped")]
    FlusherGone,
    #[error("cannot seal an event: {0}")]
    Seal(String),
    #[error("a repository task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The mutable part of an item, saved under `S` when it changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ItemState {
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

/// One unfinished item.
#[derive(Debug, Clone)]
pub struct StoredItem {
    /// Batch (arrival order, per repository).
    pub seq: u64,
    /// Position in the batch.
    pub idx: u32,
    pub adaptor: Arc<str>,
    pub source: String,
    pub id: String,
    pub event_type: String,
    /// The account the event is about; see [`Event::subject`].
    pub subject: String,
    /// The event JSON as received.
    pub body: String,
    /// Receipt time, ms since the Unix epoch.
    pub received_ms: u64,
    pub state: ItemState,
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
    New(Box<StoredItem>),
    /// Already in the repository (a redelivery of an unfinished item).
    Duplicate,
    /// Already completed (found in the done ledger).
    AlreadyDone,
}

/// Handle to the repository; cheap to clone.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    hash_key: (u64, u64),
    index: Mutex<Index>,
    flush_tx: mpsc::UnboundedSender<FlushRequest>,
    /// Copies held for other servers (see [`backup`]).
    copies: sled::Tree,
    copies_index: Mutex<backup::CopiesIndex>,
    /// Told of every finished item (the mirror batches them into removals).
    finished_sink: std::sync::OnceLock<mpsc::UnboundedSender<Finished>>,
    /// Seals and opens event bodies (see [`record`]).
    keys: Arc<KeyRing>,
}

/// A batch record as written: `seq` and bytes.
pub type BatchRecord = (u64, Vec<u8>);

/// An unfinished batch: adaptor, seq, finished-items bitmap, record.
pub type UnfinishedBatch = (Arc<str>, u64, Vec<u8>, Vec<u8>);

/// A finished item: adaptor, batch, position.
pub type Finished = (Arc<str>, u64, u32);

/// A flush request carries the database handle, so that the flusher task
/// holds none of its own and the file lock goes with the last handle.
type FlushRequest = (sled::Db, oneshot::Sender<Result<(), String>>);

/// In-memory state rebuilt at open.
#[derive(Default)]
struct Index {
    /// Identity hashes of unfinished items.
    pending: HashSet<u128>,
    /// Identity hashes of finished items (done ledger, and finished items
    /// of unfinished batches).
    done: HashSet<u128>,
    /// Unfinished batches.
    batches: HashMap<(Arc<str>, u64), BatchState>,
    /// Batches whose `X` bitmap changed since it was last saved.
    dirty: HashSet<(Arc<str>, u64)>,
    /// Number of identities in `D` records.
    done_entries: usize,
    /// Items being delivered or parked right now (see [`Repository::claim`]).
    claims: HashSet<(Arc<str>, u64, u32)>,
}

struct BatchState {
    /// Receipt time of the batch, ms since the Unix epoch.
    received_ms: u64,
    /// The earliest `deadline` extension of its events, if any has one.
    deadline_ms: Option<u64>,
    hashes: Vec<u128>,
    finished: Vec<bool>,
    remaining: usize,
}

impl BatchState {
    fn bitmap(&self) -> Vec<u8> {
        let mut bits = vec![0u8; self.finished.len().div_ceil(8)];
        for (i, f) in self.finished.iter().enumerate() {
            if *f {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        bits
    }
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub use crate::time::now_ms;

impl Repository {
    /// Open (or create) the repository at `path` and rebuild the index. Must
    /// be called inside a tokio runtime (it spawns the group-commit flusher).
    pub fn open(path: &Path, keys: Arc<KeyRing>) -> Result<Repository, RepositoryError> {
        let open_err = |reason: String| RepositoryError::Open {
            path: path.to_owned(),
            reason,
        };
        let marker = marker::check(path).map_err(|e| open_err(e.to_string()))?;
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
        let hash_key = match (
            db.get(HASH_KEY).map_err(|e| open_err(e.to_string()))?,
            &marker,
        ) {
            (Some(v), marker_found) if v.len() == 16 => {
                if marker_found.is_none() {
                    marker::write(path).map_err(|e| open_err(e.to_string()))?;
                }
                split_key(&v)
            }
            (_, Some(created)) => {
                return Err(open_err(format!(
                    "the directory holds a provring repository (created {created}) but its database \
                     came up empty or unreadable; provring will not start empty in its place: restore \
                     the directory from a backup, or move it away to start with an empty repository"
                )));
            }
            (_, None) => {
                let key = new_hash_key(&db).map_err(|e| open_err(e.to_string()))?;
                marker::write(path).map_err(|e| open_err(e.to_string()))?;
                key
            }
        };
        let index = rebuild_index(&db, hash_key, &keys).map_err(|e| open_err(e.to_string()))?;
        let copies = db
            .open_tree(backup::TREE)
            .map_err(|e| open_err(e.to_string()))?;
        let copies_index = backup::rebuild(&copies).map_err(|e| open_err(e.to_string()))?;
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_flusher(flush_rx));
        Ok(Repository {
            inner: Arc::new(Inner {
                db,
                hash_key,
                index: Mutex::new(index),
                flush_tx,
                copies,
                copies_index: Mutex::new(copies_index),
                finished_sink: std::sync::OnceLock::new(),
                keys,
            }),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding the lock leaves plain data; keep going.
        self.inner
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run `work`, synchronous repository calls, on the blocking pool: the
    /// async side's one way into the repository's synchronous methods.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T, RepositoryError>
    where
        F: FnOnce(&Repository) -> Result<T, RepositoryError> + Send + 'static,
        T: Send + 'static,
    {
        let repo = self.clone();
        tokio::task::spawn_blocking(move || work(&repo)).await?
    }

    /// Make every write made before this call durable. Concurrent callers
    /// share one `flush()` (group commit).
    pub async fn flush(&self) -> Result<(), RepositoryError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .flush_tx
            .send((self.inner.db.clone(), tx))
            .map_err(|_| RepositoryError::FlusherGone)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(RepositoryError::Flush(reason)),
            Err(_) => Err(RepositoryError::FlusherGone),
        }
    }

    /// Save progress bitmaps and flush synchronously (shutdown, tools).
    pub fn flush_blocking(&self) -> Result<(), RepositoryError> {
        self.save_progress()?;
        self.inner.db.flush()?;
        Ok(())
    }

    fn hash(&self, adaptor: &str, identity: &Identity) -> u128 {
        use std::hash::Hasher;
        let (k0, k1) = self.inner.hash_key;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(k0, k1);
        let mut buf =
            Vec::with_capacity(12 + adaptor.len() + identity.source.len() + identity.id.len());
        push_str(&mut buf, adaptor);
        push_str(&mut buf, &identity.source);
        push_str(&mut buf, &identity.id);
        h.write(&buf);
        siphasher::sip128::Hasher128::finish128(&h).as_u128()
    }

    /// Write new events for `adaptor`, skipping redeliveries and completed
    /// ones. Synchronous: call from `spawn_blocking`. One writer per adaptor.
    pub fn store(&self, adaptor: &str, events: Vec<Event>) -> Result<Vec<Stored>, RepositoryError> {
        self.store_with_records(adaptor, events)
            .map(|(stored, _)| stored)
    }

    /// [`Repository::store`], also returning each batch record written
    /// (`seq`, bytes), for mirroring.
    pub fn store_with_records(
        &self,
        adaptor: &str,
        events: Vec<Event>,
    ) -> Result<(Vec<Stored>, Vec<BatchRecord>), RepositoryError> {
        self.store_received(adaptor, events, now_ms())
    }

    /// [`Repository::store_with_records`] for events received at
    /// `received_ms` (a handed-over backlog keeps its receipt time, and so
    /// its deadline).
    pub fn store_received(
        &self,
        adaptor: &str,
        events: Vec<Event>,
        received_ms: u64,
    ) -> Result<(Vec<Stored>, Vec<BatchRecord>), RepositoryError> {
        let now = received_ms;
        let adaptor: Arc<str> = Arc::from(adaptor);
        let mut out = Vec::with_capacity(events.len());
        let mut fresh: Vec<(u128, Event)> = Vec::with_capacity(events.len());
        {
            let index = self.index();
            let mut in_batch = HashSet::new();
            for event in events {
                let h = self.hash(&adaptor, &event.identity);
                if index.done.contains(&h) {
                    out.push(Some(Stored::AlreadyDone));
                } else if index.pending.contains(&h) || !in_batch.insert(h) {
                    out.push(Some(Stored::Duplicate));
                } else {
                    out.push(None);
                    fresh.push((h, event));
                }
            }
        }
        // Split into records of bounded size; one sled write each.
        let mut fresh = fresh.into_iter().peekable();
        let mut new_items = Vec::new();
        let mut records = Vec::new();
        while fresh.peek().is_some() {
            let seq = self.inner.db.generate_id()?;
            let mut rec = record::Writer::new(now, &self.inner.keys);
            let mut hashes = Vec::new();
            let mut deadline: Option<u64> = None;
            while let Some((h, event)) = fresh.next_if(|(_, e)| {
                hashes.is_empty() || rec.len() + e.body.len() + 256 <= RECORD_MAX_BYTES
            }) {
                let idx = hashes.len() as u32;
                deadline = earliest(deadline, crate::event::deadline_ms(&event.body));
                rec.push(
                    &event.identity.source,
                    &event.identity.id,
                    event.event_type.as_str(),
                    &event.subject,
                    &event.body,
                )
                .map_err(|e| RepositoryError::Seal(e.to_string()))?;
                hashes.push(h);
                new_items.push(StoredItem {
                    seq,
                    idx,
                    adaptor: adaptor.clone(),
                    source: event.identity.source,
                    id: event.identity.id,
                    event_type: event.event_type.as_str().to_owned(),
                    subject: event.subject,
                    body: event.body,
                    received_ms: now,
                    state: ItemState {
                        next_attempt_ms: now_ms(),
                        ..ItemState::default()
                    },
                });
            }
            let rec = rec.finish();
            self.inner
                .db
                .insert(batch_key(b'B', &adaptor, seq), rec.as_slice())?;
            records.push((seq, rec));
            let mut index = self.index();
            index.pending.extend(hashes.iter().copied());
            let n = hashes.len();
            index.batches.insert(
                (adaptor.clone(), seq),
                BatchState {
                    received_ms: now,
                    deadline_ms: deadline,
                    hashes,
                    finished: vec![false; n],
                    remaining: n,
                },
            );
        }
        let mut new_items = new_items.into_iter();
        let stored = out
            .into_iter()
            .map(|o| match o {
                Some(s) => s,
                None => Stored::New(Box::new(
                    new_items.next().expect("one new item per fresh event"),
                )),
            })
            .collect();
        Ok((stored, records))
    }

    /// Save an item's new attempt count and schedule.
    pub fn update(&self, item: &StoredItem) -> Result<(), RepositoryError> {
        let value = serde_json::to_vec(&item.state).unwrap_or_default();
        self.inner
            .db
            .insert(state_key(&item.adaptor, item.seq, item.idx), value)?;
        Ok(())
    }

    /// The workflow of `item` has finished (delivered or parked). When its
    /// whole batch has, the batch moves to the done ledger.
    pub fn complete(&self, item: &StoredItem) -> Result<(), RepositoryError> {
        let db = &self.inner.db;
        let mut index = self.index();
        let key = (item.adaptor.clone(), item.seq);
        let Some(batch) = index.batches.get_mut(&key) else {
            return Ok(()); // already finished
        };
        let i = item.idx as usize;
        if i >= batch.finished.len() || batch.finished[i] {
            return Ok(());
        }
        batch.finished[i] = true;
        batch.remaining -= 1;
        let h = batch.hashes[i];
        if let Some(sink) = self.inner.finished_sink.get() {
            let _ = sink.send((item.adaptor.clone(), item.seq, item.idx));
        }
        if batch.remaining > 0 {
            index.pending.remove(&h);
            index.done.insert(h);
            index.dirty.insert(key);
            return Ok(());
        }
        // The whole batch is done: D first, then the rest goes.
        let Some(batch) = index.batches.remove(&key) else {
            return Ok(());
        };
        index.dirty.remove(&key);
        for h in &batch.hashes {
            index.pending.remove(h);
            index.done.insert(*h);
        }
        index.done_entries += batch.hashes.len();
        let mut done = Vec::with_capacity(4 + batch.hashes.len() * 16);
        done.extend_from_slice(&(batch.hashes.len() as u32).to_be_bytes());
        for h in &batch.hashes {
            done.extend_from_slice(&h.to_be_bytes());
        }
        let mut dkey = vec![b'D'];
        dkey.extend_from_slice(&now_ms().to_be_bytes());
        dkey.extend_from_slice(&item.seq.to_be_bytes());
        db.insert(dkey, done)?;
        db.remove(batch_key(b'X', &item.adaptor, item.seq))?;
        let states = batch_key(b'S', &item.adaptor, item.seq);
        for entry in db.scan_prefix(&states).keys() {
            db.remove(entry?)?;
        }
        db.remove(batch_key(b'B', &item.adaptor, item.seq))?;
        Ok(())
    }

    /// Save the finished-items bitmaps of batches that changed. Called on a
    /// short tick and at shutdown; returns how many were saved.
    pub fn save_progress(&self) -> Result<usize, RepositoryError> {
        let mut index = self.index();
        let dirty: Vec<_> = index.dirty.drain().collect();
        let mut saved = 0;
        for key in dirty {
            if let Some(batch) = index.batches.get(&key) {
                self.inner
                    .db
                    .insert(batch_key(b'X', &key.0, key.1), batch.bitmap())?;
                saved += 1;
            }
        }
        Ok(saved)
    }

    /// Unfinished items of `adaptor` in batches with `seq >= from`, in
    /// arrival order: whole batches until at least `limit` items.
    pub fn pending(
        &self,
        adaptor: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredItem>, RepositoryError> {
        let prefix = adaptor_prefix(b'B', adaptor);
        let adaptor_arc: Arc<str> = Arc::from(adaptor);
        let mut out = Vec::new();
        for entry in self.inner.db.range(batch_key(b'B', adaptor, from)..) {
            let (k, v) = entry?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let seq = seq_of(&k, prefix.len())?;
            out.extend(self.record_items(&adaptor_arc, seq, &k, &v, |_| true)?);
        }
        Ok(out)
    }

    fn states(&self, adaptor: &str, seq: u64) -> Result<HashMap<u32, ItemState>, RepositoryError> {
        let prefix = batch_key(b'S', adaptor, seq);
        let mut out = HashMap::new();
        for entry in self.inner.db.scan_prefix(&prefix) {
            let (k, v) = entry?;
            let Some(idx) = k
                .get(prefix.len()..prefix.len() + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
            else {
                continue;
            };
            match serde_json::from_slice(&v) {
                Ok(state) => {
                    out.insert(idx, state);
                }
                Err(e) => {
                    tracing::warn!(key = %describe_key(&k), error = %e, "Unreadable retry state ignored; the item restarts its schedule.")
                }
            }
        }
        Ok(out)
    }

    /// Number of unfinished items of `adaptor`.
    /// Where the event `identity` of `adaptor` stands here.
    pub fn item_state(&self, adaptor: &str, identity: &Identity) -> ItemPresence {
        let h = self.hash(adaptor, identity);
        let index = self.index();
        if index.pending.contains(&h) {
            ItemPresence::Pending
        } else if index.done.contains(&h) {
            ItemPresence::Done
        } else {
            ItemPresence::Unknown
        }
    }

    pub fn count(&self, adaptor: &str) -> usize {
        self.index()
            .batches
            .iter()
            .filter(|((a, _), _)| &**a == adaptor)
            .map(|(_, b)| b.remaining)
            .sum()
    }

    /// Per adaptor: unfinished items and the receipt time (ms since the
    /// Unix epoch) of the oldest.
    pub fn backlog(&self) -> std::collections::BTreeMap<String, (usize, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for ((adaptor, _), b) in &self.index().batches {
            if b.remaining == 0 {
                continue;
            }
            let e = out.entry(adaptor.to_string()).or_insert((0, u64::MAX));
            e.0 += b.remaining;
            e.1 = e.1.min(b.received_ms);
        }
        out
    }

    /// Number of unfinished items of all adaptors.
    pub fn count_all(&self) -> usize {
        self.index().pending.len()
    }

    /// Number of identities in the done ledger.
    pub fn done_count(&self) -> usize {
        self.index().done_entries
    }

    /// Forget done-ledger records older than `ttl`, then the oldest while
    /// more than `max_entries` identities are remembered. Returns how many
    /// identities were forgotten.
    pub fn prune_done(&self, ttl: Duration, max_entries: usize) -> Result<usize, RepositoryError> {
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        let mut removed = 0;
        for entry in self.inner.db.scan_prefix([b'D']) {
            let (k, v) = entry?;
            let ts = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let mut index = self.index();
            if ts >= cutoff && index.done_entries <= max_entries {
                break;
            }
            let hashes = done_hashes(&v);
            for h in &hashes {
                index.done.remove(h);
            }
            index.done_entries = index.done_entries.saturating_sub(hashes.len());
            removed += hashes.len();
            self.inner.db.remove(&k)?;
        }
        Ok(removed)
    }

    /// Size of the database on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }
}

const HASH_KEY: &[u8] = b"Mhashkey";

fn split_key(v: &[u8]) -> (u64, u64) {
    let k0 = v
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    let k1 = v
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    (k0.unwrap_or(0), k1.unwrap_or(0))
}

/// A new repository's hash key, durable before the marker is written.
fn new_hash_key(db: &sled::Db) -> Result<(u64, u64), sled::Error> {
    let (k0, k1) = (rand::random::<u64>(), rand::random::<u64>());
    let mut v = k0.to_be_bytes().to_vec();
    v.extend_from_slice(&k1.to_be_bytes());
    db.insert(HASH_KEY, v)?;
    db.flush()?;
    Ok((k0, k1))
}

/// Rebuild the in-memory index from `D`, `B` and `X`; finish batches whose
/// items are all done (a crash between writing `D` and removing `B`).
fn rebuild_index(
    db: &sled::Db,
    hash_key: (u64, u64),
    keys: &KeyRing,
) -> Result<Index, RepositoryError> {
    let mut index = Index::default();
    for entry in db.scan_prefix([b'D']) {
        let (_, v) = entry?;
        let hashes = done_hashes(&v);
        index.done_entries += hashes.len();
        index.done.extend(hashes);
    }
    let repo_hash = |adaptor: &str, source: &str, id: &str| {
        use std::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(hash_key.0, hash_key.1);
        let mut buf = Vec::new();
        push_str(&mut buf, adaptor);
        push_str(&mut buf, source);
        push_str(&mut buf, id);
        h.write(&buf);
        siphasher::sip128::Hasher128::finish128(&h).as_u128()
    };
    let mut finished_batches = Vec::new();
    for entry in db.scan_prefix([b'B']) {
        let (k, v) = entry?;
        let Some((adaptor, seq)) = parse_batch_key(&k) else {
            return Err(RepositoryError::Corrupt {
                key: describe_key(&k),
                reason: record::RecordError::MalformedKey("batch"),
            });
        };
        let rec = record::read(&v, keys).map_err(|reason| RepositoryError::Corrupt {
            key: describe_key(&k),
            reason,
        })?;
        let bits = db.get(batch_key(b'X', &adaptor, seq))?;
        let mut state = BatchState {
            received_ms: rec.received_ms,
            deadline_ms: None,
            hashes: Vec::with_capacity(rec.items.len()),
            finished: Vec::with_capacity(rec.items.len()),
            remaining: 0,
        };
        for (i, e) in rec.items.iter().enumerate() {
            let h = repo_hash(&adaptor, &e.source, &e.id);
            let bit = bits
                .as_ref()
                .and_then(|b| b.get(i / 8))
                .is_some_and(|byte| byte & (1 << (i % 8)) != 0);
            let done = bit || index.done.contains(&h);
            if done {
                index.done.insert(h);
            } else {
                index.pending.insert(h);
                state.remaining += 1;
            }
            if !done {
                state.deadline_ms = earliest(state.deadline_ms, crate::event::deadline_ms(&e.body));
            }
            state.hashes.push(h);
            state.finished.push(done);
        }
        let adaptor: Arc<str> = Arc::from(adaptor.as_str());
        if state.remaining == 0 {
            finished_batches.push((adaptor, seq, state));
        } else {
            index.batches.insert((adaptor, seq), state);
        }
    }
    for (adaptor, seq, state) in finished_batches {
        let mut done = (state.hashes.len() as u32).to_be_bytes().to_vec();
        for h in &state.hashes {
            done.extend_from_slice(&h.to_be_bytes());
        }
        let mut dkey = vec![b'D'];
        dkey.extend_from_slice(&now_ms().to_be_bytes());
        dkey.extend_from_slice(&seq.to_be_bytes());
        db.insert(dkey, done)?;
        index.done_entries += state.hashes.len();
        db.remove(batch_key(b'X', &adaptor, seq))?;
        for k in db.scan_prefix(batch_key(b'S', &adaptor, seq)).keys() {
            db.remove(k?)?;
        }
        db.remove(batch_key(b'B', &adaptor, seq))?;
    }
    Ok(index)
}

fn done_hashes(v: &[u8]) -> Vec<u128> {
    v.get(4..)
        .unwrap_or_default()
        .chunks_exact(16)
        .filter_map(|c| c.try_into().ok().map(u128::from_be_bytes))
        .collect()
}

async fn run_flusher(mut rx: mpsc::UnboundedReceiver<FlushRequest>) {
    while let Some((db, first)) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok((_, more)) = rx.try_recv() {
            waiters.push(more);
        }
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

fn adaptor_prefix(tag: u8, adaptor: &str) -> Vec<u8> {
    let mut k = vec![tag];
    push_str(&mut k, adaptor);
    k
}

fn batch_key(tag: u8, adaptor: &str, seq: u64) -> Vec<u8> {
    let mut k = adaptor_prefix(tag, adaptor);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn state_key(adaptor: &str, seq: u64, idx: u32) -> Vec<u8> {
    let mut k = batch_key(b'S', adaptor, seq);
    k.extend_from_slice(&idx.to_be_bytes());
    k
}

fn parse_batch_key(k: &[u8]) -> Option<(String, u64)> {
    let len = u32::from_be_bytes(k.get(1..5)?.try_into().ok()?) as usize;
    let adaptor = std::str::from_utf8(k.get(5..5 + len)?).ok()?.to_owned();
    let seq = u64::from_be_bytes(k.get(5 + len..13 + len)?.try_into().ok()?);
    Some((adaptor, seq))
}

fn seq_of(k: &[u8], prefix_len: usize) -> Result<u64, RepositoryError> {
    k.get(prefix_len..prefix_len + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| RepositoryError::Corrupt {
            key: describe_key(k),
            reason: record::RecordError::MalformedKey("batch"),
        })
}

fn describe_key(k: &[u8]) -> String {
    String::from_utf8_lossy(k).escape_debug().to_string()
}

/// Where an event stands in a repository (`GET /item`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemPresence {
    /// Stored, not finished.
    Pending,
    /// Finished (delivered or parked) and still in the done ledger.
    Done,
    /// Not in this repository.
    Unknown,
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
            subject: format!("user{id}"),
            body: format!("{{\"id\":\"{id}\"}}"),
        }
    }

    fn new_items(out: Vec<Stored>) -> Vec<StoredItem> {
        out.into_iter()
            .filter_map(|s| match s {
                Stored::New(i) => Some(*i),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn stores_once_completes_and_remembers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("open");
        let out = repo
            .store("a", vec![event("1"), event("2"), event("1")])
            .expect("store");
        assert!(matches!(out[0], Stored::New(_)));
        assert!(matches!(out[1], Stored::New(_)));
        assert!(matches!(out[2], Stored::Duplicate));
        repo.flush().await.expect("flush");
        assert!(matches!(
            repo.store("a", vec![event("2")]).expect("store")[0],
            Stored::Duplicate
        ));
        // Same identity on another adaptor is another item.
        assert!(matches!(
            repo.store("b", vec![event("2")]).expect("store")[0],
            Stored::New(_)
        ));

        let pending = repo.pending("a", 0, 10).expect("pending");
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].body, "{\"id\":\"1\"}");
        repo.complete(&pending[0]).expect("complete");
        assert_eq!(repo.count("a"), 1);
        assert!(matches!(
            repo.store("a", vec![event("1")]).expect("store")[0],
            Stored::AlreadyDone
        ));
        repo.complete(&pending[1]).expect("complete");
        assert_eq!(repo.count("a"), 0);
        assert_eq!(repo.done_count(), 2);
        assert_eq!(
            repo.prune_done(Duration::from_secs(3600), 0)
                .expect("prune"),
            2
        );
        assert_eq!(repo.done_count(), 0);
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let repo =
                Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("open");
            let mut items = new_items(
                repo.store("a", (0..5).map(|i| event(&i.to_string())).collect())
                    .expect("store"),
            );
            repo.complete(&items[0]).expect("complete");
            items[1].state.attempts = 3;
            items[1].state.next_attempt_ms = 42;
            repo.update(&items[1]).expect("update");
            repo.flush_blocking().expect("flush");
            let done = new_items(repo.store("a", vec![event("x")]).expect("store"));
            repo.complete(&done[0]).expect("complete");
            repo.flush_blocking().expect("flush");
        }
        let repo =
            Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("reopen");
        assert_eq!(repo.count_all(), 4);
        let pending = repo.pending("a", 0, 100).expect("pending");
        assert_eq!(
            pending.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3", "4"]
        );
        assert_eq!(pending[0].state.attempts, 3);
        assert_eq!(pending[0].state.next_attempt_ms, 42);
        let out = repo
            .store("a", vec![event("0"), event("1"), event("x")])
            .expect("store");
        assert!(matches!(out[0], Stored::AlreadyDone));
        assert!(matches!(out[1], Stored::Duplicate));
        assert!(matches!(out[2], Stored::AlreadyDone));
    }

    #[tokio::test]
    async fn big_batches_are_split_into_bounded_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("open");
        let events: Vec<Event> = (0..300)
            .map(|i| Event {
                body: "x".repeat(1000),
                ..event(&i.to_string())
            })
            .collect();
        let items = new_items(repo.store("a", events).expect("store"));
        assert_eq!(items.len(), 300);
        let seqs: HashSet<u64> = items.iter().map(|i| i.seq).collect();
        assert!(
            seqs.len() >= 6,
            "300 KB split into records of at most 48 KB"
        );
        assert_eq!(repo.pending("a", 0, 1000).expect("pending").len(), 300);
    }

    #[tokio::test]
    async fn a_damaged_repository_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let repo =
                Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("open");
            repo.store("a", vec![event("1")]).expect("store");
            repo.flush_blocking().expect("flush");
        }
        tokio::task::yield_now().await;
        std::fs::write(dir.path().join("db"), vec![0x5a; 4096]).expect("damage");
        let err = Repository::open(dir.path(), crate::crypto::KeyRing::test_ring())
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("will not start empty"), "{text}");
    }

    #[tokio::test]
    async fn a_locked_repository_names_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first =
            Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("open");
        let err = Repository::open(dir.path(), crate::crypto::KeyRing::test_ring())
            .err()
            .expect("second open fails");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
