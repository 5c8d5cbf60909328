//! The workflow table: what agentlb has seen of each workflow — backends used,
//! agents, lineage edges (parent request → child request), request and token
//! counts. Bounded: at most `max_workflows` entries (least recently seen evicted)
//! and idle entries expire after `idle_ttl`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::config::WorkflowConfig;

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

/// One workflow.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowEntry {
    /// Id.
    pub id: String,
    /// Unix seconds of the first request.
    pub first_seen_unix: u64,
    /// Unix seconds of the last request.
    pub last_seen_unix: u64,
    #[serde(skip)]
    last_seen: Instant,
    /// Requests.
    pub requests: u64,
    /// Requests in flight.
    pub inflight: u64,
    /// Requests per backend name.
    pub backends: BTreeMap<String, u64>,
    /// The backend of the latest request (where its context lives now).
    pub current_backend: Option<String>,
    /// Times the workflow moved because its backend failed.
    pub moves: u64,
    /// Requests per agent.
    pub agents: BTreeMap<String, u64>,
    /// Lineage edges `(parent request id, child request id)`.
    pub edges: BTreeSet<(String, String)>,
    /// Token totals.
    pub usage: Usage,
}

/// Summary row for listings.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowSummary {
    /// Id.
    pub id: String,
    /// Requests.
    pub requests: u64,
    /// Agents seen.
    pub agents: usize,
    /// Backends used.
    pub backends: usize,
    /// Current backend.
    pub current_backend: Option<String>,
    /// Unix seconds of the last request.
    pub last_seen_unix: u64,
}

/// The table.
#[derive(Debug)]
pub struct WorkflowTable {
    inner: Mutex<HashMap<String, WorkflowEntry>>,
    max: usize,
    ttl: Duration,
    max_edges: usize,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl WorkflowTable {
    /// An empty table.
    pub fn new(cfg: &WorkflowConfig) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            max: cfg.max_workflows,
            ttl: cfg.idle_ttl,
            max_edges: cfg.max_edges_per_workflow,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WorkflowEntry>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the start of a request. Returns whether a new lineage edge was seen.
    pub fn start(
        &self,
        id: &str,
        agent: Option<&str>,
        parent: Option<&str>,
        request_id: &str,
        backend: &str,
    ) -> bool {
        let mut map = self.lock();
        if !map.contains_key(id) && map.len() >= self.max {
            // Evict the least recently seen entry.
            if let Some(old) = map
                .values()
                .min_by_key(|e| e.last_seen)
                .map(|e| e.id.clone())
            {
                map.remove(&old);
            }
        }
        let now = unix_now();
        let e = map.entry(id.to_owned()).or_insert_with(|| WorkflowEntry {
            id: id.to_owned(),
            first_seen_unix: now,
            last_seen_unix: now,
            last_seen: Instant::now(),
            requests: 0,
            inflight: 0,
            backends: BTreeMap::new(),
            current_backend: None,
            moves: 0,
            agents: BTreeMap::new(),
            edges: BTreeSet::new(),
            usage: Usage::default(),
        });
        e.last_seen = Instant::now();
        e.last_seen_unix = now;
        e.requests += 1;
        e.inflight += 1;
        *e.backends.entry(backend.to_owned()).or_default() += 1;
        e.current_backend = Some(backend.to_owned());
        if let Some(a) = agent {
            *e.agents.entry(a.to_owned()).or_default() += 1;
        }
        match parent {
            Some(p) if e.edges.len() < self.max_edges => {
                e.edges.insert((p.to_owned(), request_id.to_owned()))
            }
            _ => false,
        }
    }

    /// Records that a request of the workflow was moved off a failed backend
    /// (the request itself is recorded by [`Self::start`] on the new backend).
    pub fn moved(&self, id: &str) {
        if let Some(e) = self.lock().get_mut(id) {
            e.moves += 1;
        }
    }

    /// Records the end of a request with its token usage.
    pub fn finish(&self, id: &str, usage: Option<Usage>) {
        if let Some(e) = self.lock().get_mut(id) {
            e.inflight = e.inflight.saturating_sub(1);
            if let Some(u) = usage {
                e.usage.prompt_tokens += u.prompt_tokens;
                e.usage.completion_tokens += u.completion_tokens;
                e.usage.cached_tokens += u.cached_tokens;
            }
        }
    }

    /// Drops idle entries; returns how many.
    pub fn expire(&self) -> usize {
        let mut map = self.lock();
        let before = map.len();
        let ttl = self.ttl;
        map.retain(|_, e| e.inflight > 0 || e.last_seen.elapsed() < ttl);
        before - map.len()
    }

    /// Number of workflows tracked.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Workflows with requests in flight.
    pub fn active(&self) -> usize {
        self.lock().values().filter(|e| e.inflight > 0).count()
    }

    /// One workflow.
    pub fn get(&self, id: &str) -> Option<WorkflowEntry> {
        self.lock().get(id).cloned()
    }

    /// A page of summaries, most recently seen first.
    pub fn page(&self, offset: usize, limit: usize) -> (usize, Vec<WorkflowSummary>) {
        let map = self.lock();
        let mut v: Vec<&WorkflowEntry> = map.values().collect();
        v.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| a.id.cmp(&b.id)));
        let total = v.len();
        let page = v
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|e| WorkflowSummary {
                id: e.id.clone(),
                requests: e.requests,
                agents: e.agents.len(),
                backends: e.backends.values().filter(|n| **n > 0).count(),
                current_backend: e.current_backend.clone(),
                last_seen_unix: e.last_seen_unix,
            })
            .collect();
        (total, page)
    }
}

