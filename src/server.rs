//! `provring server`: wire the components of one node together and run them
//! until SIGTERM/SIGINT.
//!
//! Shutdown: stop consuming → let in-flight batches and target calls finish
//! within `shutdown.grace` → flush the repository → exit. When the grace
//! period runs out, the components still running are named.

use crate::broker::Broker;
use crate::config::Config;
use crate::mirror::Mirror;
use crate::node::{Finishing, Node};
use crate::repository::{Repository, RepositoryError};
use crate::stats::Stats;
use crate::topology::{Change, Topology};
use crate::workflow::targets;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("node {node:?} is not in the configuration; known servers: {known}")]
    UnknownNode { node: String, known: String },
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("security.key_file: {0}")]
    Key(#[from] crate::crypto::KeyError),
    #[error("{0}")]
    Auth(String),
    #[error(transparent)]
    Tls(Box<crate::tls::TlsError>),
    #[error("{source} (servers.{node}.admin_listen)")]
    AdminCertificate {
        node: String,
        source: Box<crate::tls::TlsError>,
    },
    #[error(transparent)]
    PeerClient(Box<crate::admin::client::ClientError>),
    #[error("topology: {0}")]
    Topology(#[from] crate::topology::TopologyError),
    #[error("target {name}: {reason}")]
    Target {
        name: String,
        reason: crate::workflow::targets::BuildError,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot listen on admin address {addr} (servers.{node}.admin_listen): {source}")]
    Admin {
        addr: String,
        node: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the server ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Every component finished within the grace period.
    Clean,
    /// The grace period ran out; the named components were still running.
    GraceExpired(Vec<String>),
    /// A component failed in a way that made going on unsafe.
    Failed(String),
}

/// A running server's parts, for in-process use (benchmarks).
pub struct Running {
    pub stats: Arc<Stats>,
    pub repo: Repository,
    shutdown: CancellationToken,
    fatal: CancellationToken,
    tasks: Vec<(String, JoinHandle<()>)>,
    broker: Broker,
    grace: Duration,
    pub topology: Topology,
    node: String,
    stopping: CancellationToken,
    /// Cancelled by `POST /stop`.
    pub stop_requested: CancellationToken,
    /// Adaptors and executors still finishing during shutdown.
    finishing: Finishing,
}

/// Open the repository and start every component this node hosts.
pub async fn start(config: &Config, node: &str) -> Result<Running, ServerError> {
    let server = config
        .servers
        .get(node)
        .ok_or_else(|| ServerError::UnknownNode {
            node: node.to_owned(),
            known: config.server_names(),
        })?;
    let keys = Arc::new(config.security.key_ring()?);
    // Certificate files are read before anything is consumed or joined.
    let admin_tls = admin_tls(config, node)?;
    let peers = crate::admin::client::peer_client(config, &keys)?;
    let repo = Repository::open(&server.data_dir, keys.clone())?;
    let broker = Broker::new(config.broker.clone(), format!("provring {node}"));
    let shutdown = CancellationToken::new();
    broker.mark_alive(crate::broker::declare::alive_queue(
        &config.broker.namespace,
        node,
    ));
    let (topology, before) = Topology::join(
        broker.clone(),
        config,
        node,
        keys.clone(),
        shutdown.child_token(),
    )
    .await?;
    let state = topology.state();
    tracing::info!(epoch = state.epoch, monitor = ?state.monitor_of(node), monitors = ?state.monitors.get(node), "Joined the topology.");
    let alerter = crate::alert::Alerter::new(config.alerts.clone(), node);
    if let Some(me) = before.servers.get(node)
        && me.failed
    {
        crate::supervisor::takeover::returned_after_takeover(
            &repo,
            node,
            me.taken_over_by.as_deref(),
            &state,
            &alerter,
        )
        .await?;
    }
    check_targets(config, &state, node)?;
    let (mirror, mirror_task) = Mirror::start(
        broker.clone(),
        repo.clone(),
        node,
        topology.subscribe(),
        topology.resync_requests(),
        shutdown.child_token(),
    );
    let fence = crate::topology::Fence::new(topology.clone(), node, config.supervisor.fence_after);
    let this = Node::new(crate::node::Parts {
        config: config.clone(),
        id: node.to_owned(),
        repo,
        parking: crate::parking::Parking::new(broker.clone(), keys, config.parking.ttl),
        broker,
        mirror,
        stats: Arc::new(Stats::default()),
        // Cancelled by a component that cannot go on safely (repository failure).
        fatal: CancellationToken::new(),
        topology,
        alerter,
        fence,
        finishing: Finishing::default(),
        peers,
    });
    if let Err(e) = this.parking.declare().await {
        tracing::warn!(error = %e, "Cannot declare the parking queue now; it is declared when something is first parked.");
    }
    let mut tasks = vec![("mirror".to_owned(), mirror_task)];
    tasks.extend(spawn_roles(&this, &shutdown));
    let stopping = CancellationToken::new();
    let stop_requested = CancellationToken::new();
    let admin = start_admin(&this, admin_tls, &stopping, &stop_requested, &shutdown).await?;
    tasks.push(("admin API".into(), admin));
    tasks.extend(spawn_housekeeping(&this, &shutdown));
    Ok(Running {
        stats: this.stats.clone(),
        repo: this.repo.clone(),
        shutdown,
        fatal: this.fatal.clone(),
        tasks,
        broker: this.broker.clone(),
        grace: config.shutdown.grace,
        topology: this.topology.clone(),
        node: node.to_owned(),
        stopping,
        stop_requested,
        finishing: this.finishing.clone(),
    })
}

/// The admin API's TLS set-up, if `[admin.tls]` is set.
fn admin_tls(
    config: &Config,
    node: &str,
) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
    let Some(t) = &config.admin.tls else {
        return Ok(None);
    };
    let listen = config
        .servers
        .get(node)
        .map(|s| s.admin_listen.as_str())
        .unwrap_or_default();
    // Peers would refuse a certificate that does not name this server's
    // address: better to say so now than to be taken over.
    crate::tls::check_covers(&t.cert_file, &t.ca_file, listen).map_err(|source| {
        ServerError::AdminCertificate {
            node: node.to_owned(),
            source: Box::new(source),
        }
    })?;
    Ok(Some(crate::tls::admin_server_config(
        &t.cert_file,
        &t.key_file,
        &t.ca_file,
    )?))
}

impl From<crate::tls::TlsError> for ServerError {
    fn from(e: crate::tls::TlsError) -> Self {
        ServerError::Tls(Box::new(e))
    }
}

impl From<crate::admin::client::ClientError> for ServerError {
    fn from(e: crate::admin::client::ClientError) -> Self {
        ServerError::PeerClient(Box::new(e))
    }
}

/// Fail early on a target of this server's adaptors that cannot be built.
fn check_targets(
    config: &Config,
    state: &crate::topology::State,
    node: &str,
) -> Result<(), ServerError> {
    for name in state.adaptors_of(node) {
        if let Some(a) = config.adaptors.get(&name) {
            let gate = targets::open_gate();
            targets::build(&a.target, &config.targets[&a.target], gate).map_err(|reason| {
                ServerError::Target {
                    name: a.target.clone(),
                    reason,
                }
            })?;
        }
    }
    Ok(())
}

/// The tasks that make the server's roles, named, in the order they stop.
fn spawn_roles(node: &Node, shutdown: &CancellationToken) -> Vec<(String, JoinHandle<()>)> {
    let n = node;
    vec![
        (
            "backup adaptor".into(),
            tokio::spawn(crate::mirror::backup::run(
                n.broker.clone(),
                n.repo.clone(),
                n.id.clone(),
                n.topology.clone(),
                n.fatal.clone(),
                shutdown.child_token(),
            )),
        ),
        (
            "fence".into(),
            tokio::spawn(log_fence(n.fence.clone(), shutdown.child_token())),
        ),
        (
            "adaptors".into(),
            tokio::spawn(crate::hosting::run(n.clone(), shutdown.child_token())),
        ),
        (
            "supervisor".into(),
            tokio::spawn(crate::supervisor::run(
                n.config.clone(),
                n.id.clone(),
                n.topology.clone(),
                n.broker.clone(),
                n.peers.clone(),
                n.stats.clone(),
                shutdown.child_token(),
            )),
        ),
    ]
}

/// The repository's housekeeping, started last.
fn spawn_housekeeping(node: &Node, shutdown: &CancellationToken) -> Vec<(String, JoinHandle<()>)> {
    let n = node;
    vec![
        (
            "progress saver".into(),
            tokio::spawn(save_progress(n.repo.clone(), shutdown.child_token())),
        ),
        (
            "done-ledger pruner".into(),
            tokio::spawn(prune_done_ledger(
                n.repo.clone(),
                n.config.done_ledger.clone(),
                shutdown.child_token(),
            )),
        ),
    ]
}

/// Bind the admin API and serve it until `shutdown`.
async fn start_admin(
    node: &Node,
    tls: Option<Arc<rustls::ServerConfig>>,
    stopping: &CancellationToken,
    stop_requested: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<JoinHandle<()>, ServerError> {
    let config = &node.config;
    let listen = config
        .servers
        .get(&node.id)
        .map(|s| s.admin_listen.clone())
        .unwrap_or_default();
    let health = crate::admin::Health {
        fatal: node.fatal.clone(),
        stopping: stopping.clone(),
        stats: node.stats.clone(),
        fence_after: config.supervisor.fence_after,
        last: Arc::new(std::sync::Mutex::new((0, 0))),
        stop_requested: stop_requested.clone(),
        started: std::time::Instant::now(),
    };
    let timeouts = Arc::new(crate::timeout::Local::new(
        config.clone(),
        &node.id,
        node.repo.clone(),
        node.parking.clone(),
        node.topology.clone(),
        node.fence.clone(),
        node.stats.clone(),
    ));
    let auth = crate::admin::auth::Auth::new(&config.security, node.topology.keys())
        .map_err(|e| ServerError::Auth(e.to_string()))?
        .peer_needs_certificate(tls.is_some());
    if tls.is_none() && !crate::config::is_loopback(&listen) {
        tracing::warn!(admin_listen = %listen, "The admin API is plain HTTP on a non-loopback address: tokens travel in clear. Set [admin.tls].");
    }
    if !auth.enabled() {
        tracing::warn!(admin_listen = %listen, "The admin API checks no token (security.admin_auth = \"none\"); anyone on this machine may stop this server.");
    }
    let (admin_addr, admin) = crate::admin::bind(
        &listen,
        crate::admin::AdminParts {
            node: node.id.clone(),
            repo: node.repo.clone(),
            topology: Some(node.topology.clone()),
            health: Some(health),
            timeouts: Some(timeouts),
            cluster: Some(crate::admin::ClusterParts {
                config: config.clone(),
                peers: node.peers.clone(),
            }),
            auth: Arc::new(auth),
            limits: config.admin.clone(),
            tls,
        },
        shutdown.child_token(),
    )
    .await
    .map_err(|source| ServerError::Admin {
        addr: listen.clone(),
        node: node.id.clone(),
        source,
    })?;
    tracing::info!(%admin_addr, "Admin API listening.");
    Ok(admin)
}

/// Log when the fence closes and opens again.
async fn log_fence(fence: crate::topology::Fence, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if fence.update() != open {
            open = !open;
            if open {
                tracing::info!("Topology log readable again: deliveries resume.");
            } else {
                tracing::warn!("Cannot read the topology log: deliveries paused (fenced).");
            }
        }
    }
}

impl Running {
    /// Stop every component (see the module doc) and flush.
    pub async fn stop(self) -> Exit {
        self.stop_with(true).await
    }

    /// Announce the stop, giving up at `until`.
    async fn announce_stop(&self, until: tokio::time::Instant) {
        let node = self.node.clone();
        let announced = tokio::time::timeout_at(
            until,
            self.topology
                .propose_with(|_| Some(Change::Stopping { node: node.clone() })),
        )
        .await;
        match announced {
            Ok(Ok(_)) => tracing::info!("Intentional stop announced in the topology log."),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Cannot announce the stop in the topology log.")
            }
            Err(_) => {
                tracing::warn!(
                    "Cannot announce the stop in the topology log: no answer in time (broker unreachable?); the monitor may take this server over."
                )
            }
        }
    }

    /// Stop; `announce`: tell the topology this is an intentional stop (not
    /// after a failure, which the monitor must take over). Ends within the
    /// grace period plus one second (twice [`FINAL_STEPS`]) whatever the broker does: the
    /// announcement counts against the grace period, and the final flush
    /// and the broker's close get what is left plus [`FINAL_STEPS`]; what
    /// is cut short is named in the result.
    pub async fn stop_with(self, announce: bool) -> Exit {
        let started = tokio::time::Instant::now();
        let deadline = started + self.grace;
        self.stopping.cancel();
        if announce {
            // At most 3 s, and at most half the grace period.
            let until = (started + Duration::from_secs(3)).min(started + self.grace / 2);
            self.announce_stop(until).await;
        }
        self.shutdown.cancel();
        let mut still_running = Vec::new();
        for (name, mut handle) in self.tasks {
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                handle.abort();
                let finishing = self.finishing.names();
                if name == "adaptors" && !finishing.is_empty() {
                    still_running.extend(finishing);
                } else {
                    still_running.push(name);
                }
            }
        }
        let last = deadline.max(tokio::time::Instant::now()) + FINAL_STEPS;
        let repo = self.repo.clone();
        let flush = tokio::task::spawn_blocking(move || repo.flush_blocking());
        match tokio::time::timeout_at(last, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "Final repository flush failed.");
                still_running.push("final repository flush (failed)".into());
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Final repository flush failed.");
                still_running.push("final repository flush (failed)".into());
            }
            Err(_) => {
                // Group commits have made every acked item durable already;
                // what the flush had left is redone after the next start.
                tracing::warn!("Final repository flush cut short.");
                still_running.push("final repository flush".into());
            }
        }
        if tokio::time::timeout_at(last, self.broker.close())
            .await
            .is_err()
        {
            tracing::warn!(
                "Broker connection not closed in time (the broker does not answer); leaving it."
            );
            still_running.push("broker close".into());
        }
        if still_running.is_empty() {
            Exit::Clean
        } else {
            Exit::GraceExpired(still_running)
        }
    }
}

