//! The topology log and mirroring across a ring of three real `provring`
//! servers on the real RabbitMQ: every replica reaches the same state, the
//! log settles races, bad mirror records are ignored, and a server whose
//! cluster file differs from the log's does not start.

mod common;

use common::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use provring::admin::{BacklogView, ItemsView};
use provring::mirror::wire::{self, Body};
use provring::topology::State;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["a", "b", "c"];
const FEEDS: [&str; 3] = ["feed-a", "feed-b", "feed-c"];
const START: Duration = Duration::from_secs(60);

/// Poll `f` until it gives `Ok`, or panic with its last `Err` after `within`.
async fn until<T, Fut>(within: Duration, what: &str, mut f: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every server's `GET /topology`, once they all report the same state
/// and `ok` holds for it.
async fn agreed_state(
    admins: &HashMap<String, String>,
    what: &str,
    ok: impl Fn(&State) -> bool,
) -> State {
    until(Duration::from_secs(30), what, || async {
        let mut states = Vec::new();
        for n in NODES {
            states.push(admin_get::<State>(&admins[n], "/topology").await?);
        }
        if states.iter().any(|s| *s != states[0]) {
            let epochs: Vec<u64> = states.iter().map(|s| s.epoch).collect();
            return Err(format!("replicas differ (epochs {epochs:?})"));
        }
        if !ok(&states[0]) {
            return Err(format!("state not reached: {:?}", states[0]));
        }
        Ok(states.remove(0))
    })
    .await
}

fn monitors(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, m)| (n.to_string(), m.to_string()))
        .collect()
}

fn link(cfg: &Path, node: &str, monitors: &str) {
    let cfg = cfg.to_str().expect("utf-8 path");
    let (code, out, err) = provring(&[
        "topology",
        "link",
        "--config",
        cfg,
        "--node",
        node,
        "--monitors",
        monitors,
    ]);
    assert_eq!(code, 0, "link {node} → {monitors}: {out}{err}");
    assert!(
        out.starts_with("applied:"),
        "link {node} → {monitors}: {out}"
    );
}

/// Links, a stop and a restart, then a fresh replay of the whole log by
/// `provring topology show` gives exactly the running servers' state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_replay_reaches_the_state_of_the_running_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let setup = Setup::new("replay", &rec.start().await);
    let (cfg_path, admins) = setup.write_ring(dir.path(), &NODES);
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &FEEDS);
    let mut servers = start_servers(&cfg_path, dir.path(), &NODES);

    // Reverse the ring, one link at a time: a→c, b→a, c→b.
    link(&cfg_path, "a", "c");
    link(&cfg_path, "b", "a");
    link(&cfg_path, "c", "b");
    // A stop on purpose (`stopping`) and a restart (`joined`).
    let b = servers.get_mut("b").expect("b");
    let status = b.stop(Duration::from_secs(30));
    assert!(
        status.success(),
        "b exited with {status}; log:\n{}",
        b.log_text()
    );
    assert!(
        b.log_text().contains("Intentional stop announced"),
        "b's log:\n{}",
        b.log_text()
    );
    let mut b = ServerProc::start(&cfg_path, "b", dir.path().join("b2.log"));
    b.wait_started(START);
    servers.insert("b".into(), b);

    // Init, 3 joins, 3 links, b stopping, b joining again.
    let state = agreed_state(&admins, "epoch 9 on every server", |s| s.epoch == 9).await;
    assert_eq!(
        state.monitors,
        monitors(&[("a", "c"), ("b", "a"), ("c", "b")])
    );
    assert!(!state.servers["b"].stopping, "b joined again: {state:?}");
    assert_eq!(state.servers["b"].joined_epoch, Some(8));

    let (code, out, err) = provring(&[
        "topology",
        "show",
        "--config",
        cfg_path.to_str().expect("utf-8"),
        "--json",
    ]);
    assert_eq!(code, 0, "topology show: {out}{err}");
    let replayed: State = serde_json::from_str(out.trim()).expect("show --json prints a State");
    assert_eq!(
        replayed, state,
        "a fresh replay differs from the running servers"
    );
    for n in NODES {
        let live: State = admin_get(&admins[n], "/topology")
            .await
            .expect("GET /topology");
        assert_eq!(replayed, live, "server {n} differs from a fresh replay");
    }
}

