//! The supervisor ring with real processes: `kill -9` each server of a
//! 3-server ring in turn under load, and an intentional stop.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_each_server_in_turn_under_load() {
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(2));
    let hook = recorder.start().await;
    let smtp = SmtpSink::default();
    let port = smtp.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("failover_kill", &hook);
    setup.concurrency = 8;
    setup.extra = alerts(port);
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &nodes);
    let config_arg = path.to_str().expect("path");
    // `provring status` on the healthy ring: every server up, ring closed.
    let (code, out, err) = provring_async(&["status", "--json", "--config", config_arg]).await;
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(status["ring_closed"], true, "{status}");
    assert_eq!(
        status["cluster"]["servers"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );

    let mut total = 0u64;
    for (round, victim) in nodes.iter().enumerate() {
        for feed in nodes {
            publish(
                &config.broker,
                &format!("feed-{feed}"),
                events(&format!("r{round}-{feed}"), 1500),
            )
            .await;
            total += 1500;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed_at = Instant::now();
        servers.get_mut(*victim).expect("victim").kill9();
        let live: Vec<&String> = nodes
            .iter()
            .filter(|n| *n != victim)
            .map(|n| &admins[*n])
            .collect();
        let v = victim.to_string();
        let state = wait_state(
            &live,
            Duration::from_secs(20),
            &format!("the takeover of {victim}"),
            |s| s.servers.get(&v).is_some_and(|x| x.failed),
        )
        .await;
        println!(
            "{victim} taken over by {:?} after {:?}",
            state.servers[*victim].taken_over_by,
            killed_at.elapsed()
        );
        // The ring is closed around the failed server.
        assert!(
            !state.monitors.contains_key(*victim),
            "{victim} still monitors: {:?}",
            state.monitors
        );
        assert!(
            !state.monitors.values().any(|m| m == victim),
            "{victim} still monitored: {:?}",
            state.monitors
        );
        assert_eq!(state.monitors.len(), 2, "links: {:?}", state.monitors);
        if round == 0 {
            // What an operator reads names the taker.
            let taker = state.servers[*victim]
                .taken_over_by
                .clone()
                .expect("a taker");
            let (_, out, err) = provring_async(&["backlog", "--config", config_arg]).await;
            assert!(
                out.lines().any(|l| l.starts_with(*victim)
                    && l.contains(&format!("failed; taken over by {taker}"))),
                "backlog: {out}{err}"
            );
            let (code, out, err) =
                provring_async(&["topology", "show", "--config", config_arg]).await;
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.contains(&format!("taken over by {taker}")), "{out}");
            // `status` shows the taker and when, and exits 1.
            let (code, out, err) =
                provring_async(&["status", "--json", "--config", config_arg]).await;
            assert_eq!(code, 1, "{out}{err}");
            let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
            let failed = status["cluster"]["servers"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["node"] == *victim))
                .cloned()
                .unwrap_or_default();
            assert_eq!(failed["failed"], true, "{status}");
            assert_eq!(failed["taken_over_by"], taker.as_str(), "{status}");
            assert!(failed["taken_over_at_ms"].is_u64(), "{status}");
            assert_eq!(status["ring_closed"], true, "closed around it: {status}");
            let (_, table, _) = provring_async(&["status", "--config", config_arg]).await;
            println!("{table}");
            // The change is in the history, with its time.
            let view: serde_json::Value = admin_get(&admins[&taker], "/topology?history=10")
                .await
                .expect("history");
            assert!(
                view["history"].as_array().is_some_and(|h| h
                    .iter()
                    .any(|c| c["change"] == "takeover" && c["at_ms"].is_u64())),
                "{view}"
            );
        }
        assert!(
            state.adaptors.values().all(|h| h != victim),
            "adaptors left on {victim}: {:?}",
            state.adaptors
        );
        // Exactly one mail for this failure.
        let subject = format!("server {victim} failed");
        eventually(Duration::from_secs(10), "the takeover mail", || {
            smtp.count(&subject) >= 1
        })
        .await;
        // Its text (arrows, names) is UTF-8, and it says so.
        let mail = smtp
            .messages
            .lock()
            .expect("lock")
            .iter()
            .find(|m| m.contains(&subject))
            .cloned()
            .unwrap_or_default();
        assert!(
            mail.to_ascii_lowercase()
                .contains("content-type: text/plain; charset=utf-8"),
            "{mail}"
        );
        // More load while it is down.
        for feed in nodes {
            publish(
                &config.broker,
                &format!("feed-{feed}"),
                events(&format!("r{round}-down-{feed}"), 500),
            )
            .await;
            total += 500;
        }
        // Back again.
        let log = dir.path().join(format!("{victim}-{round}.log"));
        let mut p = ServerProc::start(&path, victim, log);
        p.wait_started(Duration::from_secs(60));
        servers.insert(victim.to_string(), p);
        wait_state(
            &live,
            Duration::from_secs(20),
            &format!("{victim} back"),
            |s| s.servers.get(&v).is_some_and(|x| !x.failed) && s.monitors.len() == 3,
        )
        .await;
    }
    recorder
        .wait_delivered_once(
            total,
            Duration::from_secs(180),
            "every event after three failures",
        )
        .await;
    for victim in nodes {
        assert_eq!(
            smtp.count(&format!("server {victim} failed")),
            1,
            "takeover mails for {victim}"
        );
    }
    println!(
        "{total} events, {} duplicate deliveries, {} mails",
        recorder.duplicate_deliveries(),
        smtp.messages.lock().expect("lock").len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_intentional_stop_is_not_taken_over() {
    let recorder = Recorder::default();
    let hook = recorder.start().await;
    let smtp = SmtpSink::default();
    let port = smtp.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("failover_stop", &hook);
    setup.extra = alerts(port);
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &nodes);

    let status = servers
        .get_mut("b")
        .expect("b")
        .stop(Duration::from_secs(30));
    assert!(status.success(), "b did not stop cleanly");
    // Well past the detection time (1 s by default).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let state = try_topology_of(&admins["a"]).await.expect("a's topology");
    assert!(state.servers["b"].stopping, "b's stop was not announced");
    assert!(
        !state.servers["b"].failed,
        "b was taken over after an intentional stop"
    );
    assert_eq!(state.adaptors["feed_b"], "b");
    assert_eq!(smtp.count("failed"), 0, "a failure mail was sent");

    // Events for b wait on the broker; restarted, b resumes its own adaptor.
    publish(&config.broker, "feed-b", events("stop", 300)).await;
    let mut b = ServerProc::start(&path, "b", dir.path().join("b-2.log"));
    b.wait_started(Duration::from_secs(60));
    servers.insert("b".into(), b);
    recorder
        .wait_for(300, Duration::from_secs(60), "b's events after its restart")
        .await;
    let state = try_topology_of(&admins["b"]).await.expect("b's topology");
    assert!(!state.servers["b"].stopping);
    assert_eq!(state.adaptors["feed_b"], "b");
    assert_eq!(smtp.count("failed"), 0, "a failure mail was sent");

    // `provring stop` does the same through the admin API.
    let (code, out, err) = provring(&[
        "stop",
        "--config",
        path.to_str().expect("path"),
        "--node",
        "c",
    ]);
    assert_eq!(code, 0, "provring stop failed: {out}{err}");
    let status = servers
        .get_mut("c")
        .expect("c")
        .wait(Duration::from_secs(30));
    assert!(status.success(), "c did not stop cleanly");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = try_topology_of(&admins["a"]).await.expect("a's topology");
    assert!(state.servers["c"].stopping && !state.servers["c"].failed);
    assert_eq!(smtp.count("failed"), 0, "a failure mail was sent");
    // `provring backlog` tells a server stopped on purpose from a failed one.
    let (code, out, err) = provring(&[
        "backlog",
        "--json",
        "--config",
        path.to_str().expect("path"),
    ]);
    assert_eq!(code, 1, "c does not answer: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("backlog JSON");
    let c = report
        .as_array()
        .and_then(|all| all.iter().find(|s| s["node"] == "c"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(c["standing"], "stopped on purpose", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_server_is_taken_over_and_delivers_nothing_it_surrendered() {
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(3));
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("failover_freeze", &hook);
    setup.concurrency = 4;
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &nodes);

    let total = 4000u64;
    publish(&config.broker, "feed-b", events("freeze", total)).await;
    recorder
        .wait_for(300, Duration::from_secs(60), "b delivering")
        .await;
    let b = servers.get_mut("b").expect("b");
    b.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let live = [&admins["a"], &admins["c"]];
    let state = wait_state(&live, Duration::from_secs(30), "the takeover of b", |s| {
        s.servers["b"].failed
    })
    .await;
    let taker = state.servers["b"].taken_over_by.clone().expect("taker");
    println!(
        "b taken over by {taker} {:?} after the freeze",
        frozen_at.elapsed()
    );
    // Frozen for at least three times the detection time (1 s).
    let detection = Duration::from_secs(1);
    if frozen_at.elapsed() < detection * 3 {
        tokio::time::sleep(detection * 3 - frozen_at.elapsed()).await;
    }
    let resumed_at = Instant::now();
    b.signal(nix::sys::signal::Signal::SIGCONT);

    let deadline = Instant::now() + Duration::from_secs(120);
    while recorder.distinct_effects() < total as usize {
        if Instant::now() > deadline {
            let tail = |n: &str| {
                let text = servers.get(n).map(|s| s.log_text()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(400)..].join("\n")
            };
            panic!(
                "only {} of {total} events delivered after the takeover\n--- a ---\n{}\n--- b ---\n{}\n--- c ---\n{}",
                recorder.distinct_effects(),
                tail("a"),
                tail("b"),
                tail("c")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // b learns it was taken over and joins again, hosting nothing.
    let state = wait_state(&live, Duration::from_secs(30), "b back in the ring", |s| {
        !s.servers["b"].failed && s.monitors.len() == 3
    })
    .await;
    assert_eq!(state.adaptors["feed_b"], taker);
    // Ready again for an orchestrator once it has rejoined.
    wait_ready(
        &admins["b"],
        200,
        Duration::from_secs(30),
        "b after its rejoin",
    )
    .await;
    recorder
        .wait_quiet(Duration::from_secs(2), Duration::from_secs(30))
        .await;
    recorder.assert_delivered_once(total);
    let r = recorder.record.lock().expect("lock");
    let from_b_after: Vec<_> = r
        .arrivals
        .iter()
        .filter(|(t, node, _)| *t >= resumed_at && node == "b")
        .take(5)
        .collect();
    assert!(
        from_b_after.is_empty(),
        "b delivered after it resumed, having been taken over: {from_b_after:?}"
    );
    let by_taker = r.arrivals.iter().filter(|(_, n, _)| *n == taker).count();
    println!("{total} events; {by_taker} requests from the taker; none from b after it resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_non_adjacent_servers_killed_together_lose_nothing() {
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(2));
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("failover_two", &hook);
    setup.concurrency = 4;
    let nodes = ["a", "b", "c", "d"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let feeds = ["feed-a", "feed-b", "feed-c", "feed-d"];
    let _cleanup = Cleanup::new(&config.broker, &feeds);
    let mut servers = start_servers(&path, dir.path(), &nodes);

    let per_feed = 1500u64;
    for feed in feeds {
        publish(
            &config.broker,
            feed,
            events(&format!("two-{feed}"), per_feed),
        )
        .await;
    }
    recorder
        .wait_for(500, Duration::from_secs(60), "deliveries under way")
        .await;
    servers.get_mut("a").expect("a").kill9();
    servers.get_mut("c").expect("c").kill9();
    let live = [&admins["b"], &admins["d"]];
    let state = wait_state(&live, Duration::from_secs(30), "both takeovers", |s| {
        s.servers["a"].failed && s.servers["c"].failed
    })
    .await;
    println!(
        "a taken over by {:?}, c by {:?}; links {:?}",
        state.servers["a"].taken_over_by, state.servers["c"].taken_over_by, state.monitors
    );
    for feed in feeds {
        publish(
            &config.broker,
            feed,
            events(&format!("two-after-{feed}"), 200),
        )
        .await;
    }
    let total = (per_feed + 200) * feeds.len() as u64;
    recorder
        .wait_delivered_once(
            total,
            Duration::from_secs(180),
            "every event with two servers down",
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_unreachable_only_over_http_is_not_taken_over() {
    let recorder = Recorder::default();
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new("failover_unreachable", &hook);
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    // b listens elsewhere than the cluster file says: its monitor a cannot
    // reach it, while b is healthy on the broker.
    let node_file = dir.path().join("node-b.toml");
    std::fs::write(
        &node_file,
        format!("[servers.b]\nadmin_listen = {:?}\n", free_addr()),
    )
    .expect("node file");
    let mut a = ServerProc::start(&path, "a", dir.path().join("a.log"));
    let mut c = ServerProc::start(&path, "c", dir.path().join("c.log"));
    let b_log = dir.path().join("b.log");
    let b_file = std::fs::File::create(&b_log).expect("b log");
    let mut b = std::process::Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(["server", "--config"])
        .arg(&path)
        .arg("--config")
        .arg(&node_file)
        .args(["--node", "b"])
        .env("RUST_LOG", "info,lapin=off")
        .stderr(b_file)
        .spawn()
        .expect("spawn b");
    a.wait_started(Duration::from_secs(60));
    c.wait_started(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let state = try_topology_of(&admins["a"]).await.expect("a's topology");
    assert!(!state.servers["b"].failed, "b was taken over: {state:?}");
    assert_eq!(state.adaptors["feed_b"], "b");
    let log = a.log_text();
    assert!(
        log.lines().any(|l| l.contains(
            "Cannot reach the monitored server's admin API, but its broker connection is alive: no takeover."
        ) && l.contains("monitored=b")),
        "no warning naming b in a's log:\n{log}"
    );
    publish(&config.broker, "feed-b", events("unreachable", 100)).await;
    recorder
        .wait_for(100, Duration::from_secs(60), "b still delivering")
        .await;
    let _ = b.kill();
    let _ = b.wait();
}
