//! The KV block index: which backend holds which block of tokens, in which medium, as
//! the backends' own KV events say.
//!
//! - **Keys are agentlb's own** ([`BlockKeys`]): a block's key chains its parent's key
//!   and its token ids. Engines name blocks by a hash agentlb cannot always reproduce
//!   (pickled SHA-256, per-process xxhash seeds), but `BlockStored` carries the token ids,
//!   so the subscriber of each source re-keys every stored block and remembers engine
//!   hash → key for later removals. A request's keys come from its token ids
//!   ([`super::tokenize`]), computed the same way. Identical token prefixes give identical
//!   keys on every backend, whatever the engines' hash settings.
//! - **Entries** map a key to up to [`WAYS`] holders, each a backend and a mask of media
//!   (GPU, CPU, storage). One bounded [`Table`] (`kv.max_blocks`, O(1) per operation)
//!   holds them: when full, blocks of ended workflows go first, then the least recently
//!   stored or matched.
//! - **Lookup** ([`KvIndex::matched`]): per backend, the number of leading blocks of a
//!   request held on GPU and in any medium, by binary search over the prompt's keys
//!   (O(log n) lookups per backend). It assumes a backend that holds block `i` holds the
//!   blocks before it, which the engine's prefix cache maintains for hits (a hit stops
//!   at the first missing block, and the engine frees a sequence's blocks tail first).

use std::sync::atomic::{AtomicU64, Ordering};

use super::wire::Medium;
use crate::controller::{
    prefix::longest_prefix,
    table::{Class, Classify, Table},
};
use crate::model::BackendId;

/// Holders remembered per block.
pub const WAYS: usize = 8;

/// Approximate bytes one entry costs (slot, hash-map entry, holders).
pub const ENTRY_BYTES: usize = 136;

const NO_BACKEND: BackendId = BackendId::MAX;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Chained block keys of a token sequence.
#[derive(Debug, Clone, Copy)]
pub struct BlockKeys {
    /// Tokens per block.
    pub block_size: usize,
}

impl BlockKeys {
    /// The key a chain starts from (no LoRA adapter, or the adapter's name).
    pub fn root(lora: Option<&str>) -> u64 {
        let mut h = 0x6b76_2d69_6e64_6578; // "kv-index"
        if let Some(l) = lora {
            for b in l.bytes() {
                h = mix(h ^ u64::from(b)).wrapping_add(0x9e37_79b9_7f4a_7c15);
            }
        }
        h
    }

