//! One server, end to end, against the real RabbitMQ: real `provring`
//! processes, a recording webhook, and the outcomes a user cares about.

mod common;

use common::*;
use std::time::Duration;

/// 10,000 events → each delivered, each key's effect applied once,
/// repository empty at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_ten_thousand_events_once_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let setup = Setup::new("10k", &rec.start().await);
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));

    publish(&cfg.broker, "hr", events("run10k", 10_000)).await;
    rec.wait_for(10_000, Duration::from_secs(180), "10k events")
        .await;

    let status = server.stop(Duration::from_secs(30));
    assert!(
        status.success(),
        "server exited with {status}; log:\n{}",
        server.log_text()
    );
    {
        let r = rec.record.lock().expect("lock");
        assert_eq!(r.effects.len(), 10_000);
        assert!(
            r.effects.values().all(|&n| n == 1),
            "an effect was applied twice"
        );
        println!("10k: {} requests for 10000 events", r.requests.len());
    }
    assert_eq!(
        repository_items(&dir.path().join("data-a")).await,
        0,
        "repository not empty"
    );
    assert!(
        drain_parking(&cfg).await.is_empty(),
        "nothing should be parked"
    );
}

/// kill -9 the server at random moments while 10,000 events flow,
/// restarting it each time: every event delivered, no effect twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_repeated_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let mut setup = Setup::new("kill9", &rec.start().await);
    setup.admin = free_addr();
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let log = dir.path().join("a.log");
    let mut server = ServerProc::start(&cfg_path, "a", log.clone());

    let broker = cfg.broker.clone();
    let publisher = tokio::spawn(async move {
        // Ten waves, so that kills land while events are still arriving.
        for wave in 0..10 {
            let bodies: Vec<Vec<u8>> = events(&format!("k{wave}"), 1000);
            publish(&broker, "hr", bodies).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    let kills = 6;
    for k in 0..kills {
        let pause = 300 + rand::random::<u64>() % 1200;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill9();
        println!(
            "kill -9 #{} after {pause} ms; {} events delivered so far",
            k + 1,
            rec.distinct_effects()
        );
        server = ServerProc::start(&cfg_path, "a", dir.path().join(format!("a{k}.log")));
    }
    publisher.await.expect("publisher");
    rec.wait_for(10_000, Duration::from_secs(240), "after kills")
        .await;
    // A kill can land after the last effect: the restarted server then
    // still redelivers what it had delivered without saving it (same
    // key, no second effect). Stop once its backlog is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match all_items(&setup.admin).await {
            Ok(items) if items.own.is_empty() => break,
            other => {
                let left = other.map(|i| i.own.len());
                assert!(
                    std::time::Instant::now() < deadline,
                    "backlog not done 60 s after every effect: {left:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    let status = server.stop(Duration::from_secs(30));
    assert!(status.success(), "server exited with {status}");
    rec.assert_delivered_once(10_000);
    println!(
        "kill -9 x{kills}: 10000 events delivered, {} duplicate deliveries (same key, effect applied once)",
        rec.duplicate_deliveries()
    );
    assert_eq!(repository_items(&dir.path().join("data-a")).await, 0);
}

/// 503 for a while, then recovery: everything delivered. 400 for one
/// event: that one parked with its reason, the rest delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_transient_errors_and_parks_permanent_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    {
        let mut b = rec.behaviour.lock().expect("lock");
        b.unavailable_until = Some(std::time::Instant::now() + Duration::from_secs(3));
        b.reject_ids.insert("errs-7".into());
    }
    let setup = Setup::new("errors", &rec.start().await);
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));

    publish(&cfg.broker, "hr", events("errs", 300)).await;
    rec.wait_for(299, Duration::from_secs(60), "after 503s")
        .await;
    let parked = {
        let mut parked = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while parked.is_empty() && std::time::Instant::now() < deadline {
            parked = drain_parking(&cfg).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        parked
    };
    assert_eq!(parked.len(), 1, "exactly the rejected event is parked");
    let body: serde_json::Value =
        serde_json::from_slice(&parked[0].0).expect("parked body is the event");
    assert_eq!(body["id"], "errs-7");
    assert!(
        parked[0].1.contains("400"),
        "reason names the status: {}",
        parked[0].1
    );
    {
        let r = rec.record.lock().expect("lock");
        assert!(r.failed > 0, "the target did answer 503");
        assert_eq!(r.effects.len(), 299);
        assert!(!r.effects.contains_key("/provring/generate|errs-7"));
    }
    assert!(server.stop(Duration::from_secs(30)).success());
    assert_eq!(repository_items(&dir.path().join("data-a")).await, 0);
}

/// Malformed JSON, missing id, unknown type, oversized body, non-UTF-8:
/// each parked with its reason; the server stays up; other traffic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parks_bad_input_and_keeps_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let mut setup = Setup::new("badinput", &rec.start().await);
    setup.max_message_size = 4096;
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));

    let mut bodies = events("good1", 50);
    bodies.push(b"{\"specversion\": \"1.0\", \"id\": ".to_vec());
    bodies.push(br#"{"specversion":"1.0","source":"/hr","type":"io.provring.account.create","data":{"userName":"x"}}"#.to_vec());
    bodies.push(br#"{"specversion":"1.0","id":"u1","source":"/hr","type":"com.example.unknown","data":{"userName":"x"}}"#.to_vec());
    let mut big = provring::event::synthetic(provring::event::EventType::AccountCreate, "big", 1)
        .into_bytes();
    big.truncate(big.len() - 1);
    big.extend(format!(",\"pad\":\"{}\"}}", "x".repeat(8000)).into_bytes());
    bodies.push(big);
    bodies.push(vec![0xff, 0xfe, b'{', 0x80]);
    bodies.extend(events("good2", 50));
    publish(&cfg.broker, "hr", bodies).await;

    rec.wait_for(100, Duration::from_secs(60), "valid traffic")
        .await;
    let mut parked = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while parked.len() < 5 && std::time::Instant::now() < deadline {
        parked.extend(drain_parking(&cfg).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reasons: Vec<&str> = parked.iter().map(|(_, r)| r.as_str()).collect();
    println!("parking reasons: {reasons:#?}");
    assert_eq!(parked.len(), 5, "each bad message parked once: {reasons:?}");
    for expected in [
        "body is not a JSON object",
        "missing attribute \"id\"",
        "unknown type \"com.example.unknown\"",
        "exceeds limits.max_message_size",
        "body is not UTF-8",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no parked message with reason {expected:?}: {reasons:?}"
        );
    }
    assert!(
        server.is_running(),
        "server must stay up; log:\n{}",
        server.log_text()
    );
    assert_eq!(rec.distinct_effects(), 100);
    assert!(server.stop(Duration::from_secs(30)).success());
}

/// SIGTERM while work is in flight: exit 0, nothing lost, the rest is
/// delivered after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_the_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    rec.behaviour.lock().expect("lock").unavailable_until =
        Some(std::time::Instant::now() + Duration::from_secs(4));
    let setup = Setup::new("sigterm", &rec.start().await);
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let log = dir.path().join("a.log");
    let mut server = ServerProc::start(&cfg_path, "a", log.clone());
    publish(&cfg.broker, "hr", events("term", 500)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = server.stop(Duration::from_secs(15));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log_text()
    );
    assert!(server.log_text().contains("Shutting down"));
    let left = repository_items(&dir.path().join("data-a")).await;
    println!("{left} items waited in the repository across the restart");
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a2.log"));
    rec.wait_for(500, Duration::from_secs(60), "after restart")
        .await;
    assert!(server.stop(Duration::from_secs(30)).success());
}

/// When in-flight work outlasts the grace period, the server says which
/// components were still running, exits 1, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_what_outlasted_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    rec.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(1500));
    let mut setup = Setup::new("grace", &rec.start().await);
    setup.grace = "300ms";
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    publish(&cfg.broker, "hr", events("grace", 50)).await;
    eventually(Duration::from_secs(30), "deliveries in flight", || {
        server.log_text().contains("Server started.")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = server.stop(Duration::from_secs(15));
    let log = server.log_text();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(log.contains("Grace period expired"), "log:\n{log}");
    assert!(log.contains("executor hr"), "names the executor:\n{log}");

    rec.behaviour.lock().expect("lock").delay = None;
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a2.log"));
    rec.wait_for(50, Duration::from_secs(60), "after restart")
        .await;
    assert!(server.stop(Duration::from_secs(30)).success());
}

/// Events about one account reach the target in arrival order, although
/// the adaptor runs many target calls at once and creates need a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_each_accounts_events_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    {
        let mut b = rec.behaviour.lock().expect("lock");
        b.jitter = Some(Duration::from_millis(30));
        b.fail_first_type = Some("io.provring.account.create".into());
    }
    let mut setup = Setup::new("order", &rec.start().await);
    setup.concurrency = 32;
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));

    let steps = ["create", "update", "disable", "enable", "delete"];
    let users = 40;
    let mut bodies = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        for u in 0..users {
            let body = serde_json::json!({
                "specversion": "1.0", "id": format!("ord-{u}-{n}"), "source": "/hr/test",
                "type": format!("io.provring.account.{step}"),
                "data": {"userName": format!("user{u}"), "displayName": format!("step {n}")}
            });
            bodies.push(body.to_string().into_bytes());
        }
    }
    publish(&cfg.broker, "hr", bodies).await;
    rec.wait_for(
        users * steps.len(),
        Duration::from_secs(120),
        "ordered events",
    )
    .await;
    assert!(server.stop(Duration::from_secs(30)).success());

    let r = rec.record.lock().expect("lock");
    let expected: Vec<String> = steps
        .iter()
        .map(|s| format!("io.provring.account.{s}"))
        .collect();
    for u in 0..users {
        assert_eq!(
            r.by_user[&format!("user{u}")],
            expected,
            "order for user{u}"
        );
    }
    assert!(r.failed >= users as u64, "every create failed once first");
}

