//! The admin HTTP API on `servers.<id>.admin_listen`.
//!
//! - `GET /health`, `GET /health/live`: `200 ok` while the process runs.
//! - `GET /health/ready`: 200 while this server does its work; 503 while
//!   it is fenced (cannot read the topology log: broker connection lost),
//!   taken over and not rejoined, stopping, or failed ([`Readiness`]).
//! - `GET /backlog`: this server's unfinished items per adaptor (count and
//!   age of the oldest) and the copies it holds for each origin, as JSON
//!   ([`BacklogView`]).
//! - `GET /backlog/items`: every unfinished item and every copy, named
//!   ([`ItemsView`]); for comparing a server with its monitor.
//! - `GET /topology`: this server's replica of the topology; with
//!   `?history=N`, also the last N changes applied, with their times.
//! - `GET /cluster`: every server as this one sees it ([`api::ClusterView`]).
//! - `GET /metrics`: Prometheus text (see `prometheus.rs` for the list).
//! - `GET /state`: this server's state from 0 (unusable) to 10 (healthy)
//!   with the reasons ([`StateView`]); what the supervisor of its monitor
//!   polls.
//! - `GET /item?adaptor=A&source=S&id=I`: where one event stands here
//!   (`pending`, `done` or `unknown`); what the scheduler asks.
//! - `GET /timeout/overdue?limit=N`: this server's unfinished items past
//!   their deadline; `POST /timeout/park`: park items of the timeout check
//!   under way (see [`api::TimeoutPeer`]).
//! - `POST /stop`: stop this server as SIGTERM does (the stop is announced
//!   in the topology log, so it is not taken over).
//!
//! Who may call which route is [`auth`]'s business: `/health*` is open,
//! the rest need a bearer token (`read`, `operate` for `/stop`, the peer
//! token for `/timeout/*`), unless `security.admin_auth = "none"`. The
//! server closes connections that do not send their headers within
//! `admin.header_read_timeout`, ends requests that take longer than
//! `admin.request_timeout`, serves at most `admin.max_connections` at once
//! and refuses bodies over `admin.max_body` (413). Bad JSON gets 400.
//! Every refusal is an [`api::AdminError`]: `{"error": "..."}` with its
//! status code.
//!
//! It takes no locks that the pipeline waits on for longer than an index
//! lookup.

pub mod api;
pub mod auth;
pub mod client;
mod cluster;
mod prometheus;
pub mod status;

pub use cluster::ClusterParts;

use crate::config::AdminConfig;
use crate::repository::{CopiesView, ItemKey, Repository, now_ms};
use crate::topology::Topology;
use api::AdminError;
use auth::{Auth, Need, Refusal};
use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
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

/// What `GET /backlog/items?limit=M[&after=CURSOR]` returns: one page of
/// the list "own items, then each origin's copies", each sorted by item
/// (default and largest page: [`ITEMS_PAGE_MAX`] items).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemsView {
    pub node: String,
    /// This server's unfinished items (of this page).
    pub own: Vec<ItemKey>,
    /// Copies held, per origin (of this page).
    pub copies: BTreeMap<String, Vec<ItemKey>>,
    pub generations: BTreeMap<String, u64>,
    /// Items in all pages.
    #[serde(default)]
    pub total: usize,
    /// Cursor of the next page (`after=`), if there is one.
    #[serde(default)]
    pub next: Option<String>,
}

/// Largest page of `GET /backlog/items`.
pub const ITEMS_PAGE_MAX: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptorBacklog {
    pub adaptor: String,
    pub items: usize,
    /// Age of the oldest unfinished item, in milliseconds.
    pub oldest_age_ms: u64,
}

/// `GET /item`: where an event stands in a server's repository.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ItemStatus {
    pub state: crate::repository::ItemPresence,
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
    /// Seconds since the server started (absent from earlier versions).
    #[serde(default)]
    pub uptime_s: Option<u64>,
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
    /// When the server started.
    pub started: std::time::Instant,
}

