//! Loading: cluster file, then node files, then the environment
//! (`PROVRING__BROKER__PREFETCH=200`), merged by the `config` crate.
//!
//! Each section (and each entry of `servers`, `adaptors`, `targets`) is
//! deserialised on its own so that one bad key does not hide the others:
//! the caller gets every problem at once.

use super::{
    AdaptorConfig, AdaptorKind, BrokerConfig, Config, Problem, QueueType, ServerConfig,
    TargetConfig, TargetKind, validate,
};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file named on the command line does not exist or cannot be read.
    #[error("cannot read configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The files parsed but their content has problems.
    #[error("{}", render_problems(files, problems))]
    Invalid {
        files: Vec<PathBuf>,
        problems: Vec<Problem>,
    },
}

fn render_problems(files: &[PathBuf], problems: &[Problem]) -> String {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut out = format!(
        "configuration {} has {} problem{}:",
        names.join(" + "),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  - {p}"));
    }
    out
}

/// Load and validate the configuration from `files` (later files override
/// earlier ones) and the `PROVRING__…` environment.
pub fn load(files: &[PathBuf]) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    for path in files {
        check_readable(path)?;
        builder = builder.add_source(
            config::File::from(path.as_path())
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(
        config::Environment::with_prefix("PROVRING")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("broker.uris"),
    );
    finish(builder, files.to_vec())
}

/// Merge the sources, then deserialise and validate section by section.
fn finish(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    files: Vec<PathBuf>,
) -> Result<Config, ConfigError> {
    let parsed = builder
        .build()
        .and_then(|merged| merged.try_deserialize::<BTreeMap<String, config::Value>>());
    let problems = match parsed {
        Ok(sections) => match from_sections(sections) {
            Ok(config) => return Ok(config),
            Err(problems) => problems,
        },
        Err(e) => vec![Problem::new("(file)", e.to_string())],
    };
    Err(ConfigError::Invalid { files, problems })
}

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
        .and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(ConfigError::File {
                    path: path.to_owned(),
                    reason: "not a regular file".to_owned(),
                })
            }
        })
}

const SECTIONS: &[&str] = &[
    "broker",
    "servers",
    "adaptors",
    "targets",
    "retry",
    "limits",
    "shutdown",
    "done_ledger",
    "supervisor",
    "alerts",
    "schedules",
    "timeout_checker",
    "security",
    "parking",
    "admin",
];

/// Deserialise section by section, collecting every problem. A section or
/// entry that does not deserialise is replaced by a placeholder so that the
/// rest can still be validated; problems under a failed key are then
/// dropped (the deserialisation problem stands for them).
fn from_sections(mut sections: BTreeMap<String, config::Value>) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for key in sections.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            problems.push(Problem::new(
                key,
                format!("unknown section; expected one of {}", SECTIONS.join(", ")),
            ));
        }
    }
    let mut take = |name: &str| sections.remove(name);
    let mut ctx = Ctx {
        problems: &mut problems,
        failed: &mut failed,
    };
    let broker = match take("broker") {
        Some(v) => ctx.section("broker", v),
        None => {
            ctx.fail("broker", "missing section [broker]".into());
            None
        }
    };
    let security = match take("security") {
        Some(v) => ctx.section("security", v),
        None => {
            ctx.fail(
                "security",
                "missing section [security]: every server needs the cluster key; create one with \
                 `provring keygen --out FILE` and set security.key_file = \"FILE\""
                    .into(),
            );
            None
        }
    };
    let config = Config {
        broker: broker.unwrap_or_else(placeholder_broker),
        servers: ctx.entries("servers", take("servers"), placeholder_server),
        adaptors: ctx.entries("adaptors", take("adaptors"), placeholder_adaptor),
        targets: ctx.entries("targets", take("targets"), placeholder_target),
        retry: ctx.optional("retry", take("retry")),
        limits: ctx.optional("limits", take("limits")),
        shutdown: ctx.optional("shutdown", take("shutdown")),
        done_ledger: ctx.optional("done_ledger", take("done_ledger")),
        supervisor: ctx.optional("supervisor", take("supervisor")),
        alerts: take("alerts").and_then(|v| ctx.section("alerts", v)),
        schedules: ctx.entries("schedules", take("schedules"), placeholder_schedule),
        timeout_checker: ctx.optional("timeout_checker", take("timeout_checker")),
        security: security.unwrap_or_else(|| crate::config::SecurityConfig {
            key_file: PathBuf::new(),
            previous_key_files: Vec::new(),
            admin_auth: crate::config::AdminAuth::Tokens,
            admin_tokens: Vec::new(),
            admin_token_file: None,
        }),
        parking: ctx.optional("parking", take("parking")),
        admin: ctx.optional("admin", take("admin")),
    };
    let under_failed = |key: &str| {
        failed.iter().any(|f| {
            key == f || key.starts_with(&format!("{f}.")) || key.starts_with(&format!("{f}["))
        })
    };
    problems.extend(
        validate(&config)
            .into_iter()
            .filter(|p| !under_failed(&p.key)),
    );
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

