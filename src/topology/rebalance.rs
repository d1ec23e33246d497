//! `provring rebalance`: nothing moves back by itself after a takeover, so
//! after a few failures the work piles up on the takers. This moves each
//! adaptor and singleton back to its configured server, or, where that
//! server does not run or may not host it, to the running eligible server
//! that hosts the least; one lossless move at a time (see
//! [`super::tool::move_to`]).

use super::tool::{connect, move_reporting};
use super::{State, TopologyError};
use crate::config::Config;
use std::collections::BTreeMap;

/// One planned move: `what` from `from` to `to`, and why there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub what: String,
    pub from: String,
    pub to: String,
    pub why: &'static str,
}

/// The moves that bring `state` back to the placement of the cluster file
/// (`configured`: adaptor or singleton → server), in order: adaptors, then
/// singletons.
pub fn plan(state: &State, configured: &BTreeMap<String, (String, &'static str)>) -> Vec<Step> {
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for host in state.adaptors.values().chain(state.singletons.values()) {
        *load.entry(host.clone()).or_default() += 1;
    }
    let mut steps = Vec::new();
    for (what, (home, service)) in configured {
        let Some(now) = state
            .adaptors
            .get(what)
            .or_else(|| state.singletons.get(what))
        else {
            continue;
        };
        let (to, why) = if runs(state, home) && state.eligible(home, service) {
            (home.clone(), "its configured server")
        } else {
            // Its server is away: the running eligible server with the
            // least work, unless it already is on one as light.
            let Some(lightest) = state
                .ring
                .iter()
                .filter(|id| runs(state, id) && state.eligible(id, service))
                .min_by_key(|id| load.get(id.as_str()).copied().unwrap_or(0))
            else {
                continue;
            };
            let here = load.get(now.as_str()).copied().unwrap_or(0);
            let there = load.get(lightest.as_str()).copied().unwrap_or(0);
            if runs(state, now) && here <= there + 1 {
                continue;
            }
            (
                lightest.clone(),
                "its configured server is away; the least loaded",
            )
        };
        if &to == now {
            continue;
        }
        if let Some(n) = load.get_mut(now.as_str()) {
            *n = n.saturating_sub(1);
        }
        *load.entry(to.clone()).or_default() += 1;
        steps.push(Step {
            what: what.clone(),
            from: now.clone(),
            to: to.clone(),
            why,
        });
    }
    steps
}

/// Joined, neither failed nor stopping.
fn runs(state: &State, id: &str) -> bool {
    state
        .servers
        .get(id)
        .is_some_and(|s| s.joined_epoch.is_some() && !s.failed && !s.stopping)
}

/// Where the cluster file places each adaptor and singleton.
fn configured(config: &Config) -> BTreeMap<String, (String, &'static str)> {
    let mut out: BTreeMap<String, (String, &'static str)> = config
        .adaptors
        .iter()
        .map(|(name, a)| (name.clone(), (a.server.clone(), "adaptors")))
        .collect();
    let initial = State::initial(config);
    for (service, name) in super::SINGLETONS {
        if let Some(host) = initial.singletons.get(name) {
            out.insert(name.to_owned(), (host.clone(), service.as_str()));
        }
    }
    out
}

/// `provring rebalance`: carry out [`plan`] (or only print it with
/// `dry_run`), each move waiting up to `wait` for its backlog handover.
/// Returns the closing text and the exit code (0 done or nothing to do, 2
/// a move refused, 3 a handover not finished in time).
pub async fn rebalance(
    config: &Config,
    dry_run: bool,
    wait: std::time::Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(String, u8), TopologyError> {
    let (topology, broker, stop) = connect(config).await?;
    let steps = plan(&topology.state(), &configured(config));
    let mut code = 0;
    let mut moved = 0;
    for step in &steps {
        let Step {
            what,
            from,
            to,
            why,
        } = step;
        if dry_run {
            progress(&format!("{what}: would move from {from} to {to} ({why})"));
            continue;
        }
        progress(&format!("{what}: moving from {from} to {to} ({why})"));
        let c = move_reporting(&topology, what, from, to, wait, progress).await?;
        if c == 0 {
            moved += 1;
        }
        code = code.max(c);
    }
    stop.cancel();
    broker.close().await;
    let text = match (steps.is_empty(), dry_run) {
        (true, _) => "balanced already: every adaptor and singleton is where it belongs".to_owned(),
        (false, true) => format!("{} moves planned; nothing moved (--dry-run)", steps.len()),
        (false, false) if code == 0 => format!("rebalanced: {moved} moved"),
        (false, false) => format!(
            "rebalance incomplete: {moved} of {} moved; see the lines above",
            steps.len()
        ),
    };
    Ok((text, code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::ServerState;

    fn state(adaptors: &[(&str, &str)], failed: &[&str]) -> State {
        State {
            ring: vec!["a".into(), "b".into(), "c".into()],
            servers: ["a", "b", "c"]
                .iter()
                .map(|id| {
                    let s = ServerState {
                        joined_epoch: Some(1),
                        failed: failed.contains(id),
                        ..ServerState::default()
                    };
                    (id.to_string(), s)
                })
                .collect(),
            adaptors: adaptors
                .iter()
                .map(|(a, h)| (a.to_string(), h.to_string()))
                .collect(),
            ..State::default()
        }
    }

    fn homes() -> BTreeMap<String, (String, &'static str)> {
        [("fa", "a"), ("fb", "b"), ("fc", "c")]
            .iter()
            .map(|(a, h)| (a.to_string(), (h.to_string(), "adaptors")))
            .collect()
    }

    #[test]
    fn work_piled_on_one_server_goes_home() {
        let s = state(&[("fa", "c"), ("fb", "c"), ("fc", "c")], &[]);
        let steps = plan(&s, &homes());
        let moves: Vec<(&str, &str, &str)> = steps
            .iter()
            .map(|m| (m.what.as_str(), m.from.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(moves, vec![("fa", "c", "a"), ("fb", "c", "b")]);
        // Nothing to do once everything is home.
        let s = state(&[("fa", "a"), ("fb", "b"), ("fc", "c")], &[]);
        assert!(plan(&s, &homes()).is_empty());
    }

    #[test]
    fn work_of_an_absent_server_is_spread_not_piled() {
        // b is down; a took fb and holds fa too; c holds fc.
        let s = state(&[("fa", "a"), ("fb", "a"), ("fc", "c")], &["b"]);
        let steps = plan(&s, &homes());
        // fb stays on a: a holds 2, c 1; moving it would only swap.
        assert!(steps.is_empty(), "{steps:?}");
        // All three on a, b down: one goes to c, fa stays home.
        let s = state(&[("fa", "a"), ("fb", "a"), ("fc", "a")], &["b"]);
        let moves: Vec<(String, String)> = plan(&s, &homes())
            .into_iter()
            .map(|m| (m.what, m.to))
            .collect();
        assert_eq!(
            moves,
            vec![
                ("fb".to_string(), "c".to_string()),
                ("fc".to_string(), "c".to_string())
            ]
        );
    }
}
