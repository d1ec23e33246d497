//! Validation: pure checks over a deserialised [`Config`], returning every
//! problem with the key it concerns.

use super::{
    AdaptorConfig, AdaptorKind, AdminAuth, AlertsConfig, AuthConfig, BrokerConfig, ClientTlsConfig,
    Config, DoneLedgerConfig, LimitsConfig, ParkingConfig, RetryConfig, Service, SmtpTls,
    SupervisorConfig, TargetConfig, TargetKind, TimeoutCheckerConfig,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// One thing wrong with a configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `adaptors.hr.target`.
    pub key: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Whether an `admin_listen` address is on the loopback interface.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The problems found so far: every check adds to one list, so that a
/// configuration is reported with all its problems at once.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem::new(key, message));
    }
}

/// Every problem of `config`, in key order of appearance; empty if it is usable.
///
/// One function per section, all adding to one list. The calls keep the
/// order in which `check-config` has always listed the problems, which is
/// why `[broker]` and `[limits]` are checked in parts.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    broker_addresses(&config.broker, &mut p);
    supervisor(&config.supervisor, &mut p);
    broker_tls(&config.broker, &mut p);
    if let Some(a) = &config.alerts {
        alerts(a, &mut p);
    }
    broker_connection(&config.broker, &mut p);
    servers(config, &mut p);
    adaptors(config, &mut p);
    targets(config, &mut p);
    retry(&config.retry, &mut p);
    limits_message_size(&config.limits, &mut p);
    security(config, &mut p);
    admin(config, &mut p);
    limits_depth(&config.limits, &mut p);
    parking(&config.parking, &mut p);
    done_ledger(&config.done_ledger, &mut p);
    timeout_checker(&config.timeout_checker, &mut p);
    schedules(config, &mut p);
    p.0
}

/// `[broker]`: the URIs and the namespace.
fn broker_addresses(b: &BrokerConfig, p: &mut Problems) {
    if b.uris.is_empty() {
        p.add("broker.uris", "at least one AMQP URI is needed");
    }
    for (i, uri) in b.uris.iter().enumerate() {
        if let Err(reason) = check_amqp_uri(uri) {
            p.add(format!("broker.uris[{i}]"), reason);
        }
    }
    if !is_name(&b.namespace) {
        p.add(
            "broker.namespace",
            format!(
                "{:?} must be 1-100 letters, digits, '.', '-' or '_'",
                b.namespace
            ),
        );
    }
}

/// `[supervisor]`: the probe cadence, and a fence that comes before a takeover.
fn supervisor(sup: &SupervisorConfig, p: &mut Problems) {
    if sup.retry_count == 0 {
        p.add("supervisor.retry_count", "must be at least 1");
    }
    if sup.monitoring_interval.is_zero() {
        p.add("supervisor.monitoring_interval", "must be above 0");
    }
    if sup.state_threshold > 10 {
        p.add(
            "supervisor.state_threshold",
            format!("{} must be between 0 and 10", sup.state_threshold),
        );
    }
    if sup.detection_time() <= sup.fence_after {
        p.add(
            "supervisor.fence_after",
            format!(
                "{} must be shorter than the detection time monitoring_interval × retry_count = {}, \
                 or a server could be taken over before it stops delivering",
                humantime::format_duration(sup.fence_after),
                humantime::format_duration(sup.detection_time())
            ),
        );
    }
}

/// `[broker.tls]`: a whole client identity, and no plain URI beside it.
fn broker_tls(b: &BrokerConfig, p: &mut Problems) {
    let Some(t) = &b.tls else { return };
    if t.cert_file.is_some() != t.key_file.is_some() {
        p.add(
            "broker.tls.key_file",
            "give both cert_file and key_file, or neither",
        );
    }
    // With TLS wanted, a plain URI would be a silent way around it
    // (the connect loop moves on to the next URI).
    for (i, u) in b.uris.iter().enumerate() {
        if !u.starts_with("amqps://") {
            p.add(
                format!("broker.uris[{i}]"),
                "must be amqps:// when [broker.tls] is set (a plain URI would be tried when TLS fails)",
            );
        }
    }
}

