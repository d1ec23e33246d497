//! The backup adaptor: consumes the copies of the servers this server
//! monitors (`ns.backup.<origin>`), stores them in the repository's copies
//! tree, applies removals, and acks only after the repository's flush.
//!
//! Records are checked before anything is applied: a record that cannot be
//! decoded, names another origin than its queue's or a server the topology
//! does not know, or belongs to an older generation (or to a newer one whose
//! `begin` was not seen) is ignored with a warning and acked; it is never
//! applied and never stops the consumer.

use super::wire::{self, Body, Frame};
use crate::broker::consume;
use crate::broker::declare::declare_backup;
use crate::broker::{Backoff, Broker, BrokerError};
use crate::repository::{Repository, RepositoryError, check_record};
use crate::topology::{State, Topology};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Deliveries applied per flush.
const BATCH_MAX: usize = 256;

/// How long a new backup consumer waits for the origin's resync before it
/// asks for one.
const RESYNC_GRACE: Duration = Duration::from_secs(5);

/// Run one backup consumer per origin this server monitors, following the
/// topology.
pub async fn run(
    broker: Broker,
    repo: Repository,
    node: String,
    log: Topology,
    fatal: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut topology = log.subscribe();
    let mut running: HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        let state = topology.borrow_and_update().clone();
        let wanted = state.origins_of(&node);
        let mut dropped = Vec::new();
        running.retain(|origin, (stop, _)| {
            let keep = wanted.contains(origin);
            if !keep {
                tracing::info!(%origin, "No longer monitoring; backup consumer stopped.");
                stop.cancel();
                dropped.push(origin.clone());
            }
            keep
        });
        for origin in dropped {
            // The new monitor gets the backlog from the origin itself; a
            // failed origin's copies stay for its taker to adopt.
            let failed = state.servers.get(&origin).is_some_and(|s| s.failed);
            if !failed {
                let o = origin.clone();
                if let Err(e) = repo.blocking(move |r| r.copies_drop(&o)).await {
                    tracing::warn!(%origin, error = %e, "Cannot drop the copies of a server no longer monitored.");
                }
            }
        }
        for origin in wanted {
            if running.contains_key(&origin) {
                continue;
            }
            tracing::info!(%origin, "Holding copies of the monitored server's backlog.");
            let stop = shutdown.child_token();
            let consumer = Consumer {
                origin: origin.clone(),
                node: node.clone(),
                broker: broker.clone(),
                repo: repo.clone(),
                log: log.clone(),
                topology: topology.clone(),
                fatal: fatal.clone(),
                requested: std::sync::Mutex::new(None),
            };
            let handle = tokio::spawn(consumer.run(stop.clone()));
            running.insert(origin, (stop, handle));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = topology.changed() => if changed.is_err() { break },
        }
    }
    for (_, (stop, handle)) in running {
        stop.cancel();
        let _ = handle.await;
    }
}

struct Consumer {
    origin: String,
    node: String,
    broker: Broker,
    repo: Repository,
    log: Topology,
    topology: watch::Receiver<Arc<State>>,
    fatal: CancellationToken,
    /// When a resync was last asked for, and for which generation gap.
    requested: std::sync::Mutex<Option<(Instant, u64)>>,
}

/// Why records were ignored, with counts, so that a burst of stale records
/// gives one warning per batch rather than one per record.
#[derive(Default)]
struct Ignored(BTreeMap<String, usize>);

impl Ignored {
    fn add(&mut self, reason: String) {
        *self.0.entry(reason).or_default() += 1;
    }
}

