//! The timeout checker itself, a singleton on the server the topology
//! names: it gathers the fleet's overdue items into a check, has their
//! hosts park them, mails the summary and records the check finished.

use super::{ItemRef, MAX_ITEMS_PER_CHECK, ParkRequest, ParkResult, TimeoutError, rfc3339};
use crate::alert::Alerter;
use crate::config::Config;
use crate::repository::{OverdueItem, now_ms};
use crate::topology::{
    Change, CheckedItem, Fence, Outcome, State, TIMEOUT_CHECKER, TimeoutCheck, Topology,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a check keeps asking about items that are busy (being
/// delivered) or between hosts (an adaptor being handed over).
const SETTLE_LIMIT: Duration = Duration::from_secs(20);
/// Pause between two rounds of asking.
const ROUND_PAUSE: Duration = Duration::from_millis(500);
/// Tries to send a check's summary mail, and the pause between two.
const MAIL_TRIES: u32 = 3;
const MAIL_PAUSE: Duration = Duration::from_secs(2);
/// Longest wait for one peer's answer.
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl ParkResult {
    /// No need to ask again.
    fn settled(&self) -> bool {
        matches!(
            self,
            ParkResult::Parked | ParkResult::Finished | ParkResult::Unknown
        )
    }
}

/// The timeout checker itself, on the server that runs it.
pub struct Checker {
    pub config: Config,
    pub node: String,
    pub topology: Topology,
    pub fence: Fence,
    pub alerter: Alerter,
    /// [`crate::admin::client::peer_client`].
    pub peers: reqwest::Client,
}

impl Checker {
    /// Run while this server hosts the timeout checker (hosting stops it).
    pub async fn run(self, stop: CancellationToken) {
        let every = self.config.timeout_checker.check_interval;
        tracing::info!(check_interval = ?every, "Timeout checker running here.");
        let client = self.peers.clone();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Checks follow each other at once while they come back full.
            loop {
                if !self.may_act() {
                    break;
                }
                let pending = self.topology.state().timeout_checks.pending.clone();
                let check = match pending {
                    Some(c) => {
                        if c.by != self.node {
                            tracing::warn!(check = c.check, started_by = %c.by, "Finishing a timeout check started by another server.");
                        }
                        c
                    }
                    None => match self.start(&client).await {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "Cannot start a timeout check; trying again at the next one.");
                            break;
                        }
                    },
                };
                let full = check.items.len() >= MAX_ITEMS_PER_CHECK;
                match self.finish(&client, &check, &stop).await {
                    // A full check that parked something: more may wait.
                    Ok(parked) if full && parked > 0 => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(check = check.check, error = %e, "Timeout check not finished; trying again.");
                        break;
                    }
                }
            }
        }
    }

    /// Whether this server may act as the timeout checker now.
    fn may_act(&self) -> bool {
        self.fence.is_open()
            && self.topology.state().singletons.get(TIMEOUT_CHECKER) == Some(&self.node)
    }

    /// [`Checker::may_act`] as an error.
    fn still_the_host(&self) -> Result<(), TimeoutError> {
        if self.may_act() {
            Ok(())
        } else {
            Err(TimeoutError::NotTheHost)
        }
    }

    /// Gather the overdue items of every live server and record a check;
    /// `None` if there are none.
    async fn start(&self, client: &reqwest::Client) -> Result<Option<TimeoutCheck>, TimeoutError> {
        let mut items = self.overdue_items(client).await;
        if items.is_empty() {
            return Ok(None);
        }
        items.sort_by_key(|c| (c.item.deadline_ms, c.item.received_ms));
        items.truncate(MAX_ITEMS_PER_CHECK);
        self.still_the_host()?;
        self.record_started(items).await.map(Some)
    }

    /// The overdue items of every live server; a server that does not
    /// answer is asked again at the next check.
    async fn overdue_items(&self, client: &reqwest::Client) -> Vec<CheckedItem> {
        let state = self.topology.state();
        let mut items: Vec<CheckedItem> = Vec::new();
        for (id, s) in &state.servers {
            // A server stopped on purpose is asked again once it is back.
            if s.failed || s.stopping {
                continue;
            }
            let Some(server) = self.config.servers.get(id) else {
                continue;
            };
            let url = crate::admin::client::admin_url(
                &self.config,
                &server.admin_listen,
                &format!("/timeout/overdue?limit={MAX_ITEMS_PER_CHECK}"),
            );
            match ask_overdue(client, &url).await {
                Ok(found) => items.extend(found.into_iter().map(|item| CheckedItem {
                    server: id.clone(),
                    item,
                })),
                Err(e) => {
                    tracing::warn!(server = %id, error = %e, "Cannot get the overdue items of a server; it is asked again at the next check.");
                }
            }
        }
        items
    }

    /// Record a check of `items` in the topology log: from then on it is
    /// the fleet's, finished by whoever runs the timeout checker.
    async fn record_started(&self, items: Vec<CheckedItem>) -> Result<TimeoutCheck, TimeoutError> {
        let me = self.node.clone();
        let at_ms = now_ms();
        let outcome = self
            .topology
            .propose_with(|s| {
                (s.singletons.get(TIMEOUT_CHECKER) == Some(&me)
                    && s.timeout_checks.pending.is_none())
                .then(|| Change::CheckStarted {
                    check: TimeoutCheck {
                        check: s.timeout_checks.last + 1,
                        by: me.clone(),
                        at_ms,
                        items: items.clone(),
                    },
                })
            })
            .await?;
        match outcome {
            Some(Outcome::Applied) => {}
            Some(Outcome::Ignored(reason)) => return Err(reason.into()),
            None => return Err(TimeoutError::NotStarted),
        }
        let check = self
            .topology
            .state()
            .timeout_checks
            .pending
            .clone()
            .ok_or(TimeoutError::CheckGone)?;
        tracing::warn!(
            check = check.check,
            items = check.items.len(),
            "Timeout check started: parking overdue events."
        );
        Ok(check)
    }

    /// Park the check's items at their adaptors' hosts, mail the summary,
    /// record the check as finished.
    async fn finish(
        &self,
        client: &reqwest::Client,
        check: &TimeoutCheck,
        stop: &CancellationToken,
    ) -> Result<u64, TimeoutError> {
        let results = self.park_all(client, check, stop).await?;
        let parked = results
            .values()
            .filter(|r| **r == ParkResult::Parked)
            .count() as u64;
        self.still_the_host()?;
        self.mail(check, &results, parked, stop).await?;
        self.record_finished(check.check, parked).await?;
        tracing::warn!(
            check = check.check,
            parked,
            items = check.items.len(),
            "Timeout check finished."
        );
        Ok(parked)
    }

    /// Ask the hosts, round after round, to park the check's items, until
    /// every item is settled or [`SETTLE_LIMIT`] has passed.
    async fn park_all(
        &self,
        client: &reqwest::Client,
        check: &TimeoutCheck,
        stop: &CancellationToken,
    ) -> Result<BTreeMap<ItemRef, ParkResult>, TimeoutError> {
        let mut results: BTreeMap<ItemRef, ParkResult> = BTreeMap::new();
        let limit = Instant::now() + SETTLE_LIMIT;
        loop {
            if stop.is_cancelled() || !self.may_act() {
                return Err(TimeoutError::NotTheHost);
            }
            let state = self.topology.state();
            let per_host = unsettled_per_host(check, &state, &mut results);
            if per_host.is_empty() {
                break;
            }
            self.park_round(client, check, state.epoch, per_host, &mut results)
                .await;
            if Instant::now() > limit {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(TimeoutError::Stopped),
                _ = tokio::time::sleep(ROUND_PAUSE) => {}
            }
        }
        Ok(results)
    }

    /// Ask each host once to park its items of the check; what a host
    /// answers goes into `results`, a host that does not is asked again
    /// next round.
    async fn park_round(
        &self,
        client: &reqwest::Client,
        check: &TimeoutCheck,
        epoch: u64,
        per_host: BTreeMap<String, Vec<ItemRef>>,
        results: &mut BTreeMap<ItemRef, ParkResult>,
    ) {
        for (host, refs) in per_host {
            let Some(server) = self.config.servers.get(&host) else {
                continue;
            };
            let req = ParkRequest {
                check: check.check,
                by: self.node.clone(),
                epoch,
                items: refs,
            };
            let url = crate::admin::client::admin_url(
                &self.config,
                &server.admin_listen,
                "/timeout/park",
            );
            match ask_park(client, &url, &req).await {
                Ok(answers) => results.extend(answers),
                Err(e) => {
                    tracing::warn!(check = check.check, %host, error = %e, "Cannot have the overdue items parked yet.");
                }
            }
        }
    }

    /// Mail the check's summary. A mail server that is down must not hold
    /// up the parking of what the next checks find: a few tries, then the
    /// check ends anyway.
    async fn mail(
        &self,
        check: &TimeoutCheck,
        results: &BTreeMap<ItemRef, ParkResult>,
        parked: u64,
        stop: &CancellationToken,
    ) -> Result<(), TimeoutError> {
        let (subject, body) = summary(check, results, &self.node);
        // The same for whoever finishes the check (the start time is in the
        // log), and new for a log started over under the same namespace.
        let message_id = format!(
            "<timeout-check-{}.{}.{}@provring.invalid>",
            check.check, check.at_ms, self.config.broker.namespace
        );
        for attempt in 0..MAIL_TRIES {
            if attempt > 0 {
                tokio::select! {
                    _ = stop.cancelled() => return Err(TimeoutError::Stopped),
                    _ = tokio::time::sleep(MAIL_PAUSE) => {}
                }
            }
            self.still_the_host()?;
            if self
                .alerter
                .send_as(&subject, &body, Some(message_id.clone()))
                .await
            {
                return Ok(());
            }
        }
        tracing::error!(
            check = check.check,
            parked,
            "The summary mail of this timeout check could not be sent; the parked events are on the parking queue with reason \"timed out\"."
        );
        Ok(())
    }

    /// Record check `n` finished, unless it already is.
    async fn record_finished(&self, n: u64, parked: u64) -> Result<(), TimeoutError> {
        let me = self.node.clone();
        let outcome = self
            .topology
            .propose_with(|s| {
                (s.timeout_checks.pending.as_ref().map(|p| p.check) == Some(n)).then(|| {
                    Change::CheckFinished {
                        check: n,
                        by: me.clone(),
                        parked,
                    }
                })
            })
            .await?;
        if let Some(Outcome::Ignored(reason)) = outcome {
            return Err(reason.into());
        }
        Ok(())
    }
}

