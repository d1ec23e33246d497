//! Mirroring: every stored batch is copied to the backup adaptor of this
//! server's monitor, through the broker, before the broker is acked.
//!
//! The origin publishes to its own queue `ns.backup.<origin>` (see
//! [`wire`] for the records), which the monitor of the day consumes
//! ([`backup`]). A monitor that is down therefore never stalls its peers:
//! the copies wait on the broker.
//!
//! One task ([`Mirror`]) owns the publishing channel, so copies and
//! removals reach the queue in the order they were made. It works in
//! rounds, like the repository's group commit: every copy request that is
//! ready, plus the finished items collected since the last round (one
//! `remove` record), are published together and their confirms awaited
//! together.
//!
//! Generations: at start, after any failed publish, and whenever the
//! monitor changes, the mirror takes a new generation (rising, durable) and
//! re-sends the whole unfinished backlog under it (`begin`, copies, `end`).
//! The monitor replaces what it held for this origin and ignores records
//! of older generations. Copy requests wait until the resync is confirmed,
//! so no delivery is acked while its copy is in doubt.

pub mod backup;
pub mod wire;

use crate::broker::declare::declare_backup;
use crate::broker::{Broker, BrokerError};
use crate::repository::{Finished, Repository, RepositoryError};
use crate::topology::State;
use lapin::PublisherConfirm;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use wire::Body;

/// Finished items are sent at least this often.
const REMOVAL_INTERVAL: Duration = Duration::from_millis(50);
/// Finished items per `remove` record.
const REMOVAL_MAX: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum MirrorError {
    #[error("mirroring to the monitor failed: {0}")]
    Failed(String),
    #[error("the mirror has stopped")]
    Stopped,
}

impl From<BrokerError> for MirrorError {
    fn from(e: BrokerError) -> MirrorError {
        MirrorError::Failed(e.to_string())
    }
}

impl From<RepositoryError> for MirrorError {
    fn from(e: RepositoryError) -> MirrorError {
        MirrorError::Failed(e.to_string())
    }
}

struct CopyRequest {
    adaptor: Arc<str>,
    records: Vec<(u64, Vec<u8>)>,
    reply: oneshot::Sender<Result<(), MirrorError>>,
}

/// Handle to this server's mirror; cheap to clone.
#[derive(Clone)]
pub struct Mirror {
    tx: mpsc::UnboundedSender<CopyRequest>,
}

impl Mirror {
    /// Start the mirror task of server `node`.
    pub fn start(
        broker: Broker,
        repo: Repository,
        node: &str,
        topology: watch::Receiver<Arc<State>>,
        resync_requests: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) -> (Mirror, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (fin_tx, fin_rx) = mpsc::unbounded_channel();
        repo.set_finished_sink(fin_tx);
        let task = MirrorTask {
            node: node.to_owned(),
            broker,
            repo,
            channel: None,
            generation: 0,
            synced: false,
            monitor: None,
            removals: Vec::new(),
            retry_at: None,
        };
        let handle = tokio::spawn(task.run(rx, fin_rx, topology, resync_requests, shutdown));
        (Mirror { tx }, handle)
    }

    /// Return once `records` (batches just stored and flushed for
    /// `adaptor`) are confirmed on the broker for the monitor, and every
    /// earlier batch is too. With no records, only the second part: call
    /// it before acking redeliveries. Without a monitor there is no second
    /// place, and this returns at once.
    pub async fn copy(
        &self,
        adaptor: &str,
        records: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), MirrorError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(CopyRequest {
                adaptor: Arc::from(adaptor),
                records,
                reply,
            })
            .map_err(|_| MirrorError::Stopped)?;
        rx.await.map_err(|_| MirrorError::Stopped)?
    }
}

struct MirrorTask {
    node: String,
    broker: Broker,
    repo: Repository,
    channel: Option<Channel>,
    generation: u64,
    /// The current generation's resync is confirmed.
    synced: bool,
    monitor: Option<String>,
    removals: Vec<(String, u64, u32)>,
    /// After a failure, background rounds wait until then.
    retry_at: Option<tokio::time::Instant>,
}