#[derive(Clone)]
struct AppState {
    node: String,
    repo: Repository,
    topology: Option<Topology>,
    health: Option<Health>,
    timeouts: Option<Arc<dyn api::TimeoutPeer>>,
    cluster: Option<ClusterParts>,
}

/// What the admin server serves, and how.
pub struct AdminParts {
    pub node: String,
    pub repo: Repository,
    pub topology: Option<Topology>,
    pub health: Option<Health>,
    pub timeouts: Option<Arc<dyn api::TimeoutPeer>>,
    /// For `GET /cluster`.
    pub cluster: Option<ClusterParts>,
    pub auth: Arc<Auth>,
    pub limits: AdminConfig,
    /// HTTPS, from `[admin.tls]` ([`crate::tls::admin_server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Who is at the other end of a connection: its address, and whether it
/// presented a certificate of the cluster CA (set per connection, read by
/// [`require`]).
#[derive(Debug, Clone, Copy)]
struct Caller {
    address: SocketAddr,
    certified: bool,
}

/// The routes, each behind what it needs.
fn router(parts: AdminParts) -> Router {
    let app_state = AppState {
        node: parts.node,
        repo: parts.repo,
        topology: parts.topology,
        health: parts.health,
        timeouts: parts.timeouts,
        cluster: parts.cluster,
    };
    let guard =
        |need: Need| axum::middleware::from_fn_with_state((parts.auth.clone(), need), require);
    let read = Router::new()
        .route("/backlog", get(backlog))
        .route("/backlog/items", get(items))
        .route("/item", get(item))
        .route("/topology", get(topology_state))
        .route("/cluster", get(cluster::cluster))
        .route("/metrics", get(prometheus::metrics))
        .route("/state", get(state))
        .route_layer(guard(Need::Read));
    let operate = Router::new()
        .route("/stop", axum::routing::post(stop))
        .route_layer(guard(Need::Operate));
    let peer = Router::new()
        .route("/timeout/overdue", get(overdue))
        .route("/timeout/park", axum::routing::post(park))
        .route_layer(guard(Need::Peer));
    let timeout = parts.limits.request_timeout;
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .merge(read)
        .merge(operate)
        .merge(peer)
        .fallback(|request: Request| async move {
            AdminError::NotHere(format!(
                "no route {} {}",
                request.method(),
                request.uri().path()
            ))
        })
        .with_state(app_state)
        .layer(axum::extract::DefaultBodyLimit::max(parts.limits.max_body))
        .layer(axum::middleware::from_fn_with_state(timeout, limit_time))
}

/// The caller's token must reach `need`.
async fn require(
    State((auth, need)): State<(Arc<Auth>, Need)>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let caller = request.extensions().get::<Caller>().copied();
    let certified = caller.is_some_and(|c| c.certified);
    match auth.check(header, need, certified) {
        Ok(who) => {
            if need == Need::Operate {
                tracing::info!(caller = %who, path = %request.uri().path(), "Operator request.");
            }
            next.run(request).await
        }
        Err(Refusal::Unauthorized(why)) => AdminError::Unauthorized(why.into()).into_response(),
        Err(Refusal::PeerWithoutCertificate) => {
            tracing::warn!(caller = ?caller.map(|c| c.address), path = %request.uri().path(), "The peer token came without the cluster's client certificate: refused. The token may have leaked; consider rotating the cluster key.");
            AdminError::Unauthorized("unknown token".into()).into_response()
        }
        Err(Refusal::Forbidden { name, role }) => {
            tracing::warn!(caller = %name, ?role, path = %request.uri().path(), "Admin request refused: role too weak.");
            AdminError::Forbidden {
                name,
                role: format!("{role:?}"),
            }
            .into_response()
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(self.body());
        if status == StatusCode::UNAUTHORIZED {
            return (
                status,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                body,
            )
                .into_response();
        }
        (status, body).into_response()
    }
}

/// A query string that does not fit the route: 400 naming what is wrong.
fn bad_query(e: QueryRejection) -> AdminError {
    AdminError::BadRequest(e.body_text())
}

/// A body that cannot be read: 413 when too large, 400 otherwise.
fn bad_body(e: axum::extract::rejection::JsonRejection) -> AdminError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AdminError::TooLarge(e.body_text()),
        _ => AdminError::BadRequest(e.body_text()),
    }
}

