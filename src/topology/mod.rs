//! The topology: who hosts which adaptor and singleton service, who monitors
//! whom, who stopped on purpose.
//!
//! Every change is a record in an ordered log on the broker (a RabbitMQ
//! stream queue, see [`log`]). Every server replays the log with
//! [`State::apply`], a pure function, so all replicas reach the same state.
//! Each change names the epoch it expects; a change whose epoch does not
//! match the replica's is ignored by every replica, so the log's total order
//! settles races (compare-and-set) without any consensus of our own.

mod apply;
pub mod log;
pub mod rebalance;
pub mod tool;

use crate::config::{Config, Service};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use apply::Rejected;
pub use log::{Fence, Topology, TopologyError};

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Number of changes applied; 0 before the log was initialised.
    pub epoch: u64,
    /// The cluster file's shape when the log was initialised (flattened
    /// keys); a server whose file differs does not start.
    pub cluster: BTreeMap<String, String>,
    /// Configured ring order: each server monitors the next.
    pub ring: Vec<String>,
    pub servers: BTreeMap<String, ServerState>,
    /// Adaptor → the server hosting it.
    pub adaptors: BTreeMap<String, String>,
    /// Singleton service → the server running it.
    pub singletons: BTreeMap<String, String>,
    /// Server → the server it monitors.
    pub monitors: BTreeMap<String, String>,
    /// Adaptor → the server that still holds its backlog after a move: the
    /// adaptor starts on its new host once that backlog is handed over.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handovers: BTreeMap<String, String>,
    /// Adaptor → its host, which has yet to take in the backlog handed over
    /// to it (drain its handover queue); the adaptor does not move again
    /// before, so that one account's events keep their order.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub receiving: BTreeMap<String, String>,
    /// Schedule → the last slot the scheduler handled.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fired: BTreeMap<String, FiredSlot>,
    /// The timeout checker's checks.
    #[serde(default, skip_serializing_if = "TimeoutChecks::is_empty")]
    pub timeout_checks: TimeoutChecks,
}

/// The timeout checker's checks: how many were recorded, and the one under
/// way, which whoever runs the timeout checker finishes (also after a
/// takeover of the server that started it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutChecks {
    /// Number of the last check recorded (0: none yet).
    pub last: u64,
    /// The check recorded and not finished yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<TimeoutCheck>,
}

impl TimeoutChecks {
    pub fn is_empty(&self) -> bool {
        self.last == 0 && self.pending.is_none()
    }
}

/// One check that found overdue items: exactly these are parked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutCheck {
    pub check: u64,
    /// The timeout checker's host when the check started.
    pub by: String,
    /// When it started, ms since the Unix epoch.
    pub at_ms: u64,
    pub items: Vec<CheckedItem>,
}

/// An overdue item found by a check, and the server that reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckedItem {
    pub server: String,
    #[serde(flatten)]
    pub item: crate::repository::OverdueItem,
}

/// The last slot of a schedule the scheduler handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiredSlot {
    /// Slot time, ms since the Unix epoch.
    pub slot: u64,
    /// The scheduler's host then.
    pub by: String,
    /// Its event was published (false: skipped as a misfire).
    pub published: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    /// provring version of the last join.
    pub version: Option<String>,
    /// Fingerprint of the cluster key the server joined with.
    pub key_fingerprint: Option<String>,
    /// Fingerprints of every key it accepts (see [`Change::Joined`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted_keys: Vec<String>,
    /// Epoch at which the server last joined.
    pub joined_epoch: Option<u64>,
    /// The server announced an intentional stop and has not joined since.
    pub stopping: bool,
    /// The server was taken over and has not joined since.
    pub failed: bool,
    /// The server that took it over (the last time it failed).
    #[serde(default)]
    pub taken_over_by: Option<String>,
    /// The taker has adopted the backlog; until then the server may not
    /// rejoin (its resync would replace the copies being adopted).
    #[serde(default)]
    pub adopted: bool,
    /// What the server may host (`adaptors`, `scheduler`,
    /// `timeout_checker`), from the cluster file; `None`: everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
}

