//! The admin HTTP API on `servers.<id>.admin_listen`.
//!
//! - `GET /health`: `200 ok` while the server runs.
//! - `GET /backlog`: this server's unfinished items per adaptor (count and
//!   age of the oldest), as JSON ([`BacklogView`]).
//!
//! Read-only; it takes no locks that the pipeline waits on for longer than
//! an index lookup.

pub mod client;

use crate::repository::{Repository, now_ms};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// What `GET /backlog` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogView {
    pub node: String,
    /// Unfinished items per adaptor hosted here.
    pub adaptors: Vec<AdaptorBacklog>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptorBacklog {
    pub adaptor: String,
    pub items: usize,
    /// Age of the oldest unfinished item, in milliseconds.
    pub oldest_age_ms: u64,
}

#[derive(Clone)]
struct AppState {
    node: String,
    repo: Repository,
}

/// Bind `addr` now (so that a taken port stops the start with a clear
/// error) and serve until `shutdown`.
pub async fn bind(
    addr: &str,
    node: &str,
    repo: Repository,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/backlog", get(backlog))
        .with_state(AppState {
            node: node.to_owned(),
            repo,
        });
    let handle = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "Admin API stopped.");
        }
    });
    Ok((local, handle))
}

async fn backlog(State(s): State<AppState>) -> Json<BacklogView> {
    let now = now_ms();
    let adaptors = s
        .repo
        .backlog()
        .into_iter()
        .map(|(adaptor, (items, oldest))| AdaptorBacklog {
            adaptor,
            items,
            oldest_age_ms: now.saturating_sub(oldest),
        })
        .collect();
    Json(BacklogView {
        node: s.node,
        adaptors,
    })
}
