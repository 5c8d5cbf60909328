//! The workflow home table: what agentlb knows of each workflow — its home backend (where
//! its context lives), at most k secondary homes (where it spilled or lived before), its
//! agents and lineage edges (parent request → child request), request and token counts.
//!
//! Keys are 64-bit hashes: of the workflow id, or for an *implicit* workflow (a client
//! that sent no id) its conversation root (shown as `~<hex>`). The table is a
//! [`Table`](super::table::Table): bounded (`workflows.max_workflows`), sharded (no global
//! lock on the request path), O(1) per operation. When full, ended workflows go first
//! (`X-Workflow-End: true` or `DELETE /admin/workflows/{id}` end one), then the least
//! recently seen idle ones; a workflow with requests in flight is never evicted. Idle
//! entries expire after `workflows.idle_ttl_secs`.
//!
//! Lineage: each answered request of a workflow is remembered (request id → workflow, in a
//! second bounded table, `workflows.max_lineage`), so a call that names its parent
//! (`X-Parent-Request-Id`) but no workflow inherits the parent's workflow.
//!
//! An entry of an idle workflow costs about 200 bytes plus its id (measured by
//! `cargo xtask bench control`): the agent graph is allocated only for workflows that
//! name agents or parents.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::table::{Class, Classify, Table, Upsert};
use crate::{config::WorkflowConfig, model::BackendId};

/// Token usage reported by a backend for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
}

/// Where a workflow lives: what the routing policy reads and updates for each request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Homes {
    /// The home backend (`None` until placed).
    pub home: Option<BackendId>,
    /// Secondary homes, most recent first (spill targets and former homes).
    pub secondaries: Vec<BackendId>,
    /// The latest request went to `secondaries[0]` because the home was over its bound.
    pub spilled: bool,
    /// Requests that spilled.
    pub spills: u32,
    /// Times the workflow moved because its home failed, was drained or removed.
    pub moves: u32,
    /// While the home is unhealthy: where the workflow went instead.
    pub away: Option<BackendId>,
    /// Backend of the latest answered request.
    pub last_backend: Option<BackendId>,
    /// Tokens of the latest answered request, prompt and completion (what that backend
    /// caches now): the workflow's predicted KV footprint. Before the first answer, the
    /// first prompt's estimated size.
    pub last_prompt_tokens: u32,
    /// The backend whose footprint ledger counts `last_prompt_tokens`.
    pub fp_at: Option<BackendId>,
    /// What the prefix index was last told of the workflow's prompt, so the next call at
    /// the same backend writes only its new blocks.
    pub indexed: Option<Indexed>,
}

/// The workflow's latest prompt as recorded in the prefix index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    /// Recorded for this backend...
    pub backend: BackendId,
    /// ...these many leading blocks...
    pub len: u32,
    /// ...the last of them this hash (chained: it names the whole prefix)...
    pub last: u64,
    /// ...written in full at this time of the index's clock.
    pub at: u32,
}

impl Indexed {
    /// The blocks of `blocks` known to be recorded for `backend` recently enough not to
    /// be written again (`refresh` seconds of the index's clock): the previous prompt,
    /// when this one starts with it.
    pub fn known(&self, blocks: &[u64], backend: BackendId, now: u32, refresh: u32) -> usize {
        let n = self.len as usize;
        if self.backend == backend
            && n > 0
            && blocks.get(n - 1) == Some(&self.last)
            && now.saturating_sub(self.at) <= refresh
        {
            n
        } else {
            0
        }
    }
}

impl Homes {
    /// Records `b` as the most recent secondary home, keeping at most `k`.
    pub fn push_secondary(&mut self, b: BackendId, k: usize) {
        self.secondaries.retain(|&x| x != b);
        if k == 0 {
            return;
        }
        self.secondaries.insert(0, b);
        self.secondaries.truncate(k);
    }

    /// Makes `b` the home; the former home becomes a secondary (its cache may still hold
    /// part of the context) unless it is `gone`.
    pub fn rehome(&mut self, b: BackendId, k: usize, gone: bool) {
        let old = self.home.replace(b);
        self.secondaries.retain(|&x| x != b);
        if let Some(o) = old.filter(|&o| o != b && !gone) {
            self.push_secondary(o, k);
        }
        self.spilled = false;
    }

