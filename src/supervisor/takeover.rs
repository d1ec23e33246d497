//! The takeover, once the topology log has named this server the taker of
//! a failed peer ([`take_over`]: drain the copies, adopt them, record it,
//! mail), and what it leaves to do on the server that was taken over when
//! it comes back ([`returned_after_takeover`], [`rejoin`]).

use crate::broker::BrokerError;
use crate::broker::declare::backup_queue;
use crate::event::Event;
use crate::node::Node;
use crate::repository::{Repository, RepositoryError, Stored};
use crate::topology::{Change, State, TopologyError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// This server was taken over while it was away: its taker delivers the
/// backlog of the adaptors it lost, so drop it here; start nothing it lost
/// (the topology says where things run now); tell the operators.
pub async fn returned_after_takeover(
    repo: &Repository,
    node: &str,
    taker: Option<&str>,
    state: &crate::topology::State,
    alerter: &crate::alert::Alerter,
) -> Result<(), RepositoryError> {
    let mine = state.adaptors_of(node);
    let mut dropped = 0;
    for adaptor in repo.adaptors_with_backlog() {
        if !mine.contains(&adaptor) {
            let a = adaptor.clone();
            let n = repo.blocking(move |r| r.drop_adaptor(&a)).await?;
            tracing::warn!(%adaptor, items = n, "Surrendered backlog dropped: the taker delivers it.");
            dropped += n;
        }
    }
    let placement: Vec<String> = state
        .adaptors
        .iter()
        .chain(state.singletons.iter())
        .map(|(name, host)| format!("  {name} on {host}"))
        .collect();
    let subject = format!("server {node} is back");
    let body = format!(
        "Server {node} is running again after it was taken over by {}.\n\
         It dropped {dropped} surrendered items (delivered by the taker) and\n\
         resumes monitoring. Nothing moved back; adaptors and services now run on:\n{}\n\n\
         Move them with `provring move` if you want them back.",
        taker.unwrap_or("another server"),
        placement.join("\n")
    );
    let alerter = alerter.clone();
    tokio::spawn(async move { alerter.send(&subject, &body).await });
    Ok(())
}

/// Why a takeover step failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("cannot drain the failed server's copies: {0}")]
    Drain(#[from] BrokerError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("cannot mirror the adopted backlog: {0}")]
    Mirror(#[from] crate::mirror::MirrorError),
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    #[error("the topology log refused the join: {0}")]
    JoinRefused(crate::topology::Rejected),
    /// Adopted, but the adoption is not in the log yet: the failed server
    /// cannot rejoin until it is, so the taker adopts (finds) it again.
    #[error("adopted {items} items, but cannot record the adoption: {source}")]
    NotRecorded {
        items: usize,
        #[source]
        source: crate::topology::TopologyError,
    },
}

/// This server is the taker of `failed`: adopt its backlog, record the
/// adoption (the failed server may rejoin only after it), and, if this
/// server saw the takeover happen (`before`; `after` is the topology that
/// named it), send the alert. Returns the items adopted.
pub async fn take_over(
    node: &Node,
    failed: &str,
    before: Option<&State>,
    after: &State,
) -> Result<usize, TakeoverError> {
    let started = Instant::now();
    let items = adopt(node, failed).await?;
    tracing::warn!(%failed, items, took = ?started.elapsed(), "Took over the failed server's backlog.");
    let me = node.id.clone();
    let recorded = node
        .topology
        .propose_with(|s| {
            let f = s.servers.get(failed)?;
            (f.failed && !f.adopted && f.taken_over_by.as_deref() == Some(me.as_str())).then(|| {
                Change::Adopted {
                    failed: failed.to_owned(),
                    by: me.clone(),
                }
            })
        })
        .await;
    // A takeover seen in the first state was handled by an earlier run of
    // this server, which sent the mail.
    if let Some(before) = before {
        let (subject, body) = takeover_mail(&node.id, failed, before, after, items);
        let alerter = node.alerter.clone();
        tokio::spawn(async move { alerter.send(&subject, &body).await });
    }
    match recorded {
        Ok(_) => {
            node.stats
                .takeovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(items)
        }
        Err(source) => Err(TakeoverError::NotRecorded { items, source }),
    }
}

/// Drain `origin`'s copies from the broker, store them as this server's
/// backlog, mirror them on, forget the copies. Returns the items adopted.
async fn adopt(node: &Node, origin: &str) -> Result<usize, TakeoverError> {
    drain(node, origin).await?;
    let repo = node.repo.clone();
    let o = origin.to_owned();
    let batches = repo.blocking(move |r| r.copies_events(&o)).await?;
    // One flush and one mirror round per adaptor, however many batches the
    // copies came in. Items keep their receipt time, and so their deadline.
    // Only what the failed server still had to deliver: copies of an
    // adaptor it had already handed over to another server are stale.
    let state = node.topology.state();
    let mut per_adaptor: BTreeMap<String, Vec<(u64, Vec<Event>)>> = BTreeMap::new();
    for (adaptor, received_ms, events) in batches {
        let mine = state.adaptors.get(&adaptor) == Some(&node.id)
            || state.handovers.get(&adaptor) == Some(&node.id);
        if !mine {
            tracing::warn!(failed = %origin, %adaptor, items = events.len(), now_on = ?state.adaptors.get(&adaptor), "Copies of an adaptor the failed server had handed over: not adopted.");
            continue;
        }
        per_adaptor
            .entry(adaptor)
            .or_default()
            .push((received_ms, events));
    }
    let mut adopted = 0;
    for (adaptor, batches) in per_adaptor {
        let name = adaptor.clone();
        let (stored, records) = node
            .repo
            .blocking(move |repo| {
                let mut stored = Vec::new();
                let mut records = Vec::new();
                for (received_ms, events) in batches {
                    let (s, r) = repo.store_received(&name, events, received_ms)?;
                    stored.extend(s);
                    records.extend(r);
                }
                Ok((stored, records))
            })
            .await?;
        adopted += stored
            .iter()
            .filter(|s| matches!(s, Stored::New(_)))
            .count();
        node.repo.flush().await?;
        node.mirror.copy(&adaptor, records).await?;
    }
    let o = origin.to_owned();
    node.repo.blocking(move |r| r.copies_drop(&o)).await?;
    Ok(adopted)
}

/// Broker errors tolerated while looking at a failed server's copies.
const DRAIN_TRIES: u32 = 5;

/// Apply every record still on the queue of `origin`'s copies to this
/// server, once its own backup consumer has let go of it.
async fn drain(node: &Node, origin: &str) -> Result<(), BrokerError> {
    let queue = backup_queue(&node.config.broker.namespace, origin, &node.id);
    let mut ch = node.broker.channel().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    loop {
        match crate::broker::drain::consumers(&ch, &queue).await {
            Ok(Some(0)) => break,
            Ok(Some(_)) if Instant::now() > deadline => break,
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            // No queue: nothing was ever sent here.
            Ok(None) => return Ok(()),
            // The copies may be there: never adopt (and drop them) without
            // reading them. Retried on a new channel, then the takeover
            // fails (the server stops; a restart adopts again).
            Err(e) if failures < DRAIN_TRIES => {
                failures += 1;
                tracing::warn!(failed = %origin, error = %e, "Cannot look at the failed server's copies yet; trying again.");
                tokio::time::sleep(Duration::from_millis(500)).await;
                ch = node.broker.channel().await?;
            }
            Err(e) => return Err(e),
        }
    }
    let known: Vec<String> = node.topology.state().servers.keys().cloned().collect();
    let tag = format!("provring.drain.{}", node.id);
    crate::broker::drain::drain(&ch, &queue, &tag, |records| {
        let known = known.clone();
        async move {
            crate::mirror::backup::apply_records(&node.repo, origin, known, records)
                .await
                .map(|_| ())
        }
    })
    .await?;
    let _ = ch.close(200, "drained".into()).await;
    Ok(())
}

/// After a takeover of this running server, once nothing of it runs any
/// more: drop the surrendered backlog, tell the operators, and join the
/// topology again (retried while the taker is still adopting).
pub async fn rejoin(node: &Node) -> Result<(), TakeoverError> {
    let state = node.topology.state();
    let me = state.servers.get(&node.id).cloned().unwrap_or_default();
    returned_after_takeover(
        &node.repo,
        &node.id,
        me.taken_over_by.as_deref(),
        &state,
        &node.alerter,
    )
    .await?;
    let id = &node.id;
    node.topology
        .propose_joined(id, |s| s.servers.get(id).is_some_and(|x| x.failed))
        .await
        .map_err(|e| match e {
            TopologyError::Refused(reason) => TakeoverError::JoinRefused(reason),
            other => other.into(),
        })?;
    tracing::warn!("Joined the topology again after being taken over.");
    Ok(())
}

/// The alert a taker sends: what moved where, the backlog adopted, the
/// ring as it is now.
fn takeover_mail(
    taker: &str,
    failed: &str,
    before: &State,
    after: &State,
    items: usize,
) -> (String, String) {
    let moved: Vec<String> = before
        .adaptors
        .iter()
        .chain(before.singletons.iter())
        .filter(|(_, host)| host.as_str() == failed)
        .map(|(name, _)| {
            let now = after
                .adaptors
                .get(name)
                .or_else(|| after.singletons.get(name))
                .map_or("-", String::as_str);
            format!("  {name} -> {now}")
        })
        .collect();
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let subject = format!("server {failed} failed; {taker} took over");
    let body = format!(
        "Server {failed} stopped answering and its broker connection is gone.\n\
         Server {taker} took it over at {when} (topology epoch {epoch}).\n\n\
         Moved:\n{moved}\n\n\
         Backlog adopted from {failed}'s copies: {items} items.\n\
         Monitoring now: {links}\n\n\
         Nothing moves back by itself: when {failed} is back, move what you want with\n\
         `provring move`.",
        epoch = after.epoch,
        moved = if before.servers.get(failed).is_some_and(|s| s.failed) {
            // It joined and failed again between two states this server
            // saw: what it hosted in between is not known here.
            "  (not known here: the server returned and failed again unseen; \
             see `provring topology show`)"
                .to_owned()
        } else if moved.is_empty() {
            "  (nothing)".to_owned()
        } else {
            moved.join("\n")
        },
        links = after
            .monitors
            .iter()
            .map(|(a, b)| format!("{a}→{b}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    (subject, body)
}
