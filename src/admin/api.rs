//! The peer routes' types: what servers send each other through the admin
//! API (`/state`, `/item`, `/timeout/*`), apart from the server that
//! answers them, so that the supervisor, the scheduler and the timeout
//! checker depend on these and not on the admin server, and the admin
//! server on [`TimeoutPeer`] and not on the timeout checker.

use crate::repository::OverdueItem;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most items one check parks (they are listed in its log record and its
/// mail); a check that found more is followed by the next one at once.
pub const MAX_ITEMS_PER_CHECK: usize = 500;
/// One item of a check, as named in a park request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ItemRef {
    pub adaptor: String,
    pub source: String,
    pub id: String,
}

/// `POST /timeout/park`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParkRequest {
    pub check: u64,
    /// The timeout checker's host asking.
    pub by: String,
    /// The topology epoch the asker has seen (the host waits to see it).
    pub epoch: u64,
    pub items: Vec<ItemRef>,
}

/// What a host did with one item of a park request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum ParkResult {
    /// Parked with reason `timed out` (now, or earlier for this check).
    Parked,
    /// Delivered or parked otherwise before this check could park it.
    Finished,
    /// Being delivered right now; ask again.
    Busy,
    /// Its adaptor is not hosted here (moved, or being handed over).
    NotHere,
    /// Not in this repository, unfinished or finished.
    Unknown,
    /// It could not be parked (the parking queue refused it).
    Failed(String),
}

/// The host side of the timeout check, as the admin API serves it
/// (`GET /timeout/overdue`, `POST /timeout/park`).
pub trait TimeoutPeer: Send + Sync {
    /// This server's unfinished items past their deadline, at most `limit`.
    fn overdue(&self, limit: usize) -> BoxFuture<'_, Result<Vec<OverdueItem>, String>>;
    /// Park the items of a check under way.
    fn park(
        self: Arc<Self>,
        request: ParkRequest,
    ) -> BoxFuture<'static, Result<Vec<(ItemRef, ParkResult)>, String>>;
}
