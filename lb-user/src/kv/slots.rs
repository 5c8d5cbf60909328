//! A compact open-addressing map from 64-bit keys to small `Copy` values, with one meta
//! byte per slot: the storage of the KV block index ([`super::index`]) and of each
//! source's view ([`super::subscriber::SourceView`]).
//!
//! - **Layout**: buckets of [`WIDTH`] slots, each bucket its keys, its values and its
//!   meta bytes side by side (no per-entry heap allocation, no pointer). A meta byte is 0
//!   for an empty slot; otherwise [`OCCUPIED`] plus seven bits the owner uses (the index:
//!   CLOCK reference and "ended"; the view: media).
//! - **Probing**: a key's home bucket comes from its multiplied bits (keys may be
//!   sequential, as the engines' hashes are in tests); it is stored in the first bucket
//!   from there with a free slot. Each bucket counts the entries that passed it full on
//!   their way further (`over`, as in Folly's F14): a lookup stops at the first bucket
//!   with none, so a missing key costs one bucket in most cases, and removal needs no
//!   tombstone (it decrements the counts on the way back to the home bucket).
//! - **Size**: the bucket count grows by doubling while the table is at most 7/8 full,
//!   and never beyond what `limit` entries need at 7/8 (not a power of two: the home
//!   bucket is a multiply-shift range reduction). Memory is therefore bounded by
//!   `limit`, and a table that filled up to its limit spends 8/7 slots per entry.

/// Slots per bucket.
pub(super) const WIDTH: usize = 8;
/// Entries per bucket, at most, before the table grows (7 of 8: 87.5 % load).
const LOAD: usize = 7;
/// Meta bit of an occupied slot.
pub(super) const OCCUPIED: u8 = 0x80;

#[derive(Clone, Copy)]
#[repr(C)]
struct Bucket<V> {
    keys: [u64; WIDTH],
    vals: [V; WIDTH],
    meta: [u8; WIDTH],
    /// Entries whose home bucket is before this one and which are stored after it.
    over: u32,
}

/// The map. Positions (`usize`) name a slot until the next insertion or removal.
pub(super) struct Slots<V> {
    buckets: Vec<Bucket<V>>,
    len: usize,
    /// Buckets `limit` entries need.
    max_buckets: usize,
}

