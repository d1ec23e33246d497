//! RabbitMQ restarted mid-stream: the server reconnects by itself and
//! nothing is lost; and a SIGTERM while the broker is down, or right after
//! it came back, ends the server within the grace period plus one second.
//! Runs against a private node (broker/start-local.sh) so that restarting
//! it disturbs no other test.

mod common;

use common::*;
use std::time::Duration;

const PORT: u16 = 5697;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_broker_restart_and_loses_nothing() {
    let uri = start_private_broker(PORT).unwrap_or_else(|e| {
        panic!(
            "this test restarts a private RabbitMQ node and needs rabbitmq-server installed: {e}"
        )
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    // ~800 deliveries/s, so that the restart lands inside the stream.
    rec.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(5));
    let mut setup = Setup::new("brokerrestart", &rec.start().await);
    setup.uri = uri;
    setup.concurrency = 4;
    setup.grace = "3s";
    setup.admin = free_addr();
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));

    publish(&cfg.broker, "hr", events("before", 5000)).await;
    eventually(Duration::from_secs(60), "first deliveries", || {
        rec.distinct_effects() >= 300
    })
    .await;
    let at_stop = rec.distinct_effects();
    wait_ready(
        &setup.admin,
        200,
        Duration::from_secs(10),
        "before the restart",
    )
    .await;
    rabbitmqctl(PORT, &["stop_app"]);
    // Fenced without its broker: an orchestrator sees it is not ready.
    let body = wait_ready(
        &setup.admin,
        503,
        Duration::from_secs(15),
        "with the broker down",
    )
    .await;
    println!("not ready while the broker is down: {body}");
    assert!(body["reasons"].to_string().contains("fenced"), "{body}");
    rabbitmqctl(PORT, &["start_app"]);
    println!("broker restarted after {at_stop} of 5000 deliveries");
    assert!(
        at_stop < 4000,
        "the restart should land mid-stream ({at_stop} delivered)"
    );
    publish(&cfg.broker, "hr", events("after", 2000)).await;

    rec.wait_for(7000, Duration::from_secs(180), "after the broker restart")
        .await;
    wait_ready(
        &setup.admin,
        200,
        Duration::from_secs(30),
        "after the broker restart",
    )
    .await;
    assert!(
        server.is_running(),
        "server must survive the broker restart"
    );
    let log = server.log_text();
    assert!(
        log.contains("reconnecting"),
        "the server noticed the outage:\n{log}"
    );
    assert!(server.stop(Duration::from_secs(30)).success());
    {
        let r = rec.record.lock().expect("lock");
        assert_eq!(r.effects.len(), 7000);
        assert!(r.effects.values().all(|&n| n == 1));
    }
    println!(
        "duplicate deliveries across the restart: {}",
        rec.duplicate_deliveries()
    );
    assert_eq!(repository_items(&dir.path().join("data-a")).await, 0);

    // SIGTERM while the broker is down, then right after it came back: the
    // server ends within grace + 1 s (+ 1 s for this test's polling and a
    // busy machine), naming what it cut short.
    let grace = Duration::from_secs(3);
    let bound = grace + Duration::from_secs(2);
    let stop_timed = |server: &mut ServerProc, when: &str| {
        let sent = std::time::Instant::now();
        server.signal(nix::sys::signal::Signal::SIGTERM);
        let status = server.wait(Duration::from_secs(30));
        let took = sent.elapsed();
        println!("SIGTERM {when}: exit {status} after {took:?}");
        assert!(
            took <= bound,
            "SIGTERM {when}: exit after {took:?}, more than {bound:?}; log:\n{}",
            server.log_text()
        );
        // Exit 0, or 1 with the grace period's end naming what it cut.
        if !status.success() {
            let log = server.log_text();
            assert_eq!(status.code(), Some(1), "{log}");
            assert!(
                log.contains("Grace period expired") && log.contains("still_running="),
                "a slow stop names what it cut short:\n{log}"
            );
        }
    };
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a-down.log"));
    server.wait_started(Duration::from_secs(60));
    rabbitmqctl(PORT, &["stop_app"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_timed(&mut server, "while the broker is down");
    // A start that waits for the broker ends at once on SIGTERM.
    let mut waiting = ServerProc::start(&cfg_path, "a", dir.path().join("a-waiting.log"));
    eventually(
        Duration::from_secs(30),
        "the start waiting for the broker",
        || {
            waiting
                .log_text()
                .contains("Cannot declare the topology log yet")
        },
    )
    .await;
    let sent = std::time::Instant::now();
    waiting.signal(nix::sys::signal::Signal::SIGTERM);
    let status = waiting.wait(Duration::from_secs(30));
    println!(
        "SIGTERM during the start: exit {status} after {:?}",
        sent.elapsed()
    );
    assert!(
        sent.elapsed() <= Duration::from_secs(2),
        "{}",
        waiting.log_text()
    );
    assert_eq!(status.code(), Some(1));
    assert!(waiting.log_text().contains("Signal during the start"));
    rabbitmqctl(PORT, &["start_app"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a-back.log"));
    server.wait_started(Duration::from_secs(60));
    rabbitmqctl(PORT, &["stop_app"]);
    rabbitmqctl(PORT, &["start_app"]);
    stop_timed(&mut server, "right after a broker restart");
}
