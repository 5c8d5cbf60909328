//! Domain types shared by the controller, the proxy and the admin API.

use std::{
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::Uri;
use serde::Serialize;

pub use crate::proxy::meta::RequestMeta;

/// Controller-assigned backend id (stable for the life of the backend; also the
/// value published to the kernel).
pub type BackendId = u32;

/// Load reported by the backend's `/metrics` (vLLM names).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct BackendLoad {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (or the older `vllm:gpu_cache_usage_perc`), 0..1.
    pub kv_usage: f64,
    /// KV capacity in tokens: `block_size` × `num_gpu_blocks` of `vllm:cache_config_info`
    /// (0 when the backend does not say).
    pub kv_capacity_tokens: f64,
}

/// Bumped whenever any backend's model list changes.
static MODELS_EPOCH: AtomicU64 = AtomicU64::new(0);

/// How many times a backend's model list has changed in this process: a cache of who
/// serves what is current while this is unchanged.
pub fn models_epoch() -> u64 {
    MODELS_EPOCH.load(Ordering::Acquire)
}

/// KV usage above which a backend counts as loaded: below it, a cached context costs
/// nothing to keep and new work fits without evicting (vLLM preempts near 1.0).
pub const KV_KNEE: f64 = 0.85;
/// Weight of KV usage past the knee, in queued requests per unit of usage: a full cache
/// counts as 1.5 queued requests.
pub const KV_WEIGHT: f64 = 10.0;

impl BackendLoad {
    /// The load the policies balance: requests waiting for the engine, plus KV pressure
    /// once usage passes the knee.
    pub fn score(&self) -> f64 {
        self.waiting + KV_WEIGHT * (self.kv_usage - KV_KNEE).max(0.0)
    }
}

/// What a backend does under the `disaggregated` policy (vLLM prefill/decode
/// disaggregation over a KV connector such as NIXL). Other policies use every backend
/// alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves whole requests (and is the fallback when a disaggregated leg fails).
    #[default]
    Unified,
    /// Computes the prompt's KV (`max_tokens` 1) for a decode instance to pull.
    Prefill,
    /// Pulls the KV a prefill instance computed and generates the answer.
    Decode,
}

impl Role {
    /// Accepted names.
    pub const ALL: [&'static str; 3] = ["unified", "prefill", "decode"];

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unified" | "both" => Some(Self::Unified),
            "prefill" | "producer" => Some(Self::Prefill),
            "decode" | "consumer" => Some(Self::Decode),
            _ => None,
        }
    }

    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unified => "unified",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

/// Circuit-breaker state of a backend (passive health).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Requests flow.
    Closed,
    /// Requests are not sent until the open period ends.
    Open,
    /// One probe request is allowed; its outcome closes or reopens the circuit.
    HalfOpen,
}

#[derive(Debug)]
struct Circuit {
    state: CircuitState,
    failures: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
}

/// A backend instance (a vLLM server) and everything agentlb knows about it.
#[derive(Debug)]
pub struct Backend {
    /// Id.
    pub id: BackendId,
    /// Display name.
    pub name: String,
    /// `name` shared with metric label sets (cloned per request without copying).
    pub label: std::sync::Arc<String>,
    /// Base URL (`http://host:port`).
    pub url: Uri,
    /// Stable hash of the URL's text: the backend's identity in rendezvous hashing
    /// (computed once, not per request).
    pub url_hash: u64,
    /// Resolved addresses (published to the kernel).
    pub addrs: Vec<SocketAddr>,
    /// Prefill, decode or unified (the `disaggregated` policy).
    pub role: Role,
    /// `host:port` of the URL, for upstream request URIs.
    pub authority: http::uri::Authority,
    /// The same as a `Host` header value.
    pub host_header: http::HeaderValue,
    /// Requests currently being proxied to it.
    pub inflight: AtomicU64,
    /// Requests sent to it in total (attempts).
    pub requests: AtomicU64,
    /// Failed attempts (connect errors, resets, timeouts, 5xx).
    pub errors: AtomicU64,
    /// No new requests (admin drain); in-flight ones finish.
    pub draining: AtomicBool,
    /// Active health verdict.
    pub healthy: AtomicBool,
    /// The kernel saw a connection to it closed by the backend or reset since the last
    /// probe: a probe that fails now takes it out of rotation at once.
    pub suspect: AtomicBool,
    /// Consecutive active-probe results (positive: successes, negative: failures).
    pub probe_streak: std::sync::atomic::AtomicI64,
    /// Models served, from `/v1/models` (empty until known); written through
    /// [`Backend::set_models`].
    pub models: ArcSwap<Vec<String>>,
    /// Last scraped load ([`Backend::set_load`] keeps `score` with it).
    load: ArcSwap<BackendLoad>,
    /// [`BackendLoad::score`] of `load` (f64 bits): what routing reads per candidate.
    score: AtomicU64,
    circuit: Mutex<Circuit>,
    /// The circuit is closed: the per-request checks need no lock (a mirror written
    /// under the lock).
    closed: AtomicBool,
    /// Failures counted while closed (a success must take the lock to reset them).
    failing: AtomicBool,
}

