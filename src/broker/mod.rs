//! The broker layer (RabbitMQ over AMQP 0.9.1, lapin 4).
//!
//! - [`Broker`]: one shared connection, re-established on demand by trying
//!   each configured URI in turn. Components run their own reconnect loop
//!   with [`Backoff`]: on any channel or connection error they drop what they
//!   hold, wait, and ask for a fresh channel. Unacked deliveries come back
//!   from the broker (`redelivered = true`), so nothing is lost across a
//!   reconnect; storing is idempotent by event id.
//!
//!   lapin's own `enable_auto_recover()` is deliberately off: it replays
//!   channels and consumers on a new connection, where delivery tags start
//!   again at 1, so a `multiple = true` ack that the writer issues for a
//!   batch received before the failure could acknowledge deliveries after it
//!   that are not yet stored. Rebuilding channel, consumer and writer
//!   together in our loop keeps "ack only what is durable" simple to check.
//!   lapin's connect back-off still applies to each connection attempt.
//! - [`declare`]: names and idempotent declarations (quorum queues by
//!   default, single-active-consumer adaptor queues, the parking queue).
//! - [`Publisher`]: publish with publisher confirm and a timeout.

pub mod consume;
pub mod declare;
pub mod drain;
mod publish;

pub use publish::{PublishError, Publisher};

use crate::config::BrokerConfig;
use lapin::{Channel, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Why the broker could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to any broker URI ({tried}): {last}")]
    Connect { tried: String, last: String },
    #[error("broker operation {op} failed: {source}")]
    Op {
        op: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("broker operation {op} did not finish within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error(
        "queue {queue} already exists with other arguments than provring declares ({detail}); delete it or set broker.queue_type to match"
    )]
    QueueMismatch { queue: String, detail: String },
    #[error("{0}")]
    Closed(String),
}

impl BrokerError {
    pub fn op(op: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
        move |source| BrokerError::Op { op, source }
    }
}

/// Shared broker connection; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: BrokerConfig,
    name: String,
    conn: Mutex<Option<Connection>>,
    /// An exclusive queue declared on every new connection: while it
    /// exists, peers know this server's connection is alive.
    alive_queue: std::sync::OnceLock<String>,
    /// Bumped on every new connection.
    connections: std::sync::atomic::AtomicU64,
}

impl Broker {
    /// `name` identifies the connection in the broker's management UI.
    pub fn new(config: BrokerConfig, name: impl Into<String>) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                config,
                name: name.into(),
                conn: Mutex::new(None),
                alive_queue: std::sync::OnceLock::new(),
                connections: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// A new channel on the current connection, connecting first if there
    /// is none or it has failed. One attempt per URI; the caller backs off.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut guard = self.inner.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.status().connected() {
                match conn.create_channel().await {
                    Ok(ch) => return Ok(ch),
                    Err(e) => tracing::warn!(error = %e, "Cannot open a channel; reconnecting."),
                }
            }
            *guard = None;
        }
        let conn = self.connect().await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(BrokerError::op("channel.open"))?;
        if let Some(queue) = self.inner.alive_queue.get() {
            declare::declare_alive(&ch, queue).await?;
        }
        self.inner
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *guard = Some(conn);
        Ok(ch)
    }

    /// Hold the exclusive queue `queue` on every connection from now on
    /// (see [`Broker::peer_alive`]).
    pub fn mark_alive(&self, queue: String) {
        let _ = self.inner.alive_queue.set(queue);
    }

    /// How many connections were made so far (a new one means the old one,
    /// and everything on it, was lost).
    pub fn connections(&self) -> u64 {
        self.inner
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether another server's connection holds its exclusive `queue`:
    /// the broker's view of that server. `Ok(false)` once the broker has
    /// dropped the connection (a killed process at once; a frozen one
    /// after about two heartbeats).
    pub async fn peer_alive(&self, queue: &str) -> Result<bool, BrokerError> {
        let ch = self.channel().await?;
        let result = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        let alive = match result {
            Ok(_) => Ok(true),
            Err(e) => {
                let text = e.to_string();
                if text.contains("RESOURCE_LOCKED") || text.contains("RESOURCE-LOCKED") {
                    Ok(true)
                } else if text.contains("NOT_FOUND") || text.contains("NOT-FOUND") {
                    Ok(false)
                } else {
                    Err(BrokerError::Op {
                        op: "queue.declare (passive)",
                        source: e,
                    })
                }
            }
        };
        let _ = ch.close(200, "probe".into()).await;
        alive
    }

    async fn connect(&self) -> Result<Connection, BrokerError> {
        let mut last = String::from("no URI configured");
        for uri in &self.inner.config.uris {
            let uri = &with_heartbeat(uri, self.inner.config.heartbeat);
            let props = ConnectionProperties::default()
                .with_connection_name(self.inner.name.clone().into());
            let tls = match tls_config(&self.inner.config) {
                Ok(t) => t,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let runtime = match lapin::runtime::default_runtime() {
                Ok(r) => r,
                Err(e) => {
                    last = format!("no async runtime for the connection: {e}");
                    continue;
                }
            };
            let attempt = tokio::time::timeout(
                self.inner.config.publish_timeout,
                Connection::connect_with_config(uri, props, tls, runtime),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => {
                    tracing::info!(broker = %redact_uri(uri), "Connected to the broker.");
                    return Ok(conn);
                }
                Ok(Err(e)) => last = format!("{}: {e}", redact_uri(uri)),
                Err(_) => {
                    last = format!(
                        "{}: no answer within {:?}",
                        redact_uri(uri),
                        self.inner.config.publish_timeout
                    )
                }
            }
        }
        Err(BrokerError::Connect {
            tried: self
                .inner
                .config
                .uris
                .iter()
                .map(|u| redact_uri(u))
                .collect::<Vec<_>>()
                .join(", "),
            last,
        })
    }

    /// Close the connection (at shutdown).
    pub async fn close(&self) {
        if let Some(conn) = self.inner.conn.lock().await.take() {
            let _ = conn.close(200, "provring shutting down".into()).await;
        }
    }
}

/// `uri` with `heartbeat=<seconds>` added unless it sets one.
fn with_heartbeat(uri: &str, heartbeat: Duration) -> String {
    if uri.contains("heartbeat=") {
        return uri.to_owned();
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}heartbeat={}", heartbeat.as_secs().max(1))
}

/// A URI with its password replaced, fit for logs.
pub fn redact_uri(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable uri>".to_owned(),
    }
}

/// Exponential back-off for reconnect loops, with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The pause before the next attempt (grows until [`Backoff::reset`]).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.25;
        base.mul_f64(1.0 + jitter).min(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// TLS settings for `amqps://` URIs from `[broker.tls]`, read at each
/// connect (so that renewed certificate files are picked up).
fn tls_config(config: &BrokerConfig) -> Result<lapin::tcp::OwnedTLSConfig, String> {
    let Some(t) = &config.tls else {
        return Ok(lapin::tcp::OwnedTLSConfig::default());
    };
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| format!("cannot read broker.tls.{key} {}: {e}", path.display()))
    };
    let cert_chain = match &t.ca_file {
        Some(p) => Some(
            String::from_utf8(read("ca_file", p)?)
                .map_err(|_| format!("broker.tls.ca_file {} is not PEM text", p.display()))?,
        ),
        None => None,
    };
    let identity = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("cert_file", cert)?,
            key: read("key_file", key)?,
        }),
        _ => None,
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(125));
        assert!(d[5] <= Duration::from_secs(1));
        assert!(d[3] >= Duration::from_millis(800));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn uris_are_redacted() {
        assert_eq!(
            redact_uri("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
    }
}
