//! Configuration: raw TOML ([`raw`]) + CLI overrides → a validated [`Config`].
//!
//! Every problem is collected with its path (`backends[1].url: ...`) and reported
//! at once, so `agentlb check-config` shows the whole list in one run. Boot and
//! reload share this code path.

pub mod raw;

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use http::Uri;
use thiserror::Error;

pub use raw::RawConfig;

/// Default proxy listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listen address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
/// Default bpffs pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/agentlb";

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted path of the offending key (`kernel.mode`, `backends[0].url`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// One or more problems; all of them are listed.
    #[error("{} configuration error(s):\n{}", .0.len(), .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

/// How the kernel dataplane is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelMode {
    /// Use it when possible; otherwise run userspace-only and log why.
    Auto,
    /// Fail start-up if it cannot be loaded.
    Required,
    /// Never load it.
    Off,
}

/// XDP attach mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic (skb) mode.
    Auto,
    /// Native only.
    Native,
    /// Generic (skb) only.
    Generic,
}

/// Routing policy names accepted today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyName {
    /// Strict rotation over healthy backends.
    RoundRobin,
    /// Fewest in-flight requests, ties broken by rotation.
    LeastLoaded,
    /// Workflow (or conversation root) affinity by rendezvous hashing, bounded load.
    Workflow,
    /// Session key (`workflows.session_header`) affinity by rendezvous hashing, bounded load.
    Session,
    /// The backend with the longest predicted cached prefix, weighed against its load.
    Prefix,
    /// `prefix` scored with the backends' KV events (exact where they are fresh).
    Kv,
    /// Prefill/decode disaggregation: the prompt's KV computed on a `prefill` backend
    /// (chosen as `kv` chooses), the answer generated on a `decode` backend.
    Disaggregated,
}

impl PolicyName {
    /// All accepted names.
    pub const ALL: [&'static str; 7] = [
        "round_robin",
        "least_loaded",
        "workflow",
        "session",
        "prefix",
        "kv",
        "disaggregated",
    ];

    /// Parses a policy name (`-` and `_` are interchangeable).
    pub fn parse(s: &str) -> Option<Self> {
        match s.replace('-', "_").as_str() {
            "round_robin" => Some(Self::RoundRobin),
            "least_loaded" => Some(Self::LeastLoaded),
            "workflow" => Some(Self::Workflow),
            "session" => Some(Self::Session),
            "prefix" => Some(Self::Prefix),
            "kv" => Some(Self::Kv),
            "disaggregated" | "pd" => Some(Self::Disaggregated),
            _ => None,
        }
    }

    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastLoaded => "least_loaded",
            Self::Workflow => "workflow",
            Self::Session => "session",
            Self::Prefix => "prefix",
            Self::Kv => "kv",
            Self::Disaggregated => "disaggregated",
        }
    }
}

/// A validated backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Display name.
    pub name: String,
    /// Base URL (`http://host:port`), path empty.
    pub url: Uri,
    /// Host part of the URL.
    pub host: String,
    /// Port (80 when the URL has none).
    pub port: u16,
    /// Part under the `disaggregated` policy.
    pub role: crate::model::Role,
}

/// `[kernel]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// Mode.
    pub mode: KernelMode,
    /// bpffs directory for pinned maps.
    pub pin_dir: PathBuf,
    /// Mount bpffs at /sys/fs/bpf when nothing is mounted there.
    pub mount_bpffs: bool,
    /// cgroup path; `None` = `<own cgroup>/agentlb`.
    pub cgroup: Option<PathBuf>,
    /// Move agentlb into the cgroup.
    pub join_cgroup: bool,
    /// Attach sockmap programs and register sockets.
    pub sockmap: bool,
    /// XDP interfaces.
    pub xdp_interfaces: Vec<String>,
    /// XDP mode.
    pub xdp_mode: XdpAttachMode,
    /// Kernel-side log level.
    pub log_level: log::LevelFilter,
    /// Log every socket registration.
    pub log_sockets: bool,
    /// Hand client⇄upstream pairs to the kernel after their first request.
    pub pinning: bool,
    /// A pinned pair with no bytes in either direction for this long is closed.
    pub pin_idle_timeout: Duration,
    /// A pinned pair is closed once quiet after this long.
    pub pin_max_lifetime: Duration,
    /// Quiet time after a response that makes a pinned pair safe to close
    /// (kill switch, lifetime, backend gone).
    pub pin_quiet: Duration,
}

