//! `scim` target: SCIM 2.0 `/Users` (RFC 7644) with bearer-token auth.
//!
//! | event | requests |
//! |---|---|
//! | create | `POST /Users`; on 409, look up by `userName` and `PUT /Users/{id}` |
//! | update | look up, `PATCH` (replace of the given attributes) |
//! | enable / disable | look up, `PATCH` replace `active` |
//! | delete | look up, `DELETE /Users/{id}`; not found or 404 = done |
//! | password change | look up, `PATCH` replace `password` |
//!
//! A user that an update, enable, disable or password change needs but that
//! the service does not have is a permanent error (parked with the reason).

use super::http::Response;
use super::{Auth, Delivery, HttpClient, Target, TargetError, classify_status};
use crate::event::EventType;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::Method;
use serde_json::{Map, Value, json};

const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
/// Media type of SCIM request bodies (RFC 7644 §3.1).
const SCIM_JSON: &str = "application/scim+json";

pub struct ScimTarget {
    base: String,
    client: HttpClient,
    auth: Auth,
}

impl ScimTarget {
    pub fn new(base: String, client: HttpClient, auth: Auth) -> ScimTarget {
        ScimTarget {
            base: base.trim_end_matches('/').to_owned(),
            client,
            auth,
        }
    }

    fn users(&self) -> String {
        format!("{}/Users", self.base)
    }

    /// `…/Users/{id}`, with the service's id percent-encoded.
    fn user(&self, id: &str) -> Result<url::Url, TargetError> {
        let mut url = url::Url::parse(&self.users()).map_err(|e| {
            TargetError::Permanent(format!("SCIM base URL {:?} is unusable: {e}", self.base))
        })?;
        url.path_segments_mut()
            .map_err(|_| {
                TargetError::Permanent(format!("SCIM base URL {:?} cannot have a path", self.base))
            })?
            .push(id);
        Ok(url)
    }