/// Extracts token usage from the tail of a response body (JSON or the last SSE
/// chunks): the numbers after `"prompt_tokens":`, `"completion_tokens":` and
/// `"cached_tokens":`, last occurrence wins. Cheap: no JSON parse of the body.
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
    let prompt = num("\"prompt_tokens\"")?;
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: num("\"completion_tokens\"").unwrap_or(0),
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
            max_metric_labels: 10,
            max_id_len: 256,
            session_header: "x-user-id".into(),
        }
    }

    #[test]
    fn tracks_agents_backends_edges_and_usage() {
        let t = WorkflowTable::new(&cfg(10));
        assert!(!t.start("w", Some("planner"), None, "r1", "b0"));
        assert!(t.start("w", Some("coder"), Some("r1"), "r2", "b0"));
        assert!(t.start("w", Some("coder"), Some("r1"), "r3", "b1"));
        assert!(!t.start("w", None, Some("r2"), "r4", "b1"), "edge cap");
        t.moved("w");
        t.finish(
            "w",
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                cached_tokens: 8,
            }),
        );
        let e = t.get("w").expect("entry");
        assert_eq!(e.requests, 4);
        assert_eq!(e.inflight, 3);
        assert_eq!(e.agents["coder"], 2);
        assert_eq!(e.edges.len(), 2);
        assert_eq!(e.current_backend.as_deref(), Some("b1"));
        assert_eq!(e.moves, 1);
        assert_eq!(e.usage.cached_tokens, 8);
        assert_eq!(t.active(), 1);
    }

    #[test]
    fn bounded_by_lru() {
        let t = WorkflowTable::new(&cfg(2));
        t.start("a", None, None, "1", "b");
        std::thread::sleep(Duration::from_millis(2));
        t.start("b", None, None, "2", "b");
        std::thread::sleep(Duration::from_millis(2));
        t.start("c", None, None, "3", "b");
        assert_eq!(t.len(), 2);
        assert!(t.get("a").is_none());
        let (total, page) = t.page(0, 1);
        assert_eq!((total, page[0].id.as_str()), (2, "c"));
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
}
