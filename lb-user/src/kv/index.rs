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
//! - **Backends are slots**: the index gives each backend that holds blocks one of
//!   [`BACKEND_SLOTS`] (64) dense slots, and an entry is its key and two bitmasks over
//!   the slots: who holds the block on GPU, who holds it on CPU or storage (one bit for
//!   both non-GPU media: the source view passes a removal on only when the block left
//!   both). 24 bytes plus a meta byte (CLOCK reference, "ended"), no per-entry
//!   allocation, in a compact open-addressing table (`kv/slots.rs`) per shard. A slot
//!   counts the blocks it holds and is handed to another backend only once that count is
//!   zero: a backend removed (admin API, discovery) loses its blocks when its subscriber
//!   stops (`drop_all`), and its slot with them. While 64 backends all hold blocks, a
//!   65th is not indexed: its stores are refused (counted as `overflow`; its source
//!   reports itself stale so routing uses the approximate index for it) until a slot
//!   frees up.
//! - **Bounded** by `kv.max_blocks` (split evenly over up to 64 shards, one mutex each;
//!   a shard's table grows by doubling up to what its share needs at 7/8 load). When a
//!   shard is full, blocks of ended workflows go first (a queue of demoted keys, checked
//!   lazily, capped at a quarter of the shard: beyond it ended blocks still go at the
//!   first sight of the CLOCK hand), then the CLOCK hand evicts the first block not
//!   stored or matched since its last pass (a second-chance approximation of least
//!   recently stored or matched). Every operation is O(1) (amortized for the hand).
//! - **Lookup** ([`KvIndex::matched`]): per backend, the number of leading blocks of a
//!   request held on GPU and in any medium, by binary search over the prompt's keys
//!   (O(log n) lookups per backend). It assumes a backend that holds block `i` holds the
//!   blocks before it, which the engine's prefix cache maintains for hits (a hit stops
//!   at the first missing block, and the engine frees a sequence's blocks tail first).
//!   The backends' searches run together: backends at the same point of their search
//!   share the lookup of the same key, whose two masks answer for all of them, so 64
//!   backends cost about what the backends that hold the prompt's first block need.

use std::{
    collections::VecDeque,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use super::{slots::Slots, wire::Medium};
use crate::model::BackendId;

/// Backends the index tells apart (one bit each in an entry's masks).
pub const BACKEND_SLOTS: usize = 64;

/// Meta bit: stored or matched since the CLOCK hand last passed.
const REF: u8 = 1;
/// Meta bit: the block of an ended workflow (evicted first).
const ENDED: u8 = 2;
/// Media bits ([`Medium::bit`]): GPU, and the two others (one mask in the index).
const GPU_BIT: u8 = 1;
const OTHER_BITS: u8 = 2 | 4;

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
    /// Stored blocks not recorded because [`BACKEND_SLOTS`] other backends held blocks
    /// (no slot free for the backend).
    pub overflow: AtomicU64,
}

/// A cache line of its own (slot counts change with every block a backend stores).
#[repr(align(64))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// Who owns each of the [`BACKEND_SLOTS`] slots.
#[derive(Debug)]
struct Backends {
    /// Per slot: (owner id + 1) << 32 | blocks with the slot's bit set (an upper bound:
    /// raised before a bit is set, lowered after it is cleared). A slot changes owner
    /// only at a count of zero (compare-and-swap), so no entry carries a stale bit.
    state: [Padded; BACKEND_SLOTS],
    /// The owner (id + 1, 0: free) of each slot, mirrored from `state` for lookups that
    /// should not read lines other threads write; `state` decides.
    owners: [AtomicU32; BACKEND_SLOTS],
    /// Bit `id % 64` of every owner: a backend without a slot is usually told at once.
    seen: AtomicU64,
    /// Serializes handing slots out.
    assign: Mutex<()>,
}

fn tag(b: BackendId) -> Option<u32> {
    b.checked_add(1)
}

fn owner(state: u64) -> u32 {
    (state >> 32) as u32
}

fn count(state: u64) -> u32 {
    state as u32
}

impl Backends {
    fn new() -> Self {
        Self {
            state: std::array::from_fn(|_| Padded::default()),
            owners: std::array::from_fn(|_| AtomicU32::new(0)),
            seen: AtomicU64::new(0),
            assign: Mutex::new(()),
        }
    }

