//! The supervisor: watches the server this one monitors and takes it over
//! when it has failed.
//!
//! Every `monitoring_interval` it asks the monitored server's `GET /state`
//! (bounded by `request_timeout`). After `retry_count` failed probes in a
//! row, or a state below `state_threshold`, it confirms through a second
//! path, the broker: a live server's connection holds its exclusive queue
//! `ns.alive.<id>`. Only a server that is gone from the broker too, and did
//! not announce an intentional stop, is taken over, by compare-and-set in
//! the topology log; the winner's hosting then adopts the backlog
//! (`hosting.rs`).
//!
//! A server whose broker connection is gone cannot act on the broker any
//! more, and it cannot deliver until it has read the log again (fencing),
//! where it finds its takeover.

pub mod probe;
pub mod takeover;
pub mod watch;

use crate::broker::Broker;
use crate::broker::declare::alive_queue;
use crate::config::{Config, SupervisorConfig};
use crate::topology::{Change, Outcome, Topology};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use watch::{Confirmation, Probe, Verdict, Watch};

pub async fn run(
    config: Config,
    node: String,
    topology: Topology,
    broker: Broker,
    client: reqwest::Client,
    stats: std::sync::Arc<crate::stats::Stats>,
    shutdown: CancellationToken,
) {
    let sup: SupervisorConfig = config.supervisor.clone();
    tokio::spawn(probe_taken_over(
        config.clone(),
        node.clone(),
        topology.clone(),
        client.clone(),
        shutdown.clone(),
    ));
    let mut tick = tokio::time::interval(sup.monitoring_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::new(sup.state_threshold, sup.retry_count);
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = topology.state();
        let peer = state.monitors.get(&node).cloned();
        if watch.watch(peer.as_deref())
            && let Some(p) = &peer
        {
            tracing::info!(monitored = %p, "Monitoring.");
        }
        let Some(peer) = peer else { continue };
        let Some(server) = config.servers.get(&peer) else {
            continue;
        };
        let url = crate::admin::client::admin_url(&config, &server.admin_listen, "/state");
        let asked = std::time::Instant::now();
        let result = probe::state(&client, &url, sup.request_timeout).await;
        stats.metrics.observe(
            "provring_probe_seconds",
            &[("peer", &peer)],
            asked.elapsed().as_secs_f64(),
        );
        let peer_state = state.servers.get(&peer).cloned().unwrap_or_default();
        let (failures, problem) = match watch.probed(result, &peer_state) {
            Verdict::Idle | Verdict::Healthy | Verdict::Settled => continue,
            Verdict::Suspect { failures, problem } => {
                tracing::debug!(monitored = %peer, failures, %problem, "Probe failed.");
                continue;
            }
            Verdict::Confirm { failures, problem } => (failures, problem),
        };
        // Second path: the broker's view.
        let alive = broker
            .peer_alive(&alive_queue(&config.broker.namespace, &peer))
            .await;
        if let Err(e) = &alive {
            tracing::warn!(monitored = %peer, error = %e, "Cannot ask the broker about the monitored server; no takeover for now.");
        }
        match watch.confirmed(alive, problem) {
            Confirmation::Unknown => continue,
            Confirmation::AliveOnBroker { problem } => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(monitored = %peer, admin = %server.admin_listen, %problem, "Cannot reach the monitored server's admin API, but its broker connection is alive: no takeover.");
                    last_warning = Some(Instant::now());
                }
            }
            Confirmation::TakeOver { problem } => {
                tracing::warn!(monitored = %peer, failures, %problem, "Monitored server failed: no answer and no broker connection. Taking over.");
                take_over(&topology, &node, &peer).await;
            }
        }
    }
}

/// Record the takeover of `failed` by `me` in the topology log, if `me`
/// still monitors it and it has not stopped or been taken over meanwhile.
async fn take_over(topology: &Topology, me: &str, failed: &str) {
    let outcome = topology
        .propose_with(|s| {
            let p = s.servers.get(failed)?;
            let still_mine = s.monitors.get(me).map(String::as_str) == Some(failed);
            (still_mine && !p.failed && !p.stopping).then(|| Change::Takeover {
                failed: failed.to_owned(),
                by: me.to_owned(),
            })
        })
        .await;
    match outcome {
        Ok(Some(Outcome::Applied)) => {
            tracing::warn!(failed = %failed, epoch = topology.state().epoch, "Takeover recorded in the topology log.")
        }
        Ok(Some(Outcome::Ignored(reason))) => {
            tracing::info!(failed = %failed, %reason, "Takeover not applied.")
        }
        Ok(None) => tracing::info!(failed = %failed, "Takeover no longer needed."),
        Err(e) => {
            tracing::warn!(failed = %failed, error = %e, "Cannot write the takeover; will retry.")
        }
    }
}

/// How often the servers this one took over are probed.
const TAKEN_OVER_PROBE: Duration = Duration::from_secs(1);

/// Keep probing the servers this one took over, and say when one answers
/// again or stops answering: a returning server learns of its takeover from
/// the log and rejoins by itself; nothing moves back without an operator.
async fn probe_taken_over(
    config: Config,
    node: String,
    topology: Topology,
    client: reqwest::Client,
    shutdown: CancellationToken,
) {
    let mut answering: std::collections::BTreeMap<String, bool> = Default::default();
    let mut tick = tokio::time::interval(TAKEN_OVER_PROBE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = topology.state();
        let taken: Vec<String> = state
            .servers
            .iter()
            .filter(|(_, s)| s.failed && s.taken_over_by.as_deref() == Some(node.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        answering.retain(|id, _| taken.contains(id));
        for id in taken {
            let Some(server) = config.servers.get(&id) else {
                continue;
            };
            let url = crate::admin::client::admin_url(&config, &server.admin_listen, "/state");
            let now = matches!(
                probe::state(&client, &url, config.supervisor.request_timeout).await,
                Probe::Answered { .. }
            );
            let before = answering.insert(id.clone(), now);
            match (before, now) {
                (Some(false), true) => {
                    tracing::warn!(server = %id, "A server this one took over answers again; it rejoins by itself, and what moved here stays (provring move moves it back).")
                }
                (None, true) => {
                    tracing::warn!(server = %id, "A server this one took over still answers on its admin API (it lost the broker or was frozen).")
                }
                (Some(true), false) => {
                    tracing::info!(server = %id, "A server this one took over stopped answering again.")
                }
                _ => {}
            }
        }
    }
}
