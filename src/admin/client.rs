//! `provring backlog`: ask servers' admin APIs for their backlog.

use super::BacklogView;
use crate::config::Config;
use crate::tls::TlsError;
use std::path::PathBuf;
use std::time::Duration;

/// Why a command or a peer could not ask a server's admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("node {node:?} is not in the configuration; known servers: {known}")]
    UnknownNode { node: String, known: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the HTTP client: {0}")]
    Build(reqwest::Error),
    #[error("cannot read token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("cannot reach {node} at {address}: {source}")]
    Unreachable {
        node: String,
        address: String,
        source: reqwest::Error,
    },
    /// The server answered with a refusal; the text says what to do.
    #[error("{0}")]
    Refused(String),
    #[error("{node} answered with a body that cannot be read: {source}")]
    Unreadable {
        node: String,
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The reason without the server's name and address, for a line
    /// that already names them.
    fn why(&self) -> String {
        match self {
            ClientError::Unreachable { source, .. } => source.to_string(),
            other => other.to_string(),
        }
    }
}

/// One server's answer, or why there is none.
pub struct ServerBacklog {
    pub node: String,
    pub address: String,
    pub view: Result<BacklogView, ClientError>,
    /// For a server that did not answer, what the topology (as a server
    /// that did answer knows it) says of it: stopped on purpose, or failed
    /// and taken over by whom.
    pub standing: Option<String>,
}

/// What the topology says of a server that does not answer.
fn standing(state: &crate::topology::State, node: &str) -> Option<String> {
    let s = state.servers.get(node)?;
    if s.failed {
        Some(match &s.taken_over_by {
            Some(by) => format!("failed; taken over by {by}"),
            None => "failed; taken over".to_owned(),
        })
    } else if s.stopping {
        Some("stopped on purpose".to_owned())
    } else {
        None
    }
}

pub struct BacklogReport {
    pub servers: Vec<ServerBacklog>,
}

impl BacklogReport {
    pub fn all_reachable(&self) -> bool {
        self.servers.iter().all(|s| s.view.is_ok())
    }

    pub fn render(&self, json: bool) -> String {
        if json {
            let items: Vec<serde_json::Value> = self
                .servers
                .iter()
                .map(|s| match &s.view {
                    Ok(v) => serde_json::json!({"node": s.node, "address": s.address, "adaptors": v.adaptors, "copies": v.copies}),
                    Err(e) => serde_json::json!({"node": s.node, "address": s.address, "error": e.why(), "standing": s.standing}),
                })
                .collect();
            return serde_json::Value::Array(items).to_string();
        }
        let mut out = format!(
            "{:<12} {:<16} {:>10} {:>14}",
            "server", "adaptor", "items", "oldest"
        );
        for s in &self.servers {
            match &s.view {
                Err(e) => match &s.standing {
                    Some(standing) => out.push_str(&format!(
                        "\n{:<12} {standing} (no answer at {})",
                        s.node, s.address
                    )),
                    None => out.push_str(&format!(
                        "\n{:<12} unreachable at {}: {}",
                        s.node,
                        s.address,
                        e.why()
                    )),
                },
                Ok(v) if v.adaptors.is_empty() && v.copies.is_empty() => out.push_str(&format!(
                    "\n{:<12} {:<16} {:>10} {:>14}",
                    s.node, "-", 0, "-"
                )),
                Ok(v) => {
                    for a in &v.adaptors {
                        let age =
                            humantime::format_duration(Duration::from_secs(a.oldest_age_ms / 1000));
                        out.push_str(&format!(
                            "\n{:<12} {:<16} {:>10} {:>14}",
                            s.node,
                            a.adaptor,
                            a.items,
                            age.to_string()
                        ));
                    }
                    for c in &v.copies {
                        let age =
                            humantime::format_duration(Duration::from_secs(c.oldest_age_ms / 1000));
                        out.push_str(&format!(
                            "\n{:<12} {:<16} {:>10} {:>14}",
                            s.node,
                            format!("copies of {}", c.origin),
                            c.items,
                            if c.items == 0 {
                                "-".to_string()
                            } else {
                                age.to_string()
                            }
                        ));
                    }
                }
            }
        }
        out
    }
}

/// A client builder whose requests present `token` as a bearer token
/// (the header is marked sensitive, so it is never logged).
pub fn builder_with_token(token: Option<&str>) -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token
        && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
    {
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    // No proxy from the environment: tokens go to the admin address only.
    reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
}

/// The URL of `path` on the admin API at `address`: `https://` when
/// `[admin.tls]` is set.
pub fn admin_url(config: &Config, address: &str, path: &str) -> String {
    let scheme = if config.admin.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{address}{path}")
}

/// With `[admin.tls]`: trust only the cluster CA, and present this
/// server's certificate when `present` (mutual TLS).
fn with_admin_tls(
    builder: reqwest::ClientBuilder,
    config: &Config,
    present: bool,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let Some(t) = &config.admin.tls else {
        return Ok(builder);
    };
    let files = crate::tls::ClientFiles {
        prefix: "admin.tls",
        ca_file: Some(&t.ca_file),
        identity: present.then_some((t.cert_file.as_path(), t.key_file.as_path())),
    };
    let mut tls = crate::tls::client_config(&files)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(builder.tls_backend_preconfigured(tls))
}

/// The client a server of the cluster calls its peers with: the peer
/// token, and with `[admin.tls]` the server's certificate. Built once at
/// start (certificate files renamed later do not stop the supervisor or a
/// singleton taken over days after); each caller sets its own timeout per
/// request.
pub fn peer_client(
    config: &Config,
    keys: &crate::crypto::KeyRing,
) -> Result<reqwest::Client, ClientError> {
    with_admin_tls(
        builder_with_token(keys.peer_tokens().first().map(String::as_str)),
        config,
        true,
    )?
    .build()
    .map_err(ClientError::Build)
}

/// A client builder for a command (`provring backlog`, `stop`) presenting
/// `token`. With `[admin.tls]` it trusts the cluster CA, and presents the
/// server certificate of `[admin.tls]` where it is readable (as the peer
/// token is where the key file is).
pub fn command_builder(
    config: &Config,
    token: Option<&str>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let readable = config.admin.tls.as_ref().is_some_and(|t| {
        crate::tls::certificates("admin.tls.cert_file", &t.cert_file).is_ok()
            && crate::tls::private_key("admin.tls.key_file", &t.key_file).is_ok()
    });
    with_admin_tls(builder_with_token(token), config, readable)
}

/// The token a command presents: from `--token-file`, else
/// `PROVRING_TOKEN`, else the cluster key's peer token if the key file is
/// readable here, else none.
pub fn command_token(
    config: &Config,
    token_file: Option<&std::path::Path>,
) -> Result<Option<String>, ClientError> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(path).map_err(|source| ClientError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim().to_owned();
        if token.is_empty() {
            return Err(ClientError::EmptyToken {
                path: path.to_owned(),
            });
        }
        return Ok(Some(token));
    }
    if let Ok(t) = std::env::var("PROVRING_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(Some(t.trim().to_owned()));
    }
    Ok(config
        .security
        .key_ring()
        .ok()
        .and_then(|k| k.peer_tokens().into_iter().next()))
}

