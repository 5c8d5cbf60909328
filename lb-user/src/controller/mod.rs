//! The controller: one place decides where requests go.
//!
//! It owns the backend registry (a lock-free `ArcSwap` snapshot read on every
//! request), the routing policy, active health checking ([`health`]), passive
//! health (circuit breakers on each [`Backend`]), and the workflow table
//! ([`workflows`]). It publishes the backend set to the dataplane.

pub mod decisions;
pub mod health;
pub mod policies;
pub mod prefix;
pub mod prewarm;
pub mod responses;
pub mod table;
pub mod view;
pub mod workflows;

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use arc_swap::ArcSwap;
use thiserror::Error;

use crate::{
    config::{BackendConfig, PolicyName, RoutingConfig},
    dataplane::PublishedBackend,
    model::{Backend, BackendId, RequestMeta},
};
pub use policies::{Policy, Reason};

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
    /// A backend with this URL or name exists.
    #[error("backend {0} already exists")]
    Duplicate(String),
    /// No such backend.
    #[error("no backend with id {0}")]
    NotFound(BackendId),
}

/// Why no backend was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// None configured / all removed.
    Empty,
    /// No backend serves the requested model.
    UnknownModel,
    /// Backends exist but none is routable (unhealthy, open circuit, draining,
    /// already tried).
    Unavailable,
    /// Routable backends exist but all are at their concurrency limit.
    Busy,
}

/// A routing decision.
#[derive(Debug, Clone)]
pub struct Picked {
    /// The backend.
    pub backend: Arc<Backend>,
    /// Why.
    pub reason: Reason,
    /// Prompt tokens the backend is predicted to have cached for this request.
    pub predicted_cached: u64,
}

/// Registry + policy + workflow table.
pub struct Controller {
    backends: ArcSwap<Vec<Arc<Backend>>>,
    policy: ArcSwap<Box<dyn Policy>>,
    next_id: AtomicU32,
    /// Workflow table.
    pub workflows: workflows::WorkflowTable,
    /// Owners of stored Responses API responses.
    pub responses: responses::ResponseOwners,
    /// The approximate prefix index (`None` when `routing.prefix_index_blocks = 0`).
    pub prefix: Option<prefix::PrefixIndex>,
    /// Migration of workflows off failed or drained backends, and pre-warm.
    pub prewarm: prewarm::Prewarmer,
    /// Workflow → backend decisions for the kernel fast path (single writer).
    pub decisions: decisions::Publisher,
    /// Precise KV-aware routing (the backends' KV events), when set up.
    pub kv: Option<Arc<crate::kv::KvRouting>>,
    /// The cluster's mean load, for the O(1) decision of a workflow at home.
    load: view::ClusterLoad,
    /// Wakes the health checker for a round now (a backend connection ended badly).
    pub health_wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("backends", &self.backends.load().len())
            .field("policy", &self.policy_name())
            .finish()
    }
}

impl Controller {
    /// Creates a controller over resolved backends.
    pub fn new(
        backends: Vec<Backend>,
        policy: PolicyName,
        routing: &RoutingConfig,
        wf: &crate::config::WorkflowConfig,
    ) -> Self {
        let next = backends.iter().map(|b| b.id + 1).max().unwrap_or(0);
        Self {
            backends: ArcSwap::from_pointee(backends.into_iter().map(Arc::new).collect()),
            policy: ArcSwap::from_pointee(policies::build(policy, routing)),
            next_id: AtomicU32::new(next),
            workflows: workflows::WorkflowTable::new(wf),
            responses: responses::ResponseOwners::new(wf.max_responses),
            prewarm: prewarm::Prewarmer::new(routing.prewarm.clone(), wf.max_workflows),
            decisions: decisions::Publisher::default(),
            kv: None,
            load: view::ClusterLoad::default(),
            health_wake: tokio::sync::Notify::new(),
            prefix: (routing.prefix_index_blocks > 0).then(|| {
                prefix::PrefixIndex::new(
                    routing.prefix_index_blocks,
                    routing.prefix_block_bytes,
                    routing.prefix_ttl_secs,
                )
                .background()
            }),
        }
    }

