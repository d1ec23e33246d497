//! The topology log on the broker: a stream queue `ns.topology`, read from
//! its first record by every server, written with publisher confirms.
//!
//! A proposal is a record with a unique id; its proposer reads the log
//! until it finds that record and learns what every replica did with it
//! ([`Outcome`]). A `sync` record is a read barrier: once a reader has read
//! its own `sync`, it has read everything written before.
//!
//! Every record is JSON with a MAC trailer under the cluster key
//! ([`crate::crypto::KeyRing::sign`], context `Topology`). A reader checks
//! the trailer before it parses the record; a record without a valid MAC
//! is never applied, and is logged (once per claimed proposer and minute)
//! with the proposer it claims. A record signed with a key this server
//! does not hold at all is how a server started with the wrong cluster key
//! finds out: [`Topology::join`] refuses to join when such records come
//! after the last one it could verify.

use super::{Applied, Change, Outcome, Record, State, shape_differences};
use crate::broker::consume;
use crate::broker::declare::declare_topology;
use crate::broker::{Backoff, Broker, BrokerError, PublishError, Publisher};
use crate::config::Config;
use crate::crypto::{Context, KeyRing, MacError};
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// How long a proposer waits to read its own record back.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(15);
/// A snapshot is written after every this many epochs.
const SNAPSHOT_EVERY: u64 = 32;
/// Attempts of a compare-and-set that keeps losing to other changes.
const CAS_ATTEMPTS: usize = 20;
/// How long a server retries its join while the log refuses it (its
/// taker still adopting its backlog).
const JOIN_PATIENCE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot write to the topology log: {0}")]
    Publish(#[from] PublishError),
    #[error("the topology log did not return record {id} within {timeout:?}")]
    Timeout { id: String, timeout: Duration },
    #[error(
        "this cluster file differs from the cluster in the topology log (namespace {namespace}); \
         every server must use the same cluster file:\n  {}",
        differences.join("\n  ")
    )]
    Mismatch {
        namespace: String,
        differences: Vec<String>,
    },
    #[error("server {node:?} is not in the topology log's cluster ({known})")]
    NotInCluster { node: String, known: String },
    #[error("the topology reader has stopped")]
    Stopped,
    #[error(
        "this server's cluster key (fingerprint {ours}) is not the fleet's: the latest records \
         of {by} are signed with key {theirs}, which this server does not hold. Every server \
         needs the same security.key_file: copy the fleet's key file here (during a rotation, \
         list the fleet's key in previous_key_files), then start again"
    )]
    KeyMismatch {
        ours: String,
        theirs: String,
        by: String,
    },
    #[error(
        "server {peer} does not accept this server's signing key {ours} (it accepts {accepted}): \
         its records would be ignored there. Rotate in two steps: first add the new key to \
         previous_key_files on every server and restart them, then make it key_file"
    )]
    KeyNotAccepted {
        peer: String,
        ours: String,
        accepted: String,
    },
    #[error("the topology log refused the change: {0}")]
    Refused(super::Rejected),
    /// The cluster key could not be loaded (by the command-line tool).
    #[error("security.key_file: {0}")]
    KeyRing(crate::crypto::KeyError),
    #[error("gave up after {0} attempts: other changes kept winning")]
    Contended(usize),
}

/// Handle to this process's replica of the topology; cheap to clone.
#[derive(Clone)]
pub struct Topology {
    shared: Arc<Shared>,
}

struct Shared {
    proposer: String,
    queue: String,
    publisher: Publisher,
    state: watch::Sender<Arc<State>>,
    waiters: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    /// When the reader last had a working consumer (for fencing).
    last_read: Mutex<Instant>,
    /// The reader has a consumer on the log.
    reading: watch::Sender<bool>,
    /// Bumped when a monitor asks this server to re-send its backlog.
    resync_requests: watch::Sender<u64>,
    shutdown: CancellationToken,
    keys: Arc<KeyRing>,
    /// Per proposer, whether its latest record verified (`None`) or was
    /// signed with a key this server does not hold (`Some(key id)`).
    latest: Mutex<HashMap<String, Option<String>>>,
    /// The last [`HISTORY_MAX`] changes applied, oldest first.
    history: Mutex<std::collections::VecDeque<Applied>>,
}

/// Changes kept for `GET /topology?history=N`.
pub const HISTORY_MAX: usize = 256;

