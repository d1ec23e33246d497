//! `provring publish`: put events on an adaptor's queue, with publisher
//! confirms, many in flight at once, and a count and rate at the end.

use crate::broker::declare::{declare_adaptor_queue, events_exchange};
use crate::broker::{Broker, BrokerError};
use crate::config::{AdaptorKind, BrokerConfig, Config};
use crate::event::{EventType, synthetic};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often one message is published before a nack is final.
const ATTEMPTS: u32 = 5;

/// Publishes awaiting confirms at once (the broker's throughput depends on
/// not waiting one message at a time).
pub const IN_FLIGHT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PublishCmdError {
    #[error("adaptor {name:?} is not in the configuration; known: {known}")]
    UnknownAdaptor { name: String, known: String },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker refused (nack) {0} messages {ATTEMPTS} times each")]
    Nacked(u64),
}

/// Where events come from.
pub enum Source {
    /// One JSON event, a JSON array of events, or one event per line
    /// (empty lines skipped; a line that is not valid JSON is published as
    /// it is, and the server parks it with the reason).
    File(PathBuf),
    /// N synthetic events cycling through the adaptor's event types.
    Generate(u64),
}

/// The end-of-run summary.
pub struct Summary {
    pub published: u64,
    pub queue: String,
    pub elapsed: Duration,
    /// Messages the broker refused (nack) at first and took on a retry.
    pub republished: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "published {} event{} to {} in {:.2} s ({:.0} msg/s), all confirmed",
            self.published,
            if self.published == 1 { "" } else { "s" },
            self.queue,
            secs,
            self.published as f64 / secs
        )?;
        if self.republished > 0 {
            write!(f, " ({} re-published after a nack)", self.republished)?;
        }
        Ok(())
    }
}

/// Event types an adaptor of `kind` accepts.
pub fn types_for(kind: AdaptorKind) -> Vec<EventType> {
    EventType::ALL
        .into_iter()
        .filter(|t| t.adaptor_kind() == kind)
        .collect()
}

/// `n` synthetic bodies for an adaptor of `kind`; ids are unique per `run`.
pub fn generated(kind: AdaptorKind, run: String, n: u64) -> impl Iterator<Item = Vec<u8>> {
    let types = types_for(kind);
    (0..n).map(move |i| synthetic(types[(i as usize) % types.len()], &run, i).into_bytes())
}

/// The message bodies in a file: a single JSON value is one event, a JSON
/// array is one event per element, anything else is one event per line.
pub fn split_events(content: &[u8]) -> Vec<Vec<u8>> {
    match serde_json::from_slice::<serde_json::Value>(content) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| serde_json::to_vec(v).unwrap_or_default())
            .collect(),
        Ok(_) => vec![content.trim_ascii().to_vec()],
        Err(_) => content
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line).to_vec())
            .collect(),
    }
}

