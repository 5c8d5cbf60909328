//! Raw configuration as written in the TOML file: every field optional so that CLI
//! flags can be layered on top before validation. Unknown keys are collected (not
//! silently ignored) by [`super::parse_file`] so that they are reported together with
//! every other error.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawConfig {
    /// `[server]`.
    #[serde(default)]
    pub server: RawServer,
    /// `[[backends]]`.
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// `[routing]`.
    #[serde(default)]
    pub routing: RawRouting,
    /// `[kernel]`.
    #[serde(default)]
    pub kernel: RawKernel,
    /// `[limits]`.
    #[serde(default)]
    pub limits: RawLimits,
    /// `[log]`.
    #[serde(default)]
    pub log: RawLog,
    /// `[retry]`.
    #[serde(default)]
    pub retry: RawRetry,
    /// `[health]`.
    #[serde(default)]
    pub health: RawHealth,
    /// `[workflows]`.
    #[serde(default)]
    pub workflows: RawWorkflows,
    /// `[kv]`.
    #[serde(default)]
    pub kv: RawKv,
}

/// `[kv]`: precise KV-aware routing from the backends' KV events.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawKv {
    /// Ask every backend for its sources (`GET /kv_event_sources`).
    pub discover: Option<bool>,
    /// Seconds between discovery rounds for backends without a source.
    pub discover_interval_ms: Option<u64>,
    /// Static sources.
    #[serde(default)]
    pub sources: Vec<RawKvSource>,
    /// Tokens per KV block (the engines' `--block-size`).
    pub block_size: Option<usize>,
    /// Index capacity in blocks.
    pub max_blocks: Option<usize>,
    /// Blocks keyed at most per request.
    pub max_prompt_blocks: Option<usize>,
    /// Without a tokenizer: prompts learned from the backends' `/tokenize` (0: off).
    pub learn_max_prompts: Option<usize>,
    /// `/tokenize` calls of learning at once.
    pub learn_concurrency: Option<usize>,
    /// A source is stale this long after a request routed to it saw no event.
    pub stale_after_ms: Option<u64>,
    /// Longest wait for a replay answer.
    pub replay_timeout_ms: Option<u64>,
    /// Weight of blocks held in CPU memory (0..1).
    pub cpu_discount: Option<f64>,
    /// Weight of blocks held in storage (0..1).
    pub storage_discount: Option<f64>,
    /// Directory with the model's `tokenizer.json` (and `tokenizer_config.json`).
    pub tokenizer: Option<String>,
    /// Model name (`org/name`) looked up in the Hugging Face cache.
    pub tokenizer_model: Option<String>,
    /// Hugging Face hub cache directory (default: `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub hf_cache: Option<String>,
}

/// `[[kv.sources]]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawKvSource {
    /// Backend name (or URL).
    pub backend: String,
    /// PUB endpoint (`tcp://host:port`).
    pub endpoint: String,
    /// Replay endpoint.
    pub replay: Option<String>,
    /// Topic.
    pub topic: Option<String>,
    /// Data-parallel rank.
    pub dp_rank: Option<u32>,
}

/// `[retry]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawRetry {
    /// Extra attempts on other backends before the first response byte.
    pub max_retries: Option<u32>,
    /// First backoff.
    pub backoff_base_ms: Option<u64>,
    /// Backoff cap.
    pub backoff_max_ms: Option<u64>,
    /// Retries allowed as a fraction of requests (per 10 s window).
    pub budget_ratio: Option<f64>,
    /// Retries always allowed per 10 s window.
    pub budget_min: Option<u32>,
}

/// `[health]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawHealth {
    /// Active check period.
    pub interval_ms: Option<u64>,
    /// Timeout of each probe.
    pub timeout_ms: Option<u64>,
    /// Consecutive failed probes before a backend is unhealthy.
    pub unhealthy_threshold: Option<u32>,
    /// Consecutive good probes before it is healthy again.
    pub healthy_threshold: Option<u32>,
    /// Consecutive request failures that open the circuit.
    pub circuit_failures: Option<u32>,
    /// How long an open circuit stays open before a half-open probe.
    pub circuit_open_ms: Option<u64>,
}

/// `[workflows]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawWorkflows {
    /// Workflows tracked at most (least recently seen evicted first).
    pub max_workflows: Option<usize>,
    /// Forget workflows idle for this long.
    pub idle_ttl_secs: Option<u64>,
    /// Lineage edges kept per workflow.
    pub max_edges_per_workflow: Option<usize>,
    /// Distinct agents kept per workflow.
    pub max_agents_per_workflow: Option<usize>,
    /// Request ids remembered for lineage inheritance (request → workflow).
    pub max_lineage: Option<usize>,
    /// Responses API response ids whose owner backend is remembered.
    pub max_responses: Option<usize>,
    /// Distinct workflow/agent label values in metrics (the rest are `_other`).
    pub max_metric_labels: Option<usize>,
    /// Maximum length of workflow/agent/request ids.
    pub max_id_len: Option<usize>,
    /// Header carrying the session key.
    pub session_header: Option<String>,
}

/// `[server]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawServer {
    /// Proxy listen address.
    pub listen: Option<String>,
    /// Admin listen address; empty string disables the admin listener.
    pub admin: Option<String>,
    /// Bearer token required by the admin API (except `/health`).
    pub admin_token: Option<String>,
    /// Name the answering backend in an `x-agentlb-backend` response header.
    pub backend_header: Option<bool>,
}

