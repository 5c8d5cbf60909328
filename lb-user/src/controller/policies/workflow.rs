//! `workflow`: keep each workflow where its context lives, with bounded load, the same
//! decision on every gateway replica.
//!
//! The routing key of a request is its workflow id (header, body, `agentic_context`,
//! cookie) or, when the client sent none, its *conversation root*
//! ([`RequestMeta::root_key`]: the system messages plus the first characters of the first
//! other message), so the agents of one workflow, which share that context, share a key
//! without sending ids. Backends are ranked for the key by rendezvous hashing on their URL
//! (highest random weight), a pure function of the key and the backend set, so independent
//! replicas rank alike and a backend joining or leaving moves only the keys it wins or
//! held. The first backend in that order whose load is within `bound` × the mean load takes
//! the request ("home"); an overloaded home spills the request to the next in order, and
//! the workflow returns home as soon as the home is back under the bound, without state to
//! thrash. Load is what every replica observes alike: the backends' own `/metrics`
//! (queued requests plus KV pressure near a full cache), not per-replica in-flight counts:
//! a busy batch that still admits work is no reason to leave a cached context, a queue
//! or a cache about to evict is. Requests with no key go to the least loaded backend.

use std::sync::Arc;

use super::Policy;
use crate::model::{Backend, RequestMeta};

/// KV usage above which a backend counts as loaded: below it, a cached context costs
/// nothing to keep and new work fits without evicting (vLLM preempts near 1.0).
const KV_KNEE: f64 = 0.85;
/// Weight of KV usage past the knee, in queued requests per unit of usage: a full cache
/// counts as 1.5 queued requests.
const KV_WEIGHT: f64 = 10.0;
/// Slack added to the bound, in queued requests: a home with one more waiting request
/// than its share keeps its workflows (moving one costs its whole prefill).
const BOUND_SLACK: f64 = 1.0;

/// Affinity by workflow (or conversation root) with bounded load.
#[derive(Debug, Clone)]
pub struct WorkflowPolicy {
    bound: f64,
}

impl WorkflowPolicy {
    /// A policy whose home may carry up to `bound` × the mean load (≥ 1).
    pub fn new(bound: f64) -> Self {
        Self {
            bound: bound.max(1.0),
        }
    }
}

/// A 64-bit hash that is the same in every process and version: FNV-1a over the bytes
/// written, then a mix.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHasher {
    /// Feeds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash of everything written.
    pub fn finish(self) -> u64 {
        mix(self.0)
    }
}

/// [`StableHasher`] over one byte string.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = StableHasher::default();
    h.write(bytes);
    h.finish()
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The load the policy balances, from the backend's own `/metrics`: requests waiting for
/// the engine, plus KV pressure once usage passes the knee.
pub fn load_of(b: &Backend) -> f64 {
    let l = b.load.load();
    l.waiting + KV_WEIGHT * (l.kv_usage - KV_KNEE).max(0.0)
}

/// The routing key of a request: its workflow id, else its conversation root.
pub fn routing_key(meta: &RequestMeta) -> Option<u64> {
    meta.workflow_id
        .as_deref()
        .map(|w| stable_hash(w.as_bytes()))
        .or(meta.root_key)
}

