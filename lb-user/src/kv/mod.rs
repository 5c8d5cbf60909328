//! Precise KV-aware routing: vLLM's KV events, the block index and in-process tokenization.
//!
//! vLLM instances started with `--kv-events-config` publish every block they store or
//! evict ([`wire`]). agentlb subscribes to each instance ([`subscriber`]; sources from
//! `[[kv.sources]]` or discovered with `GET /kv_event_sources`), keeps one bounded
//! [`index::KvIndex`] of who holds which block, and turns each request into the same
//! blocks by tokenizing it in-process with the model's own tokenizer and chat template
//! ([`tokenize`], `kv.tokenizer` or `kv.tokenizer_model`). The policies then read exact
//! cached-prefix lengths instead of predictions:
//!
//! - `kv` scores every backend by uncached prefill plus queued work;
//! - `workflow` places a workflow it has not seen where its context already is (another
//!   replica routed it there: replicas agree through the backends' own view) and
//!   predicts cached tokens exactly.
//!
//! Where a backend has no fresh source, or no tokenizer is configured, routing uses the
//! approximate prefix index as before. The mode is logged at start and shown in
//! `/admin/backends` and `/admin/kv`.

pub mod index;
pub mod learn;
mod slots;
pub mod subscriber;
pub mod tokenize;
pub mod wire;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    config::KvConfig,
    controller::{Controller, health},
    model::{Backend, BackendId},
};
use index::{BlockKeys, Held, KvIndex};
use subscriber::{Freshness, SourceSpec, SourceState, SubscriberConfig};
use tokenize::{ChatTokenizer, PromptKind};

/// How precise routing is, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Events are indexed and requests tokenized: exact cached prefixes.
    Precise,
    /// Events are indexed but no tokenizer is configured: requests cannot be matched
    /// against them, routing uses the approximate prefix index.
    EventsOnly,
    /// Neither: the approximate prefix index.
    Approximate,
}

impl Mode {
    /// Label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Precise => "precise",
            Mode::EventsOnly => "events_only",
            Mode::Approximate => "approximate",
        }
    }
}

/// A request's blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptKeys {
    /// Chained keys of its full blocks.
    pub keys: Vec<u64>,
    /// Prompt length in tokens.
    pub tokens: usize,
    /// Learned from the backend's `/tokenize` answer to an earlier request of the same
    /// workflow ([`learn`]): a prefix of this prompt, not all of it.
    pub learned: bool,
}

struct Running {
    state: Arc<SourceState>,
    stop: watch::Sender<bool>,
}

/// Precise KV-aware routing: the index, its sources and the tokenizer.
pub struct KvRouting {
    /// The block index.
    pub index: Arc<KvIndex>,
    cfg: KvConfig,
    tokenizer: Option<Arc<ChatTokenizer>>,
    keys: BlockKeys,
    epoch: Instant,
    /// Sources by backend (read on the request path).
    sources: ArcSwap<HashMap<BackendId, Vec<Arc<SourceState>>>>,
    running: Mutex<HashMap<(BackendId, u32), Running>>,
    /// Requests whose prompt could not be tokenized (matched by the approximate index).
    pub tokenize_errors: std::sync::atomic::AtomicU64,
    /// Without a tokenizer: workflows' prompts learned from the backends' `/tokenize`.
    pub learner: Option<Arc<learn::Learner>>,
}

impl std::fmt::Debug for KvRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRouting")
            .field("mode", &self.mode())
            .field("blocks", &self.index.len())
            .finish()
    }
}

/// Errors setting precise routing up.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The configured tokenizer did not load.
    #[error("kv tokenizer: {0}")]
    Tokenizer(#[from] tokenize::TokenizeError),
}

