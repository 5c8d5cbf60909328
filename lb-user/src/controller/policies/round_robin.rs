//! `round_robin`: strict rotation.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use super::Policy;
use crate::model::{Backend, RequestMeta};

/// Rotates over the backends in order.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&self, backends: &[Arc<Backend>], _meta: &RequestMeta) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % backends.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::policies::test_backends;

    #[test]
    fn rotates_evenly() {
        let b = test_backends(3);
        let p = RoundRobin::default();
        let picks: Vec<_> = (0..6)
            .map(|_| p.pick(&b, &RequestMeta::default()))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
        assert_eq!(p.pick(&[], &RequestMeta::default()), None);
    }
}
