//! The `provring` binary: parse the command line, set up logging, hand the
//! subcommand to its function, and turn the outcome into an exit code.
//!
//! Each subcommand's function loads what it needs, calls into the library,
//! prints the result, and says how it went: an [`Outcome`]. Which code a
//! failure exits with is decided in one place, [`Failure::exit_code`].
#![forbid(unsafe_code)]

use clap::Parser;
use provring::cli::{Bench, Cli, Command, ConfigArgs, LogFormat, TopologyCommand};
use provring::{bench, config, publish, server};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code for a configuration that cannot be used (EX_CONFIG is 78; 64,
/// EX_USAGE, is what operators and the issue tracker agreed on).
const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;
/// The topology log refused the change (`topology link`; `move` returns
/// its own codes, documented in `provring move --help`).
const EXIT_REFUSED: u8 = 2;

/// Why a subcommand did not succeed. The call site says which kind an error
/// is (the same admin client error is a configuration problem for `backlog`
/// and a failure for `stop`); the message is printed as `provring: …`.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The configuration, or what the command names in it, cannot be used.
    #[error("{0}")]
    Config(String),
    /// The command ran and failed.
    #[error("{0}")]
    Failed(String),
}

impl Failure {
    fn config(e: impl std::fmt::Display) -> Self {
        Failure::Config(e.to_string())
    }

    fn failed(e: impl std::fmt::Display) -> Self {
        Failure::Failed(e.to_string())
    }

    /// The one mapping from a failure to the process's exit code.
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) => EXIT_CONFIG,
            Failure::Failed(_) => EXIT_FAILURE,
        }
    }
}

/// How a subcommand ended: after printing its result, the exit code that
/// says how it went (0, or a code the command documents); or why it failed.
type Outcome = Result<u8, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A benchmark runs a server in-process: its progress lines would bury
    // the figures, so only warnings are shown unless RUST_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Bench { .. } => "warn,lapin=off",
        _ => "info,lapin=off",
    };
    init_tracing(cli.log_format, default_filter);
    provring::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return exit_code(Err(Failure::failed(format!(
                "cannot start the async runtime: {e}"
            ))));
        }
    };
    let code = exit_code(runtime.block_on(run(cli.command)));
    // Dropping the tasks still alive (executors finishing after the final
    // flush) drops the last repository handles, which flushes their writes;
    // a blocking call that does not end within the bound must not hold the
    // exit (the work that matters is done or named by now).
    runtime.shutdown_timeout(provring::server::FINAL_STEPS);
    code
}

