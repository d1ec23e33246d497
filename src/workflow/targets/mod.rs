//! Targets: the systems a workflow delivers to. The one open seam of the
//! server: a [`Target`] takes an event and says whether it was applied, and
//! if not, whether a retry can help.

mod scim;
mod webhook;

pub use scim::ScimTarget;
pub use webhook::WebhookTarget;

use crate::config::{AuthConfig, TargetConfig, TargetKind};
use crate::event::{EventType, Identity};
use futures::future::BoxFuture;
use std::sync::Arc;

/// What a target needs from an item.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub identity: &'a Identity,
    pub event_type: EventType,
    /// The event JSON as received.
    pub body: &'a str,
    /// The delivering server (sent as `X-Provring-Node`).
    pub node: &'a str,
}

/// A failed delivery.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    /// A retry may succeed (timeouts, 5xx, 408, 429, connection errors).
    #[error("{0}")]
    Transient(String),
    /// A retry will not help (other 4xx, unusable event).
    #[error("{0}")]
    Permanent(String),
}

/// A system that events are delivered to.
pub trait Target: Send + Sync {
    /// Apply `delivery`, using its identity as idempotency key.
    fn deliver<'a>(&'a self, delivery: Delivery<'a>) -> BoxFuture<'a, Result<(), TargetError>>;
}

/// Build the target described by `config`.
pub fn build(name: &str, config: &TargetConfig) -> Result<Arc<dyn Target>, String> {
    let url = || {
        config
            .url
            .clone()
            .ok_or_else(|| format!("targets.{name}.url is required"))
    };
    Ok(match config.kind {
        TargetKind::Null => Arc::new(NullTarget),
        TargetKind::Webhook => Arc::new(WebhookTarget::new(
            url()?,
            http_client(config)?,
            Auth::from_config(config.auth.as_ref())?,
        )),
        TargetKind::Scim => Arc::new(ScimTarget::new(
            url()?,
            http_client(config)?,
            Auth::from_config(config.auth.as_ref())?,
        )),
    })
}

/// Accepts everything (benchmarks).
pub struct NullTarget;

impl Target for NullTarget {
    fn deliver<'a>(&'a self, _: Delivery<'a>) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async { Ok(()) })
    }
}

fn http_client(config: &TargetConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .pool_max_idle_per_host(64)
        .user_agent(concat!("provring/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// Resolved credentials. `Debug` never shows them.
#[derive(Clone)]
pub enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::None => "Auth::None",
            Auth::Bearer(_) => "Auth::Bearer(<redacted>)",
            Auth::Basic(..) => "Auth::Basic(<redacted>)",
        })
    }
}

impl Auth {
    pub fn from_config(config: Option<&AuthConfig>) -> Result<Auth, String> {
        let Some(c) = config else {
            return Ok(Auth::None);
        };
        if let Some(token) = &c.bearer_token {
            return Ok(Auth::Bearer(token.clone()));
        }
        if let Some(path) = &c.bearer_token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read bearer token file {}: {e}", path.display()))?;
            return Ok(Auth::Bearer(token.trim().to_owned()));
        }
        match (&c.username, &c.password) {
            (Some(u), Some(p)) => Ok(Auth::Basic(u.clone(), p.clone())),
            _ => Ok(Auth::None),
        }
    }

    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic(u, p) => request.basic_auth(u, Some(p)),
        }
    }
}

/// Classify an HTTP status: `None` for success.
pub fn classify_status(status: reqwest::StatusCode, context: &str) -> Option<TargetError> {
    if status.is_success() {
        return None;
    }
    let msg = format!("{context} answered HTTP {status}");
    let code = status.as_u16();
    if code == 408 || code == 429 || status.is_server_error() {
        Some(TargetError::Transient(msg))
    } else {
        Some(TargetError::Permanent(msg))
    }
}

/// Classify a transport error (always transient: the request may not have
/// reached the target, and the idempotency key makes a retry safe).
pub fn classify_transport(error: &reqwest::Error, context: &str) -> TargetError {
    let what = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    // reqwest's Display may include the URL but never headers or bodies.
    TargetError::Transient(format!("{context} {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn statuses_are_classified() {
        assert!(classify_status(StatusCode::OK, "x").is_none());
        assert!(classify_status(StatusCode::NO_CONTENT, "x").is_none());
        for transient in [408, 429, 500, 502, 503, 504] {
            let s = StatusCode::from_u16(transient).expect("status");
            assert!(matches!(
                classify_status(s, "x"),
                Some(TargetError::Transient(_))
            ));
        }
        for permanent in [400, 401, 403, 404, 409, 422] {
            let s = StatusCode::from_u16(permanent).expect("status");
            assert!(matches!(
                classify_status(s, "x"),
                Some(TargetError::Permanent(_))
            ));
        }
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = Auth::Bearer("s3cret".into());
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
