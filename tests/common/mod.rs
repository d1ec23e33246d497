//! Shared test helpers: a broker to talk to, a namespace per test, real
//! `provring` processes, a recording webhook target, publishing, parking.
#![allow(dead_code)]

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use provring::config::{BrokerConfig, Config};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// A free local port for an admin address, never one handed out before in
/// this test process (the OS may offer a port again once its listener is
/// closed, and two servers of one ring would then share it).
pub fn free_addr() -> String {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Mutex::default);
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        if given.lock().expect("lock").insert(addr.port()) {
            return addr.to_string();
        }
    }
}

/// A fresh namespace, so that tests can share a broker.
pub fn namespace(test: &str) -> String {
    format!("t-{test}-{:06x}", rand::random::<u32>() & 0xffffff)
}

/// Test settings on top of the defaults.
pub struct Setup {
    pub uri: String,
    pub namespace: String,
    pub webhook: String,
    pub max_message_size: usize,
    pub concurrency: usize,
    pub grace: &'static str,
    /// `servers.a.admin_listen`.
    pub admin: String,
    /// `retry.initial_backoff` and `retry.max_backoff`.
    pub backoff: (&'static str, &'static str),
    pub extra: String,
}

impl Setup {
    pub fn new(test: &str, webhook: &str) -> Setup {
        Setup {
            uri: amqp_uri(),
            namespace: namespace(test),
            webhook: webhook.to_owned(),
            max_message_size: 1024 * 1024,
            concurrency: 16,
            grace: "5s",
            admin: "127.0.0.1:0".into(),
            backoff: ("100ms", "1s"),
            extra: String::new(),
        }
    }

    /// Write the cluster file (one server `a`, adaptor `hr` → webhook).
    pub fn write(&self, dir: &Path) -> PathBuf {
        let toml = format!(
            r#"
[broker]
uris = [{uri:?}]
namespace = {ns:?}
prefetch = 500
reconnect_min = "100ms"
reconnect_max = "1s"
publish_timeout = "5s"

[servers.a]
admin_listen = {admin:?}
data_dir = {data:?}

[adaptors.hr]
kind = "provisioning"
queue = "hr"
server = "a"
target = "hook"
concurrency = {concurrency}

[targets.hook]
kind = "webhook"
url = {hook:?}
timeout = "2s"
allow_insecure_http = true

[retry]
attempts = 100
initial_backoff = {initial:?}
max_backoff = {max_backoff:?}
deadline = "10m"

[limits]
max_message_size = {max}

[shutdown]
grace = {grace:?}

{security}
{extra}
"#,
            security = security_section(dir),
            uri = self.uri,
            ns = self.namespace,
            data = dir.join("data-a").display().to_string(),
            concurrency = self.concurrency,
            hook = self.webhook,
            max = self.max_message_size,
            grace = self.grace,
            admin = self.admin,
            initial = self.backoff.0,
            max_backoff = self.backoff.1,
            extra = self.extra,
        );
        let path = dir.join("cluster.toml");
        std::fs::write(&path, toml).expect("write cluster.toml");
        path
    }
}