/// `[alerts]`: addresses, and an SMTP password only over TLS.
fn alerts(a: &AlertsConfig, p: &mut Problems) {
    if a.to.is_empty() {
        p.add("alerts.to", "at least one recipient is needed");
    }
    for (i, addr) in a.to.iter().chain(std::iter::once(&a.from)).enumerate() {
        if !addr.contains('@') {
            let key = if i < a.to.len() {
                format!("alerts.to[{i}]")
            } else {
                "alerts.from".into()
            };
            p.add(key, format!("{addr:?} is not an e-mail address"));
        }
    }
    if a.username.is_some() != a.password.is_some() {
        p.add(
            "alerts.password",
            "give both username and password, or neither",
        );
    }
    if a.password.is_some() && a.tls == SmtpTls::None {
        p.add(
            "alerts.tls",
            "\"none\" would send the SMTP password in clear; use \"starttls\" or \"tls\" \
             (and alerts.ca_file for a private CA)",
        );
    }
    if a.ca_file.is_some() && a.tls == SmtpTls::None {
        p.add(
            "alerts.ca_file",
            "is used only with tls = \"starttls\" or \"tls\"",
        );
    }
}

/// `[broker]`: heartbeat, batching and reconnect timing.
fn broker_connection(b: &BrokerConfig, p: &mut Problems) {
    if b.heartbeat.as_secs() == 0 || b.heartbeat.as_secs() > 600 {
        p.add(
            "broker.heartbeat",
            "must be between 1s and 10m (whole seconds)",
        );
    }
    if b.prefetch == 0 {
        p.add("broker.prefetch", "must be at least 1");
    }
    if b.batch_max == 0 {
        p.add("broker.batch_max", "must be at least 1");
    }
    if b.publish_timeout.is_zero() {
        p.add("broker.publish_timeout", "must be longer than 0");
    }
    if b.reconnect_min.is_zero() || b.reconnect_min > b.reconnect_max {
        p.add(
            "broker.reconnect_min",
            format!(
                "{} must be above 0 and at most broker.reconnect_max ({})",
                humantime::format_duration(b.reconnect_min),
                humantime::format_duration(b.reconnect_max)
            ),
        );
    }
}

/// `[servers.<id>]`: node ids, and an admin address and a data directory
/// of each server's own.
fn servers(config: &Config, p: &mut Problems) {
    if config.servers.is_empty() {
        p.add("servers", "at least one [servers.<id>] is needed");
    }
    let mut listens: BTreeMap<&str, &str> = BTreeMap::new();
    let mut dirs: BTreeMap<&Path, &str> = BTreeMap::new();
    for (id, s) in &config.servers {
        if !is_name(id) {
            p.add(
                format!("servers.{id}"),
                "a node id must be letters, digits, '.', '-' or '_'",
            );
        }
        match admin_address(&s.admin_listen) {
            Ok(port) => {
                // Port 0 (any free port) may repeat.
                if port != 0
                    && let Some(other) = listens.insert(s.admin_listen.as_str(), id)
                {
                    p.add(
                        format!("servers.{id}.admin_listen"),
                        format!(
                            "{} is also the admin address of server {other}",
                            s.admin_listen
                        ),
                    );
                }
            }
            Err(reason) => p.add(
                format!("servers.{id}.admin_listen"),
                format!("{:?} is not host:port ({reason})", s.admin_listen),
            ),
        }
        if s.data_dir.as_os_str().is_empty() {
            p.add(format!("servers.{id}.data_dir"), "must not be empty");
        } else if let Some(other) = dirs.insert(&s.data_dir, id) {
            p.add(
                format!("servers.{id}.data_dir"),
                format!(
                    "{} is also the data directory of server {other}; each server needs its own",
                    s.data_dir.display()
                ),
            );
        }
    }
}

