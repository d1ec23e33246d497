//! The topology: who hosts which adaptor and singleton service, who monitors
//! whom, who stopped on purpose.
//!
//! Every change is a record in an ordered log on the broker (a RabbitMQ
//! stream queue, see [`log`]). Every server replays the log with
//! [`State::apply`], a pure function, so all replicas reach the same state.
//! Each change names the epoch it expects; a change whose epoch does not
//! match the replica's is ignored by every replica, so the log's total order
//! settles races (compare-and-set) without any consensus of our own.

pub mod log;
pub mod tool;

use crate::config::{Config, Service};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    Ignored(String),
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
        } else {
            "no adaptor is configured on it or moved to it".into()
        })
    }

    /// The service name (for eligibility) of a singleton's topology name.
    fn singleton_service(name: &str) -> Option<&'static str> {
        SINGLETONS
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(service, _)| service.as_str())
    }

    /// Who takes `service` over from `failed`: `by` if it may host it, else
    /// the next server after `by` in ring order that is up and may.
    fn successor(&self, failed: &str, by: &str, service: &str) -> Option<String> {
        let n = self.ring.len();
        let start = self.ring.iter().position(|x| x == by).unwrap_or(0);
        (0..n)
            .map(|i| &self.ring[(start + i) % n])
            .find(|id| {
                id.as_str() != failed
                    && !self.servers.get(*id).is_some_and(|s| s.failed)
                    && self.eligible(id, service)
            })
            .cloned()
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
                    return Outcome::Ignored(format!(
                        "snapshot of epoch {} differs from this replica's state",
                        state.epoch
                    ));
                }
                return Outcome::Applied;
            }
            _ => {}
        }
        if record.expected_epoch != self.epoch {
            return Outcome::Ignored(format!(
                "expected epoch {}, the log is at epoch {}",
                record.expected_epoch, self.epoch
            ));
        }
        if let Err(reason) = self.change(&record.change) {
            return Outcome::Ignored(reason);
        }
        self.epoch += 1;
        Outcome::Applied
    }

    /// Each server that has not failed monitors the next one in ring order
    /// that has not failed.
    fn restore_ring(&mut self) {
        let live: Vec<String> = self
            .ring
            .iter()
            .filter(|id| !self.servers.get(*id).is_some_and(|s| s.failed))
            .cloned()
            .collect();
        self.monitors.clear();
        if live.len() > 1 {
            for (i, id) in live.iter().enumerate() {
                self.monitors
                    .insert(id.clone(), live[(i + 1) % live.len()].clone());
            }
        }
    }

    fn known(&self, node: &str) -> Result<(), String> {
        if self.servers.contains_key(node) {
            Ok(())
        } else {
            Err(format!("unknown server {node:?}"))
        }
    }

    fn change(&mut self, change: &Change) -> Result<(), String> {
        if !self.initialised() && !matches!(change, Change::Init { .. }) {
            return Err("the log has not been initialised".into());
        }
        match change {
            Change::Init { state } => {
                if self.initialised() {
                    return Err("the log is already initialised".into());
                }
                *self = State {
                    epoch: 0,
                    ..state.clone()
                };
            }
            Change::Joined {
                node,
                version,
                key_fingerprint,
                accepted_keys,
            } => {
                self.known(node)?;
                if let Some(s) = self.servers.get(node)
                    && s.failed
                    && !s.adopted
                    && let Some(taker) = &s.taken_over_by
                    && !self.servers.get(taker).is_some_and(|t| t.failed)
                {
                    return Err(format!(
                        "{node} was taken over by {taker}, which has not finished adopting its backlog"
                    ));
                }
                let epoch = self.epoch;
                let s = self.servers.entry(node.clone()).or_default();
                s.version = Some(version.clone());
                s.key_fingerprint = key_fingerprint.clone();
                s.accepted_keys = accepted_keys.clone();
                s.joined_epoch = Some(epoch);
                s.stopping = false;
                let returned = s.failed;
                s.failed = false;
                // A singleton that no server could take waits for this one.
                for (service, name) in SINGLETONS {
                    if !self.singletons.contains_key(name) && self.eligible(node, service.as_str())
                    {
                        self.singletons.insert(name.to_owned(), node.clone());
                    }
                }
                if returned {
                    // Back from a takeover: the monitoring links return to
                    // the configured ring (adaptors stay where they are).
                    self.restore_ring();
                }
            }
            Change::Stopping { node } => {
                self.known(node)?;
                self.servers.entry(node.clone()).or_default().stopping = true;
            }
            Change::Takeover { failed, by } => {
                self.known(failed)?;
                self.known(by)?;
                if failed == by {
                    return Err("a server cannot take itself over".into());
                }
                if self.servers[by.as_str()].failed {
                    return Err(format!("{by} has itself been taken over"));
                }
                if self.servers[failed.as_str()].failed {
                    return Err(format!("{failed} has already been taken over"));
                }
                // The taker adopts the failed server's copies, so it hands
                // over what the failed server had not.
                for from in self.handovers.values_mut() {
                    if from == failed {
                        *from = by.clone();
                    }
                }
                // Adaptors go to the taker if it may host adaptors, else to
                // the next eligible server, to which the taker hands their
                // adopted backlog over (none eligible: the taker, so that
                // nothing waits for an operator).
                let adaptor_host = self
                    .successor(failed, by, "adaptors")
                    .unwrap_or_else(|| by.clone());
                let moved: Vec<String> = self
                    .adaptors
                    .iter()
                    .filter(|(_, h)| *h == failed)
                    .map(|(a, _)| a.clone())
                    .collect();
                for a in moved {
                    if &adaptor_host != by && !self.handovers.contains_key(&a) {
                        self.handovers.insert(a.clone(), by.clone());
                    }
                    self.adaptors.insert(a, adaptor_host.clone());
                }
                // Each singleton to the next eligible server; with none, it
                // waits for one to join.
                let singletons: Vec<String> = self
                    .singletons
                    .iter()
                    .filter(|(_, h)| *h == failed)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in singletons {
                    let next = Self::singleton_service(&name)
                        .and_then(|service| self.successor(failed, by, service));
                    match next {
                        Some(host) => self.singletons.insert(name, host),
                        None => self.singletons.remove(&name),
                    };
                }
                // The new host of an adaptor drains what was handed to the
                // failed server.
                for (a, host) in self.receiving.iter_mut() {
                    if host == failed
                        && let Some(now) = self.adaptors.get(a)
                    {
                        *host = now.clone();
                    }
                }
                // What a server now hosts itself needs no handover.
                let adaptors = &self.adaptors;
                self.handovers
                    .retain(|a, from| adaptors.get(a) != Some(&*from));
                // Close the ring: the taker monitors what the failed server did.
                if let Some(next) = self.monitors.remove(failed.as_str()) {
                    if &next == by {
                        self.monitors.remove(by.as_str());
                    } else {
                        self.monitors.insert(by.clone(), next);
                    }
                }
                let s = self.servers.entry(failed.clone()).or_default();
                s.failed = true;
                s.adopted = false;
                s.taken_over_by = Some(by.clone());
            }
            Change::Adopted { failed, by } => {
                let s = self
                    .servers
                    .get_mut(failed)
                    .ok_or_else(|| format!("unknown server {failed:?}"))?;
                if !s.failed || s.taken_over_by.as_ref() != Some(by) || s.adopted {
                    return Err(format!("no adoption of {failed} by {by} is pending"));
                }
                s.adopted = true;
            }
            Change::Move { what, to } => {
                self.known(to)?;
                if self.servers.get(to).is_some_and(|s| s.failed) {
                    return Err(format!("{to} was taken over and has not joined again"));
                }
                if let Some(host) = self.adaptors.get(what).cloned() {
                    if !self.eligible(to, "adaptors") {
                        return Err(format!(
                            "{to} may not host adaptors (servers.{to}.services has no \"adaptors\")"
                        ));
                    }
                    if &host == to {
                        return Err(format!("{what} is already on {to}"));
                    }
                    if let Some(from) = self.handovers.get(what) {
                        return Err(format!(
                            "the backlog of {what} is still being handed over from {from}"
                        ));
                    }
                    if let Some(by) = self.receiving.get(what) {
                        return Err(format!(
                            "the backlog of {what} handed over to {by} is still being taken in"
                        ));
                    }
                    if !self.servers.get(&host).is_some_and(|s| s.failed) {
                        self.handovers.insert(what.clone(), host);
                    }
                    self.adaptors.insert(what.clone(), to.clone());
                } else if let Some(service) = Self::singleton_service(what) {
                    // Also places a singleton no server could take.
                    if !self.eligible(to, service) {
                        return Err(format!(
                            "{to} may not host {what} (servers.{to}.services has no {service:?})"
                        ));
                    }
                    if self.singletons.get(what) == Some(to) {
                        return Err(format!("{what} is already on {to}"));
                    }
                    self.singletons.insert(what.clone(), to.clone());
                } else {
                    return Err(format!("no adaptor or singleton named {what:?}"));
                }
            }
            Change::Fired {
                schedule,
                slot,
                by,
                published,
            } => {
                if self.singletons.get("scheduler") != Some(by) {
                    return Err(format!("{by} does not run the scheduler"));
                }
                if let Some(f) = self.fired.get(schedule)
                    && f.slot >= *slot
                {
                    return Err(format!(
                        "{schedule}: slot {slot} is not after the last one handled, {}",
                        f.slot
                    ));
                }
                self.fired.insert(
                    schedule.clone(),
                    FiredSlot {
                        slot: *slot,
                        by: by.clone(),
                        published: *published,
                    },
                );
            }
            Change::CheckStarted { check } => {
                if self.singletons.get(TIMEOUT_CHECKER) != Some(&check.by) {
                    return Err(format!("{} does not run the timeout checker", check.by));
                }
                if let Some(p) = &self.timeout_checks.pending {
                    return Err(format!("timeout check {} is still under way", p.check));
                }
                if check.check != self.timeout_checks.last + 1 {
                    return Err(format!(
                        "timeout check {} is not the next one, {}",
                        check.check,
                        self.timeout_checks.last + 1
                    ));
                }
                if check.items.is_empty() {
                    return Err("a timeout check without items".into());
                }
                self.timeout_checks.last = check.check;
                self.timeout_checks.pending = Some(check.clone());
            }
            Change::CheckFinished { check, by, .. } => {
                if self.singletons.get(TIMEOUT_CHECKER) != Some(by) {
                    return Err(format!("{by} does not run the timeout checker"));
                }
                if self.timeout_checks.pending.as_ref().map(|p| p.check) != Some(*check) {
                    return Err(format!("timeout check {check} is not under way"));
                }
                self.timeout_checks.pending = None;
            }
            Change::HandedOver {
                adaptor,
                from,
                items,
            } => {
                if self.handovers.get(adaptor) != Some(from) {
                    return Err(format!("no handover of {adaptor} from {from} is pending"));
                }
                self.handovers.remove(adaptor);
                if *items > 0
                    && let Some(host) = self.adaptors.get(adaptor)
                {
                    self.receiving.insert(adaptor.clone(), host.clone());
                }
            }
            Change::Received { adaptor, by } => {
                if self.receiving.get(adaptor) != Some(by) {
                    return Err(format!("{by} has no backlog of {adaptor} to take in"));
                }
                self.receiving.remove(adaptor);
            }
            Change::Monitoring { node, monitors } => {
                self.known(node)?;
                self.known(monitors)?;
                if node == monitors {
                    return Err(format!("{node} cannot monitor itself"));
                }
                // One monitor per server: whoever monitored `monitors` stops.
                self.monitors.retain(|_, m| m != monitors);
                self.monitors.insert(node.clone(), monitors.clone());
            }
            Change::Snapshot { .. } | Change::Sync | Change::ResyncRequest { .. } => {}
        }
        Ok(())
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
    fn a_moved_adaptor_runs_on_its_new_host_once_its_backlog_is_handed_over() {
        let mut s = three();
        assert_eq!(apply(&mut s, mv("hr", "b")), Outcome::Applied);
        assert_eq!(s.adaptors["hr"], "b");
        assert_eq!(s.handovers["hr"], "a");
        assert!(s.adaptors_to_run("b").is_empty());
        assert!(s.adaptors_to_run("a").is_empty());
        // No second move while the backlog is in transit; only the old
        // host's handover counts.
        assert!(
            matches!(apply(&mut s, mv("hr", "c")), Outcome::Ignored(r) if r.contains("still being handed over"))
        );
        assert!(matches!(
            apply(&mut s, handed_over("hr", "c")),
            Outcome::Ignored(_)
        ));
        assert_eq!(apply(&mut s, handed_over("hr", "a")), Outcome::Applied);
        assert_eq!(s.adaptors_to_run("b"), vec!["hr".to_string()]);
        assert!(
            matches!(apply(&mut s, mv("hr", "b")), Outcome::Ignored(r) if r.contains("already on b"))
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
        assert!(
            matches!(apply(&mut s, start(1, "b")), Outcome::Ignored(r) if r.contains("does not run"))
        );
        assert!(
            matches!(apply(&mut s, start(2, "a")), Outcome::Ignored(r) if r.contains("not the next one"))
        );
        assert_eq!(apply(&mut s, start(1, "a")), Outcome::Applied);
        assert!(
            matches!(apply(&mut s, start(2, "a")), Outcome::Ignored(r) if r.contains("still under way"))
        );
        // a fails mid-check: c takes the timeout checker and the check over.
        let takeover = Change::Takeover {
            failed: "a".into(),
            by: "c".into(),
        };
        assert_eq!(apply(&mut s, takeover), Outcome::Applied);
        assert_eq!(s.singletons[TIMEOUT_CHECKER], "c");
        assert_eq!(s.timeout_checks.pending.as_ref().map(|p| p.check), Some(1));
        assert!(
            matches!(apply(&mut s, finish(1, "a")), Outcome::Ignored(r) if r.contains("does not run"))
        );
        assert_eq!(apply(&mut s, finish(1, "c")), Outcome::Applied);
        assert!(
            matches!(apply(&mut s, finish(1, "c")), Outcome::Ignored(r) if r.contains("not under way"))
        );
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
        assert!(
            matches!(apply(&mut s, mv("hr", "c")), Outcome::Ignored(r) if r.contains("still being taken in"))
        );
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
        assert!(
            matches!(apply(&mut s, mv("hr", "c")), Outcome::Ignored(r) if r.contains("may not host adaptors"))
        );
        assert!(
            matches!(apply(&mut s, mv("scheduler", "c")), Outcome::Ignored(r) if r.contains("may not host scheduler"))
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
