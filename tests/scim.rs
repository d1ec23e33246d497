//! The `scim` target end to end: a real `provring` server, the real
//! RabbitMQ, and a fake SCIM 2.0 service (RFC 7644 `/Users`, in memory,
//! bearer-token auth) that records every request.

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token";
const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
/// `source` of every event the test publishes.
const SOURCE: &str = "/hr/scim-test";
/// How long any one expected effect may take.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The fake SCIM service
// ---------------------------------------------------------------------------

/// One request as the fake service saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    idempotency_key: Option<String>,
    status: u16,
}

#[derive(Default)]
struct Directory {
    /// id → User resource (never with a password).
    users: BTreeMap<String, Map<String, Value>>,
    /// id → password (write-only in SCIM: stored, never returned).
    passwords: HashMap<String, String>,
    next_id: u64,
    requests: Vec<Seen>,
}

impl Directory {
    /// The id of the user called `user_name` (case-insensitive, as
    /// RFC 7643 defines `userName`).
    fn id_of(&self, user_name: &str) -> Option<String> {
        self.users
            .iter()
            .find(|(_, u)| {
                u.get("userName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.eq_ignore_ascii_case(user_name))
            })
            .map(|(id, _)| id.clone())
    }

    /// Whether a user other than `id` already has `user_name`.
    fn taken_by_other(&self, user_name: &str, id: &str) -> bool {
        self.id_of(user_name).is_some_and(|other| other != id)
    }

    /// Store `attrs` as the resource `id` (the password goes aside).
    fn store(&mut self, id: &str, mut attrs: Map<String, Value>) -> Value {
        if let Some(p) = attrs.remove("password") {
            self.passwords
                .insert(id.to_owned(), p.as_str().unwrap_or_default().to_owned());
        }
        attrs.insert("id".into(), json!(id));
        attrs.insert("schemas".into(), json!([USER_SCHEMA]));
        attrs.insert(
            "meta".into(),
            json!({"resourceType": "User", "location": format!("/scim/v2/Users/{id}")}),
        );
        self.users.insert(id.to_owned(), attrs.clone());
        Value::Object(attrs)
    }
}

#[derive(Clone, Default)]
struct FakeScim {
    dir: Arc<Mutex<Directory>>,
}

impl FakeScim {
    /// Serve on 127.0.0.1 (a free port); returns the SCIM base URL.
    async fn start(&self) -> String {
        let app = Router::new()
            .route("/scim/v2/Users", post(create_user).get(list_users))
            .route(
                "/scim/v2/Users/{id}",
                axum::routing::put(replace_user)
                    .patch(patch_user)
                    .delete(delete_user),
            )
            .layer(middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake SCIM service");
        let addr = listener.local_addr().expect("fake SCIM address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/scim/v2")
    }

    /// Put a user in the directory before the test; returns its id.
    fn seed(&self, id: &str, user: Value) -> String {
        let Value::Object(attrs) = user else {
            panic!("a seeded user must be an object");
        };
        self.dir.lock().expect("lock").store(id, attrs);
        id.to_owned()
    }

    /// (id, resource) of `user_name`.
    fn user(&self, user_name: &str) -> Option<(String, Map<String, Value>)> {
        let d = self.dir.lock().expect("lock");
        let id = d.id_of(user_name)?;
        let user = d.users.get(&id)?.clone();
        Some((id, user))
    }

    fn attr(&self, user_name: &str, attr: &str) -> Option<Value> {
        self.user(user_name).and_then(|(_, u)| u.get(attr).cloned())
    }

    fn password(&self, user_name: &str) -> Option<String> {
        let d = self.dir.lock().expect("lock");
        let id = d.id_of(user_name)?;
        d.passwords.get(&id).cloned()
    }

    fn requests(&self) -> Vec<Seen> {
        self.dir.lock().expect("lock").requests.clone()
    }

    /// Whether a lookup `GET /Users?filter=…` for `user_name` was answered.
    fn looked_up(&self, user_name: &str) -> bool {
        self.requests().iter().any(|r| {
            r.method == "GET" && r.status == 200 && filter_of(r).as_deref() == Some(user_name)
        })
    }
}

/// The user name a recorded lookup asked for.
fn filter_of(r: &Seen) -> Option<String> {
    let query = r.query.as_deref()?;
    let filter = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "filter")
        .map(|(_, v)| v.into_owned())?;
    parse_filter(&filter)
}

/// `userName eq "<JSON string>"` → the user name; anything else → None.
fn parse_filter(filter: &str) -> Option<String> {
    let (attr, rest) = filter.trim().split_once(char::is_whitespace)?;
    let (op, value) = rest.trim_start().split_once(char::is_whitespace)?;
    if !attr.eq_ignore_ascii_case("userName") || !op.eq_ignore_ascii_case("eq") {
        return None;
    }
    serde_json::from_str::<String>(value.trim()).ok()
}

fn scim_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/scim+json")],
        body.to_string(),
    )
        .into_response()
}

