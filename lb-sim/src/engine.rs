//! The simulated vLLM v1 engine: scheduler, KV block accounting and a virtual clock.
//!
//! The scheduler follows vLLM v1's `Scheduler.schedule()`:
//! - One token budget per step (`max_num_batched_tokens`). Running requests are served first,
//!   in order: a decode takes 1 token, an unfinished prefill takes a chunk (chunked prefill).
//! - When a running request cannot get blocks, the last running request is preempted (FIFO
//!   policy, recompute): its blocks are freed, its computed tokens reset to 0 and it goes to the
//!   front of the waiting queue. A request that preempts itself waits.
//! - If nothing was preempted, waiting requests are admitted in FIFO order while
//!   `running < max_num_seqs` and budget remains; each admission looks up the longest cached
//!   prefix (at most `num_tokens - 1` tokens, in full blocks) and takes references on it.
//! - At the end of a step, requests whose tokens are all computed sample one token; newly full
//!   blocks (prompt or generated) are hashed and cached.
//!
//! - A P/D decode leg ([`crate::pd`]) arrives with `remote_tokens` of prompt KV already
//!   transferred from a prefill instance. As vLLM's scheduler does with a connector's external
//!   tokens, admission counts them as computed (capped at `num_tokens - 1`: the last prompt token
//!   is recomputed to sample the first output token): their blocks are allocated, hashed and
//!   cached (so the prefix cache and KV events include them) but they take no token budget and
//!   cost no prefill time. A preempted request loses the transferred KV and recomputes it all.
//!
//! Step duration is `LatencyModel::step_seconds(uncached prefill tokens, decode sequences)`,
//! multiplied by the slow-down fault factor. Time is virtual: [`Clock`] maps virtual seconds to
//! wall time through `time_scale`. While busy, steps run back to back in virtual time even if
//! the process lags (steps already due are computed without sleeping); an idle engine restarts
//! at the current virtual time, and a step never starts before the arrival of a request it admits.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::task::AtomicWaker;
use rustc_hash::FxHashMap;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::EngineConfig;
use crate::metrics::{EngineMetrics, Gauges};
use crate::prefix_cache::{BlockHash, BlockId, BlockPool, KvEvent, hash_block};
use crate::tokenizer::Tokenizer;

/// Why a request was refused by the engine.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Prompt plus output exceed `max_model_len`.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested {requested} tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the messages or completion."
    )]
    TooLong {
        /// The limit.
        max_model_len: usize,
        /// prompt + output.
        requested: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Output tokens.
        output: usize,
    },
    /// The request could never fit in the KV pool.
    #[error(
        "request needs {needed} KV blocks but the pool has only {available}; it can never be scheduled"
    )]
    TooLarge {
        /// Blocks needed.
        needed: usize,
        /// Pool size.
        available: usize,
    },
    /// The prompt is empty.
    #[error("The prompt cannot be empty")]
    EmptyPrompt,
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Natural end (no `max_tokens` given).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Aborted (client went away or instance died).
    Abort,
}

impl FinishReason {
    /// OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// Timings of a finished request, in virtual seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    /// Arrival to first token.
    pub ttft: f64,
    /// Arrival to last token.
    pub e2e: f64,
    /// Arrival to first scheduling.
    pub queue: f64,
    /// Mean gap between tokens after the first.
    pub mean_itl: f64,
}

/// Progress of a request as the API layer sees it.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Tokens generated so far.
    pub generated: usize,
    /// Prompt tokens served from cache (set at first scheduling).
    pub cached_tokens: usize,
    /// Set once finished.
    pub finished: Option<(FinishReason, Timings)>,
    /// Times this request was preempted.
    pub preemptions: u32,
}

/// State shared between the engine and the HTTP handler of one request.
///
/// Counters are atomics (the engine updates them every token without a lock); only the final
/// outcome sits behind a mutex. `generated` is stored before `finished` is set, so a snapshot
/// that sees `finished` also sees the final count.
#[derive(Debug, Default)]
pub struct RequestShared {
    generated: AtomicUsize,
    cached_tokens: AtomicUsize,
    preemptions: AtomicU32,
    finished: Mutex<Option<(FinishReason, Timings)>>,
    /// Woken when progress changes.
    pub waker: AtomicWaker,
}

impl RequestShared {
    /// A consistent copy of the progress.
    pub fn snapshot(&self) -> Progress {
        let finished = *self.finished.lock().unwrap_or_else(|e| e.into_inner());
        Progress {
            generated: self.generated.load(Ordering::Acquire),
            cached_tokens: self.cached_tokens.load(Ordering::Relaxed),
            finished,
            preemptions: self.preemptions.load(Ordering::Relaxed),
        }
    }

