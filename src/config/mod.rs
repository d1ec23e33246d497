//! Configuration: the structs that a cluster file (TOML) deserialises into.
//!
//! One cluster file describes the whole fleet; a node file and the
//! environment (`PROVRING__SECTION__KEY`) may override it (see [`load`]).
//! Every field's `///` doc is the reference manual for that key.
//! Validation ([`validate`]) is pure and reports every problem at once.

mod load;
mod validate;

pub use load::{ConfigError, load};
pub use validate::{Problem, is_loopback, validate};

/// The kind of events an adaptor accepts.
pub use crate::event::AdaptorKind;
/// `[limits]`: what an event may be ([`crate::event::decode`] checks it).
pub use crate::event::Limits as LimitsConfig;
/// `[schedules.<name>]`.
pub use crate::schedule::{Misfire, ScheduleConfig, ScheduleEvent};

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The whole cluster: broker, servers, adaptors, targets and policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach RabbitMQ and how to name things on it.
    pub broker: BrokerConfig,
    /// The servers of the fleet, by node id.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerConfig>,
    /// The adaptors (one broker queue each), by name.
    #[serde(default)]
    pub adaptors: BTreeMap<String, AdaptorConfig>,
    /// The systems that workflows deliver to, by name.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Retry policy for transient target errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Limits on input.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The ledger of completed events that stops a redelivered event from
    /// being delivered again.
    #[serde(default)]
    pub done_ledger: DoneLedgerConfig,
    /// `[supervisor]`
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// `[alerts]`; without it alerts are only logged.
    #[serde(default)]
    pub alerts: Option<AlertsConfig>,
    /// `[schedules.<name>]`: events the scheduler publishes periodically.
    #[serde(default)]
    pub schedules: BTreeMap<String, ScheduleConfig>,
    /// `[timeout_checker]`: the singleton that parks events stuck past
    /// their deadline.
    #[serde(default)]
    pub timeout_checker: TimeoutCheckerConfig,
    /// `[security]`: the cluster key (required).
    pub security: SecurityConfig,
    /// `[parking]`: the parking queue.
    #[serde(default)]
    pub parking: ParkingConfig,
    /// `[admin]`: limits of the admin API's server.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[security]`: the cluster key that seals every stored and forwarded
/// event body and authenticates the ring's records (see [`crate::crypto`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// File holding the cluster key, as `provring keygen --out FILE` writes
    /// it (64 hex digits, mode 0600). Every server of the cluster needs the
    /// same key; the newest key seals and signs.
    pub key_file: PathBuf,
    /// Older keys, still accepted to open sealed bodies and verify records
    /// while a rotation is under way (see `provring rekey`).
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
    /// `tokens` (default): every admin route but `/health` needs a bearer
    /// token; `none`: nothing is checked, allowed only when every
    /// `admin_listen` is a loopback address (one machine).
    #[serde(default)]
    pub admin_auth: AdminAuth,
    /// Operator tokens of the admin API, by SHA-256
    /// (`provring token` makes one).
    #[serde(default)]
    pub admin_tokens: Vec<AdminToken>,
    /// A file of more operator tokens, one `name role sha256` per line
    /// (`#` starts a comment).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

/// `security.admin_auth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminAuth {
    #[default]
    Tokens,
    None,
}

/// What an operator token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// State, backlog, items, topology.
    Read,
    /// Also `POST /stop`.
    Operate,
}

/// `[[security.admin_tokens]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Who holds it (logged with each operating request).
    pub name: String,
    pub role: TokenRole,
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
}

/// `[admin]`: limits of the admin API's server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A connection that has not sent a request's headers within this long
    /// is closed (slow clients).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest time for one request, body and answer included.
    #[serde(default = "default_admin_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; more are closed at once.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// Largest request body, in bytes (larger: 413).
    #[serde(default = "default_admin_max_body")]
    pub max_body: usize,
    /// `[admin.tls]`: HTTPS on every `admin_listen`, and mutual TLS
    /// between peers. Without it the admin API is plain HTTP (tokens travel
    /// in clear: keep it on loopback addresses or a private network).
    #[serde(default)]
    pub tls: Option<AdminTlsConfig>,
}

/// `[admin.tls]`: the admin API over HTTPS. Each server presents
/// `cert_file` both as the admin API's server certificate and as its
/// client certificate towards peers; peers check both against `ca_file`.
/// A server's own files can be set in its node file
/// (`--node-config`) or with `PROVRING__ADMIN__TLS__CERT_FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsConfig {
    /// This server's certificate chain (PEM). Its names must cover the
    /// host of its `admin_listen` (an IP address or a DNS name), and it
    /// must be usable for both server and client authentication.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The cluster CA (PEM): the only CA trusted for peers' certificates.
    /// The peer routes accept the peer token only from a client that
    /// presented a certificate of this CA.
    pub ca_file: PathBuf,
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_admin_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_admin_max_connections() -> usize {
    128
}
fn default_admin_max_body() -> usize {
    1024 * 1024
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            header_read_timeout: default_header_read_timeout(),
            request_timeout: default_admin_request_timeout(),
            max_connections: default_admin_max_connections(),
            max_body: default_admin_max_body(),
            tls: None,
        }
    }
}