impl Backend {
    /// A new, healthy, closed-circuit backend.
    pub fn new(id: BackendId, name: String, url: Uri, addrs: Vec<SocketAddr>) -> Self {
        let authority = url
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let host_header = http::HeaderValue::from_str(authority.as_str())
            .unwrap_or(http::HeaderValue::from_static("localhost"));
        Self {
            id,
            label: std::sync::Arc::new(name.clone()),
            name,
            url_hash: crate::controller::policies::workflow::stable_hash(
                url.to_string().as_bytes(),
            ),
            url,
            addrs,
            role: Role::Unified,
            authority,
            host_header,
            inflight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            suspect: AtomicBool::new(false),
            probe_streak: Default::default(),
            models: ArcSwap::from_pointee(Vec::new()),
            load: ArcSwap::from_pointee(BackendLoad::default()),
            score: AtomicU64::new(0f64.to_bits()),
            circuit: Mutex::new(Circuit {
                state: CircuitState::Closed,
                failures: 0,
                open_until: None,
                probe_in_flight: false,
            }),
            closed: AtomicBool::new(true),
            failing: AtomicBool::new(false),
        }
    }

    /// Stores the models it serves (and tells every cached view of the backends' models
    /// that it is out of date: [`models_epoch`]).
    pub fn set_models(&self, models: Vec<String>) {
        self.models.store(std::sync::Arc::new(models));
        MODELS_EPOCH.fetch_add(1, Ordering::Release);
    }

    /// The last scraped load.
    pub fn load(&self) -> arc_swap::Guard<std::sync::Arc<BackendLoad>> {
        self.load.load()
    }

    /// Stores a scraped load.
    pub fn set_load(&self, l: BackendLoad) {
        self.score.store(l.score().to_bits(), Ordering::Relaxed);
        self.load.store(std::sync::Arc::new(l));
    }

    /// [`BackendLoad::score`] of the last scraped load, read without a snapshot.
    pub fn load_score(&self) -> f64 {
        f64::from_bits(self.score.load(Ordering::Relaxed))
    }

    /// Current in-flight count.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    fn circuit(&self) -> std::sync::MutexGuard<'_, Circuit> {
        self.circuit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Circuit state as seen now (an expired open period reads as half-open).
    pub fn circuit_state(&self) -> CircuitState {
        let c = self.circuit();
        match (c.state, c.open_until) {
            (CircuitState::Open, Some(t)) if Instant::now() >= t => CircuitState::HalfOpen,
            (s, _) => s,
        }
    }

    /// Whether new requests may be routed here (not draining, healthy, circuit
    /// not open; a half-open circuit admits one probe at a time).
    pub fn routable(&self) -> bool {
        if self.draining.load(Ordering::Relaxed) || !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        if self.closed.load(Ordering::Relaxed) {
            return true;
        }
        let c = self.circuit();
        match c.state {
            CircuitState::Closed => true,
            CircuitState::Open => c.open_until.is_some_and(|t| Instant::now() >= t),
            CircuitState::HalfOpen => !c.probe_in_flight,
        }
    }

