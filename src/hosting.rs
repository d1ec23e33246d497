//! Hosting: runs the adaptors the topology gives this server, follows every
//! change, and adopts the backlog of a server it took over.
//!
//! - An adaptor the topology gives this server is started (its executor
//!   first loads the adaptor's backlog from the repository).
//! - An adaptor the topology gives another server is stopped at once: its
//!   consumer, and its executor with the target calls in flight (fencing:
//!   a surrendered item is never delivered from here).
//! - When this server is named the taker of a failed server, it drains the
//!   failed server's copies from the broker, adopts them as its own backlog
//!   (stored, flushed, mirrored on to its own monitor), then starts the
//!   failed server's adaptors, and sends the alert.
//! - The fence: while the topology log cannot be read for `fence_after`,
//!   no target call starts.

use crate::adaptor::Adaptor;
use crate::alert::Alerter;
use crate::broker::declare::backup_queue;
use crate::broker::{Backoff, Broker, BrokerError};
use crate::config::Config;
use crate::mirror::Mirror;
use crate::repository::{Repository, Stored};
use crate::stats::Stats;
use crate::topology::{State, TIMEOUT_CHECKER, Topology};
use crate::workflow::{Executor, targets};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What hosting needs to build adaptors.
pub struct Ctx {
    pub config: Config,
    pub node: String,
    pub repo: Repository,
    pub broker: Broker,
    pub parking: crate::parking::Parking,
    pub mirror: Mirror,
    pub stats: Arc<Stats>,
    pub fatal: CancellationToken,
    pub topology: Topology,
    pub alerter: Alerter,
    pub fence: crate::topology::Fence,
    /// During shutdown: the components not finished yet (named when the
    /// grace period runs out).
    pub finishing: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// The client for peers' admin APIs
    /// ([`crate::admin::client::peer_client`]).
    pub peers: reqwest::Client,
}

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

