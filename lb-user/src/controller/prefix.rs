//! The approximate prefix index: which backend has recently been sent which prompt
//! prefix, so a policy can predict cached tokens without asking anyone.
//!
//! A prompt is cut into fixed-size blocks of its *message stream* — each message's role
//! and raw JSON content as the client sent them, in order, for chat requests; `prompt` or
//! the Responses API's `instructions` and `input` otherwise — and each block gets a hash
//! chained over all blocks before it ([`block_hashes`]), so equal hashes mean equal
//! prefixes. Bytes, not tokens: no tokenizer, no `/tokenize` round trip (a token is about
//! 4 bytes of text, so predictions are in ≈ tokens). Agents of a workflow repeat the shared
//! context byte for byte, which is what this sees.
//!
//! The index maps a block hash to the backends it was routed to (at most
//! [`WAYS`], each with when), in a bounded [`Table`] (`routing.prefix_index_blocks`,
//! O(1) per operation): blocks nobody sends again age out first, and the blocks of a
//! workflow that ended (`X-Workflow-End`) are demoted so they go before any live one.
//! A backend's entries older than `routing.prefix_ttl_secs` do not count (the backend
//! has likely evicted them), and neither do those of a backend that was removed. A block
//! sent to more than [`WAYS`] backends within the TTL (a system prompt every client
//! shares) counts as held by every backend: it tells none apart, and tracking who holds
//! it exactly would churn its ways on every request.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use super::table::{Class, Classify, Table};
use crate::model::BackendId;

/// Backends remembered per block.
pub const WAYS: usize = 4;

/// Hashes of the blocks of a message stream, chained: `h[i]` identifies bytes
/// `0..(i + 1) × block`. A final partial block is not hashed (it can't be a shared
/// prefix's full block). At most `max_blocks`.
#[derive(Debug, Clone, Default)]
pub struct BlockHasher {
    block: usize,
    max_blocks: usize,
    cur: u64,
    fill: usize,
    word: u64,
    word_len: u32,
    chain: u64,
    /// The hashes so far.
    pub hashes: Vec<u64>,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl BlockHasher {
    /// Blocks of `block` bytes, at most `max_blocks` of them.
    pub fn new(block: usize, max_blocks: usize) -> Self {
        Self {
            block: block.max(8),
            max_blocks,
            chain: 0x243f_6a88_85a3_08d3,
            ..Self::default()
        }
    }

    /// Feeds bytes of the stream.
    pub fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.hashes.len() < self.max_blocks {
            let room = self.block - self.fill;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            for &b in now {
                self.word |= u64::from(b) << (8 * self.word_len);
                self.word_len += 1;
                if self.word_len == 8 {
                    self.cur = mix(self.cur ^ self.word).wrapping_add(0x9e37_79b9_7f4a_7c15);
                    self.word = 0;
                    self.word_len = 0;
                }
            }
            self.fill += now.len();
            bytes = rest;
            if self.fill == self.block {
                let h = mix(self.cur ^ self.word ^ u64::from(self.word_len));
                self.chain = mix(self.chain ^ h);
                self.hashes.push(self.chain);
                self.cur = 0;
                self.word = 0;
                self.word_len = 0;
                self.fill = 0;
            }
        }
    }

    /// The chained block hashes.
    pub fn finish(self) -> Vec<u64> {
        self.hashes
    }
}

/// Block hashes of one byte string (tests and tools).
pub fn block_hashes(bytes: &[u8], block: usize, max_blocks: usize) -> Vec<u64> {
    let mut h = BlockHasher::new(block, max_blocks);
    h.write(bytes);
    h.finish()
}

