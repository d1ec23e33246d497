//! Counters shared by a server's components, for progress logs, the
//! benchmark and `/metrics` (with the histograms of [`Metrics`]).

use crate::metrics::Metrics;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries received from the broker.
    pub received: AtomicU64,
    /// New items written to the repository.
    pub stored: AtomicU64,
    /// Redeliveries of items still in the repository.
    pub duplicates: AtomicU64,
    /// Redeliveries of items already completed (done ledger).
    pub already_done: AtomicU64,
    /// Invalid messages parked on receipt.
    pub invalid: AtomicU64,
    /// Items delivered to their target.
    pub delivered: AtomicU64,
    /// Items parked by the workflow.
    pub parked: AtomicU64,
    /// Transient target errors.
    pub retries: AtomicU64,
    /// New items whose copy the monitor's queue confirmed.
    pub mirrored: AtomicU64,
    /// Failed servers this server took over.
    pub takeovers: AtomicU64,
    /// Batches held at the fence (this server could not tell whether it
    /// still hosts the adaptor) for more than 50 ms.
    pub fence_pauses: AtomicU64,
    /// Histograms, and the recorder `/metrics` renders.
    pub metrics: Metrics,
}

impl Stats {
    /// One line for progress logs.
    pub fn summary(&self) -> String {
        format!(
            "received={} stored={} delivered={} parked={} invalid={} retries={} redelivered={} already_done={}",
            self.received.load(Relaxed),
            self.stored.load(Relaxed),
            self.delivered.load(Relaxed),
            self.parked.load(Relaxed),
            self.invalid.load(Relaxed),
            self.retries.load(Relaxed),
            self.duplicates.load(Relaxed),
            self.already_done.load(Relaxed),
        )
    }

    /// Items whose workflow finished (delivered or parked, or parked on receipt).
    pub fn finished(&self) -> u64 {
        self.delivered.load(Relaxed) + self.parked.load(Relaxed) + self.invalid.load(Relaxed)
    }
}