/// Order holds across a restart: creates saved with a retry schedule come
/// back before the updates queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_each_accounts_order_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    rec.behaviour.lock().expect("lock").fail_type_until = Some((
        "io.provring.account.create".into(),
        std::time::Instant::now() + Duration::from_secs(2),
    ));
    let mut setup = Setup::new("orderrestart", &rec.start().await);
    // Long enough that the creates are still waiting for their retry when
    // the server comes back.
    setup.backoff = ("3s", "3s");
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    let users = 20;
    let mut bodies = Vec::new();
    for (n, step) in ["create", "update"].iter().enumerate() {
        for u in 0..users {
            let body = serde_json::json!({
                "specversion": "1.0", "id": format!("or-{u}-{n}"), "source": "/hr/test",
                "type": format!("io.provring.account.{step}"),
                "data": {"userName": format!("user{u}")}
            });
            bodies.push(body.to_string().into_bytes());
        }
    }
    publish(&cfg.broker, "hr", bodies).await;
    eventually(Duration::from_secs(30), "creates failing", || {
        rec.record.lock().expect("lock").failed >= users as u64
    })
    .await;
    assert!(server.stop(Duration::from_secs(15)).success());
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a2.log"));
    rec.wait_for(users * 2, Duration::from_secs(60), "after restart")
        .await;
    assert!(server.stop(Duration::from_secs(30)).success());
    let r = rec.record.lock().expect("lock");
    for u in 0..users {
        assert_eq!(
            r.by_user[&format!("user{u}")],
            ["io.provring.account.create", "io.provring.account.update"],
            "order for user{u}"
        );
    }
}

