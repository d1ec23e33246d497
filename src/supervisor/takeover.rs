//! What a takeover leaves to do on the server that was taken over, when it
//! comes back: drop what it surrendered and say where things run now.

use crate::repository::{Repository, RepositoryError};

/// This server was taken over while it was away: its taker delivers the
/// backlog of the adaptors it lost, so drop it here; start nothing it lost
/// (the topology says where things run now); tell the operators.
pub async fn returned_after_takeover(
    repo: &Repository,
    node: &str,
    taker: Option<&str>,
    state: &crate::topology::State,
    alerter: &crate::alert::Alerter,
) -> Result<(), RepositoryError> {
    let mine = state.adaptors_of(node);
    let mut dropped = 0;
    for adaptor in repo.adaptors_with_backlog() {
        if !mine.contains(&adaptor) {
            let r = repo.clone();
            let a = adaptor.clone();
            let n = tokio::task::spawn_blocking(move || r.drop_adaptor(&a))
                .await
                .map_err(|e| RepositoryError::Flush(e.to_string()))??;
            tracing::warn!(%adaptor, items = n, "Surrendered backlog dropped: the taker delivers it.");
            dropped += n;
        }
    }
    let placement: Vec<String> = state
        .adaptors
        .iter()
        .chain(state.singletons.iter())
        .map(|(name, host)| format!("  {name} on {host}"))
        .collect();
    let subject = format!("server {node} is back");
    let body = format!(
        "Server {node} is running again after it was taken over by {}.\n\
         It dropped {dropped} surrendered items (delivered by the taker) and\n\
         resumes monitoring. Nothing moved back; adaptors and services now run on:\n{}\n\n\
         Move them with `provring move` if you want them back.",
        taker.unwrap_or("another server"),
        placement.join("\n")
    );
    let alerter = alerter.clone();
    tokio::spawn(async move { alerter.send(&subject, &body).await });
    Ok(())
}
