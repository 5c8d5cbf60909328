//! Offline oracle: the prefix-cache hit rate that the best placement could reach, computed
//! from the workload and the cluster's KV capacity without running anything.
//!
//! Model: the KV pools of all instances form one pool (`instances × num_gpu_blocks`
//! blocks): a block need never be held twice, which no real placement can beat. Calls are
//! ordered by an estimated start time (dependencies, pauses and arrival times from the
//! workload; durations from the h100-8b step model). A call hits the longest prefix of its
//! block hashes that is resident, at most `tokens − 1` tokens as in vLLM; then its blocks are
//! resident. When the pool is full, the block used again farthest in the future is evicted
//! (Belady's rule, optimal for a cache of equal-sized items; a block's descendants are never
//! used before it, so prefixes are evicted from their tail). Prompts are tokenized and hashed
//! exactly as the simulator does ([`crate::tokenizer`], [`crate::prefix_cache`]), so the
//! prompt-token totals equal what the backends report.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::Serialize;
use serde_json::Value;

use super::Workload;
use crate::{
    config::Preset as LatencyPreset,
    prefix_cache::{BlockHash, extend_hashes},
    tokenizer::{ChatTurn, Tokenizer},
};

/// What the oracle found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OracleResult {
    /// Prompt tokens of every call.
    pub prompt_tokens: u64,
    /// Tokens the oracle's placement hits.
    pub hit_tokens: u64,
    /// `hit_tokens / prompt_tokens` with the pooled capacity.
    pub hit_rate: f64,
    /// Hit rate with unbounded KV (only first uses miss).
    pub unbounded_hit_rate: f64,
    /// Distinct blocks over all prompts: the working set (KV demand), in blocks.
    pub demand_blocks: u64,
}

/// The token ids of every call's rendered prompt (the simulator's stand-in tokenizer and
/// template).
pub fn prompt_tokens(w: &Workload, chars_per_token: f64) -> Vec<Vec<u32>> {
    prompt_tokens_with(w, &Tokenizer::new(chars_per_token))
}

/// The token ids of every call's rendered prompt with the simulator's `tok` (stand-in or
/// HF mode).
pub fn prompt_tokens_with(w: &Workload, tok: &Tokenizer) -> Vec<Vec<u32>> {
    w.calls
        .iter()
        .map(|c| {
            let contents: Vec<Value> = c
                .messages
                .iter()
                .map(|m| Value::String(m.content.clone()))
                .collect();
            let turns: Vec<ChatTurn<'_>> = c
                .messages
                .iter()
                .zip(&contents)
                .map(|(m, v)| ChatTurn {
                    role: &m.role,
                    content: Some(v),
                    tool_calls: None,
                })
                .collect();
            tok.render_chat(&turns, None, true)
        })
        .collect()
}

/// Estimated start time of every call (ms), from arrivals, dependencies, pauses and an
/// uncontended duration per call (prefill of the whole prompt plus one step per token).
pub fn estimated_starts(w: &Workload, prompt_lens: &[usize]) -> Vec<f64> {
    let lat = LatencyPreset::H100Llama8b.latency();
    let mut start = vec![0.0; w.calls.len()];
    let mut end = vec![0.0; w.calls.len()];
    for c in &w.calls {
        let ready = c.deps.iter().map(|&d| end[d]).fold(0.0_f64, f64::max);
        let s = (c.at_ms as f64).max(ready + c.delay_ms as f64);
        let dur =
            lat.step_seconds(prompt_lens[c.id], 1) + lat.step_seconds(0, 8) * c.max_tokens as f64;
        start[c.id] = s;
        end[c.id] = s + dur * 1000.0;
    }
    start
}

/// A workload tokenized, hashed and scheduled once, for any number of oracle runs.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Prompt length of every call, tokens.
    pub lens: Vec<usize>,
    /// Block hashes of every call's prompt.
    hashes: Vec<Vec<BlockHash>>,
    /// Calls by estimated start time.
    order: Vec<usize>,
    /// The latest estimated start, ms.
    pub last_start_ms: f64,
    block_size: usize,
}

impl Prepared {
    /// Tokenizes and hashes every prompt (blocks of `block_size`) and orders the calls.
    pub fn new(w: &Workload, chars_per_token: f64, block_size: usize) -> Self {
        Self::with_tokenizer(w, &Tokenizer::new(chars_per_token), block_size)
    }

    /// [`Prepared::new`] with the simulator's `tok` (stand-in or HF mode).
    pub fn with_tokenizer(w: &Workload, tok: &Tokenizer, block_size: usize) -> Self {
        let tokens = prompt_tokens_with(w, tok);
        let hashes: Vec<Vec<BlockHash>> = tokens
            .iter()
            .map(|t| {
                let mut h = Vec::with_capacity(t.len() / block_size);
                extend_hashes(&mut h, t, block_size);
                h
            })
            .collect();
        let lens: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let starts = estimated_starts(w, &lens);
        let mut order: Vec<usize> = (0..w.calls.len()).collect();
        order.sort_by(|&a, &b| starts[a].total_cmp(&starts[b]).then(a.cmp(&b)));
        Self {
            lens,
            hashes,
            order,
            last_start_ms: starts.into_iter().fold(0.0, f64::max),
            block_size,
        }
    }

    /// The oracle for a pool of `capacity_blocks` blocks.
    pub fn run(&self, capacity_blocks: u64) -> OracleResult {
        simulate(
            &self.order,
            &self.hashes,
            &self.lens,
            self.block_size,
            capacity_blocks,
        )
    }
}

