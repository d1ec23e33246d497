//! Mirroring in a 3-server ring: every item of a server's backlog is also
//! held by its monitor, and a new monitor receives the whole backlog.

mod common;

use common::*;
use provring::admin::ItemsView;
use provring::repository::now_ms;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// How far a copy may lag behind the item on its origin.
const MIRROR_LAG_MS: u64 = 2_000;

type Key = (String, String, String);

fn keys(items: &[provring::repository::ItemKey]) -> BTreeSet<Key> {
    items
        .iter()
        .map(|i| (i.adaptor.clone(), i.source.clone(), i.id.clone()))
        .collect()
}

async fn items(admin: &str) -> ItemsView {
    all_items(admin).await.expect("GET /backlog/items")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_item_is_held_by_the_monitor_while_the_ring_works() {
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(20));
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("mirror_ring", &hook);
    setup.concurrency = 8;
    let (path, admins) = setup.write_ring(dir.path(), &["a", "b", "c"]);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let _servers = start_servers(&path, dir.path(), &["a", "b", "c"]);
    let monitor = HashMap::from([("a", "c"), ("b", "a"), ("c", "b")]);

    let total = 20_000u64;
    for (n, feed) in ["a", "b", "c"].iter().enumerate() {
        let share = total / 3 + u64::from(n == 0) * (total % 3);
        publish(
            &config.broker,
            &format!("feed-{feed}"),
            events(&format!("ring-{feed}"), share),
        )
        .await;
    }

    // Sample until the target has every event.
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut samples, mut checked, mut old) = (0u64, 0u64, 0u64);
    while recorder.distinct_effects() < total as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} events delivered",
            recorder.distinct_effects()
        );
        for origin in ["a", "b", "c"] {
            // Copies first: an item still unfinished on the origin
            // afterwards was unfinished, and so held, before.
            let held = items(&admins[monitor[origin]]).await;
            let own = items(&admins[origin]).await;
            let held = held.copies.get(origin).map(|c| keys(c)).unwrap_or_default();
            let now = now_ms();
            let missing: Vec<_> = own
                .own
                .iter()
                .filter(|i| now.saturating_sub(i.received_ms) > MIRROR_LAG_MS)
                .filter(|i| !held.contains(&(i.adaptor.clone(), i.source.clone(), i.id.clone())))
                .take(5)
                .collect();
            assert!(
                missing.is_empty(),
                "{origin}'s monitor {} does not hold items older than {MIRROR_LAG_MS} ms: {missing:?}",
                monitor[origin]
            );
            samples += 1;
            checked += own.own.len() as u64;
            old += own
                .own
                .iter()
                .filter(|i| now.saturating_sub(i.received_ms) > MIRROR_LAG_MS)
                .count() as u64;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!(
        "{samples} samples, {checked} backlog items compared with the monitors, {old} of them older than the allowed lag"
    );
    assert!(old > 0, "the samples never saw an item older than the lag");

    // At the end both sides are empty.
    let empty = || async {
        for n in ["a", "b", "c"] {
            let v = items(&admins[n]).await;
            if !v.own.is_empty() || v.copies.values().any(|c| !c.is_empty()) {
                return false;
            }
        }
        true
    };
    let until = Instant::now() + Duration::from_secs(30);
    while !empty().await {
        assert!(
            Instant::now() < until,
            "backlogs or copies not empty at the end"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(recorder.distinct_effects(), total as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_monitor_receives_the_whole_backlog_after_the_old_one_is_killed() {
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").unavailable_until =
        Some(Instant::now() + Duration::from_secs(3600));
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("mirror_resync", &hook);
    setup.backoff = ("500ms", "5s");
    let (path, admins) = setup.write_ring(dir.path(), &["a", "b", "c"]);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &["a", "b", "c"]);

    // b monitors c.
    publish(&config.broker, "feed-c", events("before", 1000)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = items(&admins["b"]).await;
        if held.copies.get("c").map_or(0, Vec::len) == 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "b never held c's 1000 items");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill c's monitor; c goes on consuming (its copies wait on the broker).
    servers.get_mut("b").expect("b").kill9();
    publish(&config.broker, "feed-c", events("after", 1000)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let own = items(&admins["c"]).await.own.len();
        if own == 2000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c stored only {own} of 2000 events while its monitor was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The monitoring link changes: a now monitors c, and must receive c's
    // whole backlog, item by item.
    let (code, out, err) = provring(&[
        "topology",
        "link",
        "--config",
        path.to_str().expect("path"),
        "--node",
        "a",
        "--monitors",
        "c",
    ]);
    assert_eq!(code, 0, "topology link failed: {out}{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let own = keys(&items(&admins["c"]).await.own);
        let held = items(&admins["a"]).await;
        let held_c = held.copies.get("c").map(|c| keys(c)).unwrap_or_default();
        if own.len() == 2000 && held_c == own {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a holds {} of c's {} items after the resync ({} missing, {} extra)",
            held_c.len(),
            own.len(),
            own.difference(&held_c).count(),
            held_c.difference(&own).count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The target recovers: everything is delivered and the copies go.
    recorder.behaviour.lock().expect("lock").unavailable_until = None;
    recorder
        .wait_for(2000, Duration::from_secs(120), "c's events after recovery")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = items(&admins["a"]).await;
        if held.copies.get("c").is_none_or(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "a still holds copies of c");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