/// Print a failure and give the code the process exits with.
fn exit_code(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("provring: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> Outcome {
    match command {
        Command::Server { config, node } => run_server(&config, &node).await,
        Command::Ring { config } => ring(&config).await,
        Command::CheckConfig { config } => check_config(&config),
        Command::Publish {
            config,
            adaptor,
            file,
            generate,
        } => publish_events(&config, &adaptor, file, generate).await,
        Command::Status {
            config,
            json,
            watch,
        } => status(&config, json, watch).await,
        Command::Backlog { config, node, json } => backlog(&config, node.as_deref(), json).await,
        Command::Stop { config, node } => stop(&config, &node).await,
        Command::Drain {
            config,
            node,
            timeout,
        } => drain(&config, &node, timeout).await,
        Command::Rebalance {
            config,
            dry_run,
            timeout,
        } => rebalance(&config, dry_run, timeout).await,
        Command::Move {
            config,
            what,
            to,
            no_wait,
            timeout,
        } => move_to(&config, &what, &to, (!no_wait).then_some(timeout)).await,
        Command::Topology { command } => topology(command).await,
        Command::BrokerDefinitions { config } => broker_definitions(&config),
        Command::Keygen { out, if_missing } => keygen(&out, if_missing),
        Command::Token { name, role, out } => token(&name, &role, &out),
        Command::Rekey { config, node } => rekey(&config, &node),
        Command::Bench { bench } => run_bench(bench).await,
    }
}

fn load(args: &ConfigArgs) -> Result<config::Config, Failure> {
    config::load(&args.files).map_err(Failure::config)
}

/// The admin API token a command presents (see `admin::client::command_token`).
fn command_token(config: &config::Config, args: &ConfigArgs) -> Result<Option<String>, Failure> {
    provring::admin::client::command_token(config, args.token_file.as_deref())
        .map_err(Failure::config)
}

/// `provring server`: 1 when the grace period ran out or a component failed.
async fn run_server(args: &ConfigArgs, node: &str) -> Outcome {
    let config = load(args)?;
    match server::run(config, node).await {
        Ok(server::Exit::Clean) => Ok(0),
        Ok(server::Exit::GraceExpired(_) | server::Exit::Failed(_)) => Ok(EXIT_FAILURE),
        Err(e @ server::ServerError::UnknownNode { .. }) => Err(Failure::config(e)),
        Err(e) => {
            tracing::error!(error = %e, "Server cannot start.");
            Err(Failure::failed(e))
        }
    }
}

/// `provring ring`: 1 when a server of the ring did not end well.
async fn ring(args: &ConfigArgs) -> Outcome {
    let config = load(args)?;
    match provring::local_ring::run(&config, &args.files).await {
        Ok(true) => Ok(0),
        Ok(false) => Ok(EXIT_FAILURE),
        Err(e) => Err(Failure::failed(e)),
    }
}

/// `provring check-config`: the files, the key file and the certificate
/// files; then what each server starts with.
fn check_config(args: &ConfigArgs) -> Outcome {
    let c = load(args)?;
    // The key file is part of a usable configuration.
    let keys = c.security.key_ring().map_err(|e| {
        Failure::Config(format!(
            "security.key_file: {e}\n  (a new cluster writes one with `provring keygen --out {}`; `provring ring` does so on first start)",
            c.security.key_file.display()
        ))
    })?;
    // Certificate files too, named by their key.
    let tls_notes = provring::tls::check_files(&c).map_err(Failure::config)?;
    provring::say!(
        "configuration OK: {} servers, {} adaptors, {} targets, namespace {:?}",
        c.servers.len(),
        c.adaptors.len(),
        c.targets.len(),
        c.broker.namespace
    );
    print_initial_hosts(&c);
    provring::say!("  cluster key: fingerprint {}", keys.fingerprint());
    if c.admin.tls.is_some() {
        provring::say!("  admin API: HTTPS, mutual TLS between peers");
    }
    for note in tls_notes {
        provring::say!("  warning: {note}");
    }
    Ok(0)
}

/// What each server starts with, and why a server hosts nothing.
fn print_initial_hosts(c: &config::Config) {
    let initial = provring::topology::State::initial(c);
    for id in &initial.ring {
        let mut hosts: Vec<&str> = initial
            .adaptors
            .iter()
            .chain(initial.singletons.iter())
            .filter(|(_, h)| *h == id)
            .map(|(name, _)| name.as_str())
            .collect();
        hosts.sort_unstable();
        match initial.hosts_nothing_because(id) {
            Some(reason) => provring::say!("  {id}: hosts nothing: {reason}"),
            None => provring::say!("  {id}: {}", hosts.join(", ")),
        }
    }
}

/// `provring publish`.
async fn publish_events(
    args: &ConfigArgs,
    adaptor: &str,
    file: Option<PathBuf>,
    generate: Option<u64>,
) -> Outcome {
    let config = load(args)?;
    let source = match (file, generate) {
        (Some(path), _) => publish::Source::File(path),
        (None, Some(n)) => publish::Source::Generate(n),
        (None, None) => return Err(Failure::config("give --file or --generate")),
    };
    let summary = publish::run(&config, adaptor, source)
        .await
        .map_err(Failure::failed)?;
    provring::say!("{summary}");
    Ok(0)
}

/// `provring status`: 1 unless every server is up and the ring closed.
async fn status(args: &ConfigArgs, json: bool, watch: bool) -> Outcome {
    let config = load(args)?;
    let token = command_token(&config, args)?;
    loop {
        let report = provring::admin::status::status(&config, token.as_deref())
            .await
            .map_err(Failure::config)?;
        let code = if report.healthy() { 0 } else { EXIT_FAILURE };
        if !watch {
            provring::say!("{}", report.render(json));
            return Ok(code);
        }
        // Clear the screen, then draw.
        provring::say!("\x1b[2J\x1b[H{}", report.render(json));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(code),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// `provring backlog`: 1 when a server did not answer.
async fn backlog(args: &ConfigArgs, node: Option<&str>, json: bool) -> Outcome {
    let config = load(args)?;
    let token = command_token(&config, args)?;
    let report = provring::admin::client::backlog(&config, node, token.as_deref())
        .await
        .map_err(Failure::config)?;
    provring::say!("{}", report.render(json));
    Ok(if report.all_reachable() {
        0
    } else {
        EXIT_FAILURE
    })
}

/// `provring stop`.
async fn stop(args: &ConfigArgs, node: &str) -> Outcome {
    let config = load(args)?;
    let token = command_token(&config, args)?;
    let text = provring::admin::client::stop(&config, node, token.as_deref())
        .await
        .map_err(Failure::failed)?;
    provring::say!("{text}");
    Ok(0)
}

/// `provring move`: the code is the tool's (0 moved, 2 refused, 3 handover
/// not finished in time).
async fn move_to(
    args: &ConfigArgs,
    what: &str,
    to: &str,
    wait: Option<std::time::Duration>,
) -> Outcome {
    let config = load(args)?;
    let progress = |line: &str| provring::say!("{line}");
    let (text, code) = provring::topology::tool::move_to(&config, what, to, wait, &progress)
        .await
        .map_err(Failure::failed)?;
    provring::say!("{text}");
    Ok(code)
}

/// `provring rebalance`: the code is the tool's (0 done, 2 a move refused,
/// 3 a handover not finished in time).
async fn rebalance(args: &ConfigArgs, dry_run: bool, timeout: std::time::Duration) -> Outcome {
    let config = load(args)?;
    let progress = |line: &str| provring::say!("{line}");
    let (text, code) =
        provring::topology::rebalance::rebalance(&config, dry_run, timeout, &progress)
            .await
            .map_err(Failure::failed)?;
    provring::say!("{text}");
    Ok(code)
}

/// `provring drain`: the code is the tool's (0 drained, 2 refused or
/// nowhere to go, 3 a handover not finished in time).
async fn drain(args: &ConfigArgs, node: &str, timeout: std::time::Duration) -> Outcome {
    let config = load(args)?;
    let progress = |line: &str| provring::say!("{line}");
    let (text, code) = provring::topology::tool::drain(&config, node, timeout, &progress)
        .await
        .map_err(Failure::failed)?;
    provring::say!("{text}");
    Ok(code)
}

/// `provring topology show|link`: 2 when the log refused the change.
async fn topology(command: TopologyCommand) -> Outcome {
    use provring::topology::tool;
    let (text, applied) = match command {
        TopologyCommand::Show { config, json } => {
            let config = load(&config)?;
            let text = tool::show(&config, json).await.map_err(Failure::failed)?;
            (text, true)
        }
        TopologyCommand::Link {
            config,
            node,
            monitors,
            expect_epoch,
        } => {
            let config = load(&config)?;
            tool::link(&config, &node, &monitors, expect_epoch)
                .await
                .map_err(Failure::failed)?
        }
    };
    provring::say!("{text}");
    Ok(if applied { 0 } else { EXIT_REFUSED })
}

/// `provring broker-definitions`.
fn broker_definitions(args: &ConfigArgs) -> Outcome {
    let c = load(args)?;
    let doc = provring::broker::declare::definitions(&c);
    provring::say!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    Ok(0)
}

/// `provring keygen`: with `--if-missing`, an existing key file that does
/// not load is a configuration problem.
fn keygen(out: &Path, if_missing: bool) -> Outcome {
    if if_missing && out.exists() {
        let k = provring::crypto::KeyRing::load(out, &[]).map_err(Failure::config)?;
        provring::say!(
            "key {} exists (fingerprint {}); left as it is",
            out.display(),
            k.fingerprint()
        );
        return Ok(0);
    }
    let fingerprint = provring::crypto::keygen(out).map_err(Failure::failed)?;
    provring::say!(
        "wrote a new cluster key to {} (fingerprint {fingerprint}); copy it to every server and set [security] key_file",
        out.display()
    );
    Ok(0)
}

/// `provring token`.
fn token(name: &str, role: &str, out: &Path) -> Outcome {
    let hash = provring::cli::write_token(out).map_err(Failure::failed)?;
    provring::say!(
        "wrote a new token to {} (present it with --token-file {0} or PROVRING_TOKEN); add to the cluster file:\n\n[[security.admin_tokens]]\nname = {name:?}\nrole = {role:?}\nsha256 = {hash:?}",
        out.display()
    );
    Ok(0)
}

/// `provring rekey`.
fn rekey(args: &ConfigArgs, node: &str) -> Outcome {
    let config = load(args)?;
    let done = provring::cli::rekey(&config, node).map_err(Failure::failed)?;
    provring::say!("{done}");
    Ok(0)
}

/// `provring bench pipeline|failover`.
async fn run_bench(which: Bench) -> Outcome {
    let report = match &which {
        Bench::Failover(args) => bench::failover::failover(args)
            .await
            .map(|r| r.render(args.json)),
        Bench::Pipeline(args) => bench::pipeline(args).await.map(|r| r.render(args.json)),
    }
    .map_err(|e| Failure::failed(format!("bench failed: {e}")))?;
    provring::say!("{report}");
    Ok(0)
}
