//! `GET /metrics`: this server's metrics as Prometheus text. Counters and
//! gauges are read when asked; histograms are recorded where things happen
//! ([`crate::metrics`]).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `provring_received_total`, `_stored_total`, `_mirrored_total`, `_delivered_total`, `_retried_total`, `_parked_total`, `_invalid_total`, `_duplicates_suppressed_total`, `_takeovers_total`, `_fence_pauses_total` | counter | |
//! | `provring_parked_by_reason_total` | counter | `adaptor`, `reason` (`refused`, `attempts`, `deadline`, `timed_out`, `other`) |
//! | `provring_backlog_items`, `provring_backlog_oldest_seconds` | gauge | `adaptor` |
//! | `provring_copies_items` | gauge | `origin` |
//! | `provring_state` (0–10), `provring_topology_epoch` | gauge | |
//! | `provring_mirror_seconds`, `provring_delivery_seconds` | histogram | `adaptor` |
//! | `provring_probe_seconds` | histogram | `peer` |

use super::api::AdminError;
use super::{AppState, StateQuery};
use crate::repository::now_ms;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering::Relaxed;

pub(super) async fn metrics(State(s): State<AppState>) -> Result<Response, AdminError> {
    let Some(health) = &s.health else {
        return Err(AdminError::NotHere("no metrics here".into()));
    };
    let stats = &health.stats;
    let m = &stats.metrics;
    for (name, total) in [
        ("provring_received_total", stats.received.load(Relaxed)),
        ("provring_stored_total", stats.stored.load(Relaxed)),
        ("provring_mirrored_total", stats.mirrored.load(Relaxed)),
        ("provring_delivered_total", stats.delivered.load(Relaxed)),
        ("provring_retried_total", stats.retries.load(Relaxed)),
        ("provring_invalid_total", stats.invalid.load(Relaxed)),
        (
            "provring_duplicates_suppressed_total",
            stats.duplicates.load(Relaxed) + stats.already_done.load(Relaxed),
        ),
        ("provring_takeovers_total", stats.takeovers.load(Relaxed)),
        (
            "provring_fence_pauses_total",
            stats.fence_pauses.load(Relaxed),
        ),
    ] {
        m.absolute(name, &[], total);
    }
    m.absolute("provring_parked_total", &[], stats.parked.load(Relaxed));
    let now = now_ms();
    let backlog = s.repo.backlog();
    let configured = s
        .cluster
        .as_ref()
        .map(|c| c.config.adaptors.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    for adaptor in configured.iter().chain(backlog.keys()) {
        let (items, oldest) = backlog.get(adaptor).copied().unwrap_or((0, now));
        m.set(
            "provring_backlog_items",
            &[("adaptor", adaptor)],
            items as f64,
        );
        m.set(
            "provring_backlog_oldest_seconds",
            &[("adaptor", adaptor)],
            now.saturating_sub(oldest) as f64 / 1000.0,
        );
    }
    for (origin, copies) in s.repo.copies_view() {
        m.set(
            "provring_copies_items",
            &[("origin", &origin)],
            copies.items as f64,
        );
    }
    let view = super::state(State(s.clone()), Ok(Query(StateQuery { peek: true })))
        .await
        .0;
    m.set("provring_state", &[], f64::from(view.state));
    m.set("provring_topology_epoch", &[], view.epoch as f64);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response())
}