    /// The key of one block given its parent's key.
    pub fn key(parent: u64, tokens: &[u32]) -> u64 {
        let mut h = mix(parent ^ (tokens.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut it = tokens.chunks_exact(2);
        for p in it.by_ref() {
            h = mix(h ^ (u64::from(p[0]) | (u64::from(p[1]) << 32)))
                .wrapping_add(0x632b_e59b_d9b4_e019);
        }
        if let [last] = it.remainder() {
            h = mix(h ^ u64::from(*last) ^ (1 << 63));
        }
        h
    }

    /// Keys of every full block of `tokens`, chained from `root`, at most `max` of them.
    pub fn keys(&self, root: u64, tokens: &[u32], max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity((tokens.len() / self.block_size.max(1)).min(max));
        let mut parent = root;
        for block in tokens.chunks_exact(self.block_size.max(1)).take(max) {
            parent = Self::key(parent, block);
            out.push(parent);
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Way {
    backend: BackendId,
    mask: u8,
}

#[derive(Debug)]
struct Entry {
    ways: [Way; WAYS],
    ended: bool,
}

impl Classify for Entry {
    fn class(&self) -> Class {
        if self.ended {
            Class::Ended
        } else {
            Class::Idle
        }
    }
}

impl Entry {
    fn new() -> Self {
        Self {
            ways: [Way {
                backend: NO_BACKEND,
                mask: 0,
            }; WAYS],
            ended: false,
        }
    }

    fn mask(&self, b: BackendId) -> u8 {
        self.ways
            .iter()
            .find(|w| w.backend == b)
            .map_or(0, |w| w.mask)
    }

    fn is_empty(&self) -> bool {
        self.ways.iter().all(|w| w.backend == NO_BACKEND)
    }
}

/// What a backend holds of a request's prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Leading blocks on the GPU.
    pub gpu: usize,
    /// Leading blocks in any medium (GPU, CPU offload or storage); ≥ `gpu`.
    pub any: usize,
}

/// Counters of the index.
#[derive(Debug, Default)]
pub struct IndexStats {
    /// Blocks added or re-marked by `BlockStored`.
    pub stored: AtomicU64,
    /// Block holdings removed by `BlockRemoved`, clears and restarts.
    pub removed: AtomicU64,
    /// Stored blocks not recorded because a block had more than [`WAYS`] holders.
    pub overflow: AtomicU64,
}

/// The index.
#[derive(Debug)]
pub struct KvIndex {
    table: Table<Entry>,
    /// Counters.
    pub stats: IndexStats,
}

impl KvIndex {
    /// An index of at most `max_blocks` blocks.
    pub fn new(max_blocks: usize) -> Self {
        Self {
            table: Table::new(max_blocks),
            stats: IndexStats::default(),
        }
    }

    /// Records that `backend` holds the block `key` in `medium`.
    pub fn store(&self, key: u64, backend: BackendId, medium: Medium) {
        let bit = medium.bit();
        let stored = self.table.upsert(key, Entry::new, |e, _| {
            let Some(e) = e else { return false };
            e.ended = false;
            if let Some(w) = e.ways.iter_mut().find(|w| w.backend == backend) {
                w.mask |= bit;
                true
            } else if let Some(w) = e.ways.iter_mut().find(|w| w.backend == NO_BACKEND) {
                *w = Way { backend, mask: bit };
                true
            } else {
                false
            }
        });
        if stored {
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that `backend` no longer holds `key` in the media of `mask`.
    pub fn remove(&self, key: u64, backend: BackendId, mask: u8) {
        let empty = self.table.update(key, |e| {
            if let Some(w) = e.ways.iter_mut().find(|w| w.backend == backend) {
                w.mask &= !mask;
                if w.mask == 0 {
                    w.backend = NO_BACKEND;
                }
            }
            e.is_empty()
        });
        if empty.is_some() {
            self.stats.removed.fetch_add(1, Ordering::Relaxed);
        }
        if empty == Some(true) {
            self.table.remove(key);
        }
    }

    fn mask(&self, key: u64, backend: BackendId) -> u8 {
        self.table.get(key, |e| e.mask(backend)).unwrap_or(0)
    }

    /// What each of `backends` holds of the prefix `keys`.
    pub fn matched(&self, keys: &[u64], backends: &[BackendId]) -> Vec<Held> {
        backends
            .iter()
            .map(|&b| {
                let any = longest_prefix(keys, |k| self.mask(k, b) != 0);
                let gpu = if any == 0 {
                    0
                } else {
                    longest_prefix(&keys[..any], |k| self.mask(k, b) & Medium::Gpu.bit() != 0)
                };
                Held { gpu, any }
            })
            .collect()
    }

    /// The blocks of an ended workflow's last prompt go first when the index is full.
    pub fn demote(&self, keys: &[u64]) {
        for &k in keys {
            self.table.update(k, |e| e.ended = true);
        }
    }

    /// Blocks indexed.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate memory, bytes.
    pub fn bytes(&self) -> usize {
        self.len() * ENTRY_BYTES
    }

    /// Blocks evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.table.evictions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i.wrapping_mul(7919) ^ salt).collect()
    }

    #[test]
    fn keys_chain_over_tokens_and_ignore_a_partial_block() {
        let k = BlockKeys { block_size: 4 };
        let a = toks(18, 0);
        let mut b = a.clone();
        b[9] ^= 1;
        let ka = k.keys(BlockKeys::root(None), &a, 100);
        let kb = k.keys(BlockKeys::root(None), &b, 100);
        assert_eq!(ka.len(), 4, "18 tokens = 4 full blocks of 4");
        assert_eq!(ka[..2], kb[..2]);
        assert!(ka[2..].iter().zip(&kb[2..]).all(|(x, y)| x != y));
        assert_ne!(
            k.keys(BlockKeys::root(Some("adapter")), &a, 100)[0],
            ka[0],
            "a LoRA adapter's blocks are not the base model's"
        );
        assert_eq!(k.keys(BlockKeys::root(None), &a, 2).len(), 2, "bounded");
    }

    #[test]
    fn matched_prefix_per_backend_and_medium() {
        let idx = KvIndex::new(1000);
        let k = BlockKeys { block_size: 4 };
        let keys = k.keys(BlockKeys::root(None), &toks(40, 0), 100);
        for &key in &keys[..6] {
            idx.store(key, 0, Medium::Gpu);
        }
        for &key in &keys[..3] {
            idx.store(key, 1, Medium::Gpu);
        }
        for &key in &keys[3..8] {
            idx.store(key, 1, Medium::Cpu);
        }
        assert_eq!(
            idx.matched(&keys, &[0, 1, 2]),
            vec![
                Held { gpu: 6, any: 6 },
                Held { gpu: 3, any: 8 },
                Held { gpu: 0, any: 0 },
            ]
        );
        // Removed from the GPU of backend 0 from block 4 on: the prefix shrinks.
        for &key in &keys[4..6] {
            idx.remove(key, 0, Medium::Gpu.bit());
        }
        assert_eq!(idx.matched(&keys, &[0])[0], Held { gpu: 4, any: 4 });
        // A block nobody holds is gone from the table.
        let before = idx.len();
        idx.remove(keys[7], 1, Medium::Cpu.bit());
        assert_eq!(idx.len(), before - 1);
    }

    #[test]
    fn bounded_with_ended_blocks_first() {
        let idx = KvIndex::new(8);
        let k = BlockKeys { block_size: 2 };
        let a = k.keys(BlockKeys::root(None), &toks(8, 1), 100);
        let b = k.keys(BlockKeys::root(None), &toks(8, 2), 100);
        let c = k.keys(BlockKeys::root(None), &toks(8, 3), 100);
        for key in a.iter().chain(&b) {
            idx.store(*key, 0, Medium::Gpu);
        }
        idx.demote(&b);
        for key in &c {
            idx.store(*key, 0, Medium::Gpu);
        }
        assert_eq!(idx.len(), 8);
        assert_eq!(idx.matched(&a, &[0])[0].gpu, 4, "live blocks kept");
        assert_eq!(idx.matched(&b, &[0])[0].gpu, 0, "ended blocks went first");
        assert_eq!(idx.evictions(), 4);
    }

    #[test]
    fn more_holders_than_ways_are_counted_not_stored() {
        let idx = KvIndex::new(10);
        for b in 0..(WAYS as BackendId + 2) {
            idx.store(42, b, Medium::Gpu);
        }
        assert_eq!(idx.stats.overflow.load(Ordering::Relaxed), 2);
        assert_eq!(idx.matched(&[42], &[0])[0].gpu, 1);
    }
}
