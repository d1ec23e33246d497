//! Hosting: runs what the topology gives this server and follows every
//! change. [`plan`] decides (a pure function of the topology before and
//! after a change and of what runs here); [`run`] carries its actions out.
//!
//! - An adaptor the topology gives this server is started (its executor
//!   first loads the adaptor's backlog from the repository, and it takes in
//!   any backlog handed over to it before consuming).
//! - An adaptor the topology gives another server is stopped at once: its
//!   consumer, and its executor with the target calls in flight (fencing:
//!   a surrendered item is never delivered from here). A moved adaptor's
//!   backlog is then handed over to its new host.
//! - When this server is named the taker of a failed server, it adopts the
//!   failed server's backlog before starting its adaptors
//!   ([`crate::supervisor::takeover`]).
//! - When this server finds itself taken over, it stops everything and
//!   joins again.
//! - The fence: while the topology log cannot be read for `fence_after`,
//!   no target call starts.

mod plan;

pub use plan::{Action, Here, SCHEDULER, plan};

use crate::adaptor::Adaptor;
use crate::broker::Backoff;
use crate::node::Node;
use crate::supervisor::takeover::{self, TakeoverError};
use crate::topology::State;
use crate::workflow::{Executor, targets};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Hosted {
    stop: CancellationToken,
    executor: JoinHandle<()>,
    adaptor: JoinHandle<()>,
}

/// How long a surrendered adaptor gets to close its channel (its unacked
/// deliveries go back to the queue) before its task is aborted.
const SURRENDER_GRACE: Duration = Duration::from_secs(3);

impl Hosted {
    /// Stop at once: the executor with its target calls in flight, and the
    /// consumer, which closes its channel without acking anything more.
    /// The returned task ends once the consumer has stopped.
    fn surrender(self) -> JoinHandle<()> {
        self.stop.cancel();
        self.executor.abort();
        let mut adaptor = self.adaptor;
        tokio::spawn(async move {
            if tokio::time::timeout(SURRENDER_GRACE, &mut adaptor)
                .await
                .is_err()
            {
                adaptor.abort();
            }
        })
    }
}

/// Follow the topology until `shutdown`: after each change, carry out
/// what [`plan`] decides; then stop every adaptor gracefully (in-flight
/// target calls finish).
pub async fn run(node: Node, shutdown: CancellationToken) {
    let mut rx = node.topology.subscribe();
    let mut work = Work::default();
    let mut previous: Option<Arc<State>> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        work.tidy();
        let here = work.here(&node);
        for action in plan(previous.as_deref(), &state, &node.id, &here) {
            let step = Step {
                node: &node,
                previous: previous.as_deref(),
                state: &state,
                shutdown: &shutdown,
            };
            let what = format!("{action:?}");
            if let Err(e) = work.carry_out(step, action).await {
                tracing::error!(action = %what, error = %e, "Cannot go on with the takeover; stopping (a restart does it again).");
                node.fatal.cancel();
                return;
            }
        }
        previous = Some(state);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
            // Look again while a handover runs: its end may let an adaptor start.
            _ = tokio::time::sleep(Duration::from_millis(200)), if !work.sending.is_empty() => {}
        }
    }
    work.finish(&node).await;
}

/// What hosting runs, as tasks.
#[derive(Default)]
struct Work {
    hosted: BTreeMap<String, Hosted>,
    /// Surrendered adaptors whose consumer is still stopping.
    stopping: HashMap<String, JoinHandle<()>>,
    /// Handovers of moved adaptors' backlogs in progress.
    sending: HashMap<String, (CancellationToken, JoinHandle<()>)>,
    singletons: BTreeMap<String, JoinHandle<()>>,
    /// See [`Here::adopted`].
    adopted: BTreeMap<String, Option<u64>>,
}

/// The context of one action: the topology it follows and the one before.
#[derive(Clone, Copy)]
struct Step<'a> {
    node: &'a Node,
    previous: Option<&'a State>,
    state: &'a State,
    shutdown: &'a CancellationToken,
}

impl Work {
    /// Forget the tasks that have ended.
    fn tidy(&mut self) {
        self.stopping.retain(|_, h| !h.is_finished());
        self.sending.retain(|_, (_, h)| !h.is_finished());
        self.singletons.retain(|_, h| !h.is_finished());
    }

    fn here(&self, node: &Node) -> Here {
        Here {
            adaptors: self.hosted.keys().cloned().collect(),
            handovers: self.sending.keys().cloned().collect(),
            singletons: self.singletons.keys().cloned().collect(),
            adopted: self.adopted.clone(),
            has_schedules: !node.config.schedules.is_empty(),
        }
    }

