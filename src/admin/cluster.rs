//! `GET /cluster`: the whole cluster as this server sees it, for `provring
//! status` and the dashboard.

use super::AppState;
use super::api::{AdminError, ClusterView, ServerView};
use crate::topology::State;
use axum::Json;
use axum::extract::State as Extract;
use std::time::{Duration, Instant};

/// How long one server's `GET /state` may take here.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `GET /cluster` needs beyond the rest of the admin API.
#[derive(Clone)]
pub struct ClusterParts {
    pub config: crate::config::Config,
    /// The peers' client (peer token, cluster certificate).
    pub peers: reqwest::Client,
}

pub(super) async fn cluster(
    Extract(s): Extract<AppState>,
) -> Result<Json<ClusterView>, AdminError> {
    let (Some(topology), Some(parts)) = (&s.topology, &s.cluster) else {
        return Err(AdminError::NotHere("no cluster view here".into()));
    };
    let state = topology.state();
    let takeovers = topology.takeovers();
    let probes = parts.config.servers.iter().map(|(id, server)| async move {
        let url = super::client::admin_url(&parts.config, &server.admin_listen, "/state?peek=true");
        let started = Instant::now();
        let answer = super::client::get_state(&parts.peers, &url, PROBE_TIMEOUT).await;
        (
            id.clone(),
            server.admin_listen.clone(),
            answer,
            started.elapsed(),
        )
    });
    let mut servers = Vec::new();
    for (node, address, answer, took) in futures::future::join_all(probes).await {
        let mut view = placed(&state, &node);
        view.address = address;
        match answer {
            Ok(v) => {
                view.reachable = true;
                view.state = Some(v.state);
                view.reasons = v.reasons;
                view.epoch = Some(v.epoch);
                view.uptime_s = v.uptime_s;
                view.probe_ms = Some(took.as_millis() as u64);
            }
            Err(e) => view.error = Some(e.to_string()),
        }
        view.taken_over_at_ms = takeovers.get(&node).copied().flatten();
        servers.push(view);
    }
    Ok(Json(ClusterView {
        by: s.node.clone(),
        epoch: state.epoch,
        ring_closed: ring_closed(&state),
        servers,
    }))
}

/// What the topology says of `node`: links, hosted work, standing.
fn placed(state: &State, node: &str) -> ServerView {
    let me = state.servers.get(node).cloned().unwrap_or_default();
    let hosted = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .filter(|(_, host)| host.as_str() == node)
            .map(|(name, _)| name.clone())
            .collect()
    };
    ServerView {
        node: node.to_owned(),
        monitors: state.monitors.get(node).filter(|m| *m != node).cloned(),
        monitored_by: state.monitor_of(node).map(str::to_owned),
        adaptors: hosted(&state.adaptors),
        singletons: hosted(&state.singletons),
        stopping: me.stopping,
        failed: me.failed,
        taken_over_by: me.taken_over_by.filter(|_| me.failed),
        ..ServerView::default()
    }
}

/// Every server that is neither failed nor stopped on purpose is monitored
/// by one that is neither (a single such server needs no monitor).
pub fn ring_closed(state: &State) -> bool {
    let live: Vec<&String> = state
        .ring
        .iter()
        .filter(|id| {
            state
                .servers
                .get(*id)
                .is_some_and(|s| !s.failed && !s.stopping)
        })
        .collect();
    live.len() <= 1
        || live.iter().all(|id| {
            state
                .monitor_of(id)
                .is_some_and(|m| live.iter().any(|l| l.as_str() == m))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::ServerState;

    fn ring(links: &[(&str, &str)]) -> State {
        State {
            ring: vec!["a".into(), "b".into(), "c".into()],
            servers: ["a", "b", "c"]
                .iter()
                .map(|id| (id.to_string(), ServerState::default()))
                .collect(),
            monitors: links
                .iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect(),
            ..State::default()
        }
    }

    #[test]
    fn the_ring_is_closed_when_every_live_server_is_watched_by_a_live_one() {
        let s = ring(&[("a", "b"), ("b", "c"), ("c", "a")]);
        assert!(ring_closed(&s));
        // b taken over by a; the ring closed around it.
        let mut t = ring(&[("a", "c"), ("c", "a")]);
        if let Some(b) = t.servers.get_mut("b") {
            b.failed = true;
        }
        assert!(ring_closed(&t));
        // b stopped on purpose: nobody watches c while b is away.
        let mut u = s.clone();
        if let Some(b) = u.servers.get_mut("b") {
            b.stopping = true;
        }
        assert!(!ring_closed(&u));
        // Two servers down: the last one needs no monitor.
        let mut v = ring(&[]);
        for id in ["a", "b"] {
            if let Some(x) = v.servers.get_mut(id) {
                x.failed = true;
            }
        }
        assert!(ring_closed(&v));
    }
}
