//! Moving an adaptor with its backlog (`provring move`).
//!
//! 1. `Move` in the topology log gives the adaptor to its new host and
//!    records a pending handover from the old one. The old host stops the
//!    adaptor at once (consumer and executor, as for any surrender).
//! 2. The old host publishes the adaptor's backlog to
//!    `<namespace>.handover.<adaptor>` (publisher confirms), drops it from
//!    its repository, records `HandedOver`, and asks its monitor to take a
//!    fresh copy of what it still holds.
//! 3. The new host starts the adaptor only once `HandedOver` is in the log,
//!    and first drains the handover queue: each chunk is stored, flushed
//!    and mirrored before it is acked.
//!
//! Every step can be repeated: a restarted old host sends again what it
//! still holds, and the new host stores by event identity, so a repeated
//! item is a duplicate, not a second delivery. If the old host fails during
//! the handover, its taker adopts its copies and becomes the sender.

use crate::broker::declare::{declare_handover_queue, handover_queue};
use crate::broker::{Broker, BrokerError, Publisher};
use crate::crypto::Context;
use crate::mirror::Mirror;
use crate::repository::{Repository, Stored};
use crate::topology::{Change, Fence, Topology};
use crate::workflow::ItemSender;
use lapin::types::{AMQPValue, FieldTable};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the sender waits for an unreadable topology log per step.
const FENCE_WAIT: Duration = Duration::from_secs(5);
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("publishing the backlog to the handover queue failed: {0}")]
    Publish(#[from] crate::broker::PublishError),
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
    #[error(transparent)]
    Mirror(#[from] crate::mirror::MirrorError),
    #[error("cannot park a handover record: {0}")]
    Park(#[from] crate::parking::ParkError),
    #[error("{0} is no longer hosted here")]
    NotHosted(String),
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> HandoverError {
    HandoverError::Other(e.to_string())
}

/// What the sending side needs.
pub struct Sender<'a> {
    pub node: &'a str,
    pub broker: &'a Broker,
    pub publisher: &'a Publisher,
    pub repo: &'a Repository,
    pub topology: &'a Topology,
    pub fence: &'a Fence,
    /// Cancelled when the handover is no longer this server's to do.
    pub stop: &'a CancellationToken,
}

impl Sender<'_> {
    /// Whether the handover is still this server's to do, in a log read
    /// within `fence_after`; an error if the log cannot be read.
    async fn still_mine(&self, adaptor: &str) -> Result<bool, HandoverError> {
        if self.stop.is_cancelled() {
            return Ok(false);
        }
        let _ = tokio::time::timeout(FENCE_WAIT, self.fence.wait_open()).await;
        if !self.fence.is_open() {
            return Err(other("cannot read the topology log"));
        }
        Ok(self.fence.hands_over(adaptor))
    }

    /// Hand this server's backlog of `adaptor` over (step 2). Call only once
    /// the adaptor's consumer and executor here have stopped. Returns the
    /// number of items handed over, or `None` if the handover stopped being
    /// this server's to do (a takeover gave the adaptor elsewhere).
    pub async fn send(&self, adaptor: &str) -> Result<Option<usize>, HandoverError> {
        if !self.still_mine(adaptor).await? {
            return Ok(None);
        }
        // A timeout check parking an item of the adaptor finishes first:
        // what it parks must not be handed over as well.
        // (A claim lasts at most one publish timeout.)
        while self.repo.claimed(adaptor) > 0 {
            if !self.still_mine(adaptor).await? {
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let name = adaptor.to_owned();
        let records = self
            .repo
            .blocking(move |repo| repo.handover_records(&name))
            .await?;
        let mut items = 0;
        if !records.is_empty() {
            let cfg = self.broker.config();
            let channel = self.broker.channel().await?;
            let queue =
                declare_handover_queue(&channel, &cfg.namespace, cfg.queue_type, adaptor).await?;
            let _ = channel.close(200, "declared".into()).await;
            for record in &records {
                if !self.still_mine(adaptor).await? {
                    return Ok(None);
                }
                items += crate::repository::check_record(record)
                    .map(|(_, n)| n)
                    .unwrap_or(0);
                let mut headers = FieldTable::default();
                headers.insert(
                    "x-provring-from".into(),
                    AMQPValue::LongString(self.node.into()),
                );
                let signed = self
                    .repo
                    .keys()
                    .sign(Context::Handover, handover_payload(adaptor, record));
                self.publisher.publish("", &queue, &signed, headers).await?;
            }
        }
        // What was published is on the queue: if the handover stops being
        // ours now, the adaptor's next start here drains it back.
        if !self.still_mine(adaptor).await? {
            return Ok(None);
        }
        let name = adaptor.to_owned();
        self.repo
            .blocking(move |repo| repo.drop_adaptor(&name))
            .await?;
        let me = self.node.to_owned();
        let name = adaptor.to_owned();
        self.topology
            .propose_with(|s| {
                (s.handovers.get(&name) == Some(&me)).then(|| Change::HandedOver {
                    adaptor: name.clone(),
                    from: me.clone(),
                    items: items as u64,
                })
            })
            .await
            .map_err(other)?;
        // The monitor still holds copies of what was handed over: a new
        // generation replaces them with what this server holds now.
        if let Some(monitor) = self.topology.state().monitor_of(self.node) {
            let _ = self.topology.request_resync(self.node, monitor).await;
        }
        Ok(Some(items))
    }
}

/// What the receiving side needs.
pub struct Receiver<'a> {
    pub node: &'a str,
    pub broker: &'a Broker,
    /// Where an unreadable record goes, with its reason.
    pub parking: &'a crate::parking::Parking,
    pub repo: &'a Repository,
    pub mirror: &'a Mirror,
    pub fence: &'a Fence,
    pub items_tx: &'a ItemSender,
}

impl Receiver<'_> {
    /// Take whatever waits on the handover queue of `adaptor` into this
    /// server's backlog (step 3). Returns the number of new items.
    pub async fn receive(&self, adaptor: &str) -> Result<usize, HandoverError> {
        let cfg = self.broker.config();
        let queue = handover_queue(&cfg.namespace, adaptor);
        let channel = self.broker.channel().await?;
        if crate::broker::drain::ready(&channel, &queue)
            .await?
            .is_none()
        {
            let _ = channel.close(200, "nothing to receive".into()).await;
            return Ok(0);
        }
        let channel = self.broker.channel().await?;
        let tag = format!("provring.handover.{}.{adaptor}", self.node);
        let new = AtomicUsize::new(0);
        let new_ref = &new;
        let result = crate::broker::drain::drain(&channel, &queue, &tag, |bodies| async move {
            if !self.fence.hosts(adaptor) {
                return Err(HandoverError::NotHosted(adaptor.to_owned()));
            }
            for body in bodies {
                let record = match open_handover(self.repo.keys(), adaptor, &body) {
                    Ok(record) => record,
                    Err(reason) => {
                        // Never applied; parked rather than dropped, so that
                        // a record of a misconfigured server is not lost.
                        tracing::warn!(%adaptor, %reason, bytes = body.len(), "Handover record refused and parked.");
                        self.parking
                            .park_bytes(adaptor, &body, &format!("handover record refused: {reason}"))
                            .await?;
                        continue;
                    }
                };
                let (received_ms, events) = match self.repo.handover_events(adaptor, record) {
                    Ok(x) => x,
                    Err(reason) => {
                        // Not expected from this version's sender; kept
                        // on the parking queue, never dropped.
                        tracing::error!(%adaptor, %reason, bytes = body.len(), "Unreadable handover record parked.");
                        self.parking
                            .park_bytes(
                                adaptor,
                                record,
                                &format!("unreadable handover record: {reason}"),
                            )
                            .await?;
                        continue;
                    }
                };
                let name = adaptor.to_owned();
                let (stored, records) = self
                    .repo
                    .blocking(move |repo| repo.store_received(&name, events, received_ms))
                    .await?;
                self.repo.flush().await?;
                self.mirror.copy(adaptor, records).await?;
                for s in stored {
                    if let Stored::New(item) = s {
                        new_ref.fetch_add(1, Relaxed);
                        let _ = self.items_tx.send(*item);
                    }
                }
            }
            Ok(())
        })
        .await;
        let _ = channel.close(200, "received".into()).await;
        result?;
        // Empty now; nobody sends to it until the next move.
        let channel = self.broker.channel().await?;
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                },
            )
            .await;
        let _ = channel.close(200, "deleted".into()).await;
        Ok(new.into_inner())
    }
}