    /// Whether the request has finished (or was aborted).
    pub fn is_finished(&self) -> bool {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn set_finished(&self, v: (FinishReason, Timings)) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }
}

/// What the API layer submits.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Whether reaching `max_tokens` reports `length` (true) or `stop` (false).
    pub explicit_max_tokens: bool,
    /// Seed of the generated text.
    pub seed: u64,
    /// Wake the HTTP side every this many tokens (plus the first and the last); streams use the
    /// stream interval, non-streaming requests `usize::MAX` (woken only when done).
    pub wake_every: usize,
    /// Leading prompt tokens whose KV was transferred from a prefill instance (a P/D decode
    /// leg, see [`crate::pd`]): allocated and cached at admission, never charged as prefill.
    /// 0 for ordinary requests.
    pub remote_tokens: usize,
    /// Virtual seconds the request already waited before reaching the engine (the KV transfer of
    /// a decode leg); its arrival is back-dated by this much, so TTFT and queue time include it.
    pub waited_v: f64,
}

#[derive(Debug)]
struct Seq {
    /// Prompt tokens; generated ids are derived from `(seed, index)` when needed.
    prompt: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    explicit_max: bool,
    seed: u64,
    wake_every: usize,
    /// Transferred prompt tokens still held (see [`RequestSpec::remote_tokens`]); 0 after a
    /// preemption.
    remote_tokens: usize,
    generated: usize,
    num_computed: usize,
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
    num_cached_blocks: usize,
    in_prefill: bool,
    first_scheduled: bool,
    arrival_v: f64,
    first_sched_v: f64,
    first_token_v: f64,
    last_token_v: f64,
    shared: Arc<RequestShared>,
}

impl Seq {
    /// Prompt plus generated tokens.
    fn num_tokens(&self) -> usize {
        self.prompt_len + self.generated
    }

    /// Writes the ids of tokens `range` into `out`.
    fn fill_tokens(&self, tok: &Tokenizer, range: Range<usize>, out: &mut Vec<u32>) {
        out.clear();
        let p = self.prompt_len;
        if range.start < p {
            out.extend_from_slice(&self.prompt[range.start..range.end.min(p)]);
        }
        for i in range.start.max(p)..range.end {
            out.push(tok.output_token(self.seed, i - p).0);
        }
    }

    /// Extends the chained block hashes to cover the first `upto` tokens (full blocks only).
    fn extend_hashes(&mut self, tok: &Tokenizer, upto: usize, bs: usize, scratch: &mut Vec<u32>) {
        while self.hashes.len() < upto / bs {
            let i = self.hashes.len();
            self.fill_tokens(tok, i * bs..(i + 1) * bs, scratch);
            let parent = i.checked_sub(1).map(|j| self.hashes[j]);
            self.hashes.push(hash_block(parent, scratch));
        }
    }
}

/// A planned step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Virtual start.
    pub start_v: f64,
    /// Virtual end.
    pub end_v: f64,
    /// `(seq id, tokens computed this step)`.
    pub scheduled: Vec<(u64, usize)>,
    /// Uncached prefill tokens in the step.
    pub prefill_tokens: usize,
    /// Decode sequences in the step.
    pub decode_seqs: usize,
}

/// The engine state (synchronous; driven by [`run_engine`]).
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    tokenizer: Tokenizer,
    pool: BlockPool,
    seqs: FxHashMap<u64, Seq>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    next_id: u64,
    clock_v: f64,
    busy: bool,
    slow_factor: f64,
    metrics: EngineMetrics,
    kv_events: Vec<(f64, Vec<KvEvent>)>,
    events_enabled: bool,
    scratch: Vec<u32>,
    lag: f64,
    max_lag: f64,
}

impl Engine {
    /// A fresh engine.
    pub fn new(cfg: EngineConfig, events_enabled: bool) -> Self {
        let pool = BlockPool::new(cfg.num_gpu_blocks, cfg.block_size, events_enabled);
        Self {
            tokenizer: Tokenizer::for_config(&cfg),
            cfg,
            pool,
            seqs: FxHashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            clock_v: 0.0,
            busy: false,
            slow_factor: 1.0,
            metrics: EngineMetrics::default(),
            kv_events: Vec::new(),
            events_enabled,
            scratch: Vec::new(),
            lag: 0.0,
            max_lag: 0.0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Sets the slow-down factor (fault `slow`).
    pub fn set_slow_factor(&mut self, k: f64) {
        self.slow_factor = if k.is_finite() && k > 0.0 { k } else { 1.0 };
    }

    /// Current gauges.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.pool.usage(),
            clock_lag: self.lag,
        }
    }

    /// Counters and histograms.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// The block pool (read-only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Takes KV event batches produced so far.
    pub fn take_kv_events(&mut self) -> Vec<(f64, Vec<KvEvent>)> {
        std::mem::take(&mut self.kv_events)
    }

