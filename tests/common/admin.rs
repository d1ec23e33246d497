//! A running server's admin API: JSON reads with the test token, the
//! backlog, and waiting for a topology.

use super::cluster::TEST_TOKEN;
use provring::admin::ItemsView;
use provring::topology::State;
use std::future::Future;
use std::time::{Duration, Instant};

/// GET `path` from a server's admin API as JSON.
pub async fn admin_get<T: serde::de::DeserializeOwned>(
    admin: &str,
    path: &str,
) -> Result<T, String> {
    let url = format!("http://{admin}{path}");
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(TEST_TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    response
        .json::<T>()
        .await
        .map_err(|e| format!("{url}: {e}"))
}

/// Poll `GET /health/ready` of `admin` until it answers `status`; its body
/// then, or a panic naming `what` and the last answer after `within`.
pub async fn wait_ready(
    admin: &str,
    status: u16,
    within: Duration,
    what: &str,
) -> serde_json::Value {
    let url = format!("http://{admin}/health/ready");
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(r) => {
                let code = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if code == status {
                    return body;
                }
                last = format!("HTTP {code} {body}");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: /health/ready did not answer {status} within {within:?}; last: {last}");
}

/// Every page of `GET /backlog/items`, merged into one view.
pub async fn all_items(admin: &str) -> Result<ItemsView, String> {
    let mut all: ItemsView = admin_get(admin, "/backlog/items").await?;
    while let Some(after) = all.next.take() {
        let page: ItemsView = admin_get(admin, &format!("/backlog/items?after={after}")).await?;
        all.own.extend(page.own);
        for (origin, items) in page.copies {
            all.copies.entry(origin).or_default().extend(items);
        }
        all.next = page.next;
    }
    Ok(all)
}

/// Wait until `fetch` of one of `nodes` gives a topology for which `ok`
/// holds.
pub async fn wait_topology<F, Fut>(
    nodes: &[&str],
    within: Duration,
    what: &str,
    fetch: F,
    ok: impl Fn(&State) -> bool,
) -> State
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Option<State>>,
{
    let deadline = Instant::now() + within;
    loop {
        for n in nodes {
            if let Some(s) = fetch(n.to_string()).await
                && ok(&s)
            {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The topology of a server that must answer.
pub async fn topology_of(admin: &str) -> State {
    admin_get::<State>(admin, "/topology")
        .await
        .expect("topology from a live server")
}

/// The topology of a server, `None` while it does not answer (it may have
/// been killed or frozen).
pub async fn try_topology_of(admin: &str) -> Option<State> {
    admin_get::<State>(admin, "/topology").await.ok()
}

/// Wait until a live server reports a state for which `ok` holds.
pub async fn wait_state(
    admins: &[&String],
    within: Duration,
    what: &str,
    ok: impl Fn(&State) -> bool,
) -> State {
    let admins: Vec<&str> = admins.iter().map(|a| a.as_str()).collect();
    wait_topology(
        &admins,
        within,
        what,
        |a| async move { try_topology_of(&a).await },
        ok,
    )
    .await
}