/// An admin API's refusal, with what to do about it, and the server's
/// reason when it gave one.
async fn refused(config: &Config, node: &str, response: reqwest::Response) -> ClientError {
    let status = response.status();
    let reason = super::api::ErrorBody::reason_of(&response.text().await.unwrap_or_default());
    let text = match status.as_u16() {
        401 if config.admin.tls.is_some() => format!(
            "{node} answered 401: give an operator token (--token-file or PROVRING_TOKEN), or run where \
             security.key_file and admin.tls.cert_file/key_file are readable (the peer token needs the certificate)"
        ),
        401 => format!(
            "{node} answered 401: give a token (--token-file or PROVRING_TOKEN), or run where security.key_file is readable"
        ),
        403 => format!(
            "{node} answered 403: the token's role does not allow this (stop needs operate)"
        ),
        _ if reason.is_empty() => format!("{node} answered HTTP {status}"),
        _ => format!("{node} answered HTTP {status}: {reason}"),
    };
    ClientError::Refused(text)
}

/// `node` of `config`, or the error naming the known servers.
fn server<'a>(
    config: &'a Config,
    node: &str,
) -> Result<&'a crate::config::ServerConfig, ClientError> {
    config
        .servers
        .get(node)
        .ok_or_else(|| ClientError::UnknownNode {
            node: node.to_owned(),
            known: config.server_names(),
        })
}

