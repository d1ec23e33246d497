//! The targets' HTTP client: hyper over sockets that ask a [`Gate`] before
//! every write.
//!
//! The fence check at the start of an attempt is not enough on its own: a
//! server frozen (SIGSTOP, a paused VM) between that check and the moment
//! its request reaches the socket would, once resumed, send a request for an
//! adaptor that was taken over meanwhile. Checking at the socket closes
//! that window: after a freeze the fence stays shut until the topology
//! reader has caught up, so no byte for a surrendered adaptor leaves the
//! process. A write refused by the gate fails the request like a broken
//! connection and counts as no attempt; the item is retried, same key, by
//! whoever hosts it. What is left is the instant between the check and the
//! write itself, and bytes already in the kernel's send buffer, which the
//! idempotency key covers.
//!
//! Redirects are not followed (a 3xx is a permanent error: an event is not
//! sent somewhere the configuration does not name), and no proxy
//! environment variable is read.

use super::{BuildError, TargetError};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_platform_verifier::ConfigVerifierExt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Whether this server may send to the target now.
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

/// A gate that is always open (building a target only to check it).
pub fn open_gate() -> Gate {
    Arc::new(|| true)
}

/// Largest response body read when the body matters (SCIM lookups); more
/// is a transient error.
const MAX_BODY: usize = 4 << 20;

/// When only the status matters, this much of the body is read (so the
/// connection can be used again), for at most [`DRAIN_TIME`]; the rest
/// is left and the connection closed.
const DRAIN_BODY: usize = 64 << 10;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The refusal a shut gate gives a write.
#[derive(Debug)]
struct Fenced;

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fenced: this server may not deliver for this adaptor now")
    }
}

impl std::error::Error for Fenced {}

/// A target's answer: status and body.
pub struct Response {
    pub status: http::StatusCode,
    pub body: Bytes,
}

