//! `webhook` target: HTTP POST of the event JSON (CloudEvents structured
//! mode) with an `Idempotency-Key` header. 2xx is success; 408, 429, 5xx,
//! timeouts and connection errors are transient; other statuses permanent.

use super::{Auth, Delivery, HttpClient, Target, TargetError, classify_status};
use bytes::Bytes;
use futures::future::BoxFuture;

pub struct WebhookTarget {
    url: String,
    client: HttpClient,
    auth: Auth,
}

impl WebhookTarget {
    pub fn new(url: String, client: HttpClient, auth: Auth) -> WebhookTarget {
        WebhookTarget { url, client, auth }
    }
}

impl Target for WebhookTarget {
    fn deliver<'a>(&'a self, d: Delivery<'a>) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            let request = HttpClient::request(http::Method::POST, &self.url)
                .header("accept", "*/*")
                .header("content-type", "application/cloudevents+json")
                .header("idempotency-key", d.identity.idempotency_key())
                .header("ce-type", d.event_type.as_str())
                .header("x-provring-node", d.node);
            let response = self
                .client
                .send(
                    self.auth.apply(request),
                    Bytes::copy_from_slice(d.body.as_bytes()),
                    "webhook",
                )
                .await?;
            match classify_status(response.status, "webhook") {
                None => Ok(()),
                Some(e) => Err(e),
            }
        })
    }
}
