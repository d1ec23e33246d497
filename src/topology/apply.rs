//! The rules of the topology: what each [`Change`] does to the [`State`],
//! and why a replica refuses it ([`Rejected`]).
//!
//! One method per change kind, each pure: it reads the state, checks the
//! change against it and either changes the state or names the reason it
//! refuses. A refused change changes nothing, so every replica that reads
//! the same records in the same order refuses the same ones.

use super::{Change, FiredSlot, SINGLETONS, State, TIMEOUT_CHECKER, TimeoutCheck};

/// Why a replica refused a change. Its text is what a proposer logs, and
/// what `provring move` prints after `not moved:` and `provring topology
/// link` after `not applied:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("snapshot of epoch {epoch} differs from this replica's state")]
    SnapshotDiffers { epoch: u64 },
    #[error("expected epoch {expected}, the log is at epoch {epoch}")]
    WrongEpoch { expected: u64, epoch: u64 },
    #[error("the log has not been initialised")]
    NotInitialised,
    #[error("the log is already initialised")]
    AlreadyInitialised,
    #[error("unknown server {0:?}")]
    UnknownServer(String),
    /// A server may not rejoin while its taker adopts its backlog: its
    /// resync would replace the copies being adopted.
    #[error("{node} was taken over by {taker}, which has not finished adopting its backlog")]
    NotAdoptedYet { node: String, taker: String },
    #[error("a server cannot take itself over")]
    TakesItselfOver,
    #[error("{0} has itself been taken over")]
    TakerTakenOver(String),
    #[error("{0} has already been taken over")]
    AlreadyTakenOver(String),
    #[error("no adoption of {failed} by {by} is pending")]
    NoAdoptionPending { failed: String, by: String },
    #[error("{0} was taken over and has not joined again")]
    MoveToTakenOver(String),
    #[error("{server} may not host adaptors (servers.{server}.services has no \"adaptors\")")]
    MayNotHostAdaptors { server: String },
    #[error("{server} may not host {singleton} (servers.{server}.services has no {service:?})")]
    MayNotHostSingleton {
        server: String,
        singleton: String,
        service: &'static str,
    },
    #[error("{what} is already on {server}")]
    AlreadyOn { what: String, server: String },
    #[error("the backlog of {adaptor} is still being handed over from {from}")]
    StillHandedOver { adaptor: String, from: String },
    #[error("the backlog of {adaptor} handed over to {by} is still being taken in")]
    StillTakenIn { adaptor: String, by: String },
    #[error("no adaptor or singleton named {0:?}")]
    UnknownName(String),
    /// `service` as a person names it: `scheduler`, `timeout checker`.
    #[error("{server} does not run the {service}")]
    DoesNotRun {
        server: String,
        service: &'static str,
    },
    #[error("{schedule}: slot {slot} is not after the last one handled, {last}")]
    SlotNotAfter {
        schedule: String,
        slot: u64,
        last: u64,
    },
    #[error("timeout check {0} is still under way")]
    CheckUnderWay(u64),
    #[error("timeout check {check} is not the next one, {next}")]
    CheckNotNext { check: u64, next: u64 },
    #[error("a timeout check without items")]
    CheckWithoutItems,
    #[error("timeout check {0} is not under way")]
    CheckNotUnderWay(u64),
    #[error("no handover of {adaptor} from {from} is pending")]
    NoHandoverPending { adaptor: String, from: String },
    #[error("{by} has no backlog of {adaptor} to take in")]
    NothingToTakeIn { adaptor: String, by: String },
    #[error("{0} cannot monitor itself")]
    MonitorsItself(String),
}

