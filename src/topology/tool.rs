//! `provring topology show|link`: the log, read and written from the
//! command line.

use super::{Change, Outcome, State, Topology, TopologyError};
use crate::broker::Broker;
use crate::config::Config;
use tokio_util::sync::CancellationToken;

async fn connect(config: &Config) -> Result<(Topology, Broker, CancellationToken), TopologyError> {
    let broker = Broker::new(config.broker.clone(), "provring topology");
    let stop = CancellationToken::new();
    let proposer = format!("tool@{}", std::process::id());
    let topology = Topology::connect(broker.clone(), &proposer, stop.clone()).await?;
    topology.sync().await?;
    Ok((topology, broker, stop))
}

/// The state after replaying the whole log, as text or JSON.
pub async fn show(config: &Config, json: bool) -> Result<String, TopologyError> {
    let (topology, broker, stop) = connect(config).await?;
    let state = topology.state();
    stop.cancel();
    broker.close().await;
    if json {
        return Ok(serde_json::to_string(&*state).unwrap_or_default());
    }
    Ok(render(&state))
}

/// Propose "`node` monitors `monitors`". Returns the text to print and
/// whether the change was applied.
pub async fn link(
    config: &Config,
    node: &str,
    monitors: &str,
    expect_epoch: Option<u64>,
) -> Result<(String, bool), TopologyError> {
    let (topology, broker, stop) = connect(config).await?;
    let change = Change::Monitoring {
        node: node.to_owned(),
        monitors: monitors.to_owned(),
    };
    let outcome = match expect_epoch {
        Some(epoch) => topology.propose(epoch, change).await?,
        None => topology
            .propose_with(|_| Some(change.clone()))
            .await?
            .unwrap_or(Outcome::Applied),
    };
    let epoch = topology.state().epoch;
    stop.cancel();
    broker.close().await;
    Ok(match outcome {
        Outcome::Applied => (
            format!("applied: {node} monitors {monitors} (epoch {epoch})"),
            true,
        ),
        Outcome::Ignored(reason) => (format!("not applied: {reason}"), false),
    })
}

/// A human-readable view of a state.
pub fn render(state: &State) -> String {
    if !state.initialised() {
        return "The topology log is empty: the first server to start writes the initial state."
            .into();
    }
    let mut out = format!("epoch {}\n\nservers (ring order):", state.epoch);
    for id in &state.ring {
        let s = state.servers.get(id).cloned().unwrap_or_default();
        let status = if s.failed {
            "taken over".to_owned()
        } else if s.stopping {
            "stopped on purpose".to_owned()
        } else if let Some(e) = s.joined_epoch {
            format!("joined at epoch {e}")
        } else {
            "never joined".to_owned()
        };
        let monitors = state.monitors.get(id).map_or("-", String::as_str);
        out.push_str(&format!("\n  {id:<12} monitors {monitors:<12} {status}"));
    }
    out.push_str("\n\nadaptors:");
    for (name, host) in &state.adaptors {
        out.push_str(&format!("\n  {name:<16} on {host}"));
    }
    out.push_str("\n\nsingleton services:");
    if state.singletons.is_empty() {
        out.push_str("\n  (no server is eligible)");
    }
    for (name, host) in &state.singletons {
        out.push_str(&format!("\n  {name:<16} on {host}"));
    }
    out
}