struct Ctx<'a> {
    problems: &'a mut Vec<Problem>,
    failed: &'a mut Vec<String>,
}

impl Ctx<'_> {
    fn fail(&mut self, key: &str, message: String) {
        self.problems.push(Problem::new(key, message));
        self.failed.push(key.to_owned());
    }

    fn section<T: DeserializeOwned>(&mut self, key: &str, value: config::Value) -> Option<T> {
        match value.try_deserialize::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(key, clean_error(e));
                None
            }
        }
    }

    fn optional<T: DeserializeOwned + Default>(
        &mut self,
        key: &str,
        value: Option<config::Value>,
    ) -> T {
        value.and_then(|v| self.section(key, v)).unwrap_or_default()
    }

    fn entries<T: DeserializeOwned>(
        &mut self,
        key: &str,
        value: Option<config::Value>,
        placeholder: fn() -> T,
    ) -> BTreeMap<String, T> {
        let mut out = BTreeMap::new();
        let Some(value) = value else { return out };
        let map = match value.into_table() {
            Ok(map) => map,
            Err(e) => {
                self.fail(key, clean_error(e));
                return out;
            }
        };
        for (name, v) in map {
            let entry_key = format!("{key}.{name}");
            let entry = self.section(&entry_key, v).unwrap_or_else(placeholder);
            out.insert(name, entry);
        }
        out
    }
}

fn placeholder_broker() -> BrokerConfig {
    BrokerConfig {
        uris: Vec::new(),
        namespace: "provring".into(),
        prefetch: 1,
        queue_type: QueueType::Quorum,
        publish_timeout: std::time::Duration::from_secs(1),
        reconnect_min: std::time::Duration::from_secs(1),
        reconnect_max: std::time::Duration::from_secs(1),
        batch_max: 1,
        heartbeat: std::time::Duration::from_secs(2),
        tls: None,
    }
}

fn placeholder_server() -> ServerConfig {
    ServerConfig {
        admin_listen: String::new(),
        data_dir: PathBuf::new(),
        services: Vec::new(),
    }
}

fn placeholder_adaptor() -> AdaptorConfig {
    AdaptorConfig {
        kind: AdaptorKind::Provisioning,
        queue: String::new(),
        server: String::new(),
        target: String::new(),
        concurrency: 1,
        timeout: None,
    }
}

fn placeholder_schedule() -> crate::config::ScheduleConfig {
    crate::config::ScheduleConfig {
        cron: None,
        every: Some(std::time::Duration::from_secs(60)),
        adaptor: String::new(),
        event: crate::config::ScheduleEvent {
            event_type: String::new(),
            source: String::new(),
            data: serde_json::Value::Null,
        },
        misfire: crate::config::Misfire::FireOnce,
        concurrent: true,
    }
}

fn placeholder_target() -> TargetConfig {
    TargetConfig {
        kind: TargetKind::Null,
        url: None,
        timeout: std::time::Duration::from_secs(1),
        auth: None,
        allow_insecure_http: false,
        tls: None,
    }
}

/// The `config` crate's messages sometimes end with the origin; keep them
/// as they are but without a trailing period so that lists read evenly.
fn clean_error(e: config::ConfigError) -> String {
    e.to_string().trim_end_matches('.').to_owned()
}

/// Parse and validate TOML text (no files, no environment).
pub(super) fn from_toml(toml: &str) -> Result<Config, ConfigError> {
    let builder = config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml));
    finish(builder, vec![PathBuf::from("(inline)")])
}