/// As its text, as when the reason was a string.
impl serde::Serialize for Rejected {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl State {
    /// Apply `change` to an initialised state (or initialise it), or say
    /// why not; the epoch is left to [`State::apply`].
    pub(super) fn change(&mut self, change: &Change) -> Result<(), Rejected> {
        if !self.initialised() && !matches!(change, Change::Init { .. }) {
            return Err(Rejected::NotInitialised);
        }
        match change {
            Change::Init { state } => self.initialise(state),
            Change::Joined {
                node,
                version,
                key_fingerprint,
                accepted_keys,
            } => self.joined(node, version, key_fingerprint, accepted_keys),
            Change::Stopping { node } => self.stopping(node),
            Change::Takeover { failed, by } => self.taken_over(failed, by),
            Change::Adopted { failed, by } => self.adopted(failed, by),
            Change::Move { what, to } => self.moved(what, to),
            Change::Fired {
                schedule,
                slot,
                by,
                published,
            } => self.fired(schedule, *slot, by, *published),
            Change::CheckStarted { check } => self.check_started(check),
            Change::CheckFinished { check, by, .. } => self.check_finished(*check, by),
            Change::HandedOver {
                adaptor,
                from,
                items,
            } => self.handed_over(adaptor, from, *items),
            Change::Received { adaptor, by } => self.received(adaptor, by),
            Change::Monitoring { node, monitors } => self.monitoring(node, monitors),
            Change::Snapshot { .. } | Change::Sync | Change::ResyncRequest { .. } => Ok(()),
        }
    }

    fn initialise(&mut self, state: &State) -> Result<(), Rejected> {
        if self.initialised() {
            return Err(Rejected::AlreadyInitialised);
        }
        *self = State {
            epoch: 0,
            ..state.clone()
        };
        Ok(())
    }

    fn joined(
        &mut self,
        node: &str,
        version: &str,
        key_fingerprint: &Option<String>,
        accepted_keys: &[String],
    ) -> Result<(), Rejected> {
        self.known(node)?;
        if let Some(s) = self.servers.get(node)
            && s.failed
            && !s.adopted
            && let Some(taker) = &s.taken_over_by
            && !self.servers.get(taker).is_some_and(|t| t.failed)
        {
            return Err(Rejected::NotAdoptedYet {
                node: node.to_owned(),
                taker: taker.clone(),
            });
        }
        let epoch = self.epoch;
        let s = self.servers.entry(node.to_owned()).or_default();
        s.version = Some(version.to_owned());
        s.key_fingerprint = key_fingerprint.clone();
        s.accepted_keys = accepted_keys.to_vec();
        s.joined_epoch = Some(epoch);
        s.stopping = false;
        let returned = s.failed;
        s.failed = false;
        // A singleton that no server could take waits for this one.
        for (service, name) in SINGLETONS {
            if !self.singletons.contains_key(name) && self.eligible(node, service.as_str()) {
                self.singletons.insert(name.to_owned(), node.to_owned());
            }
        }
        if returned {
            // Back from a takeover: the monitoring links return to the
            // configured ring (adaptors stay where they are).
            self.restore_ring();
        }
        Ok(())
    }

    fn stopping(&mut self, node: &str) -> Result<(), Rejected> {
        self.known(node)?;
        self.servers.entry(node.to_owned()).or_default().stopping = true;
        Ok(())
    }

    /// `by` takes over the adaptors, singletons, handovers and monitoring
    /// link of `failed`.
    fn taken_over(&mut self, failed: &str, by: &str) -> Result<(), Rejected> {
        self.known(failed)?;
        self.known(by)?;
        if failed == by {
            return Err(Rejected::TakesItselfOver);
        }
        if self.servers[by].failed {
            return Err(Rejected::TakerTakenOver(by.to_owned()));
        }
        if self.servers[failed].failed {
            return Err(Rejected::AlreadyTakenOver(failed.to_owned()));
        }
        // The taker adopts the failed server's copies, so it hands over
        // what the failed server had not.
        for from in self.handovers.values_mut() {
            if from == failed {
                *from = by.to_owned();
            }
        }
        self.take_over_adaptors(failed, by);
        self.take_over_singletons(failed, by);
        // The new host of an adaptor drains what was handed to the failed
        // server.
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
        if let Some(next) = self.monitors.remove(failed) {
            if next == by {
                self.monitors.remove(by);
            } else {
                self.monitors.insert(by.to_owned(), next);
            }
        }
        let s = self.servers.entry(failed.to_owned()).or_default();
        s.failed = true;
        s.adopted = false;
        s.taken_over_by = Some(by.to_owned());
        Ok(())
    }

