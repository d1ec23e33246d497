//! One server's wiring: the parts its tasks share, built once by
//! `server::start` and handed to hosting and the takeover as one
//! cheap-to-clone handle.

use crate::alert::Alerter;
use crate::broker::Broker;
use crate::config::Config;
use crate::mirror::Mirror;
use crate::parking::Parking;
use crate::repository::Repository;
use crate::stats::Stats;
use crate::topology::{Fence, Topology};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// A server's shared parts. Cloning it clones one `Arc`.
#[derive(Clone)]
pub struct Node {
    parts: Arc<Parts>,
}

/// What a [`Node`] holds; every part is itself a handle.
pub struct Parts {
    pub config: Config,
    /// This server's name in the cluster file.
    pub id: String,
    pub repo: Repository,
    pub broker: Broker,
    pub parking: Parking,
    pub mirror: Mirror,
    pub stats: Arc<Stats>,
    /// Cancelled by a component that cannot go on safely.
    pub fatal: CancellationToken,
    pub topology: Topology,
    pub alerter: Alerter,
    pub fence: Fence,
    /// During shutdown, the components not finished yet.
    pub finishing: Finishing,
    /// The client for peers' admin APIs
    /// ([`crate::admin::client::peer_client`]).
    pub peers: reqwest::Client,
}

impl Node {
    pub fn new(parts: Parts) -> Node {
        Node {
            parts: Arc::new(parts),
        }
    }
}

impl std::ops::Deref for Node {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.parts
    }
}

/// The components still finishing during a shutdown, named when the grace
/// period runs out.
#[derive(Clone, Default)]
pub struct Finishing(Arc<Mutex<BTreeSet<String>>>);

impl Finishing {
    pub fn begin(&self, name: String) {
        if let Ok(mut f) = self.0.lock() {
            f.insert(name);
        }
    }

    pub fn end(&self, name: &str) {
        if let Ok(mut f) = self.0.lock() {
            f.remove(name);
        }
    }

    /// The names still finishing, in order.
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default()
    }
}
