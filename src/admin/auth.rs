//! Who may call the admin API.
//!
//! Three kinds of caller present `Authorization: Bearer <token>`:
//!
//! - **operators**, with a token whose SHA-256 is configured
//!   (`[[security.admin_tokens]]` or `security.admin_token_file`) with a
//!   role: `read` (state, backlog, topology, items) or `operate` (also
//!   `POST /stop`);
//! - **peers** (servers of the cluster, and commands run where the cluster
//!   key is readable), with a token derived from the cluster key (HKDF
//!   label `provring peer v1`), which opens every route, the peer routes
//!   `/timeout/*` included;
//! - nobody, for `GET /health` only.
//!
//! With `[admin.tls]`, the peer token counts only on a connection whose
//! client presented a certificate of the cluster CA (mutual TLS): a peer
//! token alone, read off a disk or a log, does not open the ring's routes.
//!
//! Hashes are compared in constant time. A request without a usable token
//! gets 401, one whose role does not reach the route 403. With
//! `security.admin_auth = "none"`, allowed only when every admin address is
//! a loopback address, nothing is checked (a single machine).

use crate::config::{AdminAuth, SecurityConfig, TokenRole};
use crate::crypto::KeyRing;
use aws_lc_rs::{constant_time, digest};
use std::path::{Path, PathBuf};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// `read` or better.
    Read,
    /// `operate` or a peer.
    Operate,
    /// A peer only.
    Peer,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or one nobody configured (401).
    Unauthorized(&'static str),
    /// A valid token whose role does not reach the route (403).
    Forbidden { name: String, role: TokenRole },
    /// The peer token without the cluster's client certificate (401, as an
    /// unknown token: the caller learns nothing; the server logs it, for
    /// the token has leaked).
    PeerWithoutCertificate,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read security.admin_token_file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "security.admin_token_file {path} line {line}: expected `name role sha256` \
         (role read or operate, sha256 as 64 hex digits)"
    )]
    Line { path: PathBuf, line: usize },
}

struct Entry {
    name: String,
    role: TokenRole,
    hash: [u8; 32],
}

/// The admin API's credentials; cheap to share behind an `Arc`.
pub struct Auth {
    mode: AdminAuth,
    tokens: Vec<Entry>,
    /// SHA-256 of the peer token of every key of the ring.
    peers: Vec<[u8; 32]>,
    /// The peer token needs a verified client certificate (`[admin.tls]`).
    peer_needs_certificate: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field("tokens", &names)
            .finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// SHA-256 of `token` in hex, as `[[security.admin_tokens]] sha256` wants it.
pub fn token_hash(token: &str) -> String {
    sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl Auth {
    /// Credentials from `[security]` (and its token file) and the key ring.
    pub fn new(security: &SecurityConfig, keys: &KeyRing) -> Result<Auth, AuthError> {
        let mut tokens = Vec::new();
        for t in &security.admin_tokens {
            // Validation has checked the hash already.
            if let Some(hash) = parse_hash(&t.sha256) {
                tokens.push(Entry {
                    name: t.name.clone(),
                    role: t.role,
                    hash,
                });
            }
        }
        if let Some(path) = &security.admin_token_file {
            tokens.extend(read_token_file(path)?);
        }
        Ok(Auth {
            mode: security.admin_auth,
            tokens,
            peers: keys
                .peer_tokens()
                .iter()
                .map(|t| sha256(t.as_bytes()))
                .collect(),
            peer_needs_certificate: false,
        })
    }

    /// Accept the peer token only from clients with a verified certificate.
    pub fn peer_needs_certificate(mut self, yes: bool) -> Auth {
        self.peer_needs_certificate = yes;
        self
    }

    /// Whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.mode == AdminAuth::Tokens
    }

    /// Check an `Authorization` header value against what a route needs;
    /// `certified`: the client presented a certificate of the cluster CA.
    /// Returns the caller's name for the log.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        need: Need,
        certified: bool,
    ) -> Result<String, Refusal> {
        if !self.enabled() {
            return Ok("anyone".into());
        }
        let Some(value) = authorization else {
            return Err(Refusal::Unauthorized("no bearer token"));
        };
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .ok_or(Refusal::Unauthorized(
                "the Authorization header is not a bearer token",
            ))?;
        let hash = sha256(token);
        // Every candidate is compared, so the time taken does not tell
        // which (if any) matched.
        let mut peer = false;
        for p in &self.peers {
            peer |= constant_time::verify_slices_are_equal(p, &hash).is_ok();
        }
        let mut found: Option<&Entry> = None;
        for t in &self.tokens {
            if constant_time::verify_slices_are_equal(&t.hash, &hash).is_ok() {
                found = Some(t);
            }
        }
        if peer {
            if self.peer_needs_certificate && !certified {
                return Err(Refusal::PeerWithoutCertificate);
            }
            return Ok("peer".into());
        }
        let Some(entry) = found else {
            return Err(Refusal::Unauthorized("unknown token"));
        };
        let allowed = match need {
            Need::Read => true,
            Need::Operate => entry.role == TokenRole::Operate,
            Need::Peer => false,
        };
        if allowed {
            Ok(entry.name.clone())
        } else {
            Err(Refusal::Forbidden {
                name: entry.name.clone(),
                role: entry.role,
            })
        }
    }
}

