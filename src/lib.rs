//! provring: a provisioning server for event-driven identity feeds.
//!
//! Servers consume provisioning and password-change events from RabbitMQ,
//! keep each in a local sled repository until its workflow has delivered it
//! to a target system, and ack the broker only once the event is durable.
//!
//! # Layout
//!
//! - [`cli`]: the `provring` subcommands.
//! - [`config`]: configuration structs, layered loading, pure validation.
//! - [`event`]: the CloudEvents envelope, identity, validation.
//! - [`broker`]: lapin connection with reconnect, declarations, publish with confirm.
//! - [`adaptor`]: one queue → repository → flush → ack.
//! - [`repository`]: the sled layout and group commit.
//! - [`workflow`]: the executor (retry, back-off, deadline, parking) and
//!   [`workflow::targets`] (webhook, SCIM, null).
//! - [`server`]: wires one node's components, graceful shutdown.
//! - [`admin`]: the admin HTTP API (`/health`, `/backlog`).
//! - [`local_ring`]: `provring ring`, every server of a cluster file on one machine.
//! - [`publish`]: `provring publish`.
//! - [`bench`]: `provring bench`.
//! - [`topology`]: the replicated topology and its log on the broker.
//! - [`mirror`]: copies of the backlog on the monitor (backup adaptor).
//! - [`supervisor`]: watches the monitored server and proposes its
//!   takeover when it fails; [`supervisor::takeover`]: the takeover on the
//!   taker (adopt the backlog, mail) and on the server taken over (rejoin,
//!   return).
//! - [`hosting`]: follows the topology: [`hosting::plan`] decides what to
//!   start and stop here, [`hosting::run`] does it; fencing.
//! - [`node`]: the parts one server's tasks share.
//! - [`scheduler`], [`timeout`]: the singleton services; [`schedule`]:
//!   schedules as data (cadence, slots, the event of a slot).
//! - [`admin::api`]: the types peers exchange over the admin API.
//! - [`tls`]: rustls configurations from PEM files.
//! - [`time`]: wall-clock helpers.
//! - [`alert`]: e-mail alerts.
//! - [`crypto`]: the cluster key: sealed bodies, MACs on the ring's records.
//! - [`parking`]: the parking queue (sealed bodies, clear headers, TTL).
//! - [`stats`]: counters for progress logs and benchmarks.
#![forbid(unsafe_code)]

pub mod adaptor;
pub mod admin;
pub mod alert;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod event;
pub mod handover;
pub mod hosting;
pub mod local_ring;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod parking;
pub mod publish;
pub mod repository;
pub mod schedule;
pub mod scheduler;
pub mod server;
pub mod stats;
pub mod supervisor;
pub mod time;
pub mod timeout;
pub mod tls;
pub mod topology;
pub mod workflow;

/// Write one line of a command's output to stdout. When the reader has
/// gone away (`provring topology show | head`) or the output cannot be
/// written, the rest of the output is dropped quietly (one line on stderr
/// for an error other than a closed pipe) instead of panicking, and the
/// command goes on to its end and its own exit code: a drain or a move
/// is never cut short by its output. [`say!`] is the `println!` form.
pub fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static DROPPED: AtomicBool = AtomicBool::new(false);
    if DROPPED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}").and_then(|()| out.flush()) {
        DROPPED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("provring: cannot write the output: {e}");
        }
    }
}

/// `println!` for command output that ends quietly on a closed pipe
/// (see [`say_line`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}

/// Install the process-wide rustls crypto provider (aws-lc-rs) once, before
/// any TLS is used; rustls panics when it has to choose between two.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
