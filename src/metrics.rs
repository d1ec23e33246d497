//! Prometheus metrics (`GET /metrics`): a recorder of each server's own,
//! not the process-wide one, because a benchmark runs several servers in
//! one process.
//!
//! Histograms are recorded where things happen ([`Metrics::observe`]);
//! counters and gauges are set from the server's `Stats`, the
//! repository and the topology when `/metrics` is asked
//! ([`Metrics::absolute`], [`Metrics::set`]).

use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Histogram buckets, in seconds: 1 ms to 1 min.
const BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        // The buckets are constant and valid; without them the
        // histograms would be summaries.
        let builder = PrometheusBuilder::new();
        let recorder = match PrometheusBuilder::new().set_buckets(&BUCKETS) {
            Ok(b) => b.build_recorder(),
            Err(_) => builder.build_recorder(),
        };
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, (*v).to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

fn metadata() -> Metadata<'static> {
    Metadata::new("provring", Level::INFO, None)
}

impl Metrics {
    /// Record one observation of a histogram, in seconds.
    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &str)], seconds: f64) {
        self.recorder
            .register_histogram(&key(name, labels), &metadata())
            .record(seconds);
    }

    /// Add one to a counter that only this module's callers count (one
    /// with labels that the server's `Stats` does not have).
    pub fn increment(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.recorder
            .register_counter(&key(name, labels), &metadata())
            .increment(1);
    }

    /// Set a counter to the total counted elsewhere.
    pub fn absolute(&self, name: &'static str, labels: &[(&'static str, &str)], total: u64) {
        self.recorder
            .register_counter(&key(name, labels), &metadata())
            .absolute(total);
    }

    /// Set a gauge.
    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.recorder
            .register_gauge(&key(name, labels), &metadata())
            .set(value);
    }

    /// The Prometheus text of everything recorded.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// The class of a park reason, as the `reason` label of
/// `provring_parked_by_reason_total`: a handful of values, never the
/// reason's text.
pub fn park_class(reason: &str) -> &'static str {
    if reason.starts_with("target refused") {
        "refused"
    } else if reason.starts_with("gave up after") {
        "attempts"
    } else if reason.starts_with("deadline") {
        "deadline"
    } else if reason.starts_with("timed out") {
        "timed_out"
    } else {
        "other"
    }
}
