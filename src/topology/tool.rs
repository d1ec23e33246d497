//! `provring topology show|link`: the log, read and written from the
//! command line.

use super::{Change, Outcome, State, Topology, TopologyError};
use crate::broker::Broker;
use crate::config::Config;
use tokio_util::sync::CancellationToken;

pub(super) async fn connect(
    config: &Config,
) -> Result<(Topology, Broker, CancellationToken), TopologyError> {
    let broker = Broker::new(config.broker.clone(), "provring topology");
    let stop = CancellationToken::new();
    let proposer = format!("tool@{}", std::process::id());
    let keys = config.security.key_ring().map_err(TopologyError::KeyRing)?;
    let topology = Topology::connect(
        broker.clone(),
        &proposer,
        std::sync::Arc::new(keys),
        stop.clone(),
    )
    .await?;
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

/// Move `what` (an adaptor or singleton) to server `to`, and with `wait`,
/// wait that long for the old host to hand the adaptor's backlog over.
/// Returns the text to print and the exit code (0 moved, 2 refused, 3 the
/// handover has not finished yet).
pub async fn move_to(
    config: &Config,
    what: &str,
    to: &str,
    wait: Option<std::time::Duration>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(String, u8), TopologyError> {
    let singleton = super::SINGLETONS.iter().any(|(_, name)| *name == what);
    if !config.adaptors.contains_key(what) && !singleton {
        let mut known: Vec<&str> = config.adaptors.keys().map(String::as_str).collect();
        known.extend(super::SINGLETONS.iter().map(|(_, name)| *name));
        return Ok((
            format!(
                "not moved: {what:?} is neither an adaptor of the cluster file nor a singleton service; known: {}",
                known.join(", ")
            ),
            2,
        ));
    }
    if let Some(unknown) = unknown_server(config, to) {
        return Ok((format!("not moved: {unknown}"), 2));
    }
    let (topology, broker, stop) = connect(config).await?;
    let result = move_one(&topology, what, to, wait, None, progress).await;
    stop.cancel();
    broker.close().await;
    result
}

/// Move `what` to `to` on a connected log; see [`move_to`]. With
/// `only_from`, only while `what` is still on that server and `to` still
/// runs (joined, neither failed nor stopping). `progress` hears a line
/// every 5 s while the backlog is handed over.
async fn move_one(
    topology: &Topology,
    what: &str,
    to: &str,
    wait: Option<std::time::Duration>,
    only_from: Option<&str>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(String, u8), TopologyError> {
    let singleton = super::SINGLETONS.iter().any(|(_, name)| *name == what);
    let change = Change::Move {
        what: what.to_owned(),
        to: to.to_owned(),
    };
    let from = {
        let s = topology.state();
        s.adaptors
            .get(what)
            .or_else(|| s.singletons.get(what))
            .cloned()
            .unwrap_or_else(|| "-".into())
    };
    let outcome = topology
        .propose_with(|s| {
            let still = only_from.is_none_or(|n| {
                s.adaptors
                    .get(what)
                    .or_else(|| s.singletons.get(what))
                    .map(String::as_str)
                    == Some(n)
                    && s.servers
                        .get(to)
                        .is_some_and(|t| t.joined_epoch.is_some() && !t.failed && !t.stopping)
            });
            still.then(|| change.clone())
        })
        .await?;
    let result = match outcome {
        None => (
            format!(
                "not moved: {what} is no longer on {}, or {to} no longer runs",
                only_from.unwrap_or("-")
            ),
            2,
        ),
        Some(Outcome::Ignored(reason)) => (format!("not moved: {reason}"), 2),
        Some(Outcome::Applied) => {
            let mut state = topology.state();
            let mut text = format!("moved: {what} from {from} to {to} (epoch {})", state.epoch);
            let mut code = 0;
            if let Some(limit) = wait.filter(|_| state.handovers.contains_key(what)) {
                let done = handed_over(topology, what, &from, to, limit, progress).await;
                state = topology.state();
                if done {
                    text.push_str(&format!(
                        "\nbacklog handed over by {from} and taken in by {to}, which runs {what} now (epoch {})",
                        state.epoch
                    ));
                } else {
                    text.push_str(&format!(
                        "\nthe backlog was not handed over by {from} and taken in by {to} within {}: \
                         are both running? It goes on by itself (`provring topology show` tells).",
                        humantime::format_duration(limit)
                    ));
                    code = 3;
                }
            } else if singleton {
                text.push_str(&format!(
                    "\n{from} stopped the {what}; {to} runs it from now on"
                ));
            }
            (text, code)
        }
    };
    Ok(result)
}

/// One move of a drain or a rebalance: `what` from `from` (only while it is
/// still there) to `to`, its outcome told line by line to `progress`.
/// Returns the move's exit code (see [`move_to`]).
pub(super) async fn move_reporting(
    topology: &Topology,
    what: &str,
    from: &str,
    to: &str,
    wait: std::time::Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<u8, TopologyError> {
    let (text, code) = move_one(topology, what, to, Some(wait), Some(from), progress).await?;
    for line in text.lines() {
        progress(&format!("{what}: {line}"));
    }
    Ok(code)
}

/// Wait up to `limit` until `what`'s backlog is handed over by `from` and
/// taken in by `to`, with a progress line every 5 s; whether it was.
async fn handed_over(
    topology: &Topology,
    what: &str,
    from: &str,
    to: &str,
    limit: std::time::Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> bool {
    let started = std::time::Instant::now();
    let mut rx = topology.subscribe();
    loop {
        let left = limit.saturating_sub(started.elapsed());
        let waited = tokio::time::timeout(
            left.min(std::time::Duration::from_secs(5)),
            rx.wait_for(|s| !s.handovers.contains_key(what) && !s.receiving.contains_key(what)),
        )
        .await;
        match waited {
            Ok(Ok(_)) => return true,
            Ok(Err(_)) => return false,
            Err(_) if left.is_zero() || started.elapsed() >= limit => return false,
            Err(_) => progress(&format!(
                "{what}: {from} still hands its backlog over to {to} ({}s)",
                started.elapsed().as_secs()
            )),
        }
    }
}

/// `provring drain`: move everything `node` hosts, one item at a time, to
/// the next eligible server in ring order, each waiting up to `wait` for
/// its backlog to be handed over; `progress` hears a line per step.
/// Returns the closing text and the exit code (0 drained: the server can
/// be stopped; 2 refused or nowhere to go; 3 a handover did not finish).
pub async fn drain(
    config: &Config,
    node: &str,
    wait: std::time::Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(String, u8), TopologyError> {
    if let Some(unknown) = unknown_server(config, node) {
        return Ok((format!("not drained: {unknown}"), 2));
    }
    let (topology, broker, stop) = connect(config).await?;
    let state = topology.state();
    let hosted: Vec<(String, &str)> = state
        .adaptors
        .iter()
        .filter(|(_, host)| host.as_str() == node)
        .map(|(name, _)| (name.clone(), "adaptors"))
        .chain(
            super::SINGLETONS
                .iter()
                .filter(|(_, name)| state.singletons.get(*name).map(String::as_str) == Some(node))
                .map(|(service, name)| ((*name).to_owned(), service.as_str())),
        )
        .collect();
    let mut code = 0;
    let mut moved = 0;
    for (what, service) in &hosted {
        let Some(to) = next_eligible(&topology.state(), node, service) else {
            progress(&format!(
                "{what}: no other server that runs and may host {service}; it stays on {node}"
            ));
            code = 2;
            continue;
        };
        progress(&format!("{what}: moving from {node} to {to}"));
        let c = move_reporting(&topology, what, node, &to, wait, progress).await?;
        if c == 0 {
            moved += 1;
        }
        code = code.max(c);
    }
    // Backlogs still leaving or arriving (an earlier move), and anything
    // placed here meanwhile (a takeover, a join), keep the server busy.
    let pending: Vec<(String, String)> = {
        let s = topology.state();
        s.handovers
            .iter()
            .filter(|(_, from)| from.as_str() == node)
            .chain(s.receiving.iter().filter(|(_, by)| by.as_str() == node))
            .map(|(what, _)| {
                (
                    what.clone(),
                    s.adaptors.get(what).cloned().unwrap_or_default(),
                )
            })
            .collect()
    };
    for (what, to) in pending {
        progress(&format!(
            "{what}: waiting for the handover under way ({node} → {to})"
        ));
        if !handed_over(&topology, &what, node, &to, wait, progress).await {
            progress(&format!(
                "{what}: the handover did not finish within {}",
                humantime::format_duration(wait)
            ));
            code = code.max(3);
        }
    }
    let state = topology.state();
    let left: Vec<&String> = state
        .adaptors
        .iter()
        .chain(state.singletons.iter())
        .filter(|(_, host)| host.as_str() == node)
        .map(|(what, _)| what)
        .collect();
    if !left.is_empty() {
        progress(&format!(
            "{} on {node} again (placed there during the drain)",
            left.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        code = code.max(2);
    }
    stop.cancel();
    broker.close().await;
    let text = if code == 0 {
        format!(
            "{node} drained ({moved} moved): it hosts nothing and holds no backlog of its adaptors; \
             stop it with `provring stop --node {node}` (no takeover, no mail)"
        )
    } else {
        format!("{node} is not drained: see the lines above; run `provring drain` again once fixed")
    };
    Ok((text, code))
}

/// Why `node` is not a server of `config`, if it is not.
fn unknown_server(config: &Config, node: &str) -> Option<String> {
    (!config.servers.contains_key(node)).then(|| {
        format!(
            "no server {node:?} in the cluster file; known: {}",
            config.server_names()
        )
    })
}

/// The first server after `node` in ring order that runs (joined, neither
/// failed nor stopping) and may host `service`.
fn next_eligible(state: &State, node: &str, service: &str) -> Option<String> {
    let at = state.ring.iter().position(|id| id == node)?;
    let n = state.ring.len();
    (1..n)
        .map(|i| &state.ring[(at + i) % n])
        .find(|id| {
            state
                .servers
                .get(*id)
                .is_some_and(|s| s.joined_epoch.is_some() && !s.failed && !s.stopping)
                && state.eligible(id, service)
        })
        .cloned()
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
            match (&s.taken_over_by, s.adopted) {
                (Some(by), true) => format!("taken over by {by}"),
                (Some(by), false) => format!("taken over by {by}, which is adopting its backlog"),
                (None, _) => "taken over".to_owned(),
            }
        } else if s.stopping {
            "stopped on purpose".to_owned()
        } else if let Some(e) = s.joined_epoch {
            format!("joined at epoch {e}")
        } else {
            "never joined".to_owned()
        };
        let monitors = state.monitors.get(id).map_or("-", String::as_str);
        out.push_str(&format!("\n  {id:<12} monitors {monitors:<12} {status}"));
        if let Some(reason) = state.hosts_nothing_because(id) {
            out.push_str(&format!("\n  {:<12} hosts nothing: {reason}", ""));
        }
    }
    out.push_str("\n\nadaptors:");
    for (name, host) in &state.adaptors {
        out.push_str(&format!("\n  {name:<16} on {host}"));
    }
    for (name, from) in &state.handovers {
        out.push_str(&format!(
            "\n  {name:<16} (its backlog is still being handed over by {from})"
        ));
    }
    for (name, by) in &state.receiving {
        out.push_str(&format!(
            "\n  {name:<16} (its handed-over backlog is still being taken in by {by})"
        ));
    }
    out.push_str("\n\nsingleton services:");
    if state.singletons.is_empty() {
        out.push_str("\n  (no server is eligible)");
    }
    for (name, host) in &state.singletons {
        out.push_str(&format!("\n  {name:<16} on {host}"));
    }
    if !state.fired.is_empty() {
        out.push_str("\n\nschedules (last slot handled):");
        for (name, f) in &state.fired {
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(f.slot),
            );
            let what = if f.published { "fired" } else { "skipped" };
            out.push_str(&format!("\n  {name:<16} {when} {what} by {}", f.by));
        }
    }
    let checks = &state.timeout_checks;
    if !checks.is_empty() {
        out.push_str(&format!(
            "\n\ntimeout checks that found overdue events: {}",
            checks.last
        ));
        if let Some(p) = &checks.pending {
            out.push_str(&format!(
                "\n  check {} under way: {} events, started by {} at {}",
                p.check,
                p.items.len(),
                p.by,
                crate::time::rfc3339(p.at_ms)
            ));
        }
    }
    out
}