    /// Validates and enqueues a request arriving at virtual time `now_v`.
    pub fn submit(
        &mut self,
        spec: RequestSpec,
        now_v: f64,
    ) -> Result<(u64, Arc<RequestShared>), SubmitError> {
        let prompt = spec.prompt.len();
        if prompt == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        let total = prompt + spec.max_tokens;
        if total > self.cfg.max_model_len {
            return Err(SubmitError::TooLong {
                max_model_len: self.cfg.max_model_len,
                requested: total,
                prompt,
                output: spec.max_tokens,
            });
        }
        let needed = total.div_ceil(self.cfg.block_size);
        if needed > self.pool.num_blocks() {
            return Err(SubmitError::TooLarge {
                needed,
                available: self.pool.num_blocks(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let shared = Arc::new(RequestShared::default());
        self.seqs.insert(
            id,
            Seq {
                prompt: spec.prompt,
                prompt_len: prompt,
                max_tokens: spec.max_tokens.max(1),
                explicit_max: spec.explicit_max_tokens,
                seed: spec.seed,
                wake_every: spec.wake_every.max(1),
                remote_tokens: spec.remote_tokens.min(prompt),
                generated: 0,
                num_computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                num_cached_blocks: 0,
                in_prefill: true,
                first_scheduled: false,
                arrival_v: if spec.waited_v.is_finite() && spec.waited_v > 0.0 {
                    (now_v - spec.waited_v).max(0.0)
                } else {
                    now_v
                },
                first_sched_v: 0.0,
                first_token_v: 0.0,
                last_token_v: 0.0,
                shared: shared.clone(),
            },
        );
        self.waiting.push_back(id);
        Ok((id, shared))
    }

    /// Aborts a request (client gone). Returns whether it was still live.
    pub fn abort(&mut self, id: u64) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        if let Some(pos) = self.waiting.iter().position(|&x| x == id) {
            self.waiting.remove(pos);
        }
        if let Some(pos) = self.running.iter().position(|&x| x == id) {
            self.running.remove(pos);
        }
        self.pool.free(&seq.blocks);
        self.metrics.success_abort += 1;
        self.flush_pool_events(self.clock_v);
        true
    }

    /// Aborts everything (instance death); wakes every waiter with `abort`.
    pub fn abort_all(&mut self) -> Vec<Arc<RequestShared>> {
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(seq) = self.seqs.get(&id) {
                let sh = seq.shared.clone();
                self.abort(id);
                sh.set_finished((
                    FinishReason::Abort,
                    Timings {
                        ttft: 0.0,
                        e2e: 0.0,
                        queue: 0.0,
                        mean_itl: 0.0,
                    },
                ));
                out.push(sh);
            }
        }
        out
    }

    /// Whether there is nothing to do.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    fn flush_pool_events(&mut self, ts: f64) {
        if self.events_enabled {
            let ev = self.pool.take_events();
            if !ev.is_empty() {
                self.kv_events.push((ts, ev));
            }
        }
    }

    /// Plans the next step, starting no earlier than `now_v` if the engine was idle.
    pub fn schedule(&mut self, now_v: f64) -> Option<Step> {
        if self.is_idle() {
            self.busy = false;
            return None;
        }
        let mut start_v = if self.busy {
            self.clock_v
        } else {
            self.clock_v.max(now_v)
        };
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled = Vec::new();
        let mut prefill_tokens = 0usize;
        let mut decode_seqs = 0usize;
        let mut preempted = false;

        // 1. Running requests.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let n = (seq.num_tokens() - seq.num_computed).min(budget);
            let need = (seq.num_computed + n)
                .div_ceil(bs)
                .saturating_sub(seq.blocks.len());
            let mut can = true;
            let mut new_blocks = Vec::new();
            while !self.pool.allocate(need, &mut new_blocks) {
                // Preempt the lowest-priority (last) running request.
                let Some(victim) = self.running.pop() else {
                    can = false;
                    break;
                };
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    can = false;
                    break;
                }
            }
            if !can {
                break;
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                break;
            };
            seq.blocks.extend_from_slice(&new_blocks);
            if seq.in_prefill {
                prefill_tokens += n;
            } else {
                decode_seqs += 1;
            }
            budget -= n;
            scheduled.push((id, n));
            i += 1;
        }