impl SecurityConfig {
    /// Load the key ring from the configured files.
    pub fn key_ring(&self) -> Result<crate::crypto::KeyRing, crate::crypto::KeyError> {
        crate::crypto::KeyRing::load(&self.key_file, &self.previous_key_files)
    }
}

/// `[parking]`: where events that cannot be delivered wait for a person.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkingConfig {
    /// How long a parked message stays on the parking queue before the
    /// broker discards it (per-message expiration).
    #[serde(default = "default_parking_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

fn default_parking_ttl() -> Duration {
    Duration::from_secs(14 * 24 * 3600)
}

impl Default for ParkingConfig {
    fn default() -> Self {
        ParkingConfig {
            ttl: default_parking_ttl(),
        }
    }
}

/// `[timeout_checker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutCheckerConfig {
    /// Time between two checks of the fleet's backlogs.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for TimeoutCheckerConfig {
    fn default() -> Self {
        TimeoutCheckerConfig {
            check_interval: default_check_interval(),
        }
    }
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URIs (`amqp://` or `amqps://`), tried in turn on every (re)connect.
    pub uris: Vec<String>,
    /// Prefix of every exchange and queue name, so that clusters (and tests)
    /// can share a broker. Letters, digits, `.`, `-` and `_`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Deliveries a consumer may hold unacknowledged (`basic.qos`).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Type of the queues declared at start: `quorum` (default) or `classic`.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Longest wait for a publisher confirm before the publish counts as failed.
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// First pause before reconnecting after the connection is lost.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest pause between reconnect attempts (the back-off doubles up to it).
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Most deliveries written to the repository in one group commit.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// AMQP heartbeat: the broker drops a connection silent for about
    /// twice this long (a frozen server loses its broker connection, and
    /// with it its queues, within that time).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// `[broker.tls]`: what `amqps://` URIs trust and present.
    #[serde(default)]
    pub tls: Option<BrokerTlsConfig>,
}

/// `[broker.tls]`: TLS towards the broker (for `amqps://` URIs; without
/// it the system's trust store is used and no client certificate is sent).
pub type BrokerTlsConfig = ClientTlsConfig;

/// A client's TLS settings (`[broker.tls]`, `[targets.<name>.tls]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// CA certificates (PEM) the server's certificate must chain to. For
    /// the broker these are trusted besides the system's trust store; for
    /// a target, instead of it.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that ask for one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM, PKCS#8).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}

fn default_namespace() -> String {
    "provring".to_owned()
}
fn default_prefetch() -> u16 {
    1000
}
fn default_publish_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(100)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(5)
}
fn default_batch_max() -> usize {
    500
}

/// Type of the broker queues that provring declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queue: a confirmed message is on a majority of nodes.
    #[default]
    Quorum,
    /// Classic (single-node) queue.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `[servers.<id>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the admin HTTP API (`host:port`).
    pub admin_listen: String,
    /// Directory of the server's sled repository.
    pub data_dir: PathBuf,
    /// What this server may host: adaptors and the singleton services.
    /// A server eligible for nothing still monitors its peer.
    #[serde(default = "default_services")]
    pub services: Vec<Service>,
}

fn default_services() -> Vec<Service> {
    vec![
        Service::Adaptors,
        Service::Scheduler,
        Service::TimeoutChecker,
    ]
}

/// What a server may host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// Adaptors (and their backlog).
    Adaptors,
    /// Runs scheduled jobs (a singleton).
    Scheduler,
    /// Parks items whose deadline passed (a singleton).
    TimeoutChecker,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Adaptors => "adaptors",
            Service::Scheduler => "scheduler",
            Service::TimeoutChecker => "timeout_checker",
        }
    }
}

/// `[adaptors.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptorConfig {
    /// Which events the adaptor accepts: `provisioning` (account events) or
    /// `password` (password-change events).
    pub kind: AdaptorKind,
    /// Queue name, without the namespace prefix.
    pub queue: String,
    /// Node id of the server that hosts the adaptor.
    pub server: String,
    /// Name of the target (a key of `[targets]`) that its workflow delivers to.
    pub target: String,
    /// Target calls in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Time from receipt after which the timeout checker parks an event of
    /// this adaptor that is still unfinished, with reason `timed out` (an
    /// event's own `deadline` extension takes precedence). Default:
    /// `[retry] deadline`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

fn default_concurrency() -> usize {
    8
}

/// `[targets.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `webhook` (POST of the event JSON), `scim` (SCIM 2.0 `/Users`) or
    /// `null` (accepts everything; for benchmarks).
    pub kind: TargetKind,
    /// Endpoint: the webhook URL, or the SCIM base URL (the part before `/Users`).
    #[serde(default)]
    pub url: Option<String>,
    /// Longest wait for one request, connect included.
    #[serde(default = "default_target_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Credentials sent with every request.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Let a password adaptor deliver to this target over `http://`
    /// (password values in clear on the wire); for a target on this
    /// machine only.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// `[targets.<name>.tls]`: a private CA (`ca_file`, trusted instead of
    /// the platform's store) and a client certificate (`cert_file`,
    /// `key_file`) for `https://` URLs.
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
}

