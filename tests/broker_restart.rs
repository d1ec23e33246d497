//! RabbitMQ restarted mid-stream: the server reconnects by itself and
//! nothing is lost. Runs against a private node (broker/start-local.sh) so
//! that restarting it disturbs no other test.

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
    rabbitmqctl(PORT, &["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(PORT, &["start_app"]);
    println!("broker restarted after {at_stop} of 5000 deliveries");
    assert!(
        at_stop < 4000,
        "the restart should land mid-stream ({at_stop} delivered)"
    );
    publish(&cfg.broker, "hr", events("after", 2000)).await;

    rec.wait_for(7000, Duration::from_secs(180), "after the broker restart")
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
}
