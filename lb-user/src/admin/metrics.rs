//! Prometheus metrics (prometheus-client). Recorded on the request path:
//! requests by route/backend/status, LB-measured time to first byte and end-to-end
//! time, agentlb's own overhead before the upstream answered, upstream errors by
//! kind, retries, stream endings, lineage edges, requests per workflow and agent
//! (label values capped, the rest counted as `_other`). Read at scrape time by
//! collectors: backend in-flight/health/circuit/load, queue depth, workflow table,
//! kernel counters and dataplane mode.
//!
//! Label values that come from outside agentlb's code — workflow and agent ids
//! (request headers and bodies), backend names (configuration and the admin API) —
//! are [`Escaped`]: prometheus-client's text encoder writes label values as they
//! are, so a `"` in an id could otherwise close the value and forge labels or break
//! the exposition.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    controller::Controller,
    dataplane::Dataplane,
    model::CircuitState,
    proxy::{limits::Limiter, stream::Outcome},
};

/// A label value agentlb does not control, escaped when encoded as the text
/// exposition formats require (`\` → `\\`, `"` → `\"`, newline → `\n`;
/// prometheus-client's text encoder does not escape label values itself).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Escaped<T>(pub T);

impl<T: std::fmt::Display> EncodeLabelValue for Escaped<T> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        write!(EscapeWriter(encoder), "{}", self.0)
    }
}

/// Writes through to `W`, escaping a label value.
struct EscapeWriter<'a, W>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for EscapeWriter<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            self.0.write_str(&rest[..i])?;
            self.0.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        self.0.write_str(rest)
    }
}

/// `{route, backend, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route (`chat`, `completions`, `embeddings`, `models`, `health`, `other`).
    pub route: &'static str,
    /// Backend name (`none` when no backend answered).
    pub backend: Escaped<Arc<String>>,
    /// HTTP status returned to the client.
    pub status: u16,
}

/// `{route}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route.
    pub route: &'static str,
}

/// `{backend, kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Backend name.
    pub backend: Escaped<String>,
    /// `connect`, `io`, `timeout`, `status`.
    pub kind: &'static str,
}

/// `{reason}` / `{outcome}` style single label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Value.
    pub kind: &'static str,
}

/// Labels of a KV-event source's counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KvSourceLabels {
    /// Backend name.
    pub backend: Escaped<String>,
    /// Data-parallel rank.
    pub rank: u32,
    /// What is counted.
    pub kind: &'static str,
}

/// `{policy, reason}` of a routing decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReasonLabels {
    /// Policy name.
    pub policy: &'static str,
    /// [`crate::controller::Reason`] label.
    pub reason: &'static str,
}

/// `{backend, policy}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendPolicyLabels {
    /// Backend name.
    pub backend: Escaped<Arc<String>>,
    /// Policy name.
    pub policy: &'static str,
}

/// `{workflow}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkflowLabel {
    /// Workflow id (or `_other` past the cap).
    pub workflow: Escaped<String>,
}

/// `{agent}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    /// Agent id (or `_other` past the cap).
    pub agent: Escaped<String>,
}