impl KvRouting {
    /// Sets up the index and loads the tokenizer (`kv.tokenizer` or `kv.tokenizer_model`).
    pub fn new(cfg: &KvConfig) -> Result<Self, KvError> {
        let tokenizer = match (&cfg.tokenizer, &cfg.tokenizer_model) {
            (Some(dir), _) => Some(Arc::new(ChatTokenizer::from_dir(dir)?)),
            (None, Some(model)) => Some(Arc::new(ChatTokenizer::from_hf_cache(
                model,
                cfg.hf_cache.as_deref(),
            )?)),
            (None, None) => None,
        };
        let tokenizer_missing = tokenizer.is_none();
        Ok(Self {
            index: Arc::new(KvIndex::new(cfg.max_blocks)),
            cfg: cfg.clone(),
            tokenizer,
            keys: BlockKeys {
                block_size: cfg.block_size,
            },
            epoch: Instant::now(),
            sources: ArcSwap::from_pointee(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            tokenize_errors: std::sync::atomic::AtomicU64::new(0),
            learner: (tokenizer_missing && cfg.learn_max_prompts > 0).then(|| {
                Arc::new(learn::Learner::new(
                    cfg.learn_max_prompts,
                    cfg.learn_concurrency,
                    BlockKeys {
                        block_size: cfg.block_size,
                    },
                    cfg.max_prompt_blocks,
                    cfg.replay_timeout.max(std::time::Duration::from_secs(5)),
                ))
            }),
        })
    }

    /// Whether any source is configured or may be discovered.
    pub fn enabled(&self) -> bool {
        self.cfg.discover || !self.cfg.sources.is_empty()
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        let any = self.sources.load().values().any(|v| !v.is_empty());
        match (any, self.tokenizer.is_some()) {
            (true, true) => Mode::Precise,
            (true, false) => Mode::EventsOnly,
            (false, _) => Mode::Approximate,
        }
    }

    /// Whether requests can be keyed (a tokenizer is loaded).
    pub fn can_key(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// The blocks of a request body (`None`: no tokenizer, no source, or the body does
    /// not tokenize: the approximate index serves it).
    pub fn prompt_keys(
        &self,
        body: &[u8],
        kind: PromptKind,
        lora: Option<&str>,
    ) -> Option<PromptKeys> {
        let t = self.tokenizer.as_ref()?;
        if self.sources.load().is_empty() {
            return None;
        }
        match t.prompt_tokens(body, kind) {
            Ok(tokens) => Some(PromptKeys {
                keys: self
                    .keys
                    .keys(BlockKeys::root(lora), &tokens, self.cfg.max_prompt_blocks),
                tokens: tokens.len(),
                learned: false,
            }),
            Err(e) => {
                self.tokenize_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!("prompt not tokenized: {e}");
                None
            }
        }
    }

    /// Without a tokenizer, the blocks of an earlier prompt of the workflow `key`,
    /// learned from a backend's `/tokenize` answer (`None` when none is, or no source
    /// publishes events).
    pub fn learned(&self, key: u64) -> Option<PromptKeys> {
        let l = self.learner.as_ref()?;
        if self.sources.load().values().all(Vec::is_empty) {
            return None;
        }
        l.get(key)
    }

    /// Without a tokenizer: learns, off the request path, the blocks of the request
    /// `body` that `base_url` has just answered, for the workflow `key`.
    pub fn learn(&self, key: u64, base_url: String, body: bytes::Bytes, kind: PromptKind) {
        if let Some(l) = &self.learner
            && !self.sources.load().values().all(Vec::is_empty)
        {
            l.learn(key, base_url, body, kind);
        }
    }

    /// The workflow `key` ended: its learned prompt is forgotten first.
    pub fn end_learned(&self, key: u64) {
        if let Some(l) = &self.learner {
            l.end(key);
        }
    }

    /// Whether every source of `backend` is fresh (and it has one).
    pub fn fresh(&self, backend: BackendId) -> bool {
        self.sources
            .load()
            .get(&backend)
            .is_some_and(|v| !v.is_empty() && v.iter().all(|s| s.fresh()))
    }

    /// Tokens of the prompt each backend holds by its events, weighted by medium
    /// (`None` for a backend without fresh events).
    pub fn held_tokens(&self, keys: &[u64], backends: &[BackendId]) -> Vec<Option<f64>> {
        let fresh: Vec<bool> = backends.iter().map(|&b| self.fresh(b)).collect();
        if !fresh.iter().any(|&f| f) {
            return vec![None; backends.len()];
        }
        let held = self.index.matched(keys, backends);
        held.iter()
            .zip(fresh)
            .map(|(h, f)| f.then(|| self.tokens_of(*h)))
            .collect()
    }

    fn tokens_of(&self, h: Held) -> f64 {
        let bs = self.cfg.block_size as f64;
        // CPU-offloaded and stored blocks come back at a cost: the configured discount
        // (the lower of the two when the tiers are mixed).
        let other = self.cfg.cpu_discount.min(self.cfg.storage_discount);
        (h.gpu as f64 + (h.any - h.gpu) as f64 * other) * bs
    }

    /// A request was routed to `backend`: its sources should report events soon.
    pub fn expect_events(&self, backend: BackendId) {
        if let Some(v) = self.sources.load().get(&backend) {
            for s in v {
                s.expect_events();
            }
        }
    }

    /// Drops every subscription socket and reconnects after `pause` (admin: what a
    /// network blip does; missed batches come from the replay). Returns how many.
    pub fn resubscribe(&self, pause: std::time::Duration) -> usize {
        let states = self.states();
        for s in &states {
            s.resubscribe(pause);
        }
        states.len()
    }

    /// Every source's state (admin).
    pub fn states(&self) -> Vec<Arc<SourceState>> {
        let mut v: Vec<_> = self.sources.load().values().flatten().cloned().collect();
        v.sort_by_key(|s| (s.spec.backend, s.spec.dp_rank));
        v
    }

    /// Freshness of a backend's events (admin; `None`: no source).
    pub fn backend_freshness(&self, backend: BackendId) -> Option<Freshness> {
        let m = self.sources.load();
        let v = m.get(&backend)?;
        v.iter()
            .map(|s| s.freshness())
            .find(|f| *f != Freshness::Fresh)
            .or(v.first().map(|_| Freshness::Fresh))
    }

    fn publish(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut m: HashMap<BackendId, Vec<Arc<SourceState>>> = HashMap::new();
        for r in running.values() {
            m.entry(r.state.spec.backend)
                .or_default()
                .push(r.state.clone());
        }
        self.sources.store(Arc::new(m));
    }

    fn start(&self, spec: SourceSpec, backend: Arc<Backend>) {
        let key = (spec.backend, spec.dp_rank);
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if running.get(&key).is_some_and(|r| r.state.spec == spec) {
            return;
        }
        if let Some(old) = running.remove(&key) {
            let _ = old.stop.send(true);
        }
        tracing::info!(backend = %backend.name, rank = spec.dp_rank, endpoint = %spec.endpoint, "subscribing to KV events");
        let state = Arc::new(SourceState::new(spec, self.epoch, self.cfg.stale_after));
        let (tx, rx) = watch::channel(false);
        tokio::spawn(subscriber::run(
            self.index.clone(),
            state.clone(),
            backend,
            SubscriberConfig {
                block_size: self.cfg.block_size,
                max_blocks: self.cfg.max_blocks,
                replay_timeout: self.cfg.replay_timeout,
            },
            rx,
        ));
        running.insert(key, Running { state, stop: tx });
    }

    fn stop_missing(&self, live: &[Arc<Backend>]) -> bool {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone: Vec<_> = running
            .keys()
            .filter(|(b, _)| !live.iter().any(|x| x.id == *b))
            .copied()
            .collect();
        for k in &gone {
            if let Some(r) = running.remove(k) {
                let _ = r.stop.send(true);
            }
        }
        !gone.is_empty()
    }

    /// Runs discovery and the subscribers until `stop` fires.
    pub async fn run(
        self: Arc<Self>,
        controller: Arc<Controller>,
        mut stop: watch::Receiver<bool>,
    ) {
        let client = health::probe_client();
        let mut announced = None;
        loop {
            let backends = controller.backends();
            let mut changed = self.stop_missing(&backends);
            for s in &self.cfg.sources {
                let Some(b) = backends.iter().find(|b| {
                    b.name == s.backend
                        || b.url.to_string().trim_end_matches('/')
                            == s.backend.trim_end_matches('/')
                }) else {
                    continue;
                };
                self.start(
                    SourceSpec {
                        backend: b.id,
                        dp_rank: s.dp_rank,
                        endpoint: s.endpoint.clone(),
                        replay: s.replay.clone(),
                        topic: s.topic.clone(),
                    },
                    b.clone(),
                );
                changed = true;
            }
            if self.cfg.discover {
                for b in backends.iter() {
                    let configured = self.cfg.sources.iter().any(|s| s.backend == b.name);
                    let running = self.sources.load().contains_key(&b.id);
                    if configured || (running && !self.fresh_needed(b.id)) {
                        continue;
                    }
                    for spec in discover(&client, b).await {
                        self.start(spec, b.clone());
                        changed = true;
                    }
                }
            }
            if changed {
                self.publish();
            }
            let mode = self.mode();
            if announced != Some(mode) {
                announced = Some(mode);
                tracing::info!(
                    mode = mode.as_str(),
                    sources = self.states().len(),
                    tokenizer = self.tokenizer.is_some(),
                    "KV-aware routing mode"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.discover_interval) => {}
                _ = stop.changed() => break,
            }
        }
        let running: Vec<_> = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .collect();
        for (_, r) in running {
            let _ = r.stop.send(true);
        }
    }

    /// A discovered source that stays disconnected is asked for again (the backend may
    /// have been restarted with other ports).
    fn fresh_needed(&self, b: BackendId) -> bool {
        self.sources.load().get(&b).is_some_and(|v| {
            v.iter()
                .any(|s| s.last_event_age_ms().is_none() && !s.fresh())
        })
    }
}

/// `GET /kv_event_sources`: `{rank: {endpoint, replay_endpoint, topic, ...}}`, with a
/// wildcard host (`tcp://*:5557`) replaced by the backend's.
async fn discover(client: &health::ProbeClient, b: &Backend) -> Vec<SourceSpec> {
    let Some((200, body)) = health::get(
        client,
        b,
        "/kv_event_sources",
        std::time::Duration::from_secs(2),
    )
    .await
    else {
        return Vec::new();
    };
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(&body)
    else {
        return Vec::new();
    };
    let host = b.url.host().unwrap_or("127.0.0.1").to_string();
    let fix = |ep: &str| -> String {
        for wild in ["tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"] {
            if let Some(port) = ep.strip_prefix(wild) {
                return format!("tcp://{host}:{port}");
            }
        }
        ep.to_string()
    };
    let mut out = Vec::new();
    for (rank, v) in m {
        if v.get("enable_kv_cache_events").and_then(|x| x.as_bool()) == Some(false) {
            continue;
        }
        if v.get("publisher")
            .and_then(|x| x.as_str())
            .is_some_and(|p| p != "zmq")
        {
            continue;
        }
        let Some(ep) = v.get("endpoint").and_then(|x| x.as_str()) else {
            continue;
        };
        out.push(SourceSpec {
            backend: b.id,
            dp_rank: rank.parse().unwrap_or(0),
            endpoint: fix(ep),
            replay: v
                .get("replay_endpoint")
                .and_then(|x| x.as_str())
                .filter(|s| !s.is_empty())
                .map(fix),
            topic: v
                .get("topic")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string(),
        });
    }
    out
}
