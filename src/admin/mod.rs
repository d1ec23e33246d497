//! The admin HTTP API on `servers.<id>.admin_listen`.
//!
//! - `GET /health`: `200 ok` while the server runs.
//! - `GET /backlog`: this server's unfinished items per adaptor (count and
//!   age of the oldest) and the copies it holds for each origin, as JSON
//!   ([`BacklogView`]).
//! - `GET /backlog/items`: every unfinished item and every copy, named
//!   ([`ItemsView`]); for comparing a server with its monitor.
//! - `GET /topology`: this server's replica of the topology.
//! - `GET /state`: this server's state from 0 (unusable) to 10 (healthy)
//!   with the reasons ([`StateView`]); what the supervisor of its monitor
//!   polls.
//! - `GET /item?adaptor=A&source=S&id=I`: where one event stands here
//!   (`pending`, `done` or `unknown`); what the scheduler asks.
//! - `GET /timeout/overdue?limit=N`: this server's unfinished items past
//!   their deadline; `POST /timeout/park`: park items of the timeout check
//!   under way (see [`crate::timeout`]).
//! - `POST /stop`: stop this server as SIGTERM does (the stop is announced
//!   in the topology log, so it is not taken over).
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

/// What `GET /state` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateView {
    pub node: String,
    /// 0 (unusable) to 10 (healthy).
    pub state: u8,
    /// Why the state is below 10.
    pub reasons: Vec<String>,
    pub epoch: u64,
    pub key_fingerprint: Option<String>,
    /// The server is stopping on purpose.
    pub stopping: bool,
}

/// What `GET /state` looks at.
#[derive(Clone)]
pub struct Health {
    pub fatal: CancellationToken,
    pub stopping: CancellationToken,
    pub stats: std::sync::Arc<crate::stats::Stats>,
    pub fence_after: std::time::Duration,
    /// (retries, delivered) at the previous probe.
    pub last: std::sync::Arc<std::sync::Mutex<(u64, u64)>>,
    /// Cancelled by `POST /stop` (`provring stop`).
    pub stop_requested: CancellationToken,
}

#[derive(Clone)]
struct AppState {
    node: String,
    repo: Repository,
    topology: Option<Topology>,
    health: Option<Health>,
    timeouts: Option<std::sync::Arc<crate::timeout::Local>>,
}