/// `[limits]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Client request-head timeout.
    pub header_read_timeout: Duration,
    /// Graceful shutdown budget.
    pub shutdown_grace: Duration,
    /// Idle upstream connections per backend.
    pub pool_max_idle_per_backend: usize,
    /// Idle upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Body upload timeout.
    pub body_read_timeout: Duration,
    /// After an early error (413, 400, 408...) with the request body unread: how long
    /// agentlb keeps reading and discarding it so the client, which may send the whole
    /// body before reading, gets the answer instead of a reset (nginx's lingering
    /// close). 0: close at once.
    pub linger: Duration,
    /// Most bytes discarded while lingering.
    pub linger_bytes: usize,
    /// Client connections open at once on the proxy listener; at the limit it
    /// stops accepting (new connections wait in the kernel's listen backlog).
    /// Read at start.
    pub max_connections: usize,
    /// Period of the check that returns freed heap memory to the system after
    /// client connections closed (glibc keeps freed memory in its arenas: after
    /// a storm of 5,000 connections the resident set stayed ~10× its level
    /// before). Zero: never. Read at start.
    pub memory_trim: Duration,
    /// Upstream first-byte (response head) timeout.
    pub first_byte_timeout: Duration,
    /// Whole-request timeout.
    pub total_timeout: Duration,
    /// Global in-flight limit.
    pub max_concurrent: usize,
    /// Per-backend in-flight limit.
    pub max_concurrent_per_backend: usize,
    /// Bounded wait queue length.
    pub max_queue: usize,
    /// Queue wait limit.
    pub queue_timeout: Duration,
}

/// `[retry]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Extra attempts.
    pub max_retries: u32,
    /// First backoff.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Budget ratio.
    pub budget_ratio: f64,
    /// Budget floor per window.
    pub budget_min: u32,
}

/// `[health]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Probe period.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Failed probes → unhealthy.
    pub unhealthy_threshold: u32,
    /// Good probes → healthy.
    pub healthy_threshold: u32,
    /// Request failures → circuit open.
    pub circuit_failures: u32,
    /// Open duration.
    pub circuit_open: Duration,
}

/// `[workflows]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowConfig {
    /// Table capacity.
    pub max_workflows: usize,
    /// Idle expiry.
    pub idle_ttl: Duration,
    /// Lineage edges per workflow.
    pub max_edges_per_workflow: usize,
    /// Agents per workflow.
    pub max_agents_per_workflow: usize,
    /// Request ids remembered for lineage inheritance.
    pub max_lineage: usize,
    /// Response ids whose owner is remembered.
    pub max_responses: usize,
    /// Metric label cap.
    pub max_metric_labels: usize,
    /// Id length cap.
    pub max_id_len: usize,
    /// Session header (lower case).
    pub session_header: String,
}

/// Parameters of the routing policies.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// `workflow`: load bound as a multiple of the mean load (≥ 1).
    pub load_bound: f64,
    /// Characters of the first non-system message that belong to a conversation root.
    pub root_chars: usize,
    /// Minimum length of that message for a request to get a conversation root.
    pub root_min_chars: usize,
    /// `workflow`: secondary homes kept per workflow.
    pub secondary_homes: usize,
    /// Responses API follow-ups go to the backend that stored the response (any policy).
    pub follow_response_owner: bool,
    /// `workflow`: place new workflows by predicted KV footprint.
    pub footprint_placement: bool,
    /// `workflow`: spilled workflows stay spilled until the home is back to the mean.
    pub spill_hysteresis: bool,
    /// Prefix index capacity in blocks (0: no index).
    pub prefix_index_blocks: usize,
    /// Prefix index block size, bytes.
    pub prefix_block_bytes: usize,
    /// Blocks hashed at most per request.
    pub prefix_max_blocks: usize,
    /// Prefix index entries older than this do not count (seconds).
    pub prefix_ttl_secs: u64,
    /// Migration pre-warm.
    pub prewarm: crate::controller::prewarm::PrewarmConfig,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            load_bound: 1.25,
            root_chars: 1024,
            root_min_chars: 256,
            secondary_homes: 2,
            follow_response_owner: true,
            footprint_placement: false,
            spill_hysteresis: false,
            prefix_index_blocks: 262_144,
            prefix_block_bytes: 128,
            prefix_max_blocks: 8192,
            prefix_ttl_secs: 600,
            prewarm: crate::controller::prewarm::PrewarmConfig {
                budget_bytes: 256 << 20,
                max_body_bytes: 4 << 20,
                concurrency: 4,
                timeout: Duration::from_secs(30),
            },
        }
    }
}