    async fn carry_out(&mut self, step: Step<'_>, action: Action) -> Result<(), TakeoverError> {
        let node = step.node;
        match action {
            Action::Adopt { failed, mail } => {
                let before = step.previous.filter(|_| mail);
                match takeover::take_over(node, &failed, before, step.state).await {
                    Ok(_) => {
                        let joined = step.state.servers.get(&failed).and_then(|s| s.joined_epoch);
                        self.adopted.insert(failed, joined);
                    }
                    // Adopted again (found again) at the next change.
                    Err(TakeoverError::NotRecorded { items, source }) => {
                        tracing::warn!(%failed, items, error = %source, "Cannot record the adoption; the failed server cannot rejoin until it is recorded.");
                    }
                    Err(e) => return Err(e),
                }
            }
            Action::Forget { failed } => {
                self.adopted.remove(&failed);
            }
            Action::Surrender { adaptor, now_on } => {
                if let Some(h) = self.hosted.remove(&adaptor) {
                    self.stopping.insert(adaptor.clone(), h.surrender());
                    tracing::warn!(%adaptor, now_on = now_on.as_deref().unwrap_or("-"), "Adaptor surrendered; stopped with its deliveries.");
                }
            }
            Action::StopHandover { adaptor } => {
                if let Some((stop, _)) = self.sending.get(&adaptor) {
                    stop.cancel();
                }
            }
            Action::SendBacklog { adaptor } => {
                let stopped = self.stopping.remove(&adaptor);
                let stop = step.shutdown.child_token();
                let task = send_backlog(node.clone(), adaptor.clone(), stopped, stop.clone());
                self.sending.insert(adaptor, (stop, task));
            }
            Action::StopSingleton { name, now_on } => {
                if let Some(h) = self.singletons.remove(&name) {
                    h.abort();
                    tracing::warn!(singleton = %name, now_on = now_on.as_deref().unwrap_or("-"), "Stopped here.");
                }
            }
            // `plan` starts nothing already running; a start never drops
            // the handle of a running task.
            Action::StartSingleton { name } => {
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    self.singletons.entry(name)
                {
                    let task = start_singleton(node, slot.key(), step.shutdown);
                    slot.insert(task);
                }
            }
            Action::StartAdaptor { adaptor } if self.hosted.contains_key(&adaptor) => {}
            Action::StartAdaptor { adaptor } => {
                match start_adaptor(node, &adaptor, step.shutdown) {
                    Ok(h) => {
                        self.hosted.insert(adaptor, h);
                    }
                    Err(e) => {
                        tracing::error!(%adaptor, error = %e, "Cannot start the adaptor.");
                    }
                }
            }
            Action::Rejoin => {
                tracing::error!(
                    "This server was taken over: everything it ran is stopped; joining again."
                );
                // The surrendered backlog is dropped once no writer can add to it.
                for (_, (_, h)) in self.sending.drain() {
                    let _ = h.await;
                }
                for (_, h) in self.stopping.drain() {
                    let _ = h.await;
                }
                takeover::rejoin(node).await?;
            }
        }
        Ok(())
    }

    /// At shutdown: stop every adaptor gracefully, naming what is still
    /// finishing.
    async fn finish(self, node: &Node) {
        for (name, h) in &self.hosted {
            h.stop.cancel();
            node.finishing.begin(format!("adaptor {name}"));
            node.finishing.begin(format!("executor {name}"));
        }
        for (name, h) in self.hosted {
            let _ = h.adaptor.await;
            node.finishing.end(&format!("adaptor {name}"));
            let _ = h.executor.await;
            node.finishing.end(&format!("executor {name}"));
        }
    }
}

/// Start the singleton service `name` here.
fn start_singleton(node: &Node, name: &str, shutdown: &CancellationToken) -> JoinHandle<()> {
    if name == SCHEDULER {
        let task = crate::scheduler::Scheduler {
            config: node.config.clone(),
            node: node.id.clone(),
            publisher: node.parking.publisher().clone(),
            topology: node.topology.clone(),
            fence: node.fence.clone(),
            peers: node.peers.clone(),
        };
        tokio::spawn(task.run(shutdown.child_token()))
    } else {
        let task = crate::timeout::Checker {
            config: node.config.clone(),
            node: node.id.clone(),
            topology: node.topology.clone(),
            fence: node.fence.clone(),
            alerter: node.alerter.clone(),
            peers: node.peers.clone(),
        };
        tokio::spawn(task.run(shutdown.child_token()))
    }
}