/// Run the server until SIGTERM or SIGINT.
pub async fn run(config: Config, node: &str) -> Result<Exit, ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServerError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServerError::Signals)?;
    // A signal during the start (which may wait for the broker) ends the
    // process at once, as a crash would: if it had joined already, its
    // monitor takes it over; nothing acked is lost.
    let running = tokio::select! {
        r = start(&config, node) => r?,
        _ = sigterm.recv() => return Ok(stopped_during_start("SIGTERM")),
        _ = sigint.recv() => return Ok(stopped_during_start("SIGINT")),
    };
    let backlog = running.repo.count_all();
    tracing::info!(%node, backlog, version = env!("CARGO_PKG_VERSION"), "Server started.");

    let stats = running.stats.clone();
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    let mut last = String::new();
    let fatal = running.fatal.clone();
    let stop_requested = running.stop_requested.clone();
    let signal_name = loop {
        tokio::select! {
            _ = stop_requested.cancelled() => break "provring stop",
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = fatal.cancelled() => break "fatal error",
            _ = progress.tick() => {
                let now = stats.summary();
                if now != last {
                    tracing::info!(stats = %now, "Progress.");
                    last = now;
                }
            }
        }
    };
    tracing::info!(signal = signal_name, grace = ?config.shutdown.grace, "Shutting down.");
    let mut exit = running.stop_with(!fatal.is_cancelled()).await;
    if fatal.is_cancelled() {
        exit = Exit::Failed("a component could not go on safely; see the errors above".into());
    }
    match &exit {
        Exit::Clean => tracing::info!(stats = %stats.summary(), "Stopped cleanly."),
        Exit::Failed(reason) => {
            tracing::error!(%reason, "Stopped after a failure; a restart rebuilds the repository index from disk.")
        }
        Exit::GraceExpired(names) => tracing::warn!(
            still_running = %names.join(", "),
            "Grace period expired; unfinished items stay in the repository for the next start."
        ),
    }
    Ok(exit)
}

