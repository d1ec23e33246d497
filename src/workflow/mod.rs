//! Workflow execution: one [`Executor`] per adaptor delivers its repository
//! items to the adaptor's target.
//!
//! - At most `concurrency` target calls in flight; the event identity is the
//!   idempotency key of every call.
//! - Transient errors retry with exponential back-off and jitter
//!   ([`retry_delay`]); the attempt count and the next attempt time are saved
//!   in the repository first, so a restart continues the schedule.
//! - A permanent error, exhausted attempts or a passed deadline park the item
//!   (published with confirm to the parking queue with `x-provring-reason`
//!   and the original body); only then is it removed. If parking fails, the
//!   reason is saved and parking is retried later: never a silent drop.
//! - Items arrive from the adaptor after they are durable. The executor keeps
//!   at most [`MEMORY_CAP`] of them in memory; beyond that the repository is
//!   the queue and the executor reloads from it in arrival order.

pub mod targets;

use crate::config::RetryConfig;
use crate::parking::Parking;
use crate::repository::{ClaimRefused, Repository, StoredItem, now_ms};
use crate::stats::Stats;
use crate::topology::Fence;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use targets::{Delivery, Target, TargetError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

/// Most items an executor holds in memory (ready + waiting for retry).
pub const MEMORY_CAP: usize = 20_000;

/// Pause before `attempts + 1`-th call after `attempts` failed calls:
/// `initial × multiplier^(attempts-1)`, capped at `max_backoff`, of which the
/// fraction `jitter` is drawn at random.
pub fn retry_delay(cfg: &RetryConfig, attempts: u32, random: f64) -> Duration {
    let exp = cfg
        .multiplier
        .powi(attempts.saturating_sub(1).min(64) as i32);
    let base = cfg
        .initial_backoff
        .as_secs_f64()
        .mul_add(exp, 0.0)
        .min(cfg.max_backoff.as_secs_f64());
    let factor = 1.0 - cfg.jitter * random.clamp(0.0, 1.0);
    Duration::from_secs_f64(base * factor)
}

enum Outcome {
    /// Delivered or parked; carries the item's subject.
    Finished(String),
    /// Try again after the delay (the item's schedule is already saved).
    Again(Box<StoredItem>, Duration),
}

/// What the in-flight futures share.
struct Worker {
    adaptor: String,
    repo: Repository,
    target: Arc<dyn Target>,
    parking: Parking,
    retry: RetryConfig,
    stats: Arc<Stats>,
    /// Closed while this server may not deliver.
    fence: Fence,
    /// This server, named to the target.
    node: String,
}

/// Delivers one adaptor's items; see the module doc.
pub struct Executor {
    worker: Arc<Worker>,
    concurrency: usize,
    items_rx: mpsc::UnboundedReceiver<StoredItem>,
}

/// The sending side the adaptor hands durable items to.
pub type ItemSender = mpsc::UnboundedSender<StoredItem>;

impl Executor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        adaptor: &str,
        concurrency: usize,
        repo: Repository,
        target: Arc<dyn Target>,
        parking: Parking,
        retry: RetryConfig,
        stats: Arc<Stats>,
        fence: Fence,
        node: &str,
    ) -> (Executor, ItemSender) {
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Arc::new(Worker {
            adaptor: adaptor.to_owned(),
            repo,
            target,
            parking,
            retry,
            stats,
            fence,
            node: node.to_owned(),
        });
        (
            Executor {
                worker,
                concurrency,
                items_rx: rx,
            },
            tx,
        )
    }

    /// Run until `shutdown`; then finish the target calls in flight.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ready: VecDeque<StoredItem> = VecDeque::new();
        let mut subjects = Subjects::default();
        let mut waiting: DelayQueue<StoredItem> = DelayQueue::new();
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
        // Batches below `reloaded_to` were loaded from the repository; the
        // adaptor's items of batch `accepted` are in memory.
        let mut reloaded_to = 0u64;
        let mut accepted: Option<u64> = None;
        // Set after a failed reload: when to try again.
        let mut retry_reload: Option<tokio::time::Instant> = None;
        let mut overflow = true;
        let mut first = true;
        loop {
            let in_memory = ready.len() + waiting.len() + subjects.queued;
            if overflow && in_memory < MEMORY_CAP / 2 && retry_reload.is_none() {
                if let Some(seq) = accepted {
                    reloaded_to = reloaded_to.max(seq + 1);
                }
                match self.reload(&mut ready, &mut reloaded_to) {
                    Ok(more) => overflow = more,
                    Err(()) => {
                        retry_reload = Some(tokio::time::Instant::now() + RELOAD_RETRY);
                    }
                }
                if first && !ready.is_empty() {
                    tracing::info!(adaptor = %self.worker.adaptor, items = ready.len(), more = overflow, "Resuming backlog.");
                }
                first = false;
            }
            while in_flight.len() < self.concurrency {
                let Some(item) = ready.pop_front() else { break };
                let Some(item) = subjects.admit(item) else {
                    continue;
                };
                // An owner whose retry time has not come waits for it.
                let due_in = item.state.next_attempt_ms.saturating_sub(now_ms());
                if due_in > 0 {
                    waiting.insert(item, clamp(Duration::from_millis(due_in)));
                } else {
                    in_flight.push(Box::pin(attempt(self.worker.clone(), item)));
                }
            }
            let in_memory = ready.len() + waiting.len() + subjects.queued;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(outcome) = in_flight.next(), if !in_flight.is_empty() => match outcome {
                    Outcome::Again(item, delay) => {
                        waiting.insert(*item, clamp(delay));
                    }
                    Outcome::Finished(subject) => {
                        if let Some(next) = subjects.release(&subject) {
                            ready.push_front(next);
                        }
                    }
                },
                Some(expired) = waiting.next(), if !waiting.is_empty() => {
                    let mut item = expired.into_inner();
                    // Due now, whatever the saved time said.
                    item.state.next_attempt_ms = 0;
                    ready.push_front(item);
                }
                _ = sleep_until_some(retry_reload), if retry_reload.is_some() => {
                    retry_reload = None;
                }
                item = self.items_rx.recv() => {
                    let Some(item) = item else { break };
                    if item.seq < reloaded_to {
                        continue; // loaded from the repository already
                    }
                    // A batch is taken whole or not at all, so that a
                    // reload never brings back part of a batch in memory.
                    let same_batch = accepted == Some(item.seq);
                    if !same_batch && (overflow || in_memory >= MEMORY_CAP) {
                        overflow = true; // it is in the repository; reload later
                        continue;
                    }
                    accepted = Some(item.seq);
                    ready.push_back(item);
                }
            }
        }
        let n = in_flight.len();
        if n > 0 {
            tracing::info!(adaptor = %self.worker.adaptor, in_flight = n, "Finishing deliveries in flight.");
        }
        while in_flight.next().await.is_some() {}
    }

    /// Load whole batches from the repository from `reloaded_to` on, in
    /// arrival order; `Ok(true)` if more remain.
    fn reload(&self, ready: &mut VecDeque<StoredItem>, reloaded_to: &mut u64) -> Result<bool, ()> {
        let room = MEMORY_CAP.saturating_sub(ready.len());
        let items = match self
            .worker
            .repo
            .pending(&self.worker.adaptor, *reloaded_to, room)
        {
            Ok(items) => items,
            Err(e) => {
                tracing::error!(adaptor = %self.worker.adaptor, error = %e, retry_in = ?RELOAD_RETRY, "Cannot read the backlog from the repository.");
                return Err(());
            }
        };
        let full = items.len() >= room;
        for item in items {
            *reloaded_to = item.seq + 1;
            ready.push_back(item);
        }
        Ok(full)
    }
}

