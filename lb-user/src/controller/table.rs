//! A bounded, sharded map from 64-bit keys to entries, with O(1) eviction by class.
//!
//! The workflow table, the lineage map and the Responses owner map are all this shape: a
//! key that is already a hash (of a workflow id, a request id, a response id), an entry,
//! a hard bound on the number of entries, and an eviction order that is not plain LRU:
//! entries of ended workflows go before idle ones, and entries with requests in flight
//! are never evicted. The `lru` crate has neither classes nor pinning, so each shard is a
//! slab of slots with an intrusive doubly linked list per class (u32 links, 8 bytes per
//! entry): every operation — insert, touch, reclassify, evict, remove — is O(1), and
//! expiry walks only the stale tail of each list.
//!
//! Sharding keeps the request path off any global lock: an operation locks the one shard
//! its key falls in (the shard count grows with the capacity, up to 64), for a few hundred
//! nanoseconds. Recency is per shard, so eviction is LRU within a shard, which over
//! uniformly hashed keys is LRU in all but name.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

/// Where an entry stands in the eviction order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Never evicted or expired (e.g. requests in flight).
    Pinned,
    /// Evicted before any [`Class::Idle`] entry (e.g. an ended workflow).
    Ended,
    /// Evicted least recently used first.
    Idle,
}

impl Class {
    fn list(self) -> Option<usize> {
        match self {
            Self::Pinned => None,
            Self::Ended => Some(0),
            Self::Idle => Some(1),
        }
    }
}

/// An entry that knows its eviction class.
pub trait Classify {
    /// The entry's class now.
    fn class(&self) -> Class;
}

const NIL: u32 = u32::MAX;

/// Keys are hashes already: the map uses them as they are.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Slot<V> {
    key: u64,
    prev: u32,
    next: u32,
    list: u8,
    val: Option<V>,
}

struct Shard<V> {
    map: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot<V>>,
    free: u32,
    head: [u32; 2],
    tail: [u32; 2],
}

const NO_LIST: u8 = u8::MAX;

impl<V: Classify> Shard<V> {
    fn new() -> Self {
        Self {
            map: HashMap::default(),
            slots: Vec::new(),
            free: NIL,
            head: [NIL; 2],
            tail: [NIL; 2],
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, list) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next, s.list)
        };
        if list == NO_LIST {
            return;
        }
        let l = list as usize;
        if prev == NIL {
            self.head[l] = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail[l] = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let s = &mut self.slots[i as usize];
        s.prev = NIL;
        s.next = NIL;
        s.list = NO_LIST;
    }

    /// Links slot `i` at the head (most recent end) of the list its entry's class names.
    fn link(&mut self, i: u32) {
        let Some(l) = self.slots[i as usize]
            .val
            .as_ref()
            .and_then(|v| v.class().list())
        else {
            return;
        };
        let old = self.head[l];
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
            s.list = l as u8;
        }
        if old == NIL {
            self.tail[l] = i;
        } else {
            self.slots[old as usize].prev = i;
        }
        self.head[l] = i;
    }

    fn relink(&mut self, i: u32) {
        self.unlink(i);
        self.link(i);
    }

    fn release(&mut self, i: u32) -> Option<V> {
        self.unlink(i);
        let s = &mut self.slots[i as usize];
        self.map.remove(&s.key);
        let v = s.val.take();
        s.next = self.free;
        self.free = i;
        v
    }

    /// Evicts the least recent entry of the first non-empty class; `None` when every entry
    /// is pinned.
    fn evict_one(&mut self) -> Option<V> {
        for l in 0..2 {
            let t = self.tail[l];
            if t != NIL {
                return self.release(t);
            }
        }
        None
    }

    fn alloc(&mut self, key: u64, val: V) -> u32 {
        let slot = Slot {
            key,
            prev: NIL,
            next: NIL,
            list: NO_LIST,
            val: Some(val),
        };
        let i = if self.free == NIL {
            self.slots.push(slot);
            u32::try_from(self.slots.len() - 1).unwrap_or(NIL)
        } else {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        };
        self.map.insert(key, i);
        i
    }
}

/// What [`Table::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// The entry existed.
    Found,
    /// A new entry was inserted.
    Inserted,
    /// A new entry was inserted after evicting another one.
    Evicted,
    /// The table was full of pinned entries: nothing was stored.
    Full,
}

/// The bounded sharded map.
pub struct Table<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    per_shard: usize,
    evictions: AtomicU64,
}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .finish()
    }
}

