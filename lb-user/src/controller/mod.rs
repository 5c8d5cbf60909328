//! The controller: one place decides where requests go.
//!
//! It owns the backend registry (a lock-free `ArcSwap` snapshot read on every
//! request) and the routing policy, and publishes the backend set to the dataplane.
//! Health, workflow tables and scoring build on this in later steps.

pub mod policies;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use arc_swap::ArcSwap;
use thiserror::Error;

use crate::{
    config::{BackendConfig, PolicyName},
    dataplane::PublishedBackend,
    model::{Backend, RequestMeta},
};
pub use policies::Policy;

/// Controller errors.
#[derive(Debug, Error)]
pub enum ControllerError {
    /// A backend host did not resolve.
    #[error("backend {name}: cannot resolve {host}:{port}: {message}")]
    Resolve {
        /// Backend name.
        name: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Resolver error.
        message: String,
    },
}

/// Registry + policy.
pub struct Controller {
    backends: ArcSwap<Vec<Arc<Backend>>>,
    policy: Box<dyn Policy>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("backends", &self.backends.load().len())
            .field("policy", &self.policy.name())
            .finish()
    }
}

impl Controller {
    /// Creates a controller over resolved backends.
    pub fn new(backends: Vec<Backend>, policy: PolicyName) -> Self {
        Self {
            backends: ArcSwap::from_pointee(backends.into_iter().map(Arc::new).collect()),
            policy: policies::build(policy),
        }
    }

    /// Resolves configured backends (DNS for host names) and assigns ids.
    pub async fn resolve(configs: &[BackendConfig]) -> Result<Vec<Backend>, ControllerError> {
        let mut out = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let addrs: Vec<_> = tokio::net::lookup_host((c.host.as_str(), c.port))
                .await
                .map_err(|e| ControllerError::Resolve {
                    name: c.name.clone(),
                    host: c.host.clone(),
                    port: c.port,
                    message: e.to_string(),
                })?
                .collect();
            out.push(Backend {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                name: c.name.clone(),
                url: c.url.clone(),
                addrs,
                inflight: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            });
        }
        Ok(out)
    }

    /// Picks a backend for a request.
    pub fn pick(&self, meta: &RequestMeta) -> Option<Arc<Backend>> {
        let snap = self.backends.load();
        let i = self.policy.pick(&snap, meta)?;
        let b = snap.get(i)?.clone();
        b.requests.fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// Current backends.
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    /// Policy name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// What the kernel must know about the backends.
    pub fn published(&self) -> Vec<PublishedBackend> {
        self.backends
            .load()
            .iter()
            .map(|b| PublishedBackend {
                id: b.id,
                addrs: b.addrs.clone(),
            })
            .collect()
    }
}
