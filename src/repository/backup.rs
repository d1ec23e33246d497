//! Copies held for other servers (the backup adaptor's store), and what the
//! mirror needs of this server's own backlog.
//!
//! # Key layout (tree `copies`)
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `G` origin | generation `u64` | the origin's current mirror generation |
//! | `C` origin adaptor seq | batch record | a copy of one of the origin's batches |
//! | `Y` origin adaptor seq | bitmap | items of that batch the origin finished |
//!
//! A new generation replaces everything held for its origin. A batch whose
//! items are all finished is removed.

use super::{
    Finished, Repository, RepositoryError, UnfinishedBatch, adaptor_prefix, batch_key,
    describe_key, now_ms, record,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::mpsc;

pub(super) const TREE: &str = "copies";
const GENERATION_KEY: &[u8] = b"Mmirror-generation";

/// In-memory view of the copies, rebuilt at open.
#[derive(Default)]
pub(super) struct CopiesIndex {
    origins: HashMap<String, OriginCopies>,
}

#[derive(Default)]
struct OriginCopies {
    generation: u64,
    batches: BTreeMap<(String, u64), CopyBatch>,
}

struct CopyBatch {
    received_ms: u64,
    finished: Vec<bool>,
    remaining: usize,
}

/// Copies held for one origin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CopiesView {
    pub generation: u64,
    pub items: usize,
    /// Receipt time of the oldest unfinished copy, ms since the Unix epoch.
    pub oldest_ms: Option<u64>,
}

/// One item, named for comparisons between servers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub struct ItemKey {
    pub adaptor: String,
    pub source: String,
    pub id: String,
    pub received_ms: u64,
}

/// Check a batch record received from another server: `(received_ms,
/// items)`, or why it is unreadable.
pub fn check_record(bytes: &[u8]) -> Result<(u64, usize), record::RecordError> {
    record::check(bytes)
}

fn origin_key(tag: u8, origin: &str) -> Vec<u8> {
    adaptor_prefix(tag, origin)
}

fn copy_key(tag: u8, origin: &str, adaptor: &str, seq: u64) -> Vec<u8> {
    let mut k = origin_key(tag, origin);
    k.extend_from_slice(&batch_key(0, adaptor, seq)[1..]);
    k
}