/// `[kv]`, validated: precise KV-aware routing from the backends' KV events.
#[derive(Debug, Clone, PartialEq)]
pub struct KvConfig {
    /// Ask backends for their sources (`GET /kv_event_sources`).
    pub discover: bool,
    /// Period of discovery for backends without a source.
    pub discover_interval: Duration,
    /// Static sources.
    pub sources: Vec<KvSourceConfig>,
    /// Tokens per block.
    pub block_size: usize,
    /// Index capacity in blocks (also the bound of each source's own view).
    pub max_blocks: usize,
    /// Blocks keyed at most per request.
    pub max_prompt_blocks: usize,
    /// Without a tokenizer: workflows' prompts learned from the backends' `/tokenize`
    /// answers (0: no learning).
    pub learn_max_prompts: usize,
    /// `/tokenize` calls of learning at once.
    pub learn_concurrency: usize,
    /// Staleness: a routed request with no event since, this long ago.
    pub stale_after: Duration,
    /// Replay answer timeout.
    pub replay_timeout: Duration,
    /// Weight of CPU-held blocks.
    pub cpu_discount: f64,
    /// Weight of storage-held blocks.
    pub storage_discount: f64,
    /// Tokenizer directory.
    pub tokenizer: Option<std::path::PathBuf>,
    /// Tokenizer model name in the HF cache.
    pub tokenizer_model: Option<String>,
    /// HF hub cache root.
    pub hf_cache: Option<std::path::PathBuf>,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            discover: true,
            discover_interval: Duration::from_secs(10),
            sources: Vec::new(),
            block_size: 16,
            max_blocks: 1 << 20,
            max_prompt_blocks: 16_384,
            learn_max_prompts: 4096,
            learn_concurrency: 2,
            stale_after: Duration::from_secs(10),
            replay_timeout: Duration::from_secs(2),
            cpu_discount: 0.8,
            storage_discount: 0.5,
            tokenizer: None,
            tokenizer_model: None,
            hf_cache: None,
        }
    }
}

/// One static KV-event source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSourceConfig {
    /// Backend name or URL.
    pub backend: String,
    /// PUB endpoint.
    pub endpoint: String,
    /// Replay endpoint.
    pub replay: Option<String>,
    /// Topic.
    pub topic: String,
    /// Data-parallel rank.
    pub dp_rank: u32,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// Admin listen address (`None` disables it).
    pub admin: Option<SocketAddr>,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// Whether responses name the answering backend (`x-agentlb-backend`).
    pub backend_header: bool,
    /// Backends, in configuration order.
    pub backends: Vec<BackendConfig>,
    /// Routing policy.
    pub policy: PolicyName,
    /// Routing parameters.
    pub routing: RoutingConfig,
    /// Precise KV-aware routing.
    pub kv: KvConfig,
    /// Kernel dataplane settings.
    pub kernel: KernelConfig,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Log format.
    pub log_format: LogFormat,
    /// tracing filter directive.
    pub log_level: String,
    /// Retries.
    pub retry: RetryConfig,
    /// Health checking.
    pub health: HealthConfig,
    /// Workflow tracking.
    pub workflows: WorkflowConfig,
}

/// Parses TOML text into a [`RawConfig`], collecting unknown keys as issues.
pub fn parse_str(text: &str) -> Result<RawConfig, ConfigError> {
    let mut issues = Vec::new();
    let de = toml::Deserializer::new(text);
    let raw: Result<RawConfig, _> = serde_ignored::deserialize(de, |path| {
        issues.push(ConfigIssue {
            path: path.to_string(),
            message: "unknown key".into(),
        });
    });
    match raw {
        Ok(raw) if issues.is_empty() => Ok(raw),
        Ok(_) => Err(ConfigError::Invalid(issues)),
        Err(e) => {
            let message = e.message().trim().to_owned();
            let path = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].lines().count().max(1);
                    format!("line {line}")
                })
                .unwrap_or_else(|| "file".into());
            issues.push(ConfigIssue { path, message });
            Err(ConfigError::Invalid(issues))
        }
    }
}

/// Reads and parses a TOML file.
pub fn parse_file(path: &std::path::Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text)
}

