//! rustls configurations from PEM files: what the admin API serves and
//! trusts (`[admin.tls]`), and what clients trust and present towards
//! targets (`targets.<name>.tls`) and peers.
//!
//! Every error names the key and the file, and never quotes the file's
//! content (a private key must not reach a log).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a TLS configuration cannot be built; each names the setting (`key`)
/// and its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {key} {}: {source}", path.display())]
    Read {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {}: not PEM certificates ({reason})", path.display())]
    NotPem {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{key} {}: no certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error("{key} {}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { key: String, path: PathBuf },
    #[error("{key} {}: unusable CA certificate ({reason})", path.display())]
    BadCa {
        key: String,
        path: PathBuf,
        reason: String,
    },
    /// A CA file whose certificates do not make a verifier.
    #[error("{key} {}: {reason}", path.display())]
    Verifier {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot load the platform's trust store: {0}")]
    Platform(rustls::Error),
    #[error("{prefix}.cert_file {} and {prefix}.key_file {} do not make a usable client identity: {reason}", cert.display(), key.display())]
    ClientIdentity {
        prefix: String,
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("admin.tls.cert_file {} and admin.tls.key_file {} do not match: {reason}", cert.display(), key.display())]
    ServerIdentity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{0:?} is not a host name or IP address")]
    NotAHost(String),
    #[error("admin.tls.cert_file {} is not valid for {host} under admin.tls.ca_file {}: {reason}", cert.display(), ca.display())]
    NotValidFor {
        cert: PathBuf,
        host: String,
        ca: PathBuf,
        reason: String,
    },
    #[error(
        "admin.tls.cert_file {} is not usable for client authentication, which peers \
         need (extended key usage clientAuth, or none): {reason}", cert.display()
    )]
    NotForClients { cert: PathBuf, reason: String },
    #[error(
        "broker.tls.key_file {}: the key must be PKCS#8 (-----BEGIN PRIVATE KEY-----); \
         convert it with `openssl pkcs8 -topk8 -nocrypt`", path.display()
    )]
    NotPkcs8 { path: PathBuf },
}

