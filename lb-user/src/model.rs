//! Domain types shared by the controller, the proxy and the admin API.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use http::{HeaderMap, Uri};

/// Controller-assigned backend id (stable for the life of the backend; also the
/// value published to the kernel).
pub type BackendId = u32;

/// A backend instance (a vLLM server).
#[derive(Debug)]
pub struct Backend {
    /// Id.
    pub id: BackendId,
    /// Display name.
    pub name: String,
    /// Base URL (`http://host:port`).
    pub url: Uri,
    /// Resolved addresses (published to the kernel).
    pub addrs: Vec<SocketAddr>,
    /// Requests currently being proxied to it.
    pub inflight: AtomicU64,
    /// Requests sent to it in total.
    pub requests: AtomicU64,
    /// Failed attempts (connect errors, resets).
    pub errors: AtomicU64,
}

impl Backend {
    /// Current in-flight count.
    pub fn load(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
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

/// Per-request routing metadata. Today only headers are read; body fields and the
/// other accepted shapes arrive with the full proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMeta {
    /// Workflow id, if any.
    pub workflow_id: Option<String>,
    /// Agent id, if any.
    pub agent_id: Option<String>,
}

impl RequestMeta {
    /// Extracts metadata from request headers (non-UTF-8 values are ignored).
    pub fn from_headers(h: &HeaderMap) -> Self {
        let get = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .filter(|s| !s.is_empty())
        };
        Self {
            workflow_id: get(H_WORKFLOW_ID),
            agent_id: get(H_AGENT_ID),
        }
    }
}