fn read_token_file(path: &Path) -> Result<Vec<Entry>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || AuthError::Line {
            path: path.to_owned(),
            line: i + 1,
        };
        let mut parts = line.split_whitespace();
        let (Some(name), Some(role), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let role = match role {
            "read" => TokenRole::Read,
            "operate" => TokenRole::Operate,
            _ => return Err(bad()),
        };
        out.push(Entry {
            name: name.to_owned(),
            role,
            hash: parse_hash(hash).ok_or_else(bad)?,
        });
    }
    Ok(out)
}

/// A new random operator token (`prt_` and 43 base64url characters).
pub fn new_token() -> Result<String, crate::crypto::KeyError> {
    use base64::Engine;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| crate::crypto::KeyError::Random)?;
    Ok(format!(
        "prt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminToken;

    fn auth(mode: AdminAuth) -> (Auth, KeyRing) {
        let keys = KeyRing::from_keys(&[9; 32], &[]);
        let security = SecurityConfig {
            key_file: PathBuf::new(),
            previous_key_files: Vec::new(),
            admin_auth: mode,
            admin_tokens: vec![
                AdminToken {
                    name: "viewer".into(),
                    role: TokenRole::Read,
                    sha256: token_hash("read-token"),
                },
                AdminToken {
                    name: "ops".into(),
                    role: TokenRole::Operate,
                    sha256: token_hash("operate-token"),
                },
            ],
            admin_token_file: None,
        };
        (Auth::new(&security, &keys).expect("auth"), keys)
    }

    #[test]
    fn roles_reach_their_routes_only() {
        let (a, keys) = auth(AdminAuth::Tokens);
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        assert!(matches!(
            a.check(None, Need::Read, false),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            a.check(Some(&bearer("guess")), Need::Read, false),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            a.check(Some(b"Basic dXNlcjpwdw=="), Need::Read, false),
            Err(Refusal::Unauthorized(_))
        ));
        assert_eq!(
            a.check(Some(&bearer("read-token")), Need::Read, false),
            Ok("viewer".into())
        );
        assert!(matches!(
            a.check(Some(&bearer("read-token")), Need::Operate, false),
            Err(Refusal::Forbidden { .. })
        ));
        assert_eq!(
            a.check(Some(&bearer("operate-token")), Need::Operate, false),
            Ok("ops".into())
        );
        assert!(matches!(
            a.check(Some(&bearer("operate-token")), Need::Peer, false),
            Err(Refusal::Forbidden { .. })
        ));
        let peer = &keys.peer_tokens()[0];
        assert_eq!(
            a.check(Some(&bearer(peer)), Need::Peer, false),
            Ok("peer".into())
        );
        // With mutual TLS, the peer token alone is not enough.
        let a = a.peer_needs_certificate(true);
        assert_eq!(
            a.check(Some(&bearer(peer)), Need::Read, false),
            Err(Refusal::PeerWithoutCertificate)
        );
        assert_eq!(
            a.check(Some(&bearer(peer)), Need::Peer, true),
            Ok("peer".into())
        );
        assert_eq!(
            a.check(Some(&bearer("read-token")), Need::Read, false),
            Ok("viewer".into())
        );
        let (open, _) = auth(AdminAuth::None);
        assert!(open.check(None, Need::Operate, false).is_ok());
    }

    #[test]
    fn token_files_are_read_and_bad_lines_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            format!("# operators\nalice operate {}\n\n", token_hash("t1")),
        )
        .expect("write");
        assert_eq!(read_token_file(&path).expect("read").len(), 1);
        std::fs::write(&path, "alice admin 00\n").expect("write");
        let e = read_token_file(&path).err().expect("bad line");
        assert!(e.to_string().contains("line 1"), "{e}");
        let t = new_token().expect("token");
        assert!(t.starts_with("prt_") && t.len() > 40);
    }
}
