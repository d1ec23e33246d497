//! An adaptor: one broker queue → repository → ack.
//!
//! The consume loop follows vector's AMQP source: `basic_qos` first, then a
//! `select!` over shutdown, the consumer stream and the writer. Deliveries
//! are grouped into batches (as many as are ready, up to
//! `broker.batch_max`); a writer task, one batch behind, decodes each
//! delivery, parks invalid ones (publish with confirm), stores the valid ones
//! (idempotent by event identity), flushes the repository (group commit), and
//! waits for the copy on its monitor ([`crate::mirror`]), and only then acks
//! the whole batch with one `multiple = true` ack. Durable items then go to
//! the executor.
//!
//! Invariant: a delivery is acked only once it is durable in the repository
//! and its copy is confirmed for the monitor, or it is confirmed on the
//! parking queue. Any broker error ends the session; the
//! broker redelivers what was not acked, and the loop reconnects with
//! back-off.

use crate::broker::consume;
use crate::broker::declare::declare_adaptor_queue;
use crate::broker::{Backoff, Broker, BrokerError};
use crate::config::AdaptorKind;
use crate::event::{Invalid, decode};
use crate::mirror::Mirror;
use crate::parking::Parking;
use crate::repository::{Repository, RepositoryError, Stored};
use crate::stats::Stats;
use crate::topology::Fence;
use crate::workflow::ItemSender;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use lapin::types::FieldTable;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

#[derive(Debug, thiserror::Error)]
pub enum AdaptorError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("parking an invalid message failed: {0}")]
    Park(#[from] crate::parking::ParkError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("the broker closed the consumer")]
    ConsumerClosed,
    #[error(transparent)]
    Mirror(#[from] crate::mirror::MirrorError),
    #[error("the writer task stopped: {0}")]
    Writer(String),
    #[error(
        "this server no longer hosts the adaptor (or cannot read the topology log); the batch goes back to the queue unacked"
    )]
    NotHosted,
}

impl From<consume::End> for AdaptorError {
    fn from(end: consume::End) -> Self {
        match end {
            consume::End::Closed => AdaptorError::ConsumerClosed,
            failed => AdaptorError::Broker(failed.error("an adaptor queue")),
        }
    }
}

/// One adaptor of this server.
pub struct Adaptor {
    parts: Arc<Parts>,
}

struct Parts {
    name: String,
    node: String,
    kind: AdaptorKind,
    queue: String,
    broker: Broker,
    repo: Repository,
    parking: Parking,
    limits: crate::config::LimitsConfig,
    items_tx: ItemSender,
    mirror: Mirror,
    stats: Arc<Stats>,
    fatal: CancellationToken,
    fence: Fence,
}

/// How long the writer waits for an unreadable topology log before it gives
/// the batch back to the broker.
const FENCE_WAIT: Duration = Duration::from_secs(5);

impl Parts {
    /// A repository that cannot store or flush leaves the in-memory index
    /// and the disk in doubt: stop the server (a restart rebuilds the index
    /// from disk) rather than go on acking.
    fn repository_failed(&self, e: RepositoryError) -> AdaptorError {
        tracing::error!(adaptor = %self.name, error = %e, "Repository failed; stopping the server.");
        self.fatal.cancel();
        AdaptorError::Repository(e)
    }
}

