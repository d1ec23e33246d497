//! The broker the tests share: which one, a namespace per test, publishing
//! into adaptor queues, reading the parking queue, and deleting what a test
//! declared.

use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use provring::config::{BrokerConfig, Config};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The broker the tests use: `PROVRING_TEST_AMQP` if set, else RabbitMQ on
/// 127.0.0.1:5672, else a private node started from `broker/start-local.sh`.
pub fn amqp_uri() -> String {
    static URI: OnceLock<String> = OnceLock::new();
    URI.get_or_init(|| {
        if let Ok(uri) = std::env::var("PROVRING_TEST_AMQP") {
            return uri;
        }
        if std::net::TcpStream::connect_timeout(&"127.0.0.1:5672".parse().expect("addr"), Duration::from_secs(1)).is_ok() {
            return "amqp://guest:guest@127.0.0.1:5672/%2f".into();
        }
        start_private_broker(5673).unwrap_or_else(|e| {
            panic!(
                "no RabbitMQ for the tests: set PROVRING_TEST_AMQP=amqp://…, start one on 127.0.0.1:5672 \
                 (apt-get install rabbitmq-server, or docker compose up rabbitmq), or install rabbitmq-server \
                 so that broker/start-local.sh can start a private node ({e})"
            )
        })
    })
    .clone()
}

/// Start (or reuse) a private node on `port`; returns its URI.
pub fn start_private_broker(port: u16) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/start-local.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(port.to_string())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `rabbitmqctl` against the private node on `port`.
pub fn rabbitmqctl(port: u16, args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .args(["-q", "-n", &format!("provring-{port}@localhost")])
        .args(args)
        .status()
        .expect("run rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// A fresh namespace, so that tests can share a broker.
pub fn namespace(test: &str) -> String {
    format!("t-{test}-{:06x}", rand::random::<u32>() & 0xffffff)
}

/// Publish raw bodies to adaptor queue `queue`, with confirms.
pub async fn publish(broker: &BrokerConfig, queue: &str, bodies: Vec<Vec<u8>>) {
    provring::publish::publish_bodies(broker, queue, bodies.into_iter(), false)
        .await
        .expect("publish");
}

/// `n` valid synthetic provisioning events with ids `{run}-{i}`.
pub fn events(run: &str, n: u64) -> Vec<Vec<u8>> {
    provring::publish::generated(
        provring::config::AdaptorKind::Provisioning,
        run.to_owned(),
        n,
    )
    .collect()
}

/// Take every message from the namespace's parking queue and open its
/// sealed body with the cluster key: (body, x-provring-reason).
pub async fn drain_parking(config: &Config) -> Vec<(Vec<u8>, String)> {
    let keys =
        provring::crypto::KeyRing::load(&config.security.key_file, &[]).expect("cluster key");
    let broker = &config.broker;
    let b = provring::broker::Broker::new(broker.clone(), "test");
    let ch = b.channel().await.expect("channel");
    let queue = format!("{}.parking", broker.namespace);
    let mut out = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
    {
        let header = |name: &str| {
            m.delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
                .map(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    other => format!("{other:?}"),
                })
                .unwrap_or_default()
        };
        let ad = provring::crypto::event_ad(
            provring::crypto::Sealed::Parked,
            &header("x-provring-source"),
            &header("x-provring-id"),
            &header("x-provring-type"),
        );
        let body = keys
            .open(&ad, &m.delivery.data)
            .expect("a parked body opens with the cluster key and its identity");
        out.push((body, header("x-provring-reason")));
    }
    b.close().await;
    out
}

/// Delete the namespace's queues and exchange.
pub async fn cleanup(broker: &BrokerConfig, queues: &[&str]) {
    let b = provring::broker::Broker::new(broker.clone(), "test cleanup");
    if let Ok(ch) = b.channel().await {
        // What every server declares besides the adaptor queues.
        let mut system = vec!["parking".to_owned(), "topology".to_owned()];
        for o in ["a", "b", "c", "d"] {
            for m in ["a", "b", "c", "d"] {
                if o != m {
                    system.push(format!("backup:{o}:{m}"));
                }
            }
            system.push(format!("handover.feed_{o}"));
        }
        let queues: Vec<String> = queues.iter().map(|q| q.to_string()).chain(system).collect();
        for q in &queues {
            let _ = ch
                .queue_delete(
                    format!("{}.{q}", broker.namespace).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = ch
            .exchange_delete(
                format!("{}.events", broker.namespace).as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    b.close().await;
}

/// Deletes the namespace's queues when dropped, also when a test panics,
/// so that failed runs leave nothing on a shared broker.
pub struct Cleanup {
    broker: BrokerConfig,
    queues: Vec<String>,
}

impl Cleanup {
    pub fn new(broker: &BrokerConfig, queues: &[&str]) -> Cleanup {
        Cleanup {
            broker: broker.clone(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let broker = self.broker.clone();
        let queues = std::mem::take(&mut self.queues);
        // Drop may run inside the test's runtime: clean up on a thread of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let names: Vec<&str> = queues.iter().map(String::as_str).collect();
                rt.block_on(cleanup(&broker, &names));
            }
        })
        .join();
    }
}