/// Two proposals for the same epoch, at the same time: exactly one applies,
/// and every server applies that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_changes_for_one_epoch_apply_the_same_on_every_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let setup = Setup::new("cas", &rec.start().await);
    let (cfg_path, admins) = setup.write_ring(dir.path(), &NODES);
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &FEEDS);
    let _servers = start_servers(&cfg_path, dir.path(), &NODES);

    let before = agreed_state(&admins, "every server joined", |s| s.epoch == 4).await;
    let epoch = before.epoch.to_string();
    let spawn = |node: &str, monitors: &str| {
        Command::new(env!("CARGO_BIN_EXE_provring"))
            .args(["topology", "link", "--config"])
            .arg(&cfg_path)
            .args([
                "--node",
                node,
                "--monitors",
                monitors,
                "--expect-epoch",
                &epoch,
            ])
            .env("RUST_LOG", "warn,lapin=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn provring topology link")
    };
    let (first, second) = (spawn("a", "c"), spawn("b", "a"));
    let outcomes: Vec<(i32, String)> = [first, second]
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("wait for link");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.code().unwrap_or(-1), text)
        })
        .collect();
    let codes: Vec<i32> = outcomes.iter().map(|(c, _)| *c).collect();
    assert!(
        codes == [0, 2] || codes == [2, 0],
        "one link applies (0), the other is refused (2): {outcomes:?}"
    );
    let loser = &outcomes[if codes[0] == 2 { 0 } else { 1 }].1;
    let refusal = format!(
        "not applied: expected epoch {}, the log is at epoch {}",
        before.epoch,
        before.epoch + 1
    );
    assert!(loser.contains(&refusal), "loser says why: {loser}");

    let expected = if codes[0] == 0 {
        monitors(&[("a", "c"), ("c", "a")]) // a monitors c; b no longer does
    } else {
        monitors(&[("a", "b"), ("b", "a")]) // b monitors a; c no longer does
    };
    let after = agreed_state(&admins, "the winning change everywhere", |s| {
        s.epoch == before.epoch + 1
    })
    .await;
    assert_eq!(
        after.monitors, expected,
        "the applied change is the winner's: {outcomes:?}"
    );
}

