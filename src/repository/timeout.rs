//! What the timeout checker needs from a repository: the overdue items, a
//! lookup by identity, and claims, which make sure an item is delivered or
//! parked by one party at a time (the executor, or a timeout check).

use super::{ItemState, Repository, RepositoryError, StoredItem, batch_key, describe_key, record};
use crate::event::Identity;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// An unfinished item past its deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverdueItem {
    pub adaptor: String,
    pub source: String,
    pub id: String,
    /// Receipt time, ms since the Unix epoch.
    pub received_ms: u64,
    /// The deadline that passed, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// The deadline is the event's own `deadline` extension (else the
    /// adaptor's timeout).
    pub by_event: bool,
}

/// The right to deliver or park one item; released when dropped.
pub struct Claim {
    repo: Repository,
    key: (Arc<str>, u64, u32),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.repo.index().claims.remove(&self.key);
    }
}

/// Why an item cannot be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefused {
    /// Delivered or parked already (or no longer in this repository).
    Finished,
    /// Someone else holds its claim: a delivery or a park is under way.
    Busy,
}

impl Repository {
    /// Claim `item` for a delivery or a park. Whoever holds the claim is the
    /// only one to act on the item until it is dropped; an item finished
    /// meanwhile cannot be claimed.
    pub fn claim(&self, item: &StoredItem) -> Result<Claim, ClaimRefused> {
        let key = (item.adaptor.clone(), item.seq, item.idx);
        let mut index = self.index();
        let unfinished = index
            .batches
            .get(&(key.0.clone(), key.1))
            .and_then(|b| b.finished.get(key.2 as usize))
            .is_some_and(|done| !done);
        if !unfinished {
            return Err(ClaimRefused::Finished);
        }
        if !index.claims.insert(key.clone()) {
            return Err(ClaimRefused::Busy);
        }
        Ok(Claim {
            repo: self.clone(),
            key,
        })
    }

    /// Number of items of `adaptor` claimed right now.
    pub fn claimed(&self, adaptor: &str) -> usize {
        self.index()
            .claims
            .iter()
            .filter(|(a, _, _)| &**a == adaptor)
            .count()
    }