/// A SCIM error response (RFC 7644 §3.12).
struct ScimError {
    status: StatusCode,
    scim_type: Option<&'static str>,
    detail: String,
}

impl ScimError {
    fn new(status: StatusCode, scim_type: Option<&'static str>, detail: impl Into<String>) -> Self {
        ScimError {
            status,
            scim_type,
            detail: detail.into(),
        }
    }

    fn bad(scim_type: &'static str, detail: impl Into<String>) -> Self {
        ScimError::new(StatusCode::BAD_REQUEST, Some(scim_type), detail)
    }

    fn not_found(id: &str) -> Self {
        ScimError::new(StatusCode::NOT_FOUND, None, format!("no user {id}"))
    }

    fn taken(user_name: &str) -> Self {
        ScimError::new(
            StatusCode::CONFLICT,
            Some("uniqueness"),
            format!("userName {user_name:?} exists"),
        )
    }
}

impl IntoResponse for ScimError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "schemas": [ERROR_SCHEMA],
            "status": self.status.as_u16().to_string(),
            "detail": self.detail,
        });
        if let Some(t) = self.scim_type {
            body["scimType"] = json!(t);
        }
        scim_response(self.status, body)
    }
}

/// Bearer-token check and request log around every route.
async fn guard(State(scim): State<FakeScim>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let headers = request.headers();
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    let response = if authorized {
        next.run(request).await
    } else {
        let mut r =
            ScimError::new(StatusCode::UNAUTHORIZED, None, "bearer token required").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    };
    scim.dir.lock().expect("lock").requests.push(Seen {
        method,
        path,
        query,
        idempotency_key,
        status: response.status().as_u16(),
    });
    response
}

fn object_body(body: &Bytes) -> Result<Map<String, Value>, ScimError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ScimError::bad(
            "invalidSyntax",
            "body must be a JSON object",
        )),
    }
}