    /// Send a SCIM request: `body` is JSON (sent as `application/scim+json`)
    /// unless `None`; `key` goes as `Idempotency-Key`.
    async fn send(
        &self,
        method: Method,
        url: &str,
        key: Option<&str>,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Response, TargetError> {
        let method_is_get = method == Method::GET;
        let mut request = HttpClient::request(method, url).header("accept", SCIM_JSON);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let bytes = match body {
            Some(body) => {
                request = request.header("content-type", SCIM_JSON);
                Bytes::from(serde_json::to_vec(body).map_err(|e| {
                    TargetError::Permanent(format!("{what}: cannot encode the body: {e}"))
                })?)
            }
            None => Bytes::new(),
        };
        let request = self.auth.apply(request);
        // Only a lookup's answer is read; for the rest the status decides.
        if method_is_get {
            self.client.fetch(request, bytes, what).await
        } else {
            self.client.send(request, bytes, what).await
        }
    }

    /// The service's id of `user_name`, if it has that user.
    async fn lookup(&self, user_name: &str) -> Result<Option<String>, TargetError> {
        // The filter value is a JSON string (RFC 7644 §3.4.2.2): escape it
        // as one, so that `DOMAIN\\jdoe` or quotes survive.
        let value = serde_json::to_string(user_name).unwrap_or_default();
        let filter = format!("userName eq {value}");
        let mut url = url::Url::parse(&self.users()).map_err(|e| {
            TargetError::Permanent(format!("SCIM base URL {:?} is unusable: {e}", self.base))
        })?;
        url.query_pairs_mut().append_pair("filter", &filter);
        let response = self
            .send(Method::GET, url.as_str(), None, None, "SCIM user lookup")
            .await?;
        if let Some(e) = classify_status(response.status, "SCIM user lookup") {
            return Err(e);
        }
        let body: Value = serde_json::from_slice(&response.body).map_err(|e| {
            TargetError::Transient(format!("SCIM user lookup returned unreadable JSON: {e}"))
        })?;
        // Take only a resource whose userName matches (case-insensitively,
        // as SCIM compares userName): a service that ignores the filter must
        // not make us patch or delete someone else.
        Ok(body
            .get("Resources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|u| {
                u.get("userName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.to_lowercase() == user_name.to_lowercase())
            })
            .and_then(|u| u.get("id"))
            .and_then(Value::as_str)
            .map(str::to_owned))
    }

    async fn require(&self, user_name: &str) -> Result<String, TargetError> {
        // The reason goes to the parking queue's clear headers and to the
        // log: it names no account (the event's identity says which).
        self.lookup(user_name).await?.ok_or_else(|| {
            TargetError::Permanent("SCIM service has no user with the event's userName".into())
        })
    }

    async fn expect_ok(
        &self,
        method: Method,
        url: &str,
        key: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<(), TargetError> {
        let status = self.send(method, url, Some(key), body, what).await?.status;
        match classify_status(status, what) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    async fn patch(&self, id: &str, ops: Value, key: &str) -> Result<(), TargetError> {
        let body = json!({"schemas": [PATCH_SCHEMA], "Operations": ops});
        let url = self.user(id)?;
        self.expect_ok(Method::PATCH, url.as_str(), key, Some(&body), "SCIM PATCH")
            .await
    }
}

/// `data` as a SCIM User resource: the event's attributes plus `schemas`;
/// `password` is never copied except by a password change.
fn user_resource(data: &Map<String, Value>) -> Value {
    let mut user = data.clone();
    user.remove("password");
    user.insert("schemas".into(), json!([USER_SCHEMA]));
    Value::Object(user)
}

impl Target for ScimTarget {
    fn deliver<'a>(&'a self, d: Delivery<'a>) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            let event: Value = serde_json::from_str(d.body)
                .map_err(|e| TargetError::Permanent(format!("event JSON unreadable: {e}")))?;
            let data = event
                .get("data")
                .and_then(Value::as_object)
                .ok_or_else(|| TargetError::Permanent("event has no data object".into()))?;
            let user_name = data
                .get("userName")
                .and_then(Value::as_str)
                .ok_or_else(|| TargetError::Permanent("data.userName missing".into()))?;
            let key = d.identity.idempotency_key();
            match d.event_type {
                EventType::AccountCreate => {
                    let resource = user_resource(data);
                    let status = self
                        .send(
                            Method::POST,
                            &self.users(),
                            Some(&key),
                            Some(&resource),
                            "SCIM POST",
                        )
                        .await?
                        .status;
                    if status.as_u16() == 409 {
                        let id = self.require(user_name).await?;
                        let url = self.user(&id)?;
                        return self
                            .expect_ok(Method::PUT, url.as_str(), &key, Some(&resource), "SCIM PUT")
                            .await;
                    }
                    match classify_status(status, "SCIM POST") {
                        None => Ok(()),
                        Some(e) => Err(e),
                    }
                }
                EventType::AccountUpdate => {
                    let id = self.require(user_name).await?;
                    let mut attrs = data.clone();
                    attrs.remove("password");
                    self.patch(&id, json!([{"op": "replace", "value": attrs}]), &key)
                        .await
                }
                EventType::AccountEnable | EventType::AccountDisable => {
                    let id = self.require(user_name).await?;
                    let active = d.event_type == EventType::AccountEnable;
                    self.patch(
                        &id,
                        json!([{"op": "replace", "path": "active", "value": active}]),
                        &key,
                    )
                    .await
                }
                EventType::PasswordChange => {
                    let id = self.require(user_name).await?;
                    let password = data.get("password").cloned().unwrap_or(Value::Null);
                    self.patch(
                        &id,
                        json!([{"op": "replace", "path": "password", "value": password}]),
                        &key,
                    )
                    .await
                }
                EventType::AccountDelete => {
                    let Some(id) = self.lookup(user_name).await? else {
                        return Ok(());
                    };
                    let url = self.user(&id)?;
                    let status = self
                        .send(
                            Method::DELETE,
                            url.as_str(),
                            Some(&key),
                            None,
                            "SCIM DELETE",
                        )
                        .await?
                        .status;
                    if status.as_u16() == 404 {
                        return Ok(());
                    }
                    match classify_status(status, "SCIM DELETE") {
                        None => Ok(()),
                        Some(e) => Err(e),
                    }
                }
            }
        })
    }
}