/// Bounded set of label values.
#[derive(Debug)]
struct LabelCap {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl LabelCap {
    fn get(&self, v: &str) -> String {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(v) {
            return v.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(v.to_owned());
            return v.to_owned();
        }
        "_other".to_owned()
    }
}

/// A cached `requests` series: (backend label, route, status, counter).
type AnsweredSeries = (Arc<String>, &'static str, u16, Counter);

/// All metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The `backend` label of answers agentlb made itself.
    none: Arc<String>,
    /// Recently used `requests` series by (backend label, route, status): a
    /// short scan instead of hashing the label set per request. The `Arc`s kept
    /// here keep their addresses unique while cached.
    answered_cache: Mutex<Vec<AnsweredSeries>>,
    requests: Family<RequestLabels, Counter>,
    /// Per-route series of the time to first byte and the duration, looked up
    /// once here instead of per request (index: [`route_index`]).
    ttfb_by_route: Vec<Histogram>,
    e2e_by_route: Vec<Histogram>,
    /// Endings by [`Outcome`] (index: [`outcome_index`]).
    endings_by_kind: Vec<Counter>,
    overhead: Histogram,
    head: Histogram,
    upstream_errors: Family<ErrorLabels, Counter>,
    retries: Family<KindLabel, Counter>,
    pd: Family<KindLabel, Counter>,
    lineage: Counter,
    wf_requests: Family<WorkflowLabel, Counter>,
    agent_requests: Family<AgentLabel, Counter>,
    routed: Family<RouteReasonLabels, Counter>,
    owner_lookups: Family<KindLabel, Counter>,
    predicted_cached: Family<BackendPolicyLabels, Counter>,
    reported_cached: Family<BackendPolicyLabels, Counter>,
    wf_cap: LabelCap,
    agent_cap: LabelCap,
    connections: Family<PathLabel, Counter>,
    connections_open: Family<PathLabel, Gauge>,
    connections_refused: Counter,
    memory_trims: Counter,
    handoffs: Counter,
    handoff_refusals: Family<ReasonLabel, Counter>,
    pinned_closes: Family<ReasonLabel, Counter>,
    bytes: Family<BytesLabels, Counter>,
    conn_events: Family<ConnEventLabels, Counter>,
    /// `bytes{path="user"}` series, held so a request adds without a lookup.
    user_to_upstream: Counter,
    user_to_client: Counter,
}

/// `{backend, end}` of `agentlb_backend_connection_ends_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnEventLabels {
    /// Backend name.
    pub backend: Escaped<Arc<String>>,
    /// `peer_closed` or `aborted`.
    pub end: &'static str,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Reason.
    pub reason: &'static str,
}

/// `{path, direction}` of `agentlb_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `kernel` or `user`.
    pub path: &'static str,
    /// `to_upstream` or `to_client`.
    pub direction: &'static str,
}

/// `{path}`: `user` (the userspace engine) or `kernel` (a pair handed to the
/// kernel's sockmap).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// Data path.
    pub path: &'static str,
}

/// Every value of the `route` label.
pub const ROUTES: [&str; 12] = [
    "chat",
    "completions",
    "embeddings",
    "responses",
    "models",
    "health",
    "tokenize",
    "score",
    "rerank",
    "pooling",
    "audio",
    "other",
];

fn route_index(route: &str) -> usize {
    ROUTES
        .iter()
        .position(|r| *r == route)
        .unwrap_or(ROUTES.len() - 1)
}

const OUTCOMES: [(Outcome, &str); 4] = [
    (Outcome::Complete, "complete"),
    (Outcome::UpstreamFailed, "upstream_failed"),
    (Outcome::TimedOut, "timed_out"),
    (Outcome::ClientGone, "client_gone"),
];

fn outcome_index(o: Outcome) -> usize {
    OUTCOMES.iter().position(|(k, _)| *k == o).unwrap_or(0)
}

fn latency_hist() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

