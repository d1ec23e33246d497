//! `provring rekey`: re-seal every event body of a stopped server's
//! repository (its own backlog and the copies it holds for its peer)
//! under the newest cluster key.
//!
//! Each record is rewritten by one sled insert, so a rekey cut short
//! leaves every record readable with the key ring it ran with (old and new
//! keys). Records already sealed entirely under the newest key are left
//! as they are.

use super::{Repository, RepositoryError, describe_key, record};

/// What a rekey did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rekeyed {
    /// Records rewritten.
    pub records: usize,
    /// Events re-sealed in them.
    pub events: usize,
    /// Records that were already sealed under the newest key.
    pub current: usize,
}

impl Repository {
    /// Re-seal every record under the newest key, then flush.
    /// Synchronous: call from `spawn_blocking` (or before the runtime is busy).
    pub fn rekey(&self) -> Result<Rekeyed, RepositoryError> {
        let mut done = Rekeyed::default();
        for tree in [&*self.inner.db, &self.inner.copies] {
            let prefix: &[u8] = if std::ptr::eq(tree, &*self.inner.db) {
                b"B"
            } else {
                b"C"
            };
            for entry in tree.scan_prefix(prefix) {
                let (k, v) = entry?;
                let corrupt = |reason: record::RecordError| RepositoryError::Corrupt {
                    key: describe_key(&k),
                    reason,
                };
                let rec = record::read(&v, &self.inner.keys).map_err(corrupt)?;
                if record::sealed_under(&v, &self.inner.keys.fingerprint()).map_err(corrupt)? {
                    done.current += 1;
                    continue;
                }
                let mut w = record::Writer::new(rec.received_ms, &self.inner.keys);
                for item in &rec.items {
                    w.push(
                        &item.source,
                        &item.id,
                        &item.event_type,
                        &item.subject,
                        &item.body,
                    )
                    .map_err(|e| RepositoryError::Seal(e.to_string()))?;
                }
                tree.insert(&k, w.finish())?;
                done.records += 1;
                done.events += rec.items.len();
            }
        }
        self.flush_blocking()?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use crate::crypto::KeyRing;
    use crate::event::{Event, EventType, Identity};
    use crate::repository::Repository;
    use std::sync::Arc;

    #[tokio::test]
    async fn rekey_reseals_under_the_newest_key_and_old_keys_retire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = [1u8; 32];
        let new = [2u8; 32];
        let event = Event {
            identity: Identity {
                source: "/hr".into(),
                id: "e1".into(),
            },
            event_type: EventType::AccountCreate,
            subject: "jdoe".into(),
            body: "{\"id\":\"e1\"}".into(),
        };
        {
            let repo = Repository::open(dir.path(), Arc::new(KeyRing::from_keys(&old, &[])))
                .expect("open");
            repo.store("hr", vec![event]).expect("store");
            repo.flush().await.expect("flush");
        }
        // The new key alone cannot open what the old key sealed.
        let only_new = Arc::new(KeyRing::from_keys(&new, &[]));
        assert!(Repository::open(dir.path(), only_new.clone()).is_err());
        {
            let both = Arc::new(KeyRing::from_keys(&new, &[old]));
            let repo = Repository::open(dir.path(), both).expect("open with both keys");
            let first = repo.rekey().expect("rekey");
            assert_eq!((first.records, first.events), (1, 1));
            let again = repo.rekey().expect("rekey again");
            assert_eq!((again.records, again.current), (0, 1));
        }
        let repo = Repository::open(dir.path(), only_new).expect("the new key alone opens it");
        let items = repo.pending("hr", 0, 10).expect("pending");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].subject, "jdoe");
    }
}