/// Validates a raw configuration, reporting every problem.
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigError> {
    let mut v = Validator::default();
    let listen = v.addr(
        "server.listen",
        raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
    );
    let admin = match raw.server.admin.as_deref() {
        Some("") => None,
        other => v.addr("server.admin", other.unwrap_or(DEFAULT_ADMIN)),
    };
    if let (Some(l), Some(a)) = (listen, admin)
        && l == a
        && l.port() != 0
    {
        v.issue("server.admin", "must differ from server.listen");
    }
    let admin_token = raw.server.admin_token.clone().filter(|t| !t.is_empty());

    if raw.backends.is_empty() {
        v.issue("backends", "at least one backend is required");
    }
    let mut backends = Vec::new();
    for (i, b) in raw.backends.iter().enumerate() {
        let path = format!("backends[{i}].url");
        let Some(url) = b.url.as_deref() else {
            v.issue(&path, "missing");
            continue;
        };
        let role = v.role(&format!("backends[{i}].role"), b.role.as_deref());
        if let Some(mut backend) = v.backend(&path, url, b.name.as_deref()) {
            backend.role = role;
            if backends
                .iter()
                .any(|o: &BackendConfig| o.host == backend.host && o.port == backend.port)
            {
                v.issue(&path, &format!("duplicate backend {url}"));
            } else if backends
                .iter()
                .any(|o: &BackendConfig| o.name == backend.name)
            {
                v.issue(
                    &format!("backends[{i}].name"),
                    &format!("duplicate name {}", backend.name),
                );
            } else {
                backends.push(backend);
            }
        }
    }

    let policy_name = raw.routing.policy.as_deref().unwrap_or("workflow");
    let policy = PolicyName::parse(policy_name).unwrap_or_else(|| {
        v.issue(
            "routing.policy",
            &format!(
                "unknown policy {policy_name:?} (expected one of: {})",
                PolicyName::ALL.join(", ")
            ),
        );
        PolicyName::RoundRobin
    });
    if policy == PolicyName::Disaggregated {
        for role in [crate::model::Role::Prefill, crate::model::Role::Decode] {
            if !backends.iter().any(|b: &BackendConfig| b.role == role) {
                v.issue(
                    "routing.policy",
                    &format!(
                        "disaggregated needs at least one backend with role = \"{}\"",
                        role.as_str()
                    ),
                );
            }
        }
    }

    let rr = &raw.routing;
    let load_bound = rr.load_bound.unwrap_or(1.25);
    if !(1.0..=100.0).contains(&load_bound) {
        v.issue("routing.load_bound", "must be between 1 and 100");
    }
    let routing = RoutingConfig {
        load_bound: load_bound.clamp(1.0, 100.0),
        root_chars: v.size("routing.root_chars", rr.root_chars, 1024, 1),
        root_min_chars: v.size("routing.root_min_chars", rr.root_min_chars, 256, 1),
        secondary_homes: rr.secondary_homes.unwrap_or(2).min(8),
        follow_response_owner: rr.follow_response_owner.unwrap_or(true),
        footprint_placement: rr.footprint_placement.unwrap_or(false),
        spill_hysteresis: rr.spill_hysteresis.unwrap_or(false),
        prefix_index_blocks: rr.prefix_index_blocks.unwrap_or(262_144),
        prefix_block_bytes: v.size("routing.prefix_block_bytes", rr.prefix_block_bytes, 128, 8),
        prefix_max_blocks: v.size("routing.prefix_max_blocks", rr.prefix_max_blocks, 8192, 1),
        prefix_ttl_secs: rr.prefix_ttl_secs.unwrap_or(600).max(1),
        prewarm: crate::controller::prewarm::PrewarmConfig {
            budget_bytes: rr.prewarm_budget_bytes.unwrap_or(256 << 20),
            max_body_bytes: rr.prewarm_max_body_bytes.unwrap_or(4 << 20),
            concurrency: v.size("routing.prewarm_concurrency", rr.prewarm_concurrency, 4, 1),
            timeout: v.millis("routing.prewarm_timeout_ms", rr.prewarm_timeout_ms, 30_000),
        },
    };

    let kv = kv_config(&mut v, &raw.kv);

    let k = &raw.kernel;
    let mode = match k.mode.as_deref().unwrap_or("auto") {
        "auto" => KernelMode::Auto,
        "required" => KernelMode::Required,
        "off" => KernelMode::Off,
        other => {
            v.issue(
                "kernel.mode",
                &format!("unknown mode {other:?} (expected auto, required or off)"),
            );
            KernelMode::Auto
        }
    };
    let pin_dir = PathBuf::from(k.pin_dir.as_deref().unwrap_or(DEFAULT_PIN_DIR));
    if !pin_dir.is_absolute() {
        v.issue(
            "kernel.pin_dir",
            "must be an absolute path on a bpffs mount",
        );
    }
    let cgroup = k
        .cgroup
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(PathBuf::from);
    if let Some(c) = &cgroup
        && c.components()
            .any(|p| matches!(p, std::path::Component::ParentDir))
    {
        v.issue("kernel.cgroup", "must not contain `..`");
    }
    let xdp_mode = match k.xdp_mode.as_deref().unwrap_or("auto") {
        "auto" => XdpAttachMode::Auto,
        "native" => XdpAttachMode::Native,
        "generic" => XdpAttachMode::Generic,
        other => {
            v.issue(
                "kernel.xdp_mode",
                &format!("unknown mode {other:?} (expected auto, native or generic)"),
            );
            XdpAttachMode::Auto
        }
    };
    let xdp_interfaces = k.xdp_interfaces.clone().unwrap_or_default();
    for (i, name) in xdp_interfaces.iter().enumerate() {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            v.issue(
                &format!("kernel.xdp_interfaces[{i}]"),
                &format!("invalid interface name {name:?}"),
            );
        }
    }
    let kernel_log_level = match k.log_level.as_deref().unwrap_or("warn").parse() {
        Ok(l) => l,
        Err(_) => {
            v.issue(
                "kernel.log_level",
                "expected off, error, warn, info, debug or trace",
            );
            log::LevelFilter::Warn
        }
    };

    let l = &raw.limits;
    let limits = Limits {
        connect_timeout: v.millis("limits.connect_timeout_ms", l.connect_timeout_ms, 5_000),
        header_read_timeout: v.millis(
            "limits.header_read_timeout_ms",
            l.header_read_timeout_ms,
            30_000,
        ),
        shutdown_grace: v.millis("limits.shutdown_grace_ms", l.shutdown_grace_ms, 10_000),
        pool_max_idle_per_backend: l.pool_max_idle_per_backend.unwrap_or(64),
        pool_idle_timeout: v.millis(
            "limits.pool_idle_timeout_ms",
            l.pool_idle_timeout_ms,
            90_000,
        ),
        max_header_bytes: v.size(
            "limits.max_header_bytes",
            l.max_header_bytes,
            16 * 1024,
            1024,
        ),
        max_body_bytes: v.size(
            "limits.max_body_bytes",
            l.max_body_bytes,
            32 * 1024 * 1024,
            1,
        ),
        body_read_timeout: v.millis(
            "limits.body_read_timeout_ms",
            l.body_read_timeout_ms,
            60_000,
        ),
        linger: Duration::from_millis(l.linger_ms.unwrap_or(30_000)),
        linger_bytes: v.size("limits.linger_bytes", l.linger_bytes, 256 * 1024 * 1024, 0),
        max_connections: v.size("limits.max_connections", l.max_connections, 16_384, 1),
        memory_trim: Duration::from_millis(l.memory_trim_ms.unwrap_or(2_000)),
        first_byte_timeout: v.millis(
            "limits.first_byte_timeout_ms",
            l.first_byte_timeout_ms,
            120_000,
        ),
        total_timeout: v.millis("limits.total_timeout_ms", l.total_timeout_ms, 1_800_000),
        max_concurrent: v.size("limits.max_concurrent", l.max_concurrent, 4096, 1),
        max_concurrent_per_backend: v.size(
            "limits.max_concurrent_per_backend",
            l.max_concurrent_per_backend,
            1024,
            1,
        ),
        max_queue: l.max_queue.unwrap_or(1024),
        queue_timeout: v.millis("limits.queue_timeout_ms", l.queue_timeout_ms, 30_000),
    };
    let r = &raw.retry;
    let budget_ratio = r.budget_ratio.unwrap_or(0.2);
    if !(0.0..=10.0).contains(&budget_ratio) {
        v.issue("retry.budget_ratio", "must be between 0 and 10");
    }
    let retry = RetryConfig {
        max_retries: r.max_retries.unwrap_or(2),
        backoff_base: v.millis("retry.backoff_base_ms", r.backoff_base_ms, 20),
        backoff_max: v.millis("retry.backoff_max_ms", r.backoff_max_ms, 500),
        budget_ratio,
        budget_min: r.budget_min.unwrap_or(10),
    };
    let h = &raw.health;
    let health = HealthConfig {
        interval: v.millis("health.interval_ms", h.interval_ms, 2_000),
        timeout: v.millis("health.timeout_ms", h.timeout_ms, 1_000),
        unhealthy_threshold: h.unhealthy_threshold.unwrap_or(2).max(1),
        healthy_threshold: h.healthy_threshold.unwrap_or(1).max(1),
        circuit_failures: h.circuit_failures.unwrap_or(3).max(1),
        circuit_open: v.millis("health.circuit_open_ms", h.circuit_open_ms, 5_000),
    };
    let w = &raw.workflows;
    let session_header = w
        .session_header
        .clone()
        .unwrap_or_else(|| "x-user-id".into())
        .to_ascii_lowercase();
    if http::HeaderName::from_bytes(session_header.as_bytes()).is_err() {
        v.issue("workflows.session_header", "not a valid header name");
    }
    let workflows = WorkflowConfig {
        max_workflows: v.size("workflows.max_workflows", w.max_workflows, 100_000, 1),
        idle_ttl: Duration::from_secs(w.idle_ttl_secs.unwrap_or(3_600).max(1)),
        max_edges_per_workflow: w.max_edges_per_workflow.unwrap_or(1_024),
        max_agents_per_workflow: w.max_agents_per_workflow.unwrap_or(256),
        max_lineage: v.size("workflows.max_lineage", w.max_lineage, 100_000, 1),
        max_responses: v.size("workflows.max_responses", w.max_responses, 100_000, 1),
        max_metric_labels: w.max_metric_labels.unwrap_or(1_000),
        max_id_len: v.size("workflows.max_id_len", w.max_id_len, 256, 1),
        session_header,
    };

    let log_format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            v.issue(
                "log.format",
                &format!("unknown format {other:?} (expected text or json)"),
            );
            LogFormat::Text
        }
    };
    let log_level = raw.log.level.clone().unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        v.issue("log.level", &format!("invalid filter {log_level:?}"));
    }
    let kernel_cfg = KernelConfig {
        mode,
        pin_dir,
        mount_bpffs: k.mount_bpffs.unwrap_or(true),
        cgroup,
        join_cgroup: k.join_cgroup.unwrap_or(true),
        sockmap: k.sockmap.unwrap_or(true),
        pinning: k.pinning.unwrap_or(false),
        pin_idle_timeout: v.millis("kernel.pin_idle_timeout_ms", k.pin_idle_timeout_ms, 60_000),
        pin_max_lifetime: v.millis("kernel.pin_max_lifetime_ms", k.pin_max_lifetime_ms, 600_000),
        pin_quiet: v.millis("kernel.pin_quiet_ms", k.pin_quiet_ms, 1_000),
        xdp_interfaces,
        xdp_mode,
        log_level: kernel_log_level,
        log_sockets: k.log_sockets.unwrap_or(false),
    };
    if kernel_cfg.pinning && !kernel_cfg.sockmap {
        v.issue(
            "kernel.pinning",
            "needs kernel.sockmap = true (pairs are forwarded by the sockmap programs)",
        );
    }

    if !v.issues.is_empty() {
        return Err(ConfigError::Invalid(v.issues));
    }
    // Every `None` above was reported as an issue, so this only fails if a new
    // field forgets to report one.
    let Some(listen) = listen else {
        return Err(ConfigError::Invalid(vec![ConfigIssue {
            path: "server.listen".into(),
            message: "invalid".into(),
        }]));
    };
    Ok(Config {
        listen,
        admin,
        admin_token,
        backend_header: raw.server.backend_header.unwrap_or(true),
        backends,
        policy,
        routing,
        kv,
        kernel: kernel_cfg,
        limits,
        log_format,
        log_level,
        retry,
        health,
        workflows,
    })
}

