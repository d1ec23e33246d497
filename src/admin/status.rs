//! `provring status`: the ring at a glance, from the servers' admin APIs
//! (`GET /cluster` of the first server that answers, `GET /backlog` of
//! each) and the broker (messages waiting in each adaptor's queue, so that
//! a stopped server's feed is visible).

use super::api::{ClusterView, ServerView};
use super::client::{BacklogReport, ClientError, admin_url, backlog, command_builder};
use crate::config::Config;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long the broker may take to answer for the queue depths.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `provring status` shows.
pub struct StatusReport {
    /// The cluster as the first server that answered sees it; `None`
    /// when no server answered.
    pub cluster: Option<ClusterView>,
    pub backlog: BacklogReport,
    /// Adaptor → (queue, messages ready), or why the broker did not say.
    pub queues: Result<BTreeMap<String, (String, Option<u32>)>, String>,
}

/// Ask the servers of `config` and its broker.
pub async fn status(config: &Config, token: Option<&str>) -> Result<StatusReport, ClientError> {
    let client = command_builder(config, token)?
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(ClientError::Build)?;
    let mut cluster = None;
    for server in config.servers.values() {
        let url = admin_url(config, &server.admin_listen, "/cluster");
        let answer = client.get(&url).send().await;
        if let Ok(response) = answer.and_then(reqwest::Response::error_for_status)
            && let Ok(view) = response.json::<ClusterView>().await
        {
            cluster = Some(view);
            break;
        }
    }
    let backlog = backlog(config, None, token).await?;
    let queues = match tokio::time::timeout(BROKER_TIMEOUT, queue_depths(config)).await {
        Ok(depths) => depths,
        Err(_) => Err(format!(
            "the broker did not answer within {BROKER_TIMEOUT:?}"
        )),
    };
    Ok(StatusReport {
        cluster,
        backlog,
        queues,
    })
}

/// Messages ready in each adaptor's queue (`None`: the queue does not
/// exist yet).
async fn queue_depths(config: &Config) -> Result<BTreeMap<String, (String, Option<u32>)>, String> {
    let broker = crate::broker::Broker::new(config.broker.clone(), "provring status".to_owned());
    let channel = broker.channel().await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (name, adaptor) in &config.adaptors {
        let queue = format!("{}.{}", config.broker.namespace, adaptor.queue);
        // A passive declare of a missing queue closes the channel.
        let channel = if channel.status().connected() {
            channel.clone()
        } else {
            broker.channel().await.map_err(|e| e.to_string())?
        };
        let ready = crate::broker::drain::ready(&channel, &queue)
            .await
            .map_err(|e| e.to_string())?;
        out.insert(name.clone(), (queue, ready));
    }
    broker.close().await;
    Ok(out)
}

/// Lowest state 0–10 of a server that counts as up: a fenced server
/// (cannot read the topology log) or one whose repository failed is below.
pub const UP_STATE: u8 = 5;

/// A server is up: it answers, is neither failed nor stopped, and its
/// state is at least [`UP_STATE`].
fn up(s: &ServerView) -> bool {
    s.reachable && !s.failed && !s.stopping && s.state.is_some_and(|x| x >= UP_STATE)
}