    /// Up to `limit` unfinished items of the given adaptors whose deadline
    /// is at or before `now`, oldest first. `timeouts` gives each adaptor's
    /// timeout in ms; an event's own `deadline` extension takes precedence.
    /// Synchronous: call from `spawn_blocking`.
    pub fn overdue(
        &self,
        timeouts: &HashMap<String, u64>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<OverdueItem>, RepositoryError> {
        // Batches that may hold an overdue item, by receipt time.
        let mut candidates: Vec<(u64, Arc<str>, u64, u64)> = {
            let index = self.index();
            index
                .batches
                .iter()
                .filter(|(_, b)| b.remaining > 0)
                .filter_map(|((adaptor, seq), b)| {
                    let timeout = *timeouts.get(&**adaptor)?;
                    let by_age = b.received_ms.saturating_add(timeout) <= now;
                    let by_event = b.deadline_ms.is_some_and(|d| d <= now);
                    (by_age || by_event).then(|| (b.received_ms, adaptor.clone(), *seq, timeout))
                })
                .collect()
        };
        candidates.sort();
        let mut out = Vec::new();
        for (received_ms, adaptor, seq, timeout) in candidates {
            if out.len() >= limit {
                break;
            }
            let items = self.batch_items(&adaptor, seq, |_| true)?;
            for item in items {
                let (deadline_ms, by_event) = match crate::event::deadline_ms(&item.body) {
                    Some(d) => (d, true),
                    None => (received_ms.saturating_add(timeout), false),
                };
                if deadline_ms <= now && out.len() < limit {
                    out.push(OverdueItem {
                        adaptor: adaptor.to_string(),
                        source: item.source,
                        id: item.id,
                        received_ms,
                        deadline_ms,
                        by_event,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The unfinished items of `adaptor` with these identities (those not
    /// found are left out). Synchronous: call from `spawn_blocking`.
    pub fn find_pending(
        &self,
        adaptor: &str,
        identities: &[Identity],
    ) -> Result<Vec<StoredItem>, RepositoryError> {
        let wanted: std::collections::HashSet<u128> =
            identities.iter().map(|i| self.hash(adaptor, i)).collect();
        let batches: Vec<(u64, std::collections::HashSet<usize>)> = {
            let index = self.index();
            index
                .batches
                .iter()
                .filter(|((a, _), _)| &**a == adaptor)
                .filter_map(|((_, seq), b)| {
                    let idx: std::collections::HashSet<usize> = (0..b.hashes.len())
                        .filter(|i| !b.finished[*i] && wanted.contains(&b.hashes[*i]))
                        .collect();
                    (!idx.is_empty()).then_some((*seq, idx))
                })
                .collect()
        };
        let mut out = Vec::new();
        for (seq, idx) in batches {
            out.extend(self.batch_items(adaptor, seq, |i| idx.contains(&i))?);
        }
        Ok(out)
    }

    /// The unfinished items of one batch whose position `wanted` accepts.
    pub(super) fn batch_items(
        &self,
        adaptor: &str,
        seq: u64,
        wanted: impl Fn(usize) -> bool,
    ) -> Result<Vec<StoredItem>, RepositoryError> {
        let key = batch_key(b'B', adaptor, seq);
        let Some(bytes) = self.inner.db.get(&key)? else {
            return Ok(Vec::new()); // finished meanwhile
        };
        self.record_items(&Arc::from(adaptor), seq, &key, &bytes, wanted)
    }

    /// The unfinished items of the batch record `bytes` (under `key`) whose
    /// position `wanted` accepts, with their retry state.
    pub(super) fn record_items(
        &self,
        adaptor: &Arc<str>,
        seq: u64,
        key: &[u8],
        bytes: &[u8],
        wanted: impl Fn(usize) -> bool,
    ) -> Result<Vec<StoredItem>, RepositoryError> {
        let rec =
            record::read(bytes, &self.inner.keys).map_err(|reason| RepositoryError::Corrupt {
                key: describe_key(key),
                reason,
            })?;
        let finished: Vec<bool> = match self.index().batches.get(&(adaptor.clone(), seq)) {
            Some(b) => b.finished.clone(),
            None => return Ok(Vec::new()), // finished meanwhile
        };
        let states = self.states(adaptor, seq)?;
        let mut out = Vec::new();
        for (i, e) in rec.items.into_iter().enumerate() {
            if finished.get(i).copied().unwrap_or(true) || !wanted(i) {
                continue;
            }
            let idx = i as u32;
            out.push(StoredItem {
                seq,
                idx,
                adaptor: adaptor.clone(),
                source: e.source,
                id: e.id,
                event_type: e.event_type,
                subject: e.subject,
                body: e.body,
                received_ms: rec.received_ms,
                state: states.get(&idx).cloned().unwrap_or(ItemState {
                    next_attempt_ms: rec.received_ms,
                    ..ItemState::default()
                }),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType};

    fn event(id: &str, deadline: Option<&str>) -> Event {
        let extension = deadline
            .map(|d| format!(r#""deadline":"{d}","#))
            .unwrap_or_default();
        Event {
            identity: Identity {
                source: "/t".into(),
                id: id.into(),
            },
            event_type: EventType::AccountUpdate,
            subject: id.into(),
            body: format!(
                r#"{{"specversion":"1.0","id":"{id}",{extension}"source":"/t","type":"io.provring.account.update","data":{{"userName":"{id}"}}}}"#
            ),
        }
    }

    #[tokio::test]
    async fn overdue_items_by_adaptor_timeout_and_by_event_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path(), crate::crypto::KeyRing::test_ring()).expect("open");
        // Received at t = 1,000,000 ms.
        let t0 = 1_000_000;
        repo.store_received(
            "hr",
            vec![
                event("plain", None),
                // 1970-01-01T00:33:20Z = 2,000,000 ms: later than the timeout.
                event("late", Some("1970-01-01T00:33:20Z")),
                // 1970-01-01T00:16:50Z = 1,010,000 ms: earlier.
                event("early", Some("1970-01-01T00:16:50Z")),
            ],
            t0,
        )
        .expect("store");
        let timeouts = HashMap::from([("hr".to_owned(), 60_000)]);
        let ids = |items: Vec<OverdueItem>| -> Vec<String> {
            items.into_iter().map(|i| i.id).collect::<Vec<_>>()
        };
        assert!(
            repo.overdue(&timeouts, t0 + 5_000, 100)
                .expect("o")
                .is_empty()
        );
        assert_eq!(
            ids(repo.overdue(&timeouts, t0 + 10_000, 100).expect("o")),
            ["early"]
        );
        assert_eq!(
            ids(repo.overdue(&timeouts, t0 + 60_000, 100).expect("o")),
            ["plain", "early"]
        );
        assert_eq!(
            ids(repo.overdue(&timeouts, t0 + 60_000, 1).expect("o")),
            ["plain"]
        );
        // Adaptors not asked about are left out.
        assert!(
            repo.overdue(&HashMap::new(), u64::MAX, 100)
                .expect("o")
                .is_empty()
        );

        // Claims: one holder at a time, none once finished.
        let found = repo
            .find_pending(
                "hr",
                &[Identity {
                    source: "/t".into(),
                    id: "plain".into(),
                }],
            )
            .expect("find");
        assert_eq!(found.len(), 1);
        let item = &found[0];
        let claim = repo.claim(item).expect("claim");
        assert_eq!(repo.claim(item).err(), Some(ClaimRefused::Busy));
        assert_eq!(repo.claimed("hr"), 1);
        repo.complete(item).expect("complete");
        drop(claim);
        assert_eq!(repo.claim(item).err(), Some(ClaimRefused::Finished));
        assert_eq!(
            ids(repo.overdue(&timeouts, t0 + 60_000, 100).expect("o")),
            ["early"]
        );
    }
}