/// Why a `GET /state` got no state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no answer in time")]
    Timeout,
    #[error("connection refused")]
    Refused,
    #[error("{0}")]
    Request(reqwest::Error),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("unreadable state: {0}")]
    Unreadable(reqwest::Error),
}

/// `GET /state` of `url` (a server's admin API) within `within`: what the
/// supervisor probes and `GET /cluster` shows.
pub async fn get_state(
    client: &reqwest::Client,
    url: &str,
    within: Duration,
) -> Result<super::StateView, StateError> {
    let response = client.get(url).timeout(within).send().await.map_err(|e| {
        if e.is_timeout() {
            StateError::Timeout
        } else if e.is_connect() {
            StateError::Refused
        } else {
            StateError::Request(e)
        }
    })?;
    if !response.status().is_success() {
        return Err(StateError::Status(response.status()));
    }
    response.json().await.map_err(StateError::Unreadable)
}

/// Ask every server (or `only` one) of `config`.
pub async fn backlog(
    config: &Config,
    only: Option<&str>,
    token: Option<&str>,
) -> Result<BacklogReport, ClientError> {
    if let Some(node) = only {
        server(config, node)?;
    }
    let client = command_builder(config, token)?
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(ClientError::Build)?;
    let mut servers = Vec::new();
    for (node, s) in &config.servers {
        if only.is_some_and(|o| o != node) {
            continue;
        }
        let url = admin_url(config, &s.admin_listen, "/backlog");
        let view = async {
            let response =
                client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|source| ClientError::Unreachable {
                        node: node.clone(),
                        address: s.admin_listen.clone(),
                        source,
                    })?;
            if !response.status().is_success() {
                return Err(refused(config, node, response).await);
            }
            response
                .json::<BacklogView>()
                .await
                .map_err(|source| ClientError::Unreadable {
                    node: node.clone(),
                    source,
                })
        }
        .await;
        servers.push(ServerBacklog {
            node: node.clone(),
            address: s.admin_listen.clone(),
            view,
            standing: None,
        });
    }
    if servers.iter().any(|s| s.view.is_err())
        && let Some(state) = topology_of_any(&client, config).await
    {
        for s in servers.iter_mut().filter(|s| s.view.is_err()) {
            s.standing = standing(&state, &s.node);
        }
    }
    Ok(BacklogReport { servers })
}

/// The topology as the first server that answers knows it.
async fn topology_of_any(
    client: &reqwest::Client,
    config: &Config,
) -> Option<crate::topology::State> {
    for s in config.servers.values() {
        let url = admin_url(config, &s.admin_listen, "/topology");
        let answer = client.get(&url).send().await;
        let Ok(response) = answer.and_then(reqwest::Response::error_for_status) else {
            continue;
        };
        if let Ok(state) = response.json().await {
            return Some(state);
        }
    }
    None
}

/// Ask server `node` to stop (`POST /stop`).
pub async fn stop(config: &Config, node: &str, token: Option<&str>) -> Result<String, ClientError> {
    let server = server(config, node)?;
    let url = admin_url(config, &server.admin_listen, "/stop");
    let response = command_builder(config, token)?
        .build()
        .map_err(ClientError::Build)?
        .post(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|source| ClientError::Unreachable {
            node: node.to_owned(),
            address: server.admin_listen.clone(),
            source,
        })?;
    if !response.status().is_success() {
        return Err(refused(config, node, response).await);
    }
    Ok(format!(
        "{node} is stopping: it announces the stop in the topology log (no takeover) and exits once its in-flight work is done"
    ))
}