/// The check's items not settled yet, by the server that hosts their
/// adaptor in `state`; an item whose adaptor is gone is settled as
/// unknown.
fn unsettled_per_host(
    check: &TimeoutCheck,
    state: &State,
    results: &mut BTreeMap<ItemRef, ParkResult>,
) -> BTreeMap<String, Vec<ItemRef>> {
    let mut per_host: BTreeMap<String, Vec<ItemRef>> = BTreeMap::new();
    for c in &check.items {
        let r = ItemRef::of(&c.item);
        if results.get(&r).is_some_and(ParkResult::settled) {
            continue;
        }
        match state.adaptors.get(&r.adaptor) {
            Some(host) => per_host.entry(host.clone()).or_default().push(r),
            None => {
                results.insert(r, ParkResult::Unknown);
            }
        }
    }
    per_host
}

/// `GET /timeout/overdue` of one server.
async fn ask_overdue(
    client: &reqwest::Client,
    url: &str,
) -> Result<Vec<OverdueItem>, TimeoutError> {
    let r = client.get(url).timeout(PEER_REQUEST_TIMEOUT).send().await?;
    if !r.status().is_success() {
        return Err(TimeoutError::PeerStatus(r.status()));
    }
    Ok(r.json::<Vec<OverdueItem>>().await?)
}