/// `[adaptors.<name>]`: a queue of its own, a server that may host it, a
/// target that exists (and keeps passwords off plain HTTP), sane limits.
fn adaptors(config: &Config, p: &mut Problems) {
    // Queue → the adaptor that claimed it first.
    let mut queues: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, a) in &config.adaptors {
        let key = |field: &str| format!("adaptors.{name}.{field}");
        if !is_name(name) {
            p.add(
                format!("adaptors.{name}"),
                "an adaptor name must be letters, digits, '.', '-' or '_'",
            );
        }
        adaptor_queue(name, a, &mut queues, p);
        adaptor_server(config, name, a, p);
        adaptor_target(config, name, a, p);
        if a.timeout.is_some_and(|t| t.is_zero()) {
            p.add(key("timeout"), "must be longer than 0");
        }
        if a.concurrency == 0 || a.concurrency > 1024 {
            p.add(
                key("concurrency"),
                format!("{} must be between 1 and 1024", a.concurrency),
            );
        }
    }
}

/// An adaptor's queue: a valid name, not one of provring's own, not shared.
fn adaptor_queue<'a>(
    name: &'a str,
    a: &'a AdaptorConfig,
    queues: &mut BTreeMap<&'a str, &'a str>,
    p: &mut Problems,
) {
    let key = format!("adaptors.{name}.queue");
    if !is_name(&a.queue) {
        p.add(
            key,
            format!(
                "{:?} must be 1-100 letters, digits, '.', '-' or '_'",
                a.queue
            ),
        );
    } else if ["parking", "events", "topology"].contains(&a.queue.as_str())
        || ["backup.", "handover.", "alive."]
            .iter()
            .any(|prefix| a.queue.starts_with(prefix))
    {
        p.add(key, format!("{:?} is reserved by provring", a.queue));
    } else if let Some(other) = queues.insert(&a.queue, name) {
        p.add(
            key,
            format!("queue {:?} is also used by adaptor {other}", a.queue),
        );
    }
}

/// An adaptor's server: one that exists and may host adaptors.
fn adaptor_server(config: &Config, name: &str, a: &AdaptorConfig, p: &mut Problems) {
    let key = format!("adaptors.{name}.server");
    match config.servers.get(&a.server) {
        None => p.add(
            key,
            format!(
                "{:?} is not a server; known: {}",
                a.server,
                known(config.servers.keys())
            ),
        ),
        Some(server) if !server.services.contains(&Service::Adaptors) => p.add(
            key,
            format!(
                "server {} may not host adaptors (servers.{}.services has no \"adaptors\")",
                a.server, a.server
            ),
        ),
        Some(_) => {}
    }
}

/// An adaptor's target: one that exists, and, for passwords, not over
/// plain HTTP unless the target allows it.
fn adaptor_target(config: &Config, name: &str, a: &AdaptorConfig, p: &mut Problems) {
    let key = format!("adaptors.{name}.target");
    let Some(t) = config.targets.get(&a.target) else {
        p.add(
            key,
            format!(
                "{:?} is not a target; known: {}",
                a.target,
                known(config.targets.keys())
            ),
        );
        return;
    };
    if a.kind == AdaptorKind::Password
        && !t.allow_insecure_http
        && t.url.as_deref().is_some_and(|u| {
            // As the target parses it (url tidies " http:/h" into http).
            url::Url::parse(u).map_or(true, |parsed| parsed.scheme() != "https")
        })
    {
        p.add(
            key,
            format!(
                "password adaptor {name} would send password values in clear: targets.{t}.url \
                 is not https://; use https://, or set targets.{t}.allow_insecure_http = true for a \
                 target on this machine",
                t = a.target
            ),
        );
    }
}

/// `[targets.<name>]`: URL, timeout, TLS and authentication.
fn targets(config: &Config, p: &mut Problems) {
    for (name, t) in &config.targets {
        target_url(name, t, p);
        if t.timeout.is_zero() {
            p.add(format!("targets.{name}.timeout"), "must be longer than 0");
        }
        if let Some(tls) = &t.tls {
            target_tls(name, t, tls, p);
        }
        if let Some(auth) = &t.auth {
            target_auth(name, auth, p);
        }
    }
}

/// A target's URL: present unless the target is `null`, http(s), and with
/// no credentials in it (they would not be sent).
fn target_url(name: &str, t: &TargetConfig, p: &mut Problems) {
    let key = format!("targets.{name}.url");
    match (t.kind, &t.url) {
        (TargetKind::Null, _) => {}
        (_, None) => p.add(key, "is required for this kind of target"),
        (_, Some(url)) => match url::Url::parse(url) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => p.add(
                key,
                format!("holds credentials, which are not sent; use targets.{name}.auth"),
            ),
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(u) => p.add(key, format!("scheme {:?} is not http or https", u.scheme())),
            Err(e) => p.add(key, format!("{url:?} is not a URL ({e})")),
        },
    }
}

