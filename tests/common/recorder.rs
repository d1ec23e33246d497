//! The recording webhook target: what it saw, how it misbehaves on
//! request, and the checks on what it saw (every event once).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the recording webhook saw.
#[derive(Default)]
pub struct Record {
    /// Every request, in arrival order: (Idempotency-Key, body identity).
    pub requests: Vec<(String, String)>,
    /// Effects applied, by body identity ("source|id"): applied once per
    /// Idempotency-Key, as an idempotent target would.
    pub effects: HashMap<String, u32>,
    /// Keys already applied.
    pub keys: HashSet<String>,
    /// Requests answered with a failure.
    pub failed: u64,
    /// Event types applied per `data.userName`, in order.
    pub by_user: HashMap<String, Vec<String>>,
    /// Every request as it arrived: (time, `X-Provring-Node`, identity).
    pub arrivals: Vec<(Instant, String, String)>,
}

/// Behaviour of the recording webhook.
#[derive(Default)]
pub struct Behaviour {
    /// Answer 503 to everything until then.
    pub unavailable_until: Option<Instant>,
    /// Event ids answered with 400.
    pub reject_ids: HashSet<String>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Wait a random time up to this long before answering.
    pub jitter: Option<Duration>,
    /// Event types answered with 503 the first time each event is seen.
    pub fail_first_type: Option<String>,
    /// Events already failed once.
    pub failed_once: HashSet<String>,
    /// Answer 503 to events of this type until then.
    pub fail_type_until: Option<(String, Instant)>,
}

/// The recording webhook target; clones share what it saw and how it
/// behaves, so a test can change the behaviour while servers deliver.
#[derive(Clone, Default)]
pub struct Recorder {
    pub record: Arc<Mutex<Record>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
}

impl Recorder {
    /// Serve on 127.0.0.1 (a free port); returns the webhook URL.
    pub async fn start(&self) -> String {
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/events")
    }

    pub fn distinct_effects(&self) -> usize {
        self.record.lock().expect("lock").effects.len()
    }

    /// Wait until `n` distinct events had their effect, or panic.
    pub async fn wait_for(&self, n: usize, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        let mut last = (0, Instant::now());
        loop {
            let got = self.distinct_effects();
            if got >= n {
                return;
            }
            if got != last.0 {
                last = (got, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "{what}: only {got} of {n} events reached the target within {within:?} (no progress for {:?})",
                last.1.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until no request has arrived for `quiet` (re-deliveries of
    /// items whose completion a kill lost come after the first effects).
    pub async fn wait_quiet(&self, quiet: Duration, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = (usize::MAX, Instant::now());
        loop {
            let n = self.record.lock().expect("lock").requests.len();
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return;
            }
            assert!(Instant::now() < deadline, "the target never went quiet");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every one of `total` events had its effect, and none twice.
    pub fn assert_delivered_once(&self, total: u64) {
        let r = self.record.lock().expect("lock");
        assert_eq!(r.effects.len() as u64, total, "lost events");
        let twice: Vec<_> = r.effects.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "effects applied twice: {twice:?}");
    }

    /// Wait until all `total` events had their effect (see
    /// [`Recorder::wait_for`]) and re-deliveries have ended (see
    /// [`Recorder::wait_quiet`]), then check that none had it twice.
    pub async fn wait_delivered_once(&self, total: u64, within: Duration, what: &str) {
        self.wait_for(total as usize, within, what).await;
        self.wait_quiet(Duration::from_secs(2), Duration::from_secs(30))
            .await;
        self.assert_delivered_once(total);
    }

    /// Requests whose Idempotency-Key had been seen before.
    pub fn duplicate_deliveries(&self) -> u64 {
        let r = self.record.lock().expect("lock");
        let mut seen = HashSet::new();
        r.requests
            .iter()
            .filter(|(k, _)| !seen.insert(k.clone()))
            .count() as u64
    }
}

async fn receive(State(rec): State<Recorder>, headers: HeaderMap, body: String) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let id = json["id"].as_str().unwrap_or("").to_owned();
    let identity = format!("{}|{}", json["source"].as_str().unwrap_or(""), id);
    let node = headers
        .get("x-provring-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    rec.record
        .lock()
        .expect("lock")
        .arrivals
        .push((Instant::now(), node, identity.clone()));
    let (delay, jitter) = {
        let b = rec.behaviour.lock().expect("lock");
        (b.delay, b.jitter)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if let Some(j) = jitter {
        tokio::time::sleep(j.mul_f64(rand::random::<f64>())).await;
    }
    {
        let mut b = rec.behaviour.lock().expect("lock");
        let event_type = json["type"].as_str().unwrap_or("").to_owned();
        let type_down = b
            .fail_type_until
            .as_ref()
            .is_some_and(|(t, until)| *t == event_type && Instant::now() < *until);
        if type_down
            || (b.fail_first_type.as_deref() == Some(event_type.as_str())
                && b.failed_once.insert(identity.clone()))
        {
            rec.record.lock().expect("lock").failed += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let unavailable = b.unavailable_until.is_some_and(|t| Instant::now() < t);
        if unavailable || b.reject_ids.contains(&id) {
            rec.record.lock().expect("lock").failed += 1;
            return if unavailable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
        }
    }
    let mut r = rec.record.lock().expect("lock");
    r.requests.push((key.clone(), identity.clone()));
    if r.keys.insert(key) {
        *r.effects.entry(identity).or_default() += 1;
        let user = json["data"]["userName"].as_str().unwrap_or("").to_owned();
        let event_type = json["type"].as_str().unwrap_or("").to_owned();
        r.by_user.entry(user).or_default().push(event_type);
    }
    StatusCode::OK
}
