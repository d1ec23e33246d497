//! Take everything off a queue that nobody else writes to any more.

use super::{BrokerError, consume};
use lapin::Channel;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
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
    let mut consumer =
        consume::consume(channel, queue, tag, CHUNK as u16 * 2, FieldTable::default()).await?;
    let mut applied = 0;
    loop {
        let first =
            match tokio::time::timeout(Duration::from_millis(300), consume::next(&mut consumer))
                .await
            {
                Ok(next) => Some(next.map_err(|end| end.error(queue))?),
                Err(_) => None,
            };
        let Some(first) = first else {
            if ready(channel, queue).await?.unwrap_or(0) == 0 {
                return Ok(applied);
            }
            continue;
        };
        let mut batch = vec![first];
        // What arrived before an end is applied and acked first.
        let end = consume::take_ready(&mut consumer, &mut batch, CHUNK);
        let last = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
        let n = batch.len();
        apply(batch.into_iter().map(|d| d.data).collect())
            .await
            .map_err(|e| {
                BrokerError::Closed(format!("cannot apply what was drained from {queue}: {e}"))
            })?;
        let acked = channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await;
        // After an end, its reason says more than the failed ack.
        if let Some(end) = end {
            return Err(end.error(queue));
        }
        acked.map_err(BrokerError::op("basic.ack"))?;
        applied += n;
    }
}