/// Follow the topology until `shutdown`; then stop every adaptor
/// gracefully (in-flight target calls finish).
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut rx = ctx.topology.subscribe();
    let mut hosted: BTreeMap<String, Hosted> = BTreeMap::new();
    let mut adopted: HashSet<String> = HashSet::new();
    let mut previous: Option<Arc<State>> = None;
    // Surrendered adaptors whose consumer is still stopping, and the
    // handovers of moved adaptors' backlogs in progress.
    let mut stopping: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut sending: HashMap<String, (CancellationToken, JoinHandle<()>)> = HashMap::new();
    let mut scheduler: Option<JoinHandle<()>> = None;
    let mut checker: Option<JoinHandle<()>> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        if state.servers.get(&ctx.node).is_some_and(|me| me.failed) {
            // Taken over while running (frozen, or cut off from the broker
            // for longer than the detection time): surrender everything at
            // once, drop what the taker adopted, and join again.
            for (_, (stop, h)) in sending.drain() {
                stop.cancel();
                let _ = h.await;
            }
            for (name, task) in [
                ("scheduler", &mut scheduler),
                (TIMEOUT_CHECKER, &mut checker),
            ] {
                if let Some(h) = task.take() {
                    h.abort();
                    tracing::error!(singleton = name, "This server was taken over: stopped.");
                }
            }
            for (name, h) in std::mem::take(&mut hosted) {
                stopping.insert(name.clone(), h.surrender());
                tracing::error!(adaptor = %name, "This server was taken over: adaptor surrendered.");
            }
            // The surrendered backlog is dropped once no writer can add to it.
            for (_, s) in stopping.drain() {
                let _ = s.await;
            }
            if let Err(e) = rejoin(&ctx, &state).await {
                tracing::error!(error = %e, "Cannot rejoin after being taken over; stopping.");
                ctx.fatal.cancel();
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = rx.changed() => if changed.is_err() { break },
            }
            continue;
        }
        // Adopt first, so that the adaptors start with the whole backlog.
        for (id, s) in &state.servers {
            if !s.failed || s.taken_over_by.as_deref() != Some(ctx.node.as_str()) {
                continue;
            }
            if !adopted.insert(id.clone()) {
                continue;
            }
            let started = Instant::now();
            let items = match adopt(&ctx, id).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(failed = %id, error = %e, "Cannot adopt the failed server's backlog; stopping (a restart adopts it again).");
                    ctx.fatal.cancel();
                    return;
                }
            };
            tracing::warn!(failed = %id, items, took = ?started.elapsed(), "Took over the failed server's backlog.");
            let me = ctx.node.clone();
            let failed = id.clone();
            if let Err(e) = ctx
                .topology
                .propose_with(|s| {
                    let f = s.servers.get(&failed)?;
                    (f.failed && !f.adopted && f.taken_over_by.as_deref() == Some(me.as_str()))
                        .then(|| crate::topology::Change::Adopted {
                            failed: failed.clone(),
                            by: me.clone(),
                        })
                })
                .await
            {
                tracing::warn!(failed = %id, error = %e, "Cannot record the adoption; the failed server cannot rejoin until it is recorded.");
                adopted.remove(id);
            }
            // A takeover seen in the first state was handled by an earlier
            // run of this server, which sent the mail.
            if let Some(prev) = &previous {
                let alerter = ctx.alerter.clone();
                let (subject, body) = takeover_mail(&ctx.node, id, prev, &state, items);
                tokio::spawn(async move { alerter.send(&subject, &body).await });
            }
        }
        adopted.retain(|id| state.servers.get(id).is_some_and(|s| s.failed));

        let wanted = state.adaptors_to_run(&ctx.node);
        let surrendered: Vec<String> = hosted
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in surrendered {
            if let Some(h) = hosted.remove(&name) {
                stopping.insert(name.clone(), h.surrender());
                let to = state.adaptors.get(&name).cloned().unwrap_or_default();
                tracing::warn!(adaptor = %name, now_on = %to, "Adaptor surrendered; stopped with its deliveries.");
            }
        }
        // Moved away: hand the backlog over once the adaptor has stopped here.
        // A handover no longer ours (a takeover gave the adaptor elsewhere,
        // maybe here) is stopped; the adaptor does not start here before its
        // sender has ended.
        sending.retain(|name, (stop, h)| {
            if state.handovers.get(name) != Some(&ctx.node) {
                stop.cancel();
            }
            !h.is_finished()
        });
        for (name, from) in &state.handovers {
            if from != &ctx.node || sending.contains_key(name) {
                continue;
            }
            let stopped = stopping.remove(name);
            let stop = shutdown.child_token();
            let task = send_backlog(ctx.clone(), name.clone(), stopped, stop.clone());
            sending.insert(name.clone(), (stop, task));
        }
        stopping.retain(|_, h| !h.is_finished());
        // The singletons run where the topology says, and stop at once
        // anywhere else (their changes are accepted only from their host).
        let scheduler_here = state.singletons.get("scheduler") == Some(&ctx.node)
            && !ctx.config.schedules.is_empty();
        follow_singleton(&mut scheduler, scheduler_here, "scheduler", &state, || {
            let task = crate::scheduler::Scheduler {
                config: ctx.config.clone(),
                node: ctx.node.clone(),
                publisher: ctx.parking.publisher().clone(),
                topology: ctx.topology.clone(),
                fence: ctx.fence.clone(),
                peers: ctx.peers.clone(),
            };
            tokio::spawn(task.run(shutdown.child_token()))
        });
        let checker_here = state.singletons.get(TIMEOUT_CHECKER) == Some(&ctx.node);
        follow_singleton(&mut checker, checker_here, TIMEOUT_CHECKER, &state, || {
            let task = crate::timeout::Checker {
                config: ctx.config.clone(),
                node: ctx.node.clone(),
                topology: ctx.topology.clone(),
                fence: ctx.fence.clone(),
                alerter: ctx.alerter.clone(),
                peers: ctx.peers.clone(),
            };
            tokio::spawn(task.run(shutdown.child_token()))
        });
        for name in wanted {
            if hosted.contains_key(&name) || sending.contains_key(&name) {
                continue;
            }
            match start_adaptor(&ctx, &name, &shutdown) {
                Ok(h) => {
                    hosted.insert(name, h);
                }
                Err(e) => {
                    tracing::error!(adaptor = %name, error = %e, "Cannot start the adaptor.");
                }
            }
        }
        previous = Some(state);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
            // Look again while a handover runs: its end may let an adaptor start.
            _ = tokio::time::sleep(Duration::from_millis(200)), if !sending.is_empty() => {}
        }
    }
    let mark = |name: String, on: bool| {
        if let Ok(mut f) = ctx.finishing.lock() {
            if on {
                f.insert(name);
            } else {
                f.remove(&name);
            }
        }
    };
    for (name, h) in &hosted {
        h.stop.cancel();
        mark(format!("adaptor {name}"), true);
        mark(format!("executor {name}"), true);
    }
    for (name, h) in hosted {
        let _ = h.adaptor.await;
        mark(format!("adaptor {name}"), false);
        let _ = h.executor.await;
        mark(format!("executor {name}"), false);
    }
}