fn kv_config(v: &mut Validator, r: &raw::RawKv) -> KvConfig {
    let d = KvConfig::default();
    let discount = |v: &mut Validator, path: &str, x: Option<f64>, def: f64| match x {
        Some(x) if !(0.0..=1.0).contains(&x) => {
            v.issue(path, "must be between 0 and 1");
            def
        }
        Some(x) => x,
        None => def,
    };
    let sources = r
        .sources
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let path = format!("kv.sources[{i}]");
            for (what, ep) in [
                ("endpoint", Some(&s.endpoint)),
                ("replay", s.replay.as_ref()),
            ] {
                if let Some(ep) = ep
                    && !(ep.starts_with("tcp://") || ep.starts_with("ipc://"))
                {
                    v.issue(
                        &format!("{path}.{what}"),
                        &format!("{ep:?} is not a ZMQ endpoint (tcp://host:port or ipc://path)"),
                    );
                    return None;
                }
            }
            Some(KvSourceConfig {
                backend: s.backend.clone(),
                endpoint: s.endpoint.clone(),
                replay: s.replay.clone(),
                topic: s.topic.clone().unwrap_or_default(),
                dp_rank: s.dp_rank.unwrap_or(0),
            })
        })
        .collect();
    KvConfig {
        discover: r.discover.unwrap_or(d.discover),
        discover_interval: v.millis(
            "kv.discover_interval_ms",
            r.discover_interval_ms,
            d.discover_interval.as_millis() as u64,
        ),
        sources,
        block_size: v.size("kv.block_size", r.block_size, d.block_size, 1),
        max_blocks: v.size("kv.max_blocks", r.max_blocks, d.max_blocks, 1),
        max_prompt_blocks: v.size(
            "kv.max_prompt_blocks",
            r.max_prompt_blocks,
            d.max_prompt_blocks,
            1,
        ),
        learn_max_prompts: v.size(
            "kv.learn_max_prompts",
            r.learn_max_prompts,
            d.learn_max_prompts,
            0,
        ),
        learn_concurrency: v.size(
            "kv.learn_concurrency",
            r.learn_concurrency,
            d.learn_concurrency,
            1,
        ),
        stale_after: v.millis(
            "kv.stale_after_ms",
            r.stale_after_ms,
            d.stale_after.as_millis() as u64,
        ),
        replay_timeout: v.millis(
            "kv.replay_timeout_ms",
            r.replay_timeout_ms,
            d.replay_timeout.as_millis() as u64,
        ),
        cpu_discount: discount(v, "kv.cpu_discount", r.cpu_discount, d.cpu_discount),
        storage_discount: discount(
            v,
            "kv.storage_discount",
            r.storage_discount,
            d.storage_discount,
        ),
        tokenizer: r.tokenizer.as_ref().map(std::path::PathBuf::from),
        tokenizer_model: r.tokenizer_model.clone(),
        hf_cache: r.hf_cache.as_ref().map(std::path::PathBuf::from),
    }
}