/// End a request that takes longer than `limit`.
async fn limit_time(
    State(limit): State<std::time::Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(r) => r,
        Err(_) => AdminError::TooSlow(limit).into_response(),
    }
}

/// Bind `addr` now (so that a taken port stops the start with a clear
/// error) and serve until `shutdown`.
pub async fn bind(
    addr: &str,
    parts: AdminParts,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let limits = parts.limits.clone();
    let tls = parts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let app = router(parts);
    let handle = tokio::spawn(serve(listener, app, limits, tls, shutdown));
    Ok((local, handle))
}

async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: AdminConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut refused_logged: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, say: wait a moment, keep serving.
                    if refused_logged.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "Admin API cannot accept a connection.");
                        refused_logged = Some(std::time::Instant::now());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if refused_logged.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(60)) {
                tracing::warn!(%peer, max = limits.max_connections, "Admin API at its connection limit (admin.max_connections); closing new connections.");
                refused_logged = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        let header_timeout = limits.header_read_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    let caller = Caller {
                        address: peer,
                        certified: false,
                    };
                    serve_connection(stream, caller, app, header_timeout, shutdown).await
                }
                Some(acceptor) => {
                    // The handshake counts against the header timeout: a
                    // client that stalls in it is cut off like a slow one.
                    let stream = match tokio::time::timeout(header_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "Admin API: TLS handshake failed.");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "Admin API: TLS handshake too slow; closed.");
                            return;
                        }
                    };
                    // rustls has verified any certificate presented against
                    // the cluster CA; one is there only if it passed.
                    let certified = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty());
                    let caller = Caller {
                        address: peer,
                        certified,
                    };
                    serve_connection(stream, caller, app, header_timeout, shutdown).await
                }
            }
        });
    }
}

/// Serve HTTP/1.1 on one connection until it ends or `shutdown`.
async fn serve_connection<I>(
    io: I,
    caller: Caller,
    app: Router,
    header_timeout: std::time::Duration,
    shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(caller);
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, request).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        }
    }
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

