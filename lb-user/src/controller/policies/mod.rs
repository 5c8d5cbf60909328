//! Routing policies: one trait, one file per policy.

mod least_loaded;
mod round_robin;
pub mod workflow;

use std::sync::Arc;

pub use least_loaded::LeastLoaded;
pub use round_robin::RoundRobin;
pub use workflow::WorkflowPolicy;

use crate::{
    config::{PolicyName, RoutingConfig},
    model::{Backend, RequestMeta},
};

/// A routing policy: given the backend snapshot and the request's metadata, the
/// index of the backend to use (`None` when there is none).
pub trait Policy: Send + Sync {
    /// Canonical name.
    fn name(&self) -> &'static str;
    /// Chooses a backend.
    fn pick(&self, backends: &[Arc<Backend>], meta: &RequestMeta) -> Option<usize>;
}

/// Builds the configured policy.
pub fn build(name: PolicyName, routing: &RoutingConfig) -> Box<dyn Policy> {
    match name {
        PolicyName::RoundRobin => Box::new(RoundRobin::default()),
        PolicyName::LeastLoaded => Box::new(LeastLoaded::default()),
        PolicyName::Workflow => Box::new(WorkflowPolicy::new(routing.load_bound)),
    }
}

#[cfg(test)]
pub(crate) fn test_backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                i as u32,
                format!("b{i}"),
                format!("http://127.0.0.1:{}", 8000 + i)
                    .parse()
                    .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1:1")),
                vec![],
            ))
        })
        .collect()
}
