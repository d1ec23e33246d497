//! The parking queue (`ns.parking`): where events that cannot be delivered
//! wait for a person, with the reason.
//!
//! A parked message's body is sealed with the cluster key like every other
//! body provring writes (see [`crate::crypto`]); what an operator needs to
//! find it is in clear headers:
//!
//! | header | value |
//! |---|---|
//! | `x-provring-reason` | why it was parked (never quotes a password) |
//! | `x-provring-adaptor` | the adaptor it came from |
//! | `x-provring-source`, `x-provring-id` | the event identity (absent for a body that is not a valid event) |
//! | `x-provring-type` | the event type (absent likewise) |
//! | `x-provring-attempts` | target calls made |
//!
//! The associated data of the sealed body is
//! `crypto::event_ad(Parked, source, id, type)` from those headers (each
//! empty when absent). The content type is
//! [`SEALED_CONTENT_TYPE`]. Each message expires after `parking.ttl`
//! (default 14 days; per-message expiration, so an existing queue keeps
//! its arguments).

use crate::broker::declare::parking_queue;
use crate::broker::{Broker, PublishError, Publisher};
use crate::crypto::{KeyRing, Sealed, event_ad};
use crate::repository::StoredItem;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use std::sync::Arc;
use std::time::Duration;

/// Content type of a parked message: a sealed body.
pub const SEALED_CONTENT_TYPE: &str = "application/vnd.provring.sealed";

/// Why parking failed.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot seal the parked body: {0}")]
    Seal(#[from] crate::crypto::SealError),
}

/// Publishes to the parking queue; cheap to clone.
#[derive(Clone)]
pub struct Parking {
    broker: Broker,
    publisher: Publisher,
    queue: String,
    keys: Arc<KeyRing>,
    ttl: Duration,
}

impl Parking {
    pub fn new(broker: Broker, keys: Arc<KeyRing>, ttl: Duration) -> Parking {
        let queue = parking_queue(&broker.config().namespace);
        Parking {
            publisher: Publisher::for_parking(broker.clone()),
            broker,
            queue,
            keys,
            ttl,
        }
    }

    /// Declare the parking queue, so that a consumer finds it before
    /// anything is parked (publishing declares it too).
    pub async fn declare(&self) -> Result<(), crate::broker::BrokerError> {
        let cfg = self.broker.config();
        let channel = self.broker.channel().await?;
        crate::broker::declare::declare_parking(&channel, &cfg.namespace, cfg.queue_type).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// The underlying confirm-mode publisher (shared with other publishes
    /// of the server).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Park a stored item with `reason`.
    pub async fn park_item(&self, item: &StoredItem, reason: &str) -> Result<(), ParkError> {
        let mut headers = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        headers.insert("x-provring-reason".into(), text(reason));
        headers.insert("x-provring-adaptor".into(), text(&item.adaptor));
        headers.insert("x-provring-source".into(), text(&item.source));
        headers.insert("x-provring-id".into(), text(&item.id));
        headers.insert("x-provring-type".into(), text(&item.event_type));
        headers.insert(
            "x-provring-attempts".into(),
            AMQPValue::LongUInt(item.state.attempts),
        );
        let sealed = self.keys.seal(
            &event_ad(Sealed::Parked, &item.source, &item.id, &item.event_type),
            item.body.as_bytes(),
        )?;
        self.publish(&sealed, headers).await
    }

    /// Park bytes that are not a valid event (or not a readable record)
    /// of `adaptor`, with `reason`.
    pub async fn park_bytes(
        &self,
        adaptor: &str,
        body: &[u8],
        reason: &str,
    ) -> Result<(), ParkError> {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-provring-reason".into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            "x-provring-adaptor".into(),
            AMQPValue::LongString(adaptor.into()),
        );
        let sealed = self
            .keys
            .seal(&event_ad(Sealed::Parked, "", "", ""), body)?;
        self.publish(&sealed, headers).await
    }

    async fn publish(&self, sealed: &[u8], headers: FieldTable) -> Result<(), ParkError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(SEALED_CONTENT_TYPE.into())
            .with_expiration(self.ttl.as_millis().to_string().as_str().into())
            .with_headers(headers);
        self.publisher
            .publish_with("", &self.queue, sealed, props)
            .await?;
        Ok(())
    }
}
