//! Validation: pure checks over a deserialised [`Config`], returning every
//! problem with the key it concerns.

use super::{Config, Service, TargetKind};
use std::collections::BTreeMap;
use std::net::SocketAddr;

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

/// Every problem of `config`, in key order of appearance; empty if it is usable.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut add = |key: String, msg: String| p.push(Problem::new(key, msg));

    let b = &config.broker;
    if b.uris.is_empty() {
        add(
            "broker.uris".into(),
            "at least one AMQP URI is needed".into(),
        );
    }
    for (i, uri) in b.uris.iter().enumerate() {
        if let Err(reason) = check_amqp_uri(uri) {
            add(format!("broker.uris[{i}]"), reason);
        }
    }
    if !is_name(&b.namespace) {
        add(
            "broker.namespace".into(),
            format!(
                "{:?} must be 1-100 letters, digits, '.', '-' or '_'",
                b.namespace
            ),
        );
    }
    let sup = &config.supervisor;
    if sup.retry_count == 0 {
        add("supervisor.retry_count".into(), "must be at least 1".into());
    }
    if sup.monitoring_interval.is_zero() {
        add(
            "supervisor.monitoring_interval".into(),
            "must be above 0".into(),
        );
    }
    if sup.state_threshold > 10 {
        add(
            "supervisor.state_threshold".into(),
            format!("{} must be between 0 and 10", sup.state_threshold),
        );
    }
    if sup.detection_time() <= sup.fence_after {
        add(
            "supervisor.fence_after".into(),
            format!(
                "{} must be shorter than the detection time monitoring_interval × retry_count = {}, \
                 or a server could be taken over before it stops delivering",
                humantime::format_duration(sup.fence_after),
                humantime::format_duration(sup.detection_time())
            ),
        );
    }
    if let Some(t) = &b.tls {
        if t.cert_file.is_some() != t.key_file.is_some() {
            add(
                "broker.tls.key_file".into(),
                "give both cert_file and key_file, or neither".into(),
            );
        }
        // With TLS wanted, a plain URI would be a silent way around it
        // (the connect loop moves on to the next URI).
        for (i, u) in b.uris.iter().enumerate() {
            if !u.starts_with("amqps://") {
                add(
                    format!("broker.uris[{i}]"),
                    "must be amqps:// when [broker.tls] is set (a plain URI would be tried when TLS fails)"
                        .into(),
                );
            }
        }
    }
    if let Some(a) = &config.alerts {
        if a.to.is_empty() {
            add(
                "alerts.to".into(),
                "at least one recipient is needed".into(),
            );
        }
        for (i, addr) in a.to.iter().chain(std::iter::once(&a.from)).enumerate() {
            if !addr.contains('@') {
                let key = if i < a.to.len() {
                    format!("alerts.to[{i}]")
                } else {
                    "alerts.from".into()
                };
                add(key, format!("{addr:?} is not an e-mail address"));
            }
        }
        if a.username.is_some() != a.password.is_some() {
            add(
                "alerts.password".into(),
                "give both username and password, or neither".into(),
            );
        }
        if a.password.is_some() && a.tls == crate::config::SmtpTls::None {
            add(
                "alerts.tls".into(),
                "\"none\" would send the SMTP password in clear; use \"starttls\" or \"tls\" \
                 (and alerts.ca_file for a private CA)"
                    .into(),
            );
        }
        if a.ca_file.is_some() && a.tls == crate::config::SmtpTls::None {
            add(
                "alerts.ca_file".into(),
                "is used only with tls = \"starttls\" or \"tls\"".into(),
            );
        }
    }
    if b.heartbeat.as_secs() == 0 || b.heartbeat.as_secs() > 600 {
        add(
            "broker.heartbeat".into(),
            "must be between 1s and 10m (whole seconds)".into(),
        );
    }
    if b.prefetch == 0 {
        add("broker.prefetch".into(), "must be at least 1".into());
    }
    if b.batch_max == 0 {
        add("broker.batch_max".into(), "must be at least 1".into());
    }
    if b.publish_timeout.is_zero() {
        add(
            "broker.publish_timeout".into(),
            "must be longer than 0".into(),
        );
    }
    if b.reconnect_min.is_zero() || b.reconnect_min > b.reconnect_max {
        add(
            "broker.reconnect_min".into(),
            format!(
                "{} must be above 0 and at most broker.reconnect_max ({})",
                humantime::format_duration(b.reconnect_min),
                humantime::format_duration(b.reconnect_max)
            ),
        );
    }

    if config.servers.is_empty() {
        add(
            "servers".into(),
            "at least one [servers.<id>] is needed".into(),
        );
    }
    let mut listens: BTreeMap<&str, &str> = BTreeMap::new();
    let mut dirs: BTreeMap<&std::path::Path, &str> = BTreeMap::new();
    for (id, s) in &config.servers {
        if !is_name(id) {
            add(
                format!("servers.{id}"),
                "a node id must be letters, digits, '.', '-' or '_'".into(),
            );
        }
        match admin_address(&s.admin_listen) {
            Ok(port) => {
                // Port 0 (any free port) may repeat.
                if port != 0
                    && let Some(other) = listens.insert(s.admin_listen.as_str(), id)
                {
                    add(
                        format!("servers.{id}.admin_listen"),
                        format!(
                            "{} is also the admin address of server {other}",
                            s.admin_listen
                        ),
                    );
                }
            }
            Err(reason) => add(
                format!("servers.{id}.admin_listen"),
                format!("{:?} is not host:port ({reason})", s.admin_listen),
            ),
        }
        if s.data_dir.as_os_str().is_empty() {
            add(format!("servers.{id}.data_dir"), "must not be empty".into());
        } else if let Some(other) = dirs.insert(&s.data_dir, id) {
            add(
                format!("servers.{id}.data_dir"),
                format!(
                    "{} is also the data directory of server {other}; each server needs its own",
                    s.data_dir.display()
                ),
            );
        }
    }

    let mut queues: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, a) in &config.adaptors {
        let key = |field: &str| format!("adaptors.{name}.{field}");
        if !is_name(name) {
            add(
                format!("adaptors.{name}"),
                "an adaptor name must be letters, digits, '.', '-' or '_'".into(),
            );
        }
        if !is_name(&a.queue) {
            add(
                key("queue"),
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
            add(
                key("queue"),
                format!("{:?} is reserved by provring", a.queue),
            );
        } else if let Some(other) = queues.insert(&a.queue, name) {
            add(
                key("queue"),
                format!("queue {:?} is also used by adaptor {other}", a.queue),
            );
        }
        match config.servers.get(&a.server) {
            None => add(
                key("server"),
                format!(
                    "{:?} is not a server; known: {}",
                    a.server,
                    known(config.servers.keys())
                ),
            ),
            Some(server) if !server.services.contains(&Service::Adaptors) => add(
                key("server"),
                format!(
                    "server {} may not host adaptors (servers.{}.services has no \"adaptors\")",
                    a.server, a.server
                ),
            ),
            Some(_) => {}
        }
        if !config.targets.contains_key(&a.target) {
            add(
                key("target"),
                format!(
                    "{:?} is not a target; known: {}",
                    a.target,
                    known(config.targets.keys())
                ),
            );
        }
        if let Some(t) = config.targets.get(&a.target)
            && a.kind == crate::config::AdaptorKind::Password
            && !t.allow_insecure_http
            && t.url.as_deref().is_some_and(|u| {
                // As the target parses it (url tidies " http:/h" into http).
                url::Url::parse(u).map_or(true, |parsed| parsed.scheme() != "https")
            })
        {
            add(
                key("target"),
                format!(
                    "password adaptor {name} would send password values in clear: targets.{t}.url \
                     is not https://; use https://, or set targets.{t}.allow_insecure_http = true for a \
                     target on this machine",
                    t = a.target
                ),
            );
        }
        if a.timeout.is_some_and(|t| t.is_zero()) {
            add(key("timeout"), "must be longer than 0".into());
        }
        if a.concurrency == 0 || a.concurrency > 1024 {
            add(
                key("concurrency"),
                format!("{} must be between 1 and 1024", a.concurrency),
            );
        }
    }

    for (name, t) in &config.targets {
        let key = |field: &str| format!("targets.{name}.{field}");
        match (t.kind, &t.url) {
            (TargetKind::Null, _) => {}
            (_, None) => add(key("url"), "is required for this kind of target".into()),
            (_, Some(url)) => match url::Url::parse(url) {
                Ok(u) if !u.username().is_empty() || u.password().is_some() => add(
                    key("url"),
                    format!("holds credentials, which are not sent; use targets.{name}.auth"),
                ),
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => add(
                    key("url"),
                    format!("scheme {:?} is not http or https", u.scheme()),
                ),
                Err(e) => add(key("url"), format!("{url:?} is not a URL ({e})")),
            },
        }
        if t.timeout.is_zero() {
            add(key("timeout"), "must be longer than 0".into());
        }
        if let Some(tls) = &t.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                add(
                    key("tls.key_file"),
                    "give both cert_file and key_file, or neither".into(),
                );
            }
            if t.url
                .as_deref()
                .is_none_or(|u| url::Url::parse(u).map_or(true, |u| u.scheme() != "https"))
            {
                add(
                    key("tls"),
                    format!("is used only with an https:// URL; targets.{name}.url is not one"),
                );
            }
        }
        if let Some(auth) = &t.auth {
            let bearer = auth.bearer_token.is_some() as u8 + auth.bearer_token_file.is_some() as u8;
            let basic = auth.username.is_some() || auth.password.is_some();
            if bearer > 1 || (bearer == 1 && basic) {
                add(
                    key("auth"),
                    "set only one of bearer_token, bearer_token_file, or username+password".into(),
                );
            } else if basic && (auth.username.is_none() || auth.password.is_none()) {
                add(
                    key("auth"),
                    "basic authentication needs both username and password".into(),
                );
            } else if bearer == 0 && !basic {
                add(
                    key("auth"),
                    "is empty; set bearer_token, bearer_token_file or username+password".into(),
                );
            }
            if let Some(path) = &auth.bearer_token_file
                && std::fs::metadata(path).is_err()
            {
                add(
                    key("auth.bearer_token_file"),
                    format!("{} cannot be read", path.display()),
                );
            }
        }
    }

    let r = &config.retry;
    if r.attempts == 0 {
        add("retry.attempts".into(), "must be at least 1".into());
    }
    if r.initial_backoff.is_zero() || r.initial_backoff > r.max_backoff {
        add(
            "retry.initial_backoff".into(),
            "must be above 0 and at most retry.max_backoff".into(),
        );
    }
    if !(r.multiplier >= 1.0 && r.multiplier <= 100.0) {
        add(
            "retry.multiplier".into(),
            format!("{} must be between 1 and 100", r.multiplier),
        );
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        add(
            "retry.jitter".into(),
            format!("{} must be between 0 and 1", r.jitter),
        );
    }
    if r.max_backoff > std::time::Duration::from_secs(30 * 24 * 3600) {
        add(
            "retry.max_backoff".into(),
            format!(
                "{} is longer than the 30 days allowed",
                humantime::format_duration(r.max_backoff)
            ),
        );
    }
    if r.deadline.is_zero() {
        add("retry.deadline".into(), "must be longer than 0".into());
    }
    let max = config.limits.max_message_size;
    if !(1024..=64 * 1024 * 1024).contains(&max) {
        add(
            "limits.max_message_size".into(),
            format!("{max} must be between 1024 (1 KiB) and 67108864 (64 MiB)"),
        );
    }
    let sec = &config.security;
    let mut names = std::collections::BTreeSet::new();
    for (i, t) in sec.admin_tokens.iter().enumerate() {
        let h = &t.sha256;
        if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            add(
                format!("security.admin_tokens[{i}].sha256"),
                "must be the SHA-256 of the token as 64 hex digits (provring token prints it)"
                    .into(),
            );
        }
        if !names.insert(t.name.as_str()) {
            add(
                format!("security.admin_tokens[{i}].name"),
                format!("{:?} is used twice", t.name),
            );
        }
    }
    if sec.admin_auth == crate::config::AdminAuth::None {
        for (id, s) in &config.servers {
            if !is_loopback(&s.admin_listen) {
                add(
                    "security.admin_auth".into(),
                    format!(
                        "\"none\" is allowed only when every admin address is a loopback address; \
                         servers.{id}.admin_listen is {:?}",
                        s.admin_listen
                    ),
                );
            }
        }
    }
    let a = &config.admin;
    if a.tls.is_some() {
        for (id, s) in &config.servers {
            if s.admin_listen.starts_with("0.0.0.0:") || s.admin_listen.starts_with("[::]:") {
                add(
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
        add(
            "admin".into(),
            "header_read_timeout and request_timeout must be longer than 0".into(),
        );
    }
    if a.max_connections == 0 || a.max_body < 1024 {
        add(
            "admin".into(),
            "max_connections must be at least 1 and max_body at least 1024".into(),
        );
    }
    if !(2..=10_000).contains(&config.limits.max_depth) {
        add(
            "limits.max_depth".into(),
            format!("{} must be between 2 and 10000", config.limits.max_depth),
        );
    }
    if config.parking.ttl < std::time::Duration::from_secs(60)
        || config.parking.ttl > std::time::Duration::from_secs(365 * 24 * 3600)
    {
        add(
            "parking.ttl".into(),
            format!(
                "{} must be between 1 minute and 365 days",
                humantime::format_duration(config.parking.ttl)
            ),
        );
    }
    if config.done_ledger.max_entries == 0 {
        add(
            "done_ledger.max_entries".into(),
            "must be at least 1".into(),
        );
    }
    if config.timeout_checker.check_interval < std::time::Duration::from_millis(100) {
        add(
            "timeout_checker.check_interval".into(),
            "must be at least 100ms".into(),
        );
    }
    check_schedules(config, &mut add);
    p
}

/// `[schedules.<name>]`: the cadence parses, the adaptor exists, and the
/// event it renders is one the adaptor accepts.
fn check_schedules(config: &Config, add: &mut impl FnMut(String, String)) {
    for (name, s) in &config.schedules {
        let key = |k: &str| format!("schedules.{name}.{k}");
        if !is_name(name) || name.contains('@') {
            add(
                format!("schedules.{name}"),
                "a schedule name must be letters, digits, '.', '-' or '_'".into(),
            );
        }
        if let Err(e) = crate::schedule::Cadence::of(s) {
            add(key(if s.cron.is_some() { "cron" } else { "every" }), e);
        }
        let Some(adaptor) = config.adaptors.get(&s.adaptor) else {
            add(
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
            &crate::config::LimitsConfig {
                max_message_size: usize::MAX,
                ..config.limits.clone()
            },
        ) {
            add(
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