impl<V: Classify> Table<V> {
    /// A table of at most `max` entries (rounded up to a multiple of the shard count).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        // One shard per 1,024 entries, a power of two, at most 64: small tables keep an
        // exact global LRU.
        let n = (max / 1024).clamp(1, 64).next_power_of_two().min(64);
        Self {
            shards: (0..n).map(|_| Mutex::new(Shard::new())).collect(),
            per_shard: max.div_ceil(n),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Shard<V>> {
        // High bits pick the shard; the map uses the whole key.
        let i = ((key >> 58) as usize) & (self.shards.len() - 1);
        self.shards[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the entry of `key`, inserting `insert()` first when there is none
    /// (evicting one entry when the shard is full); the entry becomes the most recent of
    /// its class afterwards. `f` gets `None` only when the table is full of pinned
    /// entries.
    pub fn upsert<R>(
        &self,
        key: u64,
        insert: impl FnOnce() -> V,
        f: impl FnOnce(Option<&mut V>, Upsert) -> R,
    ) -> R {
        self.upsert_evicting(key, insert, f, drop)
    }

    /// [`Table::upsert`], handing an entry evicted to make room to `evicted`.
    pub fn upsert_evicting<R>(
        &self,
        key: u64,
        insert: impl FnOnce() -> V,
        f: impl FnOnce(Option<&mut V>, Upsert) -> R,
        evicted: impl FnOnce(V),
    ) -> R {
        let mut s = self.shard(key);
        let (i, how) = match s.map.get(&key) {
            Some(&i) => (i, Upsert::Found),
            None => {
                let mut how = Upsert::Inserted;
                if s.map.len() >= self.per_shard {
                    let Some(old) = s.evict_one() else {
                        return f(None, Upsert::Full);
                    };
                    evicted(old);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    how = Upsert::Evicted;
                }
                (s.alloc(key, insert()), how)
            }
        };
        let r = f(s.slots[i as usize].val.as_mut(), how);
        s.relink(i);
        r
    }

    /// Runs `f` on an existing entry (which becomes the most recent of its class).
    pub fn update<R>(&self, key: u64, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let mut s = self.shard(key);
        let i = *s.map.get(&key)?;
        let r = s.slots[i as usize].val.as_mut().map(f);
        s.relink(i);
        r
    }

    /// Reads an entry without changing its recency.
    pub fn get<R>(&self, key: u64, f: impl FnOnce(&V) -> R) -> Option<R> {
        let s = self.shard(key);
        let i = *s.map.get(&key)?;
        s.slots[i as usize].val.as_ref().map(f)
    }

    /// Removes an entry.
    pub fn remove(&self, key: u64) -> Option<V> {
        let mut s = self.shard(key);
        let i = *s.map.get(&key)?;
        s.release(i)
    }

    /// Removes the least recent entries of each class for which `stale` holds, stopping at
    /// the first that is not (lists are in recency order, so this costs what it removes).
    pub fn expire(&self, stale: impl Fn(&V) -> bool, mut gone: impl FnMut(V)) -> usize {
        let mut n = 0;
        for sh in self.shards.iter() {
            let mut s = sh.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for l in 0..2 {
                loop {
                    let t = s.tail[l];
                    if t == NIL || !s.slots[t as usize].val.as_ref().is_some_and(&stale) {
                        break;
                    }
                    if let Some(v) = s.release(t) {
                        gone(v);
                    }
                    n += 1;
                }
            }
        }
        n
    }

    /// Entries stored.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .map
                    .len()
            })
            .sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted to make room, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Calls `f` on every entry, one shard locked at a time (admin listings, metrics).
    pub fn for_each(&self, mut f: impl FnMut(&V)) {
        for sh in self.shards.iter() {
            let s = sh.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for slot in &s.slots {
                if let Some(v) = &slot.val {
                    f(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E {
        class: Class,
        n: u32,
    }

    impl Classify for E {
        fn class(&self) -> Class {
            self.class
        }
    }

    fn put(t: &Table<E>, k: u64, class: Class) -> Upsert {
        t.upsert(
            k,
            || E { class, n: 0 },
            |e, how| {
                if let Some(e) = e {
                    e.class = class;
                    e.n += 1;
                }
                how
            },
        )
    }

    #[test]
    fn evicts_ended_first_then_least_recent_idle_never_pinned() {
        let t = Table::new(4);
        put(&t, 1, Class::Idle);
        put(&t, 2, Class::Pinned);
        put(&t, 3, Class::Ended);
        put(&t, 4, Class::Idle);
        // Full: the ended entry goes first.
        assert_eq!(put(&t, 5, Class::Idle), Upsert::Evicted);
        assert!(t.get(3, |_| ()).is_none());
        // Then the least recent idle one: 1, not 4 (touched) and never 2 (pinned).
        t.update(1, |_| ());
        assert_eq!(put(&t, 6, Class::Idle), Upsert::Evicted);
        assert!(t.get(4, |_| ()).is_none());
        assert!(t.get(1, |_| ()).is_some());
        assert_eq!(put(&t, 7, Class::Idle), Upsert::Evicted);
        assert!(t.get(5, |_| ()).is_none());
        assert!(
            t.get(2, |_| ()).is_some(),
            "a pinned entry is never evicted"
        );
        assert_eq!(t.len(), 4);
        assert_eq!(t.evictions(), 3);
    }

    #[test]
    fn full_of_pinned_entries_stores_nothing() {
        let t = Table::new(2);
        put(&t, 1, Class::Pinned);
        put(&t, 2, Class::Pinned);
        assert_eq!(put(&t, 3, Class::Idle), Upsert::Full);
        assert_eq!(t.len(), 2);
        // Unpinning makes room again.
        t.update(1, |e| e.class = Class::Idle);
        assert_eq!(put(&t, 3, Class::Idle), Upsert::Evicted);
        assert!(t.get(1, |_| ()).is_none());
    }

    #[test]
    fn expire_removes_only_the_stale_tail() {
        let t = Table::new(100);
        for k in 0..10 {
            put(
                &t,
                k,
                if k % 2 == 0 {
                    Class::Idle
                } else {
                    Class::Ended
                },
            );
        }
        // Touch 5..10 again: their count is 2 and they are the most recent.
        for k in 5..10 {
            put(
                &t,
                k,
                if k % 2 == 0 {
                    Class::Idle
                } else {
                    Class::Ended
                },
            );
        }
        put(&t, 100, Class::Pinned);
        assert_eq!(t.expire(|e| e.n == 1, drop), 5);
        assert_eq!(t.len(), 6);
        for k in 0..5 {
            assert!(t.get(k, |_| ()).is_none());
        }
        assert!(t.get(100, |_| ()).is_some(), "pinned entries never expire");
    }

    #[test]
    fn slots_are_reused_and_remove_works() {
        let t = Table::new(8);
        for round in 0..100u64 {
            for k in 0..8 {
                put(&t, round * 8 + k, Class::Idle);
            }
        }
        assert_eq!(t.len(), 8);
        let cap = t.shard(0).slots.len();
        assert_eq!(cap, 8, "evicted slots are reused");
        assert!(t.remove(99 * 8).is_some());
        assert!(t.remove(99 * 8).is_none());
        assert_eq!(t.len(), 7);
    }

    #[test]
    fn large_tables_shard_and_stay_bounded() {
        let t = Table::new(100_000);
        assert_eq!(t.shards.len(), 64);
        let mut k = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300_000 {
            k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            put(&t, k, Class::Idle);
        }
        assert!(t.len() <= 64 * 100_000usize.div_ceil(64));
        assert!(t.len() > 90_000, "{}", t.len());
    }

    /// Property: under any sequence of inserts, touches, class changes and removals the
    /// table holds exactly what a reference model says — evicting the least recently
    /// used ended entry, else the least recently used idle one, never a pinned one.
    #[test]
    fn matches_a_reference_model_under_random_operations() {
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for round in 0..200 {
            let cap = 1 + (next() % 12) as usize;
            let t: Table<E> = Table::new(cap);
            // Model: key -> (class, last use tick).
            let mut model: Vec<(u64, Class, u64)> = Vec::new();
            let mut tick = 0u64;
            for _ in 0..300 {
                tick += 1;
                let key = next() % 24;
                let class = match next() % 3 {
                    0 => Class::Pinned,
                    1 => Class::Ended,
                    _ => Class::Idle,
                };
                match next() % 4 {
                    0 | 1 => {
                        let how = put(&t, key, class);
                        if let Some(m) = model.iter_mut().find(|m| m.0 == key) {
                            assert_eq!(how, Upsert::Found);
                            *m = (key, class, tick);
                        } else if model.len() < cap {
                            assert_eq!(how, Upsert::Inserted);
                            model.push((key, class, tick));
                        } else {
                            let victim = [Class::Ended, Class::Idle].iter().find_map(|c| {
                                model
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, m)| m.1 == *c)
                                    .min_by_key(|(_, m)| m.2)
                                    .map(|(i, _)| i)
                            });
                            match victim {
                                Some(i) => {
                                    assert_eq!(how, Upsert::Evicted, "round {round}");
                                    model.remove(i);
                                    model.push((key, class, tick));
                                }
                                None => assert_eq!(how, Upsert::Full, "round {round}"),
                            }
                        }
                    }
                    2 => {
                        let found = t.update(key, |e| e.class = class).is_some();
                        let m = model.iter_mut().find(|m| m.0 == key);
                        assert_eq!(found, m.is_some());
                        if let Some(m) = m {
                            *m = (key, class, tick);
                        }
                    }
                    _ => {
                        let removed = t.remove(key).is_some();
                        let before = model.len();
                        model.retain(|m| m.0 != key);
                        assert_eq!(removed, model.len() < before);
                    }
                }
                assert_eq!(t.len(), model.len(), "round {round}");
                for m in &model {
                    assert!(t.get(m.0, |_| ()).is_some(), "round {round}: lost {}", m.0);
                }
            }
        }
    }
}