/// `POST /timeout/park` to one host; a refusal carries the host's reason.
async fn ask_park(
    client: &reqwest::Client,
    url: &str,
    req: &ParkRequest,
) -> Result<Vec<(ItemRef, ParkResult)>, TimeoutError> {
    let r = client
        .post(url)
        .json(req)
        .timeout(PEER_REQUEST_TIMEOUT)
        .send()
        .await?;
    if !r.status().is_success() {
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        return Err(TimeoutError::PeerRefused {
            status,
            reason: crate::admin::api::ErrorBody::reason_of(&text),
        });
    }
    Ok(r.json::<Vec<(ItemRef, ParkResult)>>().await?)
}

/// The summary mail of a check.
fn summary(
    check: &TimeoutCheck,
    results: &BTreeMap<ItemRef, ParkResult>,
    node: &str,
) -> (String, String) {
    let mut parked = Vec::new();
    let mut finished = Vec::new();
    let mut left = Vec::new();
    for c in &check.items {
        let r = ItemRef::of(&c.item);
        let deadline = if c.item.by_event {
            format!("event deadline {}", rfc3339(c.item.deadline_ms))
        } else {
            format!("adaptor deadline {}", rfc3339(c.item.deadline_ms))
        };
        let line = format!(
            "  {} {} {}\n    on {}, received {}\n    {}",
            r.adaptor,
            r.source,
            r.id,
            c.server,
            rfc3339(c.item.received_ms),
            deadline
        );
        match results.get(&r) {
            Some(ParkResult::Parked) => parked.push(line),
            Some(ParkResult::Finished) => finished.push(line),
            Some(ParkResult::Unknown) => left.push(format!("{line}\n    no longer found")),
            Some(ParkResult::Busy) => left.push(format!("{line}\n    still being delivered")),
            Some(ParkResult::NotHere) => left.push(format!(
                "{line}\n    its adaptor was moving between servers"
            )),
            Some(ParkResult::Failed(why)) => left.push(format!("{line}\n    {why}")),
            None => left.push(format!("{line}\n    its host did not answer")),
        }
    }
    let subject = format!(
        "timeout check {}: {} events parked as timed out",
        check.check,
        parked.len()
    );
    let section = |title: &str, lines: &[String]| {
        if lines.is_empty() {
            String::new()
        } else {
            format!("\n{title} ({}):\n{}\n", lines.len(), lines.join("\n"))
        }
    };
    let body = format!(
        "Timeout check {n} (started by {by} at {at}, finished by {node})\n\
         found {found} events past their deadline.\n\
         {parked_section}{finished_section}{left_section}\n\
         Parked events are on the parking queue with reason \"timed out\".\n\
         Events not parked are looked at again by the next check.",
        n = check.check,
        by = check.by,
        at = rfc3339(check.at_ms),
        found = check.items.len(),
        parked_section = section("Parked", &parked),
        finished_section = section("Finished before they could be parked", &finished),
        left_section = section("Not parked", &left),
    );
    (subject, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, by_event: bool) -> CheckedItem {
        CheckedItem {
            server: "b".into(),
            item: super::super::test_item(id, by_event),
        }
    }

    #[test]
    fn the_summary_names_each_item() {
        let check = TimeoutCheck {
            check: 7,
            by: "a".into(),
            at_ms: 0,
            items: vec![item("1", false), item("2", true), item("3", false)],
        };
        let results = BTreeMap::from([
            (ItemRef::of(&check.items[0].item), ParkResult::Parked),
            (ItemRef::of(&check.items[1].item), ParkResult::Finished),
        ]);
        let (subject, body) = summary(&check, &results, "c");
        assert_eq!(subject, "timeout check 7: 1 events parked as timed out");
        assert!(body.contains("finished by c"));
        assert!(body.contains("Parked (1):\n  hr /hr 1\n"));
        assert!(body.contains("Finished before they could be parked (1):\n  hr /hr 2\n"));
        assert!(body.contains("Not parked (1):\n  hr /hr 3\n"));
        assert!(body.contains("its host did not answer"));
    }
}