/// The number of leading `keys` that satisfy `has`, by binary search: it takes a key
/// satisfied to mean every key before it is too (a chain of blocks is cached or sent
/// prefix first; a hole only shortens the match). O(log n) calls of `has`.
pub fn longest_prefix(keys: &[u64], has: impl Fn(u64) -> bool) -> usize {
    if keys.is_empty() || !has(keys[0]) {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, keys.len());
    // Invariant: keys[..lo] satisfy `has`; keys[..hi + 1] may not.
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if has(keys[mid - 1]) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[derive(Debug, Clone, Copy)]
struct Way {
    backend: BackendId,
    /// Seconds since the index's epoch.
    at: u32,
}

#[derive(Debug)]
struct Entry {
    ways: [Option<Way>; WAYS],
    ended: bool,
    /// When (seconds since the epoch, + 1; 0: never) the block was last sent to a
    /// backend while [`WAYS`] others had it within the TTL: a prefix everyone shares.
    popular: u32,
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

/// The index itself, shared with its writer thread.
#[derive(Debug)]
struct Core {
    table: Table<Entry>,
    block: usize,
    ttl_secs: u32,
    epoch: Instant,
    inserted: AtomicU64,
}

/// Approximate bytes one entry costs (slot, map entry, ways).
pub const ENTRY_BYTES: usize = 88;

impl Core {
    /// An index of at most `max_blocks` blocks of `block` bytes; entries older than
    /// `ttl_secs` are ignored.
    fn new(max_blocks: usize, block: usize, ttl_secs: u64) -> Self {
        Self {
            table: Table::new(max_blocks),
            block,
            ttl_secs: u32::try_from(ttl_secs).unwrap_or(u32::MAX),
            epoch: Instant::now(),
            inserted: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Whether `b` was sent block `hash` at most `max_age` seconds ago — or anyone was,
    /// when the block is popular (sent to more than [`WAYS`] backends within the TTL,
    /// such as a system prompt every client starts with): such a block is taken to be
    /// held by every backend. It tells no backend apart, and remembering who exactly holds
    /// it would only churn its ways and break the match of every longer prefix on the
    /// backends it forgot.
    fn has(&self, hash: u64, b: BackendId, now: u32, max_age: u32) -> bool {
        self.table
            .get(hash, |e| {
                (e.popular > 0 && now.saturating_sub(e.popular - 1) <= max_age)
                    || e.ways
                        .iter()
                        .flatten()
                        .any(|w| w.backend == b && now.saturating_sub(w.at) <= max_age)
            })
            .unwrap_or(false)
    }

    /// The number of leading blocks of `blocks` sent to `b` at most `max_age` seconds
    /// ago (binary search: a backend sent block `i` was sent every block before it,
    /// unless evicted in between, which the search tolerates as a shorter match).
    fn prefix_of(&self, blocks: &[u64], b: BackendId, now: u32, max_age: u32) -> usize {
        longest_prefix(blocks, |h| self.has(h, b, now, max_age))
    }

    /// For each backend, the number of leading blocks of `blocks` it was sent within
    /// the TTL.
    fn matched_blocks(&self, blocks: &[u64], backends: &[BackendId]) -> Vec<usize> {
        let now = self.now();
        backends
            .iter()
            .map(|&b| self.prefix_of(blocks, b, now, self.ttl_secs))
            .collect()
    }

    /// Predicted cached tokens (≈ bytes / 4) per backend.
    fn predicted_tokens(&self, blocks: &[u64], backends: &[BackendId]) -> Vec<f64> {
        self.matched_blocks(blocks, backends)
            .into_iter()
            .map(|n| (n * self.block) as f64 / 4.0)
            .collect()
    }

    /// Records that `blocks` were sent to `backend` (its cache will hold them). The
    /// leading blocks recorded for it within the last eighth of the TTL are left as they
    /// are (a workflow resends its context on every call: only the new tail is written,
    /// and the rest is refreshed — timestamp and recency — every TTL/8).
    fn insert(&self, blocks: &[u64], backend: BackendId) {
        let now = self.now();
        let recent = self.prefix_of(blocks, backend, now, self.ttl_secs / 8);
        let blocks = &blocks[recent..];
        for &h in blocks {
            self.write(h, backend, now);
        }
        self.inserted
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
    }

    /// Records that every block of `blocks` was sent to `backend` now.
    fn write_all(&self, blocks: &[u64], backend: BackendId) {
        let now = self.now();
        for &h in blocks {
            self.write(h, backend, now);
        }
        self.inserted
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
    }

    /// Records that block `h` was sent to `backend` at `now`.
    fn write(&self, h: u64, backend: BackendId, now: u32) {
        let ttl = self.ttl_secs;
        {
            self.table.upsert(
                h,
                || Entry {
                    ways: [None; WAYS],
                    ended: false,
                    popular: 0,
                },
                |e, _| {
                    let Some(e) = e else { return };
                    e.ended = false;
                    let w = Way { backend, at: now };
                    if let Some(slot) = e
                        .ways
                        .iter_mut()
                        .find(|x| x.is_some_and(|x| x.backend == backend))
                    {
                        *slot = Some(w);
                    } else if let Some(slot) = e.ways.iter_mut().find(|x| x.is_none()) {
                        *slot = Some(w);
                    } else if e
                        .ways
                        .iter()
                        .flatten()
                        .all(|x| now.saturating_sub(x.at) <= ttl)
                    {
                        // A (WAYS + 1)th backend within the TTL: popular.
                        e.popular = now.saturating_add(1);
                    } else if let Some(oldest) =
                        e.ways.iter_mut().min_by_key(|x| x.map_or(0, |x| x.at))
                    {
                        *oldest = Some(w);
                    }
                },
            );
        }
    }

    /// The blocks of an ended workflow's last prompt go first when the index is full.
    fn demote(&self, blocks: &[u64]) {
        for &h in blocks {
            self.table.update(h, |e| e.ended = true);
        }
    }
}

/// A write handed to the writer thread.
#[derive(Debug)]
enum Job {
    /// [`Core::insert`]: the blocks not recorded recently.
    Insert(Vec<u64>, BackendId),
    /// These blocks, all of them.
    Write(Vec<u64>, BackendId),
    /// [`Core::demote`].
    Demote(Vec<u64>),
    /// Everything sent before is written: answer.
    Sync(std::sync::mpsc::SyncSender<()>),
}

impl Job {
    /// Does it, on `core`.
    fn apply(self, core: &Core) {
        match self {
            Self::Insert(b, backend) => core.insert(&b, backend),
            Self::Write(b, backend) => core.write_all(&b, backend),
            Self::Demote(b) => core.demote(&b),
            Self::Sync(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Writes queued for the writer thread at most (more are dropped and counted: the
/// index is a hint, and a request never waits for it).
pub const WRITE_QUEUE: usize = 4096;

/// The approximate prefix index: lookups on the caller's thread, writes either there
/// ([`PrefixIndex::new`]) or, in agentlb, on one writer thread ([`PrefixIndex::background`])
/// so that recording a prompt's new blocks — a few cache-missing table inserts per block
/// — never sits on a request's path. A write lands microseconds later; a lookup in
/// between sees the index as it was.
#[derive(Debug)]
pub struct PrefixIndex {
    core: std::sync::Arc<Core>,
    writer: Option<std::sync::mpsc::SyncSender<Job>>,
    dropped: AtomicU64,
}

impl PrefixIndex {
    /// An index of at most `max_blocks` blocks of `block` bytes; entries older than
    /// `ttl_secs` are ignored. Writes happen on the caller's thread.
    pub fn new(max_blocks: usize, block: usize, ttl_secs: u64) -> Self {
        Self {
            core: std::sync::Arc::new(Core::new(max_blocks, block, ttl_secs)),
            writer: None,
            dropped: AtomicU64::new(0),
        }
    }

    /// The same index with its writes done by a thread of its own (it ends when the
    /// index is dropped). Without a thread, writes stay on the caller's.
    pub fn background(mut self) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(WRITE_QUEUE);
        let core = self.core.clone();
        let spawned = std::thread::Builder::new()
            .name("agentlb-prefix".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job.apply(&core);
                }
            });
        match spawned {
            Ok(_) => self.writer = Some(tx),
            Err(e) => tracing::warn!(error = %e, "prefix index writer thread; writing inline"),
        }
        self
    }

    /// Runs `job` on the writer (dropped and counted when its queue is full), or here.
    fn submit(&self, job: Job) {
        let Some(tx) = &self.writer else {
            job.apply(&self.core);
            return;
        };
        if tx.try_send(job).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every write submitted before is in the index (tests, tools).
    pub fn sync(&self) {
        if let Some(tx) = &self.writer {
            let (done, wait) = std::sync::mpsc::sync_channel(1);
            if tx.send(Job::Sync(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Writes dropped because the writer's queue was full.
    pub fn dropped_writes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Block size in bytes.
    pub fn block(&self) -> usize {
        self.core.block
    }

    /// For each backend, the number of leading blocks of `blocks` it was sent within
    /// the TTL.
    pub fn matched_blocks(&self, blocks: &[u64], backends: &[BackendId]) -> Vec<usize> {
        self.core.matched_blocks(blocks, backends)
    }

    /// Predicted cached tokens (≈ bytes / 4) per backend.
    pub fn predicted_tokens(&self, blocks: &[u64], backends: &[BackendId]) -> Vec<f64> {
        self.core.predicted_tokens(blocks, backends)
    }

    /// The tokens `backend` is predicted to hold of `blocks` (as
    /// [`PrefixIndex::predicted_tokens`]), then [`PrefixIndex::insert`] of them.
    pub fn record(&self, blocks: &[u64], backend: BackendId) -> u64 {
        let held = self
            .core
            .prefix_of(blocks, backend, self.core.now(), self.core.ttl_secs);
        self.insert(blocks, backend);
        (held * self.core.block / 4) as u64
    }

    /// [`PrefixIndex::record`] when the caller knows the first `known` blocks were
    /// recorded for `backend` within [`PrefixIndex::refresh_secs`] (a workflow's previous
    /// prompt, which this one extends): they are taken as held and only the blocks after
    /// them are written — no search.
    pub fn record_after(&self, blocks: &[u64], backend: BackendId, known: usize) -> u64 {
        let known = known.min(blocks.len());
        if known < blocks.len() {
            self.submit(Job::Write(blocks[known..].to_vec(), backend));
        }
        (known * self.core.block / 4) as u64
    }

    /// The index's clock: seconds since it was made.
    pub fn clock(&self) -> u32 {
        self.core.now()
    }

    /// How recently a block must have been recorded for a backend not to be written
    /// again (an eighth of the TTL: the timestamps stay fresh).
    pub fn refresh_secs(&self) -> u32 {
        self.core.ttl_secs / 8
    }

    /// Records that `blocks` were sent to `backend` (its cache will hold them). The
    /// leading blocks recorded for it within the last eighth of the TTL are left as they
    /// are (a workflow resends its context on every call: only the new tail is written,
    /// and the rest is refreshed — timestamp and recency — every TTL/8).
    pub fn insert(&self, blocks: &[u64], backend: BackendId) {
        if !blocks.is_empty() {
            self.submit(Job::Insert(blocks.to_vec(), backend));
        }
    }

    /// The blocks of an ended workflow's last prompt go first when the index is full.
    pub fn demote(&self, blocks: &[u64]) {
        if !blocks.is_empty() {
            self.submit(Job::Demote(blocks.to_vec()));
        }
    }

    /// Blocks stored.
    pub fn len(&self) -> usize {
        self.core.table.len()
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
        self.core.table.evictions()
    }

    /// Blocks written so far.
    pub fn inserted(&self) -> u64 {
        self.core.inserted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_hash_alike_and_any_difference_changes_every_later_block() {
        let a = b"x".repeat(1000);
        let mut b = a.clone();
        b[500] = b'y';
        let ha = block_hashes(&a, 128, 100);
        let hb = block_hashes(&b, 128, 100);
        assert_eq!(ha.len(), 7, "1000 / 128 full blocks");
        assert_eq!(ha[..3], hb[..3]);
        assert!(ha[3..].iter().zip(&hb[3..]).all(|(x, y)| x != y));
        // Fed in pieces: the same hashes.
        let mut h = BlockHasher::new(128, 100);
        for piece in a.chunks(37) {
            h.write(piece);
        }
        assert_eq!(h.finish(), ha);
        assert_eq!(block_hashes(&a, 128, 3).len(), 3, "bounded");
    }

    #[test]
    fn matches_the_longest_prefix_per_backend() {
        let idx = PrefixIndex::new(1000, 128, 600);
        let shared = b"s".repeat(128 * 4);
        let mut one = shared.clone();
        one.extend(b"1".repeat(128 * 6));
        let mut two = shared.clone();
        two.extend(b"2".repeat(128 * 2));
        idx.insert(&block_hashes(&one, 128, 100), 0);
        idx.insert(&block_hashes(&two, 128, 100), 1);
        let mut q = one.clone();
        q.extend(b"new".repeat(100));
        let blocks = block_hashes(&q, 128, 100);
        assert_eq!(idx.matched_blocks(&blocks, &[0, 1, 2]), vec![10, 4, 0]);
        assert_eq!(idx.predicted_tokens(&blocks, &[0])[0], 320.0);
    }

    #[test]
    fn a_prefix_shared_by_many_backends_is_held_by_all_and_longer_matches_survive() {
        let idx = PrefixIndex::new(10_000, 128, 600);
        let shared = b"s".repeat(128 * 4);
        // Six backends each get the shared prefix plus their own workflow's blocks.
        let prompts: Vec<Vec<u64>> = (0..6u8)
            .map(|b| {
                let mut p = shared.clone();
                p.extend(vec![b'a' + b; 128 * 3]);
                block_hashes(&p, 128, 100)
            })
            .collect();
        for (b, p) in prompts.iter().enumerate() {
            idx.insert(p, b as BackendId);
        }
        // Every backend still matches its own whole prompt (with 4 ways and no
        // popularity, the first backends would have lost the shared blocks, and with
        // them every longer match)...
        for (b, p) in prompts.iter().enumerate() {
            assert_eq!(
                idx.matched_blocks(p, &[b as BackendId]),
                vec![7],
                "backend {b}"
            );
        }
        // ...another's prompt only up to the shared prefix, and so does a backend
        // never sent anything: the shared blocks tell no backend apart.
        assert_eq!(idx.matched_blocks(&prompts[0], &[1, 9]), vec![4, 4]);
        // Sending them again writes nothing new.
        let before = idx.inserted();
        idx.insert(&prompts[2], 2);
        assert_eq!(idx.inserted(), before);
    }

    #[test]
    fn the_writer_thread_writes_what_the_inline_index_writes() {
        let inline = PrefixIndex::new(1000, 128, 600);
        let threaded = PrefixIndex::new(1000, 128, 600).background();
        let a = block_hashes(&b"a".repeat(128 * 6), 128, 100);
        let b = block_hashes(&b"b".repeat(128 * 3), 128, 100);
        for ix in [&inline, &threaded] {
            assert_eq!(ix.record(&a, 1), 0);
            ix.record_after(&a, 2, 2);
            ix.insert(&b, 3);
            ix.demote(&b);
            ix.sync();
        }
        for ix in [&inline, &threaded] {
            assert_eq!(ix.matched_blocks(&a, &[1, 2, 3]), vec![6, 0, 0]);
            assert_eq!(ix.matched_blocks(&b, &[3]), vec![3]);
            assert_eq!(ix.len(), 9);
            assert_eq!(ix.inserted(), 6 + 4 + 3);
            assert_eq!(ix.dropped_writes(), 0);
        }
        // A call that extends what was recorded finds it held.
        threaded.sync();
        assert_eq!(threaded.record(&a, 1), (6 * 128 / 4) as u64);
    }

    #[test]
    fn bounded_with_ended_blocks_first() {
        let idx = PrefixIndex::new(8, 16, 600);
        let a = block_hashes(&b"a".repeat(64), 16, 100);
        let b = block_hashes(&b"b".repeat(64), 16, 100);
        idx.insert(&a, 0);
        idx.insert(&b, 0);
        idx.demote(&b);
        idx.insert(&block_hashes(&b"c".repeat(64), 16, 100), 0);
        assert_eq!(idx.len(), 8);
        assert_eq!(idx.matched_blocks(&a, &[0]), vec![4], "live blocks kept");
        assert_eq!(
            idx.matched_blocks(&b, &[0]),
            vec![0],
            "ended blocks went first"
        );
        assert_eq!(idx.evictions(), 4);
    }
}
