//! The HTTP probe: one `GET /state` of a peer's admin API.

use super::watch::Probe;
use crate::admin::StateView;
use std::time::Duration;

/// Ask `url` (a peer's `/state`) within `within`.
pub async fn state(client: &reqwest::Client, url: &str, within: Duration) -> Probe {
    match fetch(client, url, within).await {
        Ok(view) => Probe::Answered {
            state: view.state,
            reasons: view.reasons,
        },
        Err(why) => Probe::Failed(why),
    }
}

async fn fetch(client: &reqwest::Client, url: &str, within: Duration) -> Result<StateView, String> {
    let response = client.get(url).timeout(within).send().await.map_err(|e| {
        if e.is_timeout() {
            "no answer in time".to_owned()
        } else if e.is_connect() {
            "connection refused".to_owned()
        } else {
            e.to_string()
        }
    })?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    response
        .json::<StateView>()
        .await
        .map_err(|e| format!("unreadable state: {e}"))
}