    /// Adds precise KV-aware routing.
    pub fn with_kv(mut self, kv: Option<Arc<crate::kv::KvRouting>>) -> Self {
        self.kv = kv;
        self
    }

    /// Without a tokenizer: the blocks learned for this request's workflow, when the
    /// policy reads the events and would tokenize it (see [`Controller::kv_for`]).
    pub fn kv_learned(&self, meta: &RequestMeta) -> Option<crate::kv::PromptKeys> {
        let kv = self.kv.as_ref().filter(|k| !k.can_key())?;
        let policy = self.policy.load();
        if !policy.uses_kv() {
            return None;
        }
        let key = policies::workflow::routing_key(meta)?;
        if policy.uses_homes() && self.workflows.has_home(key) {
            return None;
        }
        kv.learned(key)
    }

    /// Precise KV routing, when this request should be tokenized for it: a tokenizer is
    /// loaded and the policy reads the events — `kv` for every request, `workflow` only
    /// for a workflow without a home here (where the events say its context is decides
    /// its placement; a workflow at home stays there).
    pub fn kv_for(&self, meta: &RequestMeta) -> Option<&Arc<crate::kv::KvRouting>> {
        let kv = self.kv.as_ref().filter(|k| k.can_key())?;
        let policy = self.policy.load();
        if !policy.uses_kv() {
            return None;
        }
        if policy.uses_homes()
            && let Some(key) = policies::workflow::routing_key(meta)
            && self.workflows.has_home(key)
        {
            return None;
        }
        Some(kv)
    }

    /// Resolves one backend (DNS for host names).
    pub async fn resolve_one(c: &BackendConfig, id: BackendId) -> Result<Backend, ControllerError> {
        let addrs: Vec<_> = tokio::net::lookup_host((c.host.as_str(), c.port))
            .await
            .map_err(|e| ControllerError::Resolve {
                name: c.name.clone(),
                host: c.host.clone(),
                port: c.port,
                message: e.to_string(),
            })?
            .collect();
        let mut b = Backend::new(id, c.name.clone(), c.url.clone(), addrs);
        b.role = c.role;
        Ok(b)
    }

