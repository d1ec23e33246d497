//! AMQPS with a private CA and client certificates: a private RabbitMQ
//! node (broker/start-local.sh) that asks every TLS client for a
//! certificate; a server that trusts only the test's CA, presents its own
//! certificate, and loses nothing across a `kill -9` under load. A client
//! without a certificate is refused.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::Path;
use std::time::Duration;

const PORT: u16 = 5698;

/// ca.pem, server.pem/.key (for 127.0.0.1) and client.pem/.key in `dir`.
fn make_certificates(dir: &Path) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "provring test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
    for (name, sans) in [("server", vec!["127.0.0.1".to_owned()]), ("client", vec![])] {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("provring test {name}"));
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
    }
}

fn stop_node() {
    let _ = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/stop-local.sh"))
        .arg(PORT.to_string())
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_with_a_private_ca_and_client_certificates_loses_nothing_across_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    make_certificates(&tls);
    // A node left over from an earlier run would hold other certificates.
    stop_node();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/start-local.sh");
    // The node's own directory (the default one: the node runs as the
    // rabbitmq user, which cannot enter the test's private directory).
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

    let rec = Recorder::default();
    rec.behaviour.lock().expect("lock").delay = Some(Duration::from_millis(2));
    let mut setup = Setup::new("brokertls", &rec.start().await);
    setup.uri = amqps.clone();
    setup.concurrency = 8;
    setup.extra = format!(
        "[broker.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        tls.join("ca.pem").display().to_string(),
        tls.join("client.pem").display().to_string(),
        tls.join("client.key").display().to_string()
    );
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);

    // Without a client certificate the broker refuses the connection.
    let mut no_cert = cfg.broker.clone();
    no_cert.tls = Some(provring::config::BrokerTlsConfig {
        ca_file: Some(tls.join("ca.pem")),
        cert_file: None,
        key_file: None,
    });
    let refused = provring::broker::Broker::new(no_cert, "no certificate")
        .channel()
        .await;
    assert!(refused.is_err(), "a client without a certificate got in");
    // Without the CA, the broker's certificate is not trusted.
    let mut no_ca = cfg.broker.clone();
    no_ca.tls = None;
    let untrusted = provring::broker::Broker::new(no_ca, "no CA")
        .channel()
        .await;
    assert!(
        untrusted.is_err(),
        "the test CA was trusted without ca_file"
    );

    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    server.wait_started(Duration::from_secs(60));
    publish(&cfg.broker, "hr", events("tls", 3000)).await;
    eventually(
        Duration::from_secs(60),
        "first deliveries over AMQPS",
        || rec.distinct_effects() >= 300,
    )
    .await;
    server.kill9();
    let at_kill = rec.distinct_effects();
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a-again.log"));
    server.wait_started(Duration::from_secs(60));
    rec.wait_for(3000, Duration::from_secs(120), "every event after the kill")
        .await;
    rec.wait_quiet(Duration::from_secs(1), Duration::from_secs(30))
        .await;
    let r = rec.record.lock().expect("lock");
    assert_eq!(r.effects.len(), 3000, "events lost");
    assert!(
        r.effects.values().all(|n| *n == 1),
        "an effect was applied twice"
    );
    println!("kill -9 after {at_kill} of 3000 over AMQPS; all delivered once");
    drop(r);
    assert!(
        server.log_text().contains("amqps://"),
        "the server did not connect over AMQPS"
    );
}