impl Adaptor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        node: &str,
        kind: AdaptorKind,
        queue: &str,
        broker: Broker,
        repo: Repository,
        parking: Parking,
        limits: crate::config::LimitsConfig,
        items_tx: ItemSender,
        mirror: Mirror,
        stats: Arc<Stats>,
        fatal: CancellationToken,
        fence: Fence,
    ) -> Adaptor {
        Adaptor {
            parts: Arc::new(Parts {
                name: name.to_owned(),
                node: node.to_owned(),
                kind,
                queue: queue.to_owned(),
                broker,
                repo,
                parking,
                limits,
                items_tx,
                mirror,
                stats,
                fatal,
                fence,
            }),
        }
    }

    /// Consume until `shutdown`, reconnecting with back-off after errors.
    ///
    /// `shutdown` alone (the server is not stopping) means the adaptor was
    /// surrendered: the channel is closed at once, so that what it holds
    /// unacked goes back to the queue and single-active-consumer hands the
    /// queue to the new host.
    pub async fn run(self, shutdown: CancellationToken, server_stop: CancellationToken) {
        let cfg = self.parts.broker.config();
        let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
        loop {
            let started = Instant::now();
            let result = self.session(&shutdown, &server_stop).await;
            if shutdown.is_cancelled() {
                if let Err(e) = result {
                    tracing::warn!(adaptor = %self.parts.name, error = %e, "Consumer ended with an error during shutdown; unacked deliveries go back to the queue.");
                }
                return;
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(adaptor = %self.parts.name, error = %e, retry_in = ?delay, "Consumer stopped; reconnecting.")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
        server_stop: &CancellationToken,
    ) -> Result<(), AdaptorError> {
        let p = &self.parts;
        let cfg = p.broker.config();
        let channel = p.broker.channel().await?;
        let queue =
            declare_adaptor_queue(&channel, &cfg.namespace, cfg.queue_type, &p.queue).await?;
        let tag = consume::tag(&format!("{}.{}", p.node, p.name));
        let mut consumer =
            consume::consume(&channel, &queue, &tag, cfg.prefetch, FieldTable::default()).await?;
        tracing::info!(adaptor = %p.name, %queue, "Consuming.");

        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Delivery>>(2);
        // Aborted with the session: a surrendered adaptor's writer must not
        // go on storing and acking.
        let mut writer = AbortOnDropHandle::new(tokio::spawn(write_loop(
            p.clone(),
            channel.clone(),
            batch_rx,
        )));
        let batch_max = cfg.batch_max;
        let mut writer_done = None;
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                res = &mut writer => {
                    let e = match res {
                        Ok(Ok(())) => AdaptorError::Writer("ended".into()),
                        Ok(Err(e)) => e,
                        Err(e) => AdaptorError::Writer(e.to_string()),
                    };
                    writer_done = Some(());
                    break Err(e);
                }
                next = consume::next(&mut consumer) => {
                    let delivery = match next {
                        Ok(d) => d,
                        Err(end) => break Err(end.into()),
                    };
                    let mut batch = Vec::with_capacity(64);
                    batch.push(delivery);
                    // The stream's end or an error is kept, not swallowed:
                    // the batch goes to the writer first, then the session ends.
                    let end = consume::take_ready(&mut consumer, &mut batch, batch_max);
                    p.stats.received.fetch_add(batch.len() as u64, Relaxed);
                    let sent = batch_tx.send(batch).await.is_ok();
                    if let Some(end) = end {
                        break Err(end.into());
                    }
                    if !sent {
                        // The writer has stopped; its error arrives next turn.
                        continue;
                    }
                }
            }
        };
        if shutdown.is_cancelled() {
            // No new deliveries; what is buffered unacked goes back to the queue.
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        drop(batch_tx);
        let writer_result = match writer_done {
            Some(()) => Ok(()),
            None => match writer.await {
                Ok(r) => r,
                Err(e) => Err(AdaptorError::Writer(e.to_string())),
            },
        };
        if !server_stop.is_cancelled() {
            // At shutdown the connection's close takes the channel with it;
            // closing it here as well makes lapin log a spurious error.
            let _ = channel.close(200, "consumer stopped".into()).await;
        }
        result.and(writer_result)
    }
}