    /// Resolves configured backends and assigns ids 0..n.
    pub async fn resolve(configs: &[BackendConfig]) -> Result<Vec<Backend>, ControllerError> {
        let mut out = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            out.push(Self::resolve_one(c, u32::try_from(i).unwrap_or(u32::MAX)).await?);
        }
        Ok(out)
    }

    /// Picks a backend for a request, skipping `exclude` (already tried) and
    /// backends at `per_backend_limit` in-flight requests.
    pub fn pick(
        &self,
        meta: &RequestMeta,
        exclude: &[BackendId],
        per_backend_limit: u64,
    ) -> Result<Picked, NoBackend> {
        let snap = self.backends.load();
        if snap.is_empty() {
            return Err(NoBackend::Empty);
        }
        let policy = self.policy.load();
        let view = self.load.view(&snap);
        if let Some(p) = self.at_home(&snap, view, &***policy, meta, exclude, per_backend_limit) {
            return Ok(p);
        }
        let model = meta.model.as_deref();
        // One pass; the flags tell which filter emptied the set.
        let (mut serving, mut routable) = (false, false);
        // The candidates: the snapshot itself while every backend is one (no copy), a
        // copy from the first that is not.
        let mut copied: Option<Vec<Arc<Backend>>> = None;
        // Backends that all serve the same models: one answers for all.
        let all_serve = view.uniform.then(|| snap[0].serves(model));
        for (i, b) in snap.iter().enumerate() {
            let s = all_serve.unwrap_or_else(|| b.serves(model));
            serving |= s;
            let r = s && !exclude.contains(&b.id) && b.routable();
            routable |= r;
            let ok = r && b.inflight() < per_backend_limit;
            match (&mut copied, ok) {
                (Some(v), true) => v.push(b.clone()),
                (None, false) => copied = Some(snap[..i].to_vec()),
                _ => {}
            }
        }
        let free: &[Arc<Backend>] = copied.as_deref().unwrap_or(&snap);
        if !serving {
            return Err(NoBackend::UnknownModel);
        }
        if !routable {
            return Err(NoBackend::Unavailable);
        }
        if free.is_empty() {
            return Err(NoBackend::Busy);
        }
        // A request that must reach one backend (the owner of a stored response).
        if let Some(owner) = meta.pinned {
            let b = free.iter().find(|b| b.id == owner).cloned();
            return match b {
                Some(b) => {
                    b.requests.fetch_add(1, Ordering::Relaxed);
                    Ok(Picked {
                        backend: b,
                        reason: Reason::Owner,
                        predicted_cached: 0,
                    })
                }
                None if exclude.contains(&owner)
                    || !snap.iter().any(|b| b.id == owner && b.routable()) =>
                {
                    Err(NoBackend::Unavailable)
                }
                None => Err(NoBackend::Busy),
            };
        }
        let key = policies::workflow::routing_key(meta).filter(|_| policy.uses_homes());
        let index = self
            .prefix
            .as_ref()
            .filter(|_| !meta.blocks.is_empty() && (policy.uses_homes() || policy.uses_prefix()));
        let estimate = meta.prompt_tokens_estimate();
        // The prompt's blocks against the backends' KV events (fresh sources only).
        let kv = self
            .kv
            .as_ref()
            .filter(|_| policy.uses_kv())
            .zip(meta.kv.as_ref());
        let demand = (key.is_some() || policy.uses_prefix()).then(|| policies::Demand {
            // Read from the ledger only for a policy that places by footprint.
            footprints: if policy.uses_footprints() {
                free.iter()
                    .map(|b| self.workflows.footprint(b.id))
                    .collect()
            } else {
                Vec::new()
            },
            estimate: estimate as f64,
            work: self.workflows.work_per_request(),
            // Every candidate's prediction only for a policy that chooses by it; the
            // others get the chosen backend's alone, below.
            matched: if policy.uses_prefix() {
                let ids: Vec<BackendId> = free.iter().map(|b| b.id).collect();
                let mut m = match index {
                    Some(ix) => ix.predicted_tokens(&meta.blocks, &ids),
                    None => vec![0.0; ids.len()],
                };
                if let Some((kv, p)) = kv {
                    for (x, held) in m.iter_mut().zip(kv.held_tokens(&p.keys, &ids)) {
                        match held {
                            // An earlier prompt of the workflow, all still held: the
                            // approximate prediction also covers what came since.
                            Some(h) if p.learned && h >= 0.9 * p.tokens as f64 => {
                                *x = x.max(h);
                            }
                            Some(h) => *x = h,
                            None => {}
                        }
                    }
                }
                m
            } else {
                Vec::new()
            },
            held: Vec::new(),
            prompt_tokens: meta
                .kv
                .as_ref()
                .filter(|p| !p.learned)
                .map(|p| p.tokens as f64),
        });
        let matched = |i: usize| {
            demand
                .as_ref()
                .and_then(|d| d.matched.get(i).copied())
                .unwrap_or(0.0) as u64
        };
        let (choice, predicted) = match key {
            Some(key) => {
                let implicit = meta.workflow_id.is_none();
                let id = match &meta.workflow_id {
                    Some(w) => std::borrow::Cow::Borrowed(w.as_str()),
                    None => std::borrow::Cow::Owned(workflows::implicit_id(key)),
                };
                self.workflows.route(key, &id, implicit, estimate, |homes| {
                    let before = homes.away.or(homes.home);
                    // A workflow new to this gateway: where do the backends' events say
                    // its context is?
                    let adopted;
                    let demand = match (&demand, kv) {
                        (Some(d), Some((kv, p))) if homes.home.is_none() && !p.learned => {
                            let ids: Vec<BackendId> = free.iter().map(|b| b.id).collect();
                            adopted = policies::Demand {
                                held: kv.held_tokens(&p.keys, &ids),
                                ..d.clone()
                            };
                            Some(&adopted)
                        }
                        (d, _) => d.as_ref(),
                    };
                    let home = homes
                        .home
                        .and_then(|h| snap.iter().find(|b| b.id == h))
                        .filter(|b| !b.draining.load(Ordering::Relaxed));
                    let home_busy = home.is_some_and(|b| !exclude.contains(&b.id) && b.routable());
                    let home_down = home.is_some() && !home_busy;
                    let c = policy.route(
                        free,
                        meta,
                        Some(policies::HomeCtx {
                            homes,
                            home_busy,
                            home_down,
                            implicit,
                            demand,
                        }),
                    );
                    let predicted = c.map_or(0, |c| {
                        let id = free[c.index].id;
                        if let Some((kv, p)) = kv
                            && let Some(Some(held)) = kv.held_tokens(&p.keys, &[id]).first()
                        {
                            return *held as u64;
                        }
                        let indexed = index.map_or(0, |ix| {
                            ix.predicted_tokens(&meta.blocks, &[id])
                                .first()
                                .copied()
                                .unwrap_or(0.0) as u64
                        });
                        homes.predicted_cached(id, estimate).max(indexed)
                    });
                    if let (Some(ix), Some(c)) = (index, c) {
                        homes.indexed =
                            note_indexed(&meta.blocks, free[c.index].id, ix.clock(), None);
                    }
                    let after = homes.away.or(homes.home);
                    if after != before {
                        self.decisions.send(decisions::Decision {
                            key,
                            backend: after,
                        });
                    }
                    (c, predicted)
                })
            }
            None => {
                let mut scratch = workflows::Homes::default();
                let c = match &demand {
                    Some(d) => policy.route(
                        free,
                        meta,
                        Some(policies::HomeCtx {
                            homes: &mut scratch,
                            home_busy: false,
                            home_down: false,
                            implicit: false,
                            demand: Some(d),
                        }),
                    ),
                    None => policy.route(free, meta, None),
                };
                (c, c.map_or(0, |c| matched(c.index)))
            }
        };
        let choice = choice.ok_or(NoBackend::Unavailable)?;
        let b = free
            .get(choice.index)
            .cloned()
            .ok_or(NoBackend::Unavailable)?;
        b.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(ix) = index {
            ix.insert(&meta.blocks, b.id);
        }
        if let Some(kv) = &self.kv {
            kv.expect_events(b.id);
        }
        Ok(Picked {
            backend: b,
            reason: choice.reason,
            predicted_cached: predicted,
        })
    }

    /// The decision for nearly every request of a workflow, in O(1) whatever the number
    /// of backends: a workflow this gateway knows, at its home, the home routable, not
    /// excluded, under its concurrency limit and under the load bound against the
    /// cluster's mean ([`view`]). Anything else — a new workflow, a spill, a move, a
    /// stored response's owner, a request tokenized for KV routing, a cluster whose
    /// backends serve different models — takes the full decision (`None`).
    fn at_home(
        &self,
        snap: &[Arc<Backend>],
        view: view::View,
        policy: &dyn Policy,
        meta: &RequestMeta,
        exclude: &[BackendId],
        limit: u64,
    ) -> Option<Picked> {
        if meta.pinned.is_some() || meta.kv.is_some() || !policy.uses_homes() {
            return None;
        }
        let key = policies::workflow::routing_key(meta)?;
        let mean = view.uniform.then_some(view.mean)?;
        let model = meta.model.as_deref();
        let estimate = meta.prompt_tokens_estimate();
        let index = self.prefix.as_ref().filter(|_| !meta.blocks.is_empty());
        let (b, predicted, known) = self.workflows.route_known(key, estimate, |h| {
            let id = h.home?;
            // Ids are positions until backends are removed: look there first.
            let b = usize::try_from(id)
                .ok()
                .and_then(|i| snap.get(i))
                .filter(|b| b.id == id)
                .or_else(|| snap.iter().find(|b| b.id == id))?;
            if exclude.contains(&id)
                || b.inflight() >= limit
                || !b.routable()
                || !b.serves(model)
                || !policy.stays_home(h, policies::workflow::load_of(b), mean)
            {
                return None;
            }
            // The previous prompt, if this one extends it, is in the index already.
            let known = index.map(|ix| {
                let now = ix.clock();
                let known = h
                    .indexed
                    .map_or(0, |i| i.known(&meta.blocks, id, now, ix.refresh_secs()));
                h.indexed = note_indexed(&meta.blocks, id, now, h.indexed.filter(|_| known > 0));
                known
            });
            Some((b.clone(), h.predicted_cached(id, estimate), known))
        })?;
        b.requests.fetch_add(1, Ordering::Relaxed);
        let indexed = match (index, known) {
            (Some(ix), Some(k)) if k > 0 => ix.record_after(&meta.blocks, b.id, k),
            (Some(ix), _) => ix.record(&meta.blocks, b.id),
            _ => 0,
        };
        if let Some(kv) = &self.kv {
            kv.expect_events(b.id);
        }
        Some(Picked {
            backend: b,
            reason: Reason::Home,
            predicted_cached: predicted.max(indexed),
        })
    }

    /// Current backends.
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    /// A backend by id.
    pub fn backend(&self, id: BackendId) -> Option<Arc<Backend>> {
        self.backends.load().iter().find(|b| b.id == id).cloned()
    }

    /// The backend with this resolved address.
    pub fn backend_by_addr(&self, addr: std::net::SocketAddr) -> Option<Arc<Backend>> {
        self.backends
            .load()
            .iter()
            .find(|b| b.addrs.contains(&addr))
            .cloned()
    }

    /// Whether the current policy keeps workflow homes.
    pub fn uses_homes(&self) -> bool {
        self.policy.load().uses_homes()
    }

    /// Whether the policy splits requests into prefill and decode legs.
    pub fn disaggregated(&self) -> bool {
        self.policy.load().disaggregated()
    }

    /// Policy name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.load().name()
    }

    /// Replaces the policy and its parameters (reload).
    pub fn set_policy(&self, p: PolicyName, routing: &RoutingConfig) {
        let changed = self.policy_name() != p.as_str();
        self.policy.store(Arc::new(policies::build(p, routing)));
        if changed {
            tracing::info!(policy = p.as_str(), "routing policy changed");
        }
    }

    /// Adds a resolved backend; returns its id.
    pub async fn add(&self, c: &BackendConfig) -> Result<Arc<Backend>, ControllerError> {
        if self
            .backends
            .load()
            .iter()
            .any(|b| b.url == c.url || b.name == c.name)
        {
            return Err(ControllerError::Duplicate(c.url.to_string()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let b = Arc::new(Self::resolve_one(c, id).await?);
        self.backends.rcu(|cur| {
            let mut v = (**cur).clone();
            v.push(b.clone());
            v
        });
        tracing::info!(backend = %b.name, id, "backend added");
        Ok(b)
    }

    /// Removes a backend (in-flight requests to it finish; its workflows move).
    pub fn remove(&self, id: BackendId) -> Result<Arc<Backend>, ControllerError> {
        let b = self.backend(id).ok_or(ControllerError::NotFound(id))?;
        self.backends.rcu(|cur| {
            cur.iter()
                .filter(|x| x.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        tracing::info!(backend = %b.name, id, "backend removed");
        self.evacuate(id);
        Ok(b)
    }

    /// Drains a backend: no new requests; in-flight ones finish; its workflows move now.
    pub fn drain(&self, id: BackendId) -> Result<Arc<Backend>, ControllerError> {
        let b = self.backend(id).ok_or(ControllerError::NotFound(id))?;
        b.draining.store(true, Ordering::Relaxed);
        tracing::info!(backend = %b.name, id, inflight = b.inflight(), "backend draining");
        self.evacuate(id);
        Ok(b)
    }

    /// Moves every workflow whose home is `id` (failed, drained or removed) to the
    /// backend the policy picks for it now, and pre-warms each new home with the
    /// workflow's latest request. Returns how many moved.
    pub fn evacuate(&self, id: BackendId) -> usize {
        if !self.policy.load().uses_homes() {
            return 0;
        }
        let mut moved = 0;
        for (key, wid, implicit, body_len) in self.workflows.homed_on(id) {
            let meta = RequestMeta {
                workflow_id: (!implicit).then_some(wid),
                root_key: implicit.then_some(key),
                body_len,
                ..RequestMeta::default()
            };
            if let Ok(p) = self.pick(&meta, &[id], u64::MAX)
                && p.reason == Reason::Migrated
            {
                p.backend.requests.fetch_sub(1, Ordering::Relaxed);
                moved += 1;
                self.prewarm.stats.migrated.fetch_add(1, Ordering::Relaxed);
                self.prewarm.prewarm(key, p.backend);
            }
        }
        if moved > 0 {
            tracing::info!(
                backend = id,
                workflows = moved,
                "workflows migrated off the backend"
            );
        }
        moved
    }

    /// Reconciles the registry with a new backend list (reload): keeps backends
    /// whose URL is unchanged (with their state), adds new ones, removes the rest.
    pub async fn reconcile(
        &self,
        configs: &[BackendConfig],
    ) -> Result<(usize, usize), ControllerError> {
        let current = self.backends();
        let mut added = 0;
        for c in configs {
            if !current.iter().any(|b| b.url == c.url) {
                self.add(c).await?;
                added += 1;
            }
        }
        let mut removed = 0;
        for b in current.iter() {
            if !configs.iter().any(|c| c.url == b.url) {
                self.remove(b.id)?;
                removed += 1;
            }
        }
        Ok((added, removed))
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

    /// Union of the models served by routable backends.
    pub fn models(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .backends
            .load()
            .iter()
            .filter(|b| b.routable())
            .flat_map(|b| b.models.load().iter().cloned().collect::<Vec<_>>())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// What a workflow's entry keeps of the prompt just recorded for `backend`: its length
/// and last block, and when it was written in full (`kept`'s time when only the new
/// blocks were).
fn note_indexed(
    blocks: &[u64],
    backend: BackendId,
    now: u32,
    kept: Option<workflows::Indexed>,
) -> Option<workflows::Indexed> {
    Some(workflows::Indexed {
        backend,
        len: u32::try_from(blocks.len()).ok()?,
        last: *blocks.last()?,
        at: kept.map_or(now, |k| k.at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendLoad;

    fn controller(n: usize) -> Controller {
        let raw = crate::config::parse_str("[[backends]]\nurl = \"http://127.0.0.1:9\"\n")
            .expect("parse");
        let cfg = crate::config::validate(&raw).expect("valid");
        let backends = (0..n)
            .map(|i| {
                let b = Backend::new(
                    i as u32,
                    format!("b{i}"),
                    format!("http://127.0.0.1:{}", 8000 + i)
                        .parse()
                        .expect("uri"),
                    vec![],
                );
                b.set_models(vec!["m".to_owned()]);
                b
            })
            .collect();
        Controller::new(backends, PolicyName::Workflow, &cfg.routing, &cfg.workflows)
    }

    fn meta(wf: &str) -> RequestMeta {
        RequestMeta {
            workflow_id: Some(wf.to_owned()),
            model: Some("m".to_owned()),
            body_len: 4000,
            ..RequestMeta::default()
        }
    }

    fn set_waiting(c: &Controller, id: BackendId, waiting: f64) {
        let b = c.backend(id).expect("backend");
        b.set_load(BackendLoad {
            waiting,
            ..BackendLoad::default()
        });
    }

    #[test]
    fn at_home_is_the_full_decisions_answer_and_declines_what_it_cannot_decide() {
        let c = controller(16);
        let m = meta("wf-1");
        let placed = c.pick(&m, &[], u64::MAX).expect("placed");
        assert_eq!(placed.reason, Reason::Placed);
        let home = placed.backend.id;
        // At home: the O(1) decision, the same backend.
        let snap = c.backends.load_full();
        let p = c.policy.load();
        let fast = c
            .at_home(&snap, c.load.view(&snap), &***p, &m, &[], u64::MAX)
            .expect("at home");
        assert_eq!((fast.backend.id, fast.reason), (home, Reason::Home));
        // Excluded (a retry), at its concurrency limit, or over the load bound: declined,
        // and the full decision spills.
        assert!(
            c.at_home(&snap, c.load.view(&snap), &***p, &m, &[home], u64::MAX)
                .is_none()
        );
        let busy = c.backend(home).expect("home");
        busy.inflight.store(3, Ordering::Relaxed);
        assert!(
            c.at_home(&snap, c.load.view(&snap), &***p, &m, &[], 3)
                .is_none()
        );
        busy.inflight.store(0, Ordering::Relaxed);
        set_waiting(&c, home, 40.0);
        std::thread::sleep(view::REFRESH);
        assert!(
            c.at_home(&snap, c.load.view(&snap), &***p, &m, &[], u64::MAX)
                .is_none()
        );
        let spilled = c.pick(&m, &[], u64::MAX).expect("spilled");
        assert_eq!(spilled.reason, Reason::Spill);
        assert_ne!(spilled.backend.id, home);
        // Back under the bound: home again, through the full decision first (it clears
        // the spill), then the O(1) one.
        set_waiting(&c, home, 0.0);
        std::thread::sleep(view::REFRESH);
        let back = c.pick(&m, &[], u64::MAX).expect("home");
        assert_eq!((back.backend.id, back.reason), (home, Reason::Home));
        assert!(
            c.at_home(&snap, c.load.view(&snap), &***p, &m, &[], u64::MAX)
                .is_some()
        );
        // A workflow never seen is not created by it.
        assert!(
            c.at_home(
                &snap,
                c.load.view(&snap),
                &***p,
                &meta("wf-new"),
                &[],
                u64::MAX
            )
            .is_none()
        );
        assert!(c.workflows.homes(workflows::lookup_key("wf-new")).is_none());
    }

    #[test]
    fn a_workflow_at_home_writes_only_its_new_blocks_to_the_prefix_index() {
        let c = controller(8);
        let ix = c.prefix.as_ref().expect("prefix index");
        let block = ix.block();
        let mut prompt = b"s".repeat(block * 4);
        let mut m = meta("wf-grow");
        m.blocks = prefix::block_hashes(&prompt, block, 1000);
        let home = c.pick(&m, &[], u64::MAX).expect("placed").backend.id;
        let written = |c: &Controller| {
            c.prefix.as_ref().map_or(0, |ix| {
                ix.sync();
                ix.len()
            })
        };
        assert_eq!(written(&c), 4);
        // The next call extends the prompt by 3 blocks: only those are written, and
        // the previous 4 are predicted cached.
        prompt.extend(b"t".repeat(block * 3));
        m.blocks = prefix::block_hashes(&prompt, block, 1000);
        let p = c.pick(&m, &[], u64::MAX).expect("home");
        assert_eq!((p.backend.id, p.reason), (home, Reason::Home));
        assert_eq!(p.predicted_cached, (4 * block / 4) as u64);
        assert_eq!(written(&c), 7);
        let homes = c
            .workflows
            .homes(workflows::lookup_key("wf-grow"))
            .expect("homes");
        let indexed = homes.indexed.expect("indexed");
        assert_eq!((indexed.backend, indexed.len), (home, 7));
        // A prompt that does not extend the previous one is looked up in full.
        let other = prefix::block_hashes(&b"u".repeat(block * 2), block, 1000);
        m.blocks = other.clone();
        let p = c.pick(&m, &[], u64::MAX).expect("home");
        assert_eq!(p.predicted_cached, 0);
        assert_eq!(written(&c), 9);
        assert_eq!(
            ix.matched_blocks(&other, &[home]),
            vec![2],
            "recorded for the home"
        );
    }

    #[test]
    fn an_unhealthy_home_is_left_by_the_full_decision() {
        let c = controller(4);
        let m = meta("wf-2");
        let home = c.pick(&m, &[], u64::MAX).expect("placed").backend.id;
        c.backend(home)
            .expect("home")
            .healthy
            .store(false, Ordering::Relaxed);
        let p = c.pick(&m, &[], u64::MAX).expect("moved");
        assert_eq!(p.reason, Reason::Migrated);
        assert_ne!(p.backend.id, home);
    }
}