/// `provring publish`.
pub async fn run(
    config: &Config,
    adaptor: &str,
    source: Source,
) -> Result<Summary, PublishCmdError> {
    let a = config
        .adaptors
        .get(adaptor)
        .ok_or_else(|| PublishCmdError::UnknownAdaptor {
            name: adaptor.to_owned(),
            known: config.adaptor_names(),
        })?;
    match source {
        Source::Generate(n) => {
            let run = format!("{:08x}", rand::random::<u32>());
            publish_bodies(&config.broker, &a.queue, generated(a.kind, run, n), true).await
        }
        Source::File(path) => {
            let content = std::fs::read(&path).map_err(|e| PublishCmdError::Read {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            publish_bodies(
                &config.broker,
                &a.queue,
                split_events(&content).into_iter(),
                true,
            )
            .await
        }
    }
}

/// Publish `bodies` to the adaptor queue `queue` (without namespace) through
/// the events exchange, persistent, with confirms; returns once every one
/// is confirmed. Progress goes to stderr every 5 s when `progress`.
pub async fn publish_bodies(
    broker_config: &BrokerConfig,
    queue: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
    progress: bool,
) -> Result<Summary, PublishCmdError> {
    let broker = Broker::new(broker_config.clone(), "provring publish");
    let channel = broker.channel().await?;
    let full = declare_adaptor_queue(
        &channel,
        &broker_config.namespace,
        broker_config.queue_type,
        queue,
    )
    .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(BrokerError::op("confirm.select"))?;
    let exchange = events_exchange(&broker_config.namespace);
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/cloudevents+json".into());
    let timeout = broker_config.publish_timeout;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut pending = FuturesUnordered::new();
    // Bodies the broker refused, with the attempts made: a nack means the
    // message was not taken, so it goes out again, after the rest (so a
    // stream of nacks cannot hold up the others; a re-sent event may thus
    // come after later events of the same account).
    let mut refused: VecDeque<(Vec<u8>, u32)> = VecDeque::new();
    let mut counts = Counts::default();
    let mut bodies = bodies.map(|b| (b, 1u32)).fuse();
    let mut retrying = false;
    loop {
        let next = match bodies.next() {
            Some(fresh) => Some(fresh),
            None => refused.pop_front(),
        };
        let Some((body, attempt)) = next else {
            // Nothing to send now: wait for a confirm, which may bring a
            // refused body back.
            match pending.next().await {
                Some(c) => {
                    settle(c, &mut refused, &mut counts, timeout)?;
                    continue;
                }
                None => break,
            }
        };
        if pending.len() >= IN_FLIGHT
            && let Some(c) = pending.next().await
        {
            settle(c, &mut refused, &mut counts, timeout)?;
        }
        // One short pause per round of re-sends gives the broker a moment.
        if attempt > 1 && !retrying {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        retrying = attempt > 1;
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await
            .map_err(BrokerError::op("basic.publish"))?;
        let confirm = tokio::time::timeout(timeout, confirm);
        pending.push(async move { (confirm.await, body, attempt) });
        if attempt == 1 {
            counts.published += 1;
        }
        if progress && last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("published {} so far...", counts.published);
            last_report = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    if counts.nacked > 0 {
        return Err(PublishCmdError::Nacked(counts.nacked));
    }
    Ok(Summary {
        published: counts.published,
        queue: full,
        elapsed,
        republished: counts.republished,
    })
}

/// Messages published, taken only on a later attempt, and refused for good.
#[derive(Default)]
struct Counts {
    published: u64,
    republished: u64,
    nacked: u64,
}

/// What one publish came to: the confirm (or its timeout), the body, and
/// the attempt it was.
type Settled = (
    Result<Result<Confirmation, lapin::Error>, tokio::time::error::Elapsed>,
    Vec<u8>,
    u32,
);

/// Account for one confirm: a nack puts the body back for another attempt
/// until [`ATTEMPTS`], then counts it as refused.
fn settle(
    (confirm, body, attempt): Settled,
    refused: &mut VecDeque<(Vec<u8>, u32)>,
    counts: &mut Counts,
    timeout: Duration,
) -> Result<(), BrokerError> {
    match confirm {
        Ok(Ok(Confirmation::Nack(_))) if attempt < ATTEMPTS => {
            refused.push_back((body, attempt + 1));
            Ok(())
        }
        Ok(Ok(Confirmation::Nack(_))) => {
            counts.nacked += 1;
            Ok(())
        }
        Ok(Ok(_)) => {
            if attempt > 1 {
                counts.republished += 1;
            }
            Ok(())
        }
        Ok(Err(e)) => Err(BrokerError::Op {
            op: "publisher confirm",
            source: e,
        }),
        Err(_) => Err(BrokerError::Timeout {
            op: "publisher confirm",
            timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::split_events;

    #[test]
    fn files_hold_one_event_an_array_or_lines() {
        assert_eq!(split_events(b"{\n \"a\": 1\n}\n").len(), 1);
        assert_eq!(split_events(b"[{\"a\":1},{\"a\":2}]").len(), 2);
        let lines = split_events(b"{\"a\":1}\n\n{\"a\":2}\r\n{broken\n");
        assert_eq!(
            lines,
            vec![
                b"{\"a\":1}".to_vec(),
                b"{\"a\":2}".to_vec(),
                b"{broken".to_vec()
            ]
        );
    }
}
