//! Names on the broker and their idempotent declarations.
//!
//! With namespace `ns`:
//! - exchange `ns.events` (direct, durable): producers publish here with the
//!   adaptor's queue name as routing key;
//! - queue `ns.<queue>` per adaptor: durable, `x-queue-type` from
//!   `broker.queue_type`, `x-single-active-consumer = true` (the broker lets
//!   one consumer at a time receive, whatever the servers believe), bound to
//!   `ns.events` with routing key `<queue>`;
//! - queue `ns.parking`: invalid and undeliverable messages, each with an
//!   `x-provring-reason` header;
//! - stream `ns.topology`: the topology log;
//! - queue `ns.backup:<server>:<monitor>`: the copies of the server's
//!   backlog on their way to its monitor (single active consumer);
//! - queue `ns.alive.<server>`: exclusive to the server's connection, so
//!   that peers can ask the broker whether the server is alive.
//!
//! [`definitions`] renders the same topology as a RabbitMQ definitions file
//! for operators who pre-provision; `broker/definitions.json` is generated
//! from `config/cluster.toml` and a test keeps them equal.

use super::BrokerError;
use crate::config::{Config, QueueType};
use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

pub fn events_exchange(namespace: &str) -> String {
    format!("{namespace}.events")
}

pub fn parking_queue(namespace: &str) -> String {
    format!("{namespace}.parking")
}

pub fn topology_stream(namespace: &str) -> String {
    format!("{namespace}.topology")
}

pub fn alive_queue(namespace: &str, node: &str) -> String {
    format!("{namespace}.alive.{node}")
}

/// Declare this connection's exclusive liveness queue (gone with the
/// connection).
pub async fn declare_alive(channel: &Channel, name: &str) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
        .map_err(BrokerError::op("queue.declare (alive)"))
}

/// The queue carrying `origin`'s copies to `monitor` (`:` cannot occur in
/// node ids, so names never collide).
pub fn backup_queue(namespace: &str, origin: &str, monitor: &str) -> String {
    format!("{namespace}.backup:{origin}:{monitor}")
}

/// The queue a moved adaptor's backlog goes through, from its old host to
/// its new one.
pub fn handover_queue(namespace: &str, adaptor: &str) -> String {
    format!("{namespace}.handover.{adaptor}")
}

/// Declare a handover queue (durable, of the configured type).
pub async fn declare_handover_queue(
    channel: &Channel,
    namespace: &str,
    queue_type: QueueType,
    adaptor: &str,
) -> Result<String, BrokerError> {
    let name = handover_queue(namespace, adaptor);
    declare_queue(channel, &name, queue_args(queue_type, false)).await?;
    Ok(name)
}

/// Declare the topology log: a stream queue (append-only, replicated,
/// totally ordered).
pub async fn declare_topology(channel: &Channel, namespace: &str) -> Result<String, BrokerError> {
    let name = topology_stream(namespace);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    declare_queue(channel, &name, args).await?;
    Ok(name)
}

/// Declare the queue that carries `origin`'s copies to `monitor`.
pub async fn declare_backup(
    channel: &Channel,
    namespace: &str,
    queue_type: QueueType,
    origin: &str,
    monitor: &str,
) -> Result<String, BrokerError> {
    let name = backup_queue(namespace, origin, monitor);
    declare_queue(channel, &name, queue_args(queue_type, true)).await?;
    Ok(name)
}

fn queue_args(queue_type: QueueType, single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                BrokerError::QueueMismatch {
                    queue: name.to_owned(),
                    detail: text,
                }
            } else {
                BrokerError::Op {
                    op: "queue.declare",
                    source: e,
                }
            }
        })
}

/// Declare the events exchange and one adaptor queue bound to it.
pub async fn declare_adaptor_queue(
    channel: &Channel,
    namespace: &str,
    queue_type: QueueType,
    queue: &str,
) -> Result<String, BrokerError> {
    let exchange = events_exchange(namespace);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::op("exchange.declare"))?;
    let full = format!("{namespace}.{queue}");
    declare_queue(channel, &full, queue_args(queue_type, true)).await?;
    channel
        .queue_bind(
            full.as_str().into(),
            exchange.as_str().into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::op("queue.bind"))?;
    Ok(full)
}

/// Declare the parking queue.
pub async fn declare_parking(
    channel: &Channel,
    namespace: &str,
    queue_type: QueueType,
) -> Result<String, BrokerError> {
    let name = parking_queue(namespace);
    declare_queue(channel, &name, queue_args(queue_type, false)).await?;
    Ok(name)
}

/// The cluster's broker topology as a RabbitMQ definitions document
/// (`rabbitmqctl import_definitions` or the management UI).
pub fn definitions(config: &Config) -> serde_json::Value {
    let ns = &config.broker.namespace;
    let qt = config.broker.queue_type.as_str();
    let mut queues = vec![serde_json::json!({
        "name": parking_queue(ns), "vhost": "/", "durable": true, "auto_delete": false,
        "arguments": {"x-queue-type": qt}
    })];
    queues.push(serde_json::json!({
        "name": topology_stream(ns), "vhost": "/", "durable": true, "auto_delete": false,
        "arguments": {"x-queue-type": "stream"}
    }));
    let ring: Vec<&String> = config.servers.keys().collect();
    for (i, id) in ring.iter().enumerate() {
        if ring.len() < 2 {
            break;
        }
        // Each server's monitor in the configured ring is the one before it.
        let monitor = ring[(i + ring.len() - 1) % ring.len()];
        queues.push(serde_json::json!({
            "name": backup_queue(ns, id, monitor), "vhost": "/", "durable": true, "auto_delete": false,
            "arguments": {"x-queue-type": qt, "x-single-active-consumer": true}
        }));
    }
    let mut bindings = Vec::new();
    for a in config.adaptors.values() {
        queues.push(serde_json::json!({
            "name": config.queue_name(a), "vhost": "/", "durable": true, "auto_delete": false,
            "arguments": {"x-queue-type": qt, "x-single-active-consumer": true}
        }));
        bindings.push(serde_json::json!({
            "source": events_exchange(ns), "vhost": "/", "destination": config.queue_name(a),
            "destination_type": "queue", "routing_key": a.queue, "arguments": {}
        }));
    }
    serde_json::json!({
        "exchanges": [{
            "name": events_exchange(ns), "vhost": "/", "type": "direct", "durable": true,
            "auto_delete": false, "internal": false, "arguments": {}
        }],
        "queues": queues,
        "bindings": bindings,
    })
}