/// Validates one backend (admin API `POST /admin/backends`).
pub fn parse_backend(
    url: &str,
    name: Option<&str>,
    role: Option<&str>,
) -> Result<BackendConfig, ConfigError> {
    let mut v = Validator::default();
    let role = v.role("role", role);
    match v.backend("url", url, name) {
        Some(mut b) if v.issues.is_empty() => {
            b.role = role;
            Ok(b)
        }
        _ => Err(ConfigError::Invalid(v.issues)),
    }
}

/// Collects issues while validating.
#[derive(Default)]
struct Validator {
    issues: Vec<ConfigIssue>,
}

impl Validator {
    fn issue(&mut self, path: &str, message: &str) {
        self.issues.push(ConfigIssue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn addr(&mut self, path: &str, s: &str) -> Option<SocketAddr> {
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.issue(
                    path,
                    &format!("invalid socket address {s:?} (expected IP:PORT)"),
                );
                None
            }
        }
    }

    fn millis(&mut self, path: &str, v: Option<u64>, default: u64) -> Duration {
        match v {
            Some(0) => {
                self.issue(path, "must be greater than 0");
                Duration::from_millis(default)
            }
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_millis(default),
        }
    }

    fn size(&mut self, path: &str, v: Option<usize>, default: usize, min: usize) -> usize {
        match v {
            Some(n) if n < min => {
                self.issue(path, &format!("must be at least {min}"));
                default
            }
            Some(n) => n,
            None => default,
        }
    }

