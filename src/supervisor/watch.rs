//! The supervisor's rules as plain values: what one probe of the
//! monitored server, its state in the topology and the broker's view of
//! its connection make of it. No I/O and no clock: the loop in
//! [`super::run`] probes, asks the broker and writes the takeover; this
//! decides.

use crate::topology::ServerState;

/// What one probe of `GET /state` gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It answered with its state (0–10) and the reasons it is below 10.
    Answered { state: u8, reasons: Vec<String> },
    /// No usable answer (refused, timed out, HTTP error), and why.
    Failed(String),
}

/// What the supervisor does after a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do: no peer to watch.
    Idle,
    /// The peer answered with a state at or above the threshold.
    Healthy,
    /// The probe failed (or the state was low) fewer than `retry_count`
    /// times in a row.
    Suspect { failures: u32, problem: String },
    /// Failed `retry_count` times, but the peer stopped on purpose or was
    /// taken over already: nothing to do.
    Settled,
    /// Failed `retry_count` times: ask the broker whether its connection
    /// is alive (the second path), then call [`Watch::confirmed`].
    Confirm { failures: u32, problem: String },
}

/// What the broker's view of the peer's connection decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// Gone from the admin API and from the broker: take it over.
    TakeOver { problem: String },
    /// Its broker connection is alive (admin API unreachable, or the peer
    /// is merely slow): no takeover.
    AliveOnBroker { problem: String },
    /// The broker could not say: no takeover for now.
    Unknown,
}

/// The state of watching one peer.
#[derive(Debug, Clone)]
pub struct Watch {
    threshold: u8,
    retry_count: u32,
    watched: Option<String>,
    failures: u32,
}

impl Watch {
    /// A peer is suspected below `state_threshold`, and confirmed after
    /// `retry_count` failed probes in a row.
    pub fn new(state_threshold: u8, retry_count: u32) -> Watch {
        Watch {
            threshold: state_threshold,
            retry_count: retry_count.max(1),
            watched: None,
            failures: 0,
        }
    }

    /// Watch `peer` (the topology's monitor link). Returns whether it is a
    /// different peer than before; the count of failures starts again.
    pub fn watch(&mut self, peer: Option<&str>) -> bool {
        if self.watched.as_deref() == peer {
            return false;
        }
        self.watched = peer.map(str::to_owned);
        self.failures = 0;
        true
    }

    pub fn watched(&self) -> Option<&str> {
        self.watched.as_deref()
    }

    /// Take one probe's result and the peer's state in the topology.
    pub fn probed(&mut self, probe: Probe, peer: &ServerState) -> Verdict {
        if self.watched.is_none() {
            return Verdict::Idle;
        }
        let problem = match probe {
            Probe::Answered { state, .. } if state >= self.threshold => {
                self.failures = 0;
                return Verdict::Healthy;
            }
            Probe::Answered { state, reasons } => format!(
                "state {state} below {} ({})",
                self.threshold,
                reasons.join("; ")
            ),
            Probe::Failed(why) => why,
        };
        self.failures += 1;
        if self.failures < self.retry_count {
            return Verdict::Suspect {
                failures: self.failures,
                problem,
            };
        }
        if peer.stopping || peer.failed {
            return Verdict::Settled;
        }
        Verdict::Confirm {
            failures: self.failures,
            problem,
        }
    }