/// Backends in rendezvous order for `key` (best first), as indexes into `backends`.
pub fn rendezvous_order(backends: &[Arc<Backend>], key: u64) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (mix(key ^ stable_hash(b.url.to_string().as_bytes())), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

impl Policy for WorkflowPolicy {
    fn name(&self) -> &'static str {
        "workflow"
    }

    fn pick(&self, backends: &[Arc<Backend>], meta: &RequestMeta) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        let loads: Vec<f64> = backends.iter().map(|b| load_of(b)).collect();
        let Some(key) = routing_key(meta) else {
            // No context to keep: the least loaded backend (scraped load, then in-flight).
            return (0..backends.len()).min_by(|&a, &b| {
                loads[a]
                    .total_cmp(&loads[b])
                    .then(backends[a].inflight().cmp(&backends[b].inflight()))
            });
        };
        let mean = loads.iter().sum::<f64>() / loads.len() as f64;
        let limit = self.bound * mean + BOUND_SLACK;
        let order = rendezvous_order(backends, key);
        order
            .iter()
            .copied()
            .find(|&i| loads[i] <= limit)
            .or_else(|| order.first().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{controller::policies::test_backends, model::BackendLoad};

    fn meta(wf: &str) -> RequestMeta {
        RequestMeta {
            workflow_id: Some(wf.to_owned()),
            ..RequestMeta::default()
        }
    }

    fn set_load(b: &Backend, waiting: f64) {
        b.load.store(Arc::new(BackendLoad {
            waiting,
            ..BackendLoad::default()
        }));
    }

    #[test]
    fn a_workflow_always_lands_on_its_home() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25);
        for w in 0..50 {
            let m = meta(&format!("wf-{w}"));
            let first = p.pick(&b, &m);
            for _ in 0..5 {
                assert_eq!(p.pick(&b, &m), first);
            }
        }
    }

    #[test]
    fn workflows_spread_over_backends() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25);
        let mut counts = [0usize; 4];
        for w in 0..4000 {
            if let Some(i) = p.pick(&b, &meta(&format!("wf-{w}"))) {
                counts[i] += 1;
            }
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn independent_instances_agree_and_order_of_backends_does_not_matter() {
        let a = test_backends(5);
        let mut b = test_backends(5);
        b.reverse();
        let (p, q) = (WorkflowPolicy::new(1.25), WorkflowPolicy::new(1.25));
        for w in 0..200 {
            let m = meta(&format!("wf-{w}"));
            let x = p.pick(&a, &m).map(|i| a[i].url.clone());
            let y = q.pick(&b, &m).map(|i| b[i].url.clone());
            assert_eq!(x, y);
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_workflows() {
        let all = test_backends(4);
        let p = WorkflowPolicy::new(1.25);
        let fewer: Vec<Arc<Backend>> = all[..3].to_vec();
        for w in 0..300 {
            let m = meta(&format!("wf-{w}"));
            let before = p.pick(&all, &m).map(|i| all[i].url.clone());
            let after = p.pick(&fewer, &m).map(|i| fewer[i].url.clone());
            if before.as_ref() != Some(&all[3].url) {
                assert_eq!(before, after, "a workflow not on the removed backend moved");
            }
        }
    }

    #[test]
    fn an_overloaded_home_spills_to_the_next_and_takes_it_back() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25);
        let m = meta("wf-hot");
        let home = p.pick(&b, &m).expect("home");
        let order = rendezvous_order(&b, routing_key(&m).expect("key"));
        assert_eq!(order[0], home);
        for x in &b {
            set_load(x, 2.0);
        }
        // Mean 3.5, bound 1.25 × 3.5 + 1 = 5.375.
        set_load(&b[home], 8.0);
        assert_eq!(p.pick(&b, &m), Some(order[1]), "spill to the second choice");
        // Mean 2.5, bound 4.125.
        set_load(&b[home], 4.0);
        assert_eq!(p.pick(&b, &m), Some(home), "back home once under the bound");
        // KV pressure counts past the knee only.
        b[home].load.store(Arc::new(BackendLoad {
            kv_usage: 0.8,
            ..BackendLoad::default()
        }));
        assert_eq!(load_of(&b[home]), 0.0);
    }

    #[test]
    fn requests_without_a_key_go_to_the_least_loaded() {
        let b = test_backends(3);
        set_load(&b[0], 5.0);
        set_load(&b[1], 1.0);
        set_load(&b[2], 4.0);
        let p = WorkflowPolicy::new(1.25);
        assert_eq!(p.pick(&b, &RequestMeta::default()), Some(1));
    }

    #[test]
    fn the_conversation_root_is_a_key() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25);
        let m = RequestMeta {
            root_key: Some(42),
            ..RequestMeta::default()
        };
        assert_eq!(routing_key(&m), Some(42));
        assert_eq!(p.pick(&b, &m), Some(rendezvous_order(&b, 42)[0]));
    }
}