    /// The slot the mirror gives `b` (to be confirmed against `state`).
    fn find(&self, b: BackendId) -> Option<usize> {
        let t = tag(b)?;
        if self.seen.load(Ordering::Acquire) & (1 << (b as usize % BACKEND_SLOTS)) == 0 {
            return None;
        }
        let h = b as usize % BACKEND_SLOTS;
        if self.owners[h].load(Ordering::Relaxed) == t {
            return Some(h);
        }
        self.owners
            .iter()
            .position(|o| o.load(Ordering::Relaxed) == t)
    }

    /// The slot `b` owns, by `state`.
    fn find_exact(&self, b: BackendId) -> Option<usize> {
        let t = tag(b)?;
        self.state
            .iter()
            .position(|s| owner(s.0.load(Ordering::Acquire)) == t)
    }

    fn owns(&self, s: usize, b: BackendId) -> bool {
        tag(b).is_some_and(|t| owner(self.state[s].0.load(Ordering::Acquire)) == t)
    }

    /// One more block with `s`'s bit, if `b` still owns `s`.
    fn acquire(&self, s: usize, b: BackendId) -> bool {
        let Some(t) = tag(b) else { return false };
        self.state[s]
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |st| {
                (owner(st) == t && count(st) != u32::MAX).then_some(st + 1)
            })
            .is_ok()
    }

    /// One block fewer with `s`'s bit.
    fn release(&self, s: usize) {
        self.state[s].0.fetch_sub(1, Ordering::AcqRel);
    }

    /// `b`'s slot, handing it one if it has none: a free slot, else one whose owner
    /// holds no block. `None` when all 64 hold blocks.
    fn assign(&self, b: BackendId, checked: bool) -> Option<usize> {
        if !checked && let Some(s) = self.find(b) {
            return Some(s);
        }
        let t = tag(b)?;
        let _g = self
            .assign
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut got = self.find_exact(b);
        for free in [(|st: u64| st == 0) as fn(u64) -> bool, |st: u64| {
            count(st) == 0
        }] {
            if got.is_some() {
                break;
            }
            got = (0..BACKEND_SLOTS).find(|&i| {
                let st = self.state[i].0.load(Ordering::Acquire);
                free(st)
                    && self.state[i]
                        .0
                        .compare_exchange(
                            st,
                            u64::from(t) << 32,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
            });
        }
        let s = got?;
        self.owners[s].store(t, Ordering::Relaxed);
        let seen = self
            .owners
            .iter()
            .fold(0u64, |m, o| match o.load(Ordering::Relaxed) {
                0 => m,
                t => m | 1 << ((t - 1) as usize % BACKEND_SLOTS),
            });
        self.seen.store(seen, Ordering::Release);
        Some(s)
    }
}

/// One shard: its table, its CLOCK hand and its queue of demoted keys.
struct Shard {
    /// Key → [slots holding it on GPU, slots holding it on CPU or storage].
    t: Slots<[u64; 2]>,
    hand: usize,
    ended: VecDeque<u64>,
}

/// The index.
pub struct KvIndex {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    ended_cap: usize,
    backends: Backends,
    evictions: AtomicU64,
    /// Counters.
    pub stats: IndexStats,
}

impl std::fmt::Debug for KvIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvIndex")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .field("stats", &self.stats)
            .finish()
    }
}

fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let s = m.trailing_zeros() as usize;
            m &= m - 1;
            s
        })
    })
}