/// One record of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Unique per proposal; the proposer waits to read it back.
    pub id: String,
    /// Node or tool that wrote the record.
    pub proposer: String,
    /// The epoch the change expects; ignored for `sync` and `snapshot`.
    pub expected_epoch: u64,
    /// When the proposer wrote it (ms since the Unix epoch, its clock);
    /// absent in records of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    #[serde(flatten)]
    pub change: Change,
}

/// One change that moved the topology to `epoch`, as `GET
/// /topology?history=N` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub epoch: u64,
    /// When its proposer wrote it, if it said.
    pub at_ms: Option<u64>,
    pub proposer: String,
    #[serde(flatten)]
    pub change: Change,
}

/// A change to the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// The first record: the state derived from the cluster file.
    Init { state: State },
    /// A server started and joined.
    Joined {
        node: String,
        version: String,
        key_fingerprint: Option<String>,
        /// Fingerprints of every key the server accepts (its key and its
        /// previous keys), so that a server about to sign with a new key
        /// can tell whether its peers will verify it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        accepted_keys: Vec<String>,
    },
    /// A server is stopping on purpose; it must not be taken over.
    Stopping { node: String },
    /// `by` takes over the failed server's adaptors, singletons and
    /// monitoring link.
    Takeover { failed: String, by: String },
    /// `by` has adopted the backlog of `failed`, which may now rejoin.
    Adopted { failed: String, by: String },
    /// An operator moves an adaptor or singleton service. An adaptor's
    /// backlog stays with its old host until that host records
    /// [`Change::HandedOver`].
    Move { what: String, to: String },
    /// `from` has put the backlog of `adaptor` on its handover queue and
    /// dropped it: the new host may start the adaptor.
    HandedOver {
        adaptor: String,
        from: String,
        #[serde(default)]
        items: u64,
    },
    /// `by` has taken in the backlog of `adaptor` handed over to it: the
    /// adaptor may move again.
    Received { adaptor: String, by: String },
    /// The scheduler on `by` handled `schedule`'s slots up to `slot`
    /// (published its event if `published`). Accepted only from the
    /// scheduler's host and for a later slot.
    Fired {
        schedule: String,
        slot: u64,
        by: String,
        published: bool,
    },
    /// The timeout checker on `check.by` found overdue items; they are
    /// parked next. Accepted only from the timeout checker's host, with the
    /// next check number, and while no check is under way.
    CheckStarted { check: TimeoutCheck },
    /// The timeout checker on `by` finished check `check`: its items are
    /// parked (or were finished otherwise) and its mail is sent.
    CheckFinished { check: u64, by: String, parked: u64 },
    /// `node` now monitors `monitors`.
    Monitoring { node: String, monitors: String },
    /// The state at its epoch, for checking replicas (and a starting point
    /// if the log's beginning is ever truncated). Changes nothing.
    Snapshot { state: State },
    /// A read barrier: a reader that reads its own `sync` has read every
    /// record written before it. Changes nothing.
    Sync,
    /// `monitor` asks `origin` to re-send its backlog under a new
    /// generation (it found a gap). Changes nothing.
    ResyncRequest { origin: String, monitor: String },
}

/// What a replica did with a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    Ignored(Rejected),
}

/// The timeout checker's name in the topology.
pub const TIMEOUT_CHECKER: &str = "timeout-checker";

/// Services that are singletons, with their names in the topology.
pub const SINGLETONS: [(Service, &str); 2] = [
    (Service::Scheduler, "scheduler"),
    (Service::TimeoutChecker, TIMEOUT_CHECKER),
];