        // 2. Waiting requests (not in a step that preempted).
        let tok = self.tokenizer.clone();
        let mut scratch = std::mem::take(&mut self.scratch);
        if !preempted {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let Some(seq) = self.seqs.get_mut(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                let num_tokens = seq.num_tokens();
                seq.extend_hashes(&tok, num_tokens, bs, &mut scratch);
                let hit_blocks = if self.cfg.enable_prefix_caching {
                    let max_hit = (num_tokens - 1) / bs;
                    self.pool.longest_cached_prefix(&seq.hashes[..max_hit])
                } else {
                    0
                };
                let hit_tokens = hit_blocks * bs;
                // Transferred KV (P/D decode leg) counts as computed, like cached blocks; the
                // last token is always recomputed.
                let computed = hit_tokens.max(seq.remote_tokens.min(num_tokens - 1));
                let n = (num_tokens - computed).min(budget);
                let need_new = (computed + n).div_ceil(bs) - hit_blocks;
                // Cached blocks that are free now leave the free queue when touched.
                let touched_free = seq.hashes[..hit_blocks]
                    .iter()
                    .filter(|h| self.pool.ref_count_of(**h) == Some(0))
                    .count();
                if need_new + touched_free > self.pool.num_free() {
                    break;
                }
                let mut blocks = Vec::with_capacity(need_new + hit_blocks);
                self.pool.touch(&seq.hashes[..hit_blocks], &mut blocks);
                if !self.pool.allocate(need_new, &mut blocks) {
                    self.pool.free(&blocks);
                    break;
                }
                self.waiting.pop_front();
                seq.blocks = blocks;
                seq.num_computed = computed;
                seq.num_cached_blocks = hit_blocks;
                seq.in_prefill = true;
                if !seq.first_scheduled {
                    seq.first_scheduled = true;
                    start_v = start_v.max(seq.arrival_v);
                    seq.first_sched_v = start_v;
                    // As vLLM's `num_cached_tokens`: local hits plus externally loaded tokens.
                    seq.shared.cached_tokens.store(computed, Ordering::Relaxed);
                    self.metrics.prefix_cache_queries += num_tokens as u64;
                    self.metrics.prefix_cache_hits += hit_tokens as u64;
                    self.metrics.prompt_tokens_cached += hit_tokens as u64;
                }
                self.running.push(id);
                prefill_tokens += n;
                budget -= n;
                scheduled.push((id, n));
            }
        }