/// Pause before reading the backlog again after a failed read.
const RELOAD_RETRY: Duration = Duration::from_secs(1);

/// Longest delay handed to the timer wheel (which panics beyond ~2 years);
/// an item due later is looked at again then.
const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

fn clamp(delay: Duration) -> Duration {
    delay.min(MAX_DELAY)
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Per-subject ordering: one item per subject is its owner (in flight or
/// waiting for a retry); later items of the subject wait behind it in
/// arrival order until it has finished (delivered or parked). Without this,
/// concurrency lets an update overtake its create.
#[derive(Default)]
struct Subjects {
    owners: HashMap<String, (u64, u32)>,
    behind: HashMap<String, VecDeque<StoredItem>>,
    /// Items waiting behind an owner.
    queued: usize,
}

impl Subjects {
    /// The item if it may start now; otherwise it is kept behind its
    /// subject's owner.
    fn admit(&mut self, item: StoredItem) -> Option<StoredItem> {
        let key = (item.seq, item.idx);
        match self.owners.get(&item.subject) {
            None => {
                self.owners.insert(item.subject.clone(), key);
                Some(item)
            }
            Some(owner) if *owner == key => Some(item),
            Some(_) => {
                self.behind
                    .entry(item.subject.clone())
                    .or_default()
                    .push_back(item);
                self.queued += 1;
                None
            }
        }
    }

    /// The owner of `subject` has finished: the next item of the subject,
    /// which becomes its owner.
    fn release(&mut self, subject: &str) -> Option<StoredItem> {
        let next = self.behind.get_mut(subject).and_then(VecDeque::pop_front);
        match next {
            Some(item) => {
                self.queued -= 1;
                if self.behind.get(subject).is_some_and(VecDeque::is_empty) {
                    self.behind.remove(subject);
                }
                self.owners
                    .insert(item.subject.clone(), (item.seq, item.idx));
                Some(item)
            }
            None => {
                self.owners.remove(subject);
                None
            }
        }
    }
}

async fn attempt(w: Arc<Worker>, mut item: StoredItem) -> Outcome {
    // A fenced server (one that cannot read the topology log) waits: it may
    // have been taken over without knowing it yet. Once it can read the log,
    // an item of an adaptor no longer its own is not delivered from here
    // (hosting stops this executor at once as well).
    w.fence.wait_open().await;
    if !w.fence.hosts(&w.adaptor) {
        return Outcome::Again(Box::new(item), Duration::from_millis(500));
    }
    // The only one to act on the item until this returns (a timeout check
    // may be parking it, or has).
    let _claim = match w.repo.claim(&item) {
        Ok(claim) => claim,
        Err(ClaimRefused::Finished) => return Outcome::Finished(item.subject.clone()),
        Err(ClaimRefused::Busy) => {
            return Outcome::Again(Box::new(item), Duration::from_millis(200));
        }
    };
    if let Some(reason) = item.state.park_reason.clone() {
        return park(&w, item, reason).await;
    }

    let deadline_ms = item
        .received_ms
        .saturating_add(w.retry.deadline.as_millis() as u64);
    if now_ms() > deadline_ms {
        let reason = format!(
            "deadline of {} passed after {} attempts; last error: {}",
            humantime::format_duration(w.retry.deadline),
            item.state.attempts,
            item.state.last_error.as_deref().unwrap_or("none")
        );
        return park(&w, item, reason).await;
    }
    let Some(event_type) = item.event_type() else {
        let reason = format!("unknown event type {:?}", item.event_type);
        return park(&w, item, reason).await;
    };
    let identity = item.identity();
    let delivery = w.target.deliver(Delivery {
        identity: &identity,
        event_type,
        body: &item.body,
        node: &w.node,
    });
    // Fenced during the call: give it up (the request may or may not have
    // reached the target; the item is tried again, same key, once the
    // fence opens, unless this server was taken over meanwhile).
    let result = tokio::select! {
        r = delivery => r,
        _ = w.fence.closed() => {
            drop(identity);
            return Outcome::Again(Box::new(item), Duration::from_millis(100));
        }
    };
    // A request the fence stopped at the socket is no attempt: nothing is
    // counted, saved or parked from here.
    if let Err(TargetError::Fenced(_)) = result {
        return Outcome::Again(Box::new(item), Duration::from_millis(100));
    }
    item.state.attempts += 1;
    match result {
        Ok(()) => {
            w.stats.delivered.fetch_add(1, Relaxed);
            w.stats.metrics.observe(
                "provring_delivery_seconds",
                &[("adaptor", &w.adaptor)],
                now_ms().saturating_sub(item.received_ms) as f64 / 1000.0,
            );
            finish(&w, &item);
            Outcome::Finished(item.subject.clone())
        }
        Err(TargetError::Permanent(reason)) => {
            park(&w, item, format!("target refused the event: {reason}")).await
        }
        Err(TargetError::Transient(reason) | TargetError::Fenced(reason)) => {
            w.stats.retries.fetch_add(1, Relaxed);
            if item.state.attempts >= w.retry.attempts {
                let reason = format!(
                    "gave up after {} attempts; last error: {reason}",
                    item.state.attempts
                );
                return park(&w, item, reason).await;
            }
            let delay = retry_delay(&w.retry, item.state.attempts, rand::random());
            let next = now_ms() + delay.as_millis() as u64;
            if next > deadline_ms {
                let reason = format!(
                    "deadline of {} would pass before attempt {}; last error: {reason}",
                    humantime::format_duration(w.retry.deadline),
                    item.state.attempts + 1
                );
                return park(&w, item, reason).await;
            }
            tracing::debug!(adaptor = %w.adaptor, event = %identity, attempts = item.state.attempts, retry_in = ?delay, error = %reason, "Transient target error.");
            item.state.next_attempt_ms = next;
            item.state.last_error = Some(reason);
            save(&w, &item);
            Outcome::Again(Box::new(item), delay)
        }
    }
}

/// Publish the item to the parking queue with its reason, then remove it.
async fn park(w: &Worker, mut item: StoredItem, reason: String) -> Outcome {
    match w.parking.park_item(&item, &reason).await {
        Ok(()) => {
            tracing::warn!(adaptor = %w.adaptor, event = %item.identity(), %reason, "Event parked.");
            w.stats.parked.fetch_add(1, Relaxed);
            w.stats.metrics.increment(
                "provring_parked_by_reason_total",
                &[
                    ("adaptor", &w.adaptor),
                    ("reason", crate::metrics::park_class(&reason)),
                ],
            );
            finish(w, &item);
            Outcome::Finished(item.subject.clone())
        }
        Err(e) => {
            let delay = Duration::from_secs(2);
            tracing::warn!(adaptor = %w.adaptor, event = %item.identity(), error = %e, retry_in = ?delay, "Cannot park the event yet; it stays in the repository.");
            item.state.next_attempt_ms = now_ms() + delay.as_millis() as u64;
            item.state.park_reason = Some(reason);
            save(w, &item);
            Outcome::Again(Box::new(item), delay)
        }
    }
}

fn finish(w: &Worker, item: &StoredItem) {
    if let Err(e) = w.repo.complete(item) {
        // The item stays and is delivered again after a restart (at least once).
        tracing::error!(adaptor = %w.adaptor, event = %item.identity(), error = %e, "Cannot remove a finished item from the repository.");
    }
}

fn save(w: &Worker, item: &StoredItem) {
    if let Err(e) = w.repo.update(item) {
        tracing::error!(adaptor = %w.adaptor, event = %item.identity(), error = %e, "Cannot save the retry schedule.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::ItemState;

    fn item(seq: u64, subject: &str) -> StoredItem {
        StoredItem {
            seq,
            idx: 0,
            adaptor: Arc::from("a"),
            source: "/s".into(),
            id: seq.to_string(),
            event_type: "t".into(),
            subject: subject.into(),
            body: String::new(),
            received_ms: 0,
            state: ItemState::default(),
        }
    }

    #[test]
    fn one_item_per_subject_at_a_time_in_arrival_order() {
        let mut s = Subjects::default();
        assert!(s.admit(item(1, "ann")).is_some());
        assert!(s.admit(item(2, "bob")).is_some());
        assert!(s.admit(item(3, "ann")).is_none());
        assert!(s.admit(item(4, "ann")).is_none());
        assert_eq!(s.queued, 2);
        // The owner comes back from a retry: it may start again.
        assert!(s.admit(item(1, "ann")).is_some());
        assert_eq!(s.release("ann").map(|i| i.seq), Some(3));
        assert!(
            s.admit(item(3, "ann")).is_some(),
            "the released item owns the subject"
        );
        assert_eq!(s.release("ann").map(|i| i.seq), Some(4));
        assert!(s.release("ann").is_none());
        assert_eq!(s.queued, 0);
        assert!(s.admit(item(5, "ann")).is_some());
    }

    #[test]
    fn delays_grow_cap_and_jitter_down() {
        let cfg = RetryConfig {
            attempts: 10,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
            deadline: Duration::from_secs(3600),
        };
        assert_eq!(retry_delay(&cfg, 1, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(&cfg, 2, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(&cfg, 3, 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(&cfg, 30, 0.0), Duration::from_secs(10));
        assert_eq!(retry_delay(&cfg, 1, 1.0), Duration::from_millis(250));
        assert_eq!(
            retry_delay(&cfg, u32::MAX, 0.5),
            Duration::from_secs_f64(7.5)
        );
    }
}