#[derive(Deserialize)]
struct ItemsQuery {
    /// The `next` cursor of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

async fn items(
    State(s): State<AppState>,
    q: Result<Query<ItemsQuery>, QueryRejection>,
) -> Result<Json<ItemsView>, AdminError> {
    let Query(q) = q.map_err(bad_query)?;
    let limit = q.limit.unwrap_or(ITEMS_PAGE_MAX).clamp(1, ITEMS_PAGE_MAX);
    let view = s
        .repo
        .blocking(move |repo| {
            let own = repo.own_items()?;
            let mut copies = BTreeMap::new();
            let mut generations = BTreeMap::new();
            for (origin, v) in repo.copies_view() {
                copies.insert(origin.clone(), repo.copies_items(&origin)?);
                generations.insert(origin, v.generation);
            }
            Ok((own, copies, generations))
        })
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?;
    let (own, copies, generations) = view;
    let total = own.len() + copies.values().map(Vec::len).sum::<usize>();
    let after = match q.after.as_deref().map(Cursor::decode) {
        Some(Some(c)) => Some(c),
        Some(None) => {
            return Err(AdminError::BadRequest("unreadable cursor in after=".into()));
        }
        None => None,
    };
    // One list, "own, then each origin's copies", each sorted by item,
    // taken after the cursor: items that finish between two pages shift
    // nothing, so none present throughout is skipped.
    let mut sections: Vec<(Option<String>, Vec<ItemKey>)> = vec![(None, own)];
    sections.extend(copies.into_iter().map(|(o, items)| (Some(o), items)));
    let mut left = limit;
    let mut last: Option<Cursor> = None;
    let mut more = false;
    let mut own_page = Vec::new();
    let mut copies_page: BTreeMap<String, Vec<ItemKey>> = BTreeMap::new();
    for (section, mut items) in sections {
        items.sort_unstable();
        let items: Vec<ItemKey> = match &after {
            Some(c) if section < c.section => continue,
            Some(c) if section == c.section => items.into_iter().filter(|i| *i > c.last).collect(),
            _ => items,
        };
        if items.is_empty() {
            continue;
        }
        if left == 0 {
            more = true;
            break;
        }
        let take: Vec<ItemKey> = items.iter().take(left).cloned().collect();
        left -= take.len();
        more |= take.len() < items.len();
        if let Some(k) = take.last() {
            last = Some(Cursor {
                section: section.clone(),
                last: k.clone(),
            });
        }
        match section {
            None => own_page = take,
            Some(origin) => {
                copies_page.insert(origin, take);
            }
        }
        if more {
            break;
        }
    }
    Ok(Json(ItemsView {
        node: s.node,
        own: own_page,
        copies: copies_page,
        generations,
        total,
        next: if more { last.map(|c| c.encode()) } else { None },
    }))
}

/// Where a page of `/backlog/items` ended: the section (`None`: this
/// server's own items, else an origin) and its last item. Passed back as
/// `after=`, base64url of JSON.
#[derive(Serialize, Deserialize)]
struct Cursor {
    section: Option<String>,
    last: ItemKey,
}

impl Cursor {
    fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(text: &str) -> Option<Cursor> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
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
    q: Result<Query<ItemQuery>, QueryRejection>,
) -> Result<Json<ItemStatus>, AdminError> {
    let Query(q) = q.map_err(bad_query)?;
    let identity = crate::event::Identity {
        source: q.source,
        id: q.id,
    };
    Ok(Json(ItemStatus {
        state: s.repo.item_state(&q.adaptor, &identity),
    }))
}

#[derive(Deserialize)]
struct OverdueQuery {
    limit: Option<usize>,
}

async fn overdue(
    State(s): State<AppState>,
    q: Result<Query<OverdueQuery>, QueryRejection>,
) -> Result<Json<Vec<crate::repository::OverdueItem>>, AdminError> {
    let Query(q) = q.map_err(bad_query)?;
    let t = timeout_peer(&s)?;
    let limit = q
        .limit
        .unwrap_or(api::MAX_ITEMS_PER_CHECK)
        .min(api::MAX_ITEMS_PER_CHECK);
    t.overdue(limit).await.map(Json)
}

fn timeout_peer(s: &AppState) -> Result<&Arc<dyn api::TimeoutPeer>, AdminError> {
    s.timeouts
        .as_ref()
        .ok_or_else(|| AdminError::NotHere("no timeout checks here".into()))
}

async fn park(
    State(s): State<AppState>,
    req: Result<Json<api::ParkRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Vec<(api::ItemRef, api::ParkResult)>>, AdminError> {
    let Json(req) = req.map_err(bad_body)?;
    let t = timeout_peer(&s)?;
    // A task of its own: an asker that goes away (killed mid-check) must
    // not cut a park short between its publish and its removal, or the
    // taker's retry would park the item again.
    let t = t.clone();
    tokio::spawn(async move { t.park(req).await })
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?
        .map(Json)
}

/// What `GET /topology?history=N` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopologyView {
    pub state: crate::topology::State,
    /// The last N changes applied here, oldest first (at most
    /// [`crate::topology::log::HISTORY_MAX`]).
    pub history: Vec<crate::topology::Applied>,
}

#[derive(Deserialize)]
struct TopologyQuery {
    history: Option<usize>,
}

/// `GET /topology`: the state; with `?history=N`, a [`TopologyView`].
async fn topology_state(
    State(s): State<AppState>,
    q: Result<Query<TopologyQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let Query(q) = q.map_err(bad_query)?;
    let Some(t) = &s.topology else {
        return Err(AdminError::NotHere("no topology".into()));
    };
    let state = (*t.state()).clone();
    Ok(match q.history {
        None => Json(state).into_response(),
        Some(n) => Json(TopologyView {
            state,
            history: t.history(n),
        })
        .into_response(),
    })
}

/// What `GET /health/ready` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why not, when not.
    pub reasons: Vec<String>,
}