    /// Called when a request is actually sent: claims the half-open probe slot.
    /// Returns false if the circuit does not admit the request.
    pub fn admit(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return true;
        }
        let mut c = self.circuit();
        match c.state {
            CircuitState::Closed => true,
            CircuitState::Open => {
                if c.open_until.is_some_and(|t| Instant::now() >= t) {
                    c.state = CircuitState::HalfOpen;
                    c.probe_in_flight = true;
                    true
                } else {
                    false
                }
            }
            CircuitState::HalfOpen => {
                if c.probe_in_flight {
                    false
                } else {
                    c.probe_in_flight = true;
                    true
                }
            }
        }
    }

    /// A request to this backend succeeded (response head received).
    pub fn record_success(&self) {
        // Nearly always: closed and nothing to reset.
        if self.closed.load(Ordering::Relaxed) && !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let mut c = self.circuit();
        if c.state != CircuitState::Closed {
            tracing::info!(backend = %self.name, "circuit closed");
        }
        c.state = CircuitState::Closed;
        c.failures = 0;
        c.open_until = None;
        c.probe_in_flight = false;
        self.failing.store(false, Ordering::Relaxed);
        self.closed.store(true, Ordering::Relaxed);
    }

    /// A request to this backend failed before its first byte.
    pub fn record_failure(&self, threshold: u32, open_for: Duration) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut c = self.circuit();
        c.failures = c.failures.saturating_add(1);
        self.failing.store(true, Ordering::Relaxed);
        let open = c.state == CircuitState::HalfOpen || c.failures >= threshold;
        if open {
            self.closed.store(false, Ordering::Relaxed);
            if c.state != CircuitState::Open {
                tracing::warn!(backend = %self.name, failures = c.failures, "circuit opened");
            }
            c.state = CircuitState::Open;
            c.open_until = Some(Instant::now() + open_for);
            c.probe_in_flight = false;
        }
    }

    /// Whether this backend serves `model` (unknown model lists match anything).
    pub fn serves(&self, model: Option<&str>) -> bool {
        match model {
            None => true,
            Some(m) => {
                let models = self.models.load();
                models.is_empty() || models.iter().any(|x| x == m)
            }
        }
    }
}

/// Header carrying the workflow id.
pub const H_WORKFLOW_ID: &str = "x-workflow-id";
/// Header carrying the agent id.
pub const H_AGENT_ID: &str = "x-agent-id";
/// Response header naming the backend that served the request.
pub const H_BACKEND: &str = "x-agentlb-backend";
/// Header carrying the request id.
pub const H_REQUEST_ID: &str = "x-request-id";

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backend {
        Backend::new(
            0,
            "b".into(),
            Uri::from_static("http://127.0.0.1:1"),
            vec![],
        )
    }

    #[test]
    fn circuit_opens_after_threshold_and_half_opens_after_cooldown() {
        let b = b();
        b.record_failure(2, Duration::from_millis(30));
        assert!(b.routable());
        b.record_failure(2, Duration::from_millis(30));
        assert_eq!(b.circuit_state(), CircuitState::Open);
        assert!(!b.routable() && !b.admit());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.routable());
        assert!(b.admit(), "one half-open probe");
        assert!(!b.admit(), "only one probe at a time");
        b.record_failure(2, Duration::from_millis(30));
        assert_eq!(
            b.circuit_state(),
            CircuitState::Open,
            "failed probe reopens"
        );
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.admit());
        b.record_success();
        assert_eq!(b.circuit_state(), CircuitState::Closed);
        assert!(b.admit() && b.admit());
    }

    #[test]
    fn draining_and_unhealthy_are_not_routable() {
        let b = b();
        b.draining.store(true, Ordering::Relaxed);
        assert!(!b.routable());
        b.draining.store(false, Ordering::Relaxed);
        b.healthy.store(false, Ordering::Relaxed);
        assert!(!b.routable());
    }

    #[test]
    fn model_filter() {
        let b = b();
        assert!(b.serves(Some("x")), "unknown list matches");
        b.set_models(vec!["m".into()]);
        assert!(b.serves(Some("m")) && !b.serves(Some("x")) && b.serves(None));
    }
}