impl KvIndex {
    /// An index of at most `max_blocks` blocks.
    pub fn new(max_blocks: usize) -> Self {
        let max = max_blocks.max(1);
        // One shard per 1,024 blocks, a power of two, at most 64 (as the bounded tables):
        // small indexes keep one CLOCK over everything.
        let n = (max / 1024).clamp(1, 64).next_power_of_two().min(64);
        let per_shard = max.div_ceil(n);
        Self {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Shard {
                        t: Slots::new(per_shard),
                        hand: 0,
                        ended: VecDeque::new(),
                    })
                })
                .collect(),
            per_shard,
            ended_cap: (per_shard / 4).max(16),
            backends: Backends::new(),
            evictions: AtomicU64::new(0),
            stats: IndexStats::default(),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Shard> {
        // High bits pick the shard; the table spreads the whole key.
        let i = ((key >> 58) as usize) & (self.shards.len() - 1);
        self.shards[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `backend` holds the block `key` in `medium`. `false`: not recorded,
    /// every backend slot is held by other backends' blocks (counted in `overflow`).
    pub fn store(&self, key: u64, backend: BackendId, medium: Medium) -> bool {
        let gpu = medium.bit() & GPU_BIT != 0;
        for attempt in 0..4 {
            // A slot can change owner between the lookup and the count (its blocks were
            // all gone): the next attempt asks under the lock.
            let Some(s) = self.backends.assign(backend, attempt > 0) else {
                break;
            };
            if self.store_in(key, s, backend, gpu) {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        self.stats.overflow.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn store_in(&self, key: u64, s: usize, backend: BackendId, gpu: bool) -> bool {
        let bit = 1u64 << s;
        let mut g = self.shard(key);
        let sh = &mut *g;
        let pos = match sh.t.find(key) {
            Some(p) => {
                let [gm, om] = sh.t.val(p);
                let mine = if (gm | om) & bit == 0 {
                    self.backends.acquire(s, backend)
                } else {
                    // Set already: by this backend, unless the slot changed owner.
                    self.backends.owns(s, backend)
                };
                if !mine {
                    return false;
                }
                p
            }
            None => {
                if !self.backends.acquire(s, backend) {
                    return false;
                }
                if sh.t.len() >= self.per_shard && self.evict_one(sh) {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                sh.t.insert(key, [0, 0], 0)
            }
        };
        sh.t.val_mut(pos)[usize::from(!gpu)] |= bit;
        // Stored again: referenced, and no longer an ended workflow's.
        sh.t.set_meta(pos, REF);
        true
    }

    /// Evicts one block of a full shard: an ended one if the queue names one, else the
    /// CLOCK's pick.
    fn evict_one(&self, sh: &mut Shard) -> bool {
        while let Some(k) = sh.ended.pop_front() {
            if let Some(p) = sh.t.find(k)
                && sh.t.meta(p) & ENDED != 0
            {
                self.drop_at(sh, p);
                return true;
            }
        }
        let n = sh.t.slots();
        if n == 0 {
            return false;
        }
        for _ in 0..=2 * n {
            let p = sh.hand % n;
            sh.hand = p + 1;
            let m = sh.t.meta(p);
            if m == 0 {
                continue;
            }
            if m & REF != 0 && m & ENDED == 0 {
                sh.t.set_meta(p, m & !REF);
                continue;
            }
            self.drop_at(sh, p);
            return true;
        }
        false
    }

    fn drop_at(&self, sh: &mut Shard, p: usize) {
        let (_, [g, o], _) = sh.t.remove_at(p);
        for s in bits(g | o) {
            self.backends.release(s);
        }
    }

    /// Records that `backend` no longer holds `key` in the media of `mask`. CPU and
    /// storage share one bit in the index: either clears it (the source view passes
    /// them only once the block left both).
    pub fn remove(&self, key: u64, backend: BackendId, mask: u8) {
        let Some(mut s) = self.backends.find(backend) else {
            return;
        };
        let mut g = self.shard(key);
        let sh = &mut *g;
        let Some(p) = sh.t.find(key) else { return };
        self.stats.removed.fetch_add(1, Ordering::Relaxed);
        if !self.backends.owns(s, backend) {
            // The mirror lagged a change of owner.
            match self.backends.find_exact(backend) {
                Some(x) => s = x,
                None => return,
            }
        }
        let bit = 1u64 << s;
        let [mut gm, mut om] = sh.t.val(p);
        let was = (gm | om) & bit != 0;
        if mask & GPU_BIT != 0 {
            gm &= !bit;
        }
        if mask & OTHER_BITS != 0 {
            om &= !bit;
        }
        if gm | om == 0 {
            sh.t.remove_at(p);
        } else {
            *sh.t.val_mut(p) = [gm, om];
        }
        if was && (gm | om) & bit == 0 {
            self.backends.release(s);
        }
    }

    /// The GPU and any-medium masks of `key` (marks it referenced).
    fn masks(&self, key: u64) -> (u64, u64) {
        let mut g = self.shard(key);
        let sh = &mut *g;
        match sh.t.find(key) {
            Some(p) => {
                let m = sh.t.meta(p);
                if m & REF == 0 {
                    sh.t.set_meta(p, m | REF);
                }
                let [gm, om] = sh.t.val(p);
                (gm, gm | om)
            }
            None => (0, 0),
        }
    }

    /// The binary searches of [`crate::controller::prefix::longest_prefix`] for every
    /// slot of `set` at once, from the state `keys[..lo]` held, `keys[..=hi]` maybe not:
    /// slots at the same state share a lookup.
    fn prefix(
        &self,
        keys: &[u64],
        mut lo: usize,
        mut hi: usize,
        mut set: u64,
        gpu: bool,
        out: &mut [usize; BACKEND_SLOTS],
    ) {
        while set != 0 {
            if lo >= hi {
                for s in bits(set) {
                    out[s] = lo;
                }
                return;
            }
            let mid = lo + (hi - lo).div_ceil(2);
            let (g, a) = self.masks(keys[mid - 1]);
            let m = if gpu { g } else { a };
            let (yes, no) = (set & m, set & !m);
            if yes != 0 && no != 0 {
                self.prefix(keys, mid, hi, yes, gpu, out);
                set = no;
                hi = mid - 1;
            } else if yes != 0 {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
    }

    /// What each of `backends` holds of the prefix `keys`.
    pub fn matched(&self, keys: &[u64], backends: &[BackendId]) -> Vec<Held> {
        let mut out = vec![Held::default(); backends.len()];
        let want = backends
            .iter()
            .filter_map(|&b| self.backends.find(b))
            .fold(0u64, |m, s| m | 1 << s);
        if keys.is_empty() || want == 0 {
            return out;
        }
        // Per slot, as `longest_prefix` over `keys` for any medium, then over the
        // `any` first keys for the GPU.
        let (g0, a0) = self.masks(keys[0]);
        let mut any = [0usize; BACKEND_SLOTS];
        self.prefix(keys, 1, keys.len(), want & a0, false, &mut any);
        let mut gpu = [0usize; BACKEND_SLOTS];
        let mut todo = want & a0 & g0;
        while todo != 0 {
            let a = any[todo.trailing_zeros() as usize];
            let group = bits(todo)
                .filter(|&s| any[s] == a)
                .fold(0u64, |m, s| m | 1 << s);
            self.prefix(keys, 1, a, group, true, &mut gpu);
            todo &= !group;
        }
        for (h, &b) in out.iter_mut().zip(backends) {
            // A slot that changed owner meanwhile answered for another backend.
            if let Some(s) = self.backends.find(b)
                && want & (1 << s) != 0
                && self.backends.owns(s, b)
            {
                *h = Held {
                    gpu: gpu[s],
                    any: any[s],
                };
            }
        }
        out
    }

    /// The blocks of an ended workflow's last prompt go first when the index is full.
    pub fn demote(&self, keys: &[u64]) {
        for &k in keys {
            let mut g = self.shard(k);
            let sh = &mut *g;
            if let Some(p) = sh.t.find(k) {
                let m = sh.t.meta(p);
                if m & ENDED == 0 {
                    sh.t.set_meta(p, (m | ENDED) & !REF);
                    if sh.ended.len() >= self.ended_cap {
                        // Beyond the queue, the CLOCK hand still takes it at first sight.
                        sh.ended.pop_front();
                    }
                    sh.ended.push_back(k);
                }
            }
        }
    }

    /// Blocks indexed.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .t
                    .len()
            })
            .sum()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory, bytes: the shards' tables and queues as allocated, and the index itself.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.shards.len() * std::mem::size_of::<Mutex<Shard>>()
            + self
                .shards
                .iter()
                .map(|s| {
                    let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    s.t.bytes() + s.ended.capacity() * std::mem::size_of::<u64>()
                })
                .sum::<usize>()
    }

    /// Blocks evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
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
    fn media_bits_match_the_wire() {
        assert_eq!(Medium::Gpu.bit(), GPU_BIT);
        assert_eq!(Medium::Cpu.bit() | Medium::Storage.bit(), OTHER_BITS);
    }

    #[test]
    fn insert_lookup_remove_and_media() {
        let idx = KvIndex::new(100);
        assert!(idx.store(7, 3, Medium::Cpu));
        assert!(idx.store(7, 3, Medium::Storage));
        assert_eq!(idx.matched(&[7], &[3])[0], Held { gpu: 0, any: 1 });
        idx.store(7, 3, Medium::Gpu);
        assert_eq!(idx.matched(&[7], &[3])[0], Held { gpu: 1, any: 1 });
        idx.remove(7, 3, Medium::Gpu.bit());
        assert_eq!(idx.matched(&[7], &[3])[0], Held { gpu: 0, any: 1 });
        idx.remove(7, 4, Medium::Cpu.bit());
        assert_eq!(
            idx.matched(&[7], &[3])[0].any,
            1,
            "another backend's removal"
        );
        idx.remove(7, 3, Medium::Cpu.bit() | Medium::Storage.bit());
        assert!(idx.is_empty());
        assert_eq!(idx.backends.state[3].0.load(Ordering::Relaxed) as u32, 0);
        assert_eq!(idx.stats.stored.load(Ordering::Relaxed), 3);
    }

    /// A model of the index (no bound): what each backend holds of each key.
    fn reference(
        held: &std::collections::HashMap<(u64, BackendId), u8>,
        keys: &[u64],
        backends: &[BackendId],
    ) -> Vec<Held> {
        use crate::controller::prefix::longest_prefix;
        let m = |k: u64, b: BackendId| held.get(&(k, b)).copied().unwrap_or(0);
        backends
            .iter()
            .map(|&b| {
                let any = longest_prefix(keys, |k| m(k, b) != 0);
                let gpu = if any == 0 {
                    0
                } else {
                    longest_prefix(&keys[..any], |k| m(k, b) & 1 != 0)
                };
                Held { gpu, any }
            })
            .collect()
    }

    #[test]
    fn matched_is_a_binary_search_per_backend_even_over_holes() {
        let idx = KvIndex::new(100_000);
        let keys = BlockKeys { block_size: 4 }.keys(BlockKeys::root(None), &toks(4 * 300, 9), 300);
        let backends: Vec<BackendId> = (0..64).map(|i| 1000 + i * 7).collect();
        let mut model = std::collections::HashMap::new();
        let mut r = 0x1234_5678_u64;
        let mut rnd = |n: u64| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r % n
        };
        for &b in &backends {
            // A prefix of random length, some on GPU, then holes.
            let n = rnd(300) as usize;
            let g = rnd(n as u64 + 1) as usize;
            for (i, &k) in keys[..n].iter().enumerate() {
                let medium = if i < g { Medium::Gpu } else { Medium::Cpu };
                idx.store(k, b, medium);
                *model.entry((k, b)).or_insert(0) |= medium.bit();
            }
            for _ in 0..rnd(20) {
                let k = keys[rnd(300) as usize];
                let medium = [Medium::Gpu, Medium::Cpu][rnd(2) as usize];
                if rnd(2) == 0 {
                    idx.store(k, b, medium);
                    *model.entry((k, b)).or_insert(0) |= medium.bit();
                } else {
                    idx.remove(k, b, medium.bit());
                    if let Some(m) = model.get_mut(&(k, b)) {
                        *m &= !medium.bit();
                    }
                }
            }
        }
        let mut asked = backends.clone();
        asked.extend([5, 1000, BackendId::MAX]);
        assert_eq!(idx.matched(&keys, &asked), reference(&model, &keys, &asked));
        for n in [0, 1, 2, 17, 150] {
            assert_eq!(
                idx.matched(&keys[..n], &asked),
                reference(&model, &keys[..n], &asked)
            );
        }
    }

    #[test]
    fn more_backends_than_slots_are_counted_not_stored() {
        let idx = KvIndex::new(1000);
        let n = BACKEND_SLOTS as BackendId;
        for b in 0..n + 2 {
            idx.store(42, b * 3, Medium::Gpu);
        }
        assert_eq!(idx.stats.overflow.load(Ordering::Relaxed), 2);
        assert_eq!(
            idx.matched(&[42], &[0, 3 * (n - 1), 3 * n]),
            vec![
                Held { gpu: 1, any: 1 },
                Held { gpu: 1, any: 1 },
                Held::default()
            ]
        );
        // A backend that holds nothing more gives its slot up.
        idx.remove(42, 3, Medium::Gpu.bit());
        assert!(idx.store(43, 3 * n, Medium::Gpu));
        assert_eq!(idx.matched(&[43], &[3 * n])[0].any, 1);
        assert_eq!(idx.matched(&[42, 43], &[3]), vec![Held::default()]);
        // and the old owner asks for one again: none is free.
        assert!(!idx.store(44, 3, Medium::Gpu));
    }

    #[test]
    fn clearing_one_backend_leaves_the_others() {
        let idx = KvIndex::new(10_000);
        let keys = BlockKeys { block_size: 4 }.keys(BlockKeys::root(None), &toks(4 * 100, 5), 100);
        for &k in &keys {
            idx.store(k, 1, Medium::Gpu);
        }
        for &k in &keys[..50] {
            idx.store(k, 2, Medium::Cpu);
        }
        // What `drop_all` does for backend 1.
        for &k in &keys {
            idx.remove(k, 1, 7);
        }
        assert_eq!(idx.len(), 50);
        assert_eq!(
            idx.matched(&keys, &[1, 2]),
            vec![Held::default(), Held { gpu: 0, any: 50 }]
        );
        let s = idx.backends.find(1).expect("slot kept until needed");
        assert_eq!(idx.backends.state[s].0.load(Ordering::Relaxed) as u32, 0);
    }

    #[test]
    fn clock_keeps_recently_matched_blocks() {
        let idx = KvIndex::new(8);
        let k: Vec<u64> = (1..=8u64).map(|i| i << 40).collect();
        for &key in &k {
            idx.store(key, 0, Medium::Gpu);
        }
        // One eviction: the hand clears every reference bit on its way.
        idx.store(100, 0, Medium::Gpu);
        assert_eq!((idx.len(), idx.evictions()), (8, 1));
        let kept: Vec<u64> = k[..4]
            .iter()
            .copied()
            .filter(|&key| idx.matched(&[key], &[0])[0].gpu == 1)
            .collect();
        for key in 101..104 {
            idx.store(key, 0, Medium::Gpu);
        }
        assert_eq!((idx.len(), idx.evictions()), (8, 4));
        for key in kept.iter().copied().chain([100]) {
            assert_eq!(idx.matched(&[key], &[0])[0].gpu, 1, "referenced {key} kept");
        }
    }

    #[test]
    fn cap_holds_under_churn_and_counts_stay_exact() {
        let idx = KvIndex::new(5000);
        let cap = idx.per_shard * idx.shards.len();
        for i in 0..50_000u64 {
            let key = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            idx.store(key, (i % 5) as BackendId, Medium::Gpu);
            if i % 7 == 0 {
                idx.demote(&[key]);
            }
        }
        assert!(
            idx.len() <= cap && idx.len() >= cap * 9 / 10,
            "{}",
            idx.len()
        );
        assert!(idx.evictions() >= 45_000);
        // Slot counts are the bits set.
        let total: u64 = idx
            .backends
            .state
            .iter()
            .map(|s| u64::from(s.0.load(Ordering::Relaxed) as u32))
            .sum();
        assert_eq!(total as usize, idx.len());
        // Memory: the tables as allocated, about 26 bytes per slot at 7/8 load.
        let per_block = idx.bytes() as f64 / idx.len() as f64;
        assert!(per_block < 40.0, "{per_block} B per block");
    }

    #[test]
    fn two_writers_and_a_reader() {
        let idx = std::sync::Arc::new(KvIndex::new(4096));
        let keys =
            BlockKeys { block_size: 4 }.keys(BlockKeys::root(None), &toks(4 * 3000, 1), 3000);
        std::thread::scope(|sc| {
            for b in [10, 11] {
                let (idx, keys) = (idx.clone(), &keys);
                sc.spawn(move || {
                    for round in 0..20 {
                        for &k in keys {
                            idx.store(k, b, Medium::Gpu);
                        }
                        if round % 3 == 0 {
                            idx.demote(&keys[..100]);
                        }
                        for &k in keys.iter().rev().take(1000) {
                            idx.remove(k, b, 1);
                        }
                    }
                    for &k in keys {
                        idx.remove(k, b, 7);
                    }
                });
            }
            let (idx, keys) = (idx.clone(), &keys);
            sc.spawn(move || {
                for _ in 0..2000 {
                    for h in idx.matched(keys, &[10, 11, 12]) {
                        assert!(h.gpu <= h.any && h.any <= keys.len());
                    }
                }
            });
        });
        assert!(idx.is_empty());
        assert!(
            idx.backends
                .state
                .iter()
                .all(|s| s.0.load(Ordering::Relaxed) as u32 == 0)
        );
    }
}