/// HTTP/1.1 and HTTP/2 client (TLS with the platform's roots, or a
/// target's own CA and client certificate) whose every socket write
/// passes the gate.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<GatedConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// `timeout` bounds connecting and each whole request; `tls` replaces
    /// the platform's trust store and adds a client certificate.
    pub fn new(
        timeout: Duration,
        tls: Option<&crate::tls::ClientFiles<'_>>,
        gate: Gate,
    ) -> Result<HttpClient, BuildError> {
        let tls = match tls {
            Some(files) => {
                crate::tls::client_config(files).map_err(|e| BuildError::Tls(Box::new(e)))?
            }
            None => {
                rustls::ClientConfig::with_platform_verifier().map_err(BuildError::PlatformRoots)?
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(15)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(GatedConnector { inner: http, gate });
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(HttpClient { client, timeout })
    }

    /// A request to `url` with the user agent set.
    pub fn request(method: http::Method, url: &str) -> http::request::Builder {
        http::Request::builder().method(method).uri(url).header(
            http::header::USER_AGENT,
            concat!("provring/", env!("CARGO_PKG_VERSION")),
        )
    }

    /// Send `request` with `body` and read the answer's body too; `what`
    /// names it in errors. Transport failures and timeouts are transient;
    /// a request that cannot be built is permanent.
    pub async fn fetch(
        &self,
        request: http::request::Builder,
        body: Bytes,
        what: &str,
    ) -> Result<Response, TargetError> {
        self.exchange(request, body, what, true).await
    }

    /// Like [`fetch`](Self::fetch) when only the status matters: a body
    /// that is large, slow or broken does not change the outcome.
    pub async fn send(
        &self,
        request: http::request::Builder,
        body: Bytes,
        what: &str,
    ) -> Result<Response, TargetError> {
        self.exchange(request, body, what, false).await
    }

    async fn exchange(
        &self,
        request: http::request::Builder,
        body: Bytes,
        what: &str,
        read_body: bool,
    ) -> Result<Response, TargetError> {
        let request = request.body(Full::new(body)).map_err(|e| {
            TargetError::Permanent(format!("{what}: cannot build the request: {e}"))
        })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                let text = error_chain(&e);
                if fenced(&e) {
                    return TargetError::Fenced(format!("{what} not sent: {text}"));
                }
                let kind = if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                TargetError::Transient(format!("{what} {kind}: {text}"))
            })?;
            let status = response.status();
            if !read_body {
                let drain = Limited::new(response.into_body(), DRAIN_BODY).collect();
                let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
                return Ok(Response {
                    status,
                    body: Bytes::new(),
                });
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    TargetError::Transient(format!("{what}: cannot read the answer: {e}"))
                })?
                .to_bytes();
            Ok(Response { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(TargetError::Transient(format!(
                "{what} timed out after {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }
}

/// Whether the gate refused a write somewhere under `e`.
fn fenced(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<Fenced>()
            || err
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<Fenced>())
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// An error and its causes, `: `-separated (hyper's own text is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Plain TCP connector whose connections carry the gate.
#[derive(Clone)]
pub struct GatedConnector {
    inner: HttpConnector,
    gate: Gate,
}

impl tower_service::Service<Uri> for GatedConnector {
    type Response = GatedIo<<HttpConnector as tower_service::Service<Uri>>::Response>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let gate = self.gate.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            Ok(GatedIo {
                io: connecting.await?,
                gate,
            })
        })
    }
}

/// A connection that refuses to write while the gate is shut.
pub struct GatedIo<T> {
    io: T,
    gate: Gate,
}

impl<T> GatedIo<T> {
    fn check(&self) -> io::Result<()> {
        if (self.gate)() {
            Ok(())
        } else {
            Err(io::Error::other(Fenced))
        }
    }
}

impl<T: Read + Unpin> Read for GatedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for GatedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for GatedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server on loopback that answers 204 to every request
    /// (bodies of the test are `{}`), keeping connections open unless
    /// `close`, and counts the requests it saw.
    async fn server(close: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        let answer: &'static [u8] = if close {
            b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
        } else {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        };
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        // Each request is a header block and `{}`.
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            if got.len() < end + 6 {
                                break;
                            }
                            got.drain(..end + 6);
                            counter.fetch_add(1, Ordering::SeqCst);
                            if socket.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/"), seen)
    }

    #[tokio::test]
    async fn a_shut_gate_sends_nothing() {
        for close in [true, false] {
            a_shut_gate_sends_nothing_over(close).await;
        }
    }

    async fn a_shut_gate_sends_nothing_over(close: bool) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (url, seen) = server(close).await;
        let open = Arc::new(AtomicBool::new(true));
        let flag = open.clone();
        let client = HttpClient::new(
            Duration::from_secs(5),
            None,
            Arc::new(move || flag.load(Ordering::SeqCst)),
        )
        .expect("client");
        let send = || {
            client.send(
                HttpClient::request(http::Method::POST, &url),
                Bytes::from_static(b"{}"),
                "test",
            )
        };
        let first = send().await.expect("open gate");
        assert_eq!(first.status, http::StatusCode::NO_CONTENT);
        assert_eq!(seen.load(Ordering::SeqCst), 1);

        open.store(false, Ordering::SeqCst);
        match send().await {
            Err(TargetError::Fenced(reason)) => assert!(reason.contains("fenced"), "{reason}"),
            Err(e) => panic!("expected a fenced error, got {e:?}"),
            Ok(r) => panic!("sent through a shut gate: {}", r.status),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "a request left through a shut gate (close = {close})"
        );

        open.store(true, Ordering::SeqCst);
        send().await.expect("gate open again");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate,
    /// written to `dir` as `ca.pem`, `server.pem/.key`, `client.pem/.key`.
    fn certificates(dir: &std::path::Path) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        for (name, sans) in [("server", vec!["127.0.0.1".to_owned()]), ("client", vec![])] {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(sans)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("cert");
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
        }
    }

    /// HTTPS with a private CA and a client certificate: a target that
    /// wants a certificate of its CA answers a client with `tls` set, and
    /// refuses one without the certificate or without the CA.
    #[tokio::test]
    async fn a_target_with_its_own_ca_and_a_client_certificate() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        certificates(d);
        let roots = Arc::new(crate::tls::roots("ca", &d.join("ca.pem")).expect("roots"));
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
            .build()
            .expect("verifier");
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                crate::tls::certificates("cert", &d.join("server.pem")).expect("cert"),
                crate::tls::private_key("key", &d.join("server.key")).expect("key"),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        let (ca, cert, key) = (d.join("ca.pem"), d.join("client.pem"), d.join("client.key"));
        let call = |files: Option<crate::tls::ClientFiles<'_>>| {
            let client = HttpClient::new(Duration::from_secs(5), files.as_ref(), Arc::new(|| true))
                .expect("client");
            let url = url.clone();
            async move {
                client
                    .send(
                        HttpClient::request(http::Method::POST, &url),
                        Bytes::from_static(b"{}"),
                        "test",
                    )
                    .await
            }
        };
        let ok = call(Some(crate::tls::ClientFiles {
            prefix: "targets.t.tls",
            ca_file: Some(&ca),
            identity: Some((&cert, &key)),
        }))
        .await
        .expect("delivered with the CA and a client certificate");
        assert_eq!(ok.status, http::StatusCode::NO_CONTENT);
        let no_cert = call(Some(crate::tls::ClientFiles {
            prefix: "targets.t.tls",
            ca_file: Some(&ca),
            identity: None,
        }))
        .await;
        assert!(no_cert.is_err(), "delivered without a client certificate");
        let no_ca = call(None).await;
        assert!(no_ca.is_err(), "the private CA was trusted without ca_file");
        // A file that is not there is named with its key.
        let missing = HttpClient::new(
            Duration::from_secs(5),
            Some(&crate::tls::ClientFiles {
                prefix: "targets.t.tls",
                ca_file: Some(&d.join("nope.pem")),
                identity: None,
            }),
            Arc::new(|| true),
        )
        .err()
        .expect("a missing CA file is an error")
        .to_string();
        assert!(
            missing.contains("targets.t.tls.ca_file") && missing.contains("nope.pem"),
            "{missing}"
        );
    }
}
