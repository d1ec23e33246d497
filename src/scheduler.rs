//! The scheduler: publishes each schedule's event once per slot, on the one
//! server the topology names (`singletons.scheduler`).
//!
//! - A slot is a point in time: a multiple of `every` since the Unix epoch,
//!   or a time the `cron` pattern matches. Its event has the identity
//!   (`source`, `<schedule>@<slot ms>`), so the same slot published twice is
//!   one event: the repository stores it once and the target sees one
//!   idempotency key.
//! - Each slot fired (or skipped) is recorded in the topology log
//!   ([`Change::Fired`]), which accepts it only from the scheduler's current
//!   host and only for a later slot: a taker knows exactly what already ran.
//! - Slots missed while no scheduler ran (a takeover): with `fire_once` the
//!   latest of them fires once; with `skip`, none.
//! - `concurrent = false`: a slot does not fire while the previous slot's
//!   event is unfinished at the adaptor's host (asked on its admin API).

use crate::broker::Publisher;
use crate::config::Config;
use crate::repository::now_ms;
use crate::schedule::{Cadence, Decision, ScheduleConfig, decide, render, slot_id};
use crate::topology::{Change, Fence, Topology};
use lapin::types::FieldTable;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the scheduler looks for due slots.
const TICK: Duration = Duration::from_millis(100);
/// A previous slot's event the adaptor's host has never seen counts as
/// unfinished this long (it may still be on the broker), then as finished.
const UNSEEN_LIMIT: Duration = Duration::from_secs(60);

/// What the scheduler needs.
pub struct Scheduler {
    pub config: Config,
    pub node: String,
    pub publisher: Publisher,
    pub topology: Topology,
    pub fence: Fence,
    /// [`crate::admin::client::peer_client`].
    pub peers: reqwest::Client,
}

impl Scheduler {
    /// Run while this server hosts the scheduler (hosting stops it).
    pub async fn run(self, stop: CancellationToken) {
        let mut cadences = BTreeMap::new();
        for (name, s) in &self.config.schedules {
            match Cadence::of(s) {
                Ok(c) => {
                    cadences.insert(name.clone(), c);
                }
                Err(e) => tracing::error!(schedule = %name, error = %e, "Schedule not run."),
            }
        }
        tracing::info!(schedules = cadences.len(), "Scheduler running here.");
        let started = now_ms();
        let client = Some(self.peers.clone());
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.fence.is_open() {
                continue;
            }
            for (name, cadence) in &cadences {
                let s = &self.config.schedules[name];
                let state = self.topology.state();
                if state.singletons.get("scheduler") != Some(&self.node) {
                    return;
                }
                // Never run before: start from now, not from the epoch.
                let last = state.fired.get(name).map_or(started, |f| f.slot);
                let Some(decision) =
                    decide(cadence, s.misfire, !s.concurrent, last, started, now_ms())
                else {
                    continue;
                };
                if !s.concurrent
                    && let Some(prev) = state.fired.get(name)
                    && prev.published
                    && !self.finished(client.as_ref(), name, s, prev.slot).await
                {
                    continue;
                }
                if let Err(e) = self.fire(name, s, &decision).await {
                    tracing::warn!(schedule = %name, error = %e, "Cannot fire the schedule; trying again.");
                }
            }
        }
    }

    async fn fire(&self, name: &str, s: &ScheduleConfig, d: &Decision) -> Result<(), String> {
        let queue = self
            .config
            .adaptors
            .get(&s.adaptor)
            .map(|a| self.config.queue_name(a))
            .ok_or_else(|| format!("no adaptor {:?}", s.adaptor))?;
        for slot in &d.fire {
            let body = render(name, s, *slot);
            self.publisher
                .publish("", &queue, body.as_bytes(), FieldTable::default())
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(schedule = %name, slot = %slot_id(name, *slot), adaptor = %s.adaptor, "Fired.");
        }
        let change = Change::Fired {
            schedule: name.to_owned(),
            slot: d.last,
            by: self.node.clone(),
            published: d.fire.contains(&d.last),
        };
        match self.topology.propose_with(|_| Some(change.clone())).await {
            Ok(Some(crate::topology::Outcome::Ignored(reason))) => Err(reason.to_string()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether the event of `name`'s `slot` has finished at the adaptor's
    /// host (delivered or parked).
    async fn finished(
        &self,
        client: Option<&reqwest::Client>,
        name: &str,
        s: &ScheduleConfig,
        slot: u64,
    ) -> bool {
        let state = self.topology.state();
        let Some(host) = state.adaptors.get(&s.adaptor) else {
            return true;
        };
        let (Some(client), Some(server)) = (client, self.config.servers.get(host)) else {
            return false;
        };
        let id = slot_id(name, slot);
        let Ok(url) = url::Url::parse_with_params(
            &crate::admin::client::admin_url(&self.config, &server.admin_listen, "/item"),
            &[
                ("adaptor", s.adaptor.as_str()),
                ("source", s.event.source.as_str()),
                ("id", id.as_str()),
            ],
        ) else {
            return false;
        };
        let answer = client.get(url).timeout(Duration::from_secs(2)).send().await;
        let status = match answer {
            Ok(r) if r.status().is_success() => r.json::<crate::admin::ItemStatus>().await.ok(),
            _ => None,
        };
        match status.map(|s| s.state) {
            Some(crate::repository::ItemPresence::Done) => true,
            Some(crate::repository::ItemPresence::Pending) => false,
            Some(crate::repository::ItemPresence::Unknown) => {
                let age = now_ms().saturating_sub(slot);
                if age > UNSEEN_LIMIT.as_millis() as u64 {
                    tracing::warn!(schedule = %name, slot = %id, %host, "The previous slot's event is unknown to the adaptor's host; counted as finished.");
                    true
                } else {
                    false
                }
            }
            None => false,
        }
    }
}
