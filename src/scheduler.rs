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
use crate::config::{Config, Misfire, ScheduleConfig};
use crate::repository::now_ms;
use crate::topology::{Change, Fence, Topology};
use lapin::types::FieldTable;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the scheduler looks for due slots.
const TICK: Duration = Duration::from_millis(100);
/// A slot this late, and due before this scheduler started, is a misfire
/// (it was due while no scheduler ran).
pub const MISFIRE_GRACE: Duration = Duration::from_secs(1);
/// A previous slot's event the adaptor's host has never seen counts as
/// unfinished this long (it may still be on the broker), then as finished.
const UNSEEN_LIMIT: Duration = Duration::from_secs(60);

/// When a schedule's slots fall.
pub enum Cadence {
    Every(u64),
    Cron(Box<croner::Cron>),
}

impl Cadence {
    pub fn of(s: &ScheduleConfig) -> Result<Cadence, String> {
        match (&s.cron, s.every) {
            (Some(_), Some(_)) => Err("give either cron or every, not both".into()),
            (None, None) => Err("give cron or every".into()),
            (None, Some(every)) => {
                let ms = every.as_millis() as u64;
                if ms < 100 {
                    return Err("every must be at least 100ms".into());
                }
                Ok(Cadence::Every(ms))
            }
            (Some(pattern), None) => pattern
                .parse::<croner::Cron>()
                .map(|c| Cadence::Cron(Box::new(c)))
                .map_err(|e| format!("cron {pattern:?}: {e}")),
        }
    }

    /// The latest slot at or before `t` (ms since the Unix epoch).
    pub fn latest_at(&self, t: u64) -> Option<u64> {
        match self {
            Cadence::Every(d) => Some(t / d * d),
            Cadence::Cron(c) => {
                let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(t as i64)?;
                let prev = c.find_previous_occurrence(&at, true).ok()?;
                u64::try_from(prev.timestamp_millis()).ok()
            }
        }
    }

    /// The latest slot strictly before `t`.
    pub fn latest_before(&self, t: u64) -> Option<u64> {
        self.latest_at(t.checked_sub(1)?)
    }
}

/// What one look at a schedule decides.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    /// Slots to publish, in order.
    pub fire: Vec<u64>,
    /// The slot to record as the last one handled.
    pub last: u64,
}

/// Which slots to fire at `now`, `last` being the last slot handled and
/// `started` the time this scheduler started (a slot since then is never a
/// misfire, however late this scheduler is). With `one_at_a_time`
/// (`concurrent = false`) at most one fires.
pub fn decide(
    cadence: &Cadence,
    misfire: Misfire,
    one_at_a_time: bool,
    last: u64,
    started: u64,
    now: u64,
) -> Option<Decision> {
    let latest = cadence.latest_at(now)?;
    if latest <= last {
        return None;
    }
    let grace = MISFIRE_GRACE.as_millis() as u64;
    let on_time = (now - latest < grace || latest >= started).then_some(latest);
    // The latest slot due before the on-time one, if any was missed.
    let missed = match on_time {
        Some(t) => cadence.latest_before(t).filter(|m| *m > last),
        None => Some(latest),
    };
    let mut fire = Vec::new();
    let mut handled = last;
    if let Some(m) = missed
        && misfire == Misfire::FireOnce
    {
        fire.push(m);
        handled = m;
        if one_at_a_time {
            return Some(Decision { fire, last: m });
        }
    } else if let Some(m) = missed {
        handled = m;
    }
    if let Some(t) = on_time {
        fire.push(t);
        handled = t;
    }
    Some(Decision {
        fire,
        last: handled,
    })
}

/// The slot's id, as it appears in the event id and `{{slot}}`.
pub fn slot_id(schedule: &str, slot: u64) -> String {
    format!("{schedule}@{slot}")
}

/// The CloudEvents JSON of `schedule`'s event for `slot`.
pub fn render(schedule: &str, s: &ScheduleConfig, slot: u64) -> String {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(slot))
            .to_string();
    let id = slot_id(schedule, slot);
    let mut data = s.event.data.clone();
    fill(
        &mut data,
        &[
            ("{{schedule}}", schedule),
            ("{{slot}}", &id),
            ("{{time}}", &time),
        ],
    );
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": s.event.source,
        "type": s.event.event_type,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    })
    .to_string()
}