impl State {
    /// The initial state of a cluster file: every adaptor on its configured
    /// server, each singleton on the first eligible server in ring order,
    /// each server monitoring the next one in the ring.
    pub fn initial(config: &Config) -> State {
        let ring: Vec<String> = config.servers.keys().cloned().collect();
        let servers = ring
            .iter()
            .map(|id| {
                let services = config.servers[id]
                    .services
                    .iter()
                    .map(|s| s.as_str().to_owned())
                    .collect();
                let state = ServerState {
                    services: Some(services),
                    ..ServerState::default()
                };
                (id.clone(), state)
            })
            .collect();
        let adaptors = config
            .adaptors
            .iter()
            .map(|(name, a)| (name.clone(), a.server.clone()))
            .collect();
        let mut singletons = BTreeMap::new();
        for (service, name) in SINGLETONS {
            if let Some(host) = ring
                .iter()
                .find(|id| config.servers[*id].services.contains(&service))
            {
                singletons.insert(name.to_owned(), host.clone());
            }
        }
        let mut monitors = BTreeMap::new();
        if ring.len() > 1 {
            for (i, id) in ring.iter().enumerate() {
                monitors.insert(id.clone(), ring[(i + 1) % ring.len()].clone());
            }
        }
        State {
            epoch: 0,
            cluster: cluster_shape(config),
            ring,
            servers,
            adaptors,
            singletons,
            monitors,
            handovers: BTreeMap::new(),
            receiving: BTreeMap::new(),
            fired: BTreeMap::new(),
            timeout_checks: TimeoutChecks::default(),
        }
    }

    /// Whether `server` may host `service` (`adaptors`, `scheduler`,
    /// `timeout_checker`).
    pub fn eligible(&self, server: &str, service: &str) -> bool {
        self.servers.get(server).is_some_and(|s| {
            s.services
                .as_ref()
                .is_none_or(|list| list.iter().any(|x| x == service))
        })
    }

    /// Why `server` hosts nothing, if it does not.
    pub fn hosts_nothing_because(&self, server: &str) -> Option<String> {
        let hosts = self.adaptors.values().chain(self.singletons.values());
        if hosts.into_iter().any(|h| h == server) {
            return None;
        }
        let s = self.servers.get(server)?;
        Some(if s.failed {
            "it was taken over; what it hosted stays where it moved until an operator moves it"
                .into()
        } else if s.services.as_ref().is_some_and(Vec::is_empty) {
            "it is eligible for no service (servers.<id>.services = []); it still monitors its peer"
                .into()
        } else if !self.eligible(server, "adaptors") {
            "it may not host adaptors, and no singleton service is placed on it".into()
        } else if let Some(moved) = self.configured_elsewhere(server) {
            format!(
                "its adaptors moved away ({moved}) and nothing moves back by itself; \
                 `provring move ADAPTOR --to {server}` brings one back"
            )
        } else {
            "no adaptor is configured on it or moved to it".into()
        })
    }

    /// The adaptors the cluster file places on `server` that run elsewhere
    /// now (`hr on b, pw on c`), if any.
    fn configured_elsewhere(&self, server: &str) -> Option<String> {
        let moved: Vec<String> = self
            .cluster
            .iter()
            .filter(|(_, host)| host.as_str() == server)
            .filter_map(|(key, _)| key.strip_prefix("adaptors.")?.strip_suffix(".server"))
            .filter_map(|name| {
                let now = self.adaptors.get(name)?;
                (now != server).then(|| format!("{name} on {now}"))
            })
            .collect();
        (!moved.is_empty()).then(|| moved.join(", "))
    }

    /// The adaptors `node` runs now: those it hosts whose backlog is not
    /// still being handed over to it.
    pub fn adaptors_to_run(&self, node: &str) -> Vec<String> {
        self.adaptors_of(node)
            .into_iter()
            .filter(|a| !self.handovers.contains_key(a))
            .collect()
    }

    /// The server that monitors `node`, if any.
    pub fn monitor_of(&self, node: &str) -> Option<&str> {
        self.monitors
            .iter()
            .find(|(m, monitored)| monitored.as_str() == node && m.as_str() != node)
            .map(|(m, _)| m.as_str())
    }

