//! The peer routes' types: what servers send each other through the admin
//! API (`/state`, `/item`, `/timeout/*`), apart from the server that
//! answers them, so that the supervisor, the scheduler and the timeout
//! checker depend on these and not on the admin server, and the admin
//! server on [`TimeoutPeer`] and not on the timeout checker. Every
//! refusal is an [`AdminError`], sent as `{"error": "..."}` ([`ErrorBody`])
//! with its status code.

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
    fn overdue(&self, limit: usize) -> BoxFuture<'_, Result<Vec<OverdueItem>, AdminError>>;
    /// Park the items of a check under way ([`AdminError::Refused`] with
    /// the reason when this server cannot take part in it now).
    fn park(
        self: Arc<Self>,
        request: ParkRequest,
    ) -> BoxFuture<'static, Result<Vec<(ItemRef, ParkResult)>, AdminError>>;
}

/// Why the admin API did not do what a request asked; each kind has its
/// status code ([`AdminError::status`]) and is sent as an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// 400: a query or body that cannot be read.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one this server does not know.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403: a known token whose role does not reach the route.
    #[error("token {name:?} has role {role}, which does not reach this route")]
    Forbidden { name: String, role: String },
    /// 404: no such route, or nothing of that kind on this server.
    #[error("{0}")]
    NotHere(String),
    /// 409: this server cannot take part in the request now (a park
    /// request of a check it has not seen, while fenced, ...).
    #[error("{0}")]
    Refused(String),
    /// 413: a body over `admin.max_body`.
    #[error("{0}")]
    TooLarge(String),
    /// 503: the request took longer than `admin.request_timeout`.
    #[error("request took longer than admin.request_timeout ({0:?})")]
    TooSlow(std::time::Duration),
    /// 500: this server failed (its repository, a task).
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    /// The HTTP status code this refusal is sent with.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::BadRequest(_) => 400,
            AdminError::Unauthorized(_) => 401,
            AdminError::Forbidden { .. } => 403,
            AdminError::NotHere(_) => 404,
            AdminError::Refused(_) => 409,
            AdminError::TooLarge(_) => 413,
            AdminError::TooSlow(_) => 503,
            AdminError::Internal(_) => 500,
        }
    }

    /// The body it is sent with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
        }
    }
}

/// The body of every refusal: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    /// The reason in a refusal's body: the `error` of an [`ErrorBody`], or
    /// the text as it came (a proxy's page, an older server).
    pub fn reason_of(text: &str) -> String {
        serde_json::from_str::<ErrorBody>(text)
            .map(|b| b.error)
            .unwrap_or_else(|_| text.trim().to_owned())
    }
}

/// What `GET /cluster` returns: every server of the cluster file as the
/// answering server knows it (its topology replica, and a `GET /state` of
/// each server made for this request).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    /// The server that answered.
    pub by: String,
    /// Its topology epoch.
    pub epoch: u64,
    /// Every server that is neither failed nor stopped on purpose is
    /// monitored by one that is neither.
    pub ring_closed: bool,
    pub servers: Vec<ServerView>,
}

/// One server in a [`ClusterView`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerView {
    pub node: String,
    pub address: String,
    /// It answered `GET /state`.
    pub reachable: bool,
    /// Why it did not answer.
    pub error: Option<String>,
    /// 0–10, from its own `GET /state`.
    pub state: Option<u8>,
    pub reasons: Vec<String>,
    /// The topology epoch it has seen.
    pub epoch: Option<u64>,
    /// How long its `GET /state` took, in milliseconds.
    pub probe_ms: Option<u64>,
    pub uptime_s: Option<u64>,
    /// The server it monitors, and the one that monitors it.
    pub monitors: Option<String>,
    pub monitored_by: Option<String>,
    pub adaptors: Vec<String>,
    pub singletons: Vec<String>,
    pub stopping: bool,
    pub failed: bool,
    pub taken_over_by: Option<String>,
    /// When the takeover was written, if the answering server still holds
    /// that change in its history (ms since the Unix epoch).
    pub taken_over_at_ms: Option<u64>,
}
