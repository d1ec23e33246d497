//! Cluster files for tests: the one-server and ring layouts of [`Setup`],
//! the `[security]` section every test cluster shares (key and admin
//! tokens), and free admin addresses.

use super::broker::{amqp_uri, namespace};
use provring::config::Config;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

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
        let hosting = format!(
            r#"[servers.a]
admin_listen = {admin:?}
data_dir = {data:?}

[adaptors.hr]
kind = "provisioning"
queue = "hr"
server = "a"
target = "hook"
concurrency = {concurrency}
"#,
            admin = self.admin,
            data = dir.join("data-a").display().to_string(),
            concurrency = self.concurrency,
        );
        self.write_file(dir, &hosting)
    }

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
        let path = self.write_file(dir, &format!("{servers}\n{adaptors}"));
        (path, admins)
    }

    /// Write `<dir>/cluster.toml`: `hosting` (the servers and adaptors)
    /// amid the sections every test cluster shares (broker, the webhook
    /// target, retry, limits, shutdown, security, then `extra`).
    fn write_file(&self, dir: &Path, hosting: &str) -> PathBuf {
        let toml = format!(
            r#"
[broker]
uris = [{uri:?}]
namespace = {ns:?}
prefetch = 500
reconnect_min = "100ms"
reconnect_max = "1s"
publish_timeout = "5s"

{hosting}
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
        path
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

pub fn load(path: &Path) -> Config {
    provring::config::load(&[path.to_owned()]).expect("test config is valid")
}
