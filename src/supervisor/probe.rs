//! The HTTP probe: one `GET /state` of a peer's admin API.

use super::watch::Probe;
use std::time::Duration;

/// Ask `url` (a peer's `/state`) within `within`.
pub async fn state(client: &reqwest::Client, url: &str, within: Duration) -> Probe {
    match crate::admin::client::get_state(client, url, within).await {
        Ok(view) => Probe::Answered {
            state: view.state,
            reasons: view.reasons,
        },
        Err(why) => Probe::Failed(why.to_string()),
    }
}
