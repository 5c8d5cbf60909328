//! `prefix`: the backend where the prompt costs least — prefill of what is not cached
//! there (predicted by the prefix index, no tokenizer round trip) plus the work queued
//! there — without any workflow id.
//!
//! Cost of backend `b` for a prompt of `P` tokens: `P − cached(b) + load(b) × W`, where
//! `cached(b)` is the prefix index's prediction, `load(b)` is what `workflow` balances
//! (requests waiting plus KV pressure past the knee, from the backend's own `/metrics`)
//! and `W` the work of an average request (tokens of uncached prompt and completion,
//! measured). A long cached prefix outweighs a short queue, and a queue long enough
//! outweighs any prefix: no "death spiral" onto one hot prefix tree, no hot spot. Ties go
//! round the candidates. Each gateway replica has its own index, so replicas do not
//! agree on every choice; `workflow` is the policy that does.
//!
//! `kv` is the same scorer fed by the backends' KV events ([`crate::kv`]): `cached(b)`
//! is exact for a backend whose events are fresh (GPU blocks in full, CPU and storage
//! blocks at `kv.cpu_discount` / `kv.storage_discount`), the prefix index's prediction
//! for the others. Every replica subscribes to the same events, so replicas agree on
//! where a context is.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use super::{Choice, HomeCtx, Policy, Reason, workflow::load_of};
use crate::model::{Backend, RequestMeta};

/// Cheapest backend by predicted prefill plus queued work.
#[derive(Debug, Default)]
pub struct PrefixPolicy {
    rotor: AtomicUsize,
    kv: bool,
    disaggregated: bool,
}

impl PrefixPolicy {
    /// The `kv` policy: the same scorer, named for its source of truth.
    pub fn kv() -> Self {
        Self {
            rotor: AtomicUsize::new(0),
            kv: true,
            disaggregated: false,
        }
    }

    /// The `disaggregated` policy: the `kv` scorer, applied by the proxy to the prefill
    /// backends for the prompt and to the decode backends for the answer.
    pub fn disaggregated() -> Self {
        Self {
            rotor: AtomicUsize::new(0),
            kv: true,
            disaggregated: true,
        }
    }
}

impl Policy for PrefixPolicy {
    fn name(&self) -> &'static str {
        match (self.disaggregated, self.kv) {
            (true, _) => "disaggregated",
            (false, true) => "kv",
            (false, false) => "prefix",
        }
    }

    fn disaggregated(&self) -> bool {
        self.disaggregated
    }

    fn uses_prefix(&self) -> bool {
        true
    }

    fn uses_kv(&self) -> bool {
        self.kv
    }

    fn pick(&self, backends: &[Arc<Backend>], meta: &RequestMeta) -> Option<usize> {
        self.route(backends, meta, None).map(|c| c.index)
    }

    fn route(
        &self,
        backends: &[Arc<Backend>],
        meta: &RequestMeta,
        home: Option<HomeCtx<'_>>,
    ) -> Option<Choice> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let demand = home.and_then(|h| h.demand);
        let prompt = demand
            .and_then(|d| d.prompt_tokens)
            .unwrap_or(meta.prompt_tokens_estimate() as f64);
        let work = demand.map_or(1000.0, |d| d.work);
        let cached = |i: usize| {
            demand
                .and_then(|d| d.matched.get(i).copied())
                .unwrap_or(0.0)
        };
        let cost = |i: usize| (prompt - cached(i)).max(0.0) + load_of(&backends[i]) * work;
        let start = self.rotor.fetch_add(1, Ordering::Relaxed) % n;
        let index = (0..n).map(|k| (start + k) % n).min_by(|&a, &b| {
            cost(a)
                .total_cmp(&cost(b))
                .then(backends[a].inflight().cmp(&backends[b].inflight()))
        })?;
        let reason = if cached(index) > 0.0 {
            Reason::Prefix
        } else {
            Reason::Balanced
        };
        Some(Choice { index, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        controller::{policies::Demand, policies::test_backends, workflows::Homes},
        model::BackendLoad,
    };

    fn pick(p: &PrefixPolicy, b: &[Arc<Backend>], matched: Vec<f64>) -> Choice {
        let m = RequestMeta {
            body_len: 40_000, // ≈ 10k tokens
            ..RequestMeta::default()
        };
        let d = Demand {
            footprints: vec![],
            estimate: 10_000.0,
            work: 1_000.0,
            matched,
            ..Demand::default()
        };
        let mut h = Homes::default();
        p.route(
            b,
            &m,
            Some(HomeCtx {
                homes: &mut h,
                home_busy: false,
                home_down: false,
                implicit: false,
                demand: Some(&d),
            }),
        )
        .expect("a choice")
    }

    #[test]
    fn the_cached_prefix_wins_until_its_queue_costs_more() {
        let b = test_backends(3);
        let p = PrefixPolicy::default();
        let c = pick(&p, &b, vec![0.0, 8_000.0, 2_000.0]);
        assert_eq!((c.index, c.reason), (1, Reason::Prefix));
        // 5 queued requests (5k tokens of work) < 6k tokens saved: still backend 1.
        b[1].set_load(BackendLoad {
            waiting: 5.0,
            ..BackendLoad::default()
        });
        assert_eq!(pick(&p, &b, vec![0.0, 8_000.0, 2_000.0]).index, 1);
        // 9 queued (9k) > 6k saved: the next best.
        b[1].set_load(BackendLoad {
            waiting: 9.0,
            ..BackendLoad::default()
        });
        assert_eq!(pick(&p, &b, vec![0.0, 8_000.0, 2_000.0]).index, 2);
        // Nothing cached anywhere: the least loaded, balanced.
        let c = pick(&p, &b, vec![0.0; 3]);
        assert_ne!(c.index, 1);
        assert_eq!(c.reason, Reason::Balanced);
    }
}