impl Topology {
    /// Start reading the log from its first record. `proposer` names this
    /// process in the records it writes.
    pub async fn connect(
        broker: Broker,
        proposer: &str,
        keys: Arc<KeyRing>,
        shutdown: CancellationToken,
    ) -> Result<Topology, TopologyError> {
        let ns = broker.config().namespace.clone();
        let queue = declare_patiently(&broker, &ns, &shutdown).await?;
        let (state, _) = watch::channel(Arc::new(State::default()));
        let (reading, mut reading_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            proposer: proposer.to_owned(),
            queue,
            publisher: Publisher::new(broker.clone()),
            state,
            waiters: Mutex::new(HashMap::new()),
            last_read: Mutex::new(Instant::now()),
            reading,
            resync_requests: watch::channel(0).0,
            shutdown,
            keys,
            latest: Mutex::new(HashMap::new()),
            history: Mutex::default(),
        });
        tokio::spawn(read_loop(shared.clone(), broker));
        // A stream that was just declared can take a moment before it
        // accepts consumers; the reader retries until then.
        let timeout = PROPOSAL_TIMEOUT;
        match tokio::time::timeout(timeout, reading_rx.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(Topology { shared }),
            Ok(Err(_)) => Err(TopologyError::Stopped),
            Err(_) => Err(TopologyError::Timeout {
                id: "(first read)".into(),
                timeout,
            }),
        }
    }

    /// Connect, catch up, write the initial state if the log is empty,
    /// refuse a cluster file that differs from the log's, and join.
    /// Returns the handle and the state just before the join (which says
    /// whether this server had been taken over).
    pub async fn join(
        broker: Broker,
        config: &Config,
        node: &str,
        keys: Arc<KeyRing>,
        shutdown: CancellationToken,
    ) -> Result<(Topology, Arc<State>), TopologyError> {
        let topology = Topology::connect(broker, node, keys, shutdown).await?;
        topology.sync().await?;
        topology.check_key(config, node)?;
        if !topology.state().initialised() {
            let init = Change::Init {
                state: State::initial(config),
            };
            match topology.propose(0, init).await? {
                Outcome::Applied => {
                    tracing::info!(
                        "Topology log was empty; wrote the initial state from the cluster file."
                    )
                }
                Outcome::Ignored(_) => {} // another server initialised it first
            }
        }
        let state = topology.state();
        let differences = shape_differences(&state.cluster, &super::cluster_shape(config));
        if !differences.is_empty() {
            return Err(TopologyError::Mismatch {
                namespace: config.broker.namespace.clone(),
                differences,
            });
        }
        if !state.servers.contains_key(node) {
            return Err(TopologyError::NotInCluster {
                node: node.to_owned(),
                known: state.ring.join(", "),
            });
        }
        let before = std::sync::Mutex::new(state.clone());
        topology
            .propose_joined(node, |s| {
                if let Ok(mut b) = before.lock() {
                    *b = Arc::new(s.clone());
                }
                true
            })
            .await?;
        let before = before
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok((topology, before))
    }

    /// Refuse to join a fleet that uses another key: the latest record of
    /// every other configured server that wrote any is signed with a key
    /// this server does not hold (records of one server, or of names that
    /// are no server, do not decide it: a broker user can write those).
    /// Refuse too when a joined peer does not accept this server's signing
    /// key.
    fn check_key(&self, config: &Config, node: &str) -> Result<(), TopologyError> {
        let latest = self
            .shared
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let others: Vec<(&String, &Option<String>)> = latest
            .iter()
            .filter(|(p, _)| *p != node && config.servers.contains_key(*p))
            .collect();
        let foreign: Vec<(&String, &String)> = others
            .iter()
            .filter_map(|(p, k)| k.as_ref().map(|k| (*p, k)))
            .collect();
        if !foreign.is_empty() && foreign.len() == others.len() {
            let (by, theirs) = foreign[0];
            return Err(TopologyError::KeyMismatch {
                ours: self.shared.keys.fingerprint(),
                theirs: theirs.clone(),
                by: by.clone(),
            });
        }
        let ours = self.shared.keys.fingerprint();
        for (peer, s) in &self.state().servers {
            let live = peer != node && s.version.is_some() && !s.stopping && !s.failed;
            if live && !s.accepted_keys.is_empty() && !s.accepted_keys.contains(&ours) {
                return Err(TopologyError::KeyNotAccepted {
                    peer: peer.clone(),
                    ours,
                    accepted: s.accepted_keys.join(", "),
                });
            }
        }
        Ok(())
    }

    /// The key ring records are signed with.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.shared.keys
    }

    /// The current state of this replica.
    pub fn state(&self) -> Arc<State> {
        self.shared.state.borrow().clone()
    }

    /// Follow the state as records are applied.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.shared.state.subscribe()
    }

    /// Bumped whenever a monitor asks this server for a resync.
    pub fn resync_requests(&self) -> watch::Receiver<u64> {
        self.shared.resync_requests.subscribe()
    }

    /// Ask `origin` to re-send its backlog to `monitor` (this server).
    pub async fn request_resync(&self, origin: &str, monitor: &str) -> Result<(), TopologyError> {
        let change = Change::ResyncRequest {
            origin: origin.to_owned(),
            monitor: monitor.to_owned(),
        };
        self.propose(0, change).await.map(|_| ())
    }

    /// The last `n` changes applied (at most [`HISTORY_MAX`]), oldest
    /// first.
    pub fn history(&self, n: usize) -> Vec<Applied> {
        let h = self
            .shared
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.iter().skip(h.len().saturating_sub(n)).cloned().collect()
    }

    /// The time of the latest takeover of each server that the history
    /// still holds (`None`: its record did not say).
    pub fn takeovers(&self) -> std::collections::BTreeMap<String, Option<u64>> {
        let h = self
            .shared
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.iter()
            .filter_map(|a| match &a.change {
                Change::Takeover { failed, .. } => Some((failed.clone(), a.at_ms)),
                _ => None,
            })
            .collect()
    }

    /// Time since the reader last had a working consumer on the log.
    pub fn read_age(&self) -> Duration {
        self.shared
            .last_read
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Return once every record written before this call has been read.
    pub async fn sync(&self) -> Result<(), TopologyError> {
        self.propose(0, Change::Sync).await.map(|_| ())
    }

    /// Write one change expecting `expected_epoch`, and return what the
    /// replicas did with it.
    pub async fn propose(
        &self,
        expected_epoch: u64,
        change: Change,
    ) -> Result<Outcome, TopologyError> {
        let id = format!("{}-{:016x}", self.shared.proposer, rand::random::<u64>());
        let record = Record {
            id: id.clone(),
            proposer: self.shared.proposer.clone(),
            expected_epoch,
            at_ms: Some(crate::time::now_ms()),
            change,
        };
        let body = encode(&self.shared.keys, &record);
        let (tx, rx) = oneshot::channel();
        self.waiters().insert(id.clone(), tx);
        let mut published = Err(TopologyError::Stopped);
        for attempt in 0..5u64 {
            published = self
                .shared
                .publisher
                .publish("", &self.shared.queue, &body, FieldTable::default())
                .await
                .map_err(TopologyError::from);
            if published.is_ok() {
                break;
            }
            // A new stream may refuse writes for a moment.
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        if let Err(e) = published {
            self.waiters().remove(&id);
            return Err(e);
        }
        let outcome = tokio::select! {
            r = tokio::time::timeout(PROPOSAL_TIMEOUT, rx) => match r {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => return Err(TopologyError::Stopped),
                Err(_) => {
                    self.waiters().remove(&id);
                    return Err(TopologyError::Timeout { id, timeout: PROPOSAL_TIMEOUT });
                }
            },
            _ = self.shared.shutdown.cancelled() => return Err(TopologyError::Stopped),
        };
        if outcome == Outcome::Applied
            && !matches!(record.change, Change::Sync | Change::Snapshot { .. })
        {
            let state = self.state();
            if state.epoch % SNAPSHOT_EVERY == 0 {
                self.write_snapshot(&state).await;
            }
        }
        Ok(outcome)
    }

    /// Record that `node` (this server) has joined, with its version and
    /// keys, if `needed` says so of the current state. A refusal (the
    /// taker of this server is still adopting its backlog) is retried
    /// every 200 ms for up to 5 minutes, then returned.
    pub async fn propose_joined(
        &self,
        node: &str,
        needed: impl Fn(&State) -> bool,
    ) -> Result<(), TopologyError> {
        let keys = self.keys();
        let deadline = Instant::now() + JOIN_PATIENCE;
        loop {
            let outcome = self
                .propose_with(|s| {
                    needed(s).then(|| Change::Joined {
                        node: node.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        key_fingerprint: Some(keys.fingerprint()),
                        accepted_keys: keys.fingerprints(),
                    })
                })
                .await?;
            match outcome {
                Some(Outcome::Ignored(reason)) if Instant::now() < deadline => {
                    tracing::info!(%reason, "Cannot join yet; retrying.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(Outcome::Ignored(reason)) => return Err(TopologyError::Refused(reason)),
                _ => return Ok(()),
            }
        }
    }

    /// Compare-and-set with retries: `make` builds the change from the
    /// current state (or `None`: nothing to do); it is proposed at the
    /// state's epoch and rebuilt if another change won that epoch.
    /// Returns the outcome of the last proposal (`None` if nothing to do).
    pub async fn propose_with(
        &self,
        make: impl Fn(&State) -> Option<Change>,
    ) -> Result<Option<Outcome>, TopologyError> {
        for _ in 0..CAS_ATTEMPTS {
            let state = self.state();
            let Some(change) = make(&state) else {
                return Ok(None);
            };
            let outcome = self.propose(state.epoch, change).await?;
            if outcome == Outcome::Applied || self.state().epoch == state.epoch {
                // Applied, or refused for a reason other than a lost race.
                return Ok(Some(outcome));
            }
        }
        Err(TopologyError::Contended(CAS_ATTEMPTS))
    }

    async fn write_snapshot(&self, state: &State) {
        let record = Record {
            id: format!("{}-{:016x}", self.shared.proposer, rand::random::<u64>()),
            proposer: self.shared.proposer.clone(),
            expected_epoch: state.epoch,
            at_ms: Some(crate::time::now_ms()),
            change: Change::Snapshot {
                state: state.clone(),
            },
        };
        let body = encode(&self.shared.keys, &record);
        if let Err(e) = self
            .shared
            .publisher
            .publish("", &self.shared.queue, &body, FieldTable::default())
            .await
        {
            tracing::warn!(error = %e, epoch = state.epoch, "Cannot write a topology snapshot.");
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Outcome>>> {
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn read_loop(shared: Arc<Shared>, broker: Broker) {
    let cfg = broker.config();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let mut next_offset: Option<i64> = None;
    let mut state = State::default();
    loop {
        let result = read_session(&shared, &broker, &mut next_offset, &mut state).await;
        shared.reading.send_replace(false);
        if shared.shutdown.is_cancelled() {
            return;
        }
        let delay = backoff.next_delay();
        if let Err(e) = result {
            tracing::warn!(error = %e, retry_in = ?delay, "Topology log reader stopped; reconnecting.");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// How long a start waits for the broker to accept the topology log's
/// declaration: right after a broker restart, RabbitMQ answers NOT_FOUND
/// ("home node ... is down") until the stream's leader is back.
const DECLARE_PATIENCE: Duration = Duration::from_secs(60);

/// Declare the topology log, retrying with back-off for up to
/// [`DECLARE_PATIENCE`] (or until `shutdown`).
async fn declare_patiently(
    broker: &Broker,
    ns: &str,
    shutdown: &CancellationToken,
) -> Result<String, BrokerError> {
    let cfg = broker.config();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let started = Instant::now();
    loop {
        let attempt = async {
            let channel = broker.channel().await?;
            let queue = declare_topology(&channel, ns).await?;
            let _ = channel.close(200, "declared".into()).await;
            Ok::<_, BrokerError>(queue)
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(cfg.publish_timeout, attempt) => r.unwrap_or(Err(BrokerError::Timeout {
                op: "queue.declare",
                timeout: cfg.publish_timeout,
            })),
            _ = shutdown.cancelled() => Err(BrokerError::Closed("shutting down".into())),
        };
        match attempt {
            Ok(queue) => return Ok(queue),
            Err(e)
                if transient(&e)
                    && started.elapsed() < DECLARE_PATIENCE
                    && !shutdown.is_cancelled() =>
            {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "Cannot declare the topology log yet; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `e` may clear by itself (the broker starting, its stream's
/// leader coming back); a refused login or other queue arguments do not.
fn transient(e: &BrokerError) -> bool {
    match e {
        BrokerError::QueueMismatch { .. } => false,
        BrokerError::Op { source, .. } => {
            let text = source.to_string();
            !(text.contains("ACCESS_REFUSED") || text.contains("PRECONDITION_FAILED"))
        }
        BrokerError::Connect { last, .. } => !last.contains("ACCESS_REFUSED"),
        BrokerError::Timeout { .. } | BrokerError::Closed(_) => true,
    }
}

/// One connection's reading of the log: from `next_offset` (the first
/// record if `None`) on, applying each record to `state`, until the
/// consumer or channel fails or the reader shuts down.
async fn read_session(
    shared: &Shared,
    broker: &Broker,
    next_offset: &mut Option<i64>,
    state: &mut State,
) -> Result<(), BrokerError> {
    let (channel, mut consumer) = open_session(shared, broker, *next_offset).await?;
    // A read barrier for this session: until the reader reads its own
    // `sync`, records written before (a takeover of this server, say) may
    // still be on their way, so the reader does not count as up to date.
    let mut session = Session {
        barrier: write_barrier(shared).await?,
        caught_up: false,
        last_tick: Instant::now(),
        refused: RefusedLog::default(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let delivery = tokio::select! {
            _ = shared.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                session.tick(shared, &channel).await?;
                continue;
            }
            next = consumer.next() => match next {
                None => return Err(BrokerError::Closed("the broker closed the topology consumer".into())),
                Some(Err(e)) => return Err(BrokerError::Op { op: "consume", source: e }),
                Some(Ok(d)) => d,
            },
        };
        let offset = stream_offset(&delivery.properties);
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(BrokerError::op("basic.ack"))?;
        if let Some(record) = session.record(shared, next_offset, offset, &delivery.data) {
            session.apply(shared, state, record);
        }
    }
}

/// A channel and a consumer of the log from `next_offset`.
async fn open_session(
    shared: &Shared,
    broker: &Broker,
    next_offset: Option<i64>,
) -> Result<(lapin::Channel, lapin::Consumer), BrokerError> {
    let channel = broker.channel().await?;
    declare_topology(&channel, &broker.config().namespace).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        match next_offset {
            Some(n) => AMQPValue::LongLongInt(n),
            None => AMQPValue::LongString("first".into()),
        },
    );
    let tag = consume::tag("topology");
    let consumer = consume::consume(&channel, &shared.queue, &tag, 256, args).await?;
    Ok((channel, consumer))
}

/// What a session knows beyond the state: whether it has read up to its
/// barrier, and when it last ticked.
struct Session {
    /// The id of the `sync` record that makes the reader up to date.
    barrier: String,
    caught_up: bool,
    last_tick: Instant,
    refused: RefusedLog,
}

impl Session {
    /// Every 100 ms: note that the log was read (for fencing) while the
    /// reader is up to date and its channel open.
    async fn tick(&mut self, shared: &Shared, channel: &lapin::Channel) -> Result<(), BrokerError> {
        // A late tick means this process was frozen or starved: records (a
        // takeover of this server) may have been written meanwhile. Up to
        // date again only after a new barrier.
        if self.last_tick.elapsed() > LATE_TICK && self.caught_up {
            tracing::warn!(late = ?self.last_tick.elapsed(), "Topology reader was held up; reading up to a new barrier before delivering again.");
            self.caught_up = false;
            self.barrier = write_barrier(shared).await?;
        }
        self.last_tick = Instant::now();
        if !self.caught_up {
            return Ok(());
        }
        if channel.status().connected() {
            if let Ok(mut t) = shared.last_read.lock() {
                *t = Instant::now();
            }
            return Ok(());
        }
        Err(BrokerError::Closed("the topology channel closed".into()))
    }

    /// The record of a delivery at `offset`, if it is new and verifies.
    fn record(
        &mut self,
        shared: &Shared,
        next_offset: &mut Option<i64>,
        offset: Option<i64>,
        data: &[u8],
    ) -> Option<Record> {
        // A stream consumer may start at the beginning of the chunk that
        // holds the requested offset: skip what was already read.
        if let (Some(o), Some(next)) = (offset, *next_offset)
            && o < next
        {
            return None;
        }
        if let Some(o) = offset {
            *next_offset = Some(o + 1);
        }
        let record = match decode(&shared.keys, data) {
            Ok(r) => r,
            Err(Unverified::Mac { error, claimed }) => {
                if let MacError::UnknownKey(kid) = &error {
                    note_latest(shared, &claimed, Some(kid.clone()));
                }
                self.refused.warn(&claimed, offset, &error);
                return None;
            }
            Err(Unverified::Json(e)) => {
                tracing::warn!(offset = ?offset, error = %e, "Unreadable topology record ignored.");
                return None;
            }
        };
        note_latest(shared, &record.proposer, None);
        Some(record)
    }

    /// Apply `record` to `state`, publish the new state, and tell its
    /// proposer (if it waits here) what became of it; the session's own
    /// barrier makes it up to date instead.
    fn apply(&mut self, shared: &Shared, state: &mut State, record: Record) {
        if record.id == self.barrier {
            self.caught_up = true;
            if let Ok(mut t) = shared.last_read.lock() {
                *t = Instant::now();
            }
            shared.reading.send_replace(true);
            return;
        }
        let before = state.epoch;
        let outcome = state.apply(&record);
        match (&outcome, &record.change) {
            (Outcome::Applied, Change::Sync) => {}
            (Outcome::Applied, Change::ResyncRequest { origin, monitor }) => {
                if *origin == shared.proposer {
                    tracing::info!(%monitor, "The monitor asks for the backlog again.");
                    shared.resync_requests.send_modify(|n| *n += 1);
                }
            }
            (Outcome::Applied, _) if state.epoch != before || before == 0 => {
                tracing::debug!(epoch = state.epoch, proposer = %record.proposer, change = ?record.change, "Topology change applied.");
                shared.state.send_replace(Arc::new(state.clone()));
                if let Ok(mut h) = shared.history.lock() {
                    if h.len() == HISTORY_MAX {
                        h.pop_front();
                    }
                    h.push_back(Applied {
                        epoch: state.epoch,
                        at_ms: record.at_ms,
                        proposer: record.proposer.clone(),
                        change: record.change.clone(),
                    });
                }
            }
            (Outcome::Applied, _) => {}
            (Outcome::Ignored(reason), Change::Snapshot { .. }) => {
                tracing::error!(%reason, "Topology replica disagrees with a snapshot in the log.");
            }
            (Outcome::Ignored(reason), change) => {
                tracing::debug!(%reason, proposer = %record.proposer, ?change, "Topology change ignored.");
            }
        }
        let waiter = shared
            .waiters
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&record.id));
        if let Some(tx) = waiter {
            let _ = tx.send(outcome);
        }
    }
}

/// Whether this server may deliver: it has read the topology log within
/// `after`. [`Fence::is_open`] is checked live (not cached), so that a
/// process resuming from a freeze sees the time it lost before anything
/// else; [`Fence::closed`] follows [`Fence::update`], which a task calls
/// every 50 ms.
#[derive(Clone)]
pub struct Fence {
    topology: Topology,
    node: String,
    after: Duration,
    open: Arc<watch::Sender<bool>>,
}

impl Fence {
    pub fn new(topology: Topology, node: &str, after: Duration) -> Fence {
        Fence {
            topology,
            node: node.to_owned(),
            after,
            open: Arc::new(watch::channel(true).0),
        }
    }

    pub fn is_open(&self) -> bool {
        self.topology.read_age() < self.after
    }

    /// Whether this server may act for `adaptor` now: the log was read
    /// within `fence_after`, and what it says gives the adaptor to this
    /// server, which was not taken over. A frozen server that resumes finds
    /// the fence closed until its reader has caught up with the log, so a
    /// takeover written meanwhile is seen here before anything is stored,
    /// acked or delivered.
    pub fn hosts(&self, adaptor: &str) -> bool {
        if !self.is_open() {
            return false;
        }
        let state = self.topology.state();
        state.adaptors.get(adaptor) == Some(&self.node)
            && !state.servers.get(&self.node).is_some_and(|s| s.failed)
    }

    /// Whether the log, read within `fence_after`, says this server was not
    /// taken over (it may have moved adaptors away).
    pub fn not_taken_over(&self) -> bool {
        self.is_open()
            && !self
                .topology
                .state()
                .servers
                .get(&self.node)
                .is_some_and(|s| s.failed)
    }

    /// Whether the handover of `adaptor`'s backlog from this server is
    /// still pending in a log read within `fence_after`.
    pub fn hands_over(&self, adaptor: &str) -> bool {
        self.not_taken_over() && self.topology.state().handovers.get(adaptor) == Some(&self.node)
    }

    /// Wait (at most `limit`) for the fence to open, then answer [`hosts`](Self::hosts).
    pub async fn wait_hosts(&self, adaptor: &str, limit: Duration) -> bool {
        let _ = tokio::time::timeout(limit, self.wait_open()).await;
        self.hosts(adaptor)
    }

    /// Re-evaluate the fence; returns whether it is open.
    pub fn update(&self) -> bool {
        let open = self.is_open();
        self.open.send_if_modified(|o| {
            let changed = *o != open;
            *o = open;
            changed
        });
        open
    }

    /// Return once the fence is open.
    pub async fn wait_open(&self) {
        while !self.is_open() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Return once the fence closes.
    pub async fn closed(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| !*open).await;
    }
}

/// Proposers whose latest record is remembered, at most (junk under made-up
/// names must not grow the map without bound; servers write early).
const LATEST_MAX: usize = 4096;

fn note_latest(shared: &Shared, proposer: &str, key: Option<String>) {
    let mut latest = shared
        .latest
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(k) = latest.get_mut(proposer) {
        *k = key;
    } else if latest.len() < LATEST_MAX {
        latest.insert(proposer.to_owned(), key);
    }
}

/// Sign a record for the log.
fn encode(keys: &KeyRing, record: &Record) -> Vec<u8> {
    keys.sign(
        Context::Topology,
        serde_json::to_vec(record).unwrap_or_default(),
    )
}

/// Why a record from the log is not applied.
#[derive(Debug)]
pub enum Unverified {
    /// No valid MAC; `claimed` is the proposer the record names (unverified).
    Mac { error: MacError, claimed: String },
    /// Verified but not a record of this version.
    Json(serde_json::Error),
}

/// Check a record's MAC, then parse it.
pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<Record, Unverified> {
    match keys.verify(Context::Topology, bytes) {
        Ok(payload) => serde_json::from_slice(payload).map_err(Unverified::Json),
        Err(error) => Err(Unverified::Mac {
            claimed: claimed_proposer(bytes),
            error,
        }),
    }
}

/// The proposer an unverified record names, for the warning only.
fn claimed_proposer(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Claim {
        proposer: String,
    }
    let payload = bytes
        .len()
        .checked_sub(crate::crypto::MAC_OVERHEAD)
        .and_then(|n| bytes.get(..n))
        .unwrap_or(bytes);
    serde_json::from_slice::<Claim>(payload)
        .or_else(|_| serde_json::from_slice::<Claim>(bytes))
        .map(|c| {
            c.proposer
                .chars()
                .filter(|ch| !ch.is_control())
                .take(64)
                .collect()
        })
        .unwrap_or_else(|_| "(unknown)".into())
}

/// Warnings about records without a valid MAC: once per claimed proposer
/// and minute, with the number refused meanwhile.
#[derive(Default)]
struct RefusedLog {
    last: HashMap<String, (Option<Instant>, u64)>,
}

impl RefusedLog {
    fn warn(&mut self, claimed: &str, offset: Option<i64>, error: &MacError) {
        if self.last.len() > 1000 {
            self.last.clear();
        }
        let entry = self.last.entry(claimed.to_owned()).or_insert((None, 0));
        entry.1 += 1;
        if entry
            .0
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(claimed_proposer = %claimed, offset = ?offset, refused = entry.1, %error, "Topology record without a valid MAC ignored; it is not applied.");
            *entry = (Some(Instant::now()), 0);
        }
    }
}

/// A tick of the reader's 100 ms clock this late means the process was held up.
const LATE_TICK: Duration = Duration::from_millis(300);

/// Write a `sync` record only this reader waits for; returns its id.
async fn write_barrier(shared: &Shared) -> Result<String, BrokerError> {
    let barrier = format!("{}-barrier-{:016x}", shared.proposer, rand::random::<u64>());
    let sync = Record {
        id: barrier.clone(),
        proposer: shared.proposer.clone(),
        expected_epoch: 0,
        at_ms: None,
        change: Change::Sync,
    };
    shared
        .publisher
        .publish(
            "",
            &shared.queue,
            &encode(&shared.keys, &sync),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::Closed(format!("cannot write a read barrier: {e}")))?;
    Ok(barrier)
}

fn stream_offset(props: &lapin::BasicProperties) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}