    /// The servers whose copies `node` holds (the servers it monitors).
    pub fn origins_of(&self, node: &str) -> Vec<String> {
        self.monitors
            .get(node)
            .filter(|m| m.as_str() != node)
            .cloned()
            .into_iter()
            .collect()
    }

    /// Adaptors hosted by `node`.
    pub fn adaptors_of(&self, node: &str) -> Vec<String> {
        self.adaptors
            .iter()
            .filter(|(_, host)| host.as_str() == node)
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn initialised(&self) -> bool {
        self.epoch > 0
    }

    /// Apply one record; the same records in the same order give every
    /// replica the same state.
    pub fn apply(&mut self, record: &Record) -> Outcome {
        match &record.change {
            Change::Sync | Change::ResyncRequest { .. } => return Outcome::Applied,
            Change::Snapshot { state } => {
                if !self.initialised() {
                    *self = state.clone();
                    return Outcome::Applied;
                }
                if state.epoch == self.epoch && state != self {
                    return Outcome::Ignored(Rejected::SnapshotDiffers { epoch: state.epoch });
                }
                return Outcome::Applied;
            }
            _ => {}
        }
        if record.expected_epoch != self.epoch {
            return Outcome::Ignored(Rejected::WrongEpoch {
                expected: record.expected_epoch,
                epoch: self.epoch,
            });
        }
        if let Err(reason) = self.change(&record.change) {
            return Outcome::Ignored(reason);
        }
        self.epoch += 1;
        Outcome::Applied
    }
}

/// The keys of a cluster file that every server must agree on, flattened.
pub fn cluster_shape(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(
        "servers".to_owned(),
        config.servers.keys().cloned().collect::<Vec<_>>().join(","),
    );
    for (id, s) in &config.servers {
        let services: Vec<&str> = s.services.iter().map(|s| s.as_str()).collect();
        out.insert(format!("servers.{id}.services"), services.join(","));
    }
    for (name, a) in &config.adaptors {
        out.insert(format!("adaptors.{name}.kind"), a.kind.as_str().to_owned());
        out.insert(format!("adaptors.{name}.queue"), a.queue.clone());
        out.insert(format!("adaptors.{name}.server"), a.server.clone());
    }
    out
}

/// Keys that differ between the log's cluster shape and this file's:
/// `key: log has "x", this file has "y"`.
pub fn shape_differences(
    log: &BTreeMap<String, String>,
    file: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut keys: Vec<&String> = log.keys().chain(file.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&String>| match v {
        Some(v) => format!("{v:?}"),
        None => "nothing".to_owned(),
    };
    keys.into_iter()
        .filter(|k| log.get(*k) != file.get(*k))
        .map(|k| {
            format!(
                "{k}: the topology log has {}, this file has {}",
                show(log.get(k)),
                show(file.get(k))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expected_epoch: u64, change: Change) -> Record {
        Record {
            id: format!("{:x}", rand::random::<u64>()),
            proposer: "test".into(),
            expected_epoch,
            at_ms: None,
            change,
        }
    }

    fn three() -> State {
        let mut s = State::default();
        let init = State {
            ring: vec!["a".into(), "b".into(), "c".into()],
            servers: ["a", "b", "c"]
                .iter()
                .map(|id| (id.to_string(), ServerState::default()))
                .collect(),
            adaptors: [("hr".to_string(), "a".to_string())].into(),
            singletons: [("scheduler".to_string(), "a".to_string())].into(),
            monitors: [("a", "b"), ("b", "c"), ("c", "a")]
                .iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect(),
            ..State::default()
        };
        assert_eq!(
            s.apply(&record(0, Change::Init { state: init })),
            Outcome::Applied
        );
        s
    }

    fn apply(s: &mut State, change: Change) -> Outcome {
        let epoch = s.epoch;
        s.apply(&record(epoch, change))
    }

    fn mv(what: &str, to: &str) -> Change {
        Change::Move {
            what: what.into(),
            to: to.into(),
        }
    }

    fn handed_over(adaptor: &str, from: &str) -> Change {
        Change::HandedOver {
            adaptor: adaptor.into(),
            from: from.into(),
            items: 0,
        }
    }

    #[test]
    fn a_server_back_after_a_takeover_is_told_where_its_adaptors_went() {
        let mut s = three();
        s.cluster.insert("adaptors.hr.server".into(), "a".into());
        // (Without a host, the timeout checker would go to the next server
        // that joins.)
        s.singletons.insert(TIMEOUT_CHECKER.into(), "b".into());
        assert_eq!(s.hosts_nothing_because("a"), None);
        apply(
            &mut s,
            Change::Takeover {
                failed: "a".into(),
                by: "c".into(),
            },
        );
        let why = s.hosts_nothing_because("a").expect("a hosts nothing");
        assert!(why.contains("taken over"), "{why}");
        apply(
            &mut s,
            Change::Adopted {
                failed: "a".into(),
                by: "c".into(),
            },
        );
        apply(
            &mut s,
            Change::Joined {
                node: "a".into(),
                version: "test".into(),
                key_fingerprint: None,
                accepted_keys: vec![],
            },
        );
        let why = s.hosts_nothing_because("a").expect("a hosts nothing");
        assert!(why.contains("hr on c"), "{why}");
        assert!(why.contains("provring move ADAPTOR --to a"), "{why}");
        s.singletons.remove(TIMEOUT_CHECKER);
        assert_eq!(
            s.hosts_nothing_because("b").as_deref(),
            Some("no adaptor is configured on it or moved to it")
        );
    }

    #[test]
    fn a_moved_adaptor_runs_on_its_new_host_once_its_backlog_is_handed_over() {
        let mut s = three();
        assert_eq!(apply(&mut s, mv("hr", "b")), Outcome::Applied);
        assert_eq!(s.adaptors["hr"], "b");
        assert_eq!(s.handovers["hr"], "a");
        assert!(s.adaptors_to_run("b").is_empty());
        assert!(s.adaptors_to_run("a").is_empty());
        // No second move while the backlog is in transit; only the old
        // host's handover counts.
        assert!(matches!(
            apply(&mut s, mv("hr", "c")),
            Outcome::Ignored(Rejected::StillHandedOver { .. })
        ));
        assert!(matches!(
            apply(&mut s, handed_over("hr", "c")),
            Outcome::Ignored(_)
        ));
        assert_eq!(apply(&mut s, handed_over("hr", "a")), Outcome::Applied);
        assert_eq!(s.adaptors_to_run("b"), vec!["hr".to_string()]);
        assert!(
            matches!(apply(&mut s, mv("hr", "b")), Outcome::Ignored(Rejected::AlreadyOn { server, .. }) if server == "b")
        );
        assert!(matches!(
            apply(&mut s, mv("nope", "b")),
            Outcome::Ignored(_)
        ));
        assert!(matches!(apply(&mut s, mv("hr", "z")), Outcome::Ignored(_)));
        assert_eq!(apply(&mut s, mv("scheduler", "c")), Outcome::Applied);
        assert_eq!(s.singletons["scheduler"], "c");
    }

    #[test]
    fn the_taker_of_a_failed_old_host_hands_its_backlog_over() {
        let mut s = three();
        apply(&mut s, mv("hr", "c"));
        let takeover = Change::Takeover {
            failed: "a".into(),
            by: "b".into(),
        };
        assert_eq!(apply(&mut s, takeover), Outcome::Applied);
        assert_eq!(s.adaptors["hr"], "c");
        assert_eq!(s.handovers["hr"], "b");
        // If the taker is the new host, nothing is left to hand over.
        let mut s = three();
        apply(&mut s, mv("hr", "c"));
        let takeover = Change::Takeover {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(apply(&mut s, takeover), Outcome::Applied);
        assert!(s.handovers.is_empty());
        assert_eq!(s.adaptors_to_run("c"), vec!["hr".to_string()]);
        // Nothing moves to a server that was taken over.
        assert!(matches!(apply(&mut s, mv("hr", "a")), Outcome::Ignored(_)));
    }

    fn limit(s: &mut State, server: &str, services: &[&str]) {
        s.servers.get_mut(server).expect("server").services =
            Some(services.iter().map(|x| x.to_string()).collect());
    }

    #[test]
    fn timeout_checks_come_one_at_a_time_from_the_checkers_host_and_survive_a_takeover() {
        let mut s = three();
        s.singletons.insert(TIMEOUT_CHECKER.into(), "a".into());
        let start = |n: u64, by: &str| Change::CheckStarted {
            check: TimeoutCheck {
                check: n,
                by: by.into(),
                at_ms: 0,
                items: vec![CheckedItem {
                    server: "a".into(),
                    item: crate::repository::OverdueItem {
                        adaptor: "hr".into(),
                        source: "/s".into(),
                        id: "1".into(),
                        received_ms: 0,
                        deadline_ms: 1,
                        by_event: false,
                    },
                }],
            },
        };
        let finish = |n: u64, by: &str| Change::CheckFinished {
            check: n,
            by: by.into(),
            parked: 1,
        };
        assert!(matches!(
            apply(&mut s, start(1, "b")),
            Outcome::Ignored(Rejected::DoesNotRun { .. })
        ));
        assert!(matches!(
            apply(&mut s, start(2, "a")),
            Outcome::Ignored(Rejected::CheckNotNext { .. })
        ));
        assert_eq!(apply(&mut s, start(1, "a")), Outcome::Applied);
        assert!(matches!(
            apply(&mut s, start(2, "a")),
            Outcome::Ignored(Rejected::CheckUnderWay(_))
        ));
        // a fails mid-check: c takes the timeout checker and the check over.
        let takeover = Change::Takeover {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(apply(&mut s, takeover), Outcome::Applied);
        assert_eq!(s.singletons[TIMEOUT_CHECKER], "c");
        assert_eq!(s.timeout_checks.pending.as_ref().map(|p| p.check), Some(1));
        assert!(matches!(
            apply(&mut s, finish(1, "a")),
            Outcome::Ignored(Rejected::DoesNotRun { .. })
        ));
        assert_eq!(apply(&mut s, finish(1, "c")), Outcome::Applied);
        assert!(matches!(
            apply(&mut s, finish(1, "c")),
            Outcome::Ignored(Rejected::CheckNotUnderWay(_))
        ));
        assert_eq!(apply(&mut s, start(2, "c")), Outcome::Applied);
        assert_eq!(s.timeout_checks.last, 2);
    }

    #[test]
    fn an_adaptor_moves_again_only_once_its_new_host_took_the_backlog_in() {
        let mut s = three();
        assert_eq!(apply(&mut s, mv("hr", "b")), Outcome::Applied);
        let handed = Change::HandedOver {
            adaptor: "hr".into(),
            from: "a".into(),
            items: 10,
        };
        assert_eq!(apply(&mut s, handed), Outcome::Applied);
        assert_eq!(s.receiving["hr"], "b");
        assert!(matches!(
            apply(&mut s, mv("hr", "c")),
            Outcome::Ignored(Rejected::StillTakenIn { .. })
        ));
        let received = |by: &str| Change::Received {
            adaptor: "hr".into(),
            by: by.into(),
        };
        assert!(matches!(apply(&mut s, received("c")), Outcome::Ignored(_)));
        // b fails before it took the backlog in: its taker does.
        let mut t = s.clone();
        let takeover = Change::Takeover {
            failed: "b".into(),
            by: "a".into(),
        };
        assert_eq!(apply(&mut t, takeover), Outcome::Applied);
        assert_eq!(t.receiving["hr"], "a");
        assert_eq!(apply(&mut s, received("b")), Outcome::Applied);
        assert!(s.receiving.is_empty());
        assert_eq!(apply(&mut s, mv("hr", "c")), Outcome::Applied);
        // Nothing handed over: nothing to take in.
        assert_eq!(apply(&mut s, handed_over("hr", "b")), Outcome::Applied);
        assert!(s.receiving.is_empty());
    }

    #[test]
    fn takeover_and_move_respect_eligibility() {
        // c monitors a but may host nothing; b may host everything.
        let mut s = three();
        limit(&mut s, "c", &[]);
        let takeover = Change::Takeover {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(apply(&mut s, takeover), Outcome::Applied);
        assert_eq!(s.adaptors["hr"], "b");
        assert_eq!(s.singletons["scheduler"], "b");
        // c adopts a's copies, so it hands hr's backlog over to b.
        assert_eq!(s.handovers["hr"], "c");
        assert_eq!(s.monitors["c"], "b");
        assert!(
            s.hosts_nothing_because("c")
                .is_some_and(|r| r.contains("eligible for no service"))
        );
        assert!(matches!(
            apply(&mut s, mv("hr", "c")),
            Outcome::Ignored(Rejected::MayNotHostAdaptors { .. })
        ));
        assert!(
            matches!(apply(&mut s, mv("scheduler", "c")), Outcome::Ignored(Rejected::MayNotHostSingleton { singleton, .. }) if singleton == "scheduler")
        );
    }

    #[test]
    fn a_singleton_no_server_may_take_waits_for_one_to_join() {
        let mut s = three();
        limit(&mut s, "b", &["adaptors"]);
        limit(&mut s, "c", &["adaptors"]);
        let takeover = Change::Takeover {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(apply(&mut s, takeover), Outcome::Applied);
        assert_eq!(s.adaptors["hr"], "c");
        assert!(s.handovers.is_empty());
        assert!(!s.singletons.contains_key("scheduler"));
        assert_eq!(
            apply(
                &mut s,
                Change::Adopted {
                    failed: "a".into(),
                    by: "c".into()
                }
            ),
            Outcome::Applied
        );
        let joined = Change::Joined {
            node: "a".into(),
            version: "test".into(),
            key_fingerprint: None,
            accepted_keys: Vec::new(),
        };
        assert_eq!(apply(&mut s, joined), Outcome::Applied);
        assert_eq!(s.singletons["scheduler"], "a");
    }

    #[test]
    fn a_change_for_another_epoch_is_ignored() {
        let mut s = three();
        let first = record(
            1,
            Change::Monitoring {
                node: "a".into(),
                monitors: "c".into(),
            },
        );
        let second = record(
            1,
            Change::Monitoring {
                node: "b".into(),
                monitors: "a".into(),
            },
        );
        assert_eq!(s.apply(&first), Outcome::Applied);
        assert!(matches!(s.apply(&second), Outcome::Ignored(_)));
        assert_eq!(s.epoch, 2);
        assert_eq!(s.monitor_of("c"), Some("a"));
    }

    #[test]
    fn takeover_moves_work_and_closes_the_ring() {
        let mut s = three();
        let t = record(
            1,
            Change::Takeover {
                failed: "a".into(),
                by: "c".into(),
            },
        );
        assert_eq!(s.apply(&t), Outcome::Applied);
        assert_eq!(s.adaptors["hr"], "c");
        assert_eq!(s.singletons["scheduler"], "c");
        assert_eq!(s.monitors.get("c").map(String::as_str), Some("b"));
        assert_eq!(s.monitor_of("a"), None);
        assert!(s.servers["a"].failed);
        // A second takeover of the same server loses.
        let again = record(
            2,
            Change::Takeover {
                failed: "a".into(),
                by: "b".into(),
            },
        );
        assert!(matches!(s.apply(&again), Outcome::Ignored(_)));
    }

    #[test]
    fn a_taken_over_server_rejoins_only_after_its_backlog_is_adopted() {
        let mut s = three();
        let take = Change::Takeover {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(s.apply(&record(1, take)), Outcome::Applied);
        let join = || Change::Joined {
            node: "a".into(),
            version: "1".into(),
            key_fingerprint: None,
            accepted_keys: Vec::new(),
        };
        assert!(matches!(s.apply(&record(2, join())), Outcome::Ignored(_)));
        let adopted = Change::Adopted {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(s.apply(&record(2, adopted)), Outcome::Applied);
        assert_eq!(s.apply(&record(3, join())), Outcome::Applied);
        assert!(!s.servers["a"].failed);
        assert_eq!(s.monitors.len(), 3, "ring restored: {:?}", s.monitors);
    }

    #[test]
    fn nothing_applies_before_init_and_init_applies_once() {
        let mut s = State::default();
        let j = record(
            0,
            Change::Joined {
                node: "a".into(),
                version: "1".into(),
                key_fingerprint: None,
                accepted_keys: Vec::new(),
            },
        );
        assert!(matches!(s.apply(&j), Outcome::Ignored(_)));
        let mut s = three();
        let again = record(
            1,
            Change::Init {
                state: State::default(),
            },
        );
        assert!(matches!(s.apply(&again), Outcome::Ignored(_)));
    }

    #[test]
    fn a_snapshot_starts_an_empty_replica_and_checks_a_running_one() {
        let s = three();
        let snap = record(0, Change::Snapshot { state: s.clone() });
        let mut fresh = State::default();
        assert_eq!(fresh.apply(&snap), Outcome::Applied);
        assert_eq!(fresh, s);
        let mut other = s.clone();
        other.adaptors.insert("hr".into(), "b".into());
        assert!(matches!(other.apply(&snap), Outcome::Ignored(_)));
    }

    #[test]
    fn refusals_read_as_their_reasons_always_did() {
        let s = |x: &str| x.to_owned();
        let cases = [
            (
                Rejected::StillHandedOver {
                    adaptor: s("hr"),
                    from: s("a"),
                },
                "the backlog of hr is still being handed over from a",
            ),
            (
                Rejected::AlreadyOn {
                    what: s("hr"),
                    server: s("b"),
                },
                "hr is already on b",
            ),
            (
                Rejected::DoesNotRun {
                    server: s("b"),
                    service: "timeout checker",
                },
                "b does not run the timeout checker",
            ),
            (
                Rejected::CheckNotNext { check: 2, next: 1 },
                "timeout check 2 is not the next one, 1",
            ),
            (
                Rejected::CheckUnderWay(1),
                "timeout check 1 is still under way",
            ),
            (
                Rejected::CheckNotUnderWay(1),
                "timeout check 1 is not under way",
            ),
            (
                Rejected::StillTakenIn {
                    adaptor: s("hr"),
                    by: s("b"),
                },
                "the backlog of hr handed over to b is still being taken in",
            ),
            (
                Rejected::MayNotHostAdaptors { server: s("c") },
                r#"c may not host adaptors (servers.c.services has no "adaptors")"#,
            ),
            (
                Rejected::MayNotHostSingleton {
                    server: s("c"),
                    singleton: s("scheduler"),
                    service: "scheduler",
                },
                r#"c may not host scheduler (servers.c.services has no "scheduler")"#,
            ),
            (
                Rejected::WrongEpoch {
                    expected: 1,
                    epoch: 2,
                },
                "expected epoch 1, the log is at epoch 2",
            ),
            (Rejected::UnknownServer(s("z")), r#"unknown server "z""#),
            (
                Rejected::NotAdoptedYet {
                    node: s("a"),
                    taker: s("c"),
                },
                "a was taken over by c, which has not finished adopting its backlog",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
            let json = serde_json::to_value(Outcome::Ignored(reason)).expect("serialise");
            assert_eq!(json["reason"], text);
        }
    }

    #[test]
    fn differences_name_the_keys() {
        let log: BTreeMap<String, String> = [("adaptors.hr.server".into(), "a".into())].into();
        let file: BTreeMap<String, String> = [("adaptors.hr.server".into(), "b".into())].into();
        let d = shape_differences(&log, &file);
        assert_eq!(
            d,
            vec![r#"adaptors.hr.server: the topology log has "a", this file has "b""#.to_string()]
        );
    }
}
