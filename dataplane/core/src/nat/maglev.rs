//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for backend selection: every node
//! builds the same lookup table from the same backend list, so every node picks the same
//! backend for a flow, and a change in the backend set moves few flows.
//!
//! The table size M is prime (16381 by default); each backend fills slots following its own
//! permutation `(offset + j * skip) mod M`, taking turns, until every slot is owned. Backends are
//! identified by a stable key (their address and port), so the table does not depend on the
//! order backends are listed in.

/// Default table size: a prime comfortably above 100x the backends of a large Service.
pub const DEFAULT_TABLE_SIZE: usize = 16381;

/// The primes table sizes are chosen from, each about twice the one before.
pub const SIZE_LADDER: [usize; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// The table size for `backends` backends: the smallest size of the ladder that is at least
/// 100x the backends (the paper's bound for a balance within about 1%), at most `max` (itself
/// used when no rung fits). Every node derives the same size from the same backend count, so
/// they still agree; the size changes only when the count crosses a rung (3, 6, 11, 21, 41,
/// 82, ... backends), and only then does a membership change reshuffle more than its share.
/// This keeps tables small where most Services are (a few endpoints: 1021 slots, not 16381),
/// which makes compiling 10,000 Services fast and their tables 16x smaller.
pub fn size_for(backends: usize, max: usize) -> usize {
    SIZE_LADDER.iter().copied().find(|&m| m >= backends.saturating_mul(100) && m <= max).unwrap_or(max)
}

fn hash64(key: &[u8], seed: u64) -> u64 {
    // FNV-1a then a murmur3 finalizer: stable across processes and versions (no random state).
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// A built lookup table: slot -> index into the backend list it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table for backends identified by `keys` (e.g. `ip:port` bytes). `size` must
    /// be prime. An empty backend list gives an empty table (lookups return `None`).
    pub fn build<K: AsRef<[u8]>>(keys: &[K], size: usize) -> Result<Maglev, String> {
        if !is_prime(size) {
            return Err(format!("maglev table size {size} is not prime"));
        }
        let n = keys.len();
        if n == 0 {
            return Ok(Maglev { table: Vec::new() });
        }
        let m = size as u64;
        // Turns are taken in key order, so every node builds the same table whatever order its
        // endpoint list came in; slots store the caller's index.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| keys[a].as_ref().cmp(keys[b].as_ref()));
        let perms: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| &keys[i])
            .map(|k| {
                let offset = hash64(k.as_ref(), 0x6d61_676c) % m;
                let skip = hash64(k.as_ref(), 0x6576_0000) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        // Each backend's next candidate slot; advancing a permutation is one add and one
        // conditional subtract (offset < M, skip < M), no multiply or modulo per slot.
        let mut pos: Vec<u32> = perms.iter().map(|&(offset, _)| offset as u32).collect();
        let skips: Vec<u32> = perms.iter().map(|&(_, skip)| skip as u32).collect();
        let m32 = size as u32;
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        'outer: loop {
            for i in 0..n {
                let mut c = pos[i];
                while table[c as usize] != u32::MAX {
                    c += skips[i];
                    if c >= m32 {
                        c -= m32;
                    }
                }
                table[c as usize] = order[i] as u32;
                c += skips[i];
                if c >= m32 {
                    c -= m32;
                }
                pos[i] = c;
                filled += 1;
                if filled == size {
                    break 'outer;
                }
            }
        }
        Ok(Maglev { table })
    }

    /// The backend index for a flow hash.
    #[inline]
    pub fn lookup(&self, flow_hash: u64) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(flow_hash % self.table.len() as u64) as usize])
    }

    pub fn size(&self) -> usize {
        self.table.len()
    }

    /// Slots per backend index (for balance checks).
    pub fn shares(&self, backends: usize) -> Vec<usize> {
        let mut v = vec![0; backends];
        for &b in &self.table {
            if let Some(s) = v.get_mut(b as usize) {
                *s += 1;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 2)).collect()
    }

    #[test]
    fn every_backend_gets_a_near_equal_share() {
        for n in [1usize, 2, 3, 10, 100] {
            let t = Maglev::build(&keys(n), DEFAULT_TABLE_SIZE).unwrap();
            let shares = t.shares(n);
            let ideal = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for (i, s) in shares.iter().enumerate() {
                let dev = (*s as f64 - ideal).abs() / ideal;
                assert!(dev < 0.02 || n == 1, "{n} backends: backend {i} has {s} slots, ideal {ideal:.0}");
            }
        }
    }

    #[test]
    fn the_table_does_not_depend_on_list_order() {
        let k = keys(10);
        let mut r = k.clone();
        r.reverse();
        let a = Maglev::build(&k, 251).unwrap();
        let b = Maglev::build(&r, 251).unwrap();
        for h in 0..251u64 {
            assert_eq!(k[a.lookup(h).unwrap() as usize], r[b.lookup(h).unwrap() as usize]);
        }
    }

    #[test]
    fn removing_one_of_ten_backends_moves_few_other_flows() {
        let k = keys(10);
        let before = Maglev::build(&k, DEFAULT_TABLE_SIZE).unwrap();
        let fewer: Vec<String> = k.iter().filter(|s| *s != &k[3]).cloned().collect();
        let after = Maglev::build(&fewer, DEFAULT_TABLE_SIZE).unwrap();
        let mut moved = 0;
        let mut kept_on_others = 0;
        for h in 0..DEFAULT_TABLE_SIZE as u64 {
            let was = &k[before.lookup(h).unwrap() as usize];
            let now = &fewer[after.lookup(h).unwrap() as usize];
            if was != &k[3] {
                kept_on_others += 1;
                if was != now {
                    moved += 1;
                }
            }
        }
        // Only flows of the removed backend must move; Maglev moves a few percent of the rest.
        let frac = moved as f64 / kept_on_others as f64;
        assert!(frac < 0.05, "{:.1}% of unaffected flows moved", frac * 100.0);
    }

    #[test]
    fn size_follows_the_ladder_within_the_maximum() {
        assert!(SIZE_LADDER.iter().all(|&m| is_prime(m)));
        assert_eq!(size_for(1, DEFAULT_TABLE_SIZE), 251);
        assert_eq!(size_for(10, DEFAULT_TABLE_SIZE), 1021);
        assert_eq!(size_for(11, DEFAULT_TABLE_SIZE), 2039);
        assert_eq!(size_for(163, DEFAULT_TABLE_SIZE), 16381);
        assert_eq!(size_for(500, DEFAULT_TABLE_SIZE), 16381, "capped at the maximum");
        assert_eq!(size_for(1, 211), 211, "a maximum below the ladder is used as is");
        // Balance at the chosen size stays within 2% of ideal across the ladder.
        for n in [2usize, 5, 10, 20, 40, 81] {
            let m = size_for(n, DEFAULT_TABLE_SIZE);
            let shares = Maglev::build(&keys(n), m).unwrap().shares(n);
            let ideal = m as f64 / n as f64;
            assert!(shares.iter().all(|&s| (s as f64 - ideal).abs() / ideal < 0.05), "{n}: {shares:?} of {m}");
        }
    }

    #[test]
    fn rejects_non_prime_sizes_and_handles_no_backends() {
        assert!(Maglev::build(&keys(3), 16384).is_err());
        assert_eq!(Maglev::build::<String>(&[], 7).unwrap().lookup(42), None);
    }
}
