//! The scheduler singleton with real processes: it fires each slot once,
//! also across a `kill -9` of its host.

mod common;

use common::*;
use provring::topology::State;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SCHEDULE: &str = r#"
[schedules.tick]
every = "1s"
adaptor = "feed_b"
misfire = "fire_once"

[schedules.tick.event]
type = "io.provring.account.update"
data = { userName = "sched-{{slot}}", title = "fired for {{time}}" }
"#;

/// Slot time (ms) → number of effects at the target, and when each slot
/// first arrived.
fn slots(recorder: &Recorder) -> (BTreeMap<u64, u32>, BTreeMap<u64, Instant>) {
    let r = recorder.record.lock().expect("lock");
    let mut effects = BTreeMap::new();
    for (identity, n) in &r.effects {
        if let Some(ms) = identity.strip_prefix("/provring/scheduler|tick@") {
            effects.insert(ms.parse::<u64>().expect("slot ms"), *n);
        }
    }
    let mut first = BTreeMap::new();
    for (t, _, identity) in &r.arrivals {
        if let Some(ms) = identity.strip_prefix("/provring/scheduler|tick@") {
            first
                .entry(ms.parse::<u64>().expect("slot ms"))
                .or_insert(*t);
        }
    }
    (effects, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_fire_once_each_across_a_kill_of_the_scheduler_host() {
    let recorder = Recorder::default();
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("scheduler_kill", &hook);
    setup.extra = SCHEDULE.into();
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &nodes);
    let state: State = admin_get(&admins["b"], "/topology")
        .await
        .expect("topology");
    assert_eq!(state.singletons["scheduler"], "a");

    // a fires for a while.
    eventually(Duration::from_secs(30), "four slots delivered", || {
        slots(&recorder).0.len() >= 4
    })
    .await;
    servers.get_mut("a").expect("a").kill9();
    let killed_at = Instant::now();
    let fired_by_a = slots(&recorder).0.keys().max().copied().unwrap_or(0);
    // c monitors a, takes it over, and runs the scheduler from the last
    // slot a recorded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken_after = loop {
        if let Ok(s) = admin_get::<State>(&admins["b"], "/topology").await
            && s.servers["a"].failed
        {
            assert_eq!(s.singletons["scheduler"], "c");
            break killed_at.elapsed();
        }
        assert!(Instant::now() < deadline, "a was not taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eventually(Duration::from_secs(30), "slots fired by c", || {
        slots(&recorder)
            .0
            .keys()
            .filter(|s| **s > fired_by_a)
            .count()
            >= 4
    })
    .await;
    let (effects, first) = slots(&recorder);
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "slots applied twice: {twice:?}");
    // Every request for a slot carried one idempotency key: no slot was
    // published as two events.
    assert_eq!(recorder.duplicate_deliveries(), 0);
    let resumed = first
        .iter()
        .filter(|(slot, _)| **slot > fired_by_a)
        .map(|(_, t)| t.duration_since(killed_at))
        .min()
        .expect("a slot after the kill");
    println!(
        "taken over {taken_after:?} after the kill; first slot after it delivered {resumed:?} after the kill"
    );
    assert!(
        resumed <= taken_after + Duration::from_millis(1000 + 1500),
        "firing resumed {resumed:?} after the kill (takeover after {taken_after:?})"
    );
    // No slot is missing but for misfires: with fire_once at most one slot
    // of the outage is left out.
    let list: Vec<u64> = effects.keys().copied().collect();
    let gaps: Vec<(u64, u64)> = list
        .windows(2)
        .filter(|w| w[1] - w[0] != 1000)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        gaps.iter().all(|(a, b)| b - a <= 2000) && gaps.len() <= 1,
        "slots {list:?} have gaps {gaps:?}"
    );
    // The slot missed while no scheduler ran fired once, from c.
    let fired_late = first
        .iter()
        .filter(|(slot, t)| **slot > fired_by_a && t.duration_since(killed_at) >= taken_after)
        .count();
    assert!(fired_late > 0);
    let s: State = admin_get(&admins["b"], "/topology")
        .await
        .expect("topology");
    assert_eq!(s.fired["tick"].by, "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_waits_while_the_previous_slots_event_is_unfinished() {
    let recorder = Recorder::default();
    // Each delivery takes 1.5 s (within the target's 2 s timeout): with one
    // slot a second, a new slot is due while the previous one is in flight.
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(1500));
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("scheduler_serial", &hook);
    setup.extra = SCHEDULE.replace("misfire = \"fire_once\"", "misfire = \"skip\"");
    let nodes = ["a", "b"];
    let (path, _admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b"]);
    let _servers = start_servers(&path, dir.path(), &nodes);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let r = recorder.record.lock().expect("lock");
    // Each slot's event arrives only after the previous one finished
    // (1.5 s): never two slots' events in flight together. Without the
    // rule they would arrive a second apart.
    let mut arrivals: Vec<(Instant, String)> = Vec::new();
    for (t, _, id) in &r.arrivals {
        if id.starts_with("/provring/scheduler|tick@") && !arrivals.iter().any(|(_, x)| x == id) {
            arrivals.push((*t, id.clone()));
        }
    }
    assert!(arrivals.len() >= 3, "only {} slots fired", arrivals.len());
    assert!(
        arrivals.len() <= 8,
        "{} slots fired in 12 s",
        arrivals.len()
    );
    for w in arrivals.windows(2) {
        let apart = w[1].0.duration_since(w[0].0);
        assert!(
            apart >= Duration::from_millis(1450),
            "{} fired while {} was in flight: {apart:?} apart",
            w[1].1,
            w[0].1
        );
    }
    println!("{} slots in 12 s, one at a time", arrivals.len());
}