/// Records on `c`'s backup queue that are damaged, from an unknown origin,
/// or of an older generation: `b` (c's monitor) logs why, applies none of
/// them, and keeps running with the copies it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mirror_records_are_ignored_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    // The target is down for the whole test, so c keeps its backlog.
    rec.behaviour.lock().expect("lock").unavailable_until =
        Some(Instant::now() + Duration::from_secs(600));
    let setup = Setup::new("badmirror", &rec.start().await);
    let (cfg_path, admins) = setup.write_ring(dir.path(), &NODES);
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &FEEDS);
    let mut servers = start_servers(&cfg_path, dir.path(), &NODES);

    let n = 20;
    publish(&cfg.broker, "feed-c", events("bad", n)).await;
    until(
        Duration::from_secs(30),
        "b to hold copies of all of c's items",
        || async {
            let view: BacklogView = admin_get(&admins["b"], "/backlog").await?;
            match view.copies.iter().find(|o| o.origin == "c") {
                Some(o) if o.items == n as usize => Ok(()),
                other => Err(format!("copies of c: {other:?}")),
            }
        },
    )
    .await;
    let held: ItemsView = all_items(&admins["b"]).await.expect("GET /backlog/items");
    let generation = held.generations["c"];
    assert_eq!(held.copies["c"].len(), n as usize);

    // Every item of c's first batches, as if they had finished.
    let finished: Vec<(String, u64, u32)> = (0..32u64)
        .flat_map(|seq| (0..n as u32).map(move |idx| ("feed_c".to_owned(), seq, idx)))
        .collect();
    // Signed with the cluster key (so that the checks behind the MAC are
    // what refuses them), but the first, which has no MAC at all.
    let keys = key_ring(dir.path());
    let sign = |b: Vec<u8>| keys.sign(provring::crypto::Context::Mirror, b);
    let bad = [
        b"this is not a mirror record".to_vec(),
        sign(b"this is not a mirror record either".to_vec()),
        sign(wire::encode("zz", generation, &Body::End { batches: 0 })),
        sign(wire::encode("c", generation - 1, &Body::Begin)),
        sign(wire::encode(
            "c",
            generation - 1,
            &Body::Remove { finished },
        )),
    ];
    let broker = provring::broker::Broker::new(cfg.broker.clone(), "test");
    let ch = broker.channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let queue = format!("{}.backup:c:b", cfg.broker.namespace);
    for body in &bad {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .expect("basic.publish");
        assert!(
            confirm.await.expect("confirm").is_ack(),
            "the broker took the record"
        );
    }
    broker.close().await;

    let b = servers.get_mut("b").expect("b");
    let reasons = [
        "mirror record without a valid MAC",
        "malformed mirror record",
        "unknown origin \"zz\"",
        &format!("stale generation {}", generation - 1),
    ];
    let mut warned = String::new();
    until(Duration::from_secs(20), "b's warnings", || {
        warned = b
            .log_text()
            .lines()
            .filter(|l| l.contains("Mirror records ignored."))
            .collect::<Vec<_>>()
            .join("\n");
        let missing: Vec<&&str> = reasons.iter().filter(|r| !warned.contains(**r)).collect();
        std::future::ready(if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("no warning with {missing:?}"))
        })
    })
    .await;
    println!("b's warnings:\n{warned}");
    assert!(b.is_running(), "b stopped; log:\n{}", b.log_text());

    let after: ItemsView = all_items(&admins["b"]).await.expect("GET /backlog/items");
    assert_eq!(
        after.generations["c"], generation,
        "b's generation of c's copies changed"
    );
    assert_eq!(
        after.copies["c"], held.copies["c"],
        "b's copies of c changed"
    );
}

/// A server whose cluster file differs from the one the log was
/// initialised with refuses to start, and says which key differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_different_cluster_file_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let setup = Setup::new("mismatch", &rec.start().await);
    let (cfg_path, admins) = setup.write_ring(dir.path(), &NODES);
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &FEEDS);
    let mut a = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    a.wait_started(START);

    // Same namespace and servers; feed_c on b instead of c; a fresh data dir.
    let text = std::fs::read_to_string(&cfg_path).expect("read cluster file");
    let changed = text
        .replace("server = \"c\"", "server = \"b\"")
        .replace("data-c", "data-c-other");
    assert_ne!(text, changed);
    let other = dir.path().join("other.toml");
    std::fs::write(&other, changed).expect("write other cluster file");

    let mut c = ServerProc::start(&other, "c", dir.path().join("c.log"));
    let status = c.wait(Duration::from_secs(20));
    let log = c.log_text();
    assert!(
        !status.success(),
        "c started with a different cluster file; log:\n{log}"
    );
    assert!(
        log.contains(r#"adaptors.feed_c.server: the topology log has "c", this file has "b""#),
        "c's log names the key:\n{log}"
    );
    assert!(
        log.contains("differs from the cluster in the topology log"),
        "c's log:\n{log}"
    );

    // c never joined; a is undisturbed.
    assert!(a.is_running(), "a stopped; log:\n{}", a.log_text());
    let state: State = admin_get(&admins["a"], "/topology")
        .await
        .expect("GET /topology");
    assert_eq!(state.servers["c"].joined_epoch, None, "c joined: {state:?}");
    assert_eq!(state.adaptors["feed_c"], "c");
}
