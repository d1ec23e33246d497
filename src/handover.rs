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
use crate::mirror::Mirror;
use crate::repository::{Repository, Stored, handover_events};
use crate::topology::{Change, Fence, Topology};
use crate::workflow::ItemSender;
use lapin::types::{AMQPValue, FieldTable};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("publishing the backlog to the handover queue failed: {0}")]
    Publish(#[from] crate::broker::PublishError),
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
}

impl Sender<'_> {
    /// Hand this server's backlog of `adaptor` over (step 2). Call only once
    /// the adaptor's consumer and executor here have stopped. Returns the
    /// number of items handed over.
    pub async fn send(&self, adaptor: &str) -> Result<usize, HandoverError> {
        let repo = self.repo.clone();
        let name = adaptor.to_owned();
        let records = tokio::task::spawn_blocking(move || repo.handover_records(&name))
            .await
            .map_err(other)?
            .map_err(other)?;
        let mut items = 0;
        if !records.is_empty() {
            let cfg = self.broker.config();
            let channel = self.broker.channel().await?;
            let queue =
                declare_handover_queue(&channel, &cfg.namespace, cfg.queue_type, adaptor).await?;
            let _ = channel.close(200, "declared".into()).await;
            for record in &records {
                items += crate::repository::check_record(record)
                    .map(|(_, n)| n)
                    .unwrap_or(0);
                let mut headers = FieldTable::default();
                headers.insert(
                    "x-provring-from".into(),
                    AMQPValue::LongString(self.node.into()),
                );
                self.publisher.publish("", &queue, record, headers).await?;
            }
        }
        let repo = self.repo.clone();
        let name = adaptor.to_owned();
        tokio::task::spawn_blocking(move || repo.drop_adaptor(&name))
            .await
            .map_err(other)?
            .map_err(other)?;
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
        Ok(items)
    }
}

/// What the receiving side needs.
pub struct Receiver<'a> {
    pub node: &'a str,
    pub broker: &'a Broker,
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
                return Err(format!("{adaptor} is no longer hosted here"));
            }
            for body in bodies {
                let (received_ms, events) = match handover_events(adaptor, &body) {
                    Ok(x) => x,
                    Err(reason) => {
                        // Written by this version's sender, so never
                        // expected; kept on the log, not on the queue.
                        tracing::error!(%adaptor, %reason, bytes = body.len(), "Unreadable handover record skipped.");
                        continue;
                    }
                };
                let repo = self.repo.clone();
                let name = adaptor.to_owned();
                let (stored, records) = tokio::task::spawn_blocking(move || {
                    repo.store_received(&name, events, received_ms)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                self.repo.flush().await.map_err(|e| e.to_string())?;
                self.mirror
                    .copy(adaptor, records)
                    .await
                    .map_err(|e| e.to_string())?;
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
