//! E-mail alerts over SMTP (lettre), configured in `[alerts]`. Without
//! that section an alert is only logged. A mail that cannot be sent is
//! logged with the reason; it never stops the server.

use crate::config::{AlertsConfig, SmtpTls};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Sends alerts; cheap to clone.
#[derive(Clone)]
pub struct Alerter {
    config: Option<AlertsConfig>,
    node: String,
}

impl Alerter {
    pub fn new(config: Option<AlertsConfig>, node: &str) -> Alerter {
        Alerter {
            config,
            node: node.to_owned(),
        }
    }

    /// Log the alert and mail it to `alerts.to`.
    pub async fn send(&self, subject: &str, body: &str) {
        self.send_as(subject, body, None).await;
    }

    /// [`Alerter::send`] with the given `Message-ID` (`<local@domain>`), so
    /// that a mail sent again after a crash is the same message to mail
    /// clients. Returns whether the mail was accepted (or only logged, with
    /// no `[alerts]` section).
    pub async fn send_as(&self, subject: &str, body: &str, message_id: Option<String>) -> bool {
        tracing::warn!(%subject, "Alert.");
        let Some(cfg) = &self.config else {
            tracing::warn!("No [alerts] section: the alert was only logged.");
            return true;
        };
        match tokio::time::timeout(cfg.timeout, self.mail(cfg, subject, body, message_id)).await {
            Ok(Ok(())) => {
                tracing::info!(%subject, to = %cfg.to.join(", "), "Alert mailed.");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(%subject, error = %e, host = %cfg.smtp_host, "Cannot send the alert mail.");
                false
            }
            Err(_) => {
                tracing::error!(%subject, timeout = ?cfg.timeout, host = %cfg.smtp_host, "Cannot send the alert mail: no answer in time.");
                false
            }
        }
    }

    async fn mail(
        &self,
        cfg: &AlertsConfig,
        subject: &str,
        body: &str,
        message_id: Option<String>,
    ) -> Result<(), String> {
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| format!("alerts.from {:?}: {e}", cfg.from))?;
        // The arrows and names in the text are UTF-8: say so, or mail
        // readers guess another charset and garble them.
        let mut builder = Message::builder()
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .message_id(message_id)
            .from(from)
            .subject(format!("[provring] {subject}"));
        for to in &cfg.to {
            let mailbox: Mailbox = to.parse().map_err(|e| format!("alerts.to {to:?}: {e}"))?;
            builder = builder.to(mailbox);
        }
        let message = builder
            .body(format!("{body}\n\n-- \nprovring server {}\n", self.node))
            .map_err(|e| e.to_string())?;
        let plain = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.smtp_host.as_str());
        let mut transport = match cfg.tls {
            SmtpTls::None => plain,
            SmtpTls::Starttls => plain.tls(Tls::Required(tls_parameters(cfg)?)),
            SmtpTls::Tls => plain.tls(Tls::Wrapper(tls_parameters(cfg)?)),
        }
        .port(cfg.smtp_port)
        .timeout(Some(cfg.timeout));
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            transport = transport.credentials(Credentials::new(user.clone(), password.clone()));
        }
        transport
            .build()
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// TLS towards the mail server: the system's trust store, or only the CA
/// certificates of `alerts.ca_file`.
fn tls_parameters(cfg: &AlertsConfig) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(cfg.smtp_host.clone());
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read alerts.ca_file {}: {e}", path.display()))?;
        let ca = Certificate::from_pem(&pem).map_err(|e| {
            format!(
                "alerts.ca_file {} holds no PEM certificate: {e}",
                path.display()
            )
        })?;
        builder = builder
            .certificate_store(CertificateStore::None)
            .add_root_certificate(ca);
    }
    builder
        .build_rustls()
        .map_err(|e| format!("TLS towards {}: {e}", cfg.smtp_host))
}