    /// Adaptors go to the taker if it may host adaptors, else to the next
    /// eligible server, to which the taker hands their adopted backlog over
    /// (none eligible: the taker, so that nothing waits for an operator).
    fn take_over_adaptors(&mut self, failed: &str, by: &str) {
        let adaptor_host = self
            .successor(failed, by, "adaptors")
            .unwrap_or_else(|| by.to_owned());
        let moved: Vec<String> = self
            .adaptors
            .iter()
            .filter(|(_, h)| *h == failed)
            .map(|(a, _)| a.clone())
            .collect();
        for a in moved {
            if adaptor_host != by && !self.handovers.contains_key(&a) {
                self.handovers.insert(a.clone(), by.to_owned());
            }
            self.adaptors.insert(a, adaptor_host.clone());
        }
    }

    /// Each singleton to the next eligible server; with none, it waits for
    /// one to join.
    fn take_over_singletons(&mut self, failed: &str, by: &str) {
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
    }

    fn adopted(&mut self, failed: &str, by: &str) -> Result<(), Rejected> {
        let s = self
            .servers
            .get_mut(failed)
            .ok_or_else(|| Rejected::UnknownServer(failed.to_owned()))?;
        if !s.failed || s.taken_over_by.as_deref() != Some(by) || s.adopted {
            return Err(Rejected::NoAdoptionPending {
                failed: failed.to_owned(),
                by: by.to_owned(),
            });
        }
        s.adopted = true;
        Ok(())
    }

    /// An operator moves the adaptor or singleton `what` to `to`.
    fn moved(&mut self, what: &str, to: &str) -> Result<(), Rejected> {
        self.known(to)?;
        if self.servers.get(to).is_some_and(|s| s.failed) {
            return Err(Rejected::MoveToTakenOver(to.to_owned()));
        }
        if let Some(host) = self.adaptors.get(what).cloned() {
            self.move_adaptor(what, host, to)
        } else if let Some(service) = Self::singleton_service(what) {
            self.move_singleton(what, service, to)
        } else {
            Err(Rejected::UnknownName(what.to_owned()))
        }
    }

    /// Its backlog stays with `host` until `host` records it handed over
    /// (none to hand over if `host` was taken over: its taker did).
    fn move_adaptor(&mut self, adaptor: &str, host: String, to: &str) -> Result<(), Rejected> {
        if !self.eligible(to, "adaptors") {
            return Err(Rejected::MayNotHostAdaptors {
                server: to.to_owned(),
            });
        }
        if host == to {
            return Err(Rejected::AlreadyOn {
                what: adaptor.to_owned(),
                server: to.to_owned(),
            });
        }
        if let Some(from) = self.handovers.get(adaptor) {
            return Err(Rejected::StillHandedOver {
                adaptor: adaptor.to_owned(),
                from: from.clone(),
            });
        }
        if let Some(by) = self.receiving.get(adaptor) {
            return Err(Rejected::StillTakenIn {
                adaptor: adaptor.to_owned(),
                by: by.clone(),
            });
        }
        if !self.servers.get(&host).is_some_and(|s| s.failed) {
            self.handovers.insert(adaptor.to_owned(), host);
        }
        self.adaptors.insert(adaptor.to_owned(), to.to_owned());
        Ok(())
    }

    /// Also places a singleton no server could take.
    fn move_singleton(
        &mut self,
        name: &str,
        service: &'static str,
        to: &str,
    ) -> Result<(), Rejected> {
        if !self.eligible(to, service) {
            return Err(Rejected::MayNotHostSingleton {
                server: to.to_owned(),
                singleton: name.to_owned(),
                service,
            });
        }
        if self.singletons.get(name).map(String::as_str) == Some(to) {
            return Err(Rejected::AlreadyOn {
                what: name.to_owned(),
                server: to.to_owned(),
            });
        }
        self.singletons.insert(name.to_owned(), to.to_owned());
        Ok(())
    }

