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
}

/// One `[[backends]]` entry.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawBackend {
    /// `http://host:port`.
    pub url: Option<String>,
    /// Display name (defaults to `host:port`).
    pub name: Option<String>,
}

/// `[routing]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawRouting {
    /// Policy name.
    pub policy: Option<String>,
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
}

/// `[log]`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: Option<String>,
    /// tracing filter directive, e.g. `info` or `agentlb=debug`.
    pub level: Option<String>,
}
