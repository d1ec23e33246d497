//! `provring bench`: throughput of this server measured against the raw
//! broker in the same run, so that the ratio means something on a shared,
//! noisy machine.
//!
//! `pipeline`: (1) fill S queues with N events in all and consume them at
//! once as fast as the broker allows (prefetch, one `multiple` ack per
//! ready batch, nothing stored); (2) fill S adaptor queues with the same
//! events and run a ring of S servers in-process on them (decode, sled,
//! group commit, copy to the monitor with confirm, ack, executor, null
//! target; each monitor stores the copies and applies the removals) until
//! all N are finished. Both are timed from the first delivery. Both use a
//! fresh namespace, the configured queue type and prefetch, and are
//! cleaned up. S is `--servers` (1: a single server, nothing mirrored).

pub mod failover;

use crate::broker::declare::declare_adaptor_queue;
use crate::broker::{Broker, BrokerError};
use crate::cli::BenchArgs;
use crate::config::{self, AdaptorKind, BrokerConfig, Config};
use crate::publish::{generated, publish_bodies};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishCmdError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("cannot create a temporary directory: {0}")]
    Temp(std::io::Error),
    #[error("{0}")]
    Stalled(String),
}

/// Result of `bench pipeline`.
pub struct PipelineReport {
    pub messages: u64,
    pub servers: u16,
    /// Rounds measured; the rates are medians over them.
    pub rounds: u32,
    pub queue_type: &'static str,
    pub raw_msgs_per_s: f64,
    pub provring_msgs_per_s: f64,
}

impl PipelineReport {
    pub fn ratio(&self) -> f64 {
        self.provring_msgs_per_s / self.raw_msgs_per_s.max(1e-9)
    }

    pub fn render(&self, json: bool) -> String {
        if json {
            serde_json::json!({
                "raw_msgs_per_s": self.raw_msgs_per_s.round(),
                "provring_msgs_per_s": self.provring_msgs_per_s.round(),
                "ratio": (self.ratio() * 1000.0).round() / 1000.0,
                "messages": self.messages,
                "rounds": self.rounds,
                "servers": self.servers,
                "queue_type": self.queue_type,
            })
            .to_string()
        } else {
            format!(
                "bench pipeline: {} messages, {} server(s), {} queues, median of {} rounds\n  raw consume+ack     {:>10.0} msg/s\n  provring pipeline   {:>10.0} msg/s ({}, null target)\n  ratio               {:>10.3}",
                self.messages,
                self.servers,
                self.queue_type,
                self.rounds,
                self.raw_msgs_per_s,
                self.provring_msgs_per_s,
                if self.servers > 1 {
                    "durable and mirrored"
                } else {
                    "durable"
                },
                self.ratio()
            )
        }
    }
}

pub(crate) fn bench_broker(args: &BenchArgs, namespace: &str) -> Result<BrokerConfig, BenchError> {
    let mut broker = if args.config.is_empty() {
        let toml = format!(
            "[broker]\nuris = [{:?}]\n[servers.x]\nadmin_listen = \"127.0.0.1:1\"\ndata_dir = \"x\"\n\
             [security]\nkey_file = \"unused\"\n",
            args.amqp
        );
        config::Config::builder_from_toml(&toml)?.broker
    } else {
        config::load(&args.config)?.broker
    };
    broker.namespace = namespace.to_owned();
    Ok(broker)
}