    /// Tokens the backend `b` is predicted to hold of a prompt of `prompt_tokens`: the
    /// latest prompt of the workflow when `b` answered it.
    pub fn predicted_cached(&self, b: BackendId, prompt_tokens: u64) -> u64 {
        if self.last_backend == Some(b) {
            u64::from(self.last_prompt_tokens).min(prompt_tokens)
        } else {
            0
        }
    }
}

#[derive(Debug, Default)]
struct Graph {
    agents: Vec<(Box<str>, u32)>,
    edges: Vec<(Box<str>, Box<str>)>,
}

/// One workflow (the stored form).
#[derive(Debug)]
struct Wf {
    id: Box<str>,
    implicit: bool,
    ended: bool,
    /// Seconds since the table's epoch.
    first_seen: u32,
    last_seen: u32,
    requests: u32,
    inflight: u32,
    homes: Homes,
    /// Requests answered per backend.
    per_backend: Vec<(BackendId, u32)>,
    usage: Usage,
    graph: Option<Box<Graph>>,
}

impl Classify for Wf {
    fn class(&self) -> Class {
        if self.inflight > 0 {
            Class::Pinned
        } else if self.ended {
            Class::Ended
        } else {
            Class::Idle
        }
    }
}

/// What a request inherited from its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    /// The workflow's routing key.
    pub key: u64,
    /// The workflow id (`~<hex>` for an implicit workflow).
    pub id: String,
}

#[derive(Debug)]
struct Lineage {
    key: u64,
    id: Box<str>,
}

impl Classify for Lineage {
    fn class(&self) -> Class {
        Class::Idle
    }
}

/// One workflow, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowEntry {
    /// Id (`~<hex>` for an implicit workflow).
    pub id: String,
    /// The workflow has no id of its own: its key is its conversation root.
    pub implicit: bool,
    /// The workflow was ended (`X-Workflow-End`); it is evicted first.
    pub ended: bool,
    /// Unix seconds of the first request.
    pub first_seen_unix: u64,
    /// Unix seconds of the last request.
    pub last_seen_unix: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requests in flight.
    pub inflight: u64,
    /// Home backend id.
    pub home: Option<BackendId>,
    /// Secondary homes, most recent first.
    pub secondaries: Vec<BackendId>,
    /// The latest request spilled to `secondaries[0]`.
    pub spilled: bool,
    /// While the home is unhealthy: where the workflow went instead.
    pub away: Option<BackendId>,
    /// Requests that spilled off an overloaded home.
    pub spills: u64,
    /// Times the home moved because it failed or was drained.
    pub moves: u64,
    /// Backend of the latest answered request.
    pub last_backend: Option<BackendId>,
    /// Requests answered per backend id.
    pub backends: Vec<(BackendId, u64)>,
    /// Requests per agent.
    pub agents: Vec<(String, u64)>,
    /// Lineage edges `(parent request id, child request id)`.
    pub edges: Vec<(String, String)>,
    /// Largest number of children of one parent request.
    pub max_fan_out: u64,
    /// Token totals.
    pub usage: Usage,
}

/// Summary row for listings.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowSummary {
    /// Id.
    pub id: String,
    /// Implicit workflow.
    pub implicit: bool,
    /// Requests.
    pub requests: u64,
    /// Requests in flight.
    pub inflight: u64,
    /// Agents seen.
    pub agents: usize,
    /// Home backend id.
    pub home: Option<BackendId>,
    /// Unix seconds of the last request.
    pub last_seen_unix: u64,
}

/// The table.
#[derive(Debug)]
pub struct WorkflowTable {
    table: Table<Wf>,
    lineage: Table<Lineage>,
    ttl: Duration,
    max_edges: usize,
    max_agents: usize,
    epoch: Instant,
    epoch_unix: u64,
    /// Requests that found the table full of active workflows (not tracked).
    pub full: AtomicU64,
    /// Predicted KV footprint (tokens) of live workflows per backend, by backend id modulo
    /// [`FP_SLOTS`].
    footprints: Box<[AtomicI64]>,
    /// Work of an average request in tokens (uncached prompt + completion), an EWMA (f64
    /// bits).
    work: AtomicU64,
}

/// Slots of the footprint ledger: backend ids are assigned from 0 upwards, so ids alias
/// only after this many backends were ever added to one process.
pub const FP_SLOTS: usize = 4096;