impl StatusReport {
    /// Every server is up and the ring is closed.
    pub fn healthy(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.ring_closed && c.servers.iter().all(up))
    }

    /// Items unfinished in all servers' repositories.
    fn backlog_total(&self) -> usize {
        self.backlog
            .servers
            .iter()
            .filter_map(|s| s.view.as_ref().ok())
            .flat_map(|v| v.adaptors.iter().map(|a| a.items))
            .sum()
    }

    pub fn render(&self, json: bool) -> String {
        if json {
            return self.json().to_string();
        }
        let Some(cluster) = &self.cluster else {
            return format!(
                "no server answered\n{}\nring: unknown",
                self.backlog.render(false)
            );
        };
        let mut out = format!(
            "{:<10} {:<6} {:>5} {:>6}  {:<12} {:<28} {:>8} {:>9}  {}",
            "server", "", "state", "epoch", "monitors", "hosts", "backlog", "oldest", "standing"
        );
        for s in &cluster.servers {
            out.push('\n');
            out.push_str(&self.row(s));
            for r in &s.reasons {
                out.push_str(&format!("\n{:<10} {:<6} {r}", "", ""));
            }
        }
        match &self.queues {
            Ok(queues) => {
                out.push_str("\n\nwaiting on the broker:");
                for (adaptor, (queue, ready)) in queues {
                    let host = cluster
                        .servers
                        .iter()
                        .find(|s| s.adaptors.contains(adaptor))
                        .map_or("-", |s| s.node.as_str());
                    let ready = ready.map_or("no queue yet".to_owned(), |n| n.to_string());
                    out.push_str(&format!(
                        "\n  {adaptor:<16} {queue:<28} {ready:>8}  (on {host})"
                    ));
                }
            }
            Err(e) => out.push_str(&format!("\n\nqueues: unknown ({e})")),
        }
        let up = cluster.servers.iter().filter(|s| up(s)).count();
        out.push_str(&format!(
            "\n\nring {} · {up} of {} servers up · backlog {} items · epoch {} (as {} sees it)",
            if cluster.ring_closed {
                "closed"
            } else {
                "OPEN"
            },
            cluster.servers.len(),
            self.backlog_total(),
            cluster.epoch,
            cluster.by
        ));
        out
    }

    fn row(&self, s: &ServerView) -> String {
        let own = self
            .backlog
            .servers
            .iter()
            .find(|b| b.node == s.node)
            .and_then(|b| b.view.as_ref().ok());
        let (items, oldest) = own.map_or((None, 0), |v| {
            (
                Some(v.adaptors.iter().map(|a| a.items).sum::<usize>()),
                v.adaptors
                    .iter()
                    .map(|a| a.oldest_age_ms)
                    .max()
                    .unwrap_or(0),
            )
        });
        let mut hosts: Vec<&str> = s
            .adaptors
            .iter()
            .chain(&s.singletons)
            .map(String::as_str)
            .collect();
        hosts.sort_unstable();
        let standing = if s.failed {
            let when = s
                .taken_over_at_ms
                .map(|ms| {
                    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
                    format!(" at {}", humantime::format_rfc3339_seconds(t))
                })
                .unwrap_or_default();
            format!(
                "failed; taken over by {}{when}",
                s.taken_over_by.as_deref().unwrap_or("?")
            )
        } else if s.stopping {
            "stopped on purpose".to_owned()
        } else if let Some(e) = &s.error {
            format!("no answer: {e}")
        } else {
            let copies = own
                .map(|v| {
                    v.copies
                        .iter()
                        .map(|c| format!("{} copies of {}", c.items, c.origin))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let up = s
                .uptime_s
                .map(|u| format!("up {}", humantime::format_duration(Duration::from_secs(u))))
                .unwrap_or_default();
            [up, copies]
                .into_iter()
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
                .join(" · ")
        };
        format!(
            "{:<10} {:<6} {:>5} {:>6}  {:<12} {:<28} {:>8} {:>9}  {standing}",
            s.node,
            if s.reachable { "up" } else { "DOWN" },
            s.state.map_or("-".to_owned(), |x| x.to_string()),
            s.epoch.map_or("-".to_owned(), |x| x.to_string()),
            s.monitors
                .as_deref()
                .map_or("-".to_owned(), |m| format!("→ {m}")),
            if hosts.is_empty() {
                "-".to_owned()
            } else {
                hosts.join(", ")
            },
            items.map_or("-".to_owned(), |n| n.to_string()),
            if items.unwrap_or(0) == 0 {
                "-".to_owned()
            } else {
                humantime::format_duration(Duration::from_secs(oldest / 1000)).to_string()
            },
        )
    }

    fn json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Queue<'a> {
            adaptor: &'a str,
            queue: &'a str,
            ready: Option<u32>,
        }
        let backlog: serde_json::Value =
            serde_json::from_str(&self.backlog.render(true)).unwrap_or_default();
        let (queues, queues_error) = match &self.queues {
            Ok(q) => (
                q.iter()
                    .map(|(adaptor, (queue, ready))| Queue {
                        adaptor,
                        queue,
                        ready: *ready,
                    })
                    .collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.clone())),
        };
        serde_json::json!({
            "healthy": self.healthy(),
            "ring_closed": self.cluster.as_ref().map(|c| c.ring_closed),
            "backlog_total": self.backlog_total(),
            "cluster": self.cluster,
            "backlog": backlog,
            "queues": queues,
            "queues_error": queues_error,
        })
    }
}