/// `provring bench pipeline`.
pub async fn pipeline(args: &BenchArgs) -> Result<PipelineReport, BenchError> {
    let namespace = format!("bench-{:08x}", rand::random::<u32>());
    let broker_config = bench_broker(args, &namespace)?;
    let n = args.messages.max(1);
    let progress = !args.json;
    let say = |s: &str| {
        if progress {
            eprintln!("{s}");
        }
    };
    let broker = Broker::new(broker_config.clone(), "provring bench");
    let rounds = args.rounds.max(1);
    let mut raw_rates = Vec::new();
    let mut pipeline_rates = Vec::new();
    let mut failure = None;
    for round in 1..=rounds {
        match one_round(&broker, &broker_config, n, args.servers, round, &say).await {
            Ok((raw, pipeline)) => {
                say(&format!(
                    "round {round}/{rounds}: raw {:.0} msg/s, provring {:.0} msg/s",
                    n as f64 / raw,
                    n as f64 / pipeline
                ));
                raw_rates.push(n as f64 / raw);
                pipeline_rates.push(n as f64 / pipeline);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    cleanup(&broker, &namespace, args.servers).await;
    let _ = std::fs::remove_file(bench_key(&namespace));
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(PipelineReport {
        messages: n,
        servers: args.servers,
        queue_type: broker_config.queue_type.as_str(),
        rounds,
        raw_msgs_per_s: median(&mut raw_rates),
        provring_msgs_per_s: median(&mut pipeline_rates),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One raw measurement then one pipeline measurement, each on queues
/// filled with the same `n` events; returns their durations in seconds.
async fn one_round(
    broker: &Broker,
    cfg: &BrokerConfig,
    n: u64,
    servers: u16,
    round: u32,
    say: &impl Fn(&str),
) -> Result<(f64, f64), BenchError> {
    let run = format!("r{round}-{:08x}", rand::random::<u32>());
    let shares = shares(n, servers);
    say(&format!(
        "round {round}: filling {} raw queue(s) of {} with {n} events...",
        servers, cfg.namespace
    ));
    for (i, share) in shares.iter().enumerate() {
        publish_bodies(
            cfg,
            &format!("raw-{}", i + 1),
            generated(AdaptorKind::Provisioning, format!("{run}-{i}"), *share),
            false,
        )
        .await?;
    }
    let raw = futures::future::try_join_all(
        shares
            .iter()
            .enumerate()
            .map(|(i, share)| consume_raw(broker, cfg, format!("raw-{}", i + 1), *share)),
    )
    .await?;
    let raw = span(&raw);
    say(&format!(
        "round {round}: filling {} adaptor queue(s) with {n} events...",
        servers
    ));
    for (i, share) in shares.iter().enumerate() {
        publish_bodies(
            cfg,
            &format!("bench-{}", i + 1),
            generated(AdaptorKind::Provisioning, format!("{run}-{i}"), *share),
            false,
        )
        .await?;
    }
    let pipeline = run_pipeline(cfg, n, servers).await?;
    Ok((raw, pipeline))
}

/// `n` split over `servers` queues.
fn shares(n: u64, servers: u16) -> Vec<u64> {
    let s = u64::from(servers.max(1));
    (0..s).map(|i| n / s + u64::from(i < n % s)).collect()
}

/// Seconds from the earliest start to the latest end.
fn span(times: &[(Instant, Instant)]) -> f64 {
    let start = times.iter().map(|t| t.0).min();
    let end = times.iter().map(|t| t.1).max();
    match (start, end) {
        (Some(s), Some(e)) => (e - s).as_secs_f64().max(1e-9),
        _ => 1e-9,
    }
}

/// Consume and ack `n` messages from `ns.<queue>`: (first delivery, end).
async fn consume_raw(
    broker: &Broker,
    cfg: &BrokerConfig,
    queue: String,
    n: u64,
) -> Result<(Instant, Instant), BenchError> {
    let channel = broker.channel().await?;
    let queue = declare_adaptor_queue(&channel, &cfg.namespace, cfg.queue_type, &queue).await?;
    let tag = format!("bench-{queue}");
    channel
        .basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(BrokerError::op("basic.qos"))?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::op("basic.consume"))?;
    let mut got = 0u64;
    let mut started = None;
    while got < n {
        let next = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .map_err(|_| BenchError::Stalled(format!("raw consumer stalled after {got} of {n}")))?;
        let Some(Ok(first)) = next else {
            return Err(BenchError::Stalled(format!(
                "raw consumer closed after {got} of {n}"
            )));
        };
        started.get_or_insert_with(Instant::now);
        let mut last = first.delivery_tag;
        got += 1;
        while got < n {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    last = d.delivery_tag;
                    got += 1;
                }
                _ => break,
            }
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .map_err(BrokerError::op("basic.ack"))?;
    }
    let end = Instant::now();
    let _ = channel
        .basic_cancel(
            tag.as_str().into(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await;
    let _ = channel.close(200, "done".into()).await;
    Ok((started.unwrap_or(end), end))
}

/// Seconds for a ring of `servers` servers to finish `n` events from
/// `ns.bench-<i>`, from the first delivery.
async fn run_pipeline(broker: &BrokerConfig, n: u64, servers: u16) -> Result<f64, BenchError> {
    let dir = tempfile_dir()?;
    // One key for every round: the rounds share the namespace's topology log.
    let key = bench_key(&broker.namespace);
    if !key.exists() {
        crate::crypto::keygen(&key).map_err(|e| BenchError::Stalled(e.to_string()))?;
    }
    let mut toml = format!(
        "[broker]\nuris = [\"amqp://x\"]\n[targets.null]\nkind = \"null\"\n\
         [security]\nkey_file = {key:?}\n",
        key = key.display().to_string()
    );
    for i in 1..=servers {
        toml.push_str(&format!(
            "[servers.s{i}]\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = {dir:?}\n\
             [adaptors.bench-{i}]\nkind = \"provisioning\"\nqueue = \"bench-{i}\"\nserver = \"s{i}\"\n\
             target = \"null\"\nconcurrency = 64\n",
            dir = dir.path().join(format!("s{i}")).display().to_string()
        ));
    }
    let mut config = Config::builder_from_toml(&toml)?;
    config.broker = broker.clone();
    let nodes: Vec<String> = (1..=servers).map(|i| format!("s{i}")).collect();
    let running =
        futures::future::try_join_all(nodes.iter().map(|node| crate::server::start(&config, node)))
            .await?;
    let stats: Vec<_> = running.iter().map(|r| r.stats.clone()).collect();
    let finished = || stats.iter().map(|s| s.finished()).sum::<u64>();
    let received = || {
        stats
            .iter()
            .map(|s| s.received.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut started = None;
    let mut last = (0, Instant::now());
    while finished() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if started.is_none() && received() > 0 {
            started = Some(Instant::now());
        }
        let done = finished();
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            for r in running {
                r.stop().await;
            }
            return Err(BenchError::Stalled(format!(
                "pipeline stalled after {done} of {n}"
            )));
        }
    }
    let secs = started.map_or(1e-9, |s| s.elapsed().as_secs_f64());
    for r in running {
        r.stop().await;
    }
    Ok(secs)
}

/// The cluster key of a bench run in `namespace` (removed at its end).
fn bench_key(namespace: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("provring-{namespace}.key"))
}

pub(crate) fn tempfile_dir() -> Result<TempDir, BenchError> {
    let path = std::env::temp_dir().join(format!("provring-bench-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&path).map_err(BenchError::Temp)?;
    Ok(TempDir(path))
}

/// A directory removed on drop.
pub(crate) struct TempDir(std::path::PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Keep the directory: return its path and do not remove it.
    pub(crate) fn keep(self) -> std::path::PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn cleanup(broker: &Broker, namespace: &str, servers: u16) {
    if let Ok(channel) = broker.channel().await {
        let mut queues = vec!["parking".to_owned(), "topology".to_owned()];
        for i in 1..=servers {
            queues.extend([
                format!("raw-{i}"),
                format!("bench-{i}"),
                format!("backup.s{i}"),
            ]);
        }
        for q in queues {
            let _ = channel
                .queue_delete(
                    format!("{namespace}.{q}").as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = channel
            .exchange_delete(
                format!("{namespace}.events").as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    broker.close().await;
}
