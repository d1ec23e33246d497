//! Targets: the systems a workflow delivers to. The one open seam of the
//! server: a [`Target`] takes an event and says whether it was applied, and
//! if not, whether a retry can help.

pub mod http;
mod scim;
mod webhook;

pub use http::{Gate, HttpClient, open_gate};
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
    /// The fence stopped the request at the socket: this server may not
    /// deliver for the adaptor now. No attempt.
    #[error("{0}")]
    Fenced(String),
}

/// A system that events are delivered to.
pub trait Target: Send + Sync {
    /// Apply `delivery`, using its identity as idempotency key.
    fn deliver<'a>(&'a self, delivery: Delivery<'a>) -> BoxFuture<'a, Result<(), TargetError>>;
}

/// Build the target described by `config`; its requests leave only while
/// `gate` is open (see [`http`]).
/// Why a target cannot be built from its section of the cluster file.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("targets.{target}.url is required")]
    NoUrl { target: String },
    #[error("targets.{target}.url: {url:?} is not a URL ({source})")]
    BadUrl {
        target: String,
        url: String,
        source: url::ParseError,
    },
    #[error("targets.{target}.url: credentials in the URL are not sent; use targets.{target}.auth")]
    CredentialsInUrl { target: String },
    /// A certificate or key file of `[targets.<name>.tls]`
    /// ([`crate::tls::client_config`] names the key and file).
    #[error(transparent)]
    Tls(Box<crate::tls::TlsError>),
    #[error("cannot load the TLS root certificates: {0}")]
    PlatformRoots(rustls::Error),
    #[error("cannot read bearer token file {path}: {source}")]
    TokenFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("auth {what}: holds a character not allowed in an HTTP header")]
    BadHeader { what: &'static str },
}

pub fn build(name: &str, config: &TargetConfig, gate: Gate) -> Result<Arc<dyn Target>, BuildError> {
    // The URL as `url` normalises it (IDN hosts in punycode, the path
    // percent-encoded), which is what an HTTP request line can carry.
    let url = || {
        let text = config.url.as_deref().ok_or_else(|| BuildError::NoUrl {
            target: name.to_owned(),
        })?;
        let url = url::Url::parse(text).map_err(|source| BuildError::BadUrl {
            target: name.to_owned(),
            url: text.to_owned(),
            source,
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(BuildError::CredentialsInUrl {
                target: name.to_owned(),
            });
        }
        Ok::<String, BuildError>(url.into())
    };
    let prefix = format!("targets.{name}.tls");
    let tls = config.tls.as_ref().map(|t| crate::tls::ClientFiles {
        prefix: &prefix,
        ca_file: t.ca_file.as_deref(),
        identity: t.cert_file.as_deref().zip(t.key_file.as_deref()),
    });
    Ok(match config.kind {
        TargetKind::Null => Arc::new(NullTarget),
        TargetKind::Webhook => Arc::new(WebhookTarget::new(
            url()?,
            HttpClient::new(config.timeout, tls.as_ref(), gate)?,
            Auth::from_config(config.auth.as_ref())?,
        )),
        TargetKind::Scim => Arc::new(ScimTarget::new(
            url()?,
            HttpClient::new(config.timeout, tls.as_ref(), gate)?,
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

/// Resolved credentials: the `Authorization` header value, marked
/// sensitive. `Debug` never shows it.
#[derive(Clone)]
pub struct Auth(Option<::http::HeaderValue>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            None => "Auth(none)",
            Some(_) => "Auth(<redacted>)",
        })
    }
}

impl Auth {
    pub fn from_config(config: Option<&AuthConfig>) -> Result<Auth, BuildError> {
        use base64::Engine;
        let Some(c) = config else {
            return Ok(Auth(None));
        };
        let (value, what) = if let Some(token) = &c.bearer_token {
            (format!("Bearer {}", token.trim()), "bearer_token")
        } else if let Some(path) = &c.bearer_token_file {
            let token = std::fs::read_to_string(path).map_err(|source| BuildError::TokenFile {
                path: path.clone(),
                source,
            })?;
            (format!("Bearer {}", token.trim()), "bearer_token_file")
        } else if let (Some(u), Some(p)) = (&c.username, &c.password) {
            let pair = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            (format!("Basic {pair}"), "username/password")
        } else {
            return Ok(Auth(None));
        };
        let mut header =
            ::http::HeaderValue::try_from(value).map_err(|_| BuildError::BadHeader { what })?;
        header.set_sensitive(true);
        Ok(Auth(Some(header)))
    }

    /// Add the `Authorization` header, if any.
    pub fn apply(&self, request: ::http::request::Builder) -> ::http::request::Builder {
        match &self.0 {
            None => request,
            Some(v) => request.header(::http::header::AUTHORIZATION, v.clone()),
        }
    }
}

/// Classify an HTTP status: `None` for success.
pub fn classify_status(status: ::http::StatusCode, context: &str) -> Option<TargetError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::StatusCode;

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
        let config = AuthConfig {
            bearer_token: Some("s3cret".into()),
            ..AuthConfig::default()
        };
        let a = Auth::from_config(Some(&config)).expect("auth");
        assert!(!format!("{a:?}").contains("s3cret"));
        let request = a
            .apply(::http::Request::builder())
            .body(())
            .expect("request");
        let header = &request.headers()[::http::header::AUTHORIZATION];
        assert_eq!(header, "Bearer s3cret");
        assert!(header.is_sensitive());
    }
}