async fn write_loop(
    p: Arc<Parts>,
    channel: Channel,
    mut batches: mpsc::Receiver<Vec<Delivery>>,
) -> Result<(), AdaptorError> {
    while let Some(batch) = batches.recv().await {
        let Some(last_tag) = batch.last().map(|d| d.delivery_tag) else {
            continue;
        };
        // Fencing: nothing is stored for an adaptor this server no longer
        // hosts, e.g. after it was frozen and taken over; the deliveries go
        // back to the queue, to the new host.
        let at_fence = Instant::now();
        if !p.fence.wait_hosts(&p.name, FENCE_WAIT).await {
            return Err(AdaptorError::NotHosted);
        }
        if at_fence.elapsed() > Duration::from_millis(50) {
            p.stats.fence_pauses.fetch_add(1, Relaxed);
        }
        let mut events = Vec::with_capacity(batch.len());
        for delivery in &batch {
            match decode(&delivery.data, p.kind, &p.limits) {
                Ok(event) => events.push(event),
                Err(reason) => park_invalid(&p, delivery, reason).await?,
            }
        }
        drop(batch);
        let stored = if events.is_empty() {
            Vec::new()
        } else {
            let name = p.name.clone();
            let n = events.len();
            let t0 = Instant::now();
            let (stored, records) = p
                .repo
                .blocking(move |repo| repo.store_with_records(&name, events))
                .await
                .map_err(|e| match e {
                    // A panic in the store task: the consumer reconnects.
                    RepositoryError::Task(e) => AdaptorError::Writer(e.to_string()),
                    e => p.repository_failed(e),
                })?;
            let t1 = Instant::now();
            p.repo.flush().await.map_err(|e| p.repository_failed(e))?;
            let t2 = Instant::now();
            // The copy on the monitor; also for redeliveries only (no
            // records), whose copies may be part of a resync in progress.
            if let Err(e) = p.mirror.copy(&p.name, records).await {
                // Durable here: hand the new items to the executor anyway
                // (their redeliveries will be duplicates), but do not ack.
                hand_over(&p, stored);
                return Err(e.into());
            }
            p.stats.mirrored.fetch_add(stored.len() as u64, Relaxed);
            p.stats.metrics.observe(
                "provring_mirror_seconds",
                &[("adaptor", &p.name)],
                t2.elapsed().as_secs_f64(),
            );
            tracing::trace!(adaptor = %p.name, batch = n, store_us = (t1 - t0).as_micros() as u64, flush_us = (t2 - t1).as_micros() as u64, mirror_us = t2.elapsed().as_micros() as u64, "Batch durable on both servers.");
            stored
        };
        // Durable now: hand the items to the executor before the ack, so
        // that a failed ack (the broker then redelivers them, and they are
        // recognised as duplicates) cannot strand them in the repository.
        hand_over(&p, stored);
        // Stored and mirrored: ack unless this server was taken over (its
        // taker holds the copies). After a plain move the batch is acked
        // here, and what of it is unfinished goes with the handed-over
        // backlog; not acking would have the new host deliver it again.
        let _ = tokio::time::timeout(FENCE_WAIT, p.fence.wait_open()).await;
        if !p.fence.not_taken_over() {
            return Err(AdaptorError::NotHosted);
        }
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await
            .map_err(BrokerError::op("basic.ack"))?;
    }
    Ok(())
}

fn hand_over(p: &Parts, stored: Vec<Stored>) {
    {
        for s in stored {
            match s {
                Stored::New(item) => {
                    p.stats.stored.fetch_add(1, Relaxed);
                    // If the executor has stopped (shutdown), the item waits
                    // in the repository for the next start.
                    let _ = p.items_tx.send(*item);
                }
                Stored::Duplicate => {
                    p.stats.duplicates.fetch_add(1, Relaxed);
                }
                Stored::AlreadyDone => {
                    p.stats.already_done.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

async fn park_invalid(p: &Parts, delivery: &Delivery, reason: Invalid) -> Result<(), AdaptorError> {
    tracing::warn!(adaptor = %p.name, %reason, bytes = delivery.data.len(), "Invalid message parked.");
    p.parking
        .park_bytes(&p.name, &delivery.data, &reason.0)
        .await?;
    p.stats.invalid.fetch_add(1, Relaxed);
    Ok(())
}
