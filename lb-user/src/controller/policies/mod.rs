//! Routing policies: one trait, one file per policy.

mod least_loaded;
mod prefix;
mod round_robin;
mod session;
pub mod workflow;

use std::sync::Arc;

pub use least_loaded::LeastLoaded;
pub use prefix::PrefixPolicy;
pub use round_robin::RoundRobin;
pub use session::SessionPolicy;
pub use workflow::WorkflowPolicy;

use crate::{
    config::{PolicyName, RoutingConfig},
    controller::workflows::Homes,
    model::{Backend, RequestMeta},
};

/// Why a request went where it went (the `reason` of `x-agentlb-route` and a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The workflow's home.
    Home,
    /// A secondary home: the home was over its load bound (or at its concurrency limit).
    Spill,
    /// A new workflow placed on its first choice.
    Placed,
    /// The home failed or was drained: the workflow moved for good.
    Migrated,
    /// A new implicit workflow (no id: keyed by its conversation root) placed.
    Implicit,
    /// The backend that owns the stored response the request refers to.
    Owner,
    /// Balanced without affinity (no key, or a policy without affinity).
    Balanced,
    /// A session key's backend.
    Session,
    /// The backend predicted to hold the longest prefix of the prompt (`prefix`, `kv`).
    Prefix,
    /// A workflow new to this gateway placed where the backends' KV events show its
    /// context cached (another replica, or this one before a restart, routed it there).
    Cached,
}

impl Reason {
    /// All reasons, in label order.
    pub const ALL: [Reason; 10] = [
        Self::Home,
        Self::Spill,
        Self::Placed,
        Self::Migrated,
        Self::Implicit,
        Self::Owner,
        Self::Balanced,
        Self::Session,
        Self::Prefix,
        Self::Cached,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Home => "home",
            Self::Spill => "spill",
            Self::Placed => "placed",
            Self::Migrated => "migrated",
            Self::Implicit => "implicit",
            Self::Owner => "owner",
            Self::Balanced => "balanced",
            Self::Session => "session",
            Self::Prefix => "prefix",
            Self::Cached => "cached",
        }
    }
}

/// A policy's choice: an index into the candidates and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index into the candidate backends.
    pub index: usize,
    /// Why.
    pub reason: Reason,
}

/// What a policy with homes knows beyond the candidates.
#[derive(Debug)]
pub struct HomeCtx<'a> {
    /// The workflow's homes, updated in place by the decision.
    pub homes: &'a mut Homes,
    /// The home is healthy but not a candidate (at its concurrency limit): spill, do not
    /// move.
    pub home_busy: bool,
    /// The home is configured and not draining but unhealthy (or failed this request):
    /// the workflow goes elsewhere until it is back.
    pub home_down: bool,
    /// The workflow is implicit (keyed by its conversation root).
    pub implicit: bool,
    /// KV demand, for placement by footprint and the cost of a spill (`None`: balance by
    /// load alone).
    pub demand: Option<&'a Demand>,
}

/// What the controller knows of KV demand when a policy places or spills a workflow.
#[derive(Debug, Clone, Default)]
pub struct Demand {
    /// Predicted KV footprint (tokens) of the live workflows on each candidate.
    pub footprints: Vec<f64>,
    /// This request's prompt size, estimated (tokens).
    pub estimate: f64,
    /// Work of an average request (tokens of prefill and decode), to weigh a queue.
    pub work: f64,
    /// Prompt tokens each candidate is predicted to hold, from the KV events where they
    /// are fresh, else the prefix index (empty without either).
    pub matched: Vec<f64>,
    /// Prompt tokens each candidate holds according to its KV events (`None`: no fresh
    /// events from it); filled for a workflow new to this gateway. Empty when unknown.
    pub held: Vec<Option<f64>>,
    /// The prompt's exact size in tokens, when it was tokenized.
    pub prompt_tokens: Option<f64>,
}

/// A routing policy: given the backend snapshot and the request's metadata, the
/// index of the backend to use (`None` when there is none).
pub trait Policy: Send + Sync {
    /// Canonical name.
    fn name(&self) -> &'static str;
    /// Chooses a backend.
    fn pick(&self, backends: &[Arc<Backend>], meta: &RequestMeta) -> Option<usize>;
    /// Whether the policy keeps workflow homes (the controller then passes them to
    /// [`Policy::route`]).
    fn uses_homes(&self) -> bool {
        false
    }
    /// Whether a workflow at its home may stay there without the full decision: `load` is
    /// the home's scraped load and `mean` the cluster's (see [`crate::controller::view`]).
    /// Staying updates the homes as the full decision would. Policies without homes never
    /// stay.
    fn stays_home(&self, _homes: &mut Homes, _load: f64, _mean: f64) -> bool {
        false
    }
    /// Whether the policy places by predicted KV footprint (the controller then reads
    /// the footprint ledger into [`Demand::footprints`]).
    fn uses_footprints(&self) -> bool {
        false
    }
    /// Whether the policy reads the prefix index (the controller then fills
    /// [`Demand::matched`] and passes the demand even without homes).
    fn uses_prefix(&self) -> bool {
        false
    }
    /// Whether the policy reads the backends' KV events (the proxy then tokenizes
    /// requests, when a tokenizer is configured).
    fn uses_kv(&self) -> bool {
        false
    }
    /// Whether requests are split into a prefill leg and a decode leg by backend role
    /// (the proxy does the split; the policy scores each leg's candidates).
    fn disaggregated(&self) -> bool {
        false
    }
    /// Chooses a backend with the workflow's homes when the policy keeps them.
    fn route(
        &self,
        backends: &[Arc<Backend>],
        meta: &RequestMeta,
        _home: Option<HomeCtx<'_>>,
    ) -> Option<Choice> {
        self.pick(backends, meta).map(|index| Choice {
            index,
            reason: Reason::Balanced,
        })
    }
}

/// Builds the configured policy.
pub fn build(name: PolicyName, routing: &RoutingConfig) -> Box<dyn Policy> {
    match name {
        PolicyName::RoundRobin => Box::new(RoundRobin::default()),
        PolicyName::LeastLoaded => Box::new(LeastLoaded::default()),
        PolicyName::Workflow => Box::new(
            WorkflowPolicy::new(routing.load_bound, routing.secondary_homes)
                .footprint(routing.footprint_placement)
                .hysteresis(routing.spill_hysteresis),
        ),
        PolicyName::Session => Box::new(SessionPolicy::new(routing.load_bound)),
        PolicyName::Prefix => Box::new(PrefixPolicy::default()),
        PolicyName::Kv => Box::new(PrefixPolicy::kv()),
        PolicyName::Disaggregated => Box::new(PrefixPolicy::disaggregated()),
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
