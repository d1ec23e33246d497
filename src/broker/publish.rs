//! Publishing with publisher confirms.
//!
//! A [`Publisher`] keeps one confirm-mode channel, opens a new one after any
//! failure, and bounds every publish + confirm wait with
//! `broker.publish_timeout` (lapin can hang when the broker goes away).
//! A publish returns `Ok` only once the broker has confirmed the message.

use super::{Broker, BrokerError};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use std::sync::Arc;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker refused (nack) the message for {routing_key}")]
    Nack { routing_key: String },
    #[error("broker could not route the message for {routing_key}: {reason}")]
    Unroutable { routing_key: String, reason: String },
}

/// Publishes with confirms; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    channel: Arc<Mutex<Option<Channel>>>,
    /// Run on every new channel (declarations the publishes rely on).
    parking_namespace: Option<String>,
}

impl Publisher {
    pub fn new(broker: Broker) -> Publisher {
        Publisher {
            broker,
            channel: Arc::new(Mutex::new(None)),
            parking_namespace: None,
        }
    }

    /// A publisher that declares the namespace's parking queue on each new
    /// channel, so parking works even on a broker that lost its definitions.
    pub fn for_parking(broker: Broker) -> Publisher {
        let ns = broker.config().namespace.clone();
        Publisher {
            parking_namespace: Some(ns),
            ..Publisher::new(broker)
        }
    }

    async fn current(&self) -> Result<Channel, BrokerError> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.broker.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::op("confirm.select"))?;
        if let Some(ns) = &self.parking_namespace {
            super::declare::declare_parking(&ch, ns, self.broker.config().queue_type).await?;
        }
        *guard = Some(ch.clone());
        Ok(ch)
    }

    async fn invalidate(&self) {
        *self.channel.lock().await = None;
    }

    /// Publish one persistent message (a CloudEvent, with `headers`) and
    /// wait for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into())
            .with_headers(headers);
        self.publish_with(exchange, routing_key, body, props).await
    }

    /// Publish one message with `props` and wait for its confirm.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let timeout = self.broker.config().publish_timeout;
        let result = tokio::time::timeout(timeout, async {
            let ch = self.current().await?;
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    // Mandatory: a message no queue takes comes back instead
                    // of being confirmed and dropped.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props,
                )
                .await
                .map_err(BrokerError::op("basic.publish"))?
                .await
                .map_err(BrokerError::op("publisher confirm"))?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable {
                    routing_key: routing_key.to_owned(),
                    reason: returned.reply_text.to_string(),
                }),
                Confirmation::Nack(_) => Err(PublishError::Nack {
                    routing_key: routing_key.to_owned(),
                }),
                Confirmation::NotRequested => Err(PublishError::Nack {
                    routing_key: routing_key.to_owned(),
                }),
            }
        })
        .await
        .unwrap_or(Err(PublishError::Broker(BrokerError::Timeout {
            op: "publish",
            timeout,
        })));
        if result.is_err() {
            // A new channel re-declares what the publishes rely on.
            self.invalidate().await;
        }
        result
    }
}
