//! `provring move`: an adaptor moves to another server with its backlog,
//! with real processes and a real broker.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// `provring move` with the cluster file `path`, from a blocking thread
/// ([`provring_async`]), so the test's target keeps answering meanwhile.
async fn provring_move(path: &Path, args: &[&str]) -> (i32, String, String) {
    let config = path.display().to_string();
    let mut all = vec!["move", "--config", &config];
    all.extend(args);
    provring_async(&all).await
}

fn arrivals_from_after(recorder: &Recorder, node: &str, after: Instant) -> usize {
    recorder
        .record
        .lock()
        .expect("lock")
        .arrivals
        .iter()
        .filter(|(t, n, _)| *t >= after && n == node)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_adaptor_moves_with_its_backlog_and_back() {
    let ring = Ring::start(
        "move_adaptor",
        &["a", "b", "c"],
        Duration::from_millis(5),
        2,
    )
    .await;
    let (recorder, path, admins, config) = (&ring.recorder, &ring.path, &ring.admins, &ring.config);

    // A backlog on b: the target is slow.
    publish(&config.broker, "feed-b", events("move-1", 3000)).await;
    recorder
        .wait_for(200, Duration::from_secs(60), "b delivering")
        .await;
    let (code, out, err) = provring_move(path, &["feed_b", "--to", "c"]).await;
    let moved_at = Instant::now();
    println!("{out}{err}");
    assert_eq!(code, 0, "provring move failed: {out}{err}");
    assert!(out.contains("moved: feed_b from b to c"), "{out}");
    assert!(out.contains("backlog handed over by b"), "{out}");
    let delivered_at_move = recorder.distinct_effects();
    assert!(
        delivered_at_move < 3000,
        "the backlog was gone before the move ({delivered_at_move} delivered): the test proves nothing"
    );
    let state = topology_of(&admins["c"]).await;
    assert_eq!(state.adaptors["feed_b"], "c");
    assert!(state.handovers.is_empty(), "{:?}", state.handovers);
    // New events go to c as well.
    publish(&config.broker, "feed-b", events("move-2", 500)).await;
    recorder
        .wait_delivered_once(3500, Duration::from_secs(120), "every event")
        .await;
    assert_eq!(
        arrivals_from_after(recorder, "b", moved_at),
        0,
        "b delivered after it handed feed_b over"
    );
    let by_c = arrivals_from_after(recorder, "c", moved_at);
    println!("{delivered_at_move} delivered by b before the move; {by_c} requests from c after it");
    // c starts delivering while it takes the backlog in, before the command
    // returns: up to `concurrency` (2) of its requests were in flight then.
    assert!(by_c + 2 >= 3500 - delivered_at_move);

    // Refused moves name the reason and change nothing.
    let (code, out, _) = provring_move(path, &["feed_b", "--to", "c"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("already on c"), "{out}");
    let (code, out, _) = provring_move(path, &["no_such", "--to", "c"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("\"no_such\"") && out.contains("feed_a"),
        "{out}"
    );
    let (code, out, _) = provring_move(path, &["feed_b", "--to", "z"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no server \"z\""), "{out}");

    // And back, again with a backlog.
    publish(&config.broker, "feed-b", events("move-3", 2000)).await;
    recorder
        .wait_for(3700, Duration::from_secs(60), "c delivering")
        .await;
    let (code, out, err) = provring_move(path, &["feed_b", "--to", "b"]).await;
    let back_at = Instant::now();
    assert_eq!(code, 0, "provring move back failed: {out}{err}");
    assert!(out.contains("backlog handed over by c"), "{out}");
    recorder
        .wait_delivered_once(5500, Duration::from_secs(120), "every event")
        .await;
    assert_eq!(
        arrivals_from_after(recorder, "c", back_at),
        0,
        "c delivered after it handed feed_b back"
    );

    // A singleton service moves in the topology.
    let before = topology_of(&admins["a"]).await;
    let scheduler_on = before.singletons.get("scheduler").cloned();
    if let Some(host) = scheduler_on {
        let to = if host == "c" { "a" } else { "c" };
        let (code, out, _) = provring_move(path, &["scheduler", "--to", to]).await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(topology_of(&admins["a"]).await.singletons["scheduler"], to);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_survives_the_old_host_being_killed_before_it_hands_over() {
    let mut ring = Ring::start("move_killed", &["a", "b", "c"], Duration::from_millis(5), 2).await;
    let (recorder, path, admins, config) = (&ring.recorder, &ring.path, &ring.admins, &ring.config);
    let servers = &mut ring.servers;

    publish(&config.broker, "feed-b", events("move-kill", 3000)).await;
    recorder
        .wait_for(200, Duration::from_secs(60), "b delivering")
        .await;
    // b cannot act on the move: frozen, then killed. Its monitor a takes it
    // over, adopts its copies, and hands feed_b's backlog over to c.
    let b = servers.get_mut("b").expect("b");
    b.signal(nix::sys::signal::Signal::SIGSTOP);
    let (code, out, err) = provring_move(path, &["feed_b", "--to", "c", "--no-wait"]).await;
    assert_eq!(code, 0, "provring move failed: {out}{err}");
    b.kill9();
    let live = [&admins["a"], &admins["c"]];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = topology_of(live[0]).await;
        if s.servers["b"].failed && s.handovers.is_empty() {
            assert_eq!(s.adaptors["feed_b"], "c");
            assert_eq!(s.servers["b"].taken_over_by.as_deref(), Some("a"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the takeover of b and the handover of feed_b did not happen: {:?}",
            s.handovers
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    recorder
        .wait_delivered_once(3000, Duration::from_secs(120), "every event")
        .await;
    let a_log = servers.get("a").expect("a").log_text();
    let handed = a_log
        .lines()
        .find(|l| l.contains("Moved adaptor's backlog handed over"))
        .unwrap_or_else(|| panic!("a did not hand feed_b's backlog over:\n{a_log}"));
    println!("{handed}");
}

/// `provring drain`: planned maintenance of a server with a backlog of
/// thousands: everything it hosts moves, with its backlog, to the next
/// servers; it can then be stopped with nothing lost, no double effect and
/// no takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_server_can_be_stopped_with_nothing_lost() {
    let mut ring = Ring::start("move_drain", &["a", "b", "c"], Duration::from_millis(5), 2).await;
    let (path, admins, config) = (ring.path.clone(), ring.admins.clone(), ring.config.clone());

    publish(&config.broker, "feed-a", events("drain", 3000)).await;
    ring.recorder
        .wait_for(200, Duration::from_secs(60), "a delivering")
        .await;
    let config_arg = path.display().to_string();
    let (code, out, err) = provring_async(&["drain", "--config", &config_arg, "--node", "a"]).await;
    let drained_at = Instant::now();
    println!("{out}{err}");
    assert_eq!(code, 0, "provring drain failed: {out}{err}");
    assert!(out.contains("feed_a: moving from a to b"), "{out}");
    assert!(out.contains("a drained"), "{out}");
    let delivered = ring.recorder.distinct_effects();
    assert!(
        delivered < 3000,
        "the backlog was gone before the drain ({delivered} delivered): the test proves nothing"
    );
    // (b's replica may be a moment behind the log the command wrote.)
    wait_state(
        &[&admins["b"]],
        Duration::from_secs(10),
        "a hosting nothing",
        |s| {
            s.adaptors
                .values()
                .chain(s.singletons.values())
                .all(|h| h != "a")
        },
    )
    .await;
    // Stopped on purpose: no takeover; every event arrives once.
    let (code, out, err) = provring_async(&["stop", "--config", &config_arg, "--node", "a"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let status = ring
        .servers
        .get_mut("a")
        .expect("a")
        .wait(Duration::from_secs(30));
    assert!(status.success(), "a did not stop cleanly");
    ring.recorder
        .wait_delivered_once(3000, Duration::from_secs(120), "every event")
        .await;
    assert_eq!(
        arrivals_from_after(&ring.recorder, "a", drained_at),
        0,
        "a delivered after it was drained"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = topology_of(&admins["b"]).await;
    assert!(
        state.servers["a"].stopping && !state.servers["a"].failed,
        "a was taken over: {:?}",
        state.servers["a"]
    );
}

/// After two takeovers the work sits on the takers; `provring rebalance`
/// moves each adaptor back to its configured server, with its backlog:
/// nothing lost, no double effect. `--dry-run` moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_after_two_takeovers_puts_every_adaptor_back() {
    let nodes = ["a", "b", "c"];
    let mut ring = Ring::start("move_rebalance", &nodes, Duration::from_millis(2), 4).await;
    let (path, admins, config) = (ring.path.clone(), ring.admins.clone(), ring.config.clone());
    let all: Vec<&String> = nodes.iter().map(|n| &admins[*n]).collect();
    let mut total = 0;
    for (round, victim) in ["b", "c"].iter().enumerate() {
        for feed in nodes {
            publish(
                &config.broker,
                &format!("feed-{feed}"),
                events(&format!("rebalance-{round}-{feed}"), 500),
            )
            .await;
            total += 500;
        }
        ring.servers.get_mut(*victim).expect("victim").kill9();
        let v = victim.to_string();
        wait_state(&all, Duration::from_secs(20), "the takeover", |s| {
            s.servers[&v].failed
        })
        .await;
        let mut back = ServerProc::start(
            &path,
            victim,
            ring.dir.path().join(format!("{victim}-back.log")),
        );
        back.wait_started(Duration::from_secs(60));
        ring.servers.insert(v.clone(), back);
        wait_state(&all, Duration::from_secs(30), "the rejoin", |s| {
            !s.servers[&v].failed
        })
        .await;
    }
    let state = topology_of(&admins["a"]).await;
    let away: Vec<&String> = ["b", "c"]
        .iter()
        .map(|n| &state.adaptors[&format!("feed_{n}")])
        .collect();
    println!("after two takeovers: {:?}", state.adaptors);
    assert!(
        away.iter()
            .zip(["b", "c"])
            .all(|(host, home)| host.as_str() != home),
        "the takeovers moved nothing: {:?}",
        state.adaptors
    );
    let config_arg = path.display().to_string();

    let (code, out, err) =
        provring_async(&["rebalance", "--dry-run", "--config", &config_arg]).await;
    println!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("would move") && out.contains("nothing moved"),
        "{out}"
    );
    assert_eq!(topology_of(&admins["a"]).await.adaptors, state.adaptors);

    // More events while the work moves back.
    for feed in nodes {
        publish(
            &config.broker,
            &format!("feed-{feed}"),
            events(&format!("rebalance-late-{feed}"), 500),
        )
        .await;
        total += 500;
    }
    let (code, out, err) = provring_async(&["rebalance", "--config", &config_arg]).await;
    println!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rebalanced"), "{out}");
    wait_state(&all, Duration::from_secs(10), "every adaptor home", |s| {
        nodes.iter().all(|n| s.adaptors[&format!("feed_{n}")] == *n)
    })
    .await;
    ring.recorder
        .wait_delivered_once(total, Duration::from_secs(180), "every event")
        .await;
}
