//! `provring bench failover`: a 3-server ring of real `provring server`
//! processes under steady load; each run `kill -9`s a random server and
//! measures
//!
//! - kill → the taker consuming the failed server's queue (the takeover is
//!   in the topology and the queue has a consumer again), and
//! - kill → the first event of the failed server's feed, published before
//!   the kill, delivered by the taker (adopted backlog, or queued events).
//!
//! The failed server is restarted between runs. At the end every published
//! event must have reached the in-process webhook target: `lost` counts the
//! ones that did not; `double_effects` counts events applied under two
//! different idempotency keys.

use super::BenchError;
use crate::broker::{Broker, Publisher};
use crate::cli::FailoverArgs;
use crate::config::BrokerConfig;
use crate::event::{EventType, synthetic};
use crate::topology::State;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["s1", "s2", "s3"];

/// Result of `bench failover`.
pub struct FailoverReport {
    pub runs: usize,
    /// kill → taker consuming, ms per run.
    pub consuming_ms: Vec<f64>,
    /// kill → first adopted item delivered, ms per run.
    pub first_item_ms: Vec<f64>,
    pub lost: usize,
    pub double_effects: usize,
    pub published: usize,
    /// With `--soak`: its length, and the takeovers it saw (all false).
    pub soak: Option<(Duration, usize)>,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl FailoverReport {
    pub fn render(&self, json: bool) -> String {
        let c50 = percentile(&self.consuming_ms, 50.0).round();
        let c99 = percentile(&self.consuming_ms, 99.0).round();
        let f50 = percentile(&self.first_item_ms, 50.0).round();
        let f99 = percentile(&self.first_item_ms, 99.0).round();
        if json {
            return serde_json::json!({
                "runs": self.runs,
                "consuming_p50_ms": c50,
                "consuming_p99_ms": c99,
                "first_adopted_p50_ms": f50,
                "first_adopted_p99_ms": f99,
                "lost": self.lost,
                "double_effects": self.double_effects,
                "published": self.published,
                "soak_s": self.soak.map(|(d, _)| d.as_secs()),
                "false_takeovers": self.soak.map(|(_, n)| n),
            })
            .to_string();
        }
        let soak = self.soak.map_or(String::new(), |(d, n)| {
            format!(
                "\n  soak of {} with no failure: {n} takeovers (false)",
                humantime::format_duration(d)
            )
        });
        format!(
            "bench failover: {} runs, {} events published\n  kill → taker consuming          p50 {:>6} ms   p99 {:>6} ms\n  kill → first adopted delivered  p50 {:>6} ms   p99 {:>6} ms\n  lost {}, double effects {}{soak}",
            self.runs, self.published, c50, c99, f50, f99, self.lost, self.double_effects
        )
    }
}

#[derive(Default)]
struct Seen {
    /// identity → first arrival
    first: HashMap<String, Instant>,
    /// (identity, delivering node) → first arrival from that node
    by_node: HashMap<(String, String), Instant>,
    /// identity → idempotency keys applied
    keys: HashMap<String, HashSet<String>>,
}

async fn receive(
    AxState(seen): AxState<Arc<Mutex<Seen>>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let identity = format!(
        "{}|{}",
        json["source"].as_str().unwrap_or(""),
        json["id"].as_str().unwrap_or("")
    );
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let now = Instant::now();
    if let Ok(mut s) = seen.lock() {
        s.first.entry(identity.clone()).or_insert(now);
        s.by_node
            .entry((identity.clone(), header("x-provring-node")))
            .or_insert(now);
        s.keys
            .entry(identity)
            .or_default()
            .insert(header("idempotency-key"));
    }
    // A target with some latency, so that servers always hold a backlog
    // (the calls in flight).
    tokio::time::sleep(Duration::from_millis(40)).await;
    StatusCode::OK
}

struct Ring {
    config_path: std::path::PathBuf,
    dir: std::path::PathBuf,
    children: HashMap<String, Child>,
}

impl Ring {
    fn start(&mut self, node: &str) -> Result<(), BenchError> {
        let exe = std::env::current_exe().map_err(BenchError::Temp)?;
        let log = std::fs::File::create(self.dir.join(format!("{node}.log")))
            .map_err(BenchError::Temp)?;
        let child = Command::new(exe)
            .args(["server", "--config"])
            .arg(&self.config_path)
            .args(["--node", node])
            .env("RUST_LOG", "info,lapin=off")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(BenchError::Temp)?;
        self.children.insert(node.to_owned(), child);
        Ok(())
    }

