//! A ring with TLS everywhere: AMQPS to a private RabbitMQ node that asks
//! every client for a certificate of the test's CA, the admin API over
//! HTTPS with mutual TLS between peers, and alert mail over SMTPS with a
//! password. The failover scenarios run on it in turn: `kill -9` under
//! load, a frozen server (SIGSTOP), and `provring move`; nothing is lost,
//! nothing is applied twice, and the takeover mails arrive over TLS.

mod common;

use common::*;
use provring::topology::State;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PORT: u16 = 5698;

fn stop_node() {
    let _ = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/stop-local.sh"))
        .arg(PORT.to_string())
        .output();
}

/// A client of the admin APIs that trusts only the test CA, presenting
/// `identity` (certificate, key) if given, and `token`.
fn https_client(ca: &Path, identity: Option<(&Path, &Path)>, token: &str) -> reqwest::Client {
    let mut tls = provring::tls::client_config(&provring::tls::ClientFiles {
        prefix: "test",
        ca_file: Some(ca),
        identity,
    })
    .expect("client TLS");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    provring::admin::client::builder_with_token(Some(token))
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

struct Admins {
    client: reqwest::Client,
    addresses: std::collections::HashMap<String, String>,
}

impl Admins {
    async fn topology(&self, node: &str) -> Option<State> {
        let url = format!("https://{}/topology", self.addresses[node]);
        self.client.get(url).send().await.ok()?.json().await.ok()
    }

    /// Wait until one of `nodes` reports a state for which `ok` holds.
    async fn wait(
        &self,
        nodes: &[&str],
        within: Duration,
        what: &str,
        ok: impl Fn(&State) -> bool,
    ) -> State {
        wait_topology(
            nodes,
            within,
            what,
            |n| async move { self.topology(&n).await },
            ok,
        )
        .await
    }
}

async fn status_of(client: &reqwest::Client, url: &str) -> Result<u16, String> {
    client
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_kill_freeze_and_move_with_tls_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    make_certificates(&tls);
    let file = |name: &str| -> PathBuf { tls.join(name) };
    // A node left over from an earlier run would hold other certificates.
    stop_node();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/start-local.sh");
    // The node's own directory (the node runs as the rabbitmq user, which
    // cannot enter the test's private directory).
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(PORT.to_string())
        .env("PROVRING_LOCAL_TLS_DIR", &tls)
        .output()
        .expect("start the TLS node");
    assert!(
        out.status.success(),
        "broker/start-local.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let amqps = stdout
        .lines()
        .find(|l| l.starts_with("amqps://"))
        .expect("an amqps URI")
        .to_owned();
    struct StopNode;
    impl Drop for StopNode {
        fn drop(&mut self) {
            stop_node();
        }
    }
    let _stop = StopNode;

    const SMTP_PASSWORD: &str = "smtp-secret-over-tls";
    let smtp = SmtpSink::default();
    let (smtp_port, smtp_ca) = smtp.start_tls(dir.path()).await;
    let recorder = Recorder::default();
    recorder.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(2));
    let mut setup = Setup::new("tls_ring", &recorder.start().await);
    setup.uri = amqps.clone();
    setup.concurrency = 8;
    let path_str = |p: PathBuf| p.display().to_string();
    setup.extra = format!(
        "[broker.tls]\nca_file = {ca:?}\ncert_file = {client:?}\nkey_file = {client_key:?}\n\n\
         [admin.tls]\nca_file = {ca:?}\ncert_file = {server:?}\nkey_file = {server_key:?}\n\n\
         {alerts}tls = \"tls\"\nca_file = {smtp_ca:?}\nusername = \"provring\"\npassword = {SMTP_PASSWORD:?}\n",
        ca = path_str(file("ca.pem")),
        client = path_str(file("client.pem")),
        client_key = path_str(file("client.key")),
        server = path_str(file("server.pem")),
        server_key = path_str(file("server.key")),
        alerts = alerts(smtp_port),
        smtp_ca = path_str(smtp_ca),
    );
    let nodes = ["a", "b", "c"];
    let (path, addresses) = setup.write_ring(dir.path(), &nodes);
    let config = load(&path);

    // Without a client certificate the broker refuses the connection;
    // without the CA its certificate is not trusted.
    let mut no_cert = config.broker.clone();
    no_cert.tls = Some(provring::config::BrokerTlsConfig {
        ca_file: Some(file("ca.pem")),
        cert_file: None,
        key_file: None,
    });
    let refused = provring::broker::Broker::new(no_cert, "no certificate")
        .channel()
        .await;
    assert!(refused.is_err(), "a client without a certificate got in");
    let mut no_ca = config.broker.clone();
    no_ca.tls = None;
    let untrusted = provring::broker::Broker::new(no_ca, "no CA")
        .channel()
        .await;
    assert!(
        untrusted.is_err(),
        "the test CA was trusted without ca_file"
    );

    let _cleanup = Cleanup::new(&config.broker, &["feed-a", "feed-b", "feed-c"]);
    let mut servers = start_servers(&path, dir.path(), &nodes);
    let admins = Admins {
        client: https_client(&file("ca.pem"), None, TEST_TOKEN),
        addresses: addresses.clone(),
    };

    // The admin API: HTTPS only; the peer token needs the cluster's
    // client certificate; an operator's token does not.
    let a = &addresses["a"];
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let answer = plain.get(format!("http://{a}/health")).send().await;
    assert!(answer.is_err(), "plain HTTP answered: {answer:?}");
    assert_eq!(
        status_of(&admins.client, &format!("https://{a}/health")).await,
        Ok(200)
    );
    let keys = key_ring(dir.path());
    let peer_token = keys.peer_tokens()[0].clone();
    let overdue = format!("https://{a}/timeout/overdue?limit=1");
    let no_cert = https_client(&file("ca.pem"), None, &peer_token);
    assert_eq!(status_of(&no_cert, &overdue).await, Ok(401));
    let with_cert = https_client(
        &file("ca.pem"),
        Some((&file("server.pem"), &file("server.key"))),
        &peer_token,
    );
    assert_eq!(status_of(&with_cert, &overdue).await, Ok(200));
    // A certificate of another CA does not get through the handshake.
    let other = dir.path().join("other-ca");
    std::fs::create_dir_all(&other).expect("other CA dir");
    make_certificates(&other);
    let stranger = https_client(
        &file("ca.pem"),
        Some((&other.join("server.pem"), &other.join("server.key"))),
        &peer_token,
    );
    assert!(
        status_of(&stranger, &overdue).await.is_err(),
        "a certificate of another CA got through"
    );
    assert_eq!(
        status_of(&admins.client, &format!("https://{a}/backlog")).await,
        Ok(200)
    );
    // `provring backlog` reads the cluster file's [admin.tls].
    let (code, out, err) =
        provring_async(&["backlog", "--config", &path.display().to_string()]).await;
    assert_eq!(code, 0, "provring backlog over HTTPS: {out}{err}");

    // 1. kill -9 under load.
    let mut total = 0u64;
    for feed in nodes {
        publish(
            &config.broker,
            &format!("feed-{feed}"),
            events(&format!("kill-{feed}"), 1500),
        )
        .await;
        total += 1500;
    }
    recorder
        .wait_for(500, Duration::from_secs(60), "first deliveries over AMQPS")
        .await;
    let killed_at = Instant::now();
    servers.get_mut("b").expect("b").kill9();
    let state = admins
        .wait(
            &["a", "c"],
            Duration::from_secs(30),
            "the takeover of b",
            |s| s.servers["b"].failed,
        )
        .await;
    println!(
        "b taken over by {:?} after {:?}",
        state.servers["b"].taken_over_by,
        killed_at.elapsed()
    );
    assert!(state.adaptors.values().all(|h| h != "b"));
    eventually(
        Duration::from_secs(15),
        "the takeover mail over SMTPS",
        || smtp.count("server b failed") >= 1,
    )
    .await;
    for feed in nodes {
        publish(
            &config.broker,
            &format!("feed-{feed}"),
            events(&format!("down-{feed}"), 500),
        )
        .await;
        total += 500;
    }
    let mut b = ServerProc::start(&path, "b", dir.path().join("b-again.log"));
    b.wait_started(Duration::from_secs(60));
    servers.insert("b".into(), b);
    admins
        .wait(&["a", "c"], Duration::from_secs(30), "b back", |s| {
            !s.servers["b"].failed && s.monitors.len() == 3
        })
        .await;
    recorder
        .wait_for(
            total as usize,
            Duration::from_secs(120),
            "every event after the kill",
        )
        .await;

    // 2. A frozen server is taken over and delivers nothing it surrendered.
    publish(&config.broker, "feed-c", events("freeze", 3000)).await;
    total += 3000;
    recorder
        .wait_for(
            total as usize - 2700,
            Duration::from_secs(60),
            "c delivering",
        )
        .await;
    let c = servers.get_mut("c").expect("c");
    c.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let state = admins
        .wait(
            &["a", "b"],
            Duration::from_secs(30),
            "the takeover of c",
            |s| s.servers["c"].failed,
        )
        .await;
    let taker = state.servers["c"].taken_over_by.clone().expect("taker");
    println!(
        "c taken over by {taker} {:?} after the freeze",
        frozen_at.elapsed()
    );
    if frozen_at.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_secs(3) - frozen_at.elapsed()).await;
    }
    let resumed_at = Instant::now();
    servers
        .get_mut("c")
        .expect("c")
        .signal(nix::sys::signal::Signal::SIGCONT);
    recorder
        .wait_for(
            total as usize,
            Duration::from_secs(120),
            "every event after the freeze",
        )
        .await;
    admins
        .wait(&["a", "b"], Duration::from_secs(30), "c back", |s| {
            !s.servers["c"].failed && s.monitors.len() == 3
        })
        .await;
    let from_c_after = recorder
        .record
        .lock()
        .expect("lock")
        .arrivals
        .iter()
        .filter(|(t, n, _)| *t >= resumed_at && n == "c")
        .count();
    assert_eq!(
        from_c_after, 0,
        "c delivered after it resumed, having been taken over"
    );
    eventually(Duration::from_secs(15), "the mail for c", || {
        smtp.count("server c failed") >= 1
    })
    .await;

    // 3. provring move: feed_c back to c, with a backlog.
    let host = admins.topology("a").await.expect("topology").adaptors["feed_c"].clone();
    assert_ne!(host, "c");
    publish(&config.broker, "feed-c", events("move", 2000)).await;
    total += 2000;
    recorder
        .wait_for(
            total as usize - 1800,
            Duration::from_secs(60),
            "feed_c delivering",
        )
        .await;
    let (code, out, err) = provring_async(&[
        "move",
        "--config",
        &path.display().to_string(),
        "feed_c",
        "--to",
        "c",
    ])
    .await;
    let moved_at = Instant::now();
    assert_eq!(code, 0, "provring move: {out}{err}");
    assert!(
        out.contains(&format!("backlog handed over by {host}")),
        "{out}"
    );
    recorder
        .wait_delivered_once(
            total,
            Duration::from_secs(120),
            "every event after the move",
        )
        .await;
    let from_old_host = recorder
        .record
        .lock()
        .expect("lock")
        .arrivals
        .iter()
        .filter(|(t, n, _)| *t >= moved_at && *n == host)
        .count();
    assert_eq!(
        from_old_host, 0,
        "{host} delivered after it handed feed_c over"
    );
    assert_eq!(smtp.count("server b failed"), 1, "mails for b");
    assert_eq!(smtp.count("server c failed"), 1, "mails for c");
    for (n, s) in &servers {
        assert!(
            !s.log_text().contains(SMTP_PASSWORD),
            "{n} logged the SMTP password"
        );
    }
    println!(
        "{total} events over AMQPS, HTTPS and SMTPS: none lost, none applied twice, {} duplicate deliveries",
        recorder.duplicate_deliveries()
    );
}
