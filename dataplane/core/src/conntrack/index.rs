//! The conntrack index: an open-addressing hash table (linear probing, backward-shift
//! deletion, load at most 1/2) from a flow key to its slot and direction.
//!
//! Each bucket is 8 bytes: a 32-bit hash tag and the slot (with the direction in its low bit).
//! Keys are not stored here: a tag match is confirmed against the key kept in the flow itself,
//! which a lookup reads anyway (to check expiry). So a bucket line holds 8 buckets, the index
//! costs 32 bytes per flow, and a lookup touches one index line and one flow line.
//!
//! Hand-written rather than hashbrown so a batch can *touch* each key's home bucket before
//! looking any of them up: the touches are independent loads, which an out-of-order CPU
//! overlaps, so at millions of flows a batch pays roughly one memory latency instead of one
//! per packet.

use super::{Dir, FlowKey};

const EMPTY: u64 = u64::MAX;

/// A key's 32-bit hash: its low bits pick the home bucket, all of it is the bucket's tag.
/// Computed once per packet and handed to the prefetch stages and the lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(u32);

/// The secret a table's hashes are keyed with (`ConnTrack::hash`), random per table: the
/// tuples are the sender's to choose, and with a hash anyone can compute, spoofed packets
/// can be made to share one probe run of the index (linear probing), turning every lookup
/// into a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKey(u64, u64);

impl HashKey {
    /// A fresh random key (the process's random source, through ahash).
    pub fn random() -> HashKey {
        let s = ahash::RandomState::new();
        HashKey(s.hash_one(0x5eed_u64), s.hash_one(0x5eed_u64 + 1))
    }

    /// A fixed key, for tests that compare runs.
    pub const FIXED: HashKey = HashKey(0, 0);
}

impl KeyHash {
    /// `keyed` with `HashKey::FIXED`.
    #[inline]
    pub fn of(k: &FlowKey) -> KeyHash {
        Self::keyed(k, HashKey::FIXED)
    }

    /// The key's hash under `key`. Each half of the tuple is offset by a secret and
    /// multiplied before they are combined (multiplication does not distribute over XOR, so
    /// the secrets do not cancel out of a collision), then mixed (murmur3's finalizer).
    #[inline]
    pub fn keyed(k: &FlowKey, key: HashKey) -> KeyHash {
        let a = (u64::from(u32::from(k.src)) << 32) | u64::from(u32::from(k.dst));
        let b = (u64::from(k.sport) << 24) | (u64::from(k.dport) << 8) | u64::from(k.proto);
        let mut h = (a ^ key.0).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (b ^ key.1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        KeyHash((h ^ (h >> 33)) as u32)
    }
}

#[inline]
fn pack(h: KeyHash, slot: u32, dir: Dir) -> u64 {
    (u64::from(h.0) << 32) | (u64::from(slot) << 1) | u64::from(dir == Dir::Reply)
}

#[inline]
fn tag(e: u64) -> u32 {
    (e >> 32) as u32
}

#[inline]
fn unpack(e: u64) -> (u32, Dir) {
    let low = e as u32;
    (low >> 1, if low & 1 == 1 { Dir::Reply } else { Dir::Orig })
}

#[derive(Debug, Clone)]
pub(super) struct Index {
    entries: Vec<u64>,
    mask: usize,
    len: usize,
}

impl Index {
    /// The most slots an index can address (the slot shares 32 bits with the direction).
    pub(super) const MAX_SLOTS: usize = (u32::MAX >> 1) as usize;

    /// Room for `keys` keys at load 1/2 at most.
    pub(super) fn with_capacity(keys: usize) -> Index {
        let n = (keys.max(1) * 2).next_power_of_two();
        let mut entries = Vec::with_capacity(n);
        crate::cpu::advise_huge_pages(&entries);
        entries.resize(n, EMPTY);
        Index { entries, mask: n - 1, len: 0 }
    }

    #[inline]
    fn home(&self, h: KeyHash) -> usize {
        h.0 as usize & self.mask
    }