    /// Take the broker's view after [`Verdict::Confirm`]: `Ok(true)` when
    /// the peer's connection still holds its alive queue.
    pub fn confirmed<E>(&mut self, alive: Result<bool, E>, problem: String) -> Confirmation {
        match alive {
            Ok(true) => Confirmation::AliveOnBroker { problem },
            Ok(false) => {
                // Whether the takeover is won or lost, counting starts
                // again (a lost one means the peer's state changed).
                self.failures = 0;
                Confirmation::TakeOver { problem }
            }
            Err(_) => Confirmation::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Probe {
        Probe::Failed("connection refused".into())
    }

    fn answered(state: u8) -> Probe {
        Probe::Answered {
            state,
            reasons: vec!["target errors".into()],
        }
    }

    fn watching(peer: &str) -> Watch {
        let mut w = Watch::new(4, 3);
        assert!(w.watch(Some(peer)));
        w
    }

    /// Probe `n` times with `probe`, returning the last verdict.
    fn probe_n(w: &mut Watch, n: u32, probe: Probe, peer: &ServerState) -> Verdict {
        let mut last = Verdict::Idle;
        for _ in 0..n {
            last = w.probed(probe.clone(), peer);
        }
        last
    }

    #[test]
    fn a_killed_peer_is_confirmed_then_taken_over() {
        let mut w = watching("b");
        let up = ServerState::default();
        assert_eq!(
            w.probed(failed(), &up),
            Verdict::Suspect {
                failures: 1,
                problem: "connection refused".into()
            }
        );
        assert!(matches!(
            w.probed(failed(), &up),
            Verdict::Suspect { failures: 2, .. }
        ));
        let Verdict::Confirm { failures, problem } = w.probed(failed(), &up) else {
            panic!("no confirmation after retry_count failures");
        };
        assert_eq!(failures, 3);
        assert_eq!(
            w.confirmed::<()>(Ok(false), problem),
            Confirmation::TakeOver {
                problem: "connection refused".into()
            }
        );
        // After the attempt (won or lost) counting starts again.
        assert!(matches!(
            w.probed(failed(), &up),
            Verdict::Suspect { failures: 1, .. }
        ));
    }

    #[test]
    fn a_frozen_peer_is_taken_over_once_its_broker_connection_is_gone() {
        let mut w = watching("b");
        let up = ServerState::default();
        let timeout = Probe::Failed("no answer in time".into());
        let Verdict::Confirm { problem, .. } = probe_n(&mut w, 3, timeout.clone(), &up) else {
            panic!("no confirmation");
        };
        // Until the broker drops its connection (heartbeats), it is alive.
        assert!(matches!(
            w.confirmed::<()>(Ok(true), problem),
            Confirmation::AliveOnBroker { .. }
        ));
        let Verdict::Confirm { problem, failures } = w.probed(timeout, &up) else {
            panic!("still failing: confirm again");
        };
        assert_eq!(failures, 4);
        assert!(matches!(
            w.confirmed::<()>(Ok(false), problem),
            Confirmation::TakeOver { .. }
        ));
    }

    #[test]
    fn a_low_state_counts_as_a_failure_and_a_good_one_clears_it() {
        let mut w = watching("b");
        let up = ServerState::default();
        let Verdict::Suspect { problem, .. } = w.probed(answered(2), &up) else {
            panic!("a low state is suspect");
        };
        assert!(problem.contains("state 2 below 4") && problem.contains("target errors"));
        assert_eq!(w.probed(answered(4), &up), Verdict::Healthy);
        assert!(matches!(
            w.probed(answered(3), &up),
            Verdict::Suspect { failures: 1, .. }
        ));
        assert!(matches!(
            probe_n(&mut w, 2, answered(0), &up),
            Verdict::Confirm { failures: 3, .. }
        ));
    }

    #[test]
    fn an_intentional_stop_or_a_done_takeover_is_left_alone() {
        let mut w = watching("b");
        let stopping = ServerState {
            stopping: true,
            ..ServerState::default()
        };
        assert_eq!(probe_n(&mut w, 3, failed(), &stopping), Verdict::Settled);
        assert_eq!(w.probed(failed(), &stopping), Verdict::Settled);
        let taken = ServerState {
            failed: true,
            ..ServerState::default()
        };
        assert_eq!(w.probed(failed(), &taken), Verdict::Settled);
    }

    #[test]
    fn an_unreachable_admin_api_with_a_live_broker_connection_is_not_taken_over() {
        let mut w = watching("b");
        let up = ServerState::default();
        for _ in 0..10 {
            if let Verdict::Confirm { problem, .. } = w.probed(failed(), &up) {
                assert!(matches!(
                    w.confirmed::<()>(Ok(true), problem),
                    Confirmation::AliveOnBroker { .. }
                ));
            }
        }
        // A broker that cannot say is no reason either.
        assert_eq!(
            w.confirmed(Err("channel closed"), "x".into()),
            Confirmation::Unknown
        );
    }

    #[test]
    fn a_new_peer_starts_with_a_clean_count() {
        let mut w = watching("b");
        let up = ServerState::default();
        probe_n(&mut w, 2, failed(), &up);
        assert!(!w.watch(Some("b")), "same peer");
        // The ring closed around b: c is watched now, from zero.
        assert!(w.watch(Some("c")));
        assert_eq!(w.watched(), Some("c"));
        assert!(matches!(
            w.probed(failed(), &up),
            Verdict::Suspect { failures: 1, .. }
        ));
        // No link (a ring of one): nothing to do.
        assert!(w.watch(None));
        assert_eq!(w.probed(failed(), &up), Verdict::Idle);
    }
}