/// Bind `addr` now (so that a taken port stops the start with a clear
/// error) and serve until `shutdown`.
pub async fn bind(
    addr: &str,
    node: &str,
    repo: Repository,
    topology: Option<Topology>,
    health: Option<Health>,
    timeouts: Option<std::sync::Arc<crate::timeout::Local>>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/backlog", get(backlog))
        .route("/backlog/items", get(items))
        .route("/item", get(item))
        .route("/timeout/overdue", get(overdue))
        .route("/timeout/park", axum::routing::post(park))
        .route("/topology", get(topology_state))
        .route("/state", get(state))
        .route("/stop", axum::routing::post(stop))
        .with_state(AppState {
            node: node.to_owned(),
            repo,
            topology,
            health,
            timeouts,
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

/// `GET /item?adaptor=A&source=S&id=I`.
#[derive(Deserialize)]
struct ItemQuery {
    adaptor: String,
    source: String,
    id: String,
}

async fn item(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<ItemQuery>,
) -> Json<crate::scheduler::ItemStatus> {
    let identity = crate::event::Identity {
        source: q.source,
        id: q.id,
    };
    Json(crate::scheduler::ItemStatus {
        state: s.repo.item_state(&q.adaptor, &identity),
    })
}

#[derive(Deserialize)]
struct OverdueQuery {
    limit: Option<usize>,
}

async fn overdue(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<OverdueQuery>,
) -> Result<Json<Vec<crate::repository::OverdueItem>>, (StatusCode, String)> {
    let Some(t) = &s.timeouts else {
        return Err((StatusCode::NOT_FOUND, "no timeout checks here".into()));
    };
    let limit = q
        .limit
        .unwrap_or(crate::timeout::MAX_ITEMS_PER_CHECK)
        .min(crate::timeout::MAX_ITEMS_PER_CHECK);
    t.overdue(limit)
        .await
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn park(
    State(s): State<AppState>,
    Json(req): Json<crate::timeout::ParkRequest>,
) -> Result<Json<Vec<(crate::timeout::ItemRef, crate::timeout::ParkResult)>>, (StatusCode, String)>
{
    let Some(t) = &s.timeouts else {
        return Err((StatusCode::NOT_FOUND, "no timeout checks here".into()));
    };
    // A task of its own: an asker that goes away (killed mid-check) must
    // not cut a park short between its publish and its removal, or the
    // taker's retry would park the item again.
    let t = t.clone();
    tokio::spawn(async move { t.park(req).await })
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
        .map_err(|e| (StatusCode::CONFLICT, e))
}

async fn topology_state(
    State(s): State<AppState>,
) -> Result<Json<crate::topology::State>, (StatusCode, String)> {
    match &s.topology {
        Some(t) => Ok(Json((*t.state()).clone())),
        None => Err((StatusCode::NOT_FOUND, "no topology".into())),
    }
}

/// Oldest backlog item age above which the state drops.
const OLD_BACKLOG_MS: u64 = 15 * 60 * 1000;

async fn state(State(s): State<AppState>) -> Json<StateView> {
    let mut score: i32 = 10;
    let mut reasons = Vec::new();
    let (epoch, fingerprint) = match &s.topology {
        Some(t) => {
            let st = t.state();
            let fp = st
                .servers
                .get(&s.node)
                .and_then(|x| x.key_fingerprint.clone());
            (st.epoch, fp)
        }
        None => (0, None),
    };
    let mut stopping = false;
    if let Some(h) = &s.health {
        stopping = h.stopping.is_cancelled();
        if h.fatal.is_cancelled() {
            score = 0;
            reasons.push("repository failed; the server is stopping".into());
        }
        if let Some(t) = &s.topology {
            let age = t.read_age();
            if age > h.fence_after {
                score -= 6;
                reasons.push(format!(
                    "cannot read the topology log for {} (broker connection lost?)",
                    humantime::format_duration(std::time::Duration::from_millis(
                        age.as_millis() as u64
                    ))
                ));
            }
        }
        let retries = h.stats.retries.load(std::sync::atomic::Ordering::Relaxed);
        let delivered = h.stats.delivered.load(std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut last) = h.last.lock() {
            let (dr, dd) = (
                retries - last.0.min(retries),
                delivered - last.1.min(delivered),
            );
            *last = (retries, delivered);
            if dr > 10 && dr > dd {
                score -= 2;
                reasons.push(format!(
                    "target errors: {dr} failed attempts, {dd} deliveries since the last probe"
                ));
            }
        }
    }
    let now = now_ms();
    if let Some(oldest) = s.repo.backlog().values().map(|(_, o)| *o).min()
        && now.saturating_sub(oldest) > OLD_BACKLOG_MS
    {
        score -= 2;
        reasons.push(format!(
            "oldest backlog item waiting {}",
            humantime::format_duration(std::time::Duration::from_secs(
                now.saturating_sub(oldest) / 1000
            ))
        ));
    }
    Json(StateView {
        node: s.node,
        state: score.clamp(0, 10) as u8,
        reasons,
        epoch,
        key_fingerprint: fingerprint,
        stopping,
    })
}

async fn stop(State(s): State<AppState>) -> (StatusCode, String) {
    match &s.health {
        Some(h) => {
            tracing::info!("Stop requested through the admin API.");
            h.stop_requested.cancel();
            (StatusCode::ACCEPTED, format!("{} is stopping\n", s.node))
        }
        None => (StatusCode::NOT_FOUND, "no stop here\n".into()),
    }
}
