//! The timeout checker: parks the fleet's events stuck past their deadline,
//! on the one server the topology names (`singletons.timeout-checker`).
//!
//! Every `[timeout_checker] check_interval`:
//! 1. It asks every live server for its overdue items (`GET
//!    /timeout/overdue`): unfinished items older than their adaptor's
//!    `timeout`, or past the event's own `deadline` extension.
//! 2. It records the check and its items in the topology log
//!    ([`Change::CheckStarted`]). From then on the check is the fleet's, not
//!    this server's: whoever runs the timeout checker next finishes it.
//! 3. It asks each adaptor's host to park the check's items (`POST
//!    /timeout/park`). A host parks an item only if it is in the recorded
//!    check, under the item's claim (so never while the executor delivers
//!    it, and never twice), and answers per item.
//! 4. It mails one summary with a `Message-ID` derived from the check, then
//!    records [`Change::CheckFinished`]. A crash between the two sends the
//!    same mail again (same `Message-ID`); nothing else repeats.

use crate::alert::Alerter;
use crate::config::Config;
use crate::event::Identity;
use crate::repository::{ClaimRefused, OverdueItem, Repository, now_ms};
use crate::stats::Stats;
use crate::topology::{
    Change, CheckedItem, Fence, Outcome, TIMEOUT_CHECKER, TimeoutCheck, Topology,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use crate::admin::api::{ItemRef, MAX_ITEMS_PER_CHECK, ParkRequest, ParkResult};

/// How long a check keeps asking about items that are busy (being
/// delivered) or between hosts (an adaptor being handed over).
const SETTLE_LIMIT: Duration = Duration::from_secs(20);
/// Pause between two rounds of asking.
const ROUND_PAUSE: Duration = Duration::from_millis(500);
/// Tries to send a check's summary mail, and the pause between two.
const MAIL_TRIES: u32 = 3;
const MAIL_PAUSE: Duration = Duration::from_secs(2);
/// How long a host waits for its topology replica to reach the check.
const REPLICA_WAIT: Duration = Duration::from_secs(3);

pub use crate::time::rfc3339;

impl ItemRef {
    fn of(item: &OverdueItem) -> ItemRef {
        ItemRef {
            adaptor: item.adaptor.clone(),
            source: item.source.clone(),
            id: item.id.clone(),
        }
    }
}

impl ParkResult {
    /// No need to ask again.
    fn settled(&self) -> bool {
        matches!(
            self,
            ParkResult::Parked | ParkResult::Finished | ParkResult::Unknown
        )
    }
}

/// The host side: lists overdue items and parks them, on every server.
pub struct Local {
    pub config: Config,
    pub node: String,
    pub repo: Repository,
    pub parking: crate::parking::Parking,
    pub topology: Topology,
    pub fence: Fence,
    pub stats: Arc<Stats>,
    /// Items parked here, per recent check (so that a check asked again,
    /// by a taker, hears `parked` for them).
    parked: std::sync::Mutex<VecDeque<(u64, HashSet<ItemRef>)>>,
}

impl crate::admin::api::TimeoutPeer for Local {
    fn overdue(
        &self,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<OverdueItem>, String>> {
        Box::pin(Local::overdue(self, limit))
    }

    fn park(
        self: Arc<Self>,
        request: ParkRequest,
    ) -> futures::future::BoxFuture<'static, Result<Vec<(ItemRef, ParkResult)>, String>> {
        Box::pin(async move { Local::park(&self, request).await })
    }
}

impl Local {
    pub fn new(
        config: Config,
        node: &str,
        repo: Repository,
        parking: crate::parking::Parking,
        topology: Topology,
        fence: Fence,
        stats: Arc<Stats>,
    ) -> Local {
        Local {
            config,
            node: node.to_owned(),
            repo,
            parking,
            topology,
            fence,
            stats,
            parked: std::sync::Mutex::default(),
        }
    }

    /// Up to `limit` overdue items of the adaptors hosted here (not those
    /// being handed over).
    pub async fn overdue(&self, limit: usize) -> Result<Vec<OverdueItem>, String> {
        let state = self.topology.state();
        let timeouts: HashMap<String, u64> = state
            .adaptors
            .iter()
            .filter(|(a, host)| **host == self.node && !state.handovers.contains_key(*a))
            .map(|(a, _)| (a.clone(), self.config.adaptor_timeout(a).as_millis() as u64))
            .collect();
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || repo.overdue(&timeouts, now_ms(), limit))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Park the items of `req` that are in the recorded check and hosted
    /// here. `Err` when the request itself is refused (stale check, wrong
    /// asker, fenced), with the reason.
    pub async fn park(&self, req: ParkRequest) -> Result<Vec<(ItemRef, ParkResult)>, String> {
        let mut rx = self.topology.subscribe();
        let caught_up = tokio::time::timeout(REPLICA_WAIT, async {
            rx.wait_for(|s| s.epoch >= req.epoch).await.is_ok()
        })
        .await
        .unwrap_or(false);
        if !caught_up {
            return Err(format!(
                "this server's topology replica has not reached epoch {} yet",
                req.epoch
            ));
        }
        let state = self.topology.state();
        if state.singletons.get(TIMEOUT_CHECKER) != Some(&req.by) {
            return Err(format!("{} does not run the timeout checker", req.by));
        }
        let Some(check) = state
            .timeout_checks
            .pending
            .clone()
            .filter(|c| c.check == req.check)
        else {
            return Err(format!("timeout check {} is not under way", req.check));
        };
        if !self.fence.is_open() {
            return Err(format!(
                "{} cannot read the topology log (fenced)",
                self.node
            ));
        }
        let listed: HashMap<ItemRef, &CheckedItem> = check
            .items
            .iter()
            .map(|c| (ItemRef::of(&c.item), c))
            .collect();
        let mut by_adaptor: BTreeMap<String, Vec<ItemRef>> = BTreeMap::new();
        let mut out = Vec::new();
        for r in req.items {
            if listed.contains_key(&r) {
                by_adaptor.entry(r.adaptor.clone()).or_default().push(r);
            } else {
                let why = format!("not an item of timeout check {}", req.check);
                out.push((r, ParkResult::Failed(why)));
            }
        }
        for (adaptor, refs) in by_adaptor {
            if !self.fence.hosts(&adaptor) || self.fence.hands_over(&adaptor) {
                out.extend(refs.into_iter().map(|r| (r, ParkResult::NotHere)));
                continue;
            }
            let identities: Vec<Identity> = refs
                .iter()
                .map(|r| Identity {
                    source: r.source.clone(),
                    id: r.id.clone(),
                })
                .collect();
            let repo = self.repo.clone();
            let a = adaptor.clone();
            let found = tokio::task::spawn_blocking(move || repo.find_pending(&a, &identities))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let mut found: HashMap<ItemRef, crate::repository::StoredItem> = found
                .into_iter()
                .map(|i| {
                    let key = ItemRef {
                        adaptor: adaptor.clone(),
                        source: i.source.clone(),
                        id: i.id.clone(),
                    };
                    (key, i)
                })
                .collect();
            for r in refs {
                let result = match found.remove(&r) {
                    Some(item) => {
                        let reason = reason(&listed[&r].item, check.check, &check.by);
                        self.park_one(check.check, &r, item, &reason).await
                    }
                    None if self.parked_by(check.check, &r) => ParkResult::Parked,
                    None => match self.repo.item_state(
                        &adaptor,
                        &Identity {
                            source: r.source.clone(),
                            id: r.id.clone(),
                        },
                    ) {
                        crate::repository::ItemPresence::Done => ParkResult::Finished,
                        _ => ParkResult::Unknown,
                    },
                };
                out.push((r, result));
            }
        }
        Ok(out)
    }

    async fn park_one(
        &self,
        check: u64,
        r: &ItemRef,
        item: crate::repository::StoredItem,
        reason: &str,
    ) -> ParkResult {
        let claim = match self.repo.claim(&item) {
            Ok(c) => c,
            Err(ClaimRefused::Finished) if self.parked_by(check, r) => return ParkResult::Parked,
            Err(ClaimRefused::Finished) => return ParkResult::Finished,
            Err(ClaimRefused::Busy) => return ParkResult::Busy,
        };
        // Hosting is looked at again under the claim: a handover waits for
        // claims to end, so the item cannot leave meanwhile.
        if !self.fence.is_open() || !self.fence.hosts(r.adaptor.as_str()) {
            return ParkResult::NotHere;
        }
        if let Err(e) = self.parking.park_item(&item, reason).await {
            return ParkResult::Failed(format!("cannot publish to the parking queue: {e}"));
        }
        // Remembered before the item is finished, so that a second asker
        // never hears `finished` for it.
        if let Ok(mut parked) = self.parked.lock() {
            if !parked.iter().any(|(c, _)| *c == check) {
                parked.push_back((check, HashSet::new()));
                while parked.len() > 16 {
                    parked.pop_front();
                }
            }
            if let Some((_, set)) = parked.iter_mut().find(|(c, _)| *c == check) {
                set.insert(r.clone());
            }
        }
        if let Err(e) = self.repo.complete(&item) {
            tracing::error!(adaptor = %r.adaptor, event = %item.identity(), error = %e, "Cannot remove a parked item from the repository.");
        }
        drop(claim);
        self.stats
            .parked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(adaptor = %r.adaptor, event = %item.identity(), %reason, "Event parked.");
        ParkResult::Parked
    }

    fn parked_by(&self, check: u64, r: &ItemRef) -> bool {
        self.parked
            .lock()
            .map(|p| p.iter().any(|(c, set)| *c == check && set.contains(r)))
            .unwrap_or(false)
    }
}

/// The parking reason of an item of check `check`.
fn reason(item: &OverdueItem, check: u64, by: &str) -> String {
    let why = if item.by_event {
        format!("the event's deadline {} passed", rfc3339(item.deadline_ms))
    } else {
        format!(
            "unfinished {} after receipt (adaptor timeout)",
            humantime::format_duration(Duration::from_millis(
                item.deadline_ms.saturating_sub(item.received_ms)
            ))
        )
    };
    format!("timed out: {why}; timeout check {check} started by {by}")
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

/// Longest wait for one peer's answer.
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Gather the overdue items of every live server and record a check;
    /// `None` if there are none.
    async fn start(&self, client: &reqwest::Client) -> Result<Option<TimeoutCheck>, String> {
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
            let answer = async {
                let r = client
                    .get(&url)
                    .timeout(PEER_REQUEST_TIMEOUT)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("HTTP {}", r.status()));
                }
                r.json::<Vec<OverdueItem>>()
                    .await
                    .map_err(|e| e.to_string())
            };
            match answer.await {
                Ok(found) => items.extend(found.into_iter().map(|item| CheckedItem {
                    server: id.clone(),
                    item,
                })),
                Err(e) => {
                    tracing::warn!(server = %id, error = %e, "Cannot get the overdue items of a server; it is asked again at the next check.");
                }
            }
        }
        if items.is_empty() {
            return Ok(None);
        }
        items.sort_by_key(|c| (c.item.deadline_ms, c.item.received_ms));
        items.truncate(MAX_ITEMS_PER_CHECK);
        if !self.may_act() {
            return Err("no longer the timeout checker's host, or fenced".into());
        }
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
            .await
            .map_err(|e| e.to_string())?;
        match outcome {
            Some(Outcome::Applied) => {}
            Some(Outcome::Ignored(reason)) => return Err(reason.to_string()),
            None => {
                return Err(
                    "another check is under way, or this server lost the timeout checker".into(),
                );
            }
        }
        let check = self
            .topology
            .state()
            .timeout_checks
            .pending
            .clone()
            .ok_or("the recorded check is gone")?;
        tracing::warn!(
            check = check.check,
            items = check.items.len(),
            "Timeout check started: parking overdue events."
        );
        Ok(Some(check))
    }

    /// Park the check's items at their adaptors' hosts, mail the summary,
    /// record the check as finished.
    async fn finish(
        &self,
        client: &reqwest::Client,
        check: &TimeoutCheck,
        stop: &CancellationToken,
    ) -> Result<u64, String> {
        let mut results: BTreeMap<ItemRef, ParkResult> = BTreeMap::new();
        let limit = Instant::now() + SETTLE_LIMIT;
        loop {
            if stop.is_cancelled() || !self.may_act() {
                return Err("no longer the timeout checker's host, or fenced".into());
            }
            let state = self.topology.state();
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
            if per_host.is_empty() {
                break;
            }
            for (host, refs) in per_host {
                let Some(server) = self.config.servers.get(&host) else {
                    continue;
                };
                let req = ParkRequest {
                    check: check.check,
                    by: self.node.clone(),
                    epoch: state.epoch,
                    items: refs,
                };
                let url = crate::admin::client::admin_url(
                    &self.config,
                    &server.admin_listen,
                    "/timeout/park",
                );
                let answer = async {
                    let r = client
                        .post(&url)
                        .json(&req)
                        .timeout(PEER_REQUEST_TIMEOUT)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if !r.status().is_success() {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        return Err(format!("HTTP {status}: {}", text.trim()));
                    }
                    r.json::<Vec<(ItemRef, ParkResult)>>()
                        .await
                        .map_err(|e| e.to_string())
                };
                match answer.await {
                    Ok(answers) => results.extend(answers),
                    Err(e) => {
                        tracing::warn!(check = check.check, %host, error = %e, "Cannot have the overdue items parked yet.");
                    }
                }
            }
            if Instant::now() > limit {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return Err("stopped".into()),
                _ = tokio::time::sleep(ROUND_PAUSE) => {}
            }
        }
        let parked = results
            .values()
            .filter(|r| **r == ParkResult::Parked)
            .count() as u64;
        if !self.may_act() {
            return Err("no longer the timeout checker's host, or fenced".into());
        }
        let (subject, body) = summary(check, &results, &self.node);
        // The same for whoever finishes the check (the start time is in the
        // log), and new for a log started over under the same namespace.
        let message_id = format!(
            "<timeout-check-{}.{}.{}@provring.invalid>",
            check.check, check.at_ms, self.config.broker.namespace
        );
        // A mail server that is down must not hold up the parking of what
        // the next checks find: a few tries, then the check ends anyway.
        let mut mailed = false;
        for attempt in 0..MAIL_TRIES {
            if attempt > 0 {
                tokio::select! {
                    _ = stop.cancelled() => return Err("stopped".into()),
                    _ = tokio::time::sleep(MAIL_PAUSE) => {}
                }
            }
            if !self.may_act() {
                return Err("no longer the timeout checker's host, or fenced".into());
            }
            if self
                .alerter
                .send_as(&subject, &body, Some(message_id.clone()))
                .await
            {
                mailed = true;
                break;
            }
        }
        if !mailed {
            tracing::error!(
                check = check.check,
                parked,
                "The summary mail of this timeout check could not be sent; the parked events are on the parking queue with reason \"timed out\"."
            );
        }
        let me = self.node.clone();
        let n = check.check;
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
            .await
            .map_err(|e| e.to_string())?;
        if let Some(Outcome::Ignored(reason)) = outcome {
            return Err(reason.to_string());
        }
        tracing::warn!(
            check = n,
            parked,
            items = check.items.len(),
            "Timeout check finished."
        );
        Ok(parked)
    }
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
            item: OverdueItem {
                adaptor: "hr".into(),
                source: "/hr".into(),
                id: id.into(),
                received_ms: 1_000,
                deadline_ms: 61_000,
                by_event,
            },
        }
    }

    #[test]
    fn reasons_and_summary_name_each_item() {
        let i = item("1", false);
        assert_eq!(
            reason(&i.item, 7, "a"),
            "timed out: unfinished 1m after receipt (adaptor timeout); timeout check 7 started by a"
        );
        assert!(
            reason(&item("2", true).item, 7, "a")
                .starts_with("timed out: the event's deadline 1970-01-01T00:01:01.000Z passed")
        );
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
