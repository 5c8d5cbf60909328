//! `workflow`: keep each workflow where its context lives, with bounded load, the same
//! decision on every gateway replica.
//!
//! The routing key of a request is its workflow id (header, body, `agentic_context`,
//! cookie, or inherited from its parent request) or, when the client sent none, its
//! *conversation root* ([`RequestMeta::root_key`]: the system messages plus the first
//! characters of the first other message), so the agents of one workflow, which share
//! that context, share a key without sending ids (an *implicit* workflow).
//!
//! Placement: backends are ranked for the key by rendezvous hashing on their URL (highest
//! random weight), a pure function of the key and the backend set, so independent
//! replicas rank alike and a backend joining or leaving moves only the keys it wins or
//! held. A new workflow is placed on the first backend in that order whose load is within
//! `bound` × the mean load (+1 request of slack): its *home*, recorded in the workflow
//! table ([`Homes`]).
//!
//! Later calls go home while the home is within the bound. Over it, the call *spills* to a
//! secondary home (one under the bound where the workflow was before, else the next in
//! rendezvous order), recorded; the workflow stays there until the home is again no
//! busier than the mean — hysteresis between the mean and the bound, so it does not bounce
//! around the bound, and every replica, which reads the same backend metrics, converges
//! on the same choice. A home that is drained or removed is replaced for good
//! (*migrated*) by a secondary home under the bound, else the next in order; a home that
//! fails its health checks sends its workflows to the first backend of their order under
//! the bound until it is healthy again (the same choice on every replica, whatever each
//! one saw of the failure).
//!
//! Load is what every replica observes alike: the backends' own `/metrics` (queued
//! requests plus KV pressure near a full cache), not per-replica in-flight counts: a busy
//! batch that still admits work is no reason to leave a cached context, a queue or a cache
//! about to evict is. Requests with no key go to the least loaded backend.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use super::{Choice, Demand, HomeCtx, Policy, Reason};
use crate::{
    controller::workflows::{Homes, lookup_key},
    model::{Backend, RequestMeta},
};

/// Share of a backend's KV capacity its live workflows' footprint may exceed the
/// cluster's by before a new workflow is placed elsewhere, however small the cluster's.
const FOOTPRINT_SLACK: f64 = 0.10;
/// Slack added to the bound, in queued requests: a home with one more waiting request
/// than its share keeps its workflows (moving one costs its whole prefill).
const BOUND_SLACK: f64 = 1.0;

/// Affinity by workflow (or conversation root) with bounded load.
#[derive(Debug)]
pub struct WorkflowPolicy {
    bound: f64,
    secondaries: usize,
    rotor: AtomicUsize,
    footprint: bool,
    hysteresis: bool,
}

impl WorkflowPolicy {
    /// A policy whose home may carry up to `bound` × the mean load (≥ 1), keeping at most
    /// `secondaries` secondary homes per workflow.
    pub fn new(bound: f64, secondaries: usize) -> Self {
        Self {
            bound: bound.max(1.0),
            secondaries,
            rotor: AtomicUsize::new(0),
            footprint: false,
            hysteresis: false,
        }
    }

    /// Whether new workflows are placed by predicted KV footprint (`false`: by load and
    /// rendezvous order alone).
    pub fn footprint(mut self, on: bool) -> Self {
        self.footprint = on;
        self
    }

    /// Whether a spilled workflow stays spilled until its home is back to the mean
    /// (`false`: back home as soon as the home is under the bound).
    pub fn hysteresis(mut self, on: bool) -> Self {
        self.hysteresis = on;
        self
    }
}

/// Loads of the candidates and the bound they are held to.
pub(crate) struct Loads {
    pub(crate) loads: Vec<f64>,
    pub(crate) mean: f64,
    pub(crate) limit: f64,
}

impl Loads {
    pub(crate) fn of(backends: &[Arc<Backend>], bound: f64) -> Self {
        let loads: Vec<f64> = backends.iter().map(|b| load_of(b)).collect();
        let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        Self {
            limit: bound * mean + BOUND_SLACK,
            mean,
            loads,
        }
    }

    pub(crate) fn under(&self, i: usize) -> bool {
        self.loads[i] <= self.limit
    }