fn parse_copy_key(k: &[u8]) -> Option<(String, String, u64)> {
    let mut at = 1;
    let take_str = |at: &mut usize| -> Option<String> {
        let len = u32::from_be_bytes(k.get(*at..*at + 4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(k.get(*at + 4..*at + 4 + len)?).ok()?;
        *at += 4 + len;
        Some(s.to_owned())
    };
    let origin = take_str(&mut at)?;
    let adaptor = take_str(&mut at)?;
    let seq = u64::from_be_bytes(k.get(at..at + 8)?.try_into().ok()?);
    Some((origin, adaptor, seq))
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn bitmap(finished: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; finished.len().div_ceil(8)];
    for (i, f) in finished.iter().enumerate() {
        if *f {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    bits
}

pub(super) fn rebuild(tree: &sled::Tree) -> Result<CopiesIndex, RepositoryError> {
    let mut index = CopiesIndex::default();
    for entry in tree.scan_prefix([b'G']) {
        let (k, v) = entry?;
        let Some(origin) = parse_origin(&k) else {
            continue;
        };
        index.origins.entry(origin).or_default().generation = read_u64(&v);
    }
    for entry in tree.scan_prefix([b'C']) {
        let (k, v) = entry?;
        let Some((origin, adaptor, seq)) = parse_copy_key(&k) else {
            return Err(RepositoryError::Corrupt {
                key: describe_key(&k),
                reason: record::RecordError::MalformedKey("copy"),
            });
        };
        let (received_ms, count) =
            record::check(&v).map_err(|reason| RepositoryError::Corrupt {
                key: describe_key(&k),
                reason,
            })?;
        let bits = tree
            .get(copy_key(b'Y', &origin, &adaptor, seq))?
            .map(|b| b.to_vec())
            .unwrap_or_default();
        let finished: Vec<bool> = (0..count).map(|i| bit(&bits, i)).collect();
        let remaining = finished.iter().filter(|f| !**f).count();
        index.origins.entry(origin).or_default().batches.insert(
            (adaptor, seq),
            CopyBatch {
                received_ms,
                finished,
                remaining,
            },
        );
    }
    Ok(index)
}

fn parse_origin(k: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(k.get(1..5)?.try_into().ok()?) as usize;
    Some(std::str::from_utf8(k.get(5..5 + len)?).ok()?.to_owned())
}

fn read_u64(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl Repository {
    fn copies_index(&self) -> std::sync::MutexGuard<'_, CopiesIndex> {
        self.inner
            .copies_index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The generation of `origin`'s copies held here (0: none yet).
    pub fn copies_generation(&self, origin: &str) -> u64 {
        self.copies_index()
            .origins
            .get(origin)
            .map_or(0, |o| o.generation)
    }

    /// Start generation `generation` of `origin`: drop every copy held for
    /// it. Synchronous.
    pub fn copies_begin(&self, origin: &str, generation: u64) -> Result<(), RepositoryError> {
        let tree = &self.inner.copies;
        for tag in [b'C', b'Y'] {
            for k in tree.scan_prefix(origin_key(tag, origin)).keys() {
                tree.remove(k?)?;
            }
        }
        tree.insert(origin_key(b'G', origin), &generation.to_be_bytes())?;
        let mut index = self.copies_index();
        let o = index.origins.entry(origin.to_owned()).or_default();
        o.generation = generation;
        o.batches.clear();
        Ok(())
    }

    /// Hold a copy of one of `origin`'s batches; `done` marks the items
    /// already finished. The record must have passed [`check_record`].
    /// Synchronous.
    pub fn copies_store(
        &self,
        origin: &str,
        adaptor: &str,
        seq: u64,
        done: &[u8],
        record_bytes: &[u8],
    ) -> Result<(), RepositoryError> {
        let (received_ms, count) =
            check_record(record_bytes).map_err(|reason| RepositoryError::Corrupt {
                key: format!("copy {origin}/{adaptor}/{seq}"),
                reason,
            })?;
        let tree = &self.inner.copies;
        let key = (adaptor.to_owned(), seq);
        let mut finished: Vec<bool> = (0..count).map(|i| bit(done, i)).collect();
        if let Some(old) = self
            .copies_index()
            .origins
            .get(origin)
            .and_then(|o| o.batches.get(&key))
        {
            for (f, o) in finished.iter_mut().zip(&old.finished) {
                *f |= *o;
            }
        }
        let remaining = finished.iter().filter(|f| !**f).count();
        if remaining == 0 {
            tree.remove(copy_key(b'Y', origin, adaptor, seq))?;
            tree.remove(copy_key(b'C', origin, adaptor, seq))?;
            if let Some(o) = self.copies_index().origins.get_mut(origin) {
                o.batches.remove(&key);
            }
            return Ok(());
        }
        tree.insert(copy_key(b'C', origin, adaptor, seq), record_bytes)?;
        if finished.iter().any(|f| *f) {
            tree.insert(copy_key(b'Y', origin, adaptor, seq), bitmap(&finished))?;
        }
        self.copies_index()
            .origins
            .entry(origin.to_owned())
            .or_default()
            .batches
            .insert(
                key,
                CopyBatch {
                    received_ms,
                    finished,
                    remaining,
                },
            );
        Ok(())
    }

    /// `origin` finished these items: forget their copies. Unknown items
    /// are skipped. Synchronous.
    pub fn copies_remove(
        &self,
        origin: &str,
        finished: &[(String, u64, u32)],
    ) -> Result<(), RepositoryError> {
        let tree = &self.inner.copies;
        let mut changed: BTreeMap<(String, u64), Option<Vec<u8>>> = BTreeMap::new();
        {
            let mut index = self.copies_index();
            let Some(o) = index.origins.get_mut(origin) else {
                return Ok(());
            };
            for (adaptor, seq, idx) in finished {
                let key = (adaptor.clone(), *seq);
                let Some(b) = o.batches.get_mut(&key) else {
                    continue;
                };
                let i = *idx as usize;
                if i >= b.finished.len() || b.finished[i] {
                    continue;
                }
                b.finished[i] = true;
                b.remaining -= 1;
                if b.remaining == 0 {
                    o.batches.remove(&key);
                    changed.insert(key, None);
                } else {
                    changed.insert(key, Some(bitmap(&b.finished)));
                }
            }
        }
        for ((adaptor, seq), bits) in changed {
            match bits {
                Some(bits) => {
                    tree.insert(copy_key(b'Y', origin, &adaptor, seq), bits)?;
                }
                None => {
                    tree.remove(copy_key(b'Y', origin, &adaptor, seq))?;
                    tree.remove(copy_key(b'C', origin, &adaptor, seq))?;
                }
            }
        }
        Ok(())
    }

    /// Copies held, per origin.
    pub fn copies_view(&self) -> BTreeMap<String, CopiesView> {
        self.copies_index()
            .origins
            .iter()
            .map(|(origin, o)| {
                let items = o.batches.values().map(|b| b.remaining).sum();
                let oldest_ms = o.batches.values().map(|b| b.received_ms).min();
                (
                    origin.clone(),
                    CopiesView {
                        generation: o.generation,
                        items,
                        oldest_ms,
                    },
                )
            })
            .collect()
    }

    /// Every unfinished copy held for `origin`.
    pub fn copies_items(&self, origin: &str) -> Result<Vec<ItemKey>, RepositoryError> {
        let batches: Vec<((String, u64), Vec<bool>)> = self
            .copies_index()
            .origins
            .get(origin)
            .map(|o| {
                o.batches
                    .iter()
                    .map(|(k, b)| (k.clone(), b.finished.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for ((adaptor, seq), finished) in batches {
            let key = copy_key(b'C', origin, &adaptor, seq);
            let Some(v) = self.inner.copies.get(&key)? else {
                continue;
            };
            let (received_ms, ids) =
                record::identities(&v).map_err(|reason| RepositoryError::Corrupt {
                    key: describe_key(&key),
                    reason,
                })?;
            for (i, (source, id)) in ids.into_iter().enumerate() {
                if !finished.get(i).copied().unwrap_or(true) {
                    out.push(ItemKey {
                        adaptor: adaptor.clone(),
                        source,
                        id,
                        received_ms,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Every unfinished item of this server's own backlog.
    pub fn own_items(&self) -> Result<Vec<ItemKey>, RepositoryError> {
        let mut out = Vec::new();
        for (adaptor, seq, done, bytes) in self.unfinished_batches()? {
            let (received_ms, ids) =
                record::identities(&bytes).map_err(|reason| RepositoryError::Corrupt {
                    key: format!("{adaptor}/{seq}"),
                    reason,
                })?;
            for (i, (source, id)) in ids.into_iter().enumerate() {
                if !bit(&done, i) {
                    out.push(ItemKey {
                        adaptor: adaptor.to_string(),
                        source,
                        id,
                        received_ms,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Every unfinished batch of this server: adaptor, seq, finished-items
    /// bitmap, record. What a resync sends.
    pub fn unfinished_batches(&self) -> Result<Vec<UnfinishedBatch>, RepositoryError> {
        let keys: Vec<(Arc<str>, u64)> = self.index().batches.keys().cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        for (adaptor, seq) in keys {
            let Some(bytes) = self.inner.db.get(batch_key(b'B', &adaptor, seq))? else {
                continue; // finished meanwhile
            };
            let done = match self.index().batches.get(&(adaptor.clone(), seq)) {
                Some(b) => b.bitmap(),
                None => continue,
            };
            out.push((adaptor, seq, done, bytes.to_vec()));
        }
        out.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        Ok(out)
    }

    /// The finished-items bitmap of an unfinished batch; `None` once the
    /// batch has finished.
    pub fn batch_bitmap(&self, adaptor: &str, seq: u64) -> Option<Vec<u8>> {
        self.index()
            .batches
            .get(&(Arc::from(adaptor), seq))
            .map(|b| b.bitmap())
    }

    /// Forget every copy held for `origin`. Synchronous.
    pub fn copies_drop(&self, origin: &str) -> Result<(), RepositoryError> {
        let tree = &self.inner.copies;
        for tag in [b'C', b'Y', b'G'] {
            for k in tree.scan_prefix(origin_key(tag, origin)).keys() {
                tree.remove(k?)?;
            }
        }
        self.copies_index().origins.remove(origin);
        Ok(())
    }

    /// The unfinished copies held for `origin`, as events per batch:
    /// (adaptor, events). What a taker adopts as its own backlog.
    pub fn copies_events(
        &self,
        origin: &str,
    ) -> Result<Vec<(String, u64, Vec<crate::event::Event>)>, RepositoryError> {
        let batches: Vec<((String, u64), Vec<bool>)> = self
            .copies_index()
            .origins
            .get(origin)
            .map(|o| {
                o.batches
                    .iter()
                    .map(|(k, b)| (k.clone(), b.finished.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for ((adaptor, seq), finished) in batches {
            let key = copy_key(b'C', origin, &adaptor, seq);
            let Some(v) = self.inner.copies.get(&key)? else {
                continue;
            };
            let rec =
                record::read(&v, &self.inner.keys).map_err(|reason| RepositoryError::Corrupt {
                    key: describe_key(&key),
                    reason,
                })?;
            let items = rec
                .items
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !finished.get(*i).copied().unwrap_or(true))
                .map(|(_, e)| e);
            let events = record_events(origin, items);
            if !events.is_empty() {
                out.push((adaptor, rec.received_ms, events));
            }
        }
        Ok(out)
    }

    /// Forget every unfinished item of `adaptor` without delivering it: the
    /// adaptor was surrendered to another server, which delivers them.
    /// Returns how many items were dropped. Synchronous.
    pub fn drop_adaptor(&self, adaptor: &str) -> Result<usize, RepositoryError> {
        let db = &self.inner.db;
        let mut dropped = 0;
        {
            let mut index = self.index();
            let keys: Vec<(Arc<str>, u64)> = index
                .batches
                .keys()
                .filter(|(a, _)| &**a == adaptor)
                .cloned()
                .collect();
            for key in keys {
                if let Some(b) = index.batches.remove(&key) {
                    dropped += b.remaining;
                    for h in &b.hashes {
                        index.pending.remove(h);
                    }
                }
                index.dirty.remove(&key);
            }
        }
        for tag in [b'B', b'X', b'S'] {
            for k in db.scan_prefix(adaptor_prefix(tag, adaptor)).keys() {
                db.remove(k?)?;
            }
        }
        db.flush()?;
        Ok(dropped)
    }

    /// Adaptors with unfinished items in this repository.
    pub fn adaptors_with_backlog(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .index()
            .batches
            .keys()
            .map(|(a, _)| a.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Tell `sink` of every item finished from now on.
    pub fn set_finished_sink(&self, sink: mpsc::UnboundedSender<Finished>) {
        let _ = self.inner.finished_sink.set(sink);
    }

    /// A new mirror generation for this server's copies: above every earlier
    /// one, durable before it is used. Synchronous.
    pub fn next_mirror_generation(&self) -> Result<u64, RepositoryError> {
        let db = &self.inner.db;
        let last = db.get(GENERATION_KEY)?.map(|v| read_u64(&v)).unwrap_or(0);
        // The clock keeps generations rising even if the data directory
        // is replaced; the stored value keeps them rising if the clock
        // goes back.
        let next = (last + 1).max(now_ms());
        db.insert(GENERATION_KEY, &next.to_be_bytes())?;
        db.flush()?;
        Ok(next)
    }
}

/// The events of record items; an item of an unknown event type (written by
/// a newer version) is skipped with a warning naming `from`.
pub(super) fn record_events(
    from: &str,
    items: impl IntoIterator<Item = record::RecordItem>,
) -> Vec<crate::event::Event> {
    let mut events = Vec::new();
    for e in items {
        let Some(event_type) = crate::event::EventType::parse(&e.event_type) else {
            tracing::warn!(%from, id = %e.id, event_type = %e.event_type, "Item with an unknown event type not taken.");
            continue;
        };
        events.push(crate::event::Event {
            identity: crate::event::Identity {
                source: e.source,
                id: e.id,
            },
            event_type,
            subject: e.subject,
            body: e.body,
        });
    }
    events
}
