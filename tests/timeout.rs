//! The timeout checker with real processes: overdue events are parked once
//! and reported in one mail, also when the checker's host is killed in the
//! middle of a check.

mod common;

use common::*;
use provring::topology::State;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// A ring a, b, c, feed_b with a 3 s timeout, one check a second, mails to
/// `smtp`. The target never answers 200 (so nothing finishes by itself), or
/// with `slow`, takes 300 ms per event, two at a time.
async fn ring(
    test: &str,
    dir: &Path,
    smtp: &SmtpSink,
    slow: bool,
) -> (
    Recorder,
    std::collections::HashMap<String, ServerProc>,
    std::collections::HashMap<String, String>,
    provring::config::Config,
    Cleanup,
) {
    let recorder = Recorder::default();
    let hook = recorder.start().await;
    let port = smtp.start().await;
    let mut setup = Setup::new(test, &hook);
    if slow {
        recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(300));
        setup.concurrency = 2;
    } else {
        recorder.behaviour.lock().expect("lock").unavailable_until =
            Some(Instant::now() + Duration::from_secs(3600));
        // After its first failed attempt an item waits two minutes: only
        // the timeout checker can finish it within the test.
        setup.backoff = ("2m", "5m");
    }
    setup.extra = format!(
        "[timeout_checker]\ncheck_interval = \"1s\"\n\n{}",
        alerts(port)
    );
    let nodes = ["a", "b", "c"];
    let (path, admins) = setup.write_ring(dir, &nodes);
    let toml = std::fs::read_to_string(&path).expect("read cluster file");
    let toml = toml.replace(
        "[adaptors.feed_b]\n",
        "[adaptors.feed_b]\ntimeout = \"3s\"\n",
    );
    std::fs::write(&path, toml).expect("write cluster file");
    let config = load(&path);
    assert_eq!(
        config.adaptor_timeout("feed_b"),
        Duration::from_secs(3),
        "the test's adaptor timeout is in the file"
    );
    let cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let servers = start_servers(&path, dir, &nodes);
    let state: State = admin_get(&admins["b"], "/topology")
        .await
        .expect("topology");
    assert_eq!(state.singletons["timeout-checker"], "a");
    (recorder, servers, admins, config, cleanup)
}

/// An update event for `user` with id `id` and, if given, a `deadline`.
fn event(id: &str, deadline: Option<std::time::SystemTime>) -> Vec<u8> {
    let mut v = serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "/hr",
        "type": "io.provring.account.update",
        "data": {"userName": id, "title": "x"}
    });
    if let Some(d) = deadline {
        v["deadline"] = humantime::format_rfc3339_millis(d).to_string().into();
    }
    v.to_string().into_bytes()
}

/// Wait until `n` distinct events reached the target (and failed).
async fn attempted(recorder: &Recorder, n: usize) {
    eventually(Duration::from_secs(60), "first attempts", || {
        let r = recorder.record.lock().expect("lock");
        r.arrivals
            .iter()
            .map(|(_, _, id)| id)
            .collect::<BTreeSet<_>>()
            .len()
            >= n
    })
    .await;
}

/// Messages on the namespace's parking queue, left in place.
async fn parking_len(broker: &provring::config::BrokerConfig) -> u32 {
    let b = provring::broker::Broker::new(broker.clone(), "test");
    let Ok(ch) = b.channel().await else {
        return 0;
    };
    let n = ch
        .queue_declare(
            format!("{}.parking", broker.namespace).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    b.close().await;
    n
}

/// Parked event id → the reasons it was parked with.
async fn parked(config: &provring::config::Config) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (body, reason) in drain_parking(config).await {
        let v: serde_json::Value = serde_json::from_slice(&body).expect("parked body");
        let id = v["id"].as_str().expect("id").to_owned();
        out.entry(id).or_default().push(reason);
    }
    out
}

