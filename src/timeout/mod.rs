//! The timeout checker: parks the fleet's events stuck past their deadline,
//! on the one server the topology names (`singletons.timeout-checker`).
//!
//! Every `[timeout_checker] check_interval`:
//! 1. It asks every live server for its overdue items (`GET
//!    /timeout/overdue`): unfinished items older than their adaptor's
//!    `timeout`, or past the event's own `deadline` extension.
//! 2. It records the check and its items in the topology log
//!    ([`Change::CheckStarted`]). From then on the check is the fleet's, not
//!    this server's: whoever runs the timeout checker next finishes it.
//! 3. It asks each adaptor's host to park the check's items (`POST
//!    /timeout/park`). A host parks an item only if it is in the recorded
//!    check, under the item's claim (so never while the executor delivers
//!    it, and never twice), and answers per item.
//! 4. It mails one summary with a `Message-ID` derived from the check, then
//!    records [`Change::CheckFinished`]. A crash between the two sends the
//!    same mail again (same `Message-ID`); nothing else repeats.
//!
//! `checker.rs` ([`Checker`]) is the asking side (steps 1–4, on the timeout checker's
//! host); `local.rs` ([`Local`]) the answering side, on every server (overdue items,
//! parking).
//!
//! [`Change::CheckStarted`]: crate::topology::Change::CheckStarted
//! [`Change::CheckFinished`]: crate::topology::Change::CheckFinished

mod checker;
mod local;

pub use checker::Checker;
pub use local::Local;

pub use crate::admin::api::{ItemRef, MAX_ITEMS_PER_CHECK, ParkRequest, ParkResult};
pub use crate::time::rfc3339;

use crate::repository::{OverdueItem, RepositoryError};
use crate::topology::{Rejected, TopologyError};

/// Why a timeout check, or a host's part in one, did not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum TimeoutError {
    // A host refusing a park request.
    #[error("this server's topology replica has not reached epoch {epoch} yet")]
    ReplicaBehind { epoch: u64 },
    #[error("{server} does not run the timeout checker")]
    NotChecker { server: String },
    #[error("timeout check {check} is not under way")]
    NotUnderWay { check: u64 },
    #[error("{node} cannot read the topology log (fenced)")]
    Fenced { node: String },
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),

    // The checker giving a check up, for now: whoever runs the timeout
    // checker next goes on with it.
    #[error("no longer the timeout checker's host, or fenced")]
    NotTheHost,
    #[error("another check is under way, or this server lost the timeout checker")]
    NotStarted,
    #[error("the recorded check is gone")]
    CheckGone,
    #[error("stopped")]
    Stopped,
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Rejected(#[from] Rejected),

    // A peer's answer.
    #[error(transparent)]
    Peer(#[from] reqwest::Error),
    #[error("HTTP {0}")]
    PeerStatus(reqwest::StatusCode),
    #[error("HTTP {status}: {reason}")]
    PeerRefused {
        status: reqwest::StatusCode,
        reason: String,
    },
}

impl ItemRef {
    fn of(item: &OverdueItem) -> ItemRef {
        ItemRef {
            adaptor: item.adaptor.clone(),
            source: item.source.clone(),
            id: item.id.clone(),
        }
    }
}

/// An overdue item of adaptor `hr` for the unit tests: received at 1 s,
/// due at 61 s, by the adaptor's timeout or (`by_event`) its own deadline.
#[cfg(test)]
fn test_item(id: &str, by_event: bool) -> OverdueItem {
    OverdueItem {
        adaptor: "hr".into(),
        source: "/hr".into(),
        id: id.into(),
        received_ms: 1_000,
        deadline_ms: 61_000,
        by_event,
    }
}