        self.scratch = scratch;
        self.flush_pool_events(start_v);
        if scheduled.is_empty() {
            // Nothing fits (cannot happen with admission checks); stay idle until new work.
            self.busy = false;
            return None;
        }
        let dur = self.cfg.latency.step_seconds(prefill_tokens, decode_seqs) * self.slow_factor;
        self.busy = true;
        self.clock_v = start_v + dur;
        self.metrics.steps += 1;
        Some(Step {
            start_v,
            end_v: start_v + dur,
            scheduled,
            prefill_tokens,
            decode_seqs,
        })
    }

    fn preempt(&mut self, id: u64) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        self.pool.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.num_cached_blocks = 0;
        // The transferred KV was in the freed blocks: recompute it (bar prefix-cache hits).
        seq.remote_tokens = 0;
        seq.in_prefill = true;
        seq.shared.preemptions.fetch_add(1, Ordering::Relaxed);
        self.metrics.num_preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Applies a finished step: computes tokens, samples, finishes requests.
    ///
    /// Wakes the requests whose progress changed and returns how many there were.
    pub fn complete(&mut self, step: &Step) -> usize {
        let bs = self.cfg.block_size;
        let end = step.end_v;
        let mut woken = 0usize;
        let mut finished_ids = Vec::new();
        let tok = self.tokenizer.clone();
        let mut scratch = std::mem::take(&mut self.scratch);
        for &(id, n) in &step.scheduled {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if seq.blocks.is_empty() {
                // Preempted after being planned (cannot happen: planning is atomic).
                continue;
            }
            seq.num_computed += n;
            if self.cfg.enable_prefix_caching {
                let full = seq.num_computed / bs;
                if full > seq.num_cached_blocks {
                    seq.extend_hashes(&tok, full * bs, bs, &mut scratch);
                    if self.events_enabled {
                        seq.fill_tokens(&tok, seq.num_cached_blocks * bs..full * bs, &mut scratch);
                    } else {
                        scratch.clear();
                    }
                    self.pool.cache_full_blocks(
                        &seq.blocks,
                        &seq.hashes,
                        &scratch,
                        seq.num_cached_blocks,
                        full,
                    );
                    seq.num_cached_blocks = full;
                }
            }
            if seq.num_computed < seq.num_tokens() {
                continue; // partial prefill chunk
            }
            // Sample one token (its id is derived from (seed, index) when needed).
            seq.generated += 1;
            self.metrics.generation_tokens += 1;
            if seq.in_prefill {
                seq.in_prefill = false;
                if seq.generated == 1 {
                    seq.first_token_v = end;
                    self.metrics.ttft.observe(end - seq.arrival_v);
                    self.metrics.prompt_tokens += seq.prompt_len as u64;
                    self.metrics
                        .queue
                        .observe(seq.first_sched_v - seq.arrival_v);
                } else {
                    self.metrics.itl.observe(end - seq.last_token_v);
                }
            } else {
                self.metrics.itl.observe(end - seq.last_token_v);
            }
            seq.last_token_v = end;
            let done = seq.generated >= seq.max_tokens;
            {
                seq.shared.generated.store(seq.generated, Ordering::Release);
                if done {
                    let reason = if seq.explicit_max {
                        FinishReason::Length
                    } else {
                        FinishReason::Stop
                    };
                    let e2e = end - seq.arrival_v;
                    let mean_itl = if seq.generated > 1 {
                        (end - seq.first_token_v) / (seq.generated - 1) as f64
                    } else {
                        0.0
                    };
                    seq.shared.set_finished((
                        reason,
                        Timings {
                            ttft: seq.first_token_v - seq.arrival_v,
                            e2e,
                            queue: seq.first_sched_v - seq.arrival_v,
                            mean_itl,
                        },
                    ));
                    self.metrics.e2e.observe(e2e);
                    match reason {
                        FinishReason::Length => self.metrics.success_length += 1,
                        _ => self.metrics.success_stop += 1,
                    }
                }
            }
            if done || seq.generated == 1 || seq.generated.is_multiple_of(seq.wake_every) {
                seq.shared.waker.wake();
                woken += 1;
            }
            if done {
                finished_ids.push(id);
            }
        }
        for id in &finished_ids {
            if let Some(seq) = self.seqs.remove(id) {
                self.pool.free(&seq.blocks);
            }
        }
        if !finished_ids.is_empty() {
            self.running.retain(|id| self.seqs.contains_key(id));
        }
        self.scratch = scratch;
        self.flush_pool_events(end);
        woken
    }

    /// Drops the cached hashes of free blocks (vLLM `/reset_prefix_cache`).
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_prefix_cache();
        self.flush_pool_events(self.clock_v);
    }

    /// Records how late (wall seconds) the last step was applied after its virtual end.
    pub fn record_lag(&mut self, wall_secs: f64) {
        self.lag = wall_secs;
        if wall_secs > self.max_lag {
            self.max_lag = wall_secs;
        }
    }

    /// `(last, max)` lateness of step application in wall seconds: how far the simulator
    /// itself fell behind its schedule (a saturated simulator shows up here).
    pub fn lag(&self) -> (f64, f64) {
        (self.lag, self.max_lag)
    }

    /// Virtual time at the end of the last planned step.
    pub fn clock_v(&self) -> f64 {
        self.clock_v
    }
}

/// Maps virtual time to wall time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    scale: f64,
}

impl Clock {
    /// A clock starting now.
    pub fn new(scale: f64) -> Self {
        Self {
            origin: Instant::now(),
            scale,
        }
    }

    /// Virtual seconds since the origin.
    pub fn now_v(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.scale
    }

    /// Wall instant of virtual time `v`.
    pub fn instant_of(&self, v: f64) -> Instant {
        self.origin + std::time::Duration::from_secs_f64((v / self.scale).max(0.0))
    }

    /// The time scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

/// An engine shared between its driver task and the HTTP handlers.
#[derive(Debug)]
pub struct EngineHandle {
    engine: Mutex<Engine>,
    notify: Notify,
    /// The virtual clock.
    pub clock: Clock,
    kv_notify: Notify,
}

impl EngineHandle {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Arc<Self> {
        let clock = Clock::new(engine.cfg.time_scale);
        Arc::new(Self {
            engine: Mutex::new(engine),
            notify: Notify::new(),
            clock,
            kv_notify: Notify::new(),
        })
    }

    /// Locks the engine (poison-tolerant).
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits a request and wakes the driver.
    pub fn submit(&self, spec: RequestSpec) -> Result<(u64, Arc<RequestShared>), SubmitError> {
        let now = self.clock.now_v();
        let r = self.lock().submit(spec, now);
        if r.is_ok() {
            self.notify.notify_one();
        }
        r
    }

    /// Aborts a request.
    pub fn abort(&self, id: u64) {
        let had = self.lock().abort(id);
        if had {
            self.kv_notify.notify_one();
        }
    }

