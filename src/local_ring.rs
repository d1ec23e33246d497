//! `provring ring`: run every server of a cluster file on this machine, one
//! child process each (for trying provring out and for local development).
//! SIGINT/SIGTERM is passed on to every server, which then shuts down
//! gracefully; the command exits when all have, non-zero if any failed.

use crate::config::Config;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("cannot find the provring executable: {0}")]
    Exe(std::io::Error),
    #[error("cannot start server {node}: {source}")]
    Spawn {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("security.key_file: {0}")]
    Key(#[from] crate::crypto::KeyError),
}

/// Start one `provring server` per `[servers.<id>]` and wait for them.
pub async fn run(config: &Config, files: &[PathBuf]) -> Result<bool, RingError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(RingError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RingError::Signals)?;
    let exe = std::env::current_exe().map_err(RingError::Exe)?;
    // On one machine every server reads the same key file: a first start
    // writes one.
    let key = &config.security.key_file;
    if !key.exists() {
        let fingerprint = crate::crypto::keygen(key)?;
        crate::say!(
            "ring: wrote a new cluster key to {} (fingerprint {fingerprint})",
            key.display()
        );
    }
    let mut children: Vec<(String, Child)> = Vec::new();
    for node in config.servers.keys() {
        let mut cmd = Command::new(&exe);
        cmd.arg("server");
        for f in files {
            cmd.arg("--config").arg(f);
        }
        cmd.args(["--node", node])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| RingError::Spawn {
            node: node.clone(),
            source,
        })?;
        tracing::info!(%node, pid = child.id(), "Server process started.");
        children.push((node.clone(), child));
    }
    crate::say!(
        "ring: {} servers running ({}); Ctrl-C stops them",
        children.len(),
        config.server_names()
    );
    let waits = children.iter_mut().map(|(_, c)| c.wait());
    let mut all = Box::pin(futures::future::join_all(waits));
    let statuses = tokio::select! {
        s = &mut all => s,
        _ = sigterm.recv() => Vec::new(),
        _ = sigint.recv() => Vec::new(),
    };
    drop(all);
    let statuses = if statuses.is_empty() {
        for (node, child) in &children {
            if let Some(pid) = child.id() {
                tracing::info!(%node, "Stopping server.");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        let mut out = Vec::new();
        for (_, child) in &mut children {
            out.push(child.wait().await);
        }
        out
    } else {
        statuses
    };
    let mut ok = true;
    for ((node, _), status) in children.iter().zip(statuses) {
        match status {
            Ok(s) if s.success() => tracing::info!(%node, "Server stopped."),
            Ok(s) => {
                ok = false;
                tracing::warn!(%node, status = %s, "Server ended with a failure.");
            }
            Err(e) => {
                ok = false;
                tracing::warn!(%node, error = %e, "Cannot wait for the server.");
            }
        }
    }
    Ok(ok)
}
