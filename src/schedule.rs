//! Schedules as data: `[schedules.<name>]`, when their slots fall
//! ([`Cadence`]), which slots one look fires ([`decide`]) and the event of a
//! slot ([`render`]). Pure; the scheduler singleton that acts on it is
//! `scheduler.rs`.

use serde::Deserialize;
use std::time::Duration;

/// A slot this late, and due before this scheduler started, is a misfire
/// (it was due while no scheduler ran).
pub const MISFIRE_GRACE: Duration = Duration::from_secs(1);

/// `[schedules.<name>]`: a periodic event, published by the scheduler (one
/// server of the fleet) to an adaptor's queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// A cron pattern (croner syntax; 5 fields, or 6 with seconds first).
    #[serde(default)]
    pub cron: Option<String>,
    /// A fixed period instead of `cron` (slots at multiples of it since the
    /// Unix epoch).
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// The adaptor whose queue receives the event.
    pub adaptor: String,
    /// The event to publish.
    pub event: ScheduleEvent,
    /// What happens to slots missed while no scheduler ran.
    #[serde(default)]
    pub misfire: Misfire,
    /// Whether a slot may fire while the previous slot's event is still
    /// unfinished somewhere in the fleet.
    #[serde(default)]
    pub concurrent: bool,
}

/// The event a schedule publishes. In every string of `data`, `{{schedule}}`,
/// `{{slot}}` (the slot's id) and `{{time}}` (its RFC 3339 time) are replaced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEvent {
    /// A CloudEvents type the adaptor accepts.
    #[serde(rename = "type")]
    pub event_type: String,
    /// CloudEvents `source`; default `/provring/scheduler`.
    #[serde(default = "default_schedule_source")]
    pub source: String,
    /// CloudEvents `data`.
    #[serde(default)]
    pub data: serde_json::Value,
}

fn default_schedule_source() -> String {
    "/provring/scheduler".into()
}

/// `misfire`: slots missed while no scheduler ran (a takeover, or no
/// eligible server).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// The latest missed slot fires once.
    #[default]
    FireOnce,
    /// Missed slots do not fire.
    Skip,
}

/// Why a schedule's `cron`/`every` does not make a cadence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CadenceError {
    #[error("give either cron or every, not both")]
    Both,
    #[error("give cron or every")]
    Neither,
    #[error("every must be at least 100ms")]
    TooOften,
    #[error("cron {pattern:?}: {reason}")]
    Cron { pattern: String, reason: String },
}

/// When a schedule's slots fall.
pub enum Cadence {
    Every(u64),
    Cron(Box<croner::Cron>),
}

impl Cadence {
    pub fn of(s: &ScheduleConfig) -> Result<Cadence, CadenceError> {
        match (&s.cron, s.every) {
            (Some(_), Some(_)) => Err(CadenceError::Both),
            (None, None) => Err(CadenceError::Neither),
            (None, Some(every)) => {
                let ms = every.as_millis() as u64;
                if ms < 100 {
                    return Err(CadenceError::TooOften);
                }
                Ok(Cadence::Every(ms))
            }
            (Some(pattern), None) => pattern
                .parse::<croner::Cron>()
                .map(|c| Cadence::Cron(Box::new(c)))
                .map_err(|e| CadenceError::Cron {
                    pattern: pattern.clone(),
                    reason: e.to_string(),
                }),
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
