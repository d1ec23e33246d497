//! Hosting's decisions: what this server does after a topology change, as
//! a pure function of the topology before and after it and of what runs
//! here. [`super::run`] only carries the actions out, in the order given.

use crate::topology::{State, TIMEOUT_CHECKER};
use std::collections::{BTreeMap, BTreeSet};

/// The scheduler's name among the singletons.
pub const SCHEDULER: &str = "scheduler";

/// What runs on this server, as hosting last left it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Here {
    /// Adaptors whose consumer and executor run here.
    pub adaptors: BTreeSet<String>,
    /// Moved adaptors whose backlog this server is still handing over
    /// (also while such a handover stops).
    pub handovers: BTreeSet<String>,
    /// Singleton services running here.
    pub singletons: BTreeSet<String>,
    /// Failed servers whose backlog this server has adopted, each with
    /// the epoch it had last joined at ([`ServerState::joined_epoch`]): a
    /// server that joined again and failed again is a new takeover, even
    /// if hosting saw neither the join nor the new failure on its own.
    ///
    /// [`ServerState::joined_epoch`]: crate::topology::ServerState::joined_epoch
    pub adopted: BTreeMap<String, Option<u64>>,
    /// The cluster file has schedules (without any, the scheduler does
    /// not run anywhere).
    pub has_schedules: bool,
}

/// One step for [`super::run`] to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take the backlog of the failed server `failed` over (drain its
    /// copies, store and mirror them as this server's). `mail`: this
    /// server saw the takeover happen, so it sends the alert (a takeover
    /// found at start was mailed by an earlier run).
    Adopt {
        failed: String,
        mail: bool,
    },
    /// `failed` runs again: a later failure of it is adopted anew.
    Forget {
        failed: String,
    },
    /// Stop the adaptor at once, consumer and executor with its target
    /// calls in flight (fencing).
    Surrender {
        adaptor: String,
        now_on: Option<String>,
    },
    /// Stop handing the adaptor's backlog over: it is no longer this
    /// server's to do (or this server was taken over).
    StopHandover {
        adaptor: String,
    },
    /// Hand the moved adaptor's backlog over to its new host once its
    /// consumer here has stopped.
    SendBacklog {
        adaptor: String,
    },
    StopSingleton {
        name: String,
        now_on: Option<String>,
    },
    StartSingleton {
        name: String,
    },
    /// Start the adaptor; it first takes in any backlog handed over to it.
    StartAdaptor {
        adaptor: String,
    },
    /// This server was taken over while running: once everything above has
    /// stopped, drop the surrendered backlog and join the topology again.
    Rejoin,
}

/// What this server (`node`) does to follow `current`. `previous` is the
/// topology hosting followed before (`None` at start).
pub fn plan(previous: Option<&State>, current: &State, node: &str, here: &Here) -> Vec<Action> {
    if current.servers.get(node).is_some_and(|me| me.failed) {
        return surrender_everything(current, here);
    }
    let mut actions = Vec::new();
    // Adopt first, so that the adaptors start with the whole backlog.
    for (id, s) in &current.servers {
        if s.failed
            && s.taken_over_by.as_deref() == Some(node)
            && here.adopted.get(id) != Some(&s.joined_epoch)
        {
            actions.push(Action::Adopt {
                failed: id.clone(),
                mail: previous.is_some(),
            });
        }
    }
    for id in here.adopted.keys() {
        if !current.servers.get(id).is_some_and(|s| s.failed) {
            actions.push(Action::Forget { failed: id.clone() });
        }
    }
    let wanted = current.adaptors_to_run(node);
    for adaptor in &here.adaptors {
        if !wanted.contains(adaptor) {
            actions.push(Action::Surrender {
                adaptor: adaptor.clone(),
                now_on: current.adaptors.get(adaptor).cloned(),
            });
        }
    }
    for adaptor in &here.handovers {
        if current.handovers.get(adaptor).map(String::as_str) != Some(node) {
            actions.push(Action::StopHandover {
                adaptor: adaptor.clone(),
            });
        }
    }
    let mut handing_over = here.handovers.clone();
    for (adaptor, from) in &current.handovers {
        if from == node && handing_over.insert(adaptor.clone()) {
            actions.push(Action::SendBacklog {
                adaptor: adaptor.clone(),
            });
        }
    }
    actions.extend(singletons(current, node, here));
    for adaptor in wanted {
        // An adaptor whose handover from here still runs (or stops) starts
        // once it has ended.
        if !here.adaptors.contains(&adaptor) && !handing_over.contains(&adaptor) {
            actions.push(Action::StartAdaptor { adaptor });
        }
    }
    actions
}