/// `[targets.<name>.tls]`: a whole client identity, and an https:// URL to use it on.
fn target_tls(name: &str, t: &TargetConfig, tls: &ClientTlsConfig, p: &mut Problems) {
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        p.add(
            format!("targets.{name}.tls.key_file"),
            "give both cert_file and key_file, or neither",
        );
    }
    if t.url
        .as_deref()
        .is_none_or(|u| url::Url::parse(u).map_or(true, |u| u.scheme() != "https"))
    {
        p.add(
            format!("targets.{name}.tls"),
            format!("is used only with an https:// URL; targets.{name}.url is not one"),
        );
    }
}

/// `[targets.<name>.auth]`: exactly one way to authenticate, and a token
/// file that can be read.
fn target_auth(name: &str, auth: &AuthConfig, p: &mut Problems) {
    let key = format!("targets.{name}.auth");
    let bearer = auth.bearer_token.is_some() as u8 + auth.bearer_token_file.is_some() as u8;
    let basic = auth.username.is_some() || auth.password.is_some();
    if bearer > 1 || (bearer == 1 && basic) {
        p.add(
            key,
            "set only one of bearer_token, bearer_token_file, or username+password",
        );
    } else if basic && (auth.username.is_none() || auth.password.is_none()) {
        p.add(key, "basic authentication needs both username and password");
    } else if bearer == 0 && !basic {
        p.add(
            key,
            "is empty; set bearer_token, bearer_token_file or username+password",
        );
    }
    if let Some(path) = &auth.bearer_token_file
        && std::fs::metadata(path).is_err()
    {
        p.add(
            format!("targets.{name}.auth.bearer_token_file"),
            format!("{} cannot be read", path.display()),
        );
    }
}

/// `[retry]`: attempts, back-off and deadline.
fn retry(r: &RetryConfig, p: &mut Problems) {
    if r.attempts == 0 {
        p.add("retry.attempts", "must be at least 1");
    }
    if r.initial_backoff.is_zero() || r.initial_backoff > r.max_backoff {
        p.add(
            "retry.initial_backoff",
            "must be above 0 and at most retry.max_backoff",
        );
    }
    if !(r.multiplier >= 1.0 && r.multiplier <= 100.0) {
        p.add(
            "retry.multiplier",
            format!("{} must be between 1 and 100", r.multiplier),
        );
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        p.add(
            "retry.jitter",
            format!("{} must be between 0 and 1", r.jitter),
        );
    }
    if r.max_backoff > Duration::from_secs(30 * 24 * 3600) {
        p.add(
            "retry.max_backoff",
            format!(
                "{} is longer than the 30 days allowed",
                humantime::format_duration(r.max_backoff)
            ),
        );
    }
    if r.deadline.is_zero() {
        p.add("retry.deadline", "must be longer than 0");
    }
}

/// `[limits] max_message_size`.
fn limits_message_size(limits: &LimitsConfig, p: &mut Problems) {
    let max = limits.max_message_size;
    if !(1024..=64 * 1024 * 1024).contains(&max) {
        p.add(
            "limits.max_message_size",
            format!("{max} must be between 1024 (1 KiB) and 67108864 (64 MiB)"),
        );
    }
}

/// `[security]`: operator token hashes and names, and no-token mode only
/// where every admin address is on loopback.
fn security(config: &Config, p: &mut Problems) {
    let sec = &config.security;
    let mut names = BTreeSet::new();
    for (i, t) in sec.admin_tokens.iter().enumerate() {
        let h = &t.sha256;
        if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            p.add(
                format!("security.admin_tokens[{i}].sha256"),
                "must be the SHA-256 of the token as 64 hex digits (provring token prints it)",
            );
        }
        if !names.insert(t.name.as_str()) {
            p.add(
                format!("security.admin_tokens[{i}].name"),
                format!("{:?} is used twice", t.name),
            );
        }
    }
    if sec.admin_auth == AdminAuth::None {
        for (id, s) in &config.servers {
            if !is_loopback(&s.admin_listen) {
                p.add(
                    "security.admin_auth",
                    format!(
                        "\"none\" is allowed only when every admin address is a loopback address; \
                         servers.{id}.admin_listen is {:?}",
                        s.admin_listen
                    ),
                );
            }
        }
    }
}

