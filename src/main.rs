//! The `provring` binary: parse the command line, set up logging, load the
//! configuration, run the subcommand, turn the outcome into an exit code.
#![forbid(unsafe_code)]

use clap::Parser;
use provring::cli::{Bench, Cli, Command, LogFormat, TopologyCommand};
use provring::{bench, config, publish, server};

use std::process::ExitCode;

/// Exit code for a configuration that cannot be used (EX_CONFIG is 78; 64,
/// EX_USAGE, is what operators and the issue tracker agreed on).
const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

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
            eprintln!("provring: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(run(cli.command));
    // Dropping the tasks still alive (executors finishing after the final
    // flush) drops the last repository handles, which flushes their writes;
    // a blocking call that does not end within the bound must not hold the
    // exit (the work that matters is done or named by now).
    runtime.shutdown_timeout(provring::server::FINAL_STEPS);
    code
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

fn load(files: &[std::path::PathBuf]) -> Result<config::Config, ExitCode> {
    config::load(files).map_err(|e| {
        eprintln!("provring: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Server { config, node } => {
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match server::run(config, &node).await {
                Ok(server::Exit::Clean) => ExitCode::SUCCESS,
                Ok(server::Exit::GraceExpired(_) | server::Exit::Failed(_)) => {
                    ExitCode::from(EXIT_FAILURE)
                }
                Err(e @ server::ServerError::UnknownNode { .. }) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    tracing::error!(error = %e, "Server cannot start.");
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Ring { config: args } => {
            let config = match load(&args.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match provring::local_ring::run(&config, &args.files).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_FAILURE),
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::CheckConfig { config } => match load(&config.files) {
            Ok(c) => {
                // The key file is part of a usable configuration.
                let fingerprint = match c.security.key_ring() {
                    Ok(keys) => keys.fingerprint(),
                    Err(e) => {
                        eprintln!(
                            "provring: security.key_file: {e}\n  (a new cluster writes one with `provring keygen --out {}`; `provring ring` does so on first start)",
                            c.security.key_file.display()
                        );
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                // Certificate files too, named by their key.
                let tls_notes = match provring::tls::check_files(&c) {
                    Ok(notes) => notes,
                    Err(e) => {
                        eprintln!("provring: {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                println!(
                    "configuration OK: {} servers, {} adaptors, {} targets, namespace {:?}",
                    c.servers.len(),
                    c.adaptors.len(),
                    c.targets.len(),
                    c.broker.namespace
                );
                // What each server starts with, and why a server hosts nothing.
                let initial = provring::topology::State::initial(&c);
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
                        Some(reason) => println!("  {id}: hosts nothing: {reason}"),
                        None => println!("  {id}: {}", hosts.join(", ")),
                    }
                }
                println!("  cluster key: fingerprint {fingerprint}");
                if c.admin.tls.is_some() {
                    println!("  admin API: HTTPS, mutual TLS between peers");
                }
                for note in tls_notes {
                    println!("  warning: {note}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Backlog { config, node, json } => {
            let token_file = config.token_file.clone();
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let token = match command_token(&config, token_file.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match provring::admin::client::backlog(&config, node.as_deref(), token.as_deref()).await
            {
                Ok(report) => {
                    println!("{}", report.render(json));
                    if report.all_reachable() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Topology { command } => topology_command(command).await,
        Command::Stop { config, node } => {
            let token_file = config.token_file.clone();
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let token = match command_token(&config, token_file.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match provring::admin::client::stop(&config, &node, token.as_deref()).await {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Move {
            config,
            what,
            to,
            no_wait,
            timeout,
        } => {
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let wait = (!no_wait).then_some(timeout);
            match provring::topology::tool::move_to(&config, &what, &to, wait).await {
                Ok((text, code)) => {
                    println!("{text}");
                    ExitCode::from(code)
                }
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Keygen { out, if_missing } => {
            if if_missing && out.exists() {
                return match provring::crypto::KeyRing::load(&out, &[]) {
                    Ok(k) => {
                        println!(
                            "key {} exists (fingerprint {}); left as it is",
                            out.display(),
                            k.fingerprint()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("provring: {e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                };
            }
            match provring::crypto::keygen(&out) {
                Ok(fingerprint) => {
                    println!(
                        "wrote a new cluster key to {} (fingerprint {fingerprint}); copy it to every server and set [security] key_file",
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Token { name, role, out } => match write_token(&out) {
            Ok(hash) => {
                println!(
                    "wrote a new token to {} (present it with --token-file {0} or PROVRING_TOKEN); add to the cluster file:\n\n[[security.admin_tokens]]\nname = {name:?}\nrole = {role:?}\nsha256 = {hash:?}",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("provring: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Rekey { config, node } => {
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match rekey(&config, &node) {
                Ok(done) => {
                    println!("{done}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::BrokerDefinitions { config } => match load(&config.files) {
            Ok(c) => {
                let doc = provring::broker::declare::definitions(&c);
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Publish {
            config,
            adaptor,
            file,
            generate,
        } => {
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let source = match (file, generate) {
                (Some(path), _) => publish::Source::File(path),
                (None, Some(n)) => publish::Source::Generate(n),
                (None, None) => {
                    eprintln!("provring: give --file or --generate");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match publish::run(&config, &adaptor, source).await {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("provring: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Bench {
            bench: Bench::Failover(args),
        } => match provring::bench::failover::failover(&args).await {
            Ok(report) => {
                println!("{}", report.render(args.json));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("provring: bench failed: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Bench {
            bench: Bench::Pipeline(args),
        } => match bench::pipeline(&args).await {
            Ok(report) => {
                println!("{}", report.render(args.json));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("provring: bench failed: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

/// Write a new operator token to `out` (mode 0600, never overwriting);
/// returns its SHA-256.
fn write_token(out: &std::path::Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = provring::admin::auth::new_token().map_err(|e| e.to_string())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| format!("cannot write token file {}: {e}", out.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .map_err(|e| format!("cannot write token file {}: {e}", out.display()))?;
    Ok(provring::admin::auth::token_hash(&token))
}

/// The admin API token a command presents (see `admin::client::command_token`).
fn command_token(
    config: &config::Config,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, ExitCode> {
    provring::admin::client::command_token(config, file).map_err(|e| {
        eprintln!("provring: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `provring rekey`: re-seal the repository of stopped server `node`.
fn rekey(config: &config::Config, node: &str) -> Result<String, String> {
    let server = config.servers.get(node).ok_or_else(|| {
        format!(
            "node {node:?} is not in the configuration; known servers: {}",
            config.server_names()
        )
    })?;
    let keys = config
        .security
        .key_ring()
        .map_err(|e| format!("security.key_file: {e}"))?;
    let fingerprint = keys.fingerprint();
    let repo = provring::repository::Repository::open(&server.data_dir, std::sync::Arc::new(keys))
        .map_err(|e| e.to_string())?;
    let done = repo.rekey().map_err(|e| e.to_string())?;
    Ok(format!(
        "rekey {node}: {} records ({} events) re-sealed under key {fingerprint}, {} already under it",
        done.records, done.events, done.current
    ))
}

async fn topology_command(command: TopologyCommand) -> ExitCode {
    use provring::topology::tool;
    let result = match command {
        TopologyCommand::Show { config, json } => {
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tool::show(&config, json).await.map(|text| (text, true))
        }
        TopologyCommand::Link {
            config,
            node,
            monitors,
            expect_epoch,
        } => {
            let config = match load(&config.files) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tool::link(&config, &node, &monitors, expect_epoch).await
        }
    };
    match result {
        Ok((text, true)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok((text, false)) => {
            println!("{text}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("provring: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