fn spread(k: u64) -> u64 {
    (k ^ (k >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl<V: Copy + Default> Slots<V> {
    /// An empty map (nothing allocated) that will hold up to `limit` entries.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            buckets: Vec::new(),
            len: 0,
            max_buckets: limit.div_ceil(LOAD).max(1),
        }
    }

    fn empty() -> Bucket<V> {
        Bucket {
            keys: [0; WIDTH],
            vals: [V::default(); WIDTH],
            meta: [0; WIDTH],
            over: 0,
        }
    }

    /// Entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Slots allocated (positions are `0..slots()`).
    pub(super) fn slots(&self) -> usize {
        self.buckets.len() * WIDTH
    }

    /// Heap bytes.
    pub(super) fn bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Bucket<V>>()
    }

    fn home(&self, key: u64) -> usize {
        ((u128::from(spread(key)) * self.buckets.len() as u128) >> 64) as usize
    }

    /// Where `key` is.
    #[inline]
    pub(super) fn find(&self, key: u64) -> Option<usize> {
        let n = self.buckets.len();
        if self.len == 0 {
            return None;
        }
        let mut i = self.home(key);
        for _ in 0..n {
            let b = &self.buckets[i];
            // Branch-free over the bucket (the compiler vectorizes the comparisons).
            let mut hit = 0u32;
            for j in 0..WIDTH {
                hit |= u32::from(b.keys[j] == key && b.meta[j] != 0) << j;
            }
            if hit != 0 {
                return Some(i * WIDTH + hit.trailing_zeros() as usize);
            }
            if b.over == 0 {
                return None;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        None
    }

    /// The key at `pos`.
    #[cfg(test)]
    pub(super) fn key(&self, pos: usize) -> u64 {
        self.buckets[pos / WIDTH].keys[pos % WIDTH]
    }

    /// The value at `pos`.
    pub(super) fn val(&self, pos: usize) -> V {
        self.buckets[pos / WIDTH].vals[pos % WIDTH]
    }

    /// The value at `pos`, to change.
    pub(super) fn val_mut(&mut self, pos: usize) -> &mut V {
        &mut self.buckets[pos / WIDTH].vals[pos % WIDTH]
    }

    /// The meta byte at `pos` (0: empty).
    pub(super) fn meta(&self, pos: usize) -> u8 {
        self.buckets[pos / WIDTH].meta[pos % WIDTH]
    }

    /// Sets the owner's bits of the meta byte at `pos` (an occupied slot stays occupied).
    pub(super) fn set_meta(&mut self, pos: usize, meta: u8) {
        self.buckets[pos / WIDTH].meta[pos % WIDTH] = meta | OCCUPIED;
    }

    fn grow(&mut self, to: usize) {
        let old = std::mem::replace(&mut self.buckets, vec![Self::empty(); to]);
        self.len = 0;
        for b in &old {
            for j in 0..WIDTH {
                if b.meta[j] != 0 {
                    self.place(b.keys[j], b.vals[j], b.meta[j]);
                }
            }
        }
    }

    fn place(&mut self, key: u64, val: V, meta: u8) -> usize {
        let n = self.buckets.len();
        let mut i = self.home(key);
        loop {
            let b = &mut self.buckets[i];
            if let Some(j) = b.meta.iter().position(|&m| m == 0) {
                b.keys[j] = key;
                b.vals[j] = val;
                b.meta[j] = meta | OCCUPIED;
                self.len += 1;
                return i * WIDTH + j;
            }
            b.over = b.over.saturating_add(1);
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    /// Inserts `key`, which must not be there, and returns where. Grows first when the
    /// table is 7/8 full (past `limit` the table keeps its size while a slot is free:
    /// callers bound what they insert).
    pub(super) fn insert(&mut self, key: u64, val: V, meta: u8) -> usize {
        let n = self.buckets.len();
        if self.len + 1 > n * LOAD {
            if n < self.max_buckets {
                self.grow((n * 2).clamp(1, self.max_buckets));
            } else if self.len + 1 >= n * WIDTH {
                // Beyond the limit and (nearly) full: never loop without a free slot.
                self.grow((n * 2).max(1));
            }
        }
        self.place(key, val, meta)
    }

    /// Removes the entry at `pos`: its key, value and meta byte.
    pub(super) fn remove_at(&mut self, pos: usize) -> (u64, V, u8) {
        let (bi, j) = (pos / WIDTH, pos % WIDTH);
        let key = self.buckets[bi].keys[j];
        let val = self.buckets[bi].vals[j];
        let meta = std::mem::take(&mut self.buckets[bi].meta[j]);
        self.len -= 1;
        let n = self.buckets.len();
        let mut i = self.home(key);
        while i != bi {
            let o = &mut self.buckets[i].over;
            // A saturated count stays (lookups then always go on past it).
            if *o != u32::MAX {
                *o -= 1;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        (key, val, meta)
    }

    /// Calls `f` on every entry and empties the map (the allocation stays).
    pub(super) fn drain(&mut self, mut f: impl FnMut(u64, V, u8)) {
        for b in &mut self.buckets {
            for j in 0..WIDTH {
                if b.meta[j] != 0 {
                    f(b.keys[j], b.vals[j], b.meta[j]);
                }
            }
            *b = Self::empty();
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove_over_growth_and_sequential_keys() {
        let mut s: Slots<u64> = Slots::new(10_000);
        for k in 0..10_000u64 {
            assert_eq!(s.find(k), None);
            let p = s.insert(k, k * 3, (k % 8) as u8);
            assert_eq!((s.key(p), s.val(p)), (k, k * 3));
        }
        assert_eq!(s.len(), 10_000);
        assert_eq!(
            s.slots(),
            10_000usize.div_ceil(LOAD) * WIDTH,
            "grown to the limit, no further"
        );
        for k in (0..10_000u64).step_by(2) {
            let p = s.find(k).expect("held");
            assert_eq!(s.meta(p), OCCUPIED | (k % 8) as u8);
            assert_eq!(s.remove_at(p), (k, k * 3, OCCUPIED | (k % 8) as u8));
        }
        for k in 0..10_000u64 {
            assert_eq!(s.find(k).map(|p| s.val(p)), (k % 2 == 1).then_some(k * 3));
        }
        // Every overflow count went back to what the remaining entries need.
        for k in (0..10_000u64).step_by(2) {
            s.insert(k, k, 0);
        }
        let mut n = 0;
        s.drain(|k, v, _| {
            assert!(v == k || v == k * 3);
            n += 1;
        });
        assert_eq!((n, s.len()), (10_000, 0));
        assert!(s.buckets.iter().all(|b| b.over == 0));
        assert_eq!(s.find(1), None);
    }

    #[test]
    fn overflow_counts_return_to_zero() {
        let mut s: Slots<u64> = Slots::new(64);
        let keys: Vec<u64> = (0..64u64)
            .map(|i| i.wrapping_mul(0x1234_5678_9abc))
            .collect();
        for &k in &keys {
            s.insert(k, 0, 0);
        }
        for &k in &keys {
            let p = s.find(k).expect("held");
            s.remove_at(p);
        }
        assert!(
            s.buckets
                .iter()
                .all(|b| b.over == 0 && b.meta == [0; WIDTH])
        );
    }
}