impl Setup {
    /// Write a cluster file of servers `nodes` in one ring (each monitors
    /// the next by id), each hosting adaptor `feed_<node>` (queue
    /// `feed-<node>`) → webhook. Returns the file and each server's admin
    /// address.
    pub fn write_ring(&self, dir: &Path, nodes: &[&str]) -> (PathBuf, HashMap<String, String>) {
        let mut admins = HashMap::new();
        let mut servers = String::new();
        let mut adaptors = String::new();
        for n in nodes {
            let admin = free_addr();
            servers.push_str(&format!(
                "[servers.{n}]\nadmin_listen = {admin:?}\ndata_dir = {data:?}\n\n",
                data = dir.join(format!("data-{n}")).display().to_string(),
            ));
            adaptors.push_str(&format!(
                "[adaptors.feed_{n}]\nkind = \"provisioning\"\nqueue = \"feed-{n}\"\nserver = \"{n}\"\ntarget = \"hook\"\nconcurrency = {c}\n\n",
                c = self.concurrency,
            ));
            admins.insert(n.to_string(), admin);
        }
        let toml = format!(
            r#"
[broker]
uris = [{uri:?}]
namespace = {ns:?}
prefetch = 500
reconnect_min = "100ms"
reconnect_max = "1s"
publish_timeout = "5s"

{servers}
{adaptors}
[targets.hook]
kind = "webhook"
url = {hook:?}
timeout = "2s"
allow_insecure_http = true

[retry]
attempts = 100
initial_backoff = {initial:?}
max_backoff = {max_backoff:?}
deadline = "10m"

[limits]
max_message_size = {max}

[shutdown]
grace = {grace:?}

{security}
{extra}
"#,
            security = security_section(dir),
            uri = self.uri,
            ns = self.namespace,
            hook = self.webhook,
            max = self.max_message_size,
            grace = self.grace,
            initial = self.backoff.0,
            max_backoff = self.backoff.1,
            extra = self.extra,
        );
        let path = dir.join("cluster.toml");
        std::fs::write(&path, toml).expect("write cluster.toml");
        (path, admins)
    }
}

/// The operator token every test cluster file accepts (role `operate`).
pub const TEST_TOKEN: &str = "prt_test-operator-token";
/// A token with role `read`.
pub const TEST_READ_TOKEN: &str = "prt_test-read-token";

/// The `[security]` section of a test cluster in `dir`.
pub fn security_section(dir: &Path) -> String {
    format!(
        "[security]\nkey_file = {key:?}\n\n\
         [[security.admin_tokens]]\nname = \"test-operator\"\nrole = \"operate\"\nsha256 = {op:?}\n\n\
         [[security.admin_tokens]]\nname = \"test-reader\"\nrole = \"read\"\nsha256 = {read:?}\n",
        key = cluster_key(dir).display().to_string(),
        op = provring::admin::auth::token_hash(TEST_TOKEN),
        read = provring::admin::auth::token_hash(TEST_READ_TOKEN),
    )
}

/// The test's cluster key, `<dir>/cluster.key`, written on first use.
pub fn cluster_key(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.key");
    if !path.exists() {
        provring::crypto::keygen(&path).expect("write the cluster key");
    }
    path
}

/// The key ring of the test in `dir` (see [`cluster_key`]).
pub fn key_ring(dir: &Path) -> std::sync::Arc<provring::crypto::KeyRing> {
    std::sync::Arc::new(
        provring::crypto::KeyRing::load(&cluster_key(dir), &[]).expect("load the cluster key"),
    )
}

/// Start one server per node of `config` (logs `<dir>/<node>.log`) and wait
/// until each has started.
pub fn start_servers(config: &Path, dir: &Path, nodes: &[&str]) -> HashMap<String, ServerProc> {
    let mut servers: HashMap<String, ServerProc> = nodes
        .iter()
        .map(|n| {
            let log = dir.join(format!("{n}.log"));
            (n.to_string(), ServerProc::start(config, n, log))
        })
        .collect();
    for s in servers.values_mut() {
        s.wait_started(Duration::from_secs(60));
    }
    servers
}

/// GET `path` from a server's admin API as JSON.
pub async fn admin_get<T: serde::de::DeserializeOwned>(
    admin: &str,
    path: &str,
) -> Result<T, String> {
    let url = format!("http://{admin}{path}");
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(TEST_TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    response
        .json::<T>()
        .await
        .map_err(|e| format!("{url}: {e}"))
}

/// Every page of `GET /backlog/items`, merged into one view.
pub async fn all_items(admin: &str) -> Result<provring::admin::ItemsView, String> {
    let mut all: provring::admin::ItemsView = admin_get(admin, "/backlog/items").await?;
    while let Some(after) = all.next.take() {
        let page: provring::admin::ItemsView =
            admin_get(admin, &format!("/backlog/items?after={after}")).await?;
        all.own.extend(page.own);
        for (origin, items) in page.copies {
            all.copies.entry(origin).or_default().extend(items);
        }
        all.next = page.next;
    }
    Ok(all)
}

/// Run `provring` with `args`; (exit code, stdout, stderr).
pub fn provring(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(args)
        .env("RUST_LOG", "warn,lapin=off")
        .output()
        .expect("run provring");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`provring`] on a blocking thread, so that the test's target and mail
/// server keep answering meanwhile.
pub async fn provring_async(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        provring(&refs)
    })
    .await
    .expect("provring")
}