/// Taken over while running (frozen, or cut off from the broker for longer
/// than the detection time): stop everything at once, then join again.
fn surrender_everything(current: &State, here: &Here) -> Vec<Action> {
    let handovers = here
        .handovers
        .iter()
        .map(|a| Action::StopHandover { adaptor: a.clone() });
    let singletons = here.singletons.iter().map(|name| Action::StopSingleton {
        name: name.clone(),
        now_on: current.singletons.get(name).cloned(),
    });
    let adaptors = here.adaptors.iter().map(|a| Action::Surrender {
        adaptor: a.clone(),
        now_on: current.adaptors.get(a).cloned(),
    });
    handovers
        .chain(singletons)
        .chain(adaptors)
        .chain([Action::Rejoin])
        .collect()
}

/// The singletons run where the topology says, and stop at once anywhere
/// else (their changes are accepted only from their host).
fn singletons(current: &State, node: &str, here: &Here) -> Vec<Action> {
    let mut actions = Vec::new();
    for name in [SCHEDULER, TIMEOUT_CHECKER] {
        let has_work = name != SCHEDULER || here.has_schedules;
        let runs_here = current.singletons.get(name).map(String::as_str) == Some(node) && has_work;
        match (here.singletons.contains(name), runs_here) {
            (true, false) => actions.push(Action::StopSingleton {
                name: name.to_owned(),
                now_on: current.singletons.get(name).cloned(),
            }),
            (false, true) => actions.push(Action::StartSingleton {
                name: name.to_owned(),
            }),
            _ => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Change, Outcome, Record, ServerState};

    /// `s` after `change`, by the topology's own rules.
    fn apply(s: &State, change: Change) -> State {
        let mut next = s.clone();
        let record = Record {
            id: "test".into(),
            proposer: "test".into(),
            expected_epoch: s.epoch,
            at_ms: None,
            change,
        };
        let outcome = next.apply(&record);
        assert!(
            matches!(outcome, Outcome::Applied),
            "{record:?}: {outcome:?}"
        );
        next
    }

    /// A ring where a monitors b, b monitors c and c monitors a; a hosts
    /// hr and both singletons, b hosts pw.
    fn ring() -> State {
        let init = State {
            ring: vec!["a".into(), "b".into(), "c".into()],
            servers: ["a", "b", "c"]
                .iter()
                .map(|id| (id.to_string(), ServerState::default()))
                .collect(),
            adaptors: [("hr", "a"), ("pw", "b")]
                .iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect(),
            singletons: [(SCHEDULER, "a"), (TIMEOUT_CHECKER, "a")]
                .iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect(),
            monitors: [("a", "b"), ("b", "c"), ("c", "a")]
                .iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect(),
            ..State::default()
        };
        apply(&State::default(), Change::Init { state: init })
    }

    /// `taker` took `failed` over (what the log records for a killed or
    /// frozen peer once the taker's supervisor has confirmed it).
    fn taken_over(s: State, failed: &str, taker: &str) -> State {
        apply(
            &s,
            Change::Takeover {
                failed: failed.into(),
                by: taker.into(),
            },
        )
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// What `node` runs when it follows `s` fully.
    fn following(s: &State, node: &str) -> Here {
        Here {
            adaptors: s.adaptors_to_run(node).into_iter().collect(),
            handovers: s
                .handovers
                .iter()
                .filter(|(_, from)| from.as_str() == node)
                .map(|(a, _)| a.clone())
                .collect(),
            singletons: s
                .singletons
                .iter()
                .filter(|(_, host)| host.as_str() == node)
                .map(|(n, _)| n.clone())
                .collect(),
            adopted: s
                .servers
                .iter()
                .filter(|(_, x)| x.failed && x.taken_over_by.as_deref() == Some(node))
                .map(|(id, x)| (id.clone(), x.joined_epoch))
                .collect(),
            has_schedules: true,
        }
    }

    fn start(a: &str) -> Action {
        Action::StartAdaptor { adaptor: a.into() }
    }

    #[test]
    fn at_start_a_server_starts_its_adaptors_and_singletons() {
        let s = ring();
        let here = Here {
            has_schedules: true,
            ..Here::default()
        };
        assert_eq!(
            plan(None, &s, "a", &here),
            vec![
                Action::StartSingleton {
                    name: SCHEDULER.into()
                },
                Action::StartSingleton {
                    name: TIMEOUT_CHECKER.into()
                },
                start("hr"),
            ]
        );
        // Without schedules the scheduler has nothing to do.
        assert_eq!(
            plan(None, &s, "a", &Here::default()),
            vec![
                Action::StartSingleton {
                    name: TIMEOUT_CHECKER.into()
                },
                start("hr"),
            ]
        );
        assert_eq!(plan(None, &s, "b", &Here::default()), vec![start("pw")]);
    }

    #[test]
    fn a_server_that_follows_the_topology_has_nothing_to_do() {
        let s = ring();
        for n in ["a", "b", "c"] {
            assert_eq!(plan(Some(&s), &s, n, &following(&s, n)), vec![], "{n}");
        }
    }

    #[test]
    fn the_taker_of_a_killed_peer_adopts_first_then_starts_its_work() {
        let before = ring();
        let after = taken_over(before.clone(), "b", "c");
        assert_eq!(
            plan(Some(&before), &after, "c", &following(&before, "c")),
            vec![
                Action::Adopt {
                    failed: "b".into(),
                    mail: true
                },
                start("pw"),
            ]
        );
        // Done once: the next change does not adopt again.
        let mut here = following(&before, "c");
        here.adopted
            .insert("b".into(), after.servers["b"].joined_epoch);
        here.adaptors.insert("pw".into());
        assert_eq!(plan(Some(&after), &after, "c", &here), vec![]);
    }

    #[test]
    fn a_peer_that_rejoined_and_failed_again_unseen_is_adopted_again() {
        // c adopted b; b joined again and was killed again while c's
        // hosting was busy: c sees only the last state, b failed and
        // taken over by c, as after the first failure.
        let first = taken_over(ring(), "b", "c");
        let adopted = apply(
            &first,
            Change::Adopted {
                failed: "b".into(),
                by: "c".into(),
            },
        );
        let mut here = following(&adopted, "c");
        assert_eq!(here.adopted.len(), 1);
        let rejoined = apply(
            &adopted,
            Change::Joined {
                node: "b".into(),
                version: "test".into(),
                key_fingerprint: None,
                accepted_keys: vec![],
            },
        );
        let again = taken_over(rejoined, "b", "c");
        here.adaptors.insert("pw".into());
        assert_eq!(
            plan(Some(&adopted), &again, "c", &here),
            vec![Action::Adopt {
                failed: "b".into(),
                mail: true
            }]
        );
    }

    #[test]
    fn a_takeover_found_at_start_is_adopted_without_a_second_mail() {
        let s = taken_over(ring(), "b", "c");
        assert_eq!(
            plan(None, &s, "c", &Here::default()),
            vec![
                Action::Adopt {
                    failed: "b".into(),
                    mail: false
                },
                start("pw"),
            ]
        );
    }

    #[test]
    fn a_lost_takeover_leaves_the_loser_as_it_was() {
        // c and a both saw b fail; the log named c the taker.
        let before = ring();
        let after = taken_over(before.clone(), "b", "c");
        assert_eq!(
            plan(Some(&before), &after, "a", &following(&before, "a")),
            vec![]
        );
    }

    #[test]
    fn a_frozen_server_that_wakes_up_taken_over_stops_everything_then_rejoins() {
        // a was frozen; b took it over (adaptor hr and both singletons).
        let before = ring();
        let mut here = following(&before, "a");
        here.handovers.insert("legal".into());
        let after = taken_over(before, "a", "b");
        assert_eq!(
            plan(Some(&after), &after, "a", &here),
            vec![
                Action::StopHandover {
                    adaptor: "legal".into()
                },
                Action::StopSingleton {
                    name: SCHEDULER.into(),
                    now_on: Some("b".into())
                },
                Action::StopSingleton {
                    name: TIMEOUT_CHECKER.into(),
                    now_on: Some("b".into())
                },
                Action::Surrender {
                    adaptor: "hr".into(),
                    now_on: Some("b".into())
                },
                Action::Rejoin,
            ]
        );
    }

    #[test]
    fn a_server_that_returns_after_a_takeover_starts_nothing_it_lost() {
        // b took a over and adopted its backlog; a joins again.
        let s = taken_over(ring(), "a", "b");
        let s = apply(
            &s,
            Change::Adopted {
                failed: "a".into(),
                by: "b".into(),
            },
        );
        let s = apply(
            &s,
            Change::Joined {
                node: "a".into(),
                version: "test".into(),
                key_fingerprint: None,
                accepted_keys: vec![],
            },
        );
        let here = Here {
            has_schedules: true,
            ..Here::default()
        };
        assert_eq!(plan(None, &s, "a", &here), vec![]);
        // Its taker forgets the adoption, so that a later failure is
        // adopted again.
        let mut taker = following(&s, "b");
        taker.adopted.insert("a".into(), None);
        assert_eq!(
            plan(Some(&s), &s, "b", &taker),
            vec![Action::Forget { failed: "a".into() }]
        );
    }

    #[test]
    fn an_intentional_stop_moves_nothing() {
        // A peer stopping on purpose is not taken over: nothing moves.
        // (A peer with a low state is the supervisor's to judge:
        // supervisor/watch.rs; until a takeover is recorded, nothing here
        // changes.)
        let before = ring();
        let after = apply(&before, Change::Stopping { node: "b".into() });
        for n in ["a", "b", "c"] {
            assert_eq!(
                plan(Some(&before), &after, n, &following(&before, n)),
                vec![],
                "{n}"
            );
        }
    }

    fn mv(s: &State, what: &str, to: &str) -> State {
        apply(
            s,
            Change::Move {
                what: what.into(),
                to: to.into(),
            },
        )
    }

    #[test]
    fn a_move_in_flight_surrenders_hands_over_then_starts_on_the_new_host() {
        // hr moves from a to c: c waits until a has handed the backlog over.
        let before = ring();
        let moving = mv(&before, "hr", "c");
        assert_eq!(
            plan(Some(&before), &moving, "a", &following(&before, "a")),
            vec![
                Action::Surrender {
                    adaptor: "hr".into(),
                    now_on: Some("c".into())
                },
                Action::SendBacklog {
                    adaptor: "hr".into()
                },
            ]
        );
        assert_eq!(
            plan(Some(&before), &moving, "c", &following(&before, "c")),
            vec![]
        );
        // a's sender runs; nothing more to do there until it ends.
        let a_sending = following(&moving, "a");
        assert_eq!(a_sending.handovers, set(&["hr"]));
        assert_eq!(plan(Some(&moving), &moving, "a", &a_sending), vec![]);
        // Handed over: c starts hr (taking in the handed-over backlog first).
        let done = apply(
            &moving,
            Change::HandedOver {
                adaptor: "hr".into(),
                from: "a".into(),
                items: 12,
            },
        );
        assert_eq!(
            plan(Some(&moving), &done, "c", &following(&moving, "c")),
            vec![start("hr")]
        );
        // a's sender has ended by then: nothing left for a.
        assert_eq!(
            plan(Some(&moving), &done, "a", &following(&done, "a")),
            vec![]
        );
    }

    #[test]
    fn the_taker_of_a_server_handing_over_finishes_the_handover() {
        // hr was moving from a to c when a was killed: its taker b adopts
        // a's copies (hr's backlog among them) and hands them over to c.
        let moving = mv(&ring(), "hr", "c");
        let after = taken_over(moving.clone(), "a", "b");
        assert_eq!(after.handovers.get("hr").map(String::as_str), Some("b"));
        assert_eq!(
            plan(Some(&moving), &after, "b", &following(&moving, "b")),
            vec![
                Action::Adopt {
                    failed: "a".into(),
                    mail: true
                },
                Action::SendBacklog {
                    adaptor: "hr".into()
                },
                Action::StartSingleton {
                    name: SCHEDULER.into()
                },
                Action::StartSingleton {
                    name: TIMEOUT_CHECKER.into()
                },
            ]
        );
        // c still waits for the backlog.
        assert_eq!(
            plan(Some(&moving), &after, "c", &following(&moving, "c")),
            vec![]
        );
    }

    #[test]
    fn a_handover_no_longer_ours_is_stopped_and_blocks_a_start_until_it_ends() {
        // a was handing hr over to c (sender running) when it was frozen and
        // taken over by b: the handover is b's now. a stops its sender.
        let moving = mv(&ring(), "hr", "c");
        let mut here = following(&moving, "a");
        here.singletons.clear();
        let after = taken_over(moving.clone(), "a", "b");
        assert_eq!(
            plan(Some(&moving), &after, "a", &here),
            vec![
                Action::StopHandover {
                    adaptor: "hr".into()
                },
                Action::Rejoin,
            ]
        );
        // A topology in which the handover is no longer this server's
        // while its sender runs (here hr is back on a, with no handover):
        // stop the sender, and start hr only once the sender has ended.
        let mut elsewhere = moving.clone();
        let mut stopping = following(&moving, "a");
        stopping.singletons.clear();
        elsewhere.adaptors.insert("hr".into(), "a".into());
        elsewhere.handovers.remove("hr");
        assert_eq!(
            plan(Some(&moving), &elsewhere, "a", &stopping),
            vec![
                Action::StopHandover {
                    adaptor: "hr".into()
                },
                Action::StartSingleton {
                    name: SCHEDULER.into()
                },
                Action::StartSingleton {
                    name: TIMEOUT_CHECKER.into()
                },
            ]
        );
        // Once the sender has ended, hr starts here.
        stopping.handovers.clear();
        assert_eq!(
            plan(Some(&elsewhere), &elsewhere, "a", &stopping),
            vec![
                Action::StartSingleton {
                    name: SCHEDULER.into()
                },
                Action::StartSingleton {
                    name: TIMEOUT_CHECKER.into()
                },
                start("hr"),
            ]
        );
    }

    #[test]
    fn a_moved_singleton_stops_here_and_starts_there() {
        let before = ring();
        let after = mv(&before, TIMEOUT_CHECKER, "b");
        assert_eq!(
            plan(Some(&before), &after, "a", &following(&before, "a")),
            vec![Action::StopSingleton {
                name: TIMEOUT_CHECKER.into(),
                now_on: Some("b".into())
            }]
        );
        assert_eq!(
            plan(Some(&before), &after, "b", &following(&before, "b")),
            vec![Action::StartSingleton {
                name: TIMEOUT_CHECKER.into()
            }]
        );
    }
}
