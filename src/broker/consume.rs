//! Consuming a queue, the same way everywhere: the adaptors, the backup
//! adaptors, the drain of a failed server's queues and the topology reader
//! all start with [`consume`] (`basic.qos`, then `basic.consume` under a
//! tag that names the consumer) and gather what is ready with
//! [`take_ready`].

use super::BrokerError;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};

/// A consumer tag that names what consumes (`provring.<what>.<random>`),
/// as the broker's management UI shows it; the random part tells one
/// session from the next.
pub fn tag(what: &str) -> String {
    format!("provring.{what}.{:08x}", rand::random::<u32>())
}

/// Consume `queue` on `channel` under `tag`, with at most `prefetch`
/// deliveries unacked; `args` are the consume arguments (a stream offset).
pub async fn consume(
    channel: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
    args: FieldTable,
) -> Result<Consumer, BrokerError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(BrokerError::op("basic.qos"))?;
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(BrokerError::op("basic.consume"))
}

/// How a stream of deliveries ended.
#[derive(Debug)]
pub enum End {
    /// The broker ended the consumer (the queue was deleted, the channel
    /// closed).
    Closed,
    Failed(lapin::Error),
}

impl End {
    /// The error that ends a session, naming what was consumed.
    pub fn error(self, what: &str) -> BrokerError {
        match self {
            End::Closed => BrokerError::Closed(format!("the broker ended the consumer of {what}")),
            End::Failed(source) => BrokerError::Op {
                op: "consume",
                source,
            },
        }
    }
}

/// The next delivery, waiting for it.
pub async fn next(consumer: &mut Consumer) -> Result<Delivery, End> {
    match consumer.next().await {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(End::Failed(e)),
        None => Err(End::Closed),
    }
}

/// Add to `batch` the deliveries that are ready now, without waiting, until
/// it holds `max`. The batch grows while its predecessor is being written
/// (group commit). If the stream ended meanwhile, says how: what was
/// gathered is kept, for the caller to finish before ending its session.
pub fn take_ready(consumer: &mut Consumer, batch: &mut Vec<Delivery>, max: usize) -> Option<End> {
    while batch.len() < max {
        match consumer.next().now_or_never() {
            Some(Some(Ok(d))) => batch.push(d),
            None => return None,
            Some(Some(Err(e))) => return Some(End::Failed(e)),
            Some(None) => return Some(End::Closed),
        }
    }
    None
}
