//! The KV block pool with automatic prefix caching, after vLLM v1's `BlockPool`.
//!
//! - A fixed pool of `num_blocks` blocks of `block_size` tokens.
//! - Only full blocks are cached. A block's hash chains its parent's hash and its token ids:
//!   `h_i = H(h_{i-1}, tokens_i)`, with `h_{-1} = NONE_HASH`; `H` is a fixed 64-bit mix (not
//!   sha256, but deterministic across processes, so identical prefixes hash identically on every
//!   instance, as with vLLM's default sha256).
//! - Blocks used by a request hold a reference count; a block whose count drops to 0 goes to the
//!   tail of the free queue but keeps its hash (it stays a cache hit until reused).
//! - Allocation pops the head of the free queue (least recently freed), evicting its hash if it
//!   had one. Blocks in use are never in the free queue, so they are never evicted.
//! - A request frees its blocks in reverse order, so the tail of a prefix is evicted before its head.
//! - Every store and eviction is recorded as a [`KvEvent`] when events are enabled.

use rustc_hash::FxHashMap;

/// Hash of one full block (chained).
pub type BlockHash = u64;
/// Index of a block in the pool.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// Parent hash of the first block (`H("vllm-none-hash")` in spirit).
pub const NONE_HASH: BlockHash = 0x6e6f_6e65_2d68_6173;

/// Hash of a block given its parent's hash and its tokens.
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = parent.unwrap_or(NONE_HASH) ^ 0x51_7cc1_b727_220a;
    for &t in tokens {
        h = (h ^ u64::from(t))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(17);
    }
    crate::tokenizer::mix64(h ^ tokens.len() as u64)
}

