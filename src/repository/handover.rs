//! A moved adaptor's backlog, as records for its handover queue
//! (read by the handover module).

use super::backup::record_events;
use super::{RECORD_MAX_BYTES, Repository, RepositoryError, record};
use crate::event::Event;

impl Repository {
    /// The unfinished items of `adaptor` in arrival order, as records of
    /// bounded size; each record keeps its items' receipt time.
    /// Synchronous: call from `spawn_blocking`.
    pub fn handover_records(&self, adaptor: &str) -> Result<Vec<Vec<u8>>, RepositoryError> {
        let items = self.pending(adaptor, 0, usize::MAX)?;
        let mut out = Vec::new();
        let mut current: Option<(u64, record::Writer)> = None;
        for item in items {
            let fits = matches!(&current, Some((ms, w))
                if *ms == item.received_ms && w.len() + item.body.len() + 256 <= RECORD_MAX_BYTES);
            if !fits {
                if let Some((_, w)) = current.take() {
                    out.push(w.finish());
                }
                current = Some((
                    item.received_ms,
                    record::Writer::new(item.received_ms, &self.inner.keys),
                ));
            }
            if let Some((_, w)) = current.as_mut() {
                w.push(
                    &item.source,
                    &item.id,
                    &item.event_type,
                    &item.subject,
                    &item.body,
                )
                .map_err(|e| RepositoryError::Seal(e.to_string()))?;
            }
        }
        if let Some((_, w)) = current {
            out.push(w.finish());
        }
        Ok(out)
    }
}

impl Repository {
    /// The receipt time and events of one handover record; `from` names
    /// the sender in warnings.
    pub fn handover_events(
        &self,
        from: &str,
        bytes: &[u8],
    ) -> Result<(u64, Vec<Event>), record::RecordError> {
        let rec = record::read(bytes, &self.inner.keys)?;
        Ok((rec.received_ms, record_events(from, rec.items)))
    }

    /// The key ring this repository seals with (shared with the mirror,
    /// the handover and the parking publishers).
    pub fn keys(&self) -> &std::sync::Arc<crate::crypto::KeyRing> {
        &self.inner.keys
    }
}
