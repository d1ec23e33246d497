//! The admin HTTP API on `servers.<id>.admin_listen`.
//!
//! - `GET /health`: `200 ok` while the server runs.
//! - `GET /backlog`: this server's unfinished items per adaptor (count and
//!   age of the oldest) and the copies it holds for each origin, as JSON
//!   ([`BacklogView`]).
//! - `GET /backlog/items`: every unfinished item and every copy, named
//!   ([`ItemsView`]); for comparing a server with its monitor.
//! - `GET /topology`: this server's replica of the topology.
//!
//! Read-only; it takes no locks that the pipeline waits on for longer than
//! an index lookup.

pub mod client;

use crate::repository::{CopiesView, ItemKey, Repository, now_ms};
use crate::topology::Topology;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// What `GET /backlog` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogView {
    pub node: String,
    /// Unfinished items per adaptor hosted here.
    pub adaptors: Vec<AdaptorBacklog>,
    /// Copies held for each origin (the servers this one monitors, or did).
    #[serde(default)]
    pub copies: Vec<OriginCopies>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OriginCopies {
    pub origin: String,
    pub generation: u64,
    pub items: usize,
    /// Age of the oldest copy, in milliseconds.
    pub oldest_age_ms: u64,
}

/// What `GET /backlog/items` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemsView {
    pub node: String,
    /// This server's unfinished items.
    pub own: Vec<ItemKey>,
    /// Copies held, per origin.
    pub copies: BTreeMap<String, Vec<ItemKey>>,
    pub generations: BTreeMap<String, u64>,
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
    topology: Option<Topology>,
}

/// Bind `addr` now (so that a taken port stops the start with a clear
/// error) and serve until `shutdown`.
pub async fn bind(
    addr: &str,
    node: &str,
    repo: Repository,
    topology: Option<Topology>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/backlog", get(backlog))
        .route("/backlog/items", get(items))
        .route("/topology", get(topology_state))
        .with_state(AppState {
            node: node.to_owned(),
            repo,
            topology,
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
    let copies = s
        .repo
        .copies_view()
        .into_iter()
        .map(
            |(
                origin,
                CopiesView {
                    generation,
                    items,
                    oldest_ms,
                },
            )| OriginCopies {
                origin,
                generation,
                items,
                oldest_age_ms: oldest_ms.map_or(0, |o| now.saturating_sub(o)),
            },
        )
        .collect();
    Json(BacklogView {
        node: s.node,
        adaptors,
        copies,
    })
}

async fn items(State(s): State<AppState>) -> Result<Json<ItemsView>, (StatusCode, String)> {
    let repo = s.repo.clone();
    let view = tokio::task::spawn_blocking(move || {
        let own = repo.own_items()?;
        let mut copies = BTreeMap::new();
        let mut generations = BTreeMap::new();
        for (origin, v) in repo.copies_view() {
            copies.insert(origin.clone(), repo.copies_items(&origin)?);
            generations.insert(origin, v.generation);
        }
        Ok::<_, crate::repository::RepositoryError>((own, copies, generations))
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(ItemsView {
        node: s.node,
        own: view.0,
        copies: view.1,
        generations: view.2,
    }))
}

async fn topology_state(
    State(s): State<AppState>,
) -> Result<Json<crate::topology::State>, (StatusCode, String)> {
    match &s.topology {
        Some(t) => Ok(Json((*t.state()).clone())),
        None => Err((StatusCode::NOT_FOUND, "no topology".into())),
    }
}