impl Consumer {
    async fn run(self, shutdown: CancellationToken) {
        let cfg = self.broker.config();
        let mut started = Some(Instant::now());
        let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
        loop {
            let session_started = Instant::now();
            let result = self.session(&shutdown, &mut started).await;
            if shutdown.is_cancelled() {
                return;
            }
            if session_started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            if let Err(e) = result {
                tracing::warn!(origin = %self.origin, error = %e, retry_in = ?delay, "Backup consumer stopped; reconnecting.");
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
        started: &mut Option<Instant>,
    ) -> Result<(), BrokerError> {
        let cfg = self.broker.config();
        let channel = self.broker.channel().await?;
        let queue = declare_backup(
            &channel,
            &cfg.namespace,
            cfg.queue_type,
            &self.origin,
            &self.node,
        )
        .await?;
        // RabbitMQ 3.10 can answer a declare of a quorum queue that another
        // connection is still creating before the queue runs; a consume
        // then fails with INTERNAL_ERROR and closes the whole connection.
        // The origin declares the same queue as it starts: give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tag = consume::tag(&format!("backup.{}", self.origin));
        let mut consumer =
            consume::consume(&channel, &queue, &tag, cfg.prefetch, FieldTable::default()).await?;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let first = tokio::select! {
                _ = check.tick() => {
                    // Still nothing held a while after the link was made
                    // (the origin re-sends when it sees a new monitor): the
                    // origin may believe this server holds its copies (a
                    // lost repository). Ask once.
                    if let Some(t) = *started
                        && t.elapsed() > RESYNC_GRACE
                    {
                        *started = None;
                        if self.repo.copies_generation(&self.origin) == 0 {
                            self.ask_resync(0).await;
                        }
                    }
                    continue;
                }
                _ = shutdown.cancelled() => {
                    // Unacked records go back to the queue for the next
                    // consumer (a new monitor, or the taker's drain).
                    let _ = channel.close(200, "backup consumer stopped".into()).await;
                    return Ok(());
                }
                next = consume::next(&mut consumer) => next.map_err(|end| end.error("a backup queue"))?,
            };
            let mut batch = vec![first];
            // What arrived before an end is stored and acked first.
            let end = consume::take_ready(&mut consumer, &mut batch, BATCH_MAX);
            let last = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
            if let Err(e) = self.apply(batch).await {
                tracing::error!(origin = %self.origin, error = %e, "Cannot store copies; stopping the server.");
                self.fatal.cancel();
                return Err(BrokerError::Closed(e.to_string()));
            }
            let acked = channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await;
            // After an end, its reason says more than the failed ack.
            if let Some(end) = end {
                return Err(end.error("a backup queue"));
            }
            acked.map_err(BrokerError::op("basic.ack"))?;
        }
    }

    /// Ask the origin, through the topology log, to re-send its backlog;
    /// at most once per generation gap and every 5 s.
    async fn ask_resync(&self, gap: u64) {
        {
            let mut last = self
                .requested
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, g)) = *last
                && (g == gap || at.elapsed() < Duration::from_secs(5))
            {
                return;
            }
            *last = Some((Instant::now(), gap));
        }
        tracing::info!(origin = %self.origin, "Asking the origin to re-send its backlog.");
        if let Err(e) = self.log.request_resync(&self.origin, &self.node).await {
            tracing::warn!(origin = %self.origin, error = %e, "Cannot ask the origin for its backlog.");
        }
    }

    /// Delete the queues that carried the origin's copies to earlier
    /// monitors: the resync just completed replaces what they held.
    async fn delete_old_queues(&self) {
        let state = self.topology.borrow().clone();
        let cfg = self.broker.config();
        let Ok(ch) = self.broker.channel().await else {
            return;
        };
        for other in state.servers.keys() {
            if *other == self.node || *other == self.origin {
                continue;
            }
            let q = crate::broker::declare::backup_queue(&cfg.namespace, &self.origin, other);
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = ch.close(200, "cleaned".into()).await;
    }

    /// Check and apply a batch of records in order, then flush.
    async fn apply(&self, batch: Vec<Delivery>) -> Result<(), RepositoryError> {
        let known: Vec<String> = self.topology.borrow().servers.keys().cloned().collect();
        let records = batch.into_iter().map(|d| d.data).collect();
        let applied = apply_records(&self.repo, &self.origin, known, records).await?;
        if let Some(g) = applied.gap {
            self.ask_resync(g).await;
        }
        if applied.completed {
            self.delete_old_queues().await;
        }
        Ok(())
    }
}

/// What [`apply_records`] saw.
pub struct Applied {
    /// A generation newer than the one held, whose start was not seen.
    pub gap: Option<u64>,
    /// A resync completed.
    pub completed: bool,
}