/// Certificates (PEM) of `path`; `key` names the setting in errors.
pub fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::NotPem {
            key: key.to_owned(),
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key: key.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of `path`.
pub fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(key, path)?;
    // The parser's error is not shown: it could quote the file.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NoKey {
        key: key.to_owned(),
        path: path.to_owned(),
    })
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// A trust store holding only the certificates of `path`.
pub fn roots(key: &str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(key, path)? {
        store.add(cert).map_err(|e| TlsError::BadCa {
            key: key.to_owned(),
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// The verifier error for the CA file `path` of `key`.
fn verifier_error(key: &str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Verifier {
        key: key.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Where a client's trust and identity come from; `prefix` names the
/// settings in errors (`admin.tls`, `targets.scim.tls`).
pub struct ClientFiles<'a> {
    pub prefix: &'a str,
    /// Only these CAs are trusted; without it, the platform's trust store.
    pub ca_file: Option<&'a Path>,
    /// Certificate and key presented when the server asks for one.
    pub identity: Option<(&'a Path, &'a Path)>,
}

/// A client configuration from `files`.
pub fn client_config(files: &ClientFiles<'_>) -> Result<ClientConfig, TlsError> {
    let p = files.prefix;
    let builder = match files.ca_file {
        Some(ca) => {
            ClientConfig::builder().with_root_certificates(roots(&format!("{p}.ca_file"), ca)?)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            ClientConfig::builder()
                .with_platform_verifier()
                .map_err(TlsError::Platform)?
        }
    };
    match files.identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates(&format!("{p}.cert_file"), cert)?,
                private_key(&format!("{p}.key_file"), key)?,
            )
            .map_err(|reason| TlsError::ClientIdentity {
                prefix: p.to_owned(),
                cert: cert.to_owned(),
                key: key.to_owned(),
                reason: reason.to_string(),
            }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// What the admin API serves with: its certificate, and the cluster CA
/// that a client certificate, when one is presented, must chain to.
/// Clients without a certificate are let in (operators with tokens); the
/// admin API tells the two apart per connection.
pub fn admin_server_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = Arc::new(roots("admin.tls.ca_file", ca)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
        .allow_unauthenticated()
        .build()
        .map_err(|e| verifier_error("admin.tls.ca_file", ca, e))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates("admin.tls.cert_file", cert)?,
            private_key("admin.tls.key_file", key)?,
        )
        .map_err(|reason| TlsError::ServerIdentity {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: reason.to_string(),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether the certificate of `cert_file` chains to `ca_file` and names
/// the host of `address` (`host:port`), as a peer connecting to
/// `address` checks it.
pub fn check_covers(cert_file: &Path, ca_file: &Path, address: &str) -> Result<(), TlsError> {
    use rustls::client::danger::ServerCertVerifier;
    let trusted = Arc::new(roots("admin.tls.ca_file", ca_file)?);
    let verifier = rustls::client::WebPkiServerVerifier::builder(trusted.clone())
        .build()
        .map_err(|e| verifier_error("admin.tls.ca_file", ca_file, e))?;
    let chain = certificates("admin.tls.cert_file", cert_file)?;
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| TlsError::NotAHost(host.to_owned()))?;
    let now = rustls::pki_types::UnixTime::now();
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
        .map_err(|reason| TlsError::NotValidFor {
            cert: cert_file.to_owned(),
            host: host.to_owned(),
            ca: ca_file.to_owned(),
            reason: reason.to_string(),
        })?;
    // Peers present the same certificate as clients: it must be good for
    // client authentication too (many CAs issue server-only certificates).
    rustls::server::WebPkiClientVerifier::builder(trusted)
        .build()
        .map_err(|e| verifier_error("admin.tls.ca_file", ca_file, e))?
        .verify_client_cert(&chain[0], &chain[1..], now)
        .map(|_| ())
        .map_err(|reason| TlsError::NotForClients {
            cert: cert_file.to_owned(),
            reason: reason.to_string(),
        })
}

/// Read every certificate and key file `config` names, as the server and
/// its clients will: `Err` names the first unusable one; `Ok` holds
/// warnings (an admin certificate that does not cover a server's address,
/// which that server's node file may fix).
pub fn check_files(config: &crate::config::Config) -> Result<Vec<String>, TlsError> {
    let mut notes = Vec::new();
    if let Some(t) = &config.admin.tls {
        admin_server_config(&t.cert_file, &t.key_file, &t.ca_file)?;
        for (id, s) in &config.servers {
            if let Err(e) = check_covers(&t.cert_file, &t.ca_file, &s.admin_listen) {
                notes.push(format!(
                    "{e} (servers.{id}: give it its own admin.tls.cert_file in its node file)"
                ));
            }
        }
    }
    if let Some(t) = &config.broker.tls {
        client_config(&ClientFiles {
            prefix: "broker.tls",
            ca_file: t.ca_file.as_deref(),
            identity: t.cert_file.as_deref().zip(t.key_file.as_deref()),
        })?;
        // lapin reads the client key as PKCS#8 only.
        if let Some(key) = &t.key_file
            && !matches!(
                private_key("broker.tls.key_file", key)?,
                PrivateKeyDer::Pkcs8(_)
            )
        {
            return Err(TlsError::NotPkcs8 { path: key.clone() });
        }
    }
    if let Some(ca) = config.alerts.as_ref().and_then(|a| a.ca_file.as_ref()) {
        certificates("alerts.ca_file", ca)?;
    }
    for (name, t) in &config.targets {
        if let Some(tls) = &t.tls {
            let prefix = format!("targets.{name}.tls");
            client_config(&ClientFiles {
                prefix: &prefix,
                ca_file: tls.ca_file.as_deref(),
                identity: tls.cert_file.as_deref().zip(tls.key_file.as_deref()),
            })?;
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    /// A CA in `dir/ca.pem` and a certificate for 127.0.0.1 signed by it,
    /// with extended key usages `eku` (none: any use).
    fn issue(dir: &Path, eku: Vec<ExtendedKeyUsagePurpose>) -> (PathBuf, PathBuf) {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        params.extended_key_usages = eku;
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let (ca_file, cert_file) = (dir.join("ca.pem"), dir.join("cert.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("write");
        std::fs::write(&cert_file, cert.pem()).expect("write");
        (ca_file, cert_file)
    }

    use std::path::PathBuf;

    #[test]
    fn an_admin_certificate_must_name_the_address_and_serve_as_a_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert) = issue(dir.path(), Vec::new());
        check_covers(&cert, &ca, "127.0.0.1:7101").expect("covers its address");
        let e = check_covers(&cert, &ca, "127.0.0.2:7101").expect_err("another address");
        assert!(e.to_string().contains("127.0.0.2"), "{e}");
        let (ca, cert) = issue(dir.path(), vec![ExtendedKeyUsagePurpose::ServerAuth]);
        let e = check_covers(&cert, &ca, "127.0.0.1:7101").expect_err("server-only");
        assert!(e.to_string().contains("client authentication"), "{e}");
        let (ca, cert) = issue(
            dir.path(),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        check_covers(&cert, &ca, "127.0.0.1:7101").expect("both uses");
        // Files that are not PEM are named, their content is not quoted.
        std::fs::write(dir.path().join("junk.pem"), "secret-ish junk").expect("write");
        let e =
            certificates("admin.tls.cert_file", &dir.path().join("junk.pem")).expect_err("junk");
        let e = e.to_string();
        assert!(
            e.contains("admin.tls.cert_file") && !e.contains("secret-ish"),
            "{e}"
        );
    }
}