fn stopped_during_start(signal: &str) -> Exit {
    tracing::warn!(%signal, "Signal during the start: exiting before the server started.");
    Exit::Failed(format!("{signal} during the start"))
}

/// Time after the grace period for the final flush and the broker's close,
/// and then for the runtime's shutdown: the stop ends within the grace
/// period plus twice this (one second).
pub const FINAL_STEPS: Duration = Duration::from_millis(500);

/// How often finished items of unfinished batches are saved: the most
/// work a crash can make the server repeat (delivered again, same key).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

async fn save_progress(repo: Repository, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let repo = repo.clone();
        match tokio::task::spawn_blocking(move || repo.save_progress()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "Cannot save delivery progress."),
            Err(e) => tracing::error!(error = %e, "Cannot save delivery progress."),
        }
    }
}

async fn prune_done_ledger(
    repo: Repository,
    cfg: crate::config::DoneLedgerConfig,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let repo = repo.clone();
        let (ttl, max) = (cfg.ttl, cfg.max_entries);
        match tokio::task::spawn_blocking(move || repo.prune_done(ttl, max)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(removed = n, "Done ledger pruned."),
            Ok(Err(e)) => tracing::warn!(error = %e, "Cannot prune the done ledger."),
            Err(e) => tracing::warn!(error = %e, "Cannot prune the done ledger."),
        }
    }
}