/// Work of a request before any was measured, in tokens.
const DEFAULT_WORK: f64 = 1000.0;

/// The routing key of a workflow id.
pub fn key_of(id: &str) -> u64 {
    super::policies::workflow::stable_hash(id.as_bytes())
}

/// The display id of an implicit workflow.
pub fn implicit_id(key: u64) -> String {
    format!("~{key:016x}")
}

impl WorkflowTable {
    /// An empty table.
    pub fn new(cfg: &WorkflowConfig) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            table: Table::new(cfg.max_workflows),
            lineage: Table::new(cfg.max_lineage),
            ttl: cfg.idle_ttl,
            max_edges: cfg.max_edges_per_workflow,
            max_agents: cfg.max_agents_per_workflow,
            epoch: Instant::now(),
            epoch_unix: now,
            full: AtomicU64::new(0),
            footprints: (0..FP_SLOTS).map(|_| AtomicI64::new(0)).collect(),
            work: AtomicU64::new(DEFAULT_WORK.to_bits()),
        }
    }

    fn fp_add(&self, b: BackendId, delta: i64) {
        self.footprints[b as usize % FP_SLOTS].fetch_add(delta, Ordering::Relaxed);
    }

    /// Predicted KV footprint (tokens) of the live workflows whose context is on `b`.
    pub fn footprint(&self, b: BackendId) -> f64 {
        self.footprints[b as usize % FP_SLOTS]
            .load(Ordering::Relaxed)
            .max(0) as f64
    }

    /// Work of an average request, in tokens (uncached prompt + completion).
    pub fn work_per_request(&self) -> f64 {
        f64::from_bits(self.work.load(Ordering::Relaxed))
    }

    /// Takes a workflow's footprint off the ledger (it ended, was evicted or forgotten).
    fn release(&self, h: &mut Homes) {
        if let Some(b) = h.fp_at.take() {
            self.fp_add(b, -i64::from(h.last_prompt_tokens));
        }
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn insert(&self, id: &str, implicit: bool) -> impl FnOnce() -> Wf {
        let now = self.now();
        move || Wf {
            id: id.into(),
            implicit,
            ended: false,
            first_seen: now,
            last_seen: now,
            requests: 0,
            inflight: 0,
            homes: Homes::default(),
            per_backend: Vec::new(),
            usage: Usage::default(),
            graph: None,
        }
    }

    /// Runs the routing decision `f` on the workflow's homes (creating the entry for a new
    /// workflow). When the table is full of active workflows, `f` runs on a scratch
    /// [`Homes`] and nothing is stored.
    pub fn route<R>(
        &self,
        key: u64,
        id: &str,
        implicit: bool,
        estimate: u64,
        f: impl FnOnce(&mut Homes) -> R,
    ) -> R {
        let now = self.now();
        self.table.upsert_evicting(
            key,
            self.insert(id, implicit),
            |e, how| match e {
                Some(e) => self.routed(e, now, estimate, f),
                None => {
                    debug_assert_eq!(how, Upsert::Full);
                    self.full.fetch_add(1, Ordering::Relaxed);
                    f(&mut Homes::default())
                }
            },
            |mut old| self.release(&mut old.homes),
        )
    }

    /// [`WorkflowTable::route`] for a workflow already in the table only: `f` decides on
    /// its homes and may decline (`None`, nothing else changes: the caller then takes the
    /// full decision); a workflow not in the table is `None` and is not created.
    pub fn route_known<R>(
        &self,
        key: u64,
        estimate: u64,
        f: impl FnOnce(&mut Homes) -> Option<R>,
    ) -> Option<R> {
        let now = self.now();
        self.table
            .update(key, |e| {
                let mut out = None;
                self.routed(e, now, estimate, |h| out = f(h));
                out
            })
            .flatten()
    }

    /// A routing decision on a stored workflow: seen now, and a home it got booked in the
    /// footprint ledger with this request's prompt.
    fn routed<R>(&self, e: &mut Wf, now: u32, estimate: u64, f: impl FnOnce(&mut Homes) -> R) -> R {
        e.last_seen = now;
        let r = f(&mut e.homes);
        if e.homes.fp_at.is_none()
            && !e.ended
            && let Some(h) = e.homes.home
        {
            e.homes.last_prompt_tokens = u32::try_from(estimate).unwrap_or(u32::MAX);
            e.homes.fp_at = Some(h);
            self.fp_add(h, i64::from(e.homes.last_prompt_tokens));
        }
        r
    }

    /// Whether the workflow has a home (no copy).
    pub fn has_home(&self, key: u64) -> bool {
        self.table
            .get(key, |e| e.homes.home.is_some())
            .unwrap_or(false)
    }

    /// The homes of a workflow (a copy).
    pub fn homes(&self, key: u64) -> Option<Homes> {
        self.table.get(key, |e| e.homes.clone())
    }

    /// Records that a request of the workflow was answered by `backend` (the response head
    /// arrived). Returns whether a new lineage edge was recorded.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        key: u64,
        id: &str,
        implicit: bool,
        agent: Option<&str>,
        parent: Option<&str>,
        request_id: &str,
        backend: BackendId,
    ) -> bool {
        let now = self.now();
        let (max_edges, max_agents) = (self.max_edges, self.max_agents);
        let new_edge = self.table.upsert_evicting(
            key,
            self.insert(id, implicit),
            |e, _| {
                let Some(e) = e else {
                    self.full.fetch_add(1, Ordering::Relaxed);
                    return false;
                };
                e.last_seen = now;
                // A request after the end starts the workflow again.
                e.ended = false;
                e.requests = e.requests.saturating_add(1);
                e.inflight = e.inflight.saturating_add(1);
                e.homes.last_backend = Some(backend);
                match e.per_backend.iter_mut().find(|(b, _)| *b == backend) {
                    Some((_, n)) => *n = n.saturating_add(1),
                    None => e.per_backend.push((backend, 1)),
                }
                if agent.is_none() && parent.is_none() {
                    return false;
                }
                let g = e.graph.get_or_insert_with(Box::default);
                if let Some(a) = agent {
                    if let Some((_, c)) = g.agents.iter_mut().find(|(n, _)| &**n == a) {
                        *c = c.saturating_add(1);
                    } else if g.agents.len() < max_agents {
                        g.agents.push((a.into(), 1));
                    }
                }
                match parent {
                    Some(p) if g.edges.len() < max_edges => {
                        g.edges.push((p.into(), request_id.into()));
                        true
                    }
                    _ => false,
                }
            },
            |mut old| self.release(&mut old.homes),
        );
        self.lineage.upsert(
            key_of(request_id),
            || Lineage { key, id: id.into() },
            |_, _| (),
        );
        new_edge
    }

    /// Records the end of a request on `backend`, with its token usage.
    pub fn finish(&self, key: u64, backend: BackendId, usage: Option<Usage>) {
        if let Some(u) = usage {
            // EWMA of a request's work, over all requests.
            let w = (u.prompt_tokens.saturating_sub(u.cached_tokens) + u.completion_tokens) as f64;
            let old = self.work_per_request();
            self.work
                .store((old * 0.98 + w * 0.02).to_bits(), Ordering::Relaxed);
        }
        self.table.update(key, |e| {
            e.inflight = e.inflight.saturating_sub(1);
            if let Some(u) = usage {
                e.usage.prompt_tokens += u.prompt_tokens;
                e.usage.completion_tokens += u.completion_tokens;
                e.usage.cached_tokens += u.cached_tokens;
                if e.homes.last_backend == Some(backend) && !e.ended {
                    // The context now lives on `backend`, this large.
                    self.release(&mut e.homes);
                    e.homes.last_prompt_tokens =
                        u32::try_from(u.prompt_tokens + u.completion_tokens).unwrap_or(u32::MAX);
                    e.homes.fp_at = Some(backend);
                    self.fp_add(backend, i64::from(e.homes.last_prompt_tokens));
                }
            }
        });
    }

    /// Marks a workflow ended (its entry is evicted first, its footprint released); false
    /// when unknown.
    pub fn end(&self, key: u64) -> bool {
        self.table
            .update(key, |e| {
                e.ended = true;
                self.release(&mut e.homes);
            })
            .is_some()
    }

    /// Forgets a workflow; its next request is placed anew.
    pub fn remove(&self, key: u64) -> bool {
        self.table
            .remove(key)
            .map(|mut e| self.release(&mut e.homes))
            .is_some()
    }

    /// The workflow a request with this parent request id belongs to.
    pub fn parent(&self, parent_request_id: &str) -> Option<Inherited> {
        self.lineage.get(key_of(parent_request_id), |l| Inherited {
            key: l.key,
            id: l.id.to_string(),
        })
    }

    /// Drops workflows idle for longer than the TTL; returns how many.
    pub fn expire(&self) -> usize {
        let cutoff = self
            .now()
            .saturating_sub(u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX));
        let n = self
            .table
            .expire(|e| e.last_seen < cutoff, |mut e| self.release(&mut e.homes));
        // Lineage of forgotten workflows is harmless (a child re-creates the entry); it is
        // bounded by its own capacity.
        n
    }

    /// Workflows tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.table.evictions()
    }

    /// Workflows with requests in flight.
    pub fn active(&self) -> usize {
        let mut n = 0;
        self.table.for_each(|e| n += usize::from(e.inflight > 0));
        n
    }

    fn unix(&self, t: u32) -> u64 {
        self.epoch_unix + u64::from(t)
    }

    /// One workflow by key.
    pub fn get_key(&self, key: u64) -> Option<WorkflowEntry> {
        self.table.get(key, |e| {
            let (agents, edges) = e.graph.as_deref().map_or((vec![], vec![]), |g| {
                (
                    g.agents
                        .iter()
                        .map(|(a, n)| (a.to_string(), u64::from(*n)))
                        .collect(),
                    g.edges
                        .iter()
                        .map(|(p, c)| (p.to_string(), c.to_string()))
                        .collect::<Vec<_>>(),
                )
            });
            let mut fan: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
            for (p, _) in &edges {
                *fan.entry(p.as_str()).or_default() += 1;
            }
            let max_fan_out = fan.values().copied().max().unwrap_or(0);
            WorkflowEntry {
                id: e.id.to_string(),
                implicit: e.implicit,
                ended: e.ended,
                first_seen_unix: self.unix(e.first_seen),
                last_seen_unix: self.unix(e.last_seen),
                requests: u64::from(e.requests),
                inflight: u64::from(e.inflight),
                home: e.homes.home,
                secondaries: e.homes.secondaries.clone(),
                spilled: e.homes.spilled,
                away: e.homes.away,
                spills: u64::from(e.homes.spills),
                moves: u64::from(e.homes.moves),
                last_backend: e.homes.last_backend,
                backends: e
                    .per_backend
                    .iter()
                    .map(|&(b, n)| (b, u64::from(n)))
                    .collect(),
                agents,
                max_fan_out,
                edges,
                usage: e.usage,
            }
        })
    }

    /// One workflow by id (`~<hex>` names an implicit one).
    pub fn get(&self, id: &str) -> Option<WorkflowEntry> {
        self.get_key(lookup_key(id))
    }

    /// A page of summaries, most recently seen first.
    pub fn page(&self, offset: usize, limit: usize) -> (usize, Vec<WorkflowSummary>) {
        let mut v: Vec<(u32, WorkflowSummary)> = Vec::new();
        self.table.for_each(|e| {
            v.push((
                e.last_seen,
                WorkflowSummary {
                    id: e.id.to_string(),
                    implicit: e.implicit,
                    requests: u64::from(e.requests),
                    inflight: u64::from(e.inflight),
                    agents: e.graph.as_ref().map_or(0, |g| g.agents.len()),
                    home: e.homes.home,
                    last_seen_unix: self.unix(e.last_seen),
                },
            ));
        });
        v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        let total = v.len();
        (
            total,
            v.into_iter()
                .skip(offset)
                .take(limit)
                .map(|(_, s)| s)
                .collect(),
        )
    }

    /// Live workflows whose home is `b`: (key, id, implicit, footprint in bytes ≈ 4 ×
    /// tokens).
    pub fn homed_on(&self, b: BackendId) -> Vec<(u64, String, bool, usize)> {
        let mut v = Vec::new();
        self.table.for_each(|e| {
            if e.homes.home == Some(b) && !e.ended {
                let key = if e.implicit {
                    lookup_key(&e.id)
                } else {
                    key_of(&e.id)
                };
                v.push((
                    key,
                    e.id.to_string(),
                    e.implicit,
                    e.homes.last_prompt_tokens as usize * 4,
                ));
            }
        });
        v
    }

    /// Per backend: live (not ended) workflows homed there.
    pub fn homed_per_backend(&self) -> std::collections::HashMap<BackendId, u64> {
        let mut m = std::collections::HashMap::new();
        self.table.for_each(|e| {
            if let (Some(h), false) = (e.homes.home, e.ended) {
                *m.entry(h).or_default() += 1;
            }
        });
        m
    }
}