/// Check and apply `records` (mirror records of `origin`) in order, then
/// flush. `known` are the servers of the topology.
pub async fn apply_records(
    repo: &Repository,
    origin: &str,
    known: Vec<String>,
    records: Vec<Vec<u8>>,
) -> Result<Applied, RepositoryError> {
    let r = repo.clone();
    let o = origin.to_owned();
    let (ignored, gap, completed) = tokio::task::spawn_blocking(move || {
        let (repo, origin) = (r, o);
        let mut ignored = Ignored::default();
        let mut gap = None;
        let mut completed = false;
        let mut generation = repo.copies_generation(&origin);
        for data in &records {
            // Authenticate before anything of the record is read.
            let data = match repo.keys().verify(crate::crypto::Context::Mirror, data) {
                Ok(payload) => payload,
                Err(e) => {
                    ignored.add(format!("mirror record without a valid MAC: {e}"));
                    continue;
                }
            };
            let frame = match wire::decode(data) {
                Ok(f) => f,
                Err(e) => {
                    ignored.add(format!("malformed mirror record: {e}"));
                    continue;
                }
            };
            if let Err(reason) = check(&frame, &origin, &known, generation) {
                if frame.origin == origin && frame.generation > generation {
                    gap = Some(frame.generation);
                }
                ignored.add(reason);
                continue;
            }
            match frame.body {
                Body::Begin => {
                    repo.copies_begin(&origin, frame.generation)?;
                    generation = frame.generation;
                    tracing::info!(%origin, generation, "Resync from the origin started; earlier copies replaced.");
                }
                Body::Copy {
                    adaptor,
                    seq,
                    done,
                    record,
                } => {
                    if let Err(e) = check_record(&record) {
                        ignored.add(format!("malformed copy of a batch: {e}"));
                        continue;
                    }
                    repo.copies_store(&origin, &adaptor, seq, &done, &record)?;
                }
                Body::Remove { finished } => repo.copies_remove(&origin, &finished)?,
                Body::End { batches } => {
                    tracing::info!(%origin, generation, batches, "Resync from the origin complete.");
                    completed = true;
                }
            }
        }
        Ok::<_, RepositoryError>((ignored, gap, completed))
    })
    .await
    .map_err(|e| RepositoryError::Flush(e.to_string()))??;
    for (reason, count) in ignored.0 {
        tracing::warn!(%origin, count, %reason, "Mirror records ignored.");
    }
    repo.flush().await?;
    Ok(Applied { gap, completed })
}

/// Whether a decoded record may be applied to `origin`'s copies, whose
/// current generation is `generation`.
fn check(frame: &Frame, origin: &str, known: &[String], generation: u64) -> Result<(), String> {
    if frame.origin != origin {
        return Err(if known.contains(&frame.origin) {
            format!(
                "record from origin {:?} arrived on {origin}'s backup queue",
                frame.origin
            )
        } else {
            format!("record from unknown origin {:?}", frame.origin)
        });
    }
    if !known.contains(&frame.origin) {
        return Err(format!("record from unknown origin {:?}", frame.origin));
    }
    match frame.body {
        Body::Begin if frame.generation <= generation => Err(format!(
            "stale generation {} (holding generation {generation})",
            frame.generation
        )),
        Body::Begin => Ok(()),
        _ if frame.generation < generation => Err(format!(
            "stale generation {} (holding generation {generation})",
            frame.generation
        )),
        _ if frame.generation > generation => Err(format!(
            "generation {} whose resync start was not received (holding generation {generation}); \
             the origin re-sends its backlog when its monitor changes",
            frame.generation
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(origin: &str, generation: u64, body: Body) -> Frame {
        Frame {
            origin: origin.into(),
            generation,
            body,
        }
    }

    #[test]
    fn only_the_current_generation_of_a_known_origin_applies() {
        let known = vec!["a".to_string(), "b".to_string()];
        let end = || Body::End { batches: 0 };
        assert!(check(&frame("a", 5, end()), "a", &known, 5).is_ok());
        assert!(check(&frame("a", 4, end()), "a", &known, 5).is_err());
        assert!(check(&frame("a", 6, end()), "a", &known, 5).is_err());
        assert!(check(&frame("a", 6, Body::Begin), "a", &known, 5).is_ok());
        assert!(check(&frame("a", 5, Body::Begin), "a", &known, 5).is_err());
        assert!(check(&frame("b", 5, end()), "a", &known, 5).is_err());
        assert!(check(&frame("z", 5, end()), "z", &known, 5).is_err());
    }
}