/// A mail as written, with quoted-printable soft breaks and escapes undone.
fn quoted_printable(m: &str) -> String {
    let joined = m.replace("=\n", "");
    let mut out = String::with_capacity(joined.len());
    let mut rest = joined.as_str();
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let hex = rest
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 3..];
            }
            None => {
                out.push('=');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Summary mails by Message-ID: (how many times received, event ids listed
/// as parked).
fn mails(smtp: &SmtpSink) -> BTreeMap<String, (usize, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
    for m in smtp.messages.lock().expect("lock").iter() {
        let m = &quoted_printable(m);
        if !m.contains("timeout check") {
            continue;
        }
        let id = m
            .lines()
            .find_map(|l| {
                l.strip_prefix("Message-ID:")
                    .or_else(|| l.strip_prefix("Message-Id:"))
            })
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mut listed = BTreeSet::new();
        let mut in_parked = false;
        for line in m.lines() {
            if line.starts_with("Parked (") {
                in_parked = true;
            } else if !line.starts_with(' ') {
                in_parked = false;
            } else if in_parked && let Some(rest) = line.strip_prefix("  feed_b /hr ") {
                listed.insert(rest.trim().to_owned());
            }
        }
        let e = out.entry(id).or_insert((0, BTreeSet::new()));
        e.0 += 1;
        e.1.extend(listed);
    }
    out
}

/// Each id parked once with reason `timed out`, and listed as parked in
/// exactly one summary mail.
fn assert_parked_once_and_mailed_once(
    ids: &BTreeSet<String>,
    parked: &BTreeMap<String, Vec<String>>,
    mails: &BTreeMap<String, (usize, BTreeSet<String>)>,
) {
    for id in ids {
        let reasons = parked.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            reasons.len(),
            1,
            "{id} parked {} times: {reasons:?}",
            reasons.len()
        );
        assert!(
            reasons[0].starts_with("timed out: "),
            "{id} parked with reason {:?}",
            reasons[0]
        );
        let listed_in: Vec<&String> = mails
            .iter()
            .filter(|(_, (_, listed))| listed.contains(id))
            .map(|(mid, _)| mid)
            .collect();
        assert_eq!(listed_in.len(), 1, "{id} is in mails {listed_in:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overdue_events_are_parked_once_and_reported_in_one_mail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = SmtpSink::default();
    let (recorder, _servers, admins, config, _cleanup) =
        ring("timeout_once", dir.path(), &smtp, false).await;
    let now = std::time::SystemTime::now();
    let mut bodies: Vec<Vec<u8>> = (0..30)
        .map(|i| event(&format!("plain-{i}"), None))
        .collect();
    // The event's own deadline takes precedence over the adaptor's timeout,
    // later or earlier.
    bodies.push(event("later", Some(now + Duration::from_secs(8))));
    bodies.push(event("never", Some(now + Duration::from_secs(3600))));
    publish(&config.broker, "feed-b", bodies).await;
    attempted(&recorder, 32).await;
    let published = Instant::now();

    let broker = config.broker.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while parking_len(&broker).await < 31 {
        assert!(
            Instant::now() < deadline,
            "not every overdue event was parked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = published.elapsed();
    // Three more checks: nothing is parked again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let parked = parked(&config).await;
    let mails = mails(&smtp);
    let mut ids: BTreeSet<String> = (0..30).map(|i| format!("plain-{i}")).collect();
    ids.insert("later".into());
    assert_parked_once_and_mailed_once(&ids, &parked, &mails);
    assert!(parked["later"][0].contains("the event's deadline"));
    assert!(parked["plain-0"][0].contains("adaptor timeout"));
    assert!(
        !parked.contains_key("never"),
        "an event before its deadline was parked"
    );
    assert_eq!(parked.len(), 31);
    let backlog: provring::admin::BacklogView =
        admin_get(&admins["b"], "/backlog").await.expect("backlog");
    let left: usize = backlog.adaptors.iter().map(|a| a.items).sum();
    assert_eq!(left, 1, "only the event with a later deadline is left");
    assert!(
        mails.values().all(|(n, _)| *n == 1),
        "a mail was sent twice"
    );
    let state: State = admin_get(&admins["c"], "/topology")
        .await
        .expect("topology");
    assert!(state.timeout_checks.pending.is_none());
    assert_eq!(state.timeout_checks.last as usize, mails.len());
    println!(
        "31 overdue events parked within {took:?} of their first attempt, in {} checks and {} mails",
        state.timeout_checks.last,
        mails.len()
    );
}

/// How a test takes the timeout checker away from a in the middle of a check.
#[derive(PartialEq)]
enum CutShort {
    Kill,
    Move,
}

/// 2,000 overdue events on b; the checker's host a loses the checker as soon
/// as its first check parks something; c finishes.
async fn check_cut_short(test: &str, how: CutShort) {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = SmtpSink::default();
    let (recorder, mut servers, admins, config, _cleanup) =
        ring(test, dir.path(), &smtp, false).await;
    let n = 2_000;
    let ids: BTreeSet<String> = (0..n).map(|i| format!("stuck-{i}")).collect();
    publish(
        &config.broker,
        "feed-b",
        ids.iter().map(|id| event(id, None)).collect(),
    )
    .await;
    attempted(&recorder, n).await;

    // Take the checker away as soon as its first check parks something: the
    // check is recorded, and its items are being parked at b.
    let broker = config.broker.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while parking_len(&broker).await == 0 {
        assert!(Instant::now() < deadline, "no check started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match how {
        CutShort::Kill => servers.get_mut("a").expect("a").kill9(),
        CutShort::Move => {
            let path = dir.path().join("cluster.toml").display().to_string();
            let (code, out, err) = tokio::task::spawn_blocking(move || {
                provring(&["move", "--config", &path, "timeout-checker", "--to", "c"])
            })
            .await
            .expect("provring move");
            assert_eq!(code, 0, "provring move: {out}{err}");
        }
    }
    let at_kill = parking_len(&broker).await;
    let killed = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(90);
    while parking_len(&broker).await < n as u32 {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} overdue events parked",
            parking_len(&broker).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_parked = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state: State = admin_get(&admins["b"], "/topology")
        .await
        .expect("topology");
    assert_eq!(state.servers["a"].failed, how == CutShort::Kill);
    assert_eq!(state.singletons["timeout-checker"], "c");
    assert!(state.timeout_checks.pending.is_none());
    let parked = parked(&config).await;
    let mails = mails(&smtp);
    assert_parked_once_and_mailed_once(&ids, &parked, &mails);
    assert_eq!(parked.len(), ids.len());
    // The check a started was finished, and reported, by c. (A move may
    // come too late for that: a finishes its check, c runs the next ones.)
    let finished_by_c = smtp
        .messages
        .lock()
        .expect("lock")
        .iter()
        .map(|m| quoted_printable(m))
        .any(|m| m.contains("started by a") && m.contains("finished by c"));
    if how == CutShort::Kill {
        assert!(finished_by_c, "no check started by a was finished by c");
    }
    assert_eq!(state.timeout_checks.last as usize, mails.len());
    let received: usize = mails.values().map(|(n, _)| *n).sum();
    println!(
        "a lost the checker after {at_kill} of {n} were parked; all parked {all_parked:?} after; \
         {} checks, {} distinct mails ({received} received); a check of a finished by c: {finished_by_c}",
        state.timeout_checks.last,
        mails.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_cut_short_by_a_kill_of_its_host_is_finished_by_the_taker() {
    check_cut_short("timeout_kill", CutShort::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_cut_short_by_a_move_of_the_checker_is_finished_by_its_new_host() {
    check_cut_short("timeout_move", CutShort::Move).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_is_never_both_delivered_and_parked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = SmtpSink::default();
    let (recorder, _servers, admins, config, _cleanup) =
        ring("timeout_race", dir.path(), &smtp, true).await;
    // 200 events at 300 ms each, two at a time, take 30 s: the checker
    // parks the ones still waiting after 3 s while b delivers others, and
    // asks about the ones in flight until they are delivered.
    let n = 200;
    let ids: BTreeSet<String> = (0..n).map(|i| format!("race-{i}")).collect();
    publish(
        &config.broker,
        "feed-b",
        ids.iter().map(|id| event(id, None)).collect(),
    )
    .await;
    let b = admins["b"].clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let backlog: provring::admin::BacklogView =
            admin_get(&b, "/backlog").await.expect("backlog");
        // Empty before b has stored anything proves nothing: wait until
        // every event was delivered or parked, too.
        let finished = recorder.distinct_effects() + parking_len(&config.broker).await as usize;
        if backlog.adaptors.iter().all(|a| a.items == 0) && finished >= n as usize {
            break;
        }
        assert!(Instant::now() < deadline, "b still has a backlog");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let parked = parked(&config).await;
    let delivered: BTreeSet<String> = recorder
        .record
        .lock()
        .expect("lock")
        .effects
        .keys()
        .filter_map(|k| k.strip_prefix("/hr|").map(str::to_owned))
        .collect();
    let both: Vec<&String> = delivered
        .iter()
        .filter(|id| parked.contains_key(*id))
        .collect();
    assert!(both.is_empty(), "delivered and parked: {both:?}");
    let twice: Vec<&String> = parked
        .iter()
        .filter(|(_, r)| r.len() > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "parked twice: {twice:?}");
    let seen: BTreeSet<String> = delivered.iter().chain(parked.keys()).cloned().collect();
    assert_eq!(seen, ids, "every event delivered or parked");
    assert!(
        parked.len() > 100 && delivered.len() > 5,
        "{} parked, {} delivered: the test shows nothing",
        parked.len(),
        delivered.len()
    );
    assert_eq!(recorder.duplicate_deliveries(), 0);
    println!(
        "{} delivered, {} parked, none both",
        delivered.len(),
        parked.len()
    );
}