impl MirrorTask {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<CopyRequest>,
        mut fin_rx: mpsc::UnboundedReceiver<Finished>,
        mut topology: watch::Receiver<Arc<State>>,
        mut resync_requests: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        self.monitor = topology
            .borrow_and_update()
            .monitor_of(&self.node)
            .map(str::to_owned);
        tracing::info!(monitor = ?self.monitor, "Mirroring to the monitor's backup adaptor.");
        let mut tick = tokio::time::interval(REMOVAL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.take_finished(&mut fin_rx);
                    if self.synced {
                        self.round(Vec::new()).await;
                    }
                    return;
                }
                changed = resync_requests.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.synced = false;
                }
                changed = topology.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let monitor = topology.borrow_and_update().monitor_of(&self.node).map(str::to_owned);
                    if monitor != self.monitor {
                        tracing::info!(from = ?self.monitor, to = ?monitor, "Monitor changed; re-sending the backlog to the new monitor.");
                        self.monitor = monitor;
                        self.synced = false;
                    }
                }
                req = rx.recv() => {
                    let Some(first) = req else { return };
                    let mut reqs = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        reqs.push(more);
                    }
                    self.take_finished(&mut fin_rx);
                    self.round(reqs).await;
                }
                _ = tick.tick() => {
                    self.take_finished(&mut fin_rx);
                    let waiting = self.retry_at.is_some_and(|t| tokio::time::Instant::now() < t);
                    if (!self.removals.is_empty() || !self.synced) && !waiting {
                        self.round(Vec::new()).await;
                    }
                }
            }
        }
    }

    fn take_finished(&mut self, fin_rx: &mut mpsc::UnboundedReceiver<Finished>) {
        while let Ok((adaptor, seq, idx)) = fin_rx.try_recv() {
            if self.monitor.is_some() {
                self.removals.push((adaptor.to_string(), seq, idx));
            }
        }
        if self.monitor.is_none() {
            self.removals.clear();
        }
    }

    /// Publish the finished items and `reqs`' copies, await their confirms,
    /// answer the requests.
    async fn round(&mut self, reqs: Vec<CopyRequest>) {
        if self.monitor.is_none() {
            self.synced = false; // a future monitor gets a full resync
            for r in reqs {
                let _ = r.reply.send(Ok(()));
            }
            return;
        }
        let result = self.publish_round(&reqs).await;
        match &result {
            Err(e) => {
                let pause = self
                    .broker
                    .config()
                    .reconnect_max
                    .min(Duration::from_secs(2));
                tracing::warn!(error = %e, monitor = ?self.monitor, retry_in = ?pause, "Mirroring failed; deliveries are not acked until a resync succeeds.");
                self.synced = false;
                self.channel = None;
                self.retry_at = Some(tokio::time::Instant::now() + pause);
            }
            Ok(()) => self.retry_at = None,
        }
        for r in reqs {
            let _ = r.reply.send(result.clone());
        }
    }

    async fn publish_round(&mut self, reqs: &[CopyRequest]) -> Result<(), MirrorError> {
        if !self.synced {
            self.resync().await?;
            self.synced = true;
        }
        let mut confirms = Vec::new();
        // Copies first, each with its batch's finished items as of now: a
        // removal published earlier (the executor may reload a batch from
        // the repository before its copy request is served) is then
        // carried by the copy itself.
        for r in reqs {
            for (seq, record) in &r.records {
                let Some(done) = self.repo.batch_bitmap(&r.adaptor, *seq) else {
                    continue; // finished already: nothing to hold
                };
                confirms.push(self.publish_copy(&r.adaptor, *seq, &done, record).await?);
            }
        }
        let removals = std::mem::take(&mut self.removals);
        for chunk in removals.chunks(REMOVAL_MAX) {
            let body = Body::Remove {
                finished: chunk.to_vec(),
            };
            confirms.push(self.publish(&body).await?);
        }
        self.await_confirms(confirms).await
    }

    /// Re-send the whole unfinished backlog under a new generation.
    async fn resync(&mut self) -> Result<(), MirrorError> {
        // The queue to the current monitor, before a generation is used.
        let ch = self.channel().await?;
        let cfg = self.broker.config();
        let monitor = self.monitor.clone().unwrap_or_default();
        let declare = declare_backup(&ch, &cfg.namespace, cfg.queue_type, &self.node, &monitor);
        tokio::time::timeout(cfg.publish_timeout, declare)
            .await
            .map_err(|_| MirrorError::Failed("declaring the backup queue timed out".into()))??;
        self.generation = self
            .repo
            .blocking(|repo| repo.next_mirror_generation())
            .await?;
        // Finished items so far are in the bitmaps read below.
        self.removals.clear();
        let batches = self.repo.blocking(|repo| repo.unfinished_batches()).await?;
        let mut confirms = vec![self.publish(&Body::Begin).await?];
        let n = batches.len();
        for (adaptor, seq, done, record) in &batches {
            confirms.push(self.publish_copy(adaptor, *seq, done, record).await?);
        }
        confirms.push(self.publish(&Body::End { batches: n as u32 }).await?);
        self.await_confirms(confirms).await?;
        tracing::info!(generation = self.generation, batches = n, monitor = ?self.monitor, "Backlog re-sent to the monitor.");
        Ok(())
    }

    async fn channel(&mut self) -> Result<Channel, MirrorError> {
        if let Some(ch) = &self.channel
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let timeout = self.broker.config().publish_timeout;
        let open = async {
            let ch = self.broker.channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(BrokerError::op("confirm.select"))?;
            Ok::<_, MirrorError>(ch)
        };
        let ch = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| MirrorError::Failed(format!("no channel within {timeout:?}")))??;
        self.channel = Some(ch.clone());
        Ok(ch)
    }

    async fn publish_copy(
        &mut self,
        adaptor: &str,
        seq: u64,
        done: &[u8],
        record: &[u8],
    ) -> Result<PublisherConfirm, MirrorError> {
        // Encoded by hand to avoid copying the record into a Body first.
        let mut bytes = wire::encode(
            &self.node,
            self.generation,
            &Body::Copy {
                adaptor: adaptor.to_owned(),
                seq,
                done: done.to_vec(),
                record: Vec::new(),
            },
        );
        bytes.reserve_exact(record.len() + crate::crypto::MAC_OVERHEAD);
        bytes.extend_from_slice(record);
        self.publish_bytes(bytes).await
    }

    async fn publish(&mut self, body: &Body) -> Result<PublisherConfirm, MirrorError> {
        let bytes = wire::encode(&self.node, self.generation, body);
        self.publish_bytes(bytes).await
    }

    /// Sign (see [`wire`]) and publish one record.
    async fn publish_bytes(&mut self, bytes: Vec<u8>) -> Result<PublisherConfirm, MirrorError> {
        let bytes = self.repo.keys().sign(crate::crypto::Context::Mirror, bytes);
        let ch = self.channel().await?;
        let cfg = self.broker.config();
        let monitor = self.monitor.as_deref().unwrap_or_default();
        let queue = crate::broker::declare::backup_queue(&cfg.namespace, &self.node, monitor);
        let publish = ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &bytes,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/x-provring-mirror".into()),
        );
        tokio::time::timeout(cfg.publish_timeout, publish)
            .await
            .map_err(|_| {
                MirrorError::Failed(format!(
                    "publish did not finish within {:?}",
                    cfg.publish_timeout
                ))
            })?
            .map_err(|e| MirrorError::Failed(format!("basic.publish: {e}")))
    }

    async fn await_confirms(&self, confirms: Vec<PublisherConfirm>) -> Result<(), MirrorError> {
        let timeout = self.broker.config().publish_timeout;
        let all = futures::future::join_all(confirms);
        let results = tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| MirrorError::Failed(format!("no publisher confirm within {timeout:?}")))?;
        for r in results {
            match r.map_err(|e| MirrorError::Failed(format!("publisher confirm: {e}")))? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(returned)) => {
                    return Err(MirrorError::Failed(format!(
                        "the broker could not route a copy: {}",
                        returned.reply_text
                    )));
                }
                Confirmation::Nack(_) | Confirmation::NotRequested => {
                    return Err(MirrorError::Failed(
                        "the broker refused (nack) a copy".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}