/// `[admin]`: with TLS, addresses peers can check against a certificate;
/// timeouts and limits above 0.
fn admin(config: &Config, p: &mut Problems) {
    let a = &config.admin;
    if a.tls.is_some() {
        for (id, s) in &config.servers {
            if s.admin_listen.starts_with("0.0.0.0:") || s.admin_listen.starts_with("[::]:") {
                p.add(
                    format!("servers.{id}.admin_listen"),
                    format!(
                        "{:?}: with [admin.tls], peers connect to this address and check it against \
                         the certificate; give the server's own address or name",
                        s.admin_listen
                    ),
                );
            }
        }
    }
    if a.header_read_timeout.is_zero() || a.request_timeout.is_zero() {
        p.add(
            "admin",
            "header_read_timeout and request_timeout must be longer than 0",
        );
    }
    if a.max_connections == 0 || a.max_body < 1024 {
        p.add(
            "admin",
            "max_connections must be at least 1 and max_body at least 1024",
        );
    }
}

/// `[limits] max_depth`.
fn limits_depth(limits: &LimitsConfig, p: &mut Problems) {
    if !(2..=10_000).contains(&limits.max_depth) {
        p.add(
            "limits.max_depth",
            format!("{} must be between 2 and 10000", limits.max_depth),
        );
    }
}

/// `[parking]`: how long parked events are kept.
fn parking(parking: &ParkingConfig, p: &mut Problems) {
    if parking.ttl < Duration::from_secs(60) || parking.ttl > Duration::from_secs(365 * 24 * 3600) {
        p.add(
            "parking.ttl",
            format!(
                "{} must be between 1 minute and 365 days",
                humantime::format_duration(parking.ttl)
            ),
        );
    }
}

/// `[done_ledger]`.
fn done_ledger(ledger: &DoneLedgerConfig, p: &mut Problems) {
    if ledger.max_entries == 0 {
        p.add("done_ledger.max_entries", "must be at least 1");
    }
}

/// `[timeout_checker]`.
fn timeout_checker(checker: &TimeoutCheckerConfig, p: &mut Problems) {
    if checker.check_interval < Duration::from_millis(100) {
        p.add("timeout_checker.check_interval", "must be at least 100ms");
    }
}

/// `[schedules.<name>]`: the cadence parses, the adaptor exists, and the
/// event it renders is one the adaptor accepts.
fn schedules(config: &Config, p: &mut Problems) {
    for (name, s) in &config.schedules {
        let key = |k: &str| format!("schedules.{name}.{k}");
        if !is_name(name) || name.contains('@') {
            p.add(
                format!("schedules.{name}"),
                "a schedule name must be letters, digits, '.', '-' or '_'",
            );
        }
        if let Err(e) = crate::schedule::Cadence::of(s) {
            p.add(
                key(if s.cron.is_some() { "cron" } else { "every" }),
                e.to_string(),
            );
        }
        let Some(adaptor) = config.adaptors.get(&s.adaptor) else {
            p.add(
                key("adaptor"),
                format!(
                    "{:?} is not an adaptor; known: {}",
                    s.adaptor,
                    known(config.adaptors.keys())
                ),
            );
            continue;
        };
        let body = crate::schedule::render(name, s, 0);
        if let Err(reason) = crate::event::decode(
            body.as_bytes(),
            adaptor.kind,
            &LimitsConfig {
                max_message_size: usize::MAX,
                ..config.limits.clone()
            },
        ) {
            p.add(
                key("event"),
                format!("the event it publishes would be parked: {}", reason.0),
            );
        }
    }
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// Names that end up in broker queue names and sled keys.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
}