    /// The least loaded candidate (ties: fewer in flight here, then a rotating start so
    /// equal backends share the work).
    pub(crate) fn least(&self, backends: &[Arc<Backend>], rotor: &AtomicUsize) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = rotor.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).min_by(|&a, &b| {
            self.loads[a]
                .total_cmp(&self.loads[b])
                .then(backends[a].inflight().cmp(&backends[b].inflight()))
        })
    }

    /// The first of `order` under the bound, skipping `skip`.
    pub(crate) fn first_under(&self, order: &[usize], skip: Option<usize>) -> Option<usize> {
        order
            .iter()
            .copied()
            .find(|&i| Some(i) != skip && self.under(i))
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
/// the engine, plus KV pressure once usage passes the knee ([`crate::model::BackendLoad::score`]).
pub fn load_of(b: &Backend) -> f64 {
    b.load_score()
}

/// The routing key of a request: its workflow id, else its conversation root.
pub fn routing_key(meta: &RequestMeta) -> Option<u64> {
    meta.workflow_id
        .as_deref()
        .map(lookup_key)
        .or(meta.root_key)
}

/// Backends in rendezvous order for `key` (best first), as indexes into `backends`.
pub fn rendezvous_order(backends: &[Arc<Backend>], key: u64) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (mix(key ^ b.url_hash), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The first backend of `key`'s rendezvous order under the load bound, else the first of
/// the order: `l.first_under(&rendezvous_order(backends, key), None)` or the order's
/// head, in one pass without sorting (the common placement, O(backends)).
pub(crate) fn first_in_order(backends: &[Arc<Backend>], key: u64, l: &Loads) -> Option<usize> {
    // (score, index) of the best of all, and of the best under the bound.
    let mut first: Option<(u64, usize)> = None;
    let mut under: Option<(u64, usize)> = None;
    for (i, b) in backends.iter().enumerate() {
        let s = mix(key ^ b.url_hash);
        // Higher score first; equal scores keep the lower index (the sort's tie rule).
        if first.is_none_or(|(f, _)| s > f) {
            first = Some((s, i));
        }
        if l.under(i) && under.is_none_or(|(u, _)| s > u) {
            under = Some((s, i));
        }
    }
    under.or(first).map(|(_, i)| i)
}

/// A new workflow is adopted by a backend whose KV events show at least this share of
/// its prompt cached...
const ADOPT_SHARE: f64 = 0.5;
/// ...and at least this many tokens (a shared system prompt alone is not a workflow's
/// context).
const ADOPT_MIN_TOKENS: f64 = 64.0;

/// The backend under the load bound holding the most of a new workflow's prompt by its
/// KV events, if it holds enough to be where the workflow's context is (earlier calls
/// routed there by another replica, or by this one before a restart). Ties go to the
/// earlier backend in rendezvous order, so every replica adopts alike.
fn adopt(l: &Loads, order: &[usize], d: Option<&Demand>) -> Option<usize> {
    let d = d?;
    if d.held.len() != l.loads.len() {
        return None;
    }
    let prompt = d.prompt_tokens.unwrap_or(d.estimate);
    let min = (prompt * ADOPT_SHARE).max(ADOPT_MIN_TOKENS);
    let mut best: Option<(usize, f64)> = None;
    for &i in order {
        if let Some(t) = d.held[i]
            && t >= min
            && l.under(i)
            && best.is_none_or(|(_, b)| t > b)
        {
            best = Some((i, t));
        }
    }
    best.map(|(i, _)| i)
}

impl WorkflowPolicy {
    /// Where a workflow over its home's bound goes: the next backend in its rendezvous
    /// order under the bound — a function of the key and the scraped loads, so every
    /// replica spills a workflow to the same backend (it is recorded as a secondary home).
    fn spill_target(&self, l: &Loads, order: &[usize], home: Option<usize>) -> Option<usize> {
        l.first_under(order, home)
    }

    /// Where a new workflow goes: the first backend in rendezvous order under the load
    /// bound whose share of the live workflows' predicted KV footprint, against its KV
    /// capacity, is within `bound` × the cluster's (so a few huge workflows do not pile
    /// onto one backend and a tight cluster is packed evenly); failing that, the one under
    /// the load bound with the most room; failing that, the first choice.
    fn place(
        &self,
        backends: &[Arc<Backend>],
        l: &Loads,
        key: u64,
        d: Option<&Demand>,
    ) -> Option<usize> {
        let Some(d) = d.filter(|d| self.footprint && d.footprints.len() == backends.len()) else {
            return first_in_order(backends, key, l);
        };
        let caps: Vec<f64> = backends
            .iter()
            .map(|b| b.load().kv_capacity_tokens)
            .collect();
        // Without every capacity known there is nothing to balance against.
        if !caps.iter().all(|&c| c > 0.0) {
            return first_in_order(backends, key, l);
        }
        let order = rendezvous_order(backends, key);
        let total: f64 = d.footprints.iter().sum::<f64>() + d.estimate;
        let room: f64 = caps.iter().sum();
        let mean = total / room;
        let ratio = |i: usize| d.footprints[i] / caps[i];
        // A backend fits while its share with this workflow is within the bound × the
        // cluster's, or within an absolute slack above it: while the cluster's KV is far
        // from full, the first choice is kept, which is what keeps independent replicas
        // (whose ledgers differ slightly) on the same placement.
        let fits = |i: usize| {
            (d.footprints[i] + d.estimate) / caps[i]
                <= (self.bound * mean).max(mean + FOOTPRINT_SLACK)
        };
        order
            .iter()
            .copied()
            .find(|&i| l.under(i) && fits(i))
            .or_else(|| {
                order
                    .iter()
                    .copied()
                    .filter(|&i| l.under(i))
                    .min_by(|&a, &b| ratio(a).total_cmp(&ratio(b)))
            })
            .or_else(|| order.first().copied())
    }

    fn spill(&self, backends: &[Arc<Backend>], h: &mut Homes, i: usize) -> Choice {
        h.push_secondary(backends[i].id, self.secondaries.max(1));
        h.spilled = true;
        h.spills = h.spills.saturating_add(1);
        Choice {
            index: i,
            reason: Reason::Spill,
        }
    }

    fn with_homes(
        &self,
        backends: &[Arc<Backend>],
        key: u64,
        l: &Loads,
        ctx: HomeCtx<'_>,
    ) -> Option<Choice> {
        let h = ctx.homes;
        let k = self.secondaries;
        let Some(home_id) = h.home else {
            // The events' view, when there is one, ranked in rendezvous order.
            if ctx.demand.is_some_and(|d| d.held.len() == l.loads.len())
                && let Some(i) = adopt(l, &rendezvous_order(backends, key), ctx.demand)
            {
                h.rehome(backends[i].id, k, false);
                return Some(Choice {
                    index: i,
                    reason: Reason::Cached,
                });
            }
            let i = self.place(backends, l, key, ctx.demand)?;
            h.rehome(backends[i].id, k, false);
            let reason = if ctx.implicit {
                Reason::Implicit
            } else {
                Reason::Placed
            };
            return Some(Choice { index: i, reason });
        };
        let home = backends.iter().position(|b| b.id == home_id);
        // A workflow at home under the bound (nearly every call) needs no ranking.
        if let Some(hi) = home
            && l.under(hi)
            && !(self.hysteresis && h.spilled && l.loads[hi] > l.mean)
        {
            h.away = None;
            h.spilled = false;
            return Some(Choice {
                index: hi,
                reason: Reason::Home,
            });
        }
        let order = rendezvous_order(backends, key);
        match home {
            Some(hi) => {
                h.away = None;
                // Back home (or still home) unless over the bound, or spilled and the home
                // not yet back to the mean.
                let stay_away = self.hysteresis && h.spilled && l.loads[hi] > l.mean;
                if l.under(hi) && !stay_away {
                    h.spilled = false;
                    return Some(Choice {
                        index: hi,
                        reason: Reason::Home,
                    });
                }
                let target = self.spill_target(l, &order, Some(hi));
                // One cost: leave a home over its bound only when the queue ahead there costs
                // more than recomputing the context elsewhere (a long context stays home
                // through a short queue; KV pressure counts as queue past the knee).
                // The home is taken to hold the request's whole prompt and the target none
                // of it (long contexts stay home through a short queue, short calls may
                // go): what every replica estimates alike from the request itself.
                let worth = |i: usize| {
                    let Some(d) = ctx.demand else { return true };
                    (l.loads[hi] - l.loads[i]) * d.work > d.estimate
                };
                let stays_spilled = stay_away
                    && l.under(hi)
                    && h.secondaries.first() == target.map(|i| &backends[i].id);
                match target.filter(|&i| stays_spilled || worth(i)) {
                    Some(i) => Some(self.spill(backends, h, i)),
                    None => {
                        // Everyone is over the bound, or moving costs more than waiting: the
                        // context is worth most at home.
                        h.spilled = false;
                        Some(Choice {
                            index: hi,
                            reason: Reason::Home,
                        })
                    }
                }
            }
            None if ctx.home_busy => {
                let i = self
                    .spill_target(l, &order, None)
                    .or_else(|| l.least(backends, &self.rotor))?;
                Some(self.spill(backends, h, i))
            }
            None if ctx.home_down => {
                // The home is unhealthy (or just failed this request): the workflow moves
                // to the first backend of its order under the bound — the same on every
                // replica, which is also where it was pre-warmed — and comes back when
                // the home is healthy again (a restarted vLLM has lost its cache anyway).
                let i = l
                    .first_under(&order, None)
                    .or_else(|| order.first().copied())?;
                let to = backends[i].id;
                if h.away != Some(to) {
                    h.away = Some(to);
                    h.moves = h.moves.saturating_add(1);
                }
                Some(Choice {
                    index: i,
                    reason: Reason::Migrated,
                })
            }
            None => {
                // The home was drained or removed: move for good.
                let i = self
                    .spill_target(l, &order, None)
                    .or_else(|| order.first().copied())?;
                h.rehome(backends[i].id, k, true);
                h.away = None;
                h.moves = h.moves.saturating_add(1);
                Some(Choice {
                    index: i,
                    reason: Reason::Migrated,
                })
            }
        }
    }
}

impl Policy for WorkflowPolicy {
    fn name(&self) -> &'static str {
        "workflow"
    }

    fn uses_homes(&self) -> bool {
        true
    }

    fn uses_footprints(&self) -> bool {
        self.footprint
    }

    fn stays_home(&self, h: &mut Homes, load: f64, mean: f64) -> bool {
        // The rule `with_homes` applies to a workflow at home, against the same bound.
        if h.away.is_some()
            || load > self.bound * mean + BOUND_SLACK
            || (self.hysteresis && h.spilled && load > mean)
        {
            return false;
        }
        h.spilled = false;
        true
    }

    fn uses_kv(&self) -> bool {
        true
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
        if backends.is_empty() {
            return None;
        }
        let l = Loads::of(backends, self.bound);
        let key = routing_key(meta);
        if let (Some(key), Some(ctx)) = (key, home) {
            return self.with_homes(backends, key, &l, ctx);
        }
        // Without a table (or a key): the stateless rule.
        bounded_choice(backends, &l, key, &self.rotor, Reason::Home)
    }
}

/// The stateless rule of `workflow` and `session`: the first backend of the key's
/// rendezvous order under the load bound (else the first), or without a key the least
/// loaded one.
pub(crate) fn bounded_choice(
    backends: &[Arc<Backend>],
    l: &Loads,
    key: Option<u64>,
    rotor: &AtomicUsize,
    reason: Reason,
) -> Option<Choice> {
    let Some(key) = key else {
        return l.least(backends, rotor).map(|index| Choice {
            index,
            reason: Reason::Balanced,
        });
    };
    let index = first_in_order(backends, key, l)?;
    Some(Choice { index, reason })
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
        b.set_load(BackendLoad {
            waiting,
            ..BackendLoad::default()
        });
    }

    #[test]
    fn a_workflow_always_lands_on_its_home() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
        for w in 0..50 {
            let m = meta(&format!("wf-{w}"));
            let first = p.pick(&b, &m);
            for _ in 0..5 {
                assert_eq!(p.pick(&b, &m), first);
            }
        }
    }

    #[test]
    fn first_in_order_is_the_sorted_orders_choice() {
        let b = test_backends(9);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300u64 {
            for be in &b {
                x = mix(x.wrapping_add(round));
                set_load(be, (x % 7) as f64);
            }
            let l = Loads::of(&b, 1.25);
            let key = mix(round);
            let order = rendezvous_order(&b, key);
            let want = l.first_under(&order, None).or(order.first().copied());
            assert_eq!(first_in_order(&b, key, &l), want, "round {round}");
        }
    }

    #[test]
    fn workflows_spread_over_backends() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
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
        let (p, q) = (WorkflowPolicy::new(1.25, 2), WorkflowPolicy::new(1.25, 2));
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
        let p = WorkflowPolicy::new(1.25, 2);
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
        let p = WorkflowPolicy::new(1.25, 2);
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
        b[home].set_load(BackendLoad {
            kv_usage: 0.8,
            ..BackendLoad::default()
        });
        assert_eq!(load_of(&b[home]), 0.0);
    }

    #[test]
    fn requests_without_a_key_go_to_the_least_loaded() {
        let b = test_backends(3);
        set_load(&b[0], 5.0);
        set_load(&b[1], 1.0);
        set_load(&b[2], 4.0);
        let p = WorkflowPolicy::new(1.25, 2);
        assert_eq!(p.pick(&b, &RequestMeta::default()), Some(1));
    }

    #[test]
    fn the_conversation_root_is_a_key() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
        let m = RequestMeta {
            root_key: Some(42),
            ..RequestMeta::default()
        };
        assert_eq!(routing_key(&m), Some(42));
        assert_eq!(p.pick(&b, &m), Some(rendezvous_order(&b, 42)[0]));
    }

    fn route_with(
        p: &WorkflowPolicy,
        b: &[Arc<Backend>],
        m: &RequestMeta,
        h: &mut Homes,
        demand: Option<&Demand>,
        home_busy: bool,
        home_down: bool,
    ) -> Choice {
        p.route(
            b,
            m,
            Some(HomeCtx {
                homes: h,
                home_busy,
                home_down,
                implicit: false,
                demand,
            }),
        )
        .expect("a choice")
    }

    fn routed(p: &WorkflowPolicy, b: &[Arc<Backend>], m: &RequestMeta, h: &mut Homes) -> Choice {
        route_with(p, b, m, h, None, false, false)
    }

    #[test]
    fn homes_place_stay_spill_with_hysteresis_and_return() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2).hysteresis(true);
        let m = meta("wf-h");
        let mut h = Homes::default();
        let c = routed(&p, &b, &m, &mut h);
        assert_eq!(c.reason, Reason::Placed);
        let home = c.index;
        assert_eq!(h.home, Some(b[home].id));
        assert_eq!(routed(&p, &b, &m, &mut h).reason, Reason::Home);
        // Home over the bound: spill, recorded.
        for x in &b {
            set_load(x, 1.0);
        }
        set_load(&b[home], 9.0); // mean 3, bound 4.75
        let c = routed(&p, &b, &m, &mut h);
        assert_eq!(c.reason, Reason::Spill);
        assert_ne!(c.index, home);
        let spilled_to = c.index;
        assert_eq!(
            (h.spills, h.spilled, h.secondaries.first()),
            (1, true, Some(&b[spilled_to].id))
        );
        // Between the mean and the bound: stays where it spilled (no bouncing).
        set_load(&b[home], 2.0); // mean 1.25, bound 2.56: home under the bound, above the mean
        assert_eq!(routed(&p, &b, &m, &mut h).index, spilled_to);
        // Back to the mean: home again.
        set_load(&b[home], 1.0);
        let c = routed(&p, &b, &m, &mut h);
        assert_eq!((c.index, c.reason, h.spilled), (home, Reason::Home, false));
    }

    #[test]
    fn a_failed_home_migrates_for_good_and_a_busy_one_spills() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
        let m = meta("wf-m");
        let mut h = Homes::default();
        let home = routed(&p, &b, &m, &mut h).index;
        let home_id = b[home].id;
        // The home is no longer a candidate and not busy: it failed.
        let rest: Vec<Arc<Backend>> = b.iter().filter(|x| x.id != home_id).cloned().collect();
        let c = routed(&p, &rest, &m, &mut h);
        assert_eq!(c.reason, Reason::Migrated);
        assert_eq!(h.home, Some(rest[c.index].id));
        assert_eq!(h.moves, 1);
        assert!(
            !h.secondaries.contains(&home_id),
            "a failed home is not a secondary"
        );
        // The old home is back: the workflow stays on its new home.
        assert_eq!(routed(&p, &b, &m, &mut h).reason, Reason::Home);
        assert_eq!(h.home, Some(rest[c.index].id));
        // The home busy (at its concurrency limit) but healthy: spill, keep the home.
        let new_home = h.home;
        let others: Vec<Arc<Backend>> = b
            .iter()
            .filter(|x| Some(x.id) != new_home)
            .cloned()
            .collect();
        let c = route_with(&p, &others, &m, &mut h, None, true, false);
        assert_eq!(c.reason, Reason::Spill);
        assert_eq!(h.home, new_home);
    }

    #[test]
    fn independent_tables_agree_on_every_home() {
        let b = test_backends(6);
        let (p, q) = (WorkflowPolicy::new(1.25, 2), WorkflowPolicy::new(1.25, 2));
        for w in 0..300 {
            let m = meta(&format!("wf-{w}"));
            let (mut h1, mut h2) = (Homes::default(), Homes::default());
            for _ in 0..3 {
                let a = routed(&p, &b, &m, &mut h1).index;
                let c = routed(&q, &b, &m, &mut h2).index;
                assert_eq!(a, c);
            }
            assert_eq!(h1, h2);
        }
    }

    #[test]
    fn implicit_workflows_are_placed_with_their_reason() {
        let b = test_backends(3);
        let p = WorkflowPolicy::new(1.25, 2);
        let m = RequestMeta {
            root_key: Some(7),
            ..RequestMeta::default()
        };
        let mut h = Homes::default();
        let c = p
            .route(
                &b,
                &m,
                Some(HomeCtx {
                    homes: &mut h,
                    home_busy: false,
                    home_down: false,
                    implicit: true,
                    demand: None,
                }),
            )
            .expect("a choice");
        assert_eq!(c.reason, Reason::Implicit);
        assert_eq!(c.index, rendezvous_order(&b, 7)[0]);
    }

    fn with_demand(
        p: &WorkflowPolicy,
        b: &[Arc<Backend>],
        m: &RequestMeta,
        h: &mut Homes,
        d: &Demand,
    ) -> Choice {
        route_with(p, b, m, h, Some(d), false, false)
    }

    #[test]
    fn a_new_workflow_goes_where_kv_events_show_its_context() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
        let m = meta("wf-adopted");
        let first = rendezvous_order(&b, routing_key(&m).expect("key"))[0];
        let other = (first + 2) % 4;
        let mut held = vec![Some(0.0); 4];
        held[other] = Some(9_000.0);
        held[first] = Some(1_000.0);
        let d = Demand {
            estimate: 10_000.0,
            work: 1_000.0,
            prompt_tokens: Some(10_000.0),
            held: held.clone(),
            ..Demand::default()
        };
        // Two replicas that never saw the workflow agree: where its context is.
        for _ in 0..2 {
            let c = with_demand(&p, &b, &m, &mut Homes::default(), &d);
            assert_eq!((c.index, c.reason), (other, Reason::Cached));
        }
        // Less than half the prompt there (a shared system prompt): placed as usual.
        let mut few = d.clone();
        few.held[other] = Some(4_000.0);
        let c = with_demand(&p, &b, &m, &mut Homes::default(), &few);
        assert_eq!((c.index, c.reason), (first, Reason::Placed));
        // No fresh events from it (None): not adopted.
        let mut unknown = d.clone();
        unknown.held[other] = None;
        assert_eq!(
            with_demand(&p, &b, &m, &mut Homes::default(), &unknown).reason,
            Reason::Placed
        );
        // The holder over its load bound: not adopted either (no hot spot).
        set_load(&b[other], 20.0);
        let c = with_demand(&p, &b, &m, &mut Homes::default(), &d);
        assert_ne!(c.index, other);
        assert_eq!(c.reason, Reason::Placed);
        // A workflow with a home keeps it (events only inform placement).
        set_load(&b[other], 0.0);
        let mut h = Homes::default();
        h.rehome(b[first].id, 2, false);
        assert_eq!(
            with_demand(&p, &b, &m, &mut h, &d),
            Choice {
                index: first,
                reason: Reason::Home
            }
        );
    }

    #[test]
    fn new_workflows_avoid_a_backend_full_of_footprint() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2).footprint(true);
        for x in &b {
            x.set_load(BackendLoad {
                kv_capacity_tokens: 100_000.0,
                ..BackendLoad::default()
            });
        }
        let mut moved = 0;
        for w in 0..200 {
            let m = meta(&format!("wf-fp-{w}"));
            let first = rendezvous_order(&b, routing_key(&m).expect("key"))[0];
            // The first choice already holds 90k tokens of live workflows, the rest 10k.
            let mut fp = vec![10_000.0; 4];
            fp[first] = 90_000.0;
            let d = Demand {
                footprints: fp,
                estimate: 5_000.0,
                work: 1_000.0,
                matched: vec![],
                ..Demand::default()
            };
            let c = with_demand(&p, &b, &m, &mut Homes::default(), &d);
            assert_eq!(c.reason, Reason::Placed);
            moved += usize::from(c.index != first);
        }
        assert_eq!(moved, 200, "never placed on the full backend");
        // Balanced footprints: the rendezvous first choice.
        let m = meta("wf-even");
        let d = Demand {
            footprints: vec![30_000.0; 4],
            estimate: 5_000.0,
            work: 1_000.0,
            matched: vec![],
            ..Demand::default()
        };
        let c = with_demand(&p, &b, &m, &mut Homes::default(), &d);
        assert_eq!(
            c.index,
            rendezvous_order(&b, routing_key(&m).expect("key"))[0]
        );
    }

    #[test]
    fn a_long_cached_context_stays_home_through_a_short_queue() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
        let m = meta("wf-long");
        let mut h = Homes::default();
        let d = Demand {
            footprints: vec![0.0; 4],
            estimate: 30_000.0,
            work: 1_000.0,
            matched: vec![],
            ..Demand::default()
        };
        let home = with_demand(&p, &b, &m, &mut h, &d).index;
        // The home holds 30k tokens of this workflow's context.
        h.last_backend = Some(b[home].id);
        h.last_prompt_tokens = 30_000;
        for x in &b {
            set_load(x, 0.0);
        }
        set_load(&b[home], 6.0); // over the bound (mean 1.5, bound 2.9)
        // 6 queued requests × 1k tokens of work < 30k tokens to recompute: stay.
        let c = with_demand(&p, &b, &m, &mut h, &d);
        assert_eq!((c.index, c.reason), (home, Reason::Home));
        // A short call moves.
        let short = Demand {
            estimate: 2_000.0,
            ..d.clone()
        };
        let c = with_demand(&p, &b, &m, &mut h, &short);
        assert_eq!(c.reason, Reason::Spill);
    }

    #[test]
    fn an_unhealthy_home_sends_its_workflow_to_the_same_place_on_every_replica_until_back() {
        let b = test_backends(4);
        let p = WorkflowPolicy::new(1.25, 2);
        let m = meta("wf-down");
        let mut h = Homes::default();
        let home = routed(&p, &b, &m, &mut h).index;
        let home_id = b[home].id;
        let rest: Vec<Arc<Backend>> = b.iter().filter(|x| x.id != home_id).cloned().collect();
        let down = |h: &mut Homes| route_with(&p, &rest, &m, h, None, false, true);
        let c = down(&mut h);
        assert_eq!(c.reason, Reason::Migrated);
        // The deterministic next choice, whatever this replica's secondaries say.
        let mut other = Homes {
            home: Some(home_id),
            secondaries: vec![rest[(c.index + 1) % rest.len()].id],
            ..Homes::default()
        };
        assert_eq!(down(&mut other).index, c.index);
        assert_eq!(
            (h.home, h.away, h.moves),
            (Some(home_id), Some(rest[c.index].id), 1)
        );
        down(&mut h);
        assert_eq!(h.moves, 1, "still away: one move");
        // Healthy again: home.
        let back = routed(&p, &b, &m, &mut h);
        assert_eq!(
            (back.index, back.reason, h.away),
            (home, Reason::Home, None)
        );
    }
}