fn user_name_of(attrs: &Map<String, Value>) -> Result<String, ScimError> {
    attrs
        .get("userName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ScimError::bad("invalidValue", "userName is required"))
}

/// `POST /Users`: 409 if the userName exists, else 201 with a new id.
async fn create_user(State(scim): State<FakeScim>, body: Bytes) -> Result<Response, ScimError> {
    let attrs = object_body(&body)?;
    let user_name = user_name_of(&attrs)?;
    let mut d = scim.dir.lock().expect("lock");
    if d.id_of(&user_name).is_some() {
        return Err(ScimError::taken(&user_name));
    }
    d.next_id += 1;
    let id = format!("u{:04}", d.next_id);
    let user = d.store(&id, attrs);
    Ok(scim_response(StatusCode::CREATED, user))
}

/// `GET /Users?filter=userName eq "x"` (or every user without a filter).
async fn list_users(
    State(scim): State<FakeScim>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ScimError> {
    let d = scim.dir.lock().expect("lock");
    let resources: Vec<Value> = match params.get("filter") {
        None => d.users.values().cloned().map(Value::Object).collect(),
        Some(filter) => {
            let user_name = parse_filter(filter).ok_or_else(|| {
                ScimError::bad("invalidFilter", format!("unsupported filter {filter:?}"))
            })?;
            d.id_of(&user_name)
                .and_then(|id| d.users.get(&id).cloned())
                .map(Value::Object)
                .into_iter()
                .collect()
        }
    };
    Ok(scim_response(
        StatusCode::OK,
        json!({
            "schemas": [LIST_SCHEMA],
            "totalResults": resources.len(),
            "startIndex": 1,
            "itemsPerPage": resources.len(),
            "Resources": resources,
        }),
    ))
}

/// `PUT /Users/{id}`: replace the resource.
async fn replace_user(
    State(scim): State<FakeScim>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ScimError> {
    let attrs = object_body(&body)?;
    let user_name = user_name_of(&attrs)?;
    let mut d = scim.dir.lock().expect("lock");
    if !d.users.contains_key(&id) {
        return Err(ScimError::not_found(&id));
    }
    if d.taken_by_other(&user_name, &id) {
        return Err(ScimError::taken(&user_name));
    }
    let user = d.store(&id, attrs);
    Ok(scim_response(StatusCode::OK, user))
}

/// Set `path` (an attribute, or `attr.sub`) of `user` to `value`.
fn set_path(user: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), ScimError> {
    match path.split_once('.') {
        None if !path.is_empty() => {
            user.insert(path.to_owned(), value);
            Ok(())
        }
        Some((attr, sub)) if !attr.is_empty() && !sub.is_empty() && !sub.contains('.') => {
            let entry = user
                .entry(attr.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(complex) = entry else {
                return Err(ScimError::bad(
                    "invalidPath",
                    format!("{attr} is not a complex attribute"),
                ));
            };
            complex.insert(sub.to_owned(), value);
            Ok(())
        }
        _ => Err(ScimError::bad(
            "invalidPath",
            format!("unsupported path {path:?}"),
        )),
    }
}

/// `PATCH /Users/{id}`: PatchOp `add`/`replace` with a path, or without a
/// path and an object value whose attributes are merged in.
async fn patch_user(
    State(scim): State<FakeScim>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ScimError> {
    let patch = object_body(&body)?;
    let is_patch_op = patch
        .get("schemas")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().any(|v| v == PATCH_SCHEMA));
    if !is_patch_op {
        return Err(ScimError::bad("invalidSyntax", "schemas must name PatchOp"));
    }
    let ops = patch
        .get("Operations")
        .and_then(Value::as_array)
        .ok_or_else(|| ScimError::bad("invalidSyntax", "Operations missing"))?;
    let mut d = scim.dir.lock().expect("lock");
    let mut user = d
        .users
        .get(&id)
        .cloned()
        .ok_or_else(|| ScimError::not_found(&id))?;
    let mut password = None;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if kind != "replace" && kind != "add" {
            return Err(ScimError::bad(
                "invalidSyntax",
                format!("unsupported op {kind:?}"),
            ));
        }
        let value = op
            .get("value")
            .cloned()
            .ok_or_else(|| ScimError::bad("invalidValue", "value missing"))?;
        match op.get("path").and_then(Value::as_str) {
            Some(p) if p.eq_ignore_ascii_case("password") => match value {
                Value::String(p) => password = Some(p),
                _ => return Err(ScimError::bad("invalidValue", "password must be a string")),
            },
            Some(p) => set_path(&mut user, p, value)?,
            None => {
                let Value::Object(attrs) = value else {
                    return Err(ScimError::bad(
                        "invalidValue",
                        "an operation without path needs an object value",
                    ));
                };
                for (k, v) in attrs {
                    if k.eq_ignore_ascii_case("password") {
                        password = v.as_str().map(str::to_owned);
                    } else {
                        user.insert(k, v);
                    }
                }
            }
        }
    }
    let user_name = user_name_of(&user)?;
    if d.taken_by_other(&user_name, &id) {
        return Err(ScimError::taken(&user_name));
    }
    if let Some(p) = password {
        user.insert("password".into(), json!(p));
    }
    let user = d.store(&id, user);
    Ok(scim_response(StatusCode::OK, user))
}

/// `DELETE /Users/{id}`: 204, or 404 if there is no such user.
async fn delete_user(
    State(scim): State<FakeScim>,
    Path(id): Path<String>,
) -> Result<StatusCode, ScimError> {
    let mut d = scim.dir.lock().expect("lock");
    if d.users.remove(&id).is_none() {
        return Err(ScimError::not_found(&id));
    }
    d.passwords.remove(&id);
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------
// Test helpers
// ---------------------------------------------------------------------------

/// Cluster file: server `a` hosts adaptor `hr` (provisioning, queue `hr`)
/// and adaptor `passwords` (password, queue `passwords`), both → the fake
/// SCIM service.
fn write_config(dir: &std::path::Path, namespace: &str, scim_base: &str) -> std::path::PathBuf {
    let toml = format!(
        r#"
[broker]
uris = [{uri:?}]
namespace = {namespace:?}
prefetch = 100
reconnect_min = "100ms"
reconnect_max = "1s"
publish_timeout = "5s"

[servers.a]
admin_listen = "127.0.0.1:0"
data_dir = {data:?}

[adaptors.hr]
kind = "provisioning"
queue = "hr"
server = "a"
target = "scim"
concurrency = 4

[adaptors.passwords]
kind = "password"
queue = "passwords"
server = "a"
target = "scim"
concurrency = 2

[targets.scim]
kind = "scim"
url = {scim_base:?}
timeout = "2s"
allow_insecure_http = true
[targets.scim.auth]
bearer_token = {TOKEN:?}

[retry]
attempts = 100
initial_backoff = "100ms"
max_backoff = "1s"
deadline = "10m"

[shutdown]
grace = "5s"

{security}
"#,
        uri = amqp_uri(),
        security = security_section(dir),
        data = dir.join("data-a").display().to_string(),
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, toml).expect("write cluster.toml");
    path
}

/// A CloudEvents 1.0 body (structured JSON) of `type` `io.provring.<kind>`.
fn event(id: &str, kind: &str, data: Value) -> Vec<u8> {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": SOURCE,
        "type": format!("io.provring.{kind}"),
        "time": "2026-11-22T09:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    })
    .to_string()
    .into_bytes()
}

/// Drain the parking queue into `parked` until `pred` holds for one of
/// them, or panic after `within`.
async fn wait_parked(
    config: &provring::config::Config,
    parked: &mut Vec<(Vec<u8>, String)>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Value, &str) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        parked.extend(drain_parking(config).await);
        if parked.iter().any(|(body, reason)| {
            serde_json::from_slice::<Value>(body).is_ok_and(|b| pred(&b, reason))
        }) {
            return;
        }
        let reasons: Vec<&str> = parked.iter().map(|(_, r)| r.as_str()).collect();
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}; parked so far: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/// Create (fresh and pre-existing), update, disable, enable, password
/// change and delete reach the SCIM service with their effect; a delete of
/// an unknown user is done; an update of an unknown user is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_users_at_a_scim_service() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let scim = FakeScim::default();
    let bob_id = scim.seed(
        "pre-bob",
        json!({
            "userName": "bob",
            "displayName": "Old Bob",
            "title": "Intern",
            "active": false,
        }),
    );
    let base = scim.start().await;

    // The fake service itself refuses requests without the right token.
    let http = reqwest::Client::new();
    let no_token = http
        .get(format!("{base}/Users"))
        .send()
        .await
        .expect("GET without token");
    assert_eq!(no_token.status().as_u16(), 401, "no token must be refused");
    let wrong_token = http
        .get(format!("{base}/Users"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("GET with a wrong token");
    assert_eq!(
        wrong_token.status().as_u16(),
        401,
        "a wrong token must be refused"
    );
    let probes = scim.requests().len();

    let ns = namespace("scim");
    let cfg_path = write_config(dir.path(), &ns, &base);
    let cfg = load(&cfg_path);
    let mut server = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    let mut parked = Vec::new();

    // Step 1, different users at once: a new user, a user the service
    // already has, a delete of an unknown user, an update of an unknown user.
    publish(
        &cfg.broker,
        "hr",
        vec![
            event(
                "alice-create",
                "account.create",
                json!({
                    "userName": "alice",
                    "externalId": "E2001",
                    "name": {"givenName": "Alice", "familyName": "Liddell"},
                    "displayName": "Alice Liddell",
                    "emails": [{"value": "alice@example.com", "primary": true}],
                    "title": "Engineer",
                    "active": true,
                    "password": "not-via-create",
                }),
            ),
            event(
                "bob-create",
                "account.create",
                json!({
                    "userName": "bob",
                    "externalId": "E2002",
                    "displayName": "Bob Builder",
                    "active": true,
                }),
            ),
            event(
                "ghost-delete",
                "account.delete",
                json!({"userName": "ghost"}),
            ),
            event(
                "nobody-update",
                "account.update",
                json!({"userName": "nobody", "title": "Nobody"}),
            ),
            // An AD-style name: the lookup filter must escape the backslash.
            event(
                "domain-create",
                "account.create",
                json!({"userName": "CORP\\jdoe", "displayName": "J. Doe"}),
            ),
            // Published with its create: per-account ordering runs it after.
            event(
                "domain-disable",
                "account.disable",
                json!({"userName": "CORP\\jdoe"}),
            ),
        ],
    )
    .await;

    eventually(WAIT, "alice created", || scim.user("alice").is_some()).await;
    let (alice_id, alice) = scim.user("alice").expect("alice exists");
    assert_eq!(alice["externalId"], "E2001");
    assert_eq!(alice["name"]["givenName"], "Alice");
    assert_eq!(alice["name"]["familyName"], "Liddell");
    assert_eq!(alice["displayName"], "Alice Liddell");
    assert_eq!(alice["emails"][0]["value"], "alice@example.com");
    assert_eq!(alice["title"], "Engineer");
    assert_eq!(alice["active"], true);
    assert_eq!(
        scim.password("alice"),
        None,
        "a create event's password must not be sent"
    );

    eventually(WAIT, "bob replaced via PUT", || {
        scim.attr("bob", "displayName") == Some(json!("Bob Builder"))
    })
    .await;
    let (id, bob) = scim.user("bob").expect("bob exists");
    assert_eq!(id, bob_id, "bob keeps the service's id");
    assert_eq!(bob["externalId"], "E2002");
    assert_eq!(bob["active"], true);
    assert!(
        bob.get("title").is_none(),
        "PUT replaces the whole resource: {bob:?}"
    );
    {
        let reqs = scim.requests();
        let conflicts = reqs
            .iter()
            .filter(|r| r.method == "POST" && r.status == 409)
            .count();
        assert_eq!(conflicts, 1, "bob's POST answered 409: {reqs:#?}");
        assert!(
            reqs.iter()
                .any(|r| r.method == "PUT" && r.path == format!("/scim/v2/Users/{bob_id}")),
            "bob replaced with PUT /Users/{bob_id}: {reqs:#?}"
        );
        assert!(scim.looked_up("bob"), "bob looked up after 409: {reqs:#?}");
    }

    eventually(WAIT, "ghost looked up", || scim.looked_up("ghost")).await;
    eventually(WAIT, "CORP\\jdoe created, then disabled", || {
        scim.attr("CORP\\jdoe", "active") == Some(json!(false))
    })
    .await;

    wait_parked(
        &cfg,
        &mut parked,
        WAIT,
        "update of an unknown user parked",
        |body, _| body["id"] == "nobody-update",
    )
    .await;
    let (_, reason) = parked
        .iter()
        .find(|(b, _)| serde_json::from_slice::<Value>(b).is_ok_and(|b| b["id"] == "nobody-update"))
        .expect("nobody-update parked");
    assert!(
        reason.contains("no user") && !reason.contains("nobody"),
        "the reason says what is wrong without naming the account: {reason}"
    );

    // Steps 2-6: one user's events in order, each after the previous one's effect.
    publish(
        &cfg.broker,
        "hr",
        vec![event(
            "alice-update",
            "account.update",
            json!({"userName": "alice", "title": "Senior Engineer", "displayName": "Alice A. Liddell"}),
        )],
    )
    .await;
    eventually(WAIT, "alice updated", || {
        scim.attr("alice", "title") == Some(json!("Senior Engineer"))
    })
    .await;
    let (_, alice) = scim.user("alice").expect("alice exists");
    assert_eq!(alice["displayName"], "Alice A. Liddell");
    assert_eq!(
        alice["emails"][0]["value"], "alice@example.com",
        "attributes not in the update stay"
    );
    assert_eq!(alice["name"]["givenName"], "Alice");

    publish(
        &cfg.broker,
        "hr",
        vec![event(
            "alice-disable",
            "account.disable",
            json!({"userName": "alice"}),
        )],
    )
    .await;
    eventually(WAIT, "alice disabled", || {
        scim.attr("alice", "active") == Some(json!(false))
    })
    .await;

    publish(
        &cfg.broker,
        "hr",
        vec![event(
            "alice-enable",
            "account.enable",
            json!({"userName": "alice"}),
        )],
    )
    .await;
    eventually(WAIT, "alice enabled", || {
        scim.attr("alice", "active") == Some(json!(true))
    })
    .await;

    let new_password = "correct horse battery staple";
    publish(
        &cfg.broker,
        "passwords",
        vec![event(
            "alice-password",
            "password.change",
            json!({"userName": "alice", "password": new_password}),
        )],
    )
    .await;
    eventually(WAIT, "alice's password set", || {
        scim.password("alice").as_deref() == Some(new_password)
    })
    .await;
    assert!(
        scim.attr("alice", "password").is_none(),
        "the fake service never returns passwords"
    );

    publish(
        &cfg.broker,
        "hr",
        vec![event(
            "alice-delete",
            "account.delete",
            json!({"userName": "alice"}),
        )],
    )
    .await;
    eventually(WAIT, "alice deleted", || scim.user("alice").is_none()).await;

    // Stop (the call blocks: let the runtime's other tasks move away).
    let status = tokio::task::block_in_place(|| server.stop(WAIT));
    assert!(
        status.success(),
        "server exited with {status}; log:\n{}",
        server.log_text()
    );

    let reqs = scim.requests();
    assert!(
        reqs.iter().any(|r| r.method == "DELETE"
            && r.path == format!("/scim/v2/Users/{alice_id}")
            && r.status == 204),
        "alice deleted with DELETE /Users/{alice_id}: {reqs:#?}"
    );
    assert!(
        !reqs.iter().any(|r| r.method == "DELETE" && r.status == 404),
        "no DELETE of a missing user: {reqs:#?}"
    );
    let unauthorized = reqs.iter().filter(|r| r.status == 401).count();
    assert_eq!(
        unauthorized, 2,
        "only the test's own probes lack the token: {reqs:#?}"
    );
    for r in reqs.iter().skip(probes) {
        if r.method != "GET" {
            let key = r.idempotency_key.as_deref().unwrap_or_default();
            assert!(
                key.starts_with(&format!("{SOURCE}|")),
                "{} {} without the event identity as idempotency key: {key:?}",
                r.method,
                r.path
            );
        }
    }
    assert_eq!(
        repository_items(&dir.path().join("data-a")).await,
        0,
        "every event finished"
    );
    parked.extend(drain_parking(&cfg).await);
    let parked_ids: Vec<String> = parked
        .iter()
        .map(|(b, r)| {
            let id = serde_json::from_slice::<Value>(b)
                .map(|b| b["id"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            format!("{id}: {r}")
        })
        .collect();
    assert_eq!(
        parked.len(),
        1,
        "only the update of the unknown user is parked (the delete of one is done): {parked_ids:#?}"
    );
    cleanup(&cfg.broker, &["hr", "passwords"]).await;
    println!(
        "scim: {} requests at the fake service; {:.1} s",
        reqs.len(),
        started.elapsed().as_secs_f64()
    );
}