fn fill(v: &mut serde_json::Value, vars: &[(&str, &str)]) {
    match v {
        serde_json::Value::String(text) => {
            for (name, value) in vars {
                if text.contains(name) {
                    *text = text.replace(name, value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|x| fill(x, vars)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|x| fill(x, vars)),
        _ => {}
    }
}

/// What the scheduler needs.
pub struct Scheduler {
    pub config: Config,
    pub node: String,
    pub publisher: Publisher,
    pub topology: Topology,
    pub fence: Fence,
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
        let client = match crate::admin::client::peer_builder(&self.config, self.topology.keys())
            .and_then(|b| {
                b.timeout(Duration::from_secs(2))
                    .build()
                    .map_err(|e| e.to_string())
            }) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "Cannot build the scheduler's HTTP client; schedules wait for their adaptor's host to answer.");
                None
            }
        };
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
            Ok(Some(crate::topology::Outcome::Ignored(reason))) => Err(reason),
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
        let answer = client.get(url).send().await;
        let status = match answer {
            Ok(r) if r.status().is_success() => r.json::<ItemStatus>().await.ok(),
            _ => None,
        };
        match status.map(|s| s.state) {
            Some(ItemState::Done) => true,
            Some(ItemState::Pending) => false,
            Some(ItemState::Unknown) => {
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

/// `GET /item`: where an event stands in a server's repository.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ItemStatus {
    pub state: ItemState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Stored, not finished.
    Pending,
    /// Finished (delivered or parked) and still in the done ledger.
    Done,
    /// Not in this repository.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_of_a_period() {
        let c = Cadence::Every(1000);
        assert_eq!(c.latest_at(12_345), Some(12_000));
        assert_eq!(c.latest_before(12_000), Some(11_000));
        // On time: just the current slot.
        let d = decide(&c, Misfire::FireOnce, true, 11_000, u64::MAX, 12_300).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![12_000],
                last: 12_000
            }
        );
        assert_eq!(
            decide(&c, Misfire::FireOnce, true, 12_000, u64::MAX, 12_900),
            None
        );
        // After an outage: the latest missed slot once, then the current one.
        let d = decide(&c, Misfire::FireOnce, false, 8_000, u64::MAX, 12_300).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![11_000, 12_000],
                last: 12_000
            }
        );
        let d = decide(&c, Misfire::FireOnce, true, 8_000, u64::MAX, 12_300).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![11_000],
                last: 11_000
            }
        );
        let d = decide(&c, Misfire::Skip, true, 8_000, u64::MAX, 12_300).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![12_000],
                last: 12_000
            }
        );
        // Only missed slots: the latest fires once, or with skip none, and
        // the schedule moves on.
        let c = Cadence::Every(5000);
        let d = decide(&c, Misfire::FireOnce, true, 0, u64::MAX, 12_000).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![10_000],
                last: 10_000
            }
        );
        let d = decide(&c, Misfire::Skip, true, 0, u64::MAX, 12_000).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![],
                last: 10_000
            }
        );
        // A slot since this scheduler started fires however late it is.
        let d = decide(&c, Misfire::Skip, true, 0, 9_000, 12_000).expect("due");
        assert_eq!(
            d,
            Decision {
                fire: vec![10_000],
                last: 10_000
            }
        );
    }

    #[test]
    fn slots_of_a_cron_pattern() {
        let s: ScheduleConfig = serde_json::from_value(serde_json::json!({
            "cron": "*/5 * * * * *", "adaptor": "hr",
            "event": {"type": "io.provring.account.update", "data": {"userName": "u-{{slot}}"}}
        }))
        .expect("schedule");
        let c = Cadence::of(&s).expect("cadence");
        assert_eq!(c.latest_at(1_700_000_003_000), Some(1_700_000_000_000));
        assert_eq!(c.latest_before(1_700_000_000_000), Some(1_699_999_995_000));
        let body = render("nightly", &s, 1_700_000_000_000);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["id"], "nightly@1700000000000");
        assert_eq!(v["data"]["userName"], "u-nightly@1700000000000");
        assert_eq!(v["time"], "2023-11-14T22:13:20.000Z");
    }
}