fn default_target_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The kinds of target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// HTTP POST of the event with an `Idempotency-Key` header.
    Webhook,
    /// SCIM 2.0 service (RFC 7644).
    Scim,
    /// Accepts every event at once (benchmarks).
    Null,
}

/// `[targets.<name>.auth]`: one of a bearer token (inline or in a file) or
/// basic credentials. Never logged.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer token sent as `Authorization: Bearer …`.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// File whose content (trimmed) is the bearer token.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// User for HTTP basic authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for HTTP basic authentication.
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |set: bool| if set { "<redacted>" } else { "<unset>" };
        f.debug_struct("AuthConfig")
            .field("bearer_token", &redact(self.bearer_token.is_some()))
            .field("bearer_token_file", &self.bearer_token_file)
            .field("username", &self.username)
            .field("password", &redact(self.password.is_some()))
            .finish()
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Target calls per event before it is parked (first call included).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Pause after the first transient failure.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest pause between two attempts.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Factor applied to the pause after each failure.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Fraction of each pause drawn at random (0 to 1) so that retries spread out.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Time from receipt after which an event that is still not delivered is parked.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
}

fn default_attempts() -> u32 {
    10
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.2
}
fn default_deadline() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
            deadline: default_deadline(),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time in-flight work gets to finish after SIGTERM/SIGINT.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: default_grace(),
        }
    }
}

/// `[done_ledger]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoneLedgerConfig {
    /// How long a completed event's identity is remembered.
    #[serde(default = "default_done_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Most identities remembered; the oldest go first.
    #[serde(default = "default_done_max")]
    pub max_entries: usize,
}

fn default_done_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_done_max() -> usize {
    1_000_000
}

impl Default for DoneLedgerConfig {
    fn default() -> Self {
        DoneLedgerConfig {
            ttl: default_done_ttl(),
            max_entries: default_done_max(),
        }
    }
}

/// `[supervisor]`: how a server watches the one it monitors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Time between two probes of the monitored server's `GET /state`.
    #[serde(default = "default_monitoring_interval", with = "humantime_serde")]
    pub monitoring_interval: Duration,
    /// Longest wait for one probe's answer.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Failed probes in a row before the peer is suspected.
    #[serde(default = "default_retry_count")]
    pub retry_count: u32,
    /// A peer reporting a state below this (0–10) is suspected too.
    #[serde(default = "default_state_threshold")]
    pub state_threshold: u8,
    /// A server that cannot read the topology log for this long pauses its
    /// deliveries. Must be shorter than `monitoring_interval × retry_count`.
    #[serde(default = "default_fence_after", with = "humantime_serde")]
    pub fence_after: Duration,
}

fn default_monitoring_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_request_timeout() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_count() -> u32 {
    4
}
fn default_state_threshold() -> u8 {
    4
}
fn default_fence_after() -> Duration {
    Duration::from_millis(750)
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            monitoring_interval: default_monitoring_interval(),
            request_timeout: default_request_timeout(),
            retry_count: default_retry_count(),
            state_threshold: default_state_threshold(),
            fence_after: default_fence_after(),
        }
    }
}

impl SupervisorConfig {
    /// Time from a peer's last good answer to its being suspected.
    pub fn detection_time(&self) -> Duration {
        self.monitoring_interval * self.retry_count
    }
}

/// `[alerts]`: e-mail over SMTP.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    pub smtp_host: String,
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    /// `none` (plain, for a local relay), `starttls` or `tls`.
    #[serde(default)]
    pub tls: SmtpTls,
    /// CA certificates (PEM) that the mail server's certificate must chain
    /// to, instead of the system's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SMTP login; refused unless `tls` is `starttls` or `tls`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    /// Longest time for sending one mail.
    #[serde(default = "default_smtp_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("from", &self.from)
            .field("to", &self.to)
            .finish()
    }
}

fn default_smtp_port() -> u16 {
    25
}
fn default_smtp_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    #[default]
    None,
    Starttls,
    Tls,
}

impl Config {
    /// The node ids, comma-separated (for messages).
    pub fn server_names(&self) -> String {
        self.servers.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The adaptor names, comma-separated (for messages).
    pub fn adaptor_names(&self) -> String {
        self.adaptors.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Time from receipt after which the timeout checker parks an
    /// unfinished event of `adaptor` (see [`AdaptorConfig::timeout`]).
    pub fn adaptor_timeout(&self, adaptor: &str) -> Duration {
        self.adaptors
            .get(adaptor)
            .and_then(|a| a.timeout)
            .unwrap_or(self.retry.deadline)
    }

    /// Full broker name of an adaptor's queue.
    pub fn queue_name(&self, adaptor: &AdaptorConfig) -> String {
        format!("{}.{}", self.broker.namespace, adaptor.queue)
    }
}

impl Config {
    /// Parse and validate a configuration given as TOML text (tools, tests).
    pub fn builder_from_toml(toml: &str) -> Result<Config, ConfigError> {
        load::from_toml(toml)
    }
}
