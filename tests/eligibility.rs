//! `servers.<id>.services`: what a server may host. A takeover gives each
//! thing to the next server that may host it, with real processes.

mod common;

use common::*;
use provring::topology::State;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_monitor_eligible_for_nothing_passes_the_takeover_on() {
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(5));
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("eligibility", &hook);
    setup.concurrency = 2;
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir.path(), &nodes);
    // c (the monitor of a) may host nothing; its adaptor lives on b.
    let text = std::fs::read_to_string(&path).expect("read cluster file");
    let text = text
        .replace("[servers.c]\n", "[servers.c]\nservices = []\n")
        .replace("server = \"c\"", "server = \"b\"");
    std::fs::write(&path, text).expect("write cluster file");
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);

    let (code, out, err) = provring(&["check-config", "--config", &path.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("c: hosts nothing: it is eligible for no service"),
        "{out}"
    );

    let mut servers = start_servers(&path, dir.path(), &nodes);
    let state: State = admin_get(&admins["b"], "/topology")
        .await
        .expect("topology");
    assert_eq!(state.monitors["c"], "a");
    assert_eq!(state.singletons["scheduler"], "a");

    publish(&config.broker, "feed-a", events("eligible", 3000)).await;
    recorder
        .wait_for(200, Duration::from_secs(60), "a delivering")
        .await;
    servers.get_mut("a").expect("a").kill9();
    let killed_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        if let Ok(s) = admin_get::<State>(&admins["b"], "/topology").await
            && s.servers["a"].failed
            && s.handovers.is_empty()
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a was not taken over and handed on"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // c took a over (it monitors a), but b hosts what a hosted.
    assert_eq!(state.servers["a"].taken_over_by.as_deref(), Some("c"));
    assert_eq!(state.adaptors["feed_a"], "b");
    assert_eq!(state.singletons["scheduler"], "b");
    assert_eq!(state.monitors["c"], "b");

    recorder
        .wait_delivered_once(3000, Duration::from_secs(120), "every event")
        .await;
    let r = recorder.record.lock().expect("lock");
    let from_c = r
        .arrivals
        .iter()
        .filter(|(t, n, _)| *t >= killed_at && n == "c")
        .count();
    assert_eq!(from_c, 0, "c delivered although it may host nothing");
}