impl Metrics {
    /// Registers everything, including the scrape-time collectors.
    pub fn new(
        dataplane: Arc<Dataplane>,
        controller: Arc<Controller>,
        limiter: Arc<Limiter>,
        max_labels: usize,
    ) -> Self {
        let mut r = Registry::with_prefix("agentlb");
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "requests",
            "Requests answered, by route, backend and status",
            requests.clone(),
        );
        let ttfb = Family::<RouteLabel, Histogram>::new_with_constructor(latency_hist);
        r.register(
            "time_to_first_byte_seconds",
            "Request received to first response body byte (TTFT for streams), measured by agentlb",
            ttfb.clone(),
        );
        let e2e = Family::<RouteLabel, Histogram>::new_with_constructor(latency_hist);
        r.register(
            "request_duration_seconds",
            "Request received to last response byte",
            e2e.clone(),
        );
        let overhead = Histogram::new(exponential_buckets(0.000_005, 2.0, 20));
        r.register(
            "proxy_overhead_seconds",
            "Request received to first upstream attempt sent: agentlb's own latency (body read, parsing, admission, routing)",
            overhead.clone(),
        );
        let head = Histogram::new(exponential_buckets(0.0005, 2.0, 20));
        r.register(
            "response_head_seconds",
            "Request received to upstream response head (includes queueing and retries)",
            head.clone(),
        );
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        r.register(
            "upstream_errors",
            "Failed upstream attempts by backend and kind",
            upstream_errors.clone(),
        );
        let retries = Family::<KindLabel, Counter>::default();
        r.register(
            "retries",
            "Attempts retried on another backend, by the failure that caused them",
            retries.clone(),
        );
        let pd = Family::<KindLabel, Counter>::default();
        r.register(
            "pd_requests",
            "Requests under the disaggregated policy by path: disaggregated (prefill then \
             decode leg), prefill_failed / no_prefill / decode_failed (served by a unified \
             backend instead), client_params (the client sent its own kv_transfer_params)",
            pd.clone(),
        );
        let endings = Family::<KindLabel, Counter>::default();
        r.register(
            "response_endings",
            "How streamed responses ended: complete, upstream_failed, timed_out, client_gone",
            endings.clone(),
        );
        let lineage = Counter::default();
        r.register(
            "lineage_edges",
            "Parent->child request edges seen",
            lineage.clone(),
        );
        let wf_requests = Family::<WorkflowLabel, Counter>::default();
        r.register(
            "workflow_requests",
            "Requests per workflow",
            wf_requests.clone(),
        );
        let agent_requests = Family::<AgentLabel, Counter>::default();
        r.register(
            "agent_requests",
            "Requests per agent",
            agent_requests.clone(),
        );
        let routed = Family::<RouteReasonLabels, Counter>::default();
        r.register(
            "routed_requests",
            "Routing decisions by policy and reason (home, spill, placed, migrated, implicit, owner, balanced, session)",
            routed.clone(),
        );
        let owner_lookups = Family::<KindLabel, Counter>::default();
        r.register(
            "response_owner_lookups",
            "Responses API ids this replica had not seen, looked up on every backend (found / not_found)",
            owner_lookups.clone(),
        );
        let predicted_cached = Family::<BackendPolicyLabels, Counter>::default();
        r.register(
            "predicted_cached_tokens",
            "Prompt tokens agentlb predicted the chosen backend had cached; context-reuse efficiency = reported_cached_tokens / predicted_cached_tokens",
            predicted_cached.clone(),
        );
        let reported_cached = Family::<BackendPolicyLabels, Counter>::default();
        r.register(
            "reported_cached_tokens",
            "Prompt tokens the backend reported as cached (usage.prompt_tokens_details.cached_tokens)",
            reported_cached.clone(),
        );
        let connections = Family::<PathLabel, Counter>::default();
        r.register(
            "connections",
            "Client connections accepted, by data path",
            connections.clone(),
        );
        let connections_open = Family::<PathLabel, Gauge>::default();
        r.register(
            "connections_open",
            "Client connections open now, by data path",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        r.register(
            "connections_at_limit",
            "Times the proxy listener stopped accepting because limits.max_connections were open",
            connections_refused.clone(),
        );
        let memory_trims = Counter::default();
        r.register(
            "memory_trims",
            "Times freed heap memory was returned to the system after client connections closed (limits.memory_trim_ms)",
            memory_trims.clone(),
        );
        let handoffs = Counter::default();
        r.register(
            "kernel_handoffs",
            "Client/upstream connection pairs handed to the kernel after their first request (kernel.pinning)",
            handoffs.clone(),
        );
        let handoff_refusals = Family::<ReasonLabel, Counter>::default();
        r.register(
            "kernel_handoff_refusals",
            "Hand-offs not made, by reason: pipelined, no_tail, map_error, race, disabled",
            handoff_refusals.clone(),
        );
        let pinned_closes = Family::<ReasonLabel, Counter>::default();
        r.register(
            "pinned_pair_closes",
            "Pinned pairs closed, by reason: client_closed, backend_closed, passed_to_user, idle, lifetime, backend_not_routable, kill_switch, shutdown, error",
            pinned_closes.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        r.register(
            "bytes",
            "Bytes forwarded by data path and direction (user: written by the engine, per request; kernel: counted when a pinned pair closes)",
            bytes.clone(),
        );
        let user_bytes = |direction| {
            bytes
                .get_or_create(&BytesLabels {
                    path: "user",
                    direction,
                })
                .clone()
        };
        let (user_to_upstream, user_to_client) =
            (user_bytes("to_upstream"), user_bytes("to_client"));
        let conn_events = Family::<ConnEventLabels, Counter>::default();
        r.register(
            "backend_connection_ends",
            "Backend connections the kernel saw closed by the backend (peer_closed) or reset (aborted), as reported to the controller",
            conn_events.clone(),
        );
        r.register_collector(Box::new(TcpCollector {
            dataplane: dataplane.clone(),
            controller: controller.clone(),
        }));
        r.register_collector(Box::new(KernelCollector(dataplane)));
        r.register_collector(Box::new(StateCollector {
            controller,
            limiter,
        }));
        let series = |f: &Family<RouteLabel, Histogram>| -> Vec<Histogram> {
            ROUTES
                .iter()
                .map(|route| f.get_or_create(&RouteLabel { route }).clone())
                .collect()
        };
        Self {
            registry: r,
            none: Arc::new("none".to_owned()),
            answered_cache: Mutex::default(),
            requests,
            ttfb_by_route: series(&ttfb),
            e2e_by_route: series(&e2e),
            endings_by_kind: OUTCOMES
                .iter()
                .map(|(_, kind)| endings.get_or_create(&KindLabel { kind }).clone())
                .collect(),
            overhead,
            head,
            upstream_errors,
            retries,
            pd,
            lineage,
            wf_requests,
            agent_requests,
            routed,
            owner_lookups,
            predicted_cached,
            reported_cached,
            wf_cap: LabelCap {
                seen: Mutex::default(),
                max: max_labels,
            },
            agent_cap: LabelCap {
                seen: Mutex::default(),
                max: max_labels,
            },
            connections,
            connections_open,
            connections_refused,
            memory_trims,
            handoffs,
            handoff_refusals,
            pinned_closes,
            conn_events,
            user_to_upstream,
            user_to_client,
            bytes,
        }
    }

    /// Bytes the engine wrote to a backend (a request's head and body) and to a client
    /// (response heads and bodies, and agentlb's own answers).
    pub fn user_bytes(&self, to_upstream: u64, to_client: u64) {
        if to_upstream > 0 {
            self.user_to_upstream.inc_by(to_upstream);
        }
        if to_client > 0 {
            self.user_to_client.inc_by(to_client);
        }
    }

    /// A pair was handed to the kernel: its connection moves from the `user`
    /// to the `kernel` path.
    pub fn handoff(&self) {
        self.handoffs.inc();
        self.connections_open
            .get_or_create(&PathLabel { path: "user" })
            .dec();
        self.connection_opened("kernel");
    }

    /// The kernel reported a connection to `backend` ended (`end`).
    pub fn conn_event(&self, backend: &Arc<String>, end: &'static str) {
        self.conn_events
            .get_or_create(&ConnEventLabels {
                backend: Escaped(backend.clone()),
                end,
            })
            .inc();
    }

    /// A hand-off was not made.
    pub fn handoff_refused(&self, reason: &'static str) {
        self.handoff_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A pinned pair closed after the kernel forwarded these bytes.
    pub fn pinned_closed(&self, reason: &'static str, to_upstream: u64, to_client: u64) {
        self.pinned_closes
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.bytes
            .get_or_create(&BytesLabels {
                path: "kernel",
                direction: "to_upstream",
            })
            .inc_by(to_upstream);
        self.bytes
            .get_or_create(&BytesLabels {
                path: "kernel",
                direction: "to_client",
            })
            .inc_by(to_client);
    }

    /// A client connection was accepted on `path`.
    pub fn connection_opened(&self, path: &'static str) {
        self.connections.get_or_create(&PathLabel { path }).inc();
        self.connections_open
            .get_or_create(&PathLabel { path })
            .inc();
    }

    /// A client connection on `path` ended.
    pub fn connection_closed(&self, path: &'static str) {
        self.connections_open
            .get_or_create(&PathLabel { path })
            .dec();
    }

    /// The listener reached `limits.max_connections`.
    pub fn connections_at_limit(&self) {
        self.connections_refused.inc();
    }

    /// Freed memory was returned to the system.
    pub fn memory_trimmed(&self) {
        self.memory_trims.inc();
    }

    /// A response head was sent by `backend`.
    pub fn answered(&self, route: &'static str, backend: &Arc<String>, status: u16) {
        const CACHED: usize = 64;
        let mut cache = self
            .answered_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((.., c)) = cache
            .iter()
            .find(|(b, r, s, _)| Arc::ptr_eq(b, backend) && *r == route && *s == status)
        {
            c.inc();
            return;
        }
        let counter = self
            .requests
            .get_or_create(&RequestLabels {
                route,
                backend: Escaped(backend.clone()),
                status,
            })
            .clone();
        counter.inc();
        if cache.len() >= CACHED {
            cache.remove(0);
        }
        cache.push((backend.clone(), route, status, counter));
    }

    /// agentlb answered itself (no backend).
    pub fn answered_locally(&self, route: &'static str, status: u16) {
        self.answered(route, &self.none, status);
    }

    /// agentlb's own time before the first upstream attempt.
    pub fn overhead(&self, secs: f64) {
        self.overhead.observe(secs);
    }

    /// Time until the upstream response head.
    pub fn response_head(&self, secs: f64) {
        self.head.observe(secs);
    }

    /// First body byte sent.
    pub fn first_byte(&self, route: &'static str, secs: f64) {
        self.ttfb_by_route[route_index(route)].observe(secs);
    }

    /// Response finished (or ended early).
    pub fn finished(&self, route: &'static str, secs: f64, outcome: Outcome) {
        self.e2e_by_route[route_index(route)].observe(secs);
        self.endings_by_kind[outcome_index(outcome)].inc();
    }

    /// A failed upstream attempt.
    pub fn upstream_error(&self, backend: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                backend: Escaped(backend.to_owned()),
                kind,
            })
            .inc();
    }