    /// Waits until KV events may be pending.
    pub async fn kv_events_ready(&self) {
        self.kv_notify.notified().await;
    }
}

/// Drives an engine forever: plan a step, sleep until its virtual end, apply it, wake clients.
pub async fn run_engine(h: Arc<EngineHandle>) {
    let mut no_sleep_streak = 0u32;
    loop {
        let step = h.lock().schedule(h.clock.now_v());
        let Some(step) = step else {
            h.kv_notify.notify_one();
            h.notify.notified().await;
            continue;
        };
        let deadline = h.clock.instant_of(step.end_v);
        if deadline > Instant::now() {
            no_sleep_streak = 0;
            tokio::time::sleep_until(deadline).await;
        } else {
            // Behind wall time: compute due steps back to back, yielding now and then.
            no_sleep_streak += 1;
            if no_sleep_streak.is_multiple_of(32) {
                tokio::task::yield_now().await;
            }
        }
        let late = Instant::now()
            .saturating_duration_since(deadline)
            .as_secs_f64();
        let mut e = h.lock();
        e.complete(&step);
        e.record_lag(late);
        drop(e);
        h.kv_notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    fn cfg() -> EngineConfig {
        EngineConfig {
            num_gpu_blocks: 1000,
            ..EngineConfig::default()
        }
    }

    fn spec(prompt: Vec<u32>, out: usize) -> RequestSpec {
        RequestSpec {
            prompt,
            max_tokens: out,
            explicit_max_tokens: true,
            seed: 7,
            wake_every: 1,
            remote_tokens: 0,
            waited_v: 0.0,
        }
    }

    /// Runs until idle; returns the steps.
    fn drain(e: &mut Engine) -> Vec<Step> {
        let mut steps = Vec::new();
        while let Some(s) = e.schedule(0.0) {
            e.complete(&s);
            steps.push(s);
            assert!(steps.len() < 100_000);
        }
        steps
    }

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed.wrapping_mul(7919) ^ i).collect()
    }

    #[test]
    fn ttft_follows_the_step_model() {
        let mut e = Engine::new(cfg(), false);
        let (_, sh) = e.submit(spec(prompt(1, 1000), 10), 0.0).expect("submit");
        drain(&mut e);
        let p = sh.snapshot();
        let (reason, t) = p.finished.expect("finished");
        assert_eq!(reason, FinishReason::Length);
        let l = Preset::H100Llama8b.latency();
        assert!((t.ttft - l.step_seconds(1000, 0)).abs() < 1e-9);
        assert!((t.mean_itl - l.step_seconds(0, 1)).abs() < 1e-9);
        assert_eq!(p.generated, 10);
    }

    #[test]
    fn prefix_hit_shortens_prefill() {
        let mut e = Engine::new(cfg(), false);
        let a = prompt(1, 1000);
        let (_, sh1) = e.submit(spec(a.clone(), 2), 0.0).expect("submit");
        drain(&mut e);
        let mut b = a[..900].to_vec();
        b.extend(prompt(2, 100));
        let now = e.clock_v();
        let (_, sh2) = e.submit(spec(b, 2), now).expect("submit");
        drain(&mut e);
        assert_eq!(sh1.snapshot().cached_tokens, 0);
        assert_eq!(sh2.snapshot().cached_tokens, 900 / 16 * 16);
        let t1 = sh1.snapshot().finished.expect("f").1.ttft;
        let t2 = sh2.snapshot().finished.expect("f").1.ttft;
        let l = Preset::H100Llama8b.latency();
        assert!((t2 - l.step_seconds(1000 - 896, 0)).abs() < 1e-9, "{t2}");
        assert!(t1 > t2);
        assert_eq!(e.metrics().prefix_cache_hits, 896);
        assert_eq!(e.metrics().prefix_cache_queries, 2000);
    }

    #[test]
    fn full_hit_recomputes_last_token() {
        let mut e = Engine::new(cfg(), false);
        let a = prompt(1, 64);
        e.submit(spec(a.clone(), 1), 0.0).expect("submit");
        drain(&mut e);
        let (_, sh) = e.submit(spec(a, 1), 0.0).expect("submit");
        drain(&mut e);
        // 64 tokens = 4 full blocks, but at most 63 tokens can hit: 3 blocks.
        assert_eq!(sh.snapshot().cached_tokens, 48);
    }

    #[test]
    fn chunked_prefill_respects_budget() {
        let mut e = Engine::new(
            EngineConfig {
                max_num_batched_tokens: 512,
                ..cfg()
            },
            false,
        );
        e.submit(spec(prompt(1, 1200), 1), 0.0).expect("submit");
        let steps = drain(&mut e);
        let chunks: Vec<usize> = steps.iter().map(|s| s.prefill_tokens).collect();
        assert_eq!(chunks, vec![512, 512, 176]);
    }

