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

pub mod declare;
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
}

impl Broker {
    /// `name` identifies the connection in the broker's management UI.
    pub fn new(config: BrokerConfig, name: impl Into<String>) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                config,
                name: name.into(),
                conn: Mutex::new(None),
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
        *guard = Some(conn);
        Ok(ch)
    }

    async fn connect(&self) -> Result<Connection, BrokerError> {
        let mut last = String::from("no URI configured");
        for uri in &self.inner.config.uris {
            let props = ConnectionProperties::default()
                .with_connection_name(self.inner.name.clone().into());
            let attempt = tokio::time::timeout(
                self.inner.config.publish_timeout,
                Connection::connect(uri, props),
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