    /// Where the entry for hash `h` is whose (slot, direction) satisfies `is`: `is` confirms
    /// a tag match against the key stored with the flow.
    #[inline]
    fn find(&self, h: KeyHash, mut is: impl FnMut(u32, Dir) -> bool) -> Option<usize> {
        let mut i = self.home(h);
        loop {
            let e = self.entries[i];
            if e == EMPTY {
                return None;
            }
            if tag(e) == h.0 {
                let (slot, dir) = unpack(e);
                if is(slot, dir) {
                    return Some(i);
                }
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    pub(super) fn get(&self, h: KeyHash, is: impl FnMut(u32, Dir) -> bool) -> Option<(u32, Dir)> {
        self.find(h, is).map(|i| unpack(self.entries[i]))
    }

    /// Prefetches `h`'s home bucket.
    #[inline]
    pub(super) fn prefetch(&self, h: KeyHash) {
        crate::cpu::prefetch(&self.entries[self.home(h)]);
    }

    /// The slot in `h`'s home bucket if its tag matches (the common case: a short probe run).
    /// Only a hint: the key is not confirmed.
    #[inline]
    pub(super) fn home_slot(&self, h: KeyHash) -> Option<u32> {
        let e = self.entries[self.home(h)];
        (e != EMPTY && tag(e) == h.0).then_some(unpack(e).0)
    }

    /// Inserts an entry for a key known to be absent. The caller keeps the load at 1/2 or below.
    pub(super) fn insert(&mut self, h: KeyHash, slot: u32, dir: Dir) {
        let mut i = self.home(h);
        while self.entries[i] != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.entries[i] = pack(h, slot, dir);
        self.len += 1;
    }

    /// Removes the entry (`h`, `slot`, `dir`) if present; later entries of its probe run shift
    /// back (no tombstones). No key is needed: the slot identifies the entry exactly.
    pub(super) fn remove(&mut self, h: KeyHash, slot: u32, dir: Dir) {
        let want = pack(h, slot, dir);
        let Some(mut hole) = self.find(h, |s, d| s == slot && d == dir) else { return };
        debug_assert_eq!(self.entries[hole], want);
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let e = self.entries[j];
            if e == EMPTY {
                break;
            }
            let home = tag(e) as usize & self.mask;
            // Move entry j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = EMPTY;
        self.len -= 1;
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn entry_size() -> usize {
        core::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Tuples a sender picks to share one bucket under a hash it can compute (found here by
    /// brute force, as an attacker would offline) scatter under a table's secret key.
    #[test]
    fn tuples_crafted_to_collide_under_a_known_key_scatter_under_a_secret_one() {
        const MASK: u32 = 0xfff;
        let spoofed = |i: u32| FlowKey {
            proto: 6,
            src: (0x0b00_0000 + (i >> 16)).into(),
            dst: [192, 168, 1, 10].into(),
            sport: i as u16,
            dport: 30080,
        };
        let bucket = |k: &FlowKey, key: HashKey| KeyHash::keyed(k, key).0 & MASK;
        let target = bucket(&spoofed(0), HashKey::FIXED);
        let crafted: Vec<FlowKey> =
            (0..).map(spoofed).filter(|k| bucket(k, HashKey::FIXED) == target).take(64).collect();
        let secret = HashKey::random();
        assert_ne!(secret, HashKey::FIXED);
        let buckets: std::collections::HashSet<u32> = crafted.iter().map(|k| bucket(k, secret)).collect();
        assert!(buckets.len() > 48, "64 crafted tuples fell in {} of 4096 buckets under a secret key", buckets.len());
        assert_eq!(KeyHash::keyed(&crafted[0], secret), KeyHash::keyed(&crafted[0], secret), "stable per key");
    }

    fn key(i: u32) -> FlowKey {
        FlowKey {
            proto: 6,
            src: (0x0af4_0000 + (i >> 4)).into(),
            dst: [10, 96, 0, 1].into(),
            sport: (i & 0xf) as u16,
            dport: 80,
        }
    }

    /// Against std's HashMap: random inserts and removals in a small table (so probe runs wrap
    /// and collide), every key's presence checked after every step. Keys live in a side array
    /// indexed by slot, as flows hold them in the real table.
    #[test]
    fn agrees_with_a_hash_map_under_churn() {
        use proptest::prelude::*;
        proptest!(ProptestConfig { cases: 128, ..ProptestConfig::default() }, |(ops in proptest::collection::vec((any::<bool>(), 0u32..48), 1..400))| {
            let mut ix = Index::with_capacity(32);
            let mut m: HashMap<FlowKey, u32> = HashMap::new();
            for (ins, i) in ops {
                let k = key(i);
                if ins && !m.contains_key(&k) && m.len() < 32 {
                    ix.insert(KeyHash::of(&k), i, Dir::Orig);
                    m.insert(k, i);
                } else if !ins && m.remove(&k).is_some() {
                    ix.remove(KeyHash::of(&k), i, Dir::Orig);
                }
                prop_assert_eq!(ix.len(), m.len());
                for j in 0..48 {
                    let kj = key(j);
                    let got = ix.get(KeyHash::of(&kj), |s, _| key(s) == kj).map(|(s, _)| s);
                    prop_assert_eq!(got, m.get(&kj).copied(), "key {} after op on {}", j, i);
                }
            }
        });
    }

    /// Tags that collide in full (forced here) are told apart by the key check.
    #[test]
    fn equal_tags_are_resolved_by_the_key() {
        let mut ix = Index::with_capacity(8);
        let h = KeyHash(7);
        ix.insert(h, 1, Dir::Orig);
        ix.insert(h, 2, Dir::Reply);
        assert_eq!(ix.get(h, |s, _| s == 2), Some((2, Dir::Reply)));
        assert_eq!(ix.get(h, |s, _| s == 1), Some((1, Dir::Orig)));
        assert_eq!(ix.get(h, |_, _| false), None);
        ix.remove(h, 1, Dir::Orig);
        assert_eq!(ix.get(h, |s, _| s == 2), Some((2, Dir::Reply)));
        assert_eq!(ix.get(h, |s, _| s == 1), None);
    }
}