/// Appends the chained hashes of every full block of `tokens` beyond those already in `hashes`.
pub fn extend_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = if i == 0 { None } else { Some(hashes[i - 1]) };
        hashes.push(hash_block(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

/// A KV cache event in vLLM's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Full blocks became cached.
    BlockStored {
        /// Their hashes, in chain order.
        block_hashes: Vec<BlockHash>,
        /// Hash of the block before the first one, if any.
        parent_block_hash: Option<BlockHash>,
        /// The tokens of all stored blocks, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: usize,
    },
    /// Cached blocks were evicted.
    BlockRemoved {
        /// Their hashes.
        block_hashes: Vec<BlockHash>,
    },
    /// The whole cache was reset.
    AllBlocksCleared,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    hash: BlockHash,
    has_hash: bool,
    ref_cnt: u32,
    prev: u32,
    next: u32,
    in_free: bool,
}

/// The block pool.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: FxHashMap<BlockHash, BlockId>,
    events_enabled: bool,
    events: Vec<KvEvent>,
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize, block_size: usize, events_enabled: bool) -> Self {
        let n = num_blocks.min(NIL as usize - 1);
        let blocks = (0..n)
            .map(|i| Block {
                hash: 0,
                has_hash: false,
                ref_cnt: 0,
                prev: if i == 0 { NIL } else { i as u32 - 1 },
                next: if i + 1 == n { NIL } else { i as u32 + 1 },
                in_free: true,
            })
            .collect();
        Self {
            block_size,
            blocks,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n as u32 - 1 },
            num_free: n,
            cached: FxHashMap::default(),
            events_enabled,
            events: Vec::new(),
            evictions: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with reference count 0 (cached or not).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks currently holding a cached hash.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// XOR of every cached block hash: a digest of the cache's contents that a subscriber
    /// to the KV events can compute alike.
    pub fn cached_digest(&self) -> u64 {
        self.cached.keys().fold(0, |d, &h| d ^ h)
    }

    /// Evictions of cached blocks so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Fraction of blocks in use by requests (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    /// Whether a hash is cached (for tests and introspection).
    pub fn is_cached(&self, h: BlockHash) -> bool {
        self.cached.contains_key(&h)
    }

    /// Reference count of the block caching `h`, if cached.
    pub fn ref_count_of(&self, h: BlockHash) -> Option<u32> {
        self.cached
            .get(&h)
            .map(|&b| self.blocks[b as usize].ref_cnt)
    }

    /// Takes the pending events.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Number of leading hashes that are cached.
    pub fn longest_cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    fn unlink(&mut self, b: u32) {
        let (prev, next) = {
            let blk = &self.blocks[b as usize];
            (blk.prev, blk.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let blk = &mut self.blocks[b as usize];
        blk.prev = NIL;
        blk.next = NIL;
        blk.in_free = false;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, b: u32) {
        let old_tail = self.tail;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = old_tail;
            blk.next = NIL;
            blk.in_free = true;
        }
        if old_tail == NIL {
            self.head = b;
        } else {
            self.blocks[old_tail as usize].next = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    /// Takes a reference on the cached blocks of `hashes` (which must all be cached).
    pub fn touch(&mut self, hashes: &[BlockHash], out: &mut Vec<BlockId>) {
        for h in hashes {
            let Some(&b) = self.cached.get(h) else {
                debug_assert!(false, "touch of an uncached hash");
                continue;
            };
            if self.blocks[b as usize].in_free {
                self.unlink(b);
            }
            self.blocks[b as usize].ref_cnt += 1;
            out.push(b);
        }
    }

    /// Allocates `n` fresh blocks (evicting LRU free cached blocks), or `None` if fewer are free.
    pub fn allocate(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        if n > self.num_free {
            return false;
        }
        let mut removed = Vec::new();
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            let blk = &mut self.blocks[b as usize];
            if blk.has_hash {
                blk.has_hash = false;
                let h = blk.hash;
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                    self.evictions += 1;
                    if self.events_enabled {
                        removed.push(h);
                    }
                }
            }
            blk.ref_cnt = 1;
            out.push(b);
        }
        if !removed.is_empty() {
            // vLLM emits one BlockRemoved per evicted block.
            for h in removed {
                self.events.push(KvEvent::BlockRemoved {
                    block_hashes: vec![h],
                });
            }
        }
        true
    }

    /// Drops one reference on each block, in reverse order (tail blocks become LRU first).
    pub fn free(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(blk.ref_cnt > 0);
            blk.ref_cnt = blk.ref_cnt.saturating_sub(1);
            if blk.ref_cnt == 0 {
                self.push_tail(b);
            }
        }
    }

    /// Marks `blocks[start..end]` full and caches them with `hashes[start..end]`.
    ///
    /// `range_tokens` are the tokens of blocks `start..end` (needed only for events; may be
    /// empty when events are off). Blocks whose hash is already cached by another block stay
    /// uncached duplicates (no event).
    pub fn cache_full_blocks(
        &mut self,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        range_tokens: &[u32],
        start: usize,
        end: usize,
    ) {
        if start >= end {
            return;
        }
        let bs = self.block_size;
        let mut stored_hashes = Vec::new();
        let mut stored_tokens = Vec::new();
        let mut parent = if start == 0 {
            None
        } else {
            Some(hashes[start - 1])
        };
        let mut first_parent = None;
        for i in start..end {
            let b = blocks[i];
            let h = hashes[i];
            if self.cached.contains_key(&h) {
                // Another block already holds this content; flush the current run.
                if !stored_hashes.is_empty() {
                    self.push_stored(&mut stored_hashes, &mut stored_tokens, first_parent.take());
                }
                parent = Some(h);
                continue;
            }
            let blk = &mut self.blocks[b as usize];
            blk.hash = h;
            blk.has_hash = true;
            self.cached.insert(h, b);
            if self.events_enabled {
                if stored_hashes.is_empty() {
                    first_parent = Some(parent);
                }
                stored_hashes.push(h);
                let off = (i - start) * bs;
                if let Some(t) = range_tokens.get(off..off + bs) {
                    stored_tokens.extend_from_slice(t);
                }
            }
            parent = Some(h);
        }
        if !stored_hashes.is_empty() {
            self.push_stored(&mut stored_hashes, &mut stored_tokens, first_parent.take());
        }
    }

    fn push_stored(
        &mut self,
        hashes: &mut Vec<BlockHash>,
        tokens: &mut Vec<u32>,
        parent: Option<Option<BlockHash>>,
    ) {
        self.events.push(KvEvent::BlockStored {
            block_hashes: std::mem::take(hashes),
            parent_block_hash: parent.flatten(),
            token_ids: std::mem::take(tokens),
            block_size: self.block_size,
        });
    }

    /// Drops every cached hash of free blocks (vLLM `reset_prefix_cache`); in-use blocks keep theirs.
    pub fn reset_prefix_cache(&mut self) {
        let mut b = self.head;
        while b != NIL {
            let blk = &mut self.blocks[b as usize];
            if blk.has_hash {
                blk.has_hash = false;
                self.cached.remove(&blk.hash);
            }
            b = blk.next;
        }
        if self.events_enabled {
            self.events.push(KvEvent::AllBlocksCleared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1000 + i).collect()
    }

    /// Simulates a request that computes all of `tokens` and returns its blocks and hashes.
    fn compute(pool: &mut BlockPool, tokens: &[u32]) -> (Vec<BlockId>, usize) {
        let bs = pool.block_size();
        let mut hashes = Vec::new();
        extend_hashes(&mut hashes, tokens, bs);
        let hit = pool.longest_cached_prefix(&hashes);
        let mut blocks = Vec::new();
        pool.touch(&hashes[..hit], &mut blocks);
        let need = tokens.len().div_ceil(bs) - hit;
        assert!(pool.allocate(need, &mut blocks), "pool exhausted");
        pool.cache_full_blocks(
            &blocks,
            &hashes,
            &tokens[hit * bs..hashes.len() * bs],
            hit,
            hashes.len(),
        );
        (blocks, hit)
    }

    #[test]
    fn hashes_chain() {
        let a = toks(1, 32);
        let mut b = toks(2, 32);
        b[..16].copy_from_slice(&a[..16]);
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        extend_hashes(&mut ha, &a, 16);
        extend_hashes(&mut hb, &b, 16);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        // Same block content under a different parent hashes differently.
        assert_ne!(hash_block(Some(1), &a[..16]), hash_block(Some(2), &a[..16]));
        // Only full blocks are hashed.
        let mut h = Vec::new();
        extend_hashes(&mut h, &a[..31], 16);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn shared_prefix_hits_full_blocks_only() {
        let mut pool = BlockPool::new(100, 16, false);
        let a = toks(1, 40); // 2 full blocks + 8
        let (blocks_a, hit) = compute(&mut pool, &a);
        assert_eq!(hit, 0);
        assert_eq!(blocks_a.len(), 3);
        let mut b = a[..37].to_vec();
        b.extend(toks(9, 20));
        let (blocks_b, hit) = compute(&mut pool, &b);
        assert_eq!(hit, 2, "shares two full blocks");
        assert_eq!(pool.ref_count_of(hash_of(&a, 0)), Some(2));
        pool.free(&blocks_a);
        pool.free(&blocks_b);
        assert_eq!(pool.num_free(), 100);
        assert!(pool.is_cached(hash_of(&a, 1)));
    }

    fn hash_of(tokens: &[u32], block: usize) -> BlockHash {
        let mut h = Vec::new();
        extend_hashes(&mut h, tokens, 16);
        h[block]
    }

    #[test]
    fn lru_eviction_spares_in_use_blocks() {
        let mut pool = BlockPool::new(6, 16, true);
        let a = toks(1, 32);
        let b = toks(2, 32);
        let c = toks(3, 32);
        let (ba, _) = compute(&mut pool, &a);
        let (bb, _) = compute(&mut pool, &b);
        pool.free(&ba); // a is LRU among free
        pool.free(&bb);
        let (bc, _) = compute(&mut pool, &c); // 2 never-used blocks left: no eviction yet
        assert!(pool.is_cached(hash_of(&a, 0)) && pool.is_cached(hash_of(&a, 1)));
        let _ = pool.take_events();
        // Pool now: a (free, LRU), b (free), c (in use). A new 2-block request evicts a, then b.
        let d = toks(4, 32);
        let (bd, _) = compute(&mut pool, &d);
        assert!(!pool.is_cached(hash_of(&a, 0)) && !pool.is_cached(hash_of(&a, 1)));
        assert!(pool.is_cached(hash_of(&b, 0)));
        // Tail block of a is evicted first (freed in reverse order).
        let ev = pool.take_events();
        assert_eq!(
            ev[0],
            KvEvent::BlockRemoved {
                block_hashes: vec![hash_of(&a, 1)]
            }
        );
        // Everything else is in use or b: c is never evicted, a third request cannot get 4 blocks.
        let mut tmp = Vec::new();
        assert!(!pool.allocate(3, &mut tmp));
        assert!(pool.allocate(2, &mut tmp));
        assert!(pool.is_cached(hash_of(&c, 0)) && pool.is_cached(hash_of(&c, 1)));
        assert!(pool.is_cached(hash_of(&d, 0)));
        assert!(!pool.is_cached(hash_of(&b, 0)));
        pool.free(&bc);
        pool.free(&bd);
        pool.free(&tmp);
        assert_eq!(pool.num_free(), 6);
    }

    #[test]
    fn hit_moves_block_out_of_free_queue() {
        let mut pool = BlockPool::new(4, 16, false);
        let a = toks(1, 32);
        let (ba, _) = compute(&mut pool, &a);
        pool.free(&ba);
        // Re-use a (touch), then allocate the 2 other blocks: a must survive.
        let (ba2, hit) = compute(&mut pool, &a);
        assert_eq!(hit, 2);
        let mut tmp = Vec::new();
        assert!(pool.allocate(2, &mut tmp));
        assert!(pool.is_cached(hash_of(&a, 1)));
        assert!(!pool.allocate(1, &mut tmp));
        pool.free(&ba2);
        assert!(pool.allocate(1, &mut tmp));
        // a's tail block went back last-in reversed order: head block evicted? No: tail first.
        assert!(pool.is_cached(hash_of(&a, 0)));
        assert!(!pool.is_cached(hash_of(&a, 1)));
    }

    #[test]
    fn events_describe_stores() {
        let mut pool = BlockPool::new(10, 4, true);
        let a: Vec<u32> = (0..9).collect();
        let _ = compute(&mut pool, &a);
        let ev = pool.take_events();
        let mut hs = Vec::new();
        extend_hashes(&mut hs, &a, 4);
        assert_eq!(
            ev,
            vec![KvEvent::BlockStored {
                block_hashes: hs.clone(),
                parent_block_hash: None,
                token_ids: (0..8).collect(),
                block_size: 4,
            }]
        );
        pool.reset_prefix_cache();
        assert_eq!(pool.take_events(), vec![KvEvent::AllBlocksCleared]);
        // In-use blocks keep their hashes.
        assert!(pool.is_cached(hs[0]));
    }
}
