//! Command line: `provring <subcommand>`, and the two subcommands whose
//! work is not one library call (`token`, `rekey`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// provring: a provisioning server for event-driven identity feeds.
///
/// Servers consume provisioning and password-change events (CloudEvents
/// JSON) from RabbitMQ, keep each in a local sled repository until it has
/// been delivered to its target (SCIM 2.0 or webhook), and ack the broker
/// only once the event is durable.
#[derive(Debug, Parser)]
#[command(
    name = "provring",
    version,
    propagate_version = true,
    after_help = "Examples:\n  provring ring --config config/cluster.toml\n  provring check-config --config config/cluster.toml\n  provring publish --config config/cluster.toml --adaptor hr --generate 1000\n  provring server --config config/cluster.toml --config config/node-a.toml --node a"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PROVRING_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Configuration files: the cluster file, then optional node files that
/// override it. `PROVRING__SECTION__KEY` environment variables override both
/// (e.g. `PROVRING__BROKER__PREFETCH=200`).
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Cluster file (TOML); repeat to layer node files on top.
    #[arg(long = "config", short = 'c', required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// File holding the bearer token for servers' admin APIs (`provring
    /// token` makes one). Without it: `PROVRING_TOKEN`, else the cluster
    /// key's peer token where `security.key_file` is readable.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one server of the fleet until SIGTERM or SIGINT.
    Server {
        #[command(flatten)]
        config: ConfigArgs,
        /// This server's node id (a key of [servers]).
        #[arg(long, env = "PROVRING_NODE")]
        node: String,
    },
    /// Run every server of the cluster file on this machine, one process
    /// each, until Ctrl-C (for trying provring out and local development).
    Ring {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Check configuration files; list every problem with its key.
    ///
    /// Exits 0 when the configuration is usable, 64 otherwise.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Publish events to an adaptor's queue, with publisher confirms.
    Publish {
        #[command(flatten)]
        config: ConfigArgs,
        /// Adaptor whose queue receives the events.
        #[arg(long)]
        adaptor: String,
        /// File with one event (CloudEvents JSON), a JSON array of events,
        /// or one event per line.
        #[arg(
            long,
            conflicts_with = "generate",
            required_unless_present = "generate"
        )]
        file: Option<PathBuf>,
        /// Publish this many valid synthetic events of every type the adaptor accepts.
        #[arg(long, value_name = "N")]
        generate: Option<u64>,
    },
    /// The ring at a glance: one row per server (reachable, state and its
    /// reasons, epoch, whom it monitors, what it hosts, backlog, copies,
    /// stopped on purpose or taken over by whom and when, uptime), the
    /// messages waiting on the broker per adaptor queue, and a summary.
    /// Exit 0 when every server is up and the ring is closed, 1 otherwise.
    Status {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Redraw every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Show each server's backlog (unfinished items per adaptor, age of the
    /// oldest), asked from its admin address.
    Backlog {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only this server.
        #[arg(long)]
        node: Option<String>,
        /// Print JSON (one array of per-server views) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop one server on purpose (as SIGTERM does): it announces the stop
    /// in the topology log, so its monitor does not take it over.
    Stop {
        #[command(flatten)]
        config: ConfigArgs,
        /// The server to stop.
        #[arg(long)]
        node: String,
    },
    /// Move an adaptor or a singleton service to another server.
    ///
    /// The old host stops the adaptor at once, hands its backlog over
    /// through the broker, and the new host starts it with that backlog:
    /// nothing is lost and nothing is delivered from both. Nothing ever
    /// moves back by itself, also not after a takeover: this command is
    /// how an operator moves things back. Exits 0 once moved (and, for an
    /// adaptor, once the backlog is handed over, unless --no-wait), 2 when
    /// the topology log refused the move, 3 when the handover did not
    /// finish within --timeout (it goes on; `provring topology show`
    /// tells when it has).
    Move {
        #[command(flatten)]
        config: ConfigArgs,
        /// What to move: an adaptor's name, `scheduler` or `timeout-checker`.
        #[arg(value_name = "ADAPTOR|scheduler|timeout-checker")]
        what: String,
        /// The server to move it to.
        #[arg(long, value_name = "ID")]
        to: String,
        /// Return once the move is in the log, without waiting for the
        /// backlog handover.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the backlog handover.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Planned maintenance: move every adaptor and singleton service the
    /// server hosts to the next eligible server in ring order, one at a
    /// time, each with its backlog handed over (a line per step), then say
    /// that the server can be stopped. Nothing is lost, no failure mail is
    /// sent, nothing is taken over. Exit 0 drained, 2 refused or nowhere to
    /// go, 3 a handover not finished within --timeout.
    Drain {
        #[command(flatten)]
        config: ConfigArgs,
        /// The server to drain.
        #[arg(long, value_name = "ID")]
        node: String,
        /// How long to wait for each backlog handover.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Move each adaptor and singleton back to its configured server (or,
    /// where that server does not run or may not host it, to the running
    /// eligible server with the least work), one lossless move at a time
    /// with a line per step. Nothing moves back by itself after a
    /// takeover: this is how the work gets spread again. Exit 0 done, 2 a
    /// move refused, 3 a handover not finished within --timeout.
    Rebalance {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the moves without making them.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for each backlog handover.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Read or change the topology log (who hosts what, who monitors whom).
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Print the broker topology as a RabbitMQ definitions file (JSON).
    BrokerDefinitions {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write a new random cluster key (256 bits as 64 hex digits, file
    /// mode 0600) and print its fingerprint.
    ///
    /// Every server of a cluster needs the same key file
    /// (`[security] key_file`): it seals every event body provring stores
    /// or forwards, and signs the topology log and the mirror records. An
    /// existing file is never overwritten.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Succeed without writing when the file exists already (and print
        /// its fingerprint), for container start-up scripts.
        #[arg(long)]
        if_missing: bool,
    },
    /// Make an operator token for the admin API.
    ///
    /// Writes the token to --out (mode 0600) for `--token-file`, and prints
    /// the `[[security.admin_tokens]]` entry (name, role, SHA-256) to add to
    /// the cluster file; servers store only the hash.
    Token {
        /// Who will hold it (logged with each operating request).
        #[arg(long)]
        name: String,
        /// `read` (state, backlog, topology) or `operate` (also stop).
        #[arg(long, value_parser = ["read", "operate"])]
        role: String,
        /// Where to write the token.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Re-seal a stopped server's repository under the newest key.
    ///
    /// Rotation, in two steps: add a new key (`keygen`) to
    /// `previous_key_files` on every server and restart each; then make it
    /// `key_file` (the old one in `previous_key_files`), restart each, and
    /// run `rekey` on each while it is stopped. Drop the old key once every
    /// server was re-keyed and nothing parked under it is still wanted.
    /// Exits 0 when every record was re-sealed.
    Rekey {
        #[command(flatten)]
        config: ConfigArgs,
        /// The (stopped) server whose repository to re-seal.
        #[arg(long)]
        node: String,
    },
    /// Measure throughput against the raw broker in the same run.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Replay the topology log from its first record and print the state.
    Show {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the state as JSON (the same document as a server's
        /// `GET /topology`).
        #[arg(long)]
        json: bool,
    },
    /// Make NODE monitor MONITORS (and whoever monitored MONITORS stop).
    ///
    /// The monitored server re-sends its whole backlog to its new monitor.
    /// Exits 0 when the change was applied, 2 when the log refused it (for
    /// instance another change won the epoch given with --expect-epoch).
    Link {
        #[command(flatten)]
        config: ConfigArgs,
        /// The server that starts monitoring.
        #[arg(long)]
        node: String,
        /// The server it monitors.
        #[arg(long)]
        monitors: String,
        /// Apply only if the log is at this epoch (compare-and-set);
        /// without it, the current epoch is used and races are retried.
        #[arg(long, value_name = "EPOCH")]
        expect_epoch: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Raw consume+ack throughput vs. this server's durable pipeline
    /// (repository, group commit, null target) on the same broker.
    Pipeline(BenchArgs),
    /// kill -9 a random server of a 3-server ring under steady load, N
    /// times; time until the taker consumes the failed server's queue and
    /// until the first of its events is delivered by the taker.
    Failover(FailoverArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// Take the broker (URIs, queue type) from this cluster file.
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Broker URI when no --config is given.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "PROVRING_BENCH_AMQP"
    )]
    pub amqp: String,
    /// Kills (the killed server is restarted between runs).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Events per second published to each server's feed during the run.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Keep the servers' data directories and logs, and print where.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Before the kills, run the ring under load for this long with no
    /// failure, and count the takeovers (all of them false).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub soak: Option<std::time::Duration>,
    /// During the soak, keep this many threads spinning on the CPU, as a
    /// noisy neighbour would (2 saturates a 2-core machine).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub burn: usize,
}

impl FailoverArgs {
    /// The broker part, as the pipeline bench takes it.
    pub fn common(&self) -> BenchArgs {
        BenchArgs {
            config: self.config.clone(),
            amqp: self.amqp.clone(),
            messages: 0,
            rounds: 1,
            json: self.json,
            servers: 1,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Take the broker (URIs, queue type, prefetch) from this cluster file.
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Broker URI when no --config is given.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "PROVRING_BENCH_AMQP"
    )]
    pub amqp: String,
    /// Messages per measurement.
    #[arg(long, default_value_t = 50_000)]
    pub messages: u64,
    /// Rounds (raw, then provring, each round); rates are medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Servers in the measured ring (each hosts one adaptor and mirrors to
    /// the next); the raw baseline consumes as many queues at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub servers: u16,
}

/// Why `provring token` wrote no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Random(#[from] crate::crypto::KeyError),
    #[error("cannot write token file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `provring token`: write a new operator token to `out` (mode 0600, never
/// overwriting); returns its SHA-256.
pub fn write_token(out: &std::path::Path) -> Result<String, TokenError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = crate::admin::auth::new_token()?;
    let write_error = |source| TokenError::Write {
        path: out.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(write_error)?;
    file.write_all(format!("{token}\n").as_bytes())
        .map_err(write_error)?;
    Ok(crate::admin::auth::token_hash(&token))
}

/// Why `provring rekey` did not re-seal a repository.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error("node {node:?} is not in the configuration; known servers: {known}")]
    UnknownNode { node: String, known: String },
    #[error("security.key_file: {0}")]
    Key(crate::crypto::KeyError),
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
}

/// `provring rekey`: re-seal the repository of stopped server `node`;
/// returns the line to print.
pub fn rekey(config: &crate::config::Config, node: &str) -> Result<String, RekeyError> {
    let server = config
        .servers
        .get(node)
        .ok_or_else(|| RekeyError::UnknownNode {
            node: node.to_owned(),
            known: config.server_names(),
        })?;
    let keys = config.security.key_ring().map_err(RekeyError::Key)?;
    let fingerprint = keys.fingerprint();
    let repo = crate::repository::Repository::open(&server.data_dir, std::sync::Arc::new(keys))?;
    let done = repo.rekey()?;
    Ok(format!(
        "rekey {node}: {} records ({} events) re-sealed under key {fingerprint}, {} already under it",
        done.records, done.events, done.current
    ))
}