    /// Accepted only from the scheduler's host and for a later slot.
    fn fired(
        &mut self,
        schedule: &str,
        slot: u64,
        by: &str,
        published: bool,
    ) -> Result<(), Rejected> {
        if self.singletons.get("scheduler").map(String::as_str) != Some(by) {
            return Err(Rejected::DoesNotRun {
                server: by.to_owned(),
                service: "scheduler",
            });
        }
        if let Some(f) = self.fired.get(schedule)
            && f.slot >= slot
        {
            return Err(Rejected::SlotNotAfter {
                schedule: schedule.to_owned(),
                slot,
                last: f.slot,
            });
        }
        self.fired.insert(
            schedule.to_owned(),
            FiredSlot {
                slot,
                by: by.to_owned(),
                published,
            },
        );
        Ok(())
    }

    /// Accepted only from the timeout checker's host, with the next check
    /// number, and while no check is under way.
    fn check_started(&mut self, check: &TimeoutCheck) -> Result<(), Rejected> {
        self.runs_timeout_checker(&check.by)?;
        if let Some(p) = &self.timeout_checks.pending {
            return Err(Rejected::CheckUnderWay(p.check));
        }
        let next = self.timeout_checks.last + 1;
        if check.check != next {
            return Err(Rejected::CheckNotNext {
                check: check.check,
                next,
            });
        }
        if check.items.is_empty() {
            return Err(Rejected::CheckWithoutItems);
        }
        self.timeout_checks.last = check.check;
        self.timeout_checks.pending = Some(check.clone());
        Ok(())
    }

    fn check_finished(&mut self, check: u64, by: &str) -> Result<(), Rejected> {
        self.runs_timeout_checker(by)?;
        if self.timeout_checks.pending.as_ref().map(|p| p.check) != Some(check) {
            return Err(Rejected::CheckNotUnderWay(check));
        }
        self.timeout_checks.pending = None;
        Ok(())
    }

    fn runs_timeout_checker(&self, server: &str) -> Result<(), Rejected> {
        if self.singletons.get(TIMEOUT_CHECKER).map(String::as_str) != Some(server) {
            return Err(Rejected::DoesNotRun {
                server: server.to_owned(),
                service: "timeout checker",
            });
        }
        Ok(())
    }

    /// Only the server that holds the backlog hands it over; the new host
    /// then has `items` to take in before the adaptor moves again.
    fn handed_over(&mut self, adaptor: &str, from: &str, items: u64) -> Result<(), Rejected> {
        if self.handovers.get(adaptor).map(String::as_str) != Some(from) {
            return Err(Rejected::NoHandoverPending {
                adaptor: adaptor.to_owned(),
                from: from.to_owned(),
            });
        }
        self.handovers.remove(adaptor);
        if items > 0
            && let Some(host) = self.adaptors.get(adaptor)
        {
            self.receiving.insert(adaptor.to_owned(), host.clone());
        }
        Ok(())
    }

    fn received(&mut self, adaptor: &str, by: &str) -> Result<(), Rejected> {
        if self.receiving.get(adaptor).map(String::as_str) != Some(by) {
            return Err(Rejected::NothingToTakeIn {
                adaptor: adaptor.to_owned(),
                by: by.to_owned(),
            });
        }
        self.receiving.remove(adaptor);
        Ok(())
    }

    fn monitoring(&mut self, node: &str, monitors: &str) -> Result<(), Rejected> {
        self.known(node)?;
        self.known(monitors)?;
        if node == monitors {
            return Err(Rejected::MonitorsItself(node.to_owned()));
        }
        // One monitor per server: whoever monitored `monitors` stops.
        self.monitors.retain(|_, m| m != monitors);
        self.monitors.insert(node.to_owned(), monitors.to_owned());
        Ok(())
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

    fn known(&self, node: &str) -> Result<(), Rejected> {
        if self.servers.contains_key(node) {
            Ok(())
        } else {
            Err(Rejected::UnknownServer(node.to_owned()))
        }
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
}
