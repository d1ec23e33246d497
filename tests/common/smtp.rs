//! The mail catcher: a minimal SMTP server (plain or TLS) that keeps every
//! message, and the `[alerts]` section that points a cluster at it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A minimal SMTP server that keeps every message it receives.
#[derive(Clone, Default)]
pub struct SmtpSink {
    pub messages: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    pub async fn start(&self) -> u16 {
        self.serve(None).await
    }

    /// Serve SMTP over TLS from the first byte (`alerts.tls = "tls"`) with
    /// a certificate for 127.0.0.1 made now; returns the port and the PEM
    /// file of that certificate, for `alerts.ca_file`.
    pub async fn start_tls(&self, dir: &Path) -> (u16, PathBuf) {
        let cert =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let ca = dir.join("smtp-ca.pem");
        std::fs::write(&ca, cert.cert.pem()).expect("write CA file");
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        (self.serve(Some(acceptor)).await, ca)
    }

    async fn serve(&self, tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind smtp");
        let port = listener.local_addr().expect("addr").port();
        let messages = self.messages.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let messages = messages.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => smtp_session(stream, messages).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                smtp_session(stream, messages).await;
                            }
                        }
                    }
                });
            }
        });
        port
    }

    pub fn count(&self, needle: &str) -> usize {
        self.messages
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }
}

/// One SMTP conversation: every verb is accepted, authentication too, and
/// each message is kept.
async fn smtp_session<S>(stream: S, messages: Arc<Mutex<Vec<String>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = tokio::io::BufReader::new(read).lines();
    let _ = write.write_all(b"220 sink ESMTP\r\n").await;
    let mut data: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(body) = data.as_mut() {
            if line == "." {
                messages
                    .lock()
                    .expect("lock")
                    .push(data.take().unwrap_or_default());
                let _ = write.write_all(b"250 queued\r\n").await;
            } else {
                body.push_str(&line);
                body.push('\n');
            }
            continue;
        }
        let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
        let reply: &[u8] = match verb.as_str() {
            // Offer authentication, and take any credentials.
            "EHLO" => b"250-sink\r\n250 AUTH PLAIN LOGIN\r\n",
            "AUTH" => b"235 accepted\r\n",
            "DATA" => {
                data = Some(String::new());
                b"354 go on\r\n"
            }
            "QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                break;
            }
            _ => b"250 ok\r\n",
        };
        let _ = write.write_all(reply).await;
        let _ = write.flush().await;
    }
}

/// The `[alerts]` section for an [`SmtpSink`] on `port`.
pub fn alerts(port: u16) -> String {
    format!(
        "[alerts]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\nfrom = \"provring@example.test\"\nto = [\"ops@example.test\"]\ntimeout = \"5s\"\n"
    )
}
