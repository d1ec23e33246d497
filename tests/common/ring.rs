//! A whole ring of real servers behind one recording target, for tests
//! that need no special cluster file.

use super::broker::Cleanup;
use super::cluster::{Setup, load};
use super::processes::{ServerProc, start_servers};
use super::recorder::Recorder;
use provring::config::Config;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

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
