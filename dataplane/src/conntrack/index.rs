//! The conntrack index: an open-addressing hash table (linear probing, backward-shift
//! deletion, load at most 1/2) from a flow key to its slot and direction. Hand-written rather
//! than hashbrown so a batch can *touch* each key's home bucket before looking any of them up:
//! the touches are independent loads, which an out-of-order CPU overlaps, so at millions of
//! flows a batch pays roughly one memory latency instead of one per packet.

use super::{Dir, FlowKey};

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: FlowKey,
    slot: u32,
    dir: Dir,
}

#[derive(Debug, Clone)]
pub(super) struct Index {
    entries: Vec<Entry>,
    mask: usize,
    len: usize,
}

fn hash(k: &FlowKey) -> u64 {
    let a = (u64::from(u32::from(k.src)) << 32) | u64::from(u32::from(k.dst));
    let b = (u64::from(k.sport) << 24) | (u64::from(k.dport) << 8) | u64::from(k.proto);
    let mut h = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Index {
    /// Room for `keys` keys at load 1/2 at most.
    pub(super) fn with_capacity(keys: usize) -> Index {
        let n = (keys.max(1) * 2).next_power_of_two();
        let blank = Entry {
            key: FlowKey { proto: 0, src: [0; 4].into(), dst: [0; 4].into(), sport: 0, dport: 0 },
            slot: EMPTY,
            dir: Dir::Orig,
        };
        let mut entries = Vec::with_capacity(n);
        crate::xsk::advise_huge_pages(&entries);
        entries.resize(n, blank);
        Index { entries, mask: n - 1, len: 0 }
    }

    #[inline]
    fn home(&self, k: &FlowKey) -> usize {
        (hash(k) as usize) & self.mask
    }

    #[inline]
    fn find(&self, k: &FlowKey) -> Option<usize> {
        let mut i = self.home(k);
        loop {
            let e = &self.entries[i];
            if e.slot == EMPTY {
                return None;
            }
            if e.key == *k {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    pub(super) fn get(&self, k: &FlowKey) -> Option<(u32, Dir)> {
        self.find(k).map(|i| (self.entries[i].slot, self.entries[i].dir))
    }

    pub(super) fn contains(&self, k: &FlowKey) -> bool {
        self.find(k).is_some()
    }

    /// Prefetches `k`'s home bucket.
    #[inline]
    pub(super) fn prefetch(&self, k: &FlowKey) {
        crate::xsk::prefetch(&self.entries[self.home(k)]);
    }

    /// The slot in `k`'s home bucket if it holds `k` (the common case: a short probe run).
    #[inline]
    pub(super) fn home_slot(&self, k: &FlowKey) -> Option<u32> {
        let e = &self.entries[self.home(k)];
        (e.slot != EMPTY && e.key == *k).then_some(e.slot)
    }

    /// Inserts a key known to be absent. The caller keeps the load at 1/2 or below.
    pub(super) fn insert(&mut self, k: FlowKey, slot: u32, dir: Dir) {
        let mut i = self.home(&k);
        while self.entries[i].slot != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.entries[i] = Entry { key: k, slot, dir };
        self.len += 1;
    }

    /// Removes `k` if present; later entries of its probe run shift back (no tombstones).
    pub(super) fn remove(&mut self, k: &FlowKey) {
        let Some(mut hole) = self.find(k) else { return };
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if self.entries[j].slot == EMPTY {
                break;
            }
            let home = self.home(&self.entries[j].key);
            // Move entry j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.entries[hole] = self.entries[j];
                hole = j;
            }
        }
        self.entries[hole].slot = EMPTY;
        self.len -= 1;
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn entry_size() -> usize {
        core::mem::size_of::<Entry>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
    /// and collide), every key's presence checked after every step.
    #[test]
    fn agrees_with_a_hash_map_under_churn() {
        use proptest::prelude::*;
        proptest!(ProptestConfig { cases: 128, ..ProptestConfig::default() }, |(ops in proptest::collection::vec((any::<bool>(), 0u32..48), 1..400))| {
            let mut ix = Index::with_capacity(32);
            let mut m: HashMap<FlowKey, u32> = HashMap::new();
            for (ins, i) in ops {
                let k = key(i);
                if ins && !m.contains_key(&k) && m.len() < 32 {
                    ix.insert(k, i, Dir::Orig);
                    m.insert(k, i);
                } else if !ins {
                    ix.remove(&k);
                    m.remove(&k);
                }
                prop_assert_eq!(ix.len(), m.len());
                for j in 0..48 {
                    prop_assert_eq!(ix.get(&key(j)).map(|(s, _)| s), m.get(&key(j)).copied(), "key {} after op on {}", j, i);
                }
            }
        });
    }
}
