//! The cluster key with real processes and a real broker: nothing provring
//! writes reveals a secret, a server with another key cannot join, and
//! records forged without the key change nothing.

mod common;

use common::*;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use provring::admin::BacklogView;
use provring::config::Config;
use provring::crypto::{Context, KeyRing};
use provring::topology::{Change, Record};
use std::path::Path;
use std::time::{Duration, Instant};

const PASSWORD: &str = "Pw-7f3a9c-correct-horse";
const SMTP_PASSWORD: &str = "Smtp-41d2e8-battery-staple";
const TOKEN: &str = "Tok-9be07d-target-bearer";

fn password_event(id: &str, user: &str) -> Vec<u8> {
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "/directory",
        "type": "io.provring.password.change",
        "datacontenttype": "application/json",
        "data": {"userName": user, "password": PASSWORD},
    })
    .to_string()
    .into_bytes()
}

/// Every queue of `namespace` on the test broker.
fn queues_of(namespace: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
        .expect("rabbitmqctl list_queues");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&format!("{namespace}.")))
        .map(str::to_owned)
        .collect()
}

/// The bodies and header values of every message on the namespace's
/// queues. With `take`, messages are consumed; without, they are read and
/// put back. The topology stream is read from its start.
async fn broker_messages(config: &Config, take: bool) -> Vec<Vec<u8>> {
    let b = provring::broker::Broker::new(config.broker.clone(), "test scan");
    let mut out = Vec::new();
    for queue in queues_of(&config.broker.namespace) {
        let ch = b.channel().await.expect("channel");
        if queue.ends_with(".topology") {
            ch.basic_qos(100, BasicQosOptions::default())
                .await
                .expect("qos");
            let mut args = FieldTable::default();
            args.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "scan".into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .expect("consume topology");
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
            {
                out.push(d.data.clone());
                let _ = d.ack(lapin::options::BasicAckOptions::default()).await;
            }
        } else {
            while let Ok(Some(m)) = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: take })
                .await
            {
                if let Some(h) = m.delivery.properties.headers() {
                    for v in h.inner().values() {
                        out.push(format!("{v:?}").into_bytes());
                    }
                }
                out.push(m.delivery.data);
            }
        }
        // Closing the channel requeues what was read without an ack.
        let _ = ch.close(200, "scanned".into()).await;
    }
    b.close().await;
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every file below `dir`, recursively.
fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Where each secret was found (the admin API's operator token included:
/// the test's requests to the admin API present it).
fn leaks(what: &str, bytes: &[u8]) -> Vec<String> {
    [PASSWORD, SMTP_PASSWORD, TOKEN, TEST_TOKEN]
        .iter()
        .filter(|s| contains(bytes, s))
        .map(|s| format!("{s} in {what}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_reaches_a_disk_the_broker_or_a_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = SmtpSink::default();
    // SMTP credentials go only over TLS (check-config refuses them else).
    let (smtp_port, smtp_ca) = smtp.start_tls(dir.path()).await;
    let recorder = Recorder::default();
    // The target is down at first, so that a backlog builds up.
    recorder.behaviour.lock().expect("lock").unavailable_until =
        Some(Instant::now() + Duration::from_secs(3600));
    recorder
        .behaviour
        .lock()
        .expect("lock")
        .reject_ids
        .insert("pw-park".into());
    let hook = recorder.start().await;
    let mut setup = Setup::new("trust_secrets", &hook);
    setup.extra = format!(
        "{alerts}tls = \"tls\"\nca_file = {ca:?}\nusername = \"provring\"\npassword = {SMTP_PASSWORD:?}\n\n\
         [targets.hook.auth]\nbearer_token = {TOKEN:?}\n\n\
         [adaptors.pw]\nkind = \"password\"\nqueue = \"pw\"\nserver = \"a\"\ntarget = \"hook\"\nconcurrency = 4\n",
        alerts = alerts(smtp_port),
        ca = smtp_ca.display().to_string(),
    );
    let (path, admins) = setup.write_ring(dir.path(), &["a", "b", "c"]);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c", "pw"]);
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let debug = "debug";
    let mut servers: std::collections::HashMap<String, ServerProc> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                ServerProc::start_logging(&path, n, log(n), debug),
            )
        })
        .collect();
    for s in servers.values_mut() {
        s.wait_started(Duration::from_secs(60));
    }

    // c (a's monitor) stops on purpose: a's copies wait on the broker.
    servers
        .get_mut("c")
        .expect("c")
        .stop(Duration::from_secs(30));
    let mut bodies: Vec<Vec<u8>> = (0..20)
        .map(|i| password_event(&format!("pw-{i}"), &format!("user{i}")))
        .collect();
    bodies.push(password_event("pw-park", "parked-user"));
    assert!(
        contains(&bodies[0], PASSWORD),
        "the events carry the password"
    );
    publish(&config.broker, "pw", bodies).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: BacklogView = admin_get(&admins["a"], "/backlog").await.expect("backlog");
        if v.adaptors
            .iter()
            .any(|a| a.adaptor == "pw" && a.items == 21)
        {
            break;
        }
        assert!(Instant::now() < deadline, "a never held the 21 events");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The copies for c are on the broker now: read them and put them back.
    let waiting = broker_messages(&config, false).await;
    assert!(
        waiting.len() >= 2,
        "nothing waited on the broker: the scan proves nothing"
    );
    let mut found: Vec<String> = waiting
        .iter()
        .flat_map(|m| leaks("a message waiting on the broker", m))
        .collect();

    // A move hands the backlog over through the broker…
    let (code, out, err) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            provring(&[
                "move",
                "--config",
                &path.display().to_string(),
                "pw",
                "--to",
                "b",
            ])
        }
    })
    .await
    .expect("provring move");
    assert_eq!(code, 0, "provring move failed: {out}{err}");
    // …and kill -9 of its new host makes a take it over again, with a mail.
    servers.get_mut("b").expect("b").kill9();
    eventually(
        Duration::from_secs(30),
        "a takes b over, with a mail",
        || smtp.count("server b failed") > 0,
    )
    .await;
    let state = topology_of(&admins["a"]).await;
    assert!(state.servers["b"].failed, "b was taken over");
    assert_eq!(state.adaptors["pw"], "a");

    // The target comes back: 20 delivered, one parked.
    recorder.behaviour.lock().expect("lock").unavailable_until = None;
    recorder
        .wait_for(20, Duration::from_secs(60), "password changes delivered")
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut parked = Vec::new();
    while parked.is_empty() {
        assert!(Instant::now() < deadline, "pw-park was never parked");
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Read the parking queue raw first: the body must be sealed there.
        let raw = broker_messages(&config, false).await;
        found.extend(raw.iter().flat_map(|m| leaks("the broker", m)));
        parked = drain_parking(&config).await;
    }
    assert!(
        contains(&parked[0].0, PASSWORD),
        "the parked body opens with the key to the original event"
    );
    for s in servers.values_mut() {
        if s.is_running() {
            s.stop(Duration::from_secs(30));
        }
    }

    for m in broker_messages(&config, true).await {
        found.extend(leaks("a message left on the broker", &m));
    }
    for n in ["a", "b", "c"] {
        let text = std::fs::read(log(n)).expect("log");
        assert!(
            contains(&text, "DEBUG"),
            "server {n} did not log at debug level: the search proves less"
        );
        found.extend(leaks(&format!("the log of {n}"), &text));
        for f in files_below(&dir.path().join(format!("data-{n}"))) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            found.extend(leaks(&f.display().to_string(), &bytes));
        }
    }
    assert!(found.is_empty(), "secrets found: {found:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_with_another_key_refuses_to_start_and_the_fleet_goes_on() {
    let smtp = SmtpSink::default();
    let smtp_port = smtp.start().await;
    let recorder = Recorder::default();
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("trust_wrong_key", &hook);
    setup.extra = alerts(smtp_port);
    let (path, admins) = setup.write_ring(dir.path(), &["a", "b", "c"]);
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &["a", "b", "c"]);
    let fleet = key_ring(dir.path()).fingerprint();

    // c stops on purpose and comes back with a key of its own.
    let status = servers
        .get_mut("c")
        .expect("c")
        .stop(Duration::from_secs(30));
    assert!(status.success());
    let other = dir.path().join("other.key");
    let theirs = provring::crypto::keygen(&other).expect("keygen");
    let node_file = dir.path().join("node-c.toml");
    std::fs::write(
        &node_file,
        format!("[security]\nkey_file = {:?}\n", other.display().to_string()),
    )
    .expect("write node file");
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let (path, node_file) = (path.clone(), node_file.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_provring"))
                .args(["server", "--config"])
                .arg(&path)
                .arg("--config")
                .arg(&node_file)
                .args(["--node", "c"])
                .env("RUST_LOG", "info,lapin=off")
                .output()
                .expect("run provring server")
        }
    })
    .await
    .expect("server c");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success(), "c started with another key");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "c took {:?} to give up",
        started.elapsed()
    );
    assert!(
        stderr.contains(&fleet) && stderr.contains(&theirs),
        "the error names both fingerprints ({fleet}, {theirs})"
    );
    assert!(
        !stderr.contains("Server started."),
        "c got as far as starting"
    );

    // The fleet keeps delivering; nothing was taken over, no mail was sent.
    publish(&config.broker, "feed-a", events("wrong-key-a", 100)).await;
    publish(&config.broker, "feed-b", events("wrong-key-b", 100)).await;
    recorder
        .wait_for(200, Duration::from_secs(60), "a and b deliver")
        .await;
    let state = topology_of(&admins["a"]).await;
    for n in ["a", "b", "c"] {
        assert!(!state.servers[n].failed, "{n} was taken over");
    }
    assert!(state.servers["c"].stopping, "c is still stopped on purpose");
    assert_eq!(
        state.servers["c"].key_fingerprint.as_deref(),
        Some(fleet.as_str())
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        smtp.messages.lock().expect("lock").len(),
        0,
        "a mail was sent"
    );
    // The fleet saw c's record and said so, naming the claimed proposer.
    let logs = servers["a"].log_text() + &servers["b"].log_text();
    assert!(
        logs.contains("without a valid MAC") && logs.contains("claimed_proposer=c"),
        "no warning about c's records:\n{logs}"
    );
    // c's foreign record is now the latest of c in the log: a fleet server
    // restarting after it still starts (b's records verify).
    let a = servers.get_mut("a").expect("a");
    assert!(a.stop(Duration::from_secs(30)).success());
    *a = ServerProc::start(&path, "a", dir.path().join("a-again.log"));
    a.wait_started(Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_records_change_nothing() {
    let ring = Ring::start("trust_forged", &["a", "b"], Duration::ZERO, 8).await;
    let (config, admins) = (&ring.config, &ring.admins);
    let ns = &config.broker.namespace;
    let before = topology_of(&admins["a"]).await;
    // b monitors a: it holds a's copies.
    publish(&config.broker, "feed-a", events("forged-1", 50)).await;
    ring.recorder
        .wait_for(50, Duration::from_secs(60), "first events")
        .await;
    let held = |v: &BacklogView| {
        v.copies
            .iter()
            .find(|c| c.origin == "a")
            .map(|c| (c.generation, c.items))
    };

    // Forgeries: a takeover of a by b, unsigned, under another key, and
    // under the fleet's key id with a made-up MAC.
    let stranger = KeyRing::random().expect("key");
    let fleet = key_ring(ring.dir.path());
    let takeover = serde_json::to_vec(&Record {
        id: "forged-takeover".into(),
        proposer: "b".into(),
        expected_epoch: before.epoch,
        at_ms: None,
        change: Change::Takeover {
            failed: "a".into(),
            by: "b".into(),
        },
    })
    .expect("json");
    let mut fake_mac = takeover.clone();
    fake_mac.extend_from_slice(&hex_id(&fleet.fingerprint()));
    fake_mac.extend_from_slice(&[0x42; 32]);
    let topology_forgeries = vec![
        takeover.clone(),
        stranger.sign(Context::Topology, takeover.clone()),
        fake_mac,
        // A genuine mirror record is not a topology record either.
        fleet.sign(Context::Mirror, takeover.clone()),
    ];
    // A mirror `begin` of a new generation would wipe b's copies of a; a
    // `copy` would add an item.
    let begin =
        provring::mirror::wire::encode("a", u64::MAX / 2, &provring::mirror::wire::Body::Begin);
    let mirror_forgeries = vec![
        begin.clone(),
        stranger.sign(Context::Mirror, begin.clone()),
        fleet.sign(Context::Topology, begin.clone()),
    ];
    let b = provring::broker::Broker::new(config.broker.clone(), "forger");
    let ch = b.channel().await.expect("channel");
    for (queue, bodies) in [
        (format!("{ns}.topology"), topology_forgeries),
        (
            provring::broker::declare::backup_queue(ns, "a", "b"),
            mirror_forgeries,
        ),
    ] {
        for body in bodies {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
    }
    b.close().await;

    // Nothing moves, nothing is stored; the fleet goes on delivering.
    publish(&config.broker, "feed-a", events("forged-2", 50)).await;
    ring.recorder
        .wait_for(100, Duration::from_secs(60), "events after the forgeries")
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = topology_of(&admins["a"]).await;
    assert!(
        !after.servers["a"].failed,
        "the forged takeover was applied"
    );
    assert_eq!(after.adaptors["feed_a"], "a");
    assert_eq!(
        after.epoch, before.epoch,
        "a forged record changed the epoch"
    );
    let copies_after = held(&admin_get(&admins["b"], "/backlog").await.expect("backlog"));
    assert_ne!(
        copies_after.map(|c| c.0),
        Some(u64::MAX / 2),
        "a forged begin replaced b's copies of a"
    );
    let logs = ring.servers["a"].log_text() + &ring.servers["b"].log_text();
    assert!(
        logs.contains("Topology record without a valid MAC ignored"),
        "no warning about the forged topology records"
    );
    assert!(
        logs.contains("mirror record without a valid MAC"),
        "no warning about the forged mirror records"
    );
}

/// The 8 bytes a fingerprint (16 hex digits) stands for.
fn hex_id(fingerprint: &str) -> Vec<u8> {
    (0..fingerprint.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&fingerprint[i..i + 2], 16).expect("hex"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_wants_tokens_and_cuts_off_slow_clients() {
    let recorder = Recorder::default();
    let hook = recorder.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new("trust_admin", &hook);
    setup.admin = free_addr();
    setup.extra = "[admin]\nheader_read_timeout = \"1s\"\nmax_body = 4096\n".into();
    let path = setup.write(dir.path());
    let config = load(&path);
    let _cleanup = Cleanup::new(&config.broker, &["hr"]);
    let mut server = ServerProc::start(&path, "a", dir.path().join("a.log"));
    server.wait_started(Duration::from_secs(60));
    // The parking queue is there from the start, before anything is parked.
    let broker = provring::broker::Broker::new(config.broker.clone(), "test");
    let channel = broker.channel().await.expect("channel");
    let parking = format!("{}.parking", config.broker.namespace);
    assert_eq!(
        provring::broker::drain::ready(&channel, &parking)
            .await
            .expect("passive declare"),
        Some(0),
        "{parking} is not declared at start"
    );
    broker.close().await;
    let base = format!("http://{}", setup.admin);
    let http = reqwest::Client::new();
    let peer = key_ring(dir.path()).peer_tokens()[0].clone();
    let status = |r: reqwest::Response| r.status().as_u16();

    let get = |path: &str, token: Option<&str>| {
        let mut r = http.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(status(get("/health", None).await.expect("health")), 200);
    let no_token = get("/backlog", None).await.expect("backlog");
    assert_eq!(no_token.status().as_u16(), 401);
    assert_eq!(
        no_token
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    assert_eq!(
        status(get("/backlog", Some("prt_guess")).await.expect("backlog")),
        401
    );
    assert_eq!(
        status(get("/state", Some(TEST_READ_TOKEN)).await.expect("state")),
        200
    );
    let page: provring::admin::ItemsView = get("/backlog/items?limit=5", Some(TEST_READ_TOKEN))
        .await
        .expect("items")
        .json()
        .await
        .expect("items json");
    assert_eq!((page.total, page.next), (0, None));

    let post = |path: &str, token: &str, body: Vec<u8>| {
        http.post(format!("{base}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // A read token does not stop a server; an operate token does not
    // reach the peer routes.
    assert_eq!(
        status(
            post("/stop", TEST_READ_TOKEN, Vec::new())
                .await
                .expect("stop")
        ),
        403
    );
    assert!(server.is_running());
    assert_eq!(
        status(
            post("/timeout/park", TEST_TOKEN, b"{}".to_vec())
                .await
                .expect("park")
        ),
        403
    );
    assert_eq!(
        status(
            post("/timeout/park", &peer, b"{not json".to_vec())
                .await
                .expect("park")
        ),
        400
    );
    assert_eq!(
        status(
            post("/timeout/park", &peer, vec![b' '; 10_000])
                .await
                .expect("park")
        ),
        413
    );
    // Every refusal is JSON, {"error": why}, with its status code.
    for (response, code) in [
        (get("/backlog", None).await.expect("backlog"), 401),
        (
            post("/stop", TEST_READ_TOKEN, Vec::new())
                .await
                .expect("stop"),
            403,
        ),
        (
            post("/timeout/park", &peer, b"{not json".to_vec())
                .await
                .expect("park"),
            400,
        ),
        (
            get("/backlog/items?limit=many", Some(TEST_READ_TOKEN))
                .await
                .expect("items"),
            400,
        ),
        (
            get("/no/such/route", Some(TEST_READ_TOKEN))
                .await
                .expect("route"),
            404,
        ),
    ] {
        assert_eq!(response.status().as_u16(), code);
        let body: serde_json::Value = response.json().await.expect("a JSON refusal");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{code}: {body}"
        );
    }

    // A client that sends its headers a byte at a time is cut off after
    // admin.header_read_timeout (1 s).
    let started = Instant::now();
    let cut_off = tokio::spawn({
        let addr = setup.admin.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            for b in request {
                if stream.write_all(&[*b]).await.is_err() {
                    return "write refused".to_string();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
                    Ok(Ok(0)) => return "closed".to_string(),
                    Ok(Ok(n)) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                    Ok(Err(_)) => return "reset".to_string(),
                    Err(_) => {}
                }
            }
            "served".to_string()
        }
    });
    let outcome = cut_off.await.expect("slow client");
    println!("slow client: {outcome} after {:?}", started.elapsed());
    assert_ne!(outcome, "served", "the slow client was served in full");
    assert!(
        !outcome.contains("200 OK"),
        "the slow client was answered: {outcome}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "cut off only after {:?}",
        started.elapsed()
    );
    // The server still serves, and an operate token stops it.
    assert_eq!(status(get("/health", None).await.expect("health")), 200);
    assert_eq!(
        status(post("/stop", TEST_TOKEN, Vec::new()).await.expect("stop")),
        202
    );
    assert!(server.wait(Duration::from_secs(30)).success());
}