/// The table key of a workflow id as the admin API names it: `~<16 hex>` is an implicit
/// workflow's key itself.
pub fn lookup_key(id: &str) -> u64 {
    id.strip_prefix('~')
        .filter(|h| h.len() == 16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| key_of(id))
}

/// Extracts token usage from the tail of a response body (JSON or the last SSE
/// chunks): the numbers after `"prompt_tokens":`, `"completion_tokens":` and
/// `"cached_tokens":` (or the Responses API's `"input_tokens"`/`"output_tokens"`), last
/// occurrence wins. Cheap: no JSON parse of the body.
pub fn usage_from_tail(tail: &[u8]) -> Option<Usage> {
    let text = std::str::from_utf8(tail).ok().or_else(|| {
        // The tail may start mid-character; skip to a boundary.
        (1..4).find_map(|i| tail.get(i..).and_then(|t| std::str::from_utf8(t).ok()))
    })?;
    let num = |key: &str| -> Option<u64> {
        let at = text.rfind(key)? + key.len();
        let rest = text[at..].trim_start_matches([' ', ':']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    // Chat/completions name them prompt/completion tokens, the Responses API input/output.
    let prompt = num("\"prompt_tokens\"").or_else(|| num("\"input_tokens\""))?;
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: num("\"completion_tokens\"")
            .or_else(|| num("\"output_tokens\""))
            .unwrap_or(0),
        cached_tokens: num("\"cached_tokens\"").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: usize) -> WorkflowConfig {
        WorkflowConfig {
            max_workflows: max,
            idle_ttl: Duration::from_secs(60),
            max_edges_per_workflow: 2,
            max_agents_per_workflow: 8,
            max_lineage: 100,
            max_responses: 100,
            max_metric_labels: 10,
            max_id_len: 256,
            session_header: "x-user-id".into(),
        }
    }

    fn start(
        t: &WorkflowTable,
        id: &str,
        agent: Option<&str>,
        parent: Option<&str>,
        rid: &str,
        b: BackendId,
    ) -> bool {
        t.start(key_of(id), id, false, agent, parent, rid, b)
    }

    #[test]
    fn tracks_agents_backends_edges_usage_and_lineage() {
        let t = WorkflowTable::new(&cfg(10));
        assert!(!start(&t, "w", Some("planner"), None, "r1", 0));
        assert!(start(&t, "w", Some("coder"), Some("r1"), "r2", 0));
        assert!(start(&t, "w", Some("coder"), Some("r1"), "r3", 1));
        assert!(!start(&t, "w", None, Some("r2"), "r4", 1), "edge cap");
        t.finish(
            key_of("w"),
            1,
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                cached_tokens: 8,
            }),
        );
        let e = t.get("w").expect("entry");
        assert_eq!(e.requests, 4);
        assert_eq!(e.inflight, 3);
        assert_eq!(e.agents, vec![("planner".into(), 1), ("coder".into(), 2)]);
        assert_eq!(e.edges.len(), 2);
        assert_eq!(e.max_fan_out, 2);
        assert_eq!(e.last_backend, Some(1));
        assert_eq!(e.usage.cached_tokens, 8);
        assert_eq!(t.homes(key_of("w")).map(|h| h.last_prompt_tokens), Some(12));
        assert_eq!(t.active(), 1);
        // A child naming r3 as parent inherits the workflow.
        assert_eq!(t.parent("r3").map(|i| i.id), Some("w".into()));
        assert!(t.parent("nope").is_none());
    }

    #[test]
    fn evicts_ended_then_least_recent_and_never_an_active_workflow() {
        let t = WorkflowTable::new(&cfg(3));
        for (i, w) in ["a", "b", "c"].iter().enumerate() {
            start(&t, w, None, None, &format!("r{i}"), 0);
        }
        // a and b finished, c still running.
        t.finish(key_of("a"), 0, None);
        t.finish(key_of("b"), 0, None);
        // b ended: it goes first even though a is older.
        assert!(t.end(key_of("b")));
        start(&t, "d", None, None, "r4", 0);
        assert!(t.get("b").is_none());
        assert!(t.get("a").is_some());
        start(&t, "e", None, None, "r5", 0);
        assert!(t.get("a").is_none());
        assert!(t.get("c").is_some(), "active workflow kept");
        assert_eq!(t.len(), 3);
        assert_eq!(t.evictions(), 2);
        // Full of active workflows: routing still works on a scratch entry.
        let r = t.route(key_of("f"), "f", false, 0, |h| {
            h.home = Some(7);
            h.home
        });
        assert_eq!(r, Some(7));
        assert!(t.get("f").is_none());
        assert_eq!(t.full.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn homes_rehome_and_secondaries() {
        let mut h = Homes::default();
        h.rehome(1, 2, false);
        assert_eq!((h.home, h.secondaries.clone()), (Some(1), vec![]));
        h.rehome(2, 2, false);
        assert_eq!((h.home, h.secondaries.clone()), (Some(2), vec![1]));
        h.rehome(3, 2, true);
        assert_eq!(
            (h.home, h.secondaries.clone()),
            (Some(3), vec![1]),
            "a failed home is not kept"
        );
        h.push_secondary(4, 2);
        h.push_secondary(5, 2);
        assert_eq!(h.secondaries, vec![5, 4]);
        h.last_backend = Some(3);
        h.last_prompt_tokens = 100;
        assert_eq!(h.predicted_cached(3, 250), 100);
        assert_eq!(h.predicted_cached(3, 50), 50);
        assert_eq!(h.predicted_cached(4, 250), 0);
    }

    #[test]
    fn remove_and_implicit_ids() {
        let t = WorkflowTable::new(&cfg(10));
        let k = 0x0123_4567_89ab_cdef;
        let id = implicit_id(k);
        t.start(k, &id, true, None, None, "r1", 0);
        assert_eq!(lookup_key(&id), k);
        let e = t.get(&id).expect("implicit entry");
        assert!(e.implicit);
        assert!(t.remove(k));
        assert!(t.get(&id).is_none());
        assert!(!t.end(k));
    }

    #[test]
    fn page_lists_most_recent_first() {
        let t = WorkflowTable::new(&cfg(10));
        start(&t, "a", None, None, "1", 0);
        start(&t, "b", None, None, "2", 0);
        let (total, page) = t.page(0, 10);
        assert_eq!(total, 2);
        assert_eq!(page.len(), 2);
    }

    #[test]
    fn usage_from_json_and_sse_tails() {
        let json = br#"{"id":"x","usage":{"prompt_tokens":120,"total_tokens":130,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":96}}}"#;
        assert_eq!(
            usage_from_tail(json),
            Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 10,
                cached_tokens: 96
            })
        );
        let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\": 5,\"completion_tokens\": 3}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage_from_tail(sse).map(|u| u.prompt_tokens), Some(5));
        assert_eq!(usage_from_tail(b"data: [DONE]"), None);
    }

    #[test]
    fn the_footprint_ledger_follows_the_context_and_is_released() {
        let t = WorkflowTable::new(&cfg(2));
        let u = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
                cached_tokens: 0,
            })
        };
        // Placed on 1 with an estimate, then answered by 1: booked at its real size.
        t.route(key_of("a"), "a", false, 500, |h| h.rehome(1, 2, false));
        assert_eq!(t.footprint(1), 500.0);
        start(&t, "a", None, None, "r1", 1);
        t.finish(key_of("a"), 1, u(1000, 24));
        assert_eq!(t.footprint(1), 1024.0);
        // The next answer comes from 2 (a spill): the context moved there.
        start(&t, "a", None, None, "r2", 2);
        t.finish(key_of("a"), 2, u(1100, 10));
        assert_eq!((t.footprint(1), t.footprint(2)), (0.0, 1110.0));
        // Ending releases it.
        assert!(t.end(key_of("a")));
        assert_eq!(t.footprint(2), 0.0);
        // Eviction releases it too.
        for w in ["b", "c", "d"] {
            t.route(key_of(w), w, false, 100, |h| h.rehome(3, 2, false));
        }
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.footprint(3),
            200.0,
            "the evicted workflow's footprint is gone"
        );
        assert!(
            t.work_per_request() > DEFAULT_WORK,
            "work EWMA moved towards 1024 and 1110"
        );
    }
}
