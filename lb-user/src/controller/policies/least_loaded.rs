//! `least_loaded`: the backend with the fewest in-flight requests; ties are broken
//! by a rotating start so equal backends share the load.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use super::Policy;
use crate::model::{Backend, RequestMeta};

/// Fewest in-flight requests first.
#[derive(Debug, Default)]
pub struct LeastLoaded {
    start: AtomicUsize,
}

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least_loaded"
    }

    fn pick(&self, backends: &[Arc<Backend>], _meta: &RequestMeta) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| backends[i].inflight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::policies::test_backends;

    #[test]
    fn prefers_idle_backends() {
        let b = test_backends(3);
        b[0].inflight.store(5, Ordering::Relaxed);
        b[1].inflight.store(1, Ordering::Relaxed);
        b[2].inflight.store(3, Ordering::Relaxed);
        let p = LeastLoaded::default();
        for _ in 0..5 {
            assert_eq!(p.pick(&b, &RequestMeta::default()), Some(1));
        }
    }

    #[test]
    fn ties_rotate() {
        let b = test_backends(2);
        let p = LeastLoaded::default();
        let a = p.pick(&b, &RequestMeta::default());
        let c = p.pick(&b, &RequestMeta::default());
        assert_ne!(a, c);
    }
}
