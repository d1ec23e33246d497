//! rustls configurations from PEM files: what the admin API serves and
//! trusts (`[admin.tls]`), and what clients trust and present towards
//! targets (`targets.<name>.tls`) and peers.
//!
//! Every error names the key and the file, and never quotes the file's
//! content (a private key must not reach a log).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// Certificates (PEM) of `path`; `key` names the setting in errors.
pub fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(key, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key} {}: not PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {}: no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of `path`.
pub fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        format!(
            "{key} {}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {key} {}: {e}", path.display()))
}

/// A trust store holding only the certificates of `path`.
pub fn roots(key: &str, path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certificates(key, path)? {
        store
            .add(cert)
            .map_err(|e| format!("{key} {}: unusable CA certificate ({e})", path.display()))?;
    }
    Ok(store)
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
pub fn client_config(files: &ClientFiles<'_>) -> Result<ClientConfig, String> {
    let p = files.prefix;
    let builder = match files.ca_file {
        Some(ca) => {
            ClientConfig::builder().with_root_certificates(roots(&format!("{p}.ca_file"), ca)?)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            ClientConfig::builder()
                .with_platform_verifier()
                .map_err(|e| format!("cannot load the platform's trust store: {e}"))?
        }
    };
    match files.identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates(&format!("{p}.cert_file"), cert)?,
                private_key(&format!("{p}.key_file"), key)?,
            )
            .map_err(|e| {
                format!(
                    "{p}.cert_file {} and {p}.key_file {} do not make a usable client identity: {e}",
                    cert.display(),
                    key.display()
                )
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
) -> Result<Arc<ServerConfig>, String> {
    let roots = Arc::new(roots("admin.tls.ca_file", ca)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("admin.tls.ca_file {}: {e}", ca.display()))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates("admin.tls.cert_file", cert)?,
            private_key("admin.tls.key_file", key)?,
        )
        .map_err(|e| {
            format!(
                "admin.tls.cert_file {} and admin.tls.key_file {} do not match: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether the certificate of `cert_file` chains to `ca_file` and names
/// the host of `address` (`host:port`), as a peer connecting to
/// `address` checks it.
pub fn check_covers(cert_file: &Path, ca_file: &Path, address: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    let roots = Arc::new(roots("admin.tls.ca_file", ca_file)?);
    let verifier = rustls::client::WebPkiServerVerifier::builder(roots)
        .build()
        .map_err(|e| format!("admin.tls.ca_file {}: {e}", ca_file.display()))?;
    let chain = certificates("admin.tls.cert_file", cert_file)?;
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is not a host name or IP address"))?;
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| {
            format!(
                "admin.tls.cert_file {} is not valid for {host} under admin.tls.ca_file {}: {e}",
                cert_file.display(),
                ca_file.display()
            )
        })
}