/// The cluster file of one server `a` (admin API on a known address, adaptor
/// `hr`) whose target answers 503 for the first `unavailable_s` seconds.
async fn one_server(
    test: &str,
    rec: &Recorder,
    unavailable_s: u64,
) -> (
    tempfile::TempDir,
    Setup,
    std::path::PathBuf,
    provring::config::Config,
    Cleanup,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    rec.behaviour.lock().expect("lock").unavailable_until =
        Some(std::time::Instant::now() + Duration::from_secs(unavailable_s));
    let mut setup = Setup::new(test, &rec.start().await);
    setup.admin = free_addr();
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    (dir, setup, cfg_path, cfg, cleanup)
}

/// `provring backlog` shows what waits in the server's repository, asked
/// from its admin address, and says when a server cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_command_shows_what_waits() {
    let rec = Recorder::default();
    let (dir, _setup, cfg_path, cfg, _cleanup) = one_server("backlog", &rec, 4).await;
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    server.wait_started(Duration::from_secs(30));
    publish(&cfg.broker, "hr", events("bl", 100)).await;

    let backlog = |cfg_path: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_provring"))
            .args(["backlog", "--json", "--config"])
            .arg(cfg_path)
            .output()
            .expect("run provring backlog");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v)
    };
    let mut seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while seen < 100 && std::time::Instant::now() < deadline {
        let (_, v) = backlog(&cfg_path);
        seen = v[0]["adaptors"][0]["items"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 100, "the 100 undelivered events show in the backlog");

    rec.wait_for(100, Duration::from_secs(60), "after the 503s")
        .await;
    eventually(Duration::from_secs(10), "an empty backlog", || {
        let (code, v) = backlog(&cfg_path);
        code == Some(0) && v[0]["adaptors"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert!(server.stop(Duration::from_secs(30)).success());

    let (code, v) = backlog(&cfg_path);
    assert_eq!(code, Some(1), "a server that cannot be reached is an error");
    assert!(v[0]["error"].is_string(), "{v}");
}

/// `GET /metrics` is Prometheus text, read here by a parser, whose counters
/// match what was sent: 200 events (delivered after a few 503s) and 3
/// bodies that are no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent() {
    use prometheus_parse::{Scrape, Value};
    let rec = Recorder::default();
    let (dir, setup, cfg_path, cfg, _cleanup) = one_server("metrics", &rec, 2).await;
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    server.wait_started(Duration::from_secs(30));
    publish(&cfg.broker, "hr", events("metrics", 200)).await;
    publish(&cfg.broker, "hr", vec![b"not an event".to_vec(); 3]).await;
    rec.wait_for(200, Duration::from_secs(60), "every event")
        .await;

    let url = format!("http://{}/metrics", setup.admin);
    let scrape = |text: &str| {
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
    };
    let value = |scrape: &Scrape, name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .and_then(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    };
    // The last delivery is counted a moment after the target saw it.
    let mut text = String::new();
    for _ in 0..50 {
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(TEST_READ_TOKEN)
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status().as_u16(), 200);
        text = response.text().await.expect("body");
        let s = scrape(&text);
        if value(&s, "provring_delivered_total") == Some(200.0)
            && value(&s, "provring_invalid_total") == Some(3.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = scrape(&text);
    println!("{text}");
    assert_eq!(value(&s, "provring_delivered_total"), Some(200.0), "{text}");
    assert_eq!(value(&s, "provring_invalid_total"), Some(3.0), "{text}");
    assert_eq!(value(&s, "provring_stored_total"), Some(200.0), "{text}");
    assert!(
        value(&s, "provring_received_total").is_some_and(|v| v >= 203.0),
        "{text}"
    );
    assert!(
        value(&s, "provring_retried_total").is_some_and(|v| v > 0.0),
        "the 503s are counted: {text}"
    );
    assert_eq!(value(&s, "provring_parked_total"), Some(0.0), "{text}");
    assert_eq!(value(&s, "provring_backlog_items"), Some(0.0), "{text}");
    assert!(
        value(&s, "provring_state").is_some_and(|v| v >= 8.0),
        "{text}"
    );
    // Every delivery is in the latency histogram.
    let delivered_in_histogram = s
        .samples
        .iter()
        .find(|x| x.metric == "provring_delivery_seconds")
        .and_then(|x| match &x.value {
            Value::Histogram(buckets) => buckets.last().map(|b| b.count),
            _ => None,
        });
    assert_eq!(delivered_in_histogram, Some(200.0), "{text}");
    assert!(server.stop(Duration::from_secs(30)).success());
}