    fn kill(&mut self, node: &str) {
        if let Some(mut c) = self.children.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for (_, mut c) in self.children.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn topology(client: &reqwest::Client, admin: &str) -> Option<State> {
    let r = client
        .get(format!("http://{admin}/topology"))
        .send()
        .await
        .ok()?;
    r.json::<State>().await.ok()
}

/// A state every live server agrees on and for which `ok` holds.
async fn wait_for_state(
    client: &reqwest::Client,
    admins: &[String],
    within: Duration,
    ok: impl Fn(&State) -> bool,
) -> Option<State> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for a in admins {
            if let Some(s) = topology(client, a).await
                && ok(&s)
            {
                return Some(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Whether every server has joined the ring (and is not failed) and each is
/// monitored.
fn all_joined(s: &State) -> bool {
    NODES.iter().all(|n| {
        s.servers
            .get(*n)
            .is_some_and(|x| x.joined_epoch.is_some() && !x.failed)
    }) && s.monitors.len() == NODES.len()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `provring bench failover`: set up a ring, load it, kill one server per
/// run and measure its takeover, then check that nothing was lost.
pub async fn failover(args: &FailoverArgs) -> Result<FailoverReport, BenchError> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let namespace = format!("bench-fo-{:08x}", rand::random::<u32>());
    let broker_config = super::bench_broker(&args.common(), &namespace)?;
    let dir = super::tempfile_dir()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let hook = serve_hook(seen.clone()).await?;
    let mut rig = Rig::start(dir.path(), &broker_config, &namespace, &hook, seen).await?;
    say(&format!(
        "ring of {} servers running ({})",
        NODES.len(),
        namespace
    ));
    let load = Load::start(&broker_config, &namespace, args.rate);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let soak = match args.soak {
        Some(length) => {
            let n = soak(&rig.client, &rig.all_admins(), length, args.burn, &say).await;
            Some((length, n))
        }
        None => None,
    };
    let mut consuming_ms = Vec::new();
    let mut first_item_ms = Vec::new();
    for run in 1..=args.runs {
        let kill = rig.kill_one().await?;
        let (consuming, first) = rig.measure(&kill, &load.published).await?;
        consuming_ms.push(millis(consuming));
        match first {
            Some(d) => first_item_ms.push(millis(d)),
            None => say(&format!(
                "run {run}: no unfinished event of {} was left to adopt",
                kill.victim
            )),
        }
        say(&format!(
            "run {run}/{}: killed {}, {} consuming after {:.0} ms, first adopted item after {}",
            args.runs,
            kill.victim,
            kill.taker,
            millis(consuming),
            first.map_or("-".into(), |d| format!("{:.0} ms", millis(d)))
        ));
        rig.restart(kill.victim).await?;
    }
    let ids = load.stop().await;
    let (missing, double_effects) = settle(&rig.seen, &ids).await;
    drop(rig);
    cleanup(&broker_config, &namespace).await;
    if args.keep {
        let kept = dir.keep();
        eprintln!("servers' data and logs kept in {}", kept.display());
    }
    Ok(FailoverReport {
        runs: args.runs,
        consuming_ms,
        first_item_ms,
        lost: missing,
        double_effects,
        published: ids.len(),
        soak,
    })
}

/// The webhook target every server delivers to, serving in a task; its URL.
async fn serve_hook(seen: Arc<Mutex<Seen>>) -> Result<String, BenchError> {
    let app = axum::Router::new()
        .route("/events", axum::routing::post(receive))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::Temp)?;
    let hook = format!(
        "http://{}/events",
        listener.local_addr().map_err(BenchError::Temp)?
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(hook)
}

/// The cluster file of the bench's ring, written into `dir` with a new
/// cluster key beside it: one adaptor `feed-<node>` per server, all
/// delivering to `hook`. Returns the file, the key and each node's admin
/// address.
fn write_cluster_file(
    dir: &Path,
    broker_config: &BrokerConfig,
    namespace: &str,
    hook: &str,
) -> Result<(PathBuf, PathBuf, HashMap<String, String>), BenchError> {
    let mut admins = HashMap::new();
    let key = dir.join("cluster.key");
    crate::crypto::keygen(&key).map_err(|e| BenchError::Stalled(e.to_string()))?;
    let mut toml = format!(
        "[security]\nkey_file = {key:?}\n\n\
         [broker]\nuris = {uris:?}\nnamespace = {namespace:?}\nqueue_type = {qt:?}\nprefetch = 200\n\n\
         [targets.hook]\nkind = \"webhook\"\nurl = {hook:?}\ntimeout = \"5s\"\n\n\
         [retry]\nattempts = 100\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n",
        uris = broker_config.uris,
        qt = broker_config.queue_type.as_str(),
        key = key.display().to_string(),
    );
    for n in NODES {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::Temp)?
            .to_string();
        toml.push_str(&format!(
            "[servers.{n}]\nadmin_listen = {addr:?}\ndata_dir = {data:?}\n\n\
             [adaptors.feed-{n}]\nkind = \"provisioning\"\nqueue = \"feed-{n}\"\nserver = \"{n}\"\ntarget = \"hook\"\nconcurrency = 8\n\n",
            data = dir.join(n).display().to_string()
        ));
        admins.insert(n.to_owned(), addr);
    }
    let config_path = dir.join("cluster.toml");
    std::fs::write(&config_path, toml).map_err(BenchError::Temp)?;
    Ok((config_path, key, admins))
}

/// Identity (as the hook sees it), feed (node name) and time of each
/// event published.
type Published = Arc<Mutex<Vec<(String, String, Instant)>>>;

/// Steady load on every feed while the runs go on.
struct Load {
    published: Published,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Every 20 ms, `rate / 50` events to each feed.
    fn start(broker_config: &BrokerConfig, namespace: &str, rate: u64) -> Load {
        let published = Published::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = {
            let published = published.clone();
            let stop = stop.clone();
            let broker = Broker::new(broker_config.clone(), "provring bench load");
            let ns = namespace.to_owned();
            let per_tick = (rate / 50).max(1);
            tokio::spawn(async move {
                let publisher = Publisher::new(broker.clone());
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let mut t = 0u64;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    t += 1;
                    publish_tick(
                        &publisher,
                        &ns,
                        t * per_tick..(t + 1) * per_tick,
                        &published,
                    )
                    .await;
                }
                broker.close().await;
            })
        };
        Load {
            published,
            stop,
            task,
        }
    }

    /// Stop publishing; the identities of every event published.
    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        let _ = self.task.await;
        self.published
            .lock()
            .map(|p| p.iter().map(|(id, _, _)| id.clone()).collect())
            .unwrap_or_default()
    }
}

/// One tick of the load: events numbered `range` to each feed, recording
/// the ones the broker confirmed.
async fn publish_tick(
    publisher: &Publisher,
    ns: &str,
    range: std::ops::Range<u64>,
    published: &Published,
) {
    for n in NODES {
        // Unique user names: events about one account are
        // delivered one at a time.
        let run = n.to_string();
        for i in range.clone() {
            let body = synthetic(EventType::AccountCreate, &run, i);
            let queue = format!("{ns}.feed-{n}");
            if publisher
                .publish(
                    "",
                    &queue,
                    body.as_bytes(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .is_ok()
                && let Ok(mut p) = published.lock()
            {
                p.push((
                    format!("/provring/generate|{run}-{i}"),
                    n.to_owned(),
                    Instant::now(),
                ));
            }
        }
    }
}

/// The ring under test, how to reach it, and what its hook has seen.
struct Rig<'a> {
    ring: Ring,
    client: reqwest::Client,
    /// node → admin address
    admins: HashMap<String, String>,
    broker_config: &'a BrokerConfig,
    namespace: &'a str,
    seen: Arc<Mutex<Seen>>,
}

/// A server killed by a run.
struct Kill {
    victim: &'static str,
    /// The victim's feeds (node names), as the topology had them.
    feeds: Vec<String>,
    killed_at: Instant,
    taker: String,
}

impl<'a> Rig<'a> {
    /// Write the cluster file, start the three servers and wait until the
    /// ring is whole.
    async fn start(
        dir: &Path,
        broker_config: &'a BrokerConfig,
        namespace: &'a str,
        hook: &str,
        seen: Arc<Mutex<Seen>>,
    ) -> Result<Rig<'a>, BenchError> {
        let (config_path, key, admins) = write_cluster_file(dir, broker_config, namespace, hook)?;
        let mut ring = Ring {
            config_path,
            dir: dir.to_owned(),
            children: HashMap::new(),
        };
        for n in NODES {
            ring.start(n)?;
        }
        let keys = crate::crypto::KeyRing::load(&key, &[])
            .map_err(|e| BenchError::Stalled(e.to_string()))?;
        // The bench's ring has no [admin.tls]: the peer token is enough.
        let client = crate::admin::client::builder_with_token(
            keys.peer_tokens().first().map(String::as_str),
        )
        .timeout(Duration::from_millis(500))
        .build()
        .map_err(|e| BenchError::Stalled(e.to_string()))?;
        let rig = Rig {
            ring,
            client,
            admins,
            broker_config,
            namespace,
            seen,
        };
        if wait_for_state(
            &rig.client,
            &rig.all_admins(),
            Duration::from_secs(60),
            all_joined,
        )
        .await
        .is_none()
        {
            return Err(BenchError::Stalled(
                "the ring did not start within 60 s".into(),
            ));
        }
        Ok(rig)
    }

    fn all_admins(&self) -> Vec<String> {
        NODES.iter().map(|n| self.admins[*n].clone()).collect()
    }

    /// Kill a random server that hosts a feed, and wait until a live
    /// server has taken it over.
    async fn kill_one(&mut self) -> Result<Kill, BenchError> {
        let now = wait_for_state(
            &self.client,
            &self.all_admins(),
            Duration::from_secs(10),
            |_| true,
        )
        .await
        .ok_or_else(|| BenchError::Stalled("no server answers /topology".into()))?;
        let hosting: Vec<&'static str> = NODES
            .iter()
            .copied()
            .filter(|n| now.adaptors.values().any(|h| h == n))
            .collect();
        let victim = *hosting
            .get(rand::random_range(0..hosting.len().max(1)))
            .ok_or_else(|| BenchError::Stalled("no server hosts a feed".into()))?;
        let feeds: Vec<String> = now
            .adaptors
            .iter()
            .filter(|(_, h)| h.as_str() == victim)
            .map(|(a, _)| a.trim_start_matches("feed-").to_owned())
            .collect();
        let live: Vec<String> = NODES
            .iter()
            .filter(|n| **n != victim)
            .map(|n| self.admins[*n].clone())
            .collect();
        let killed_at = Instant::now();
        self.ring.kill(victim);
        let taken = wait_for_state(&self.client, &live, Duration::from_secs(30), |s| {
            s.servers.get(victim).is_some_and(|x| x.failed)
        })
        .await
        .ok_or_else(|| BenchError::Stalled(format!("{victim} was not taken over within 30 s")))?;
        let taker = taken.servers[victim]
            .taken_over_by
            .clone()
            .unwrap_or_default();
        Ok(Kill {
            victim,
            feeds,
            killed_at,
            taker,
        })
    }

    /// From the kill: until the taker consumes the victim's queue, and
    /// until it delivers the first of the victim's events published before
    /// the kill (none when nothing was left to adopt).
    async fn measure(
        &self,
        kill: &Kill,
        published: &Published,
    ) -> Result<(Duration, Option<Duration>), BenchError> {
        let queue = format!(
            "{}.feed-{}",
            self.namespace,
            kill.feeds.first().map_or(kill.victim, String::as_str)
        );
        let consuming = wait_consumer(self.broker_config, &queue, Duration::from_secs(30)).await?;
        let consuming = consuming.duration_since(kill.killed_at);
        let before: HashSet<String> = published
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|(_, feed, t)| kill.feeds.contains(feed) && *t < kill.killed_at)
                    .map(|(id, _, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            let found = self.seen.lock().ok().and_then(|s| {
                s.by_node
                    .iter()
                    .filter(|((id, node), t)| {
                        **t > kill.killed_at && *node == kill.taker && before.contains(id)
                    })
                    .map(|(_, t)| *t)
                    .min()
            });
            if let Some(t) = found {
                break Some(t.duration_since(kill.killed_at));
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok((consuming, first))
    }

    /// Restart the killed server and wait until the ring is whole again.
    async fn restart(&mut self, victim: &str) -> Result<(), BenchError> {
        self.ring.start(victim)?;
        if wait_for_state(
            &self.client,
            &self.all_admins(),
            Duration::from_secs(60),
            all_joined,
        )
        .await
        .is_none()
        {
            return Err(BenchError::Stalled(format!(
                "{victim} did not rejoin within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(())
    }
}

/// Everything published must arrive: wait up to 120 s for the events `ids`.
/// Returns how many are still missing, and how many events were applied
/// under more than one idempotency key.
async fn settle(seen: &Mutex<Seen>, ids: &[String]) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let missing = seen
            .lock()
            .map(|s| ids.iter().filter(|id| !s.first.contains_key(*id)).count())
            .unwrap_or(ids.len());
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let double_effects = seen
        .lock()
        .map(|s| s.keys.values().filter(|k| k.len() > 1).count())
        .unwrap_or(0);
    (missing, double_effects)
}

/// Watch the ring under load for `length` with `burn` threads spinning,
/// and count the servers taken over (nothing failed, so every one is false).
async fn soak(
    client: &reqwest::Client,
    admins: &[String],
    length: Duration,
    burn: usize,
    say: &impl Fn(&str),
) -> usize {
    let spinning = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let burners: Vec<_> = (0..burn)
        .map(|_| {
            let spinning = spinning.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while spinning.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    say(&format!(
        "soak: {} under load with {burn} spinning threads, no failure",
        humantime::format_duration(length)
    ));
    let end = Instant::now() + length;
    // Per server: (taken over when last seen, epoch of its last join).
    let mut last: HashMap<String, (bool, Option<u64>)> = HashMap::new();
    let mut taken = 0;
    while Instant::now() < end {
        if let Some(s) = wait_for_state(client, admins, Duration::from_secs(5), |_| true).await {
            for (id, x) in &s.servers {
                let (was_failed, joined) = last.get(id).copied().unwrap_or((false, x.joined_epoch));
                // A takeover seen while it lasts, or one the server already
                // rejoined from between two looks (`taken_over_by` stays).
                let rejoined_unseen = !x.failed
                    && !was_failed
                    && x.joined_epoch != joined
                    && x.taken_over_by.is_some();
                if (x.failed && !was_failed) || rejoined_unseen {
                    taken += 1;
                }
                last.insert(id.clone(), (x.failed, x.joined_epoch));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    spinning.store(false, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    say(&format!("soak: {taken} takeovers"));
    taken
}

/// When `queue` has a consumer again.
async fn wait_consumer(
    cfg: &crate::config::BrokerConfig,
    queue: &str,
    within: Duration,
) -> Result<Instant, BenchError> {
    let broker = Broker::new(cfg.clone(), "provring bench probe");
    let ch = broker.channel().await?;
    let deadline = Instant::now() + within;
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        if let Ok(q) = q
            && q.consumer_count() > 0
        {
            let now = Instant::now();
            broker.close().await;
            return Ok(now);
        }
        if Instant::now() > deadline {
            broker.close().await;
            return Err(BenchError::Stalled(format!(
                "nobody consumes {queue} after the kill"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn cleanup(cfg: &crate::config::BrokerConfig, namespace: &str) {
    let broker = Broker::new(cfg.clone(), "provring bench cleanup");
    if let Ok(ch) = broker.channel().await {
        let mut queues = vec!["parking".to_owned(), "topology".to_owned()];
        for n in NODES {
            queues.push(format!("feed-{n}"));
            for m in NODES {
                if n != m {
                    queues.push(format!("backup:{n}:{m}"));
                }
            }
        }
        for q in queues {
            let _ = ch
                .queue_delete(
                    format!("{namespace}.{q}").as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = ch
            .exchange_delete(
                format!("{namespace}.events").as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    broker.close().await;
}