/// One `[[backends]]` entry.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawBackend {
    /// `http://host:port`.
    pub url: Option<String>,
    /// Display name (defaults to `host:port`).
    pub name: Option<String>,
    /// `unified` (default), `prefill` or `decode`: the backend's part under the
    /// `disaggregated` policy.
    pub role: Option<String>,
}

/// `[routing]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawRouting {
    /// Policy name.
    pub policy: Option<String>,
    /// `workflow`: a home may carry this many times the mean load before spilling.
    pub load_bound: Option<f64>,
    /// Characters of the first non-system message in a conversation root.
    pub root_chars: Option<usize>,
    /// A first non-system message shorter than this gives no conversation root.
    pub root_min_chars: Option<usize>,
    /// `workflow`: secondary homes kept per workflow.
    pub secondary_homes: Option<usize>,
    /// Send Responses API follow-ups to the backend that stored the response.
    pub follow_response_owner: Option<bool>,
    /// `workflow`: place new workflows by predicted KV footprint.
    pub footprint_placement: Option<bool>,
    /// `workflow`: a spilled workflow stays spilled until its home is back to the mean.
    pub spill_hysteresis: Option<bool>,
    /// Prefix index capacity in blocks (0 disables it).
    pub prefix_index_blocks: Option<usize>,
    /// Prefix index block size in bytes of the message stream.
    pub prefix_block_bytes: Option<usize>,
    /// Blocks hashed at most per request.
    pub prefix_max_blocks: Option<usize>,
    /// Prefix index entries older than this do not count.
    pub prefix_ttl_secs: Option<u64>,
    /// Bytes of workflows' latest requests kept for pre-warming (0: off).
    pub prewarm_budget_bytes: Option<usize>,
    /// Larger request bodies are not kept for pre-warming.
    pub prewarm_max_body_bytes: Option<usize>,
    /// Pre-warm requests at once.
    pub prewarm_concurrency: Option<usize>,
    /// Timeout of one pre-warm request.
    pub prewarm_timeout_ms: Option<u64>,
}

/// `[kernel]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawKernel {
    /// `auto`, `required` or `off`.
    pub mode: Option<String>,
    /// bpffs directory for pinned maps.
    pub pin_dir: Option<String>,
    /// Mount bpffs at /sys/fs/bpf when nothing is mounted there.
    pub mount_bpffs: Option<bool>,
    /// cgroup v2 path for `sock_ops` (absolute, or relative to the cgroup2 mount).
    pub cgroup: Option<String>,
    /// Move agentlb into that cgroup.
    pub join_cgroup: Option<bool>,
    /// Attach the sockmap programs and register sockets.
    pub sockmap: Option<bool>,
    /// Interfaces to attach XDP to.
    pub xdp_interfaces: Option<Vec<String>>,
    /// `auto`, `native` or `generic`.
    pub xdp_mode: Option<String>,
    /// Level of kernel-side log lines: off, error, warn, info, debug, trace.
    pub log_level: Option<String>,
    /// Log every socket registration (debug level).
    pub log_sockets: Option<bool>,
    /// Hand client⇄upstream pairs to the kernel after their first request.
    pub pinning: Option<bool>,
    /// Close a pinned pair idle this long.
    pub pin_idle_timeout_ms: Option<u64>,
    /// Close a pinned pair (once quiet) after this long.
    pub pin_max_lifetime_ms: Option<u64>,
    /// Quiet time after a response that makes a pinned pair safe to close.
    pub pin_quiet_ms: Option<u64>,
}

/// `[limits]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawLimits {
    /// Upstream connect timeout.
    pub connect_timeout_ms: Option<u64>,
    /// Time allowed for a client to send its request head.
    pub header_read_timeout_ms: Option<u64>,
    /// Graceful shutdown: how long in-flight requests may run after SIGTERM.
    pub shutdown_grace_ms: Option<u64>,
    /// Idle upstream keep-alive connections kept per backend.
    pub pool_max_idle_per_backend: Option<usize>,
    /// How long an idle upstream connection is kept.
    pub pool_idle_timeout_ms: Option<u64>,
    /// Largest request head (request line + headers).
    pub max_header_bytes: Option<usize>,
    /// Largest request body.
    pub max_body_bytes: Option<usize>,
    /// Time for the client to send the body.
    pub body_read_timeout_ms: Option<u64>,
    /// Lingering close after an early error: time reading and discarding the body.
    pub linger_ms: Option<u64>,
    /// Client connections open at once; past it the listener stops accepting.
    pub max_connections: Option<usize>,
    /// How often freed heap memory is returned to the system after client
    /// connections closed (0: never).
    pub memory_trim_ms: Option<u64>,
    /// Lingering close: most bytes discarded.
    pub linger_bytes: Option<usize>,
    /// Time from sending upstream to the response head.
    pub first_byte_timeout_ms: Option<u64>,
    /// Time for a whole request, including streaming.
    pub total_timeout_ms: Option<u64>,
    /// Requests in flight across all backends.
    pub max_concurrent: Option<usize>,
    /// Requests in flight per backend.
    pub max_concurrent_per_backend: Option<usize>,
    /// Requests waiting for a slot; beyond this, 429.
    pub max_queue: Option<usize>,
    /// How long a request may wait for a slot.
    pub queue_timeout_ms: Option<u64>,
}

/// `[log]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: Option<String>,
    /// tracing filter directive, e.g. `info` or `agentlb=debug`.
    pub level: Option<String>,
}