    #[test]
    fn itl_grows_with_batch() {
        let mut e = Engine::new(cfg(), false);
        let mut handles = Vec::new();
        for i in 0..32 {
            handles.push(e.submit(spec(prompt(i, 100), 50), 0.0).expect("s").1);
        }
        drain(&mut e);
        let big = handles[0].snapshot().finished.expect("f").1.mean_itl;
        let mut e = Engine::new(cfg(), false);
        let (_, one) = e.submit(spec(prompt(1, 100), 50), 0.0).expect("s");
        drain(&mut e);
        let small = one.snapshot().finished.expect("f").1.mean_itl;
        assert!(big > small, "{big} vs {small}");
        let l = Preset::H100Llama8b.latency();
        assert!((small - l.step_seconds(0, 1)).abs() < 1e-9);
    }

    #[test]
    fn max_num_seqs_limits_running() {
        let mut e = Engine::new(
            EngineConfig {
                max_num_seqs: 4,
                ..cfg()
            },
            false,
        );
        for i in 0..10 {
            e.submit(spec(prompt(i, 20), 5), 0.0).expect("s");
        }
        let s = e.schedule(0.0).expect("step");
        assert_eq!(s.scheduled.len(), 4);
        assert_eq!(e.gauges().waiting, 6);
        e.complete(&s);
        drain(&mut e);
        assert_eq!(e.metrics().success_length, 10);
    }

    #[test]
    fn preemption_when_pool_runs_out() {
        // 12 blocks of 16 tokens; 4 requests of 16 prompt + 40 output need 4 blocks each.
        let mut e = Engine::new(
            EngineConfig {
                num_gpu_blocks: 12,
                ..cfg()
            },
            false,
        );
        let mut hs = Vec::new();
        for i in 0..4 {
            hs.push(e.submit(spec(prompt(i, 16), 40), 0.0).expect("s").1);
        }
        drain(&mut e);
        assert!(e.metrics().num_preemptions > 0);
        for h in &hs {
            let p = h.snapshot();
            assert_eq!(p.generated, 40);
            assert!(p.finished.is_some());
        }
        assert!(hs.iter().any(|h| h.snapshot().preemptions > 0));
        assert_eq!(e.pool().num_free(), 12);
    }

    #[test]
    fn oversized_requests_are_refused() {
        let mut e = Engine::new(
            EngineConfig {
                num_gpu_blocks: 4,
                max_model_len: 1000,
                ..cfg()
            },
            false,
        );
        assert!(matches!(
            e.submit(spec(prompt(1, 100), 10), 0.0),
            Err(SubmitError::TooLarge { .. })
        ));
        assert!(matches!(
            e.submit(spec(prompt(1, 990), 20), 0.0),
            Err(SubmitError::TooLong { .. })
        ));
        assert!(matches!(
            e.submit(spec(vec![], 20), 0.0),
            Err(SubmitError::EmptyPrompt)
        ));
    }

    #[test]
    fn late_arrival_does_not_start_in_the_past() {
        let mut e = Engine::new(cfg(), false);
        e.submit(spec(prompt(1, 100), 100), 0.0).expect("s");
        let s = e.schedule(0.0).expect("step");
        e.complete(&s);
        // A request arriving at t=5 s while the engine is "busy" at ~20 ms.
        let (_, sh) = e.submit(spec(prompt(2, 100), 1), 5.0).expect("s");
        drain(&mut e);
        let t = sh.snapshot().finished.expect("f").1;
        assert!(t.ttft > 0.0 && t.ttft < 0.05, "{t:?}");
    }

    fn remote(prompt: Vec<u32>, out: usize, remote_tokens: usize) -> RequestSpec {
        RequestSpec {
            remote_tokens,
            ..spec(prompt, out)
        }
    }

    #[test]
    fn transferred_kv_costs_one_decode_step() {
        let l = Preset::H100Llama8b.latency();
        let a = prompt(1, 10_000);
        // Plain: two chunks of the 8,192-token budget.
        let mut e = Engine::new(cfg(), false);
        let (_, plain) = e.submit(spec(a.clone(), 2), 0.0).expect("submit");
        drain(&mut e);
        let plain = plain.snapshot().finished.expect("f").1.ttft;
        assert!((plain - l.step_seconds(8192, 0) - l.step_seconds(1808, 0)).abs() < 1e-9);
        // Decode leg with the whole prompt transferred: only the last token is recomputed, in
        // one step, whatever the token budget.
        let mut e = Engine::new(cfg(), false);
        let (_, h) = e.submit(remote(a.clone(), 2, 10_000), 0.0).expect("submit");
        let steps = drain(&mut e);
        assert_eq!(steps[0].prefill_tokens, 1);
        let p = h.snapshot();
        let t = p.finished.expect("f").1;
        assert!((t.ttft - l.step_seconds(1, 0)).abs() < 1e-9, "{t:?}");
        assert!(
            t.ttft < 1.01 * l.step_seconds(0, 1),
            "about one decode step"
        );
        assert!(t.ttft * 10.0 < plain);
        assert_eq!(p.cached_tokens, 9_999);
        assert_eq!(e.metrics().prefix_cache_hits, 0);
        // The transferred blocks were cached: a plain follow-up hits them.
        let now = e.clock_v();
        let (_, h2) = e.submit(spec(a, 1), now).expect("submit");
        drain(&mut e);
        assert_eq!(h2.snapshot().cached_tokens, 9_999 / 16 * 16);
    }