    /// A retry.
    pub fn retry(&self, kind: &'static str) {
        self.retries.get_or_create(&KindLabel { kind }).inc();
    }

    /// One request under the `disaggregated` policy, by the path it took.
    pub fn pd(&self, kind: &'static str) {
        self.pd.get_or_create(&KindLabel { kind }).inc();
    }

    /// A new lineage edge.
    pub fn lineage_edge(&self) {
        self.lineage.inc();
    }

    /// A routing decision.
    pub fn routed(&self, policy: &'static str, reason: crate::controller::Reason) {
        self.routed
            .get_or_create(&RouteReasonLabels {
                policy,
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A Responses API owner lookup on the backends.
    pub fn response_owner_lookup(&self, found: bool) {
        let kind = if found { "found" } else { "not_found" };
        self.owner_lookups.get_or_create(&KindLabel { kind }).inc();
    }

    /// Predicted vs reported cached prompt tokens of one response.
    pub fn cache_reuse(
        &self,
        backend: &Arc<String>,
        policy: &'static str,
        predicted: u64,
        reported: u64,
    ) {
        let l = BackendPolicyLabels {
            backend: Escaped(backend.clone()),
            policy,
        };
        self.predicted_cached.get_or_create(&l).inc_by(predicted);
        self.reported_cached.get_or_create(&l).inc_by(reported);
    }

    /// A request of a workflow (and agent).
    pub fn workflow_request(&self, workflow: &str, agent: Option<&str>) {
        self.wf_requests
            .get_or_create(&WorkflowLabel {
                workflow: Escaped(self.wf_cap.get(workflow)),
            })
            .inc();
        if let Some(a) = agent {
            self.agent_requests
                .get_or_create(&AgentLabel {
                    agent: Escaped(self.agent_cap.get(a)),
                })
                .inc();
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Kernel counters and dataplane mode.
#[derive(Debug)]
struct KernelCollector(Arc<Dataplane>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: &'static str,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mode = ConstGauge::new(i64::from(self.0.is_kernel()));
        mode.encode(encoder.encode_descriptor(
            "kernel_dataplane_active",
            "1 when the kernel programs are attached, 0 in userspace-only mode",
            None,
            mode.metric_type(),
        )?)?;
        let counters = self.0.counters();
        if counters.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "kernel_events",
            "Kernel program counters, summed over CPUs",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in counters {
            ConstCounter::new(value)
                .encode(family.encode_family(&CounterLabel { counter: name })?)?;
        }
        Ok(())
    }
}

/// `sock_ops`' TCP statistics of the connections to each backend (`ALB_TCP`).
#[derive(Debug)]
struct TcpCollector {
    dataplane: Arc<Dataplane>,
    controller: Arc<Controller>,
}

impl Collector for TcpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.dataplane.tcp_stats();
        if stats.is_empty() {
            return Ok(());
        }
        let named: Vec<(String, crate::dataplane::TcpStats)> = stats
            .into_iter()
            .map(|(addr, st)| {
                let name = self
                    .controller
                    .backend_by_addr(addr)
                    .map_or_else(|| addr.to_string(), |b| b.name.clone());
                (name, st)
            })
            .collect();
        {
            let mut fam = encoder.encode_descriptor(
                "backend_tcp_srtt_seconds",
                "Kernel's smoothed RTT of the latest sample on agentlb's connections to the backend",
                None,
                MetricType::Gauge,
            )?;
            for (name, st) in &named {
                ConstGauge::new(f64::from(st.srtt_us) / 1e6).encode(fam.encode_family(
                    &BackendLabel {
                        backend: Escaped(name.clone()),
                    },
                )?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "backend_tcp_retransmits",
                "Segments retransmitted on agentlb's connections to the backend",
                None,
                MetricType::Counter,
            )?;
            for (name, st) in &named {
                ConstCounter::new(st.retransmits).encode(fam.encode_family(&BackendLabel {
                    backend: Escaped(name.clone()),
                })?)?;
            }
        }
        let mut fam = encoder.encode_descriptor(
            "backend_tcp_closes",
            "agentlb's connections to the backend that the backend closed (peer_closed) or that were reset (aborted)",
            None,
            MetricType::Counter,
        )?;
        for (name, st) in &named {
            for (end, n) in [("peer_closed", st.peer_closes), ("aborted", st.aborts)] {
                ConstCounter::new(n).encode(fam.encode_family(&TcpCloseLabels {
                    backend: Escaped(name.clone()),
                    end,
                })?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpCloseLabels {
    backend: Escaped<String>,
    end: &'static str,
}

/// Backend state, queue and workflow table at scrape time.
#[derive(Debug)]
struct StateCollector {
    controller: Arc<Controller>,
    limiter: Arc<Limiter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: Escaped<String>,
}

fn gauge_family<F: Fn(&crate::model::Backend) -> f64>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    backends: &[Arc<crate::model::Backend>],
    f: F,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for b in backends {
        ConstGauge::new(f(b)).encode(family.encode_family(&BackendLabel {
            backend: Escaped(b.name.clone()),
        })?)?;
    }
    Ok(())
}

/// The KV index and its sources.
fn encode_kv(
    encoder: &mut DescriptorEncoder,
    kv: &crate::kv::KvRouting,
    backends: &[Arc<crate::model::Backend>],
) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let ix = &kv.index;
    ConstGauge::new(ix.len() as i64).encode(encoder.encode_descriptor(
        "kv_index_blocks",
        "Blocks in the KV-event index",
        None,
        MetricType::Gauge,
    )?)?;
    ConstGauge::new(ix.bytes() as i64).encode(encoder.encode_descriptor(
        "kv_index_bytes",
        "Approximate memory of the KV-event index",
        None,
        MetricType::Gauge,
    )?)?;
    ConstCounter::new(ix.evictions()).encode(encoder.encode_descriptor(
        "kv_index_evictions",
        "Blocks evicted from the full KV-event index (ended workflows' first)",
        None,
        MetricType::Counter,
    )?)?;
    ConstCounter::new(kv.tokenize_errors.load(Relaxed)).encode(encoder.encode_descriptor(
        "kv_tokenize_errors",
        "Requests whose prompt could not be tokenized (routed by the approximate index)",
        None,
        MetricType::Counter,
    )?)?;
    let states = kv.states();
    let name = |id: crate::model::BackendId| {
        backends
            .iter()
            .find(|b| b.id == id)
            .map_or_else(|| id.to_string(), |b| b.name.clone())
    };
    {
        let mut fam = encoder.encode_descriptor(
            "kv_events",
            "KV-event batches per source: applied (live or replayed), replayed, dropped (lost beyond replay or undecodable), gaps, restarts, resets (view dropped)",
            None,
            MetricType::Counter,
        )?;
        for st in &states {
            for (kind, c) in [
                ("applied", &st.applied),
                ("replayed", &st.replayed),
                ("dropped", &st.dropped),
                ("gaps", &st.gaps),
                ("restarts", &st.restarts),
                ("resets", &st.resets),
            ] {
                ConstCounter::new(c.load(Relaxed)).encode(fam.encode_family(
                    &KvSourceLabels {
                        backend: Escaped(name(st.spec.backend)),
                        rank: st.spec.dp_rank,
                        kind,
                    },
                )?)?;
            }
        }
    }
    let mut fam = encoder.encode_descriptor(
        "kv_source_fresh",
        "1 while a source's events are fresh (its backend is routed by them)",
        None,
        MetricType::Gauge,
    )?;
    for st in &states {
        ConstGauge::new(i64::from(st.fresh())).encode(fam.encode_family(&KvSourceLabels {
            backend: Escaped(name(st.spec.backend)),
            rank: st.spec.dp_rank,
            kind: "fresh",
        })?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let backends = self.controller.backends();
        gauge_family(
            &mut encoder,
            "backend_inflight",
            "Requests in flight per backend",
            &backends,
            |b| b.inflight() as f64,
        )?;
        gauge_family(
            &mut encoder,
            "backend_healthy",
            "1 if the active health check passes",
            &backends,
            |b| {
                f64::from(u8::from(
                    b.healthy.load(std::sync::atomic::Ordering::Relaxed),
                ))
            },
        )?;
        gauge_family(
            &mut encoder,
            "backend_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            &backends,
            |b| match b.circuit_state() {
                CircuitState::Closed => 0.0,
                CircuitState::HalfOpen => 1.0,
                CircuitState::Open => 2.0,
            },
        )?;
        gauge_family(
            &mut encoder,
            "backend_draining",
            "1 while draining",
            &backends,
            |b| {
                f64::from(u8::from(
                    b.draining.load(std::sync::atomic::Ordering::Relaxed),
                ))
            },
        )?;
        gauge_family(
            &mut encoder,
            "backend_queue",
            "vllm:num_requests_waiting as last scraped",
            &backends,
            |b| b.load().waiting,
        )?;
        gauge_family(
            &mut encoder,
            "backend_kv_usage",
            "KV-cache usage (0..1) as last scraped",
            &backends,
            |b| b.load().kv_usage,
        )?;
        let q = ConstGauge::new(self.limiter.waiting() as i64);
        q.encode(encoder.encode_descriptor(
            "queue_depth",
            "Requests waiting for a slot",
            None,
            MetricType::Gauge,
        )?)?;
        let a = ConstGauge::new(self.controller.workflows.active() as i64);
        a.encode(encoder.encode_descriptor(
            "active_workflows",
            "Workflows with a request in flight",
            None,
            MetricType::Gauge,
        )?)?;
        let t = ConstGauge::new(self.controller.workflows.len() as i64);
        t.encode(encoder.encode_descriptor(
            "tracked_workflows",
            "Workflows in the table",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(ix) = &self.controller.prefix {
            let g = ConstGauge::new(ix.len() as i64);
            g.encode(encoder.encode_descriptor(
                "prefix_index_blocks",
                "Blocks in the approximate prefix index",
                None,
                MetricType::Gauge,
            )?)?;
            let g = ConstGauge::new(ix.bytes() as i64);
            g.encode(encoder.encode_descriptor(
                "prefix_index_bytes",
                "Approximate memory of the prefix index",
                None,
                MetricType::Gauge,
            )?)?;
            let c = ConstCounter::new(ix.evictions());
            c.encode(encoder.encode_descriptor(
                "prefix_index_evictions",
                "Blocks evicted from the full prefix index (ended workflows' first)",
                None,
                MetricType::Counter,
            )?)?;
            let c = ConstCounter::new(ix.dropped_writes());
            c.encode(encoder.encode_descriptor(
                "prefix_index_dropped_writes",
                "Prefix index writes dropped because its writer thread's queue was full",
                None,
                MetricType::Counter,
            )?)?;
        }
        if let Some(kv) = &self.controller.kv {
            encode_kv(&mut encoder, kv, &backends)?;
        }
        let ds = &self.controller.decisions.stats;
        {
            let mut fam = encoder.encode_descriptor(
                "decisions",
                "Workflow -> backend decisions handed to the single writer (published, dropped: channel full)",
                None,
                MetricType::Counter,
            )?;
            for (kind, c) in [("published", &ds.published), ("dropped", &ds.dropped)] {
                ConstCounter::new(c.load(std::sync::atomic::Ordering::Relaxed))
                    .encode(fam.encode_family(&KindLabel { kind })?)?;
            }
        }
        let g = ConstGauge::new(ds.entries.load(std::sync::atomic::Ordering::Relaxed) as i64);
        g.encode(encoder.encode_descriptor(
            "decision_entries",
            "Workflows in the published decision map",
            None,
            MetricType::Gauge,
        )?)?;
        let st = &self.controller.prewarm.stats;
        {
            let mut fam = encoder.encode_descriptor(
            "migrations",
            "Workflows moved off a failed, drained or removed home, and their pre-warm requests (ok, failed, skipped: nothing kept)",
            None,
            MetricType::Counter,
        )?;
            for (kind, c) in [
                ("migrated", &st.migrated),
                ("prewarm_ok", &st.ok),
                ("prewarm_failed", &st.failed),
                ("prewarm_skipped", &st.skipped),
            ] {
                ConstCounter::new(c.load(std::sync::atomic::Ordering::Relaxed))
                    .encode(fam.encode_family(&KindLabel { kind })?)?;
            }
        }
        let g = ConstGauge::new(self.controller.prewarm.bytes() as i64);
        g.encode(encoder.encode_descriptor(
            "prewarm_kept_bytes",
            "Bytes of workflows' latest requests kept for pre-warming",
            None,
            MetricType::Gauge,
        )?)?;
        let g = ConstGauge::new(self.controller.responses.len() as i64);
        g.encode(encoder.encode_descriptor(
            "response_owners",
            "Responses API ids whose owner backend is known",
            None,
            MetricType::Gauge,
        )?)?;
        let e = ConstCounter::new(self.controller.workflows.evictions());
        e.encode(encoder.encode_descriptor(
            "workflow_evictions",
            "Workflows evicted from the full table (ended ones first, then least recently seen idle ones)",
            None,
            MetricType::Counter,
        )?)?;
        let f = ConstCounter::new(
            self.controller
                .workflows
                .full
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        f.encode(encoder.encode_descriptor(
            "workflow_table_full",
            "Requests not tracked because every table entry had requests in flight",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_supplied_label_values_are_escaped() {
        let mut r = Registry::default();
        let f = Family::<WorkflowLabel, Counter>::default();
        r.register("wf", "help", f.clone());
        for id in [r#"x",forged="yes"#, "wf\"}evil{x=\"1\\", "a\nb"] {
            f.get_or_create(&WorkflowLabel {
                workflow: Escaped(id.to_owned()),
            })
            .inc();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encodes");
        assert!(
            out.contains(r#"wf_total{workflow="x\",forged=\"yes"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"wf_total{workflow="wf\"}evil{x=\"1\\"} 1"#),
            "{out}"
        );
        assert!(out.contains(r#"wf_total{workflow="a\nb"} 1"#), "{out}");
        assert_eq!(out.lines().filter(|l| l.starts_with("wf_total")).count(), 3);
    }
}