/// Start the task of singleton `name` if it runs here and is not running,
/// abort it at once if it runs elsewhere now.
fn follow_singleton(
    task: &mut Option<JoinHandle<()>>,
    runs_here: bool,
    name: &str,
    state: &State,
    start: impl FnOnce() -> JoinHandle<()>,
) {
    match (&*task, runs_here) {
        (Some(h), false) => {
            h.abort();
            *task = None;
            tracing::warn!(singleton = name, now_on = ?state.singletons.get(name), "Stopped here.");
        }
        (Some(h), true) if h.is_finished() => *task = None,
        _ => {}
    }
    if runs_here && task.is_none() {
        *task = Some(start());
    }
}

/// After a takeover of this running server: drop the surrendered backlog,
/// tell the operators, and join the topology again.
async fn rejoin(ctx: &Ctx, state: &State) -> Result<(), String> {
    let me = state.servers.get(&ctx.node).cloned().unwrap_or_default();
    crate::supervisor::takeover::returned_after_takeover(
        &ctx.repo,
        &ctx.node,
        me.taken_over_by.as_deref(),
        state,
        &ctx.alerter,
    )
    .await
    .map_err(|e| e.to_string())?;
    let node = ctx.node.clone();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let outcome = ctx
            .topology
            .propose_with(|s| {
                s.servers.get(&node).is_some_and(|x| x.failed).then(|| {
                    crate::topology::Change::Joined {
                        node: node.clone(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        key_fingerprint: Some(ctx.topology.keys().fingerprint()),
                        accepted_keys: ctx.topology.keys().fingerprints(),
                    }
                })
            })
            .await
            .map_err(|e| e.to_string())?;
        match outcome {
            // The taker is still adopting this server's backlog.
            Some(crate::topology::Outcome::Ignored(reason)) if Instant::now() < deadline => {
                tracing::info!(%reason, "Cannot join yet; retrying.");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(crate::topology::Outcome::Ignored(reason)) => return Err(reason.to_string()),
            _ => break,
        }
    }
    tracing::warn!("Joined the topology again after being taken over.");
    Ok(())
}

/// Hand the backlog of the moved adaptor `name` over to its new host, once
/// its consumer here (`stopped`) has ended; retried until it succeeds.
fn send_backlog(
    ctx: Arc<Ctx>,
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
                node: &ctx.node,
                broker: &ctx.broker,
                publisher: ctx.parking.publisher(),
                repo: &ctx.repo,
                topology: &ctx.topology,
                fence: &ctx.fence,
                stop: &stop,
            };
            match sender.send(&name).await {
                Ok(None) => {
                    tracing::warn!(adaptor = %name, "The handover of this adaptor's backlog is no longer this server's to do; stopped.");
                    return;
                }
                Ok(Some(items)) => {
                    let to = ctx
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

fn start_adaptor(
    ctx: &Arc<Ctx>,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Hosted, String> {
    let a = ctx
        .config
        .adaptors
        .get(name)
        .ok_or_else(|| format!("adaptor {name:?} is not in the cluster file"))?;
    let target_config = ctx
        .config
        .targets
        .get(&a.target)
        .ok_or_else(|| format!("target {:?} is not in the cluster file", a.target))?;
    // Every socket write to the target checks that this server still hosts
    // the adaptor under an open fence: a process resuming from a freeze
    // sends nothing for an adaptor it was relieved of meanwhile.
    let fence = ctx.fence.clone();
    let adaptor = name.to_owned();
    let gate: targets::Gate = Arc::new(move || fence.hosts(&adaptor));
    let target = targets::build(&a.target, target_config, gate)
        .map_err(|reason| format!("target {}: {reason}", a.target))?;
    let (executor, items_tx) = Executor::new(
        name,
        a.concurrency,
        ctx.repo.clone(),
        target,
        ctx.parking.clone(),
        ctx.config.retry.clone(),
        ctx.stats.clone(),
        ctx.fence.clone(),
        &ctx.node,
    );
    let adaptor = Adaptor::new(
        name,
        &ctx.node,
        a.kind,
        &a.queue,
        ctx.broker.clone(),
        ctx.repo.clone(),
        ctx.parking.clone(),
        ctx.config.limits.clone(),
        items_tx.clone(),
        ctx.mirror.clone(),
        ctx.stats.clone(),
        ctx.fatal.clone(),
        ctx.fence.clone(),
    );
    let stop = shutdown.child_token();
    let executor = tokio::spawn(executor.run(stop.clone()));
    // A backlog handed over by the adaptor's previous host comes first.
    let (c, n, s, server_stop) = (ctx.clone(), name.to_owned(), stop.clone(), shutdown.clone());
    let adaptor = tokio::spawn(async move {
        if receive_backlog(&c, &n, &items_tx, &s).await {
            adaptor.run(s, server_stop).await;
        }
    });
    tracing::info!(adaptor = %name, queue = %ctx.config.queue_name(a), target = %a.target, concurrency = a.concurrency, "Adaptor started.");
    Ok(Hosted {
        stop,
        executor,
        adaptor,
    })
}

/// Take a handed-over backlog of `name` into this server's; retried until
/// it succeeds. Returns false if `stop` came first.
async fn receive_backlog(
    ctx: &Ctx,
    name: &str,
    items_tx: &crate::workflow::ItemSender,
    stop: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let receiver = crate::handover::Receiver {
            node: &ctx.node,
            broker: &ctx.broker,
            parking: &ctx.parking,
            repo: &ctx.repo,
            mirror: &ctx.mirror,
            fence: &ctx.fence,
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
                record_received(ctx, name).await;
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
async fn record_received(ctx: &Ctx, name: &str) {
    let me = ctx.node.clone();
    for _ in 0..20 {
        let outcome = ctx
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

/// Drain `origin`'s copies from the broker, store them as this server's
/// backlog, mirror them on, forget the copies. Returns the items adopted.
async fn adopt(ctx: &Ctx, origin: &str) -> Result<usize, String> {
    drain(ctx, origin).await.map_err(|e| e.to_string())?;
    let repo = ctx.repo.clone();
    let o = origin.to_owned();
    let batches = tokio::task::spawn_blocking(move || repo.copies_events(&o))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // One flush and one mirror round per adaptor, however many batches the
    // copies came in. Items keep their receipt time, and so their deadline.
    // Only what the failed server still had to deliver: copies of an
    // adaptor it had already handed over to another server are stale.
    let state = ctx.topology.state();
    let mut per_adaptor: BTreeMap<String, Vec<(u64, Vec<crate::event::Event>)>> = BTreeMap::new();
    for (adaptor, received_ms, events) in batches {
        let mine = state.adaptors.get(&adaptor) == Some(&ctx.node)
            || state.handovers.get(&adaptor) == Some(&ctx.node);
        if !mine {
            tracing::warn!(failed = %origin, %adaptor, items = events.len(), now_on = ?state.adaptors.get(&adaptor), "Copies of an adaptor the failed server had handed over: not adopted.");
            continue;
        }
        per_adaptor
            .entry(adaptor)
            .or_default()
            .push((received_ms, events));
    }
    let mut adopted = 0;
    for (adaptor, batches) in per_adaptor {
        let repo = ctx.repo.clone();
        let name = adaptor.clone();
        let (stored, records) = tokio::task::spawn_blocking(move || {
            let mut stored = Vec::new();
            let mut records = Vec::new();
            for (received_ms, events) in batches {
                let (s, r) = repo.store_received(&name, events, received_ms)?;
                stored.extend(s);
                records.extend(r);
            }
            Ok::<_, crate::repository::RepositoryError>((stored, records))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        adopted += stored
            .iter()
            .filter(|s| matches!(s, Stored::New(_)))
            .count();
        ctx.repo.flush().await.map_err(|e| e.to_string())?;
        ctx.mirror
            .copy(&adaptor, records)
            .await
            .map_err(|e| e.to_string())?;
    }
    let repo = ctx.repo.clone();
    let o = origin.to_owned();
    tokio::task::spawn_blocking(move || repo.copies_drop(&o))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(adopted)
}

/// Apply every record still on the queue of `origin`'s copies to this
/// server, once its own backup consumer has let go of it.
async fn drain(ctx: &Ctx, origin: &str) -> Result<(), BrokerError> {
    let ns = &ctx.config.broker.namespace;
    let queue = backup_queue(ns, origin, &ctx.node);
    let ch = ctx.broker.channel().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match q {
            Ok(q) if q.consumer_count() == 0 || Instant::now() > deadline => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => return Ok(()), // no queue: nothing was ever sent here
        }
    }
    let known: Vec<String> = ctx.topology.state().servers.keys().cloned().collect();
    let tag = format!("provring.drain.{}", ctx.node);
    crate::broker::drain::drain(&ch, &queue, &tag, |records| {
        let known = known.clone();
        async move {
            crate::mirror::backup::apply_records(&ctx.repo, origin, known, records)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    let _ = ch.close(200, "drained".into()).await;
    Ok(())
}

fn takeover_mail(
    taker: &str,
    failed: &str,
    before: &State,
    after: &State,
    items: usize,
) -> (String, String) {
    let moved: Vec<String> = before
        .adaptors
        .iter()
        .chain(before.singletons.iter())
        .filter(|(_, host)| host.as_str() == failed)
        .map(|(name, _)| {
            let now = after
                .adaptors
                .get(name)
                .or_else(|| after.singletons.get(name))
                .map_or("-", String::as_str);
            format!("  {name} -> {now}")
        })
        .collect();
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let subject = format!("server {failed} failed; {taker} took over");
    let body = format!(
        "Server {failed} stopped answering and its broker connection is gone.\n\
         Server {taker} took it over at {when} (topology epoch {epoch}).\n\n\
         Moved:\n{moved}\n\n\
         Backlog adopted from {failed}'s copies: {items} items.\n\
         Monitoring now: {links}\n\n\
         Nothing moves back by itself: when {failed} is back, move what you want with\n\
         `provring move`.",
        epoch = after.epoch,
        moved = if moved.is_empty() {
            "  (nothing)".to_owned()
        } else {
            moved.join("\n")
        },
        links = after
            .monitors
            .iter()
            .map(|(a, b)| format!("{a}→{b}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    (subject, body)
}