    fn backend(&mut self, path: &str, url: &str, name: Option<&str>) -> Option<BackendConfig> {
        let uri: Uri = match url.parse() {
            Ok(u) => u,
            Err(e) => {
                self.issue(path, &format!("invalid URL {url:?}: {e}"));
                return None;
            }
        };
        if uri.scheme_str() != Some("http") {
            self.issue(
                path,
                &format!("unsupported URL {url:?} (expected http://HOST:PORT)"),
            );
            return None;
        }
        let Some(host) = uri
            .host()
            .map(|h| h.trim_matches(['[', ']']).to_owned())
            .filter(|h| !h.is_empty())
        else {
            self.issue(path, &format!("URL {url:?} has no host"));
            return None;
        };
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            self.issue(
                path,
                &format!("URL {url:?} has user information (not supported)"),
            );
            return None;
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.issue(path, &format!("URL {url:?} must not have a path or query"));
            return None;
        }
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let base: Uri = match format!("http://{authority}").parse() {
            Ok(u) => u,
            Err(e) => {
                self.issue(path, &format!("invalid URL {url:?}: {e}"));
                return None;
            }
        };
        Some(BackendConfig {
            name: name.map_or_else(|| authority.clone(), str::to_owned),
            url: base,
            host,
            port,
            role: crate::model::Role::Unified,
        })
    }

    fn role(&mut self, path: &str, v: Option<&str>) -> crate::model::Role {
        let Some(name) = v else {
            return crate::model::Role::Unified;
        };
        crate::model::Role::parse(name).unwrap_or_else(|| {
            self.issue(
                path,
                &format!(
                    "unknown role {name:?} (expected one of: {})",
                    crate::model::Role::ALL.join(", ")
                ),
            );
            crate::model::Role::Unified
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(text: &str) -> Vec<String> {
        match parse_str(text).and_then(|r| validate(&r)) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid(v)) => v.into_iter().map(|i| i.to_string()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let raw = parse_str("[[backends]]\nurl = \"http://127.0.0.1:8000\"\n").expect("parse");
        let c = validate(&raw).expect("valid");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(
            c.admin.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_ADMIN)
        );
        assert_eq!(c.backends[0].port, 8000);
        assert_eq!(c.backends[0].name, "127.0.0.1:8000");
        assert_eq!(c.policy, PolicyName::Workflow);
        assert_eq!(c.kernel.mode, KernelMode::Auto);
        assert!(c.kernel.sockmap);
    }

    #[test]
    fn kv_section_is_validated_with_every_error_named() {
        let ok = parse_str(
            "[[backends]]\nurl = \"http://127.0.0.1:8000\"\n[routing]\npolicy = \"kv\"\n\
             [kv]\ntokenizer = \"/models/llama\"\nblock_size = 32\ncpu_discount = 0.5\n\
             [[kv.sources]]\nbackend = \"127.0.0.1:8000\"\nendpoint = \"tcp://127.0.0.1:5557\"\n\
             replay = \"tcp://127.0.0.1:5558\"\n",
        )
        .expect("parse");
        let c = validate(&ok).expect("valid");
        assert_eq!(c.policy, PolicyName::Kv);
        assert_eq!(c.kv.block_size, 32);
        assert_eq!(c.kv.cpu_discount, 0.5);
        assert_eq!(c.kv.storage_discount, 0.5, "default");
        assert_eq!(
            c.kv.sources[0].replay.as_deref(),
            Some("tcp://127.0.0.1:5558")
        );
        assert_eq!(c.kv.sources[0].topic, "");
        assert!(c.kv.discover);
        let got = issues(
            "[[backends]]\nurl = \"http://127.0.0.1:8000\"\n[kv]\nblock_size = 0\n\
             cpu_discount = 1.5\nstale_after_ms = 0\nmax_blocks = 0\n\
             [[kv.sources]]\nbackend = \"b\"\nendpoint = \"http://x:1\"\n",
        );
        for want in [
            "kv.block_size",
            "kv.cpu_discount",
            "kv.stale_after_ms",
            "kv.max_blocks",
            "kv.sources[0].endpoint",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "missing {want} in {got:#?}"
            );
        }
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = r#"
[server]
listen = "nope"
[[backends]]
url = "https://x:1"
[[backends]]
name = "b"
[routing]
policy = "magic"
[kernel]
mode = "sometimes"
xdp_mode = "fast"
pin_dir = "relative"
[limits]
connect_timeout_ms = 0
[log]
format = "xml"
"#;
        let got = issues(text);
        for want in [
            "server.listen",
            "backends[0].url",
            "backends[1].url: missing",
            "routing.policy",
            "kernel.mode",
            "kernel.xdp_mode",
            "kernel.pin_dir",
            "limits.connect_timeout_ms",
            "log.format",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "missing {want} in {got:#?}"
            );
        }
        assert_eq!(got.len(), 9, "{got:#?}");
    }

    #[test]
    fn unknown_keys_are_all_listed() {
        let got = issues(
            "[server]\nlisen = \"x\"\n[kernel]\nfoo = 1\n[[backends]]\nurl = \"http://a:1\"\n",
        );
        assert_eq!(
            got,
            vec!["server.lisen: unknown key", "kernel.foo: unknown key"]
        );
    }

    #[test]
    fn syntax_and_type_errors_name_the_line() {
        let got = issues("[server]\nlisten = 5\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("line 2"), "{got:?}");
    }

    /// Found by the `admin_backend` fuzz target: `http://h@:1` had an empty host.
    #[test]
    fn backend_urls_need_a_host_and_no_user_information() {
        for url in ["http://h@:1", "http://:80", "http://user:pw@host:1"] {
            assert!(parse_backend(url, None, None).is_err(), "{url}");
        }
        assert!(parse_backend("http://[::1]:8000", None, None).is_ok());
    }

    #[test]
    fn duplicate_backends_rejected() {
        let got =
            issues("[[backends]]\nurl = \"http://a:1\"\n[[backends]]\nurl = \"http://a:1/\"\n");
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("duplicate backend"), "{got:?}");
    }

    #[test]
    fn disaggregated_needs_prefill_and_decode_roles() {
        let cfg = "[routing]\npolicy = \"disaggregated\"\n\
                   [[backends]]\nurl = \"http://p:1\"\nrole = \"prefill\"\n\
                   [[backends]]\nurl = \"http://d:1\"\nrole = \"decode\"\n\
                   [[backends]]\nurl = \"http://u:1\"\n";
        let c = validate(&parse_str(cfg).expect("parse")).expect("valid");
        assert_eq!(c.policy, PolicyName::Disaggregated);
        let roles: Vec<_> = c.backends.iter().map(|b| b.role).collect();
        use crate::model::Role;
        assert_eq!(roles, [Role::Prefill, Role::Decode, Role::Unified]);
        // Without decode backends, and with an unknown role: both named.
        let got = issues(
            "[routing]\npolicy = \"disaggregated\"\n\
             [[backends]]\nurl = \"http://p:1\"\nrole = \"prefill\"\n\
             [[backends]]\nurl = \"http://d:1\"\nrole = \"decoder\"\n",
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.iter()
                .any(|i| i.contains("backends[1].role") && i.contains("unknown role")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|i| i.contains("role = \"decode\"")),
            "{got:?}"
        );
        // Roles are ignored by other policies, and accepted via the admin API too.
        assert!(issues("[[backends]]\nurl = \"http://p:1\"\nrole = \"prefill\"\n").is_empty());
        assert_eq!(
            parse_backend("http://d:1", None, Some("decode"))
                .expect("valid")
                .role,
            Role::Decode
        );
        assert!(parse_backend("http://d:1", None, Some("x")).is_err());
    }

    #[test]
    fn empty_admin_disables_admin() {
        let raw = parse_str("[server]\nadmin = \"\"\n[[backends]]\nurl = \"http://a:1\"\n")
            .expect("parse");
        assert_eq!(validate(&raw).expect("valid").admin, None);
    }
}