fn check_amqp_uri(uri: &str) -> Result<(), String> {
    let parsed = url::Url::parse(uri).map_err(|e| format!("not a URI ({e})"))?;
    match parsed.scheme() {
        "amqp" | "amqps" => {}
        other => return Err(format!("scheme {other:?} is not amqp or amqps")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

/// The port of an admin address: an IP socket address (`127.0.0.1:7101`,
/// `[::1]:7101`) or a host name and port (`provring-a:7101`, for containers,
/// where peers reach a server by its name and the server listens on the
/// address its name resolves to).
fn admin_address(text: &str) -> Result<u16, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr.port());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(|| "no port".to_owned())?;
    let port = port
        .parse::<u16>()
        .map_err(|e| format!("port {port:?}: {e}"))?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !host_ok {
        return Err(format!("{host:?} is neither an IP address nor a host name"));
    }
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_are_ip_or_host_name_with_a_port() {
        assert_eq!(admin_address("127.0.0.1:7101"), Ok(7101));
        assert_eq!(admin_address("[::1]:0"), Ok(0));
        assert_eq!(admin_address("provring-a:7101"), Ok(7101));
        assert!(admin_address("provring-a").is_err());
        assert!(admin_address("provring-a:http").is_err());
        assert!(admin_address("bad host:7101").is_err());
        assert!(admin_address(":7101").is_err());
    }
    use crate::config::*;
    use std::time::Duration;

    fn sample() -> Config {
        let toml = r#"
            [broker]
            uris = ["amqp://guest:guest@127.0.0.1:5672/%2f"]
            [servers.a]
            admin_listen = "127.0.0.1:7001"
            data_dir = "/tmp/a"
            [adaptors.hr]
            kind = "provisioning"
            queue = "hr"
            server = "a"
            target = "hook"
            [targets.hook]
            kind = "webhook"
            url = "http://127.0.0.1:9000/events"
            [security]
            key_file = "/tmp/cluster.key"
        "#;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write");
        load(&[path]).expect("sample config loads")
    }

    #[test]
    fn sample_is_valid() {
        let c = sample();
        assert!(validate(&c).is_empty());
        assert_eq!(c.broker.prefetch, 1000);
        assert_eq!(c.adaptors["hr"].concurrency, 8);
        assert_eq!(c.retry.initial_backoff, Duration::from_millis(500));
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        let mut c = sample();
        c.broker.uris = vec!["http://x".into()];
        if let Some(a) = c.adaptors.get_mut("hr") {
            a.server = "zz".into();
            a.target = "nope".into();
            a.concurrency = 0;
        }
        c.retry.jitter = 3.0;
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "broker.uris[0]",
                "adaptors.hr.server",
                "adaptors.hr.target",
                "adaptors.hr.concurrency",
                "retry.jitter"
            ]
        );
    }

    #[test]
    fn no_token_mode_only_on_loopback_and_token_hashes_checked() {
        let mut c = sample();
        c.security.admin_auth = AdminAuth::None;
        assert!(validate(&c).is_empty(), "127.0.0.1 is loopback");
        if let Some(s) = c.servers.get_mut("a") {
            s.admin_listen = "10.0.0.5:7101".into();
        }
        c.security.admin_tokens.push(AdminToken {
            name: "ops".into(),
            role: TokenRole::Operate,
            sha256: "not-a-hash".into(),
        });
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            ["security.admin_tokens[0].sha256", "security.admin_auth"]
        );
        assert!(is_loopback("[::1]:7101") && is_loopback("localhost:1"));
        assert!(!is_loopback("0.0.0.0:7101") && !is_loopback("provring-a:7101"));
    }

    #[test]
    fn tls_settings_are_checked() {
        let mut c = sample();
        if let Some(t) = c.targets.get_mut("hook") {
            t.tls = Some(crate::config::ClientTlsConfig {
                ca_file: Some("ca.pem".into()),
                cert_file: Some("c.pem".into()),
                key_file: None,
            });
        }
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        // Half a client identity, and TLS settings on an http:// URL.
        assert_eq!(keys, ["targets.hook.tls.key_file", "targets.hook.tls"]);
        if let Some(t) = c.targets.get_mut("hook") {
            t.url = Some("https://hook.example.org/e".into());
            if let Some(tls) = t.tls.as_mut() {
                tls.key_file = Some("c.key".into());
            }
        }
        assert!(validate(&c).is_empty());
        // With [admin.tls], peers must be able to name the address.
        c.admin.tls = Some(crate::config::AdminTlsConfig {
            cert_file: "s.pem".into(),
            key_file: "s.key".into(),
            ca_file: "ca.pem".into(),
        });
        assert!(validate(&c).is_empty());
        if let Some(s) = c.servers.values_mut().next() {
            s.admin_listen = "0.0.0.0:7101".into();
        }
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].ends_with(".admin_listen"), "{keys:?}");
    }

    #[test]
    fn smtp_credentials_only_over_tls() {
        let mut c = sample();
        c.alerts = Some(AlertsConfig {
            smtp_host: "mail.example.org".into(),
            smtp_port: 587,
            tls: SmtpTls::None,
            ca_file: None,
            username: Some("provring".into()),
            password: Some("s3cret".into()),
            from: "provring@example.org".into(),
            to: vec!["ops@example.org".into()],
            timeout: Duration::from_secs(5),
        });
        let problems = validate(&c);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "alerts.tls");
        assert!(!problems[0].to_string().contains("s3cret"));
        if let Some(a) = c.alerts.as_mut() {
            a.tls = SmtpTls::Starttls;
        }
        assert!(validate(&c).is_empty());
    }

    #[test]
    fn password_changes_never_go_over_plain_http_unless_allowed() {
        let mut c = sample();
        if let Some(a) = c.adaptors.get_mut("hr") {
            a.kind = AdaptorKind::Password;
        }
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["adaptors.hr.target"]);
        if let Some(t) = c.targets.get_mut("hook") {
            t.allow_insecure_http = true;
        }
        assert!(validate(&c).is_empty());
        // Spellings that the URL parser tidies into http:// are caught too.
        for sneaky in [
            "HTTP://127.0.0.1:9000/e",
            "http:/127.0.0.1:9000/e",
            " http://h/e",
        ] {
            if let Some(t) = c.targets.get_mut("hook") {
                t.allow_insecure_http = false;
                t.url = Some(sneaky.into());
            }
            let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
            assert!(
                keys.contains(&"adaptors.hr.target".to_string()),
                "{sneaky}: {keys:?}"
            );
        }
        if let Some(t) = c.targets.get_mut("hook") {
            t.url = Some("https://127.0.0.1:9000/events".into());
        }
        assert!(validate(&c).is_empty());
        // With [broker.tls], no plain URI to fall back to.
        c.broker.uris = vec!["amqps://b1:5671".into(), "amqp://b2:5672".into()];
        c.broker.tls = Some(BrokerTlsConfig {
            ca_file: None,
            cert_file: None,
            key_file: None,
        });
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["broker.uris[1]"]);
    }

    #[test]
    fn schedules_are_checked_down_to_the_event_they_publish() {
        let mut c = sample();
        let schedule = |v: serde_json::Value| -> ScheduleConfig {
            serde_json::from_value(v).expect("schedule")
        };
        c.schedules.insert(
            "ok".into(),
            schedule(serde_json::json!({"every": "1s", "adaptor": "hr",
                "event": {"type": "io.provring.account.update", "data": {"userName": "u-{{slot}}"}}})),
        );
        assert!(validate(&c).is_empty(), "{:?}", validate(&c));
        c.schedules.insert(
            "both".into(),
            schedule(
                serde_json::json!({"every": "1s", "cron": "* * * * *", "adaptor": "hr",
                "event": {"type": "io.provring.account.update", "data": {"userName": "u"}}}),
            ),
        );
        c.schedules.insert(
            "nouser".into(),
            schedule(serde_json::json!({"cron": "0 2 * * *", "adaptor": "hr",
                "event": {"type": "io.provring.account.update", "data": {}}})),
        );
        c.schedules.insert(
            "password".into(),
            schedule(serde_json::json!({"cron": "not cron", "adaptor": "nope",
                "event": {"type": "io.provring.password.change"}})),
        );
        let keys: Vec<String> = validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "schedules.both.cron",
                "schedules.nouser.event",
                "schedules.password.cron",
                "schedules.password.adaptor"
            ]
        );
    }

    #[test]
    fn names() {
        assert!(is_name("hr.events-1_a"));
        assert!(!is_name(""));
        assert!(!is_name("a b"));
        assert!(!is_name("a/b"));
    }
}