/// `GET /health/ready`, for orchestrators: 503 with the reasons while this
/// server cannot do its work.
async fn ready(State(s): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let reasons = not_ready_because(&s);
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let ready = reasons.is_empty();
    (status, Json(Readiness { ready, reasons }))
}

fn not_ready_because(s: &AppState) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(h) = &s.health {
        if h.fatal.is_cancelled() {
            reasons.push("repository failed; the server is stopping".to_owned());
        } else if h.stopping.is_cancelled() {
            reasons.push("stopping".to_owned());
        }
    }
    let Some(t) = &s.topology else {
        reasons.push("not joined to the topology".to_owned());
        return reasons;
    };
    if let Some(h) = &s.health {
        let age = t.read_age();
        if age > h.fence_after {
            reasons.push(format!(
                "fenced: cannot read the topology log for {} (broker connection lost?)",
                humantime::format_duration(
                    std::time::Duration::from_millis(age.as_millis() as u64)
                )
            ));
        }
    }
    match t.state().servers.get(&s.node) {
        None => reasons.push("not in the topology".to_owned()),
        Some(me) if me.failed => reasons.push(format!(
            "taken over by {}; rejoining",
            me.taken_over_by.as_deref().unwrap_or("a peer")
        )),
        Some(me) if me.joined_epoch.is_none() => reasons.push("not joined yet".to_owned()),
        Some(_) => {}
    }
    reasons
}

/// Oldest backlog item age above which the state drops.
const OLD_BACKLOG_MS: u64 = 15 * 60 * 1000;

#[derive(Deserialize)]
struct StateQuery {
    /// Look without counting as the monitor's probe: the target error
    /// rate is measured between the monitor's probes only (`/cluster`
    /// asks with `peek=true`).
    #[serde(default)]
    peek: bool,
}

async fn state(
    State(s): State<AppState>,
    q: Result<Query<StateQuery>, QueryRejection>,
) -> Json<StateView> {
    // (An unreadable query is a plain probe.)
    let peek = q.is_ok_and(|Query(q)| q.peek);
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
    let mut uptime_s = None;
    if let Some(h) = &s.health {
        stopping = h.stopping.is_cancelled();
        uptime_s = Some(h.started.elapsed().as_secs());
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
            if !peek {
                *last = (retries, delivered);
            }
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
        uptime_s,
    })
}

async fn stop(State(s): State<AppState>) -> Result<(StatusCode, String), AdminError> {
    match &s.health {
        Some(h) => {
            tracing::info!("Stop requested through the admin API.");
            h.stop_requested.cancel();
            Ok((StatusCode::ACCEPTED, format!("{} is stopping\n", s.node)))
        }
        None => Err(AdminError::NotHere("no stop here".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sent(e: AdminError) -> (u16, Option<String>, serde_json::Value) {
        let response = e.into_response();
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get(axum::http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let json = serde_json::from_slice(&body).expect("JSON");
        (status, challenge, json)
    }

    #[tokio::test]
    async fn every_refusal_is_json_with_its_status() {
        let cases = [
            (AdminError::BadRequest("unreadable cursor".into()), 400),
            (AdminError::Unauthorized("unknown token".into()), 401),
            (
                AdminError::Forbidden {
                    name: "ops".into(),
                    role: "Read".into(),
                },
                403,
            ),
            (AdminError::NotHere("no timeout checks here".into()), 404),
            (AdminError::Refused("check 3 is not under way".into()), 409),
            (AdminError::TooLarge("too big".into()), 413),
            (AdminError::Internal("repository failed".into()), 500),
            (AdminError::TooSlow(std::time::Duration::from_secs(10)), 503),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let (status, challenge, body) = sent(e).await;
            assert_eq!(status, code, "{text}");
            assert_eq!(body, serde_json::json!({ "error": text }));
            assert_eq!(challenge.is_some(), code == 401, "{text}");
        }
        // A peer reads the reason back from the body, or the raw text of
        // an answer that is not one of ours.
        assert_eq!(api::ErrorBody::reason_of(r#"{"error":"fenced"}"#), "fenced");
        assert_eq!(api::ErrorBody::reason_of(" Bad Gateway\n"), "Bad Gateway");
    }
}