/// Runs the oracle for a pool of `capacity_blocks` blocks of `block_size` tokens.
pub fn run(
    w: &Workload,
    chars_per_token: f64,
    block_size: usize,
    capacity_blocks: u64,
) -> OracleResult {
    Prepared::new(w, chars_per_token, block_size).run(capacity_blocks)
}

/// The pooled Belady cache over calls in `order` (exposed for hand-made tests).
pub fn simulate(
    order: &[usize],
    hashes: &[Vec<BlockHash>],
    lens: &[usize],
    block_size: usize,
    capacity_blocks: u64,
) -> OracleResult {
    // Future uses of each block, by position in `order`.
    let mut uses: HashMap<BlockHash, VecDeque<usize>> = HashMap::new();
    for (pos, &c) in order.iter().enumerate() {
        for h in &hashes[c] {
            let q = uses.entry(*h).or_default();
            if q.back() != Some(&pos) {
                q.push_back(pos);
            }
        }
    }
    let demand_blocks = uses.len() as u64;
    // Resident blocks keyed by their next use (usize::MAX = never again).
    let mut resident: HashMap<BlockHash, usize> = HashMap::new();
    let mut by_next: BTreeSet<(usize, BlockHash)> = BTreeSet::new();
    let mut seen: std::collections::HashSet<BlockHash> = std::collections::HashSet::new();
    let (mut prompt, mut hit, mut unbounded_hit) = (0u64, 0u64, 0u64);
    for (pos, &c) in order.iter().enumerate() {
        let n = lens[c];
        prompt += n as u64;
        let max_blocks = n.saturating_sub(1) / block_size;
        let hs = &hashes[c];
        let resident_prefix = hs.iter().take_while(|h| resident.contains_key(h)).count();
        hit += (resident_prefix.min(max_blocks) * block_size) as u64;
        let seen_prefix = hs.iter().take_while(|h| seen.contains(h)).count();
        unbounded_hit += (seen_prefix.min(max_blocks) * block_size) as u64;
        for h in hs {
            seen.insert(*h);
            let q = uses.entry(*h).or_default();
            while q.front().is_some_and(|&p| p <= pos) {
                q.pop_front();
            }
            let next = q.front().copied().unwrap_or(usize::MAX);
            if let Some(old) = resident.insert(*h, next) {
                by_next.remove(&(old, *h));
            }
            by_next.insert((next, *h));
        }
        while resident.len() as u64 > capacity_blocks {
            let Some(&(next, h)) = by_next.iter().next_back() else {
                break;
            };
            by_next.remove(&(next, h));
            resident.remove(&h);
        }
    }
    let rate = |x: u64| {
        if prompt == 0 {
            0.0
        } else {
            x as f64 / prompt as f64
        }
    };
    OracleResult {
        prompt_tokens: prompt,
        hit_tokens: hit,
        hit_rate: rate(hit),
        unbounded_hit_rate: rate(unbounded_hit),
        demand_blocks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(ids: &[u64]) -> Vec<BlockHash> {
        ids.to_vec()
    }

    #[test]
    fn unbounded_reuse_of_a_shared_prefix() {
        // Three calls of 4 blocks (64 tokens + 1) sharing the first 3 blocks.
        let hashes = vec![
            blocks(&[1, 2, 3, 4]),
            blocks(&[1, 2, 3, 5]),
            blocks(&[1, 2, 3, 6]),
        ];
        let lens = vec![65, 65, 65];
        let r = simulate(&[0, 1, 2], &hashes, &lens, 16, 100);
        assert_eq!(r.prompt_tokens, 195);
        // First call misses everything, the other two hit 3 blocks = 48 tokens each.
        assert_eq!(r.hit_tokens, 96);
        assert_eq!(r.hit_rate, r.unbounded_hit_rate);
        assert_eq!(r.demand_blocks, 6);
    }

    #[test]
    fn at_most_tokens_minus_one_hit() {
        // A prompt of exactly 2 blocks repeated: only 1 block may hit (vLLM recomputes the last token).
        let hashes = vec![blocks(&[1, 2]), blocks(&[1, 2])];
        let r = simulate(&[0, 1], &hashes, &[32, 32], 16, 10);
        assert_eq!(r.hit_tokens, 16);
    }

    #[test]
    fn belady_keeps_what_is_used_soonest() {
        // Capacity 2 blocks. A, B, A, C, A, B. LRU would hit A twice;
        // Belady keeps A throughout and evicts the one used farthest away.
        let a = blocks(&[10]);
        let b = blocks(&[20]);
        let c = blocks(&[30]);
        let hashes = vec![a.clone(), b.clone(), a.clone(), c, a, b];
        let lens = vec![17; 6];
        let r = simulate(&[0, 1, 2, 3, 4, 5], &hashes, &lens, 16, 2);
        // Hits: call 2 (A), call 4 (A), call 5 (B: kept because C is never used again).
        assert_eq!(r.hit_tokens, 48);
        assert_eq!(r.unbounded_hit_rate, 48.0 / 102.0);
    }

    #[test]
    fn capacity_limits_hits() {
        // Two disjoint 4-block prompts alternating, capacity 4: only one can stay.
        let x = blocks(&[1, 2, 3, 4]);
        let y = blocks(&[5, 6, 7, 8]);
        let hashes = vec![x.clone(), y.clone(), x.clone(), y];
        let lens = vec![65; 4];
        let r = simulate(&[0, 1, 2, 3], &hashes, &lens, 16, 4);
        assert_eq!(r.hit_tokens, 64);
        let unbounded = simulate(&[0, 1, 2, 3], &hashes, &lens, 16, 100);
        assert_eq!(unbounded.hit_tokens, 128);
    }
}
