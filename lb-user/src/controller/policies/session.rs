//! `session`: a session key (the `workflows.session_header` header, default `x-user-id`)
//! → the first backend in rendezvous order whose load is within the bound.
//!
//! This is production-stack's session router without its hot spots: its hash ring keeps a
//! user on one instance however busy that instance gets; here a session whose backend is
//! over `bound` × the mean load (scraped queue + KV pressure, as `workflow` measures it)
//! goes to the next backend in its order, and back once the first is under the bound
//! again. Like `workflow`, the choice is a pure function of the key, the backend set and
//! the backends' metrics, so gateway replicas agree. Requests without a session key fall
//! back to their workflow id or conversation root, then to the least loaded backend.

use std::sync::{Arc, atomic::AtomicUsize};

use super::{
    Choice, HomeCtx, Policy, Reason,
    workflow::{Loads, bounded_choice, routing_key, stable_hash},
};
use crate::model::{Backend, RequestMeta};

/// Session affinity with bounded load.
#[derive(Debug)]
pub struct SessionPolicy {
    bound: f64,
    rotor: AtomicUsize,
}

impl SessionPolicy {
    /// A policy whose session backend may carry up to `bound` × the mean load.
    pub fn new(bound: f64) -> Self {
        Self {
            bound: bound.max(1.0),
            rotor: AtomicUsize::new(0),
        }
    }
}

impl Policy for SessionPolicy {
    fn name(&self) -> &'static str {
        "session"
    }

    fn pick(&self, backends: &[Arc<Backend>], meta: &RequestMeta) -> Option<usize> {
        self.route(backends, meta, None).map(|c| c.index)
    }

    fn route(
        &self,
        backends: &[Arc<Backend>],
        meta: &RequestMeta,
        _home: Option<HomeCtx<'_>>,
    ) -> Option<Choice> {
        if backends.is_empty() {
            return None;
        }
        let l = Loads::of(backends, self.bound);
        let key = meta
            .session
            .as_deref()
            .map(|s| stable_hash(s.as_bytes()))
            .or_else(|| routing_key(meta));
        bounded_choice(backends, &l, key, &self.rotor, Reason::Session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{controller::policies::test_backends, model::BackendLoad};

    fn meta(user: &str) -> RequestMeta {
        RequestMeta {
            session: Some(user.to_owned()),
            ..RequestMeta::default()
        }
    }

    #[test]
    fn a_session_sticks_spreads_and_spills_off_a_hot_backend() {
        let b = test_backends(4);
        let p = SessionPolicy::new(1.25);
        let mut counts = [0usize; 4];
        for u in 0..2000 {
            let m = meta(&format!("user-{u}"));
            let first = p.pick(&b, &m).expect("backend");
            assert_eq!(p.pick(&b, &m), Some(first));
            counts[first] += 1;
        }
        for c in counts {
            assert!((400..600).contains(&c), "{counts:?}");
        }
        // The hot spot production-stack's router keeps: here the session moves on.
        let m = meta("user-7");
        let home = p.pick(&b, &m).expect("backend");
        b[home].set_load(BackendLoad {
            waiting: 20.0,
            ..BackendLoad::default()
        });
        let moved = p.route(&b, &m, None).expect("backend");
        assert_ne!(moved.index, home);
        assert_eq!(moved.reason, Reason::Session);
        // No key at all: least loaded.
        assert_eq!(
            p.route(&b, &RequestMeta::default(), None).map(|c| c.reason),
            Some(Reason::Balanced)
        );
    }
}
