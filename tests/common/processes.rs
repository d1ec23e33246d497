//! Real `provring` processes started from the built binary: servers
//! (started, signalled, killed, waited for), one-shot commands, and the
//! repository a stopped server left behind.

use super::cluster::key_ring;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