/// Hand the backlog of the moved adaptor `name` over to its new host, once
/// its consumer here (`stopped`) has ended; retried until it succeeds.
fn send_backlog(
    node: Node,
    name: String,
    stopped: Option<JoinHandle<()>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Some(h) = stopped {
            let _ = h.await;
        }
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let sender = crate::handover::Sender {
                node: &node.id,
                broker: &node.broker,
                publisher: node.parking.publisher(),
                repo: &node.repo,
                topology: &node.topology,
                fence: &node.fence,
                stop: &stop,
            };
            match sender.send(&name).await {
                Ok(None) => {
                    tracing::warn!(adaptor = %name, "The handover of this adaptor's backlog is no longer this server's to do; stopped.");
                    return;
                }
                Ok(Some(items)) => {
                    let to = node
                        .topology
                        .state()
                        .adaptors
                        .get(&name)
                        .cloned()
                        .unwrap_or_default();
                    tracing::warn!(adaptor = %name, items, %to, "Moved adaptor's backlog handed over.");
                    return;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(adaptor = %name, error = %e, retry_in = ?delay, "Cannot hand the moved adaptor's backlog over yet.");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    })
}

fn start_adaptor(node: &Node, name: &str, shutdown: &CancellationToken) -> Result<Hosted, String> {
    let a = node
        .config
        .adaptors
        .get(name)
        .ok_or_else(|| format!("adaptor {name:?} is not in the cluster file"))?;
    let target_config = node
        .config
        .targets
        .get(&a.target)
        .ok_or_else(|| format!("target {:?} is not in the cluster file", a.target))?;
    // Every socket write to the target checks that this server still hosts
    // the adaptor under an open fence: a process resuming from a freeze
    // sends nothing for an adaptor it was relieved of meanwhile.
    let fence = node.fence.clone();
    let adaptor = name.to_owned();
    let gate: targets::Gate = Arc::new(move || fence.hosts(&adaptor));
    let target = targets::build(&a.target, target_config, gate)
        .map_err(|reason| format!("target {}: {reason}", a.target))?;
    let (executor, items_tx) = Executor::new(
        name,
        a.concurrency,
        node.repo.clone(),
        target,
        node.parking.clone(),
        node.config.retry.clone(),
        node.stats.clone(),
        node.fence.clone(),
        &node.id,
    );
    let adaptor = Adaptor::new(
        name,
        &node.id,
        a.kind,
        &a.queue,
        node.broker.clone(),
        node.repo.clone(),
        node.parking.clone(),
        node.config.limits.clone(),
        items_tx.clone(),
        node.mirror.clone(),
        node.stats.clone(),
        node.fatal.clone(),
        node.fence.clone(),
    );
    let stop = shutdown.child_token();
    let executor = tokio::spawn(executor.run(stop.clone()));
    // A backlog handed over by the adaptor's previous host comes first.
    let (c, n, s, server_stop) = (
        node.clone(),
        name.to_owned(),
        stop.clone(),
        shutdown.clone(),
    );
    let adaptor = tokio::spawn(async move {
        if receive_backlog(&c, &n, &items_tx, &s).await {
            adaptor.run(s, server_stop).await;
        }
    });
    tracing::info!(adaptor = %name, queue = %node.config.queue_name(a), target = %a.target, concurrency = a.concurrency, "Adaptor started.");
    Ok(Hosted {
        stop,
        executor,
        adaptor,
    })
}

/// Take a handed-over backlog of `name` into this server's; retried until
/// it succeeds. Returns false if `stop` came first.
async fn receive_backlog(
    node: &Node,
    name: &str,
    items_tx: &crate::workflow::ItemSender,
    stop: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let receiver = crate::handover::Receiver {
            node: &node.id,
            broker: &node.broker,
            parking: &node.parking,
            repo: &node.repo,
            mirror: &node.mirror,
            fence: &node.fence,
            items_tx,
        };
        let result = tokio::select! {
            r = receiver.receive(name) => r,
            _ = stop.cancelled() => return false,
        };
        match result {
            Ok(items) => {
                if items > 0 {
                    tracing::warn!(adaptor = %name, items, "Received the moved adaptor's backlog.");
                }
                record_received(node, name).await;
                return true;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(adaptor = %name, error = %e, retry_in = ?delay, "Cannot receive the moved adaptor's backlog yet.");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

/// Record that the handover queue of `name` is drained here, if the log
/// waits for it (the adaptor may move again).
async fn record_received(node: &Node, name: &str) {
    let me = node.id.clone();
    for _ in 0..20 {
        let outcome = node
            .topology
            .propose_with(|s| {
                (s.receiving.get(name) == Some(&me)).then(|| crate::topology::Change::Received {
                    adaptor: name.to_owned(),
                    by: me.clone(),
                })
            })
            .await;
        match outcome {
            Ok(None | Some(crate::topology::Outcome::Applied)) => return,
            Ok(Some(crate::topology::Outcome::Ignored(reason))) => {
                tracing::warn!(adaptor = %name, %reason, "Cannot record the received backlog; the adaptor cannot move until it is (restart the server to try again).");
                return;
            }
            Err(e) => {
                tracing::warn!(adaptor = %name, error = %e, "Cannot record the received backlog yet; trying again.");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