/// What a handover record's MAC covers: the adaptor (a `u32` length and
/// its name), then the batch record, so that a record cannot be replayed
/// onto another adaptor's queue.
fn handover_payload(adaptor: &str, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + adaptor.len() + record.len());
    out.extend_from_slice(&(adaptor.len() as u32).to_be_bytes());
    out.extend_from_slice(adaptor.as_bytes());
    out.extend_from_slice(record);
    out
}

/// Check a handover record's MAC and that it was sent for `adaptor`;
/// return the batch record.
fn open_handover<'a>(
    keys: &crate::crypto::KeyRing,
    adaptor: &str,
    body: &'a [u8],
) -> Result<&'a [u8], String> {
    let payload = keys
        .verify(Context::Handover, body)
        .map_err(|e| format!("no valid MAC: {e}"))?;
    let len = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or("too short")? as usize;
    let name = payload
        .get(4..4usize.saturating_add(len))
        .ok_or("too short")?;
    if name != adaptor.as_bytes() {
        return Err(format!(
            "sent for adaptor {:?}, not {adaptor:?}",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(&payload[4 + len..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handover_record_opens_only_for_its_adaptor() {
        let keys = crate::crypto::KeyRing::from_keys(&[4; 32], &[]);
        let signed = keys.sign(Context::Handover, handover_payload("hr", b"record"));
        assert_eq!(open_handover(&keys, "hr", &signed), Ok(&b"record"[..]));
        let e = open_handover(&keys, "pw", &signed).expect_err("other adaptor");
        assert!(e.contains("\"hr\""), "{e}");
        let other = crate::crypto::KeyRing::from_keys(&[5; 32], &[]);
        assert!(open_handover(&other, "hr", &signed).is_err());
        let mirror = keys.sign(Context::Mirror, handover_payload("hr", b"record"));
        assert!(open_handover(&keys, "hr", &mirror).is_err());
        let short = keys.sign(Context::Handover, vec![0, 0, 0, 9, b'h']);
        assert!(open_handover(&keys, "hr", &short).is_err());
    }
}