/// Wait until `fetch` of one of `nodes` gives a topology for which `ok`
/// holds.
pub async fn wait_topology<F, Fut>(
    nodes: &[&str],
    within: Duration,
    what: &str,
    fetch: F,
    ok: impl Fn(&provring::topology::State) -> bool,
) -> provring::topology::State
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Option<provring::topology::State>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        for n in nodes {
            if let Some(s) = fetch(n.to_string()).await
                && ok(&s)
            {
                return s;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn load(path: &Path) -> Config {
    provring::config::load(&[path.to_owned()]).expect("test config is valid")
}

/// A `provring server` process started from the built binary.
pub struct ServerProc {
    pub child: Child,
    pub log: PathBuf,
}

impl ServerProc {
    pub fn start(config: &Path, node: &str, log: PathBuf) -> ServerProc {
        ServerProc::start_logging(config, node, log, "info,lapin=off")
    }

    /// Start with the log filter `rust_log` (`RUST_LOG`).
    pub fn start_logging(config: &Path, node: &str, log: PathBuf, rust_log: &str) -> ServerProc {
        // A fresh log per start, so that readiness is read from this run.
        let file = std::fs::File::create(&log).expect("open server log");
        let child = Command::new(env!("CARGO_BIN_EXE_provring"))
            .args(["server", "--config"])
            .arg(config)
            .args(["--node", node])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn provring");
        ServerProc { child, log }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("send signal");
    }

    /// Wait until the server has logged that it started (signal handlers
    /// are in place from then on).
    pub fn wait_started(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log_text().contains("Server started.") {
            assert!(
                self.is_running(),
                "server exited during start; log:\n{}",
                self.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "server did not start within {within:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM once started, then wait for the exit.
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        self.wait_started(within);
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(within)
    }

    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "server did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the recording webhook saw.
#[derive(Default)]
pub struct Record {
    /// Every request, in arrival order: (Idempotency-Key, body identity).
    pub requests: Vec<(String, String)>,
    /// Effects applied, by body identity ("source|id"): applied once per
    /// Idempotency-Key, as an idempotent target would.
    pub effects: HashMap<String, u32>,
    /// Keys already applied.
    pub keys: HashSet<String>,
    /// Requests answered with a failure.
    pub failed: u64,
    /// Event types applied per `data.userName`, in order.
    pub by_user: HashMap<String, Vec<String>>,
    /// Every request as it arrived: (time, `X-Provring-Node`, identity).
    pub arrivals: Vec<(Instant, String, String)>,
}

/// Behaviour of the recording webhook.
#[derive(Default)]
pub struct Behaviour {
    /// Answer 503 to everything until then.
    pub unavailable_until: Option<Instant>,
    /// Event ids answered with 400.
    pub reject_ids: HashSet<String>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Wait a random time up to this long before answering.
    pub jitter: Option<Duration>,
    /// Event types answered with 503 the first time each event is seen.
    pub fail_first_type: Option<String>,
    /// Events already failed once.
    pub failed_once: HashSet<String>,
    /// Answer 503 to events of this type until then.
    pub fail_type_until: Option<(String, Instant)>,
}

#[derive(Clone, Default)]
pub struct Recorder {
    pub record: Arc<Mutex<Record>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
}

impl Recorder {
    /// Serve on 127.0.0.1 (a free port); returns the webhook URL.
    pub async fn start(&self) -> String {
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/events")
    }

    pub fn distinct_effects(&self) -> usize {
        self.record.lock().expect("lock").effects.len()
    }

    /// Wait until `n` distinct events had their effect, or panic.
    pub async fn wait_for(&self, n: usize, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        let mut last = (0, Instant::now());
        loop {
            let got = self.distinct_effects();
            if got >= n {
                return;
            }
            if got != last.0 {
                last = (got, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "{what}: only {got} of {n} events reached the target within {within:?} (no progress for {:?})",
                last.1.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until no request has arrived for `quiet` (re-deliveries of
    /// items whose completion a kill lost come after the first effects).
    pub async fn wait_quiet(&self, quiet: Duration, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = (usize::MAX, Instant::now());
        loop {
            let n = self.record.lock().expect("lock").requests.len();
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return;
            }
            assert!(Instant::now() < deadline, "the target never went quiet");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every one of `total` events had its effect, and none twice.
    pub fn assert_delivered_once(&self, total: u64) {
        let r = self.record.lock().expect("lock");
        assert_eq!(r.effects.len() as u64, total, "lost events");
        let twice: Vec<_> = r.effects.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "effects applied twice: {twice:?}");
    }

    /// Requests whose Idempotency-Key had been seen before.
    pub fn duplicate_deliveries(&self) -> u64 {
        let r = self.record.lock().expect("lock");
        let mut seen = HashSet::new();
        r.requests
            .iter()
            .filter(|(k, _)| !seen.insert(k.clone()))
            .count() as u64
    }
}

async fn receive(State(rec): State<Recorder>, headers: HeaderMap, body: String) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let id = json["id"].as_str().unwrap_or("").to_owned();
    let identity = format!("{}|{}", json["source"].as_str().unwrap_or(""), id);
    let node = headers
        .get("x-provring-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    rec.record
        .lock()
        .expect("lock")
        .arrivals
        .push((Instant::now(), node, identity.clone()));
    let (delay, jitter) = {
        let b = rec.behaviour.lock().expect("lock");
        (b.delay, b.jitter)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if let Some(j) = jitter {
        tokio::time::sleep(j.mul_f64(rand::random::<f64>())).await;
    }
    {
        let mut b = rec.behaviour.lock().expect("lock");
        let event_type = json["type"].as_str().unwrap_or("").to_owned();
        let type_down = b
            .fail_type_until
            .as_ref()
            .is_some_and(|(t, until)| *t == event_type && Instant::now() < *until);
        if type_down
            || (b.fail_first_type.as_deref() == Some(event_type.as_str())
                && b.failed_once.insert(identity.clone()))
        {
            rec.record.lock().expect("lock").failed += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let unavailable = b.unavailable_until.is_some_and(|t| Instant::now() < t);
        if unavailable || b.reject_ids.contains(&id) {
            rec.record.lock().expect("lock").failed += 1;
            return if unavailable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
        }
    }
    let mut r = rec.record.lock().expect("lock");
    r.requests.push((key.clone(), identity.clone()));
    if r.keys.insert(key) {
        *r.effects.entry(identity).or_default() += 1;
        let user = json["data"]["userName"].as_str().unwrap_or("").to_owned();
        let event_type = json["type"].as_str().unwrap_or("").to_owned();
        r.by_user.entry(user).or_default().push(event_type);
    }
    StatusCode::OK
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

/// Items left in a stopped server's repository. Opened on a thread with a
/// runtime of its own, shut down before returning, so that the sled file
/// lock is released before a server is started on the same directory.
pub async fn repository_items(data_dir: &Path) -> usize {
    let dir = data_dir.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let n = rt.block_on(async {
            let keys = key_ring(dir.parent().expect("data dirs sit in the test directory"));
            let repo = provring::repository::Repository::open(&dir, keys).expect("open repository");
            let n = repo.count_all();
            if n > 0 {
                let left = repo.pending("hr", 0, 20).unwrap_or_default();
                let ids: Vec<String> = left
                    .iter()
                    .map(|i| {
                        format!(
                            "{} (batch {} #{}, attempts {})",
                            i.id, i.seq, i.idx, i.state.attempts
                        )
                    })
                    .collect();
                println!("{n} items left in {}, first: {ids:?}", dir.display());
            }
            n
        });
        rt.shutdown_timeout(Duration::from_secs(5));
        n
    })
    .join()
    .expect("repository thread")
}

/// Poll `f` until it is true or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running ring of real servers behind one recording webhook that answers
/// after `delay`; its broker namespace is deleted when it is dropped.
pub struct Ring {
    pub recorder: Recorder,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub admins: HashMap<String, String>,
    pub config: Config,
    pub servers: HashMap<String, ServerProc>,
    _cleanup: Cleanup,
}

impl Ring {
    pub async fn start(test: &str, nodes: &[&str], delay: Duration, concurrency: usize) -> Ring {
        let recorder = Recorder::default();
        recorder.behaviour.lock().expect("lock").delay = Some(delay);
        let hook = recorder.start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut setup = Setup::new(test, &hook);
        setup.concurrency = concurrency;
        let (path, admins) = setup.write_ring(dir.path(), nodes);
        let config = load(&path);
        let feeds: Vec<String> = nodes.iter().map(|n| format!("feed-{n}")).collect();
        let feeds: Vec<&str> = feeds.iter().map(String::as_str).collect();
        let cleanup = Cleanup::new(&config.broker, &feeds);
        let servers = start_servers(&path, dir.path(), nodes);
        Ring {
            recorder,
            dir,
            path,
            admins,
            config,
            servers,
            _cleanup: cleanup,
        }
    }
}

/// A minimal SMTP server that keeps every message it receives.
#[derive(Clone, Default)]
pub struct SmtpSink {
    pub messages: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    pub async fn start(&self) -> u16 {
        self.serve(None).await
    }

    /// Serve SMTP over TLS from the first byte (`alerts.tls = "tls"`) with
    /// a certificate for 127.0.0.1 made now; returns the port and the PEM
    /// file of that certificate, for `alerts.ca_file`.
    pub async fn start_tls(&self, dir: &Path) -> (u16, PathBuf) {
        let cert =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let ca = dir.join("smtp-ca.pem");
        std::fs::write(&ca, cert.cert.pem()).expect("write CA file");
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        (self.serve(Some(acceptor)).await, ca)
    }

    async fn serve(&self, tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind smtp");
        let port = listener.local_addr().expect("addr").port();
        let messages = self.messages.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let messages = messages.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => smtp_session(stream, messages).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                smtp_session(stream, messages).await;
                            }
                        }
                    }
                });
            }
        });
        port
    }

    pub fn count(&self, needle: &str) -> usize {
        self.messages
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }
}

/// One SMTP conversation: every verb is accepted, authentication too, and
/// each message is kept.
async fn smtp_session<S>(stream: S, messages: Arc<Mutex<Vec<String>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = tokio::io::BufReader::new(read).lines();
    let _ = write.write_all(b"220 sink ESMTP\r\n").await;
    let mut data: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(body) = data.as_mut() {
            if line == "." {
                messages
                    .lock()
                    .expect("lock")
                    .push(data.take().unwrap_or_default());
                let _ = write.write_all(b"250 queued\r\n").await;
            } else {
                body.push_str(&line);
                body.push('\n');
            }
            continue;
        }
        let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
        let reply: &[u8] = match verb.as_str() {
            // Offer authentication, and take any credentials.
            "EHLO" => b"250-sink\r\n250 AUTH PLAIN LOGIN\r\n",
            "AUTH" => b"235 accepted\r\n",
            "DATA" => {
                data = Some(String::new());
                b"354 go on\r\n"
            }
            "QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                break;
            }
            _ => b"250 ok\r\n",
        };
        let _ = write.write_all(reply).await;
        let _ = write.flush().await;
    }
}

/// The `[alerts]` section for an [`SmtpSink`] on `port`.
pub fn alerts(port: u16) -> String {
    format!(
        "[alerts]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\nfrom = \"provring@example.test\"\nto = [\"ops@example.test\"]\ntimeout = \"5s\"\n"
    )
}

/// A private CA and certificates signed by it, in `dir`: `ca.pem`,
/// `server.pem`/`.key` (names 127.0.0.1 and localhost; the broker's and
/// every admin API's, also presented as a client certificate between
/// peers) and `client.pem`/`.key` (no name: a client only).
pub fn make_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "provring test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
    for (name, sans) in [
        (
            "server",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        ),
        ("client", vec![]),
    ] {
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