    #[test]
    fn partial_transfer_charges_the_rest_and_waiting_is_ttft() {
        let l = Preset::H100Llama8b.latency();
        let mut e = Engine::new(cfg(), false);
        let r = RequestSpec {
            waited_v: 0.25,
            ..remote(prompt(1, 1000), 2, 600)
        };
        let (_, h) = e.submit(r, 1.0).expect("submit");
        // The driver plans the first step at the submission time, not the back-dated arrival.
        let s = e.schedule(1.0).expect("step");
        assert_eq!(s.prefill_tokens, 400);
        e.complete(&s);
        drain(&mut e);
        let t = h.snapshot().finished.expect("f").1;
        assert!(
            (t.ttft - 0.25 - l.step_seconds(400, 0)).abs() < 1e-9,
            "{t:?}"
        );
        assert!((t.queue - 0.25).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn preemption_loses_transferred_kv() {
        let mut e = Engine::new(
            EngineConfig {
                enable_prefix_caching: false,
                ..cfg()
            },
            false,
        );
        let (id, _) = e.submit(remote(prompt(1, 1000), 5, 1000), 0.0).expect("s");
        let s = e.schedule(0.0).expect("step");
        assert_eq!(s.prefill_tokens, 1);
        e.complete(&s);
        e.running.retain(|&x| x != id);
        e.preempt(id);
        // Prompt + the generated token, all recomputed.
        let s = e.schedule(0.0).expect("step");
        assert_eq!(s.prefill_tokens, 1001);
    }

    /// The calibration table of `lb-sim/README.md`, computed by the engine itself.
    #[test]
    fn calibration_table() {
        fn run(cfg: &EngineConfig, reqs: Vec<(Vec<u32>, usize)>) -> Vec<Timings> {
            let mut e = Engine::new(cfg.clone(), false);
            let hs: Vec<_> = reqs
                .into_iter()
                .map(|(p, n)| e.submit(spec(p, n), 0.0).expect("submit").1)
                .collect();
            drain(&mut e);
            hs.iter()
                .map(|h| h.snapshot().finished.expect("done").1)
                .collect()
        }
        let ms = |x: f64| (x * 1e6).round() / 1e3;
        let d = cfg();
        let c = EngineConfig {
            latency: Preset::Conservative.latency(),
            ..cfg()
        };
        for (cfg, n, ttft, itl) in [
            (&d, 256, 10.169, 5.759),
            (&d, 1024, 23.417, 5.759),
            (&d, 4096, 76.409, 5.759),
            (&d, 10_000, 184.006, 5.759),
            (&c, 256, 94.0, 12.0),
            (&c, 1024, 286.0, 12.0),
        ] {
            let t = run(cfg, vec![(prompt(1, n), 2)])[0];
            assert_eq!((ms(t.ttft), ms(t.mean_itl)), (ttft, itl), "n={n}");
        }
        // 4,096-token prompt with 3,584 tokens cached.
        for (cfg, ttft) in [(&d, 14.585), (&c, 158.0)] {
            let mut e = Engine::new(cfg.clone(), false);
            let a = prompt(1, 3600);
            e.submit(spec(a.clone(), 1), 0.0).expect("a");
            drain(&mut e);
            let mut b = a[..3584].to_vec();
            b.extend(prompt(2, 512));
            let now = e.clock_v();
            let (_, h) = e.submit(spec(b, 1), now).expect("b");
            drain(&mut e);
            let p = h.snapshot();
            assert_eq!(p.cached_tokens, 3584);
            assert_eq!(ms(p.finished.expect("f").1.ttft), ttft);
        }
        // vLLM CI latency_llama8B_tp1 shape: batch 8, 32 in, 128 out.
        for (cfg, e2e) in [(&d, 746.896), (&c, 1618.0)] {
            let t = run(cfg, (0..8).map(|i| (prompt(i, 32), 128)).collect());
            assert!(t.iter().all(|x| ms(x.e2e) == e2e), "{t:?}");
        }
        // Decode-only ITL at batch 64 and 256.
        for (b, itl) in [(64u32, 6.137), (256, 7.289)] {
            let t = run(&d, (0..b).map(|i| (prompt(i, 16), 20)).collect());
            assert!(t.iter().all(|x| ms(x.mean_itl) == itl), "batch {b}");
        }
    }
}
