//! A server's own side of the timeout check, on every server: it lists the
//! overdue items of the adaptors it hosts, and parks the items of the check
//! under way that the timeout checker asks it to.

use super::{ItemRef, ParkRequest, ParkResult, TimeoutError, rfc3339};
use crate::admin::api::{AdminError, TimeoutPeer};
use crate::config::Config;
use crate::event::Identity;
use crate::repository::{ClaimRefused, OverdueItem, Repository, StoredItem, now_ms};
use crate::stats::Stats;
use crate::topology::{CheckedItem, Fence, TIMEOUT_CHECKER, TimeoutCheck, Topology};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// How long a host waits for its topology replica to reach the check.
const REPLICA_WAIT: Duration = Duration::from_secs(3);

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

/// What the admin API serves: a failure to list is this server's (500); a
/// park this server cannot take part in now is refused with its reason
/// (409), and the checker asks again or gives the check to the next host.
impl TimeoutPeer for Local {
    fn overdue(
        &self,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<OverdueItem>, AdminError>> {
        Box::pin(async move {
            Local::overdue(self, limit)
                .await
                .map_err(|e| AdminError::Internal(e.to_string()))
        })
    }

    fn park(
        self: Arc<Self>,
        request: ParkRequest,
    ) -> futures::future::BoxFuture<'static, Result<Vec<(ItemRef, ParkResult)>, AdminError>> {
        Box::pin(async move {
            Local::park(&self, request)
                .await
                .map_err(|e| AdminError::Refused(e.to_string()))
        })
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
    pub async fn overdue(&self, limit: usize) -> Result<Vec<OverdueItem>, TimeoutError> {
        let state = self.topology.state();
        let timeouts: HashMap<String, u64> = state
            .adaptors
            .iter()
            .filter(|(a, host)| **host == self.node && !state.handovers.contains_key(*a))
            .map(|(a, _)| (a.clone(), self.config.adaptor_timeout(a).as_millis() as u64))
            .collect();
        let repo = self.repo.clone();
        let found =
            tokio::task::spawn_blocking(move || repo.overdue(&timeouts, now_ms(), limit)).await??;
        Ok(found)
    }

    /// Park the items of `req` that are in the recorded check and hosted
    /// here. `Err` when the request itself is refused (stale check, wrong
    /// asker, fenced), with the reason.
    pub async fn park(&self, req: ParkRequest) -> Result<Vec<(ItemRef, ParkResult)>, TimeoutError> {
        let check = self.check_asked(&req).await?;
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
            out.extend(self.park_hosted(&check, &listed, &adaptor, refs).await?);
        }
        Ok(out)
    }

    /// The recorded check that `req` asks about, once this server's
    /// replica has reached the epoch the asker saw; refused if the asker
    /// does not run the timeout checker, the check is not under way, or
    /// this server is fenced.
    async fn check_asked(&self, req: &ParkRequest) -> Result<TimeoutCheck, TimeoutError> {
        let mut rx = self.topology.subscribe();
        let caught_up = tokio::time::timeout(REPLICA_WAIT, async {
            rx.wait_for(|s| s.epoch >= req.epoch).await.is_ok()
        })
        .await
        .unwrap_or(false);
        if !caught_up {
            return Err(TimeoutError::ReplicaBehind { epoch: req.epoch });
        }
        let state = self.topology.state();
        if state.singletons.get(TIMEOUT_CHECKER) != Some(&req.by) {
            return Err(TimeoutError::NotChecker {
                server: req.by.clone(),
            });
        }
        let Some(check) = state
            .timeout_checks
            .pending
            .clone()
            .filter(|c| c.check == req.check)
        else {
            return Err(TimeoutError::NotUnderWay { check: req.check });
        };
        if !self.fence.is_open() {
            return Err(TimeoutError::Fenced {
                node: self.node.clone(),
            });
        }
        Ok(check)
    }

    /// Park the items `refs` of `adaptor`, which is hosted here, and say
    /// per item what became of it.
    async fn park_hosted(
        &self,
        check: &TimeoutCheck,
        listed: &HashMap<ItemRef, &CheckedItem>,
        adaptor: &str,
        refs: Vec<ItemRef>,
    ) -> Result<Vec<(ItemRef, ParkResult)>, TimeoutError> {
        let identities: Vec<Identity> = refs.iter().map(identity).collect();
        let repo = self.repo.clone();
        let a = adaptor.to_owned();
        let found =
            tokio::task::spawn_blocking(move || repo.find_pending(&a, &identities)).await??;
        let mut found: HashMap<ItemRef, StoredItem> = found
            .into_iter()
            .map(|i| {
                let key = ItemRef {
                    adaptor: adaptor.to_owned(),
                    source: i.source.clone(),
                    id: i.id.clone(),
                };
                (key, i)
            })
            .collect();
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let result = match found.remove(&r) {
                Some(item) => {
                    let reason = reason(&listed[&r].item, check.check, &check.by);
                    self.park_one(check.check, &r, item, &reason).await
                }
                None if self.parked_by(check.check, &r) => ParkResult::Parked,
                None => match self.repo.item_state(adaptor, &identity(&r)) {
                    crate::repository::ItemPresence::Done => ParkResult::Finished,
                    _ => ParkResult::Unknown,
                },
            };
            out.push((r, result));
        }
        Ok(out)
    }

    async fn park_one(
        &self,
        check: u64,
        r: &ItemRef,
        item: StoredItem,
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
        self.remember_parked(check, r);
        if let Err(e) = self.repo.complete(&item) {
            tracing::error!(adaptor = %r.adaptor, event = %item.identity(), error = %e, "Cannot remove a parked item from the repository.");
        }
        drop(claim);
        self.stats
            .parked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.metrics.increment(
            "provring_parked_by_reason_total",
            &[
                ("adaptor", &r.adaptor),
                ("reason", crate::metrics::park_class(reason)),
            ],
        );
        tracing::warn!(adaptor = %r.adaptor, event = %item.identity(), %reason, "Event parked.");
        ParkResult::Parked
    }

    /// Note `r` as parked by check `check` (the 16 latest checks are kept).
    fn remember_parked(&self, check: u64, r: &ItemRef) {
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
    }

    fn parked_by(&self, check: u64, r: &ItemRef) -> bool {
        self.parked
            .lock()
            .map(|p| p.iter().any(|(c, set)| *c == check && set.contains(r)))
            .unwrap_or(false)
    }
}

fn identity(r: &ItemRef) -> Identity {
    Identity {
        source: r.source.clone(),
        id: r.id.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_item as item;

    #[test]
    fn a_parking_reason_names_the_deadline_and_the_check() {
        assert_eq!(
            reason(&item("1", false), 7, "a"),
            "timed out: unfinished 1m after receipt (adaptor timeout); timeout check 7 started by a"
        );
        assert!(
            reason(&item("2", true), 7, "a")
                .starts_with("timed out: the event's deadline 1970-01-01T00:01:01.000Z passed")
        );
    }
}
