//! Take everything off a queue that nobody else writes to any more.

use super::BrokerError;
use futures::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::future::Future;
use std::time::Duration;

/// Messages handed to `apply` at once, at most.
const CHUNK: usize = 256;

/// The number of messages ready on `queue`; `None` if it does not exist.
pub async fn ready(channel: &Channel, queue: &str) -> Result<Option<u32>, BrokerError> {
    Ok(peek(channel, queue).await?.map(|q| q.message_count()))
}

/// The number of consumers on `queue`; `None` if it does not exist.
pub async fn consumers(channel: &Channel, queue: &str) -> Result<Option<u32>, BrokerError> {
    Ok(peek(channel, queue).await?.map(|q| q.consumer_count()))
}

/// A passive declare of `queue`; `None` if it does not exist (the broker
/// then closes the channel).
async fn peek(channel: &Channel, queue: &str) -> Result<Option<lapin::Queue>, BrokerError> {
    match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => Ok(Some(q)),
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(None),
        Err(e) => Err(BrokerError::Op {
            op: "queue.declare (passive)",
            source: e,
        }),
    }
}

/// Consume `queue` until it reports empty, handing the bodies to `apply` in
/// chunks and acking each chunk only after `apply` succeeded (what was not
/// acked goes back to the queue). basic.get is refused on
/// single-active-consumer queues, so this consumes. Returns the number of
/// messages applied. The channel is closed by the caller.
pub async fn drain<F, Fut, E>(
    channel: &Channel,
    queue: &str,
    tag: &str,
    mut apply: F,
) -> Result<usize, BrokerError>
where
    F: FnMut(Vec<Vec<u8>>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    channel
        .basic_qos(CHUNK as u16 * 2, BasicQosOptions::default())
        .await
        .map_err(BrokerError::op("basic.qos"))?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::op("basic.consume"))?;
    let mut applied = 0;
    loop {
        let mut bodies = Vec::new();
        let mut last = None;
        let first = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
        match first {
            Ok(None) => {
                return Err(BrokerError::Closed(format!(
                    "the broker ended the consumer on {queue}"
                )));
            }
            Ok(Some(Err(e))) => {
                return Err(BrokerError::Op {
                    op: "consume",
                    source: e,
                });
            }
            Ok(Some(Ok(_))) | Err(_) => {}
        }
        if let Ok(Some(Ok(d))) = first {
            last = Some(d.delivery_tag);
            bodies.push(d.data);
            while bodies.len() < CHUNK {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => {
                        last = Some(d.delivery_tag);
                        bodies.push(d.data);
                    }
                    _ => break,
                }
            }
        }
        let Some(tag) = last else {
            if ready(channel, queue).await?.unwrap_or(0) == 0 {
                return Ok(applied);
            }
            continue;
        };
        let n = bodies.len();
        apply(bodies).await.map_err(|e| {
            BrokerError::Closed(format!("cannot apply what was drained from {queue}: {e}"))
        })?;
        channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(BrokerError::op("basic.ack"))?;
        applied += n;
    }
}
