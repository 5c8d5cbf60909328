//! Routing policies: one trait, one file per policy.

mod least_loaded;
mod round_robin;

use std::sync::Arc;

pub use least_loaded::LeastLoaded;
pub use round_robin::RoundRobin;

use crate::{
    config::PolicyName,
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
pub fn build(name: PolicyName) -> Box<dyn Policy> {
    match name {
        PolicyName::RoundRobin => Box::new(RoundRobin::default()),
        PolicyName::LeastLoaded => Box::new(LeastLoaded::default()),
    }
}

#[cfg(test)]
pub(crate) fn test_backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                i as u32,
                format!("b{i}"),
                http::Uri::from_static("http://127.0.0.1:1"),
                vec![],
            ))
        })
        .collect()
}
