//! ClientIP session affinity (kube-proxy's `sessionAffinity: ClientIP`): the endpoint a client
//! last used through a Service frontend, remembered for the Service port's timeout, in a table
//! of fixed capacity with O(1) insert, lookup and expiry.
//!
//! Contract:
//! - At most `capacity` clients are remembered, fixed at construction. Memory: the index is
//!   allocated up front, entries as they are first used, never beyond the capacity
//!   ([`AffinityTable::memory_per_entry`] bytes each at capacity: 3.5 MiB at the default
//!   65,536).
//! - [`AffinityTable::remember`] stores a client's endpoint, or refreshes it, until
//!   `now + timeout`. When every entry is taken by a client whose time has not passed, a new
//!   client is not remembered (`Err(Full)`, for the caller to count) and nothing remembered is
//!   pushed out: a flood of new (spoofed) clients cannot make the clients that were there
//!   first lose their endpoint. A client that is not remembered still gets a stable endpoint
//!   (under affinity Maglev hashes the client address alone); it only loses stickiness across
//!   a change of the endpoint set.
//! - [`AffinityTable::get`] never returns an entry whose time has passed (it removes it).
//! - Expired entries are reclaimed incrementally: [`AffinityTable::expire`] removes at most
//!   `budget` of them, and `remember` reclaims one when it finds the table full. Nothing ever
//!   scans the table.
//!
//! Layout: a slab of entries; an open-addressing index (linear probing, backward-shift
//! deletion, load at most 1/2) from key to slot, hashed with a per-table random seed so that
//! clients cannot be chosen to collide; and expiry queues, doubly linked through the entries.
//! Each Service port has one timeout, and an entry joins the tail of its timeout's queue when
//! stored or refreshed, so with `now` monotonic a queue is ordered by expiry and its head is
//! the next to expire: expiry looks at queue heads only. There is one queue per distinct
//! timeout, up to [`QUEUES`]; beyond that an entry joins the queue of the nearest timeout, where
//! it may be reclaimed late (by at most the difference of the timeouts), never early, and `get`
//! still honours its own expiry.

use core::net::Ipv4Addr;

/// (protocol, frontend address, frontend port, client address).
pub type Key = (u8, Ipv4Addr, u16, Ipv4Addr);
/// An endpoint: address and port.
pub type Target = (Ipv4Addr, u16);

/// Clients remembered per worker unless configured otherwise.
pub const DEFAULT_CAPACITY: usize = 65536;
/// Expiry queues: distinct affinity timeouts kept in exact expiry order.
pub const QUEUES: usize = 8;

const NIL: u32 = u32::MAX;
const EMPTY: u64 = u64::MAX;

/// The table is full of clients whose time has not passed: the new one is not remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Clone, Copy)]
struct Entry {
    expires: u64,
    client: Ipv4Addr,
    frontend: Ipv4Addr,
    endpoint: Ipv4Addr,
    prev: u32,
    next: u32,
    port: u16,
    endpoint_port: u16,
    proto: u8,
    queue: u8,
}

impl Entry {
    #[inline]
    fn key(&self) -> Key {
        (self.proto, self.frontend, self.port, self.client)
    }
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    timeout: u64,
    head: u32,
    tail: u32,
    len: u32,
}

/// The affinity table of one worker (module docs).
pub struct AffinityTable {
    /// Buckets: the key's 32-bit hash (which also picks the home bucket) and the slot.
    index: Vec<u64>,
    mask: usize,
    /// Grows to `capacity` at most (reserved up front, never reallocated).
    entries: Vec<Entry>,
    /// Slots given back, chained through `next`.
    free: u32,
    queues: [Queue; QUEUES],
    len: usize,
    capacity: usize,
    hasher: ahash::RandomState,
}

impl core::fmt::Debug for AffinityTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AffinityTable")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for AffinityTable {
    fn default() -> Self {
        AffinityTable::new(DEFAULT_CAPACITY)
    }
}

impl AffinityTable {
    /// A table for at most `capacity` clients (at least 1, at most 2^31).
    pub fn new(capacity: usize) -> AffinityTable {
        let capacity = capacity.clamp(1, 1 << 31);
        let n = (capacity * 2).next_power_of_two();
        AffinityTable {
            index: vec![EMPTY; n],
            mask: n - 1,
            entries: Vec::with_capacity(capacity),
            free: NIL,
            queues: [Queue { timeout: 0, head: NIL, tail: NIL, len: 0 }; QUEUES],
            len: 0,
            capacity,
            hasher: ahash::RandomState::new(),
        }
    }

    /// Bytes per entry at capacity: the entry and its (at least two) index buckets.
    pub const fn memory_per_entry() -> usize {
        core::mem::size_of::<Entry>() + 2 * core::mem::size_of::<u64>()
    }

    /// Bytes this table holds at capacity.
    pub fn memory(&self) -> usize {
        self.index.len() * core::mem::size_of::<u64>() + self.capacity * core::mem::size_of::<Entry>()
    }

    /// Clients remembered (some possibly past their time, not yet reclaimed).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    #[inline]
    fn tag(&self, key: &Key) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    /// The bucket and slot of `key`.
    #[inline]
    fn find(&self, key: &Key, tag: u32) -> Option<(usize, u32)> {
        let mut i = tag as usize & self.mask;
        loop {
            let b = self.index[i];
            if b == EMPTY {
                return None;
            }
            if (b >> 32) as u32 == tag {
                let s = b as u32;
                if self.entries[s as usize].key() == *key {
                    return Some((i, s));
                }
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The endpoint remembered for `key`, if its time has not passed at `now`. An entry whose
    /// time has passed is removed here.
    pub fn get(&mut self, key: &Key, now: u64) -> Option<Target> {
        let (i, s) = self.find(key, self.tag(key))?;
        let e = self.entries[s as usize];
        if e.expires <= now {
            self.remove(i, s);
            return None;
        }
        Some((e.endpoint, e.endpoint_port))
    }

    /// Remembers `target` for `key` until `now + timeout` (a client already remembered is
    /// refreshed, and moved to `target`). `Err(Full)`: not remembered (module docs).
    pub fn remember(&mut self, key: Key, target: Target, timeout: u64, now: u64) -> Result<(), Full> {
        self.remember_until(key, target, timeout, now.saturating_add(timeout), now)
    }

    /// `remember` with the expiry given (e.g. an entry carried over from an earlier process);
    /// `timeout` picks its queue.
    pub fn remember_until(
        &mut self,
        key: Key,
        target: Target,
        timeout: u64,
        expires: u64,
        now: u64,
    ) -> Result<(), Full> {
        let tag = self.tag(&key);
        if let Some((_, s)) = self.find(&key, tag) {
            self.unlink(s);
            let e = &mut self.entries[s as usize];
            (e.endpoint, e.endpoint_port, e.expires) = (target.0, target.1, expires);
            let q = self.queue_for(timeout);
            self.link(q, s);
            return Ok(());
        }
        let s = match self.alloc() {
            Some(s) => s,
            None => {
                self.reclaim_one(now);
                self.alloc().ok_or(Full)?
            }
        };
        self.entries[s as usize] = Entry {
            expires,
            client: key.3,
            frontend: key.1,
            endpoint: target.0,
            prev: NIL,
            next: NIL,
            port: key.2,
            endpoint_port: target.1,
            proto: key.0,
            queue: 0,
        };
        let mut i = tag as usize & self.mask;
        while self.index[i] != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.index[i] = (u64::from(tag) << 32) | u64::from(s);
        self.len += 1;
        let q = self.queue_for(timeout);
        self.link(q, s);
        Ok(())
    }

    /// Removes up to `budget` entries whose time has passed at `now`, from the queue heads;
    /// returns how many. O(budget + queues).
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        let mut n = 0;
        for q in 0..QUEUES {
            while n < budget {
                let h = self.queues[q].head;
                if h == NIL || self.entries[h as usize].expires > now {
                    break;
                }
                self.remove_slot(h);
                n += 1;
            }
        }
        n
    }

    /// Every entry: key, endpoint, expiry (for reports and carrying state over a restart).
    pub fn iter(&self) -> impl Iterator<Item = (Key, Target, u64)> + '_ {
        self.queues.iter().flat_map(move |q| {
            let mut at = q.head;
            core::iter::from_fn(move || {
                let e = self.entries.get(at as usize)?;
                at = e.next;
                Some((e.key(), (e.endpoint, e.endpoint_port), e.expires))
            })
        })
    }

    fn alloc(&mut self) -> Option<u32> {
        if self.free != NIL {
            let s = self.free;
            self.free = self.entries[s as usize].next;
            return Some(s);
        }
        if self.entries.len() < self.capacity {
            self.entries.push(Entry {
                expires: 0,
                client: Ipv4Addr::UNSPECIFIED,
                frontend: Ipv4Addr::UNSPECIFIED,
                endpoint: Ipv4Addr::UNSPECIFIED,
                prev: NIL,
                next: NIL,
                port: 0,
                endpoint_port: 0,
                proto: 0,
                queue: 0,
            });
            return Some((self.entries.len() - 1) as u32);
        }
        None
    }

    /// Removes one entry whose time has passed, from a queue head, if there is one.
    fn reclaim_one(&mut self, now: u64) {
        for q in 0..QUEUES {
            let h = self.queues[q].head;
            if h != NIL && self.entries[h as usize].expires <= now {
                self.remove_slot(h);
                return;
            }
        }
    }

    /// The queue for entries of `timeout`: its own, else an empty one (claimed for it), else the
    /// one with the nearest timeout.
    fn queue_for(&mut self, timeout: u64) -> usize {
        if let Some(q) = self.queues.iter().position(|q| q.timeout == timeout) {
            return q;
        }
        if let Some(q) = self.queues.iter().position(|q| q.len == 0) {
            self.queues[q].timeout = timeout;
            return q;
        }
        (0..QUEUES).min_by_key(|&q| self.queues[q].timeout.abs_diff(timeout)).unwrap_or(0)
    }

    fn link(&mut self, q: usize, s: u32) {
        let tail = self.queues[q].tail;
        {
            let e = &mut self.entries[s as usize];
            e.prev = tail;
            e.next = NIL;
            e.queue = q as u8;
        }
        if tail == NIL {
            self.queues[q].head = s;
        } else {
            self.entries[tail as usize].next = s;
        }
        self.queues[q].tail = s;
        self.queues[q].len += 1;
    }

    fn unlink(&mut self, s: u32) {
        let Entry { prev, next, queue, .. } = self.entries[s as usize];
        let q = usize::from(queue);
        if prev == NIL {
            self.queues[q].head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.queues[q].tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        self.queues[q].len -= 1;
    }

    fn remove_slot(&mut self, s: u32) {
        let key = self.entries[s as usize].key();
        if let Some((i, found)) = self.find(&key, self.tag(&key)) {
            debug_assert_eq!(found, s);
            self.remove(i, s);
        }
    }

    /// Removes the entry in bucket `i` (slot `s`): unlinked, its slot freed, later buckets of
    /// its probe run shifted back (no tombstones).
    fn remove(&mut self, mut hole: usize, s: u32) {
        self.unlink(s);
        self.entries[s as usize].next = self.free;
        self.free = s;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let b = self.index[j];
            if b == EMPTY {
                break;
            }
            let home = (b >> 32) as usize & self.mask;
            // Move bucket j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.index[hole] = b;
                hole = j;
            }
        }
        self.index[hole] = EMPTY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const S: u64 = 1_000_000_000;
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn key(client: u32) -> Key {
        (6, VIP, 80, Ipv4Addr::from(0x0a00_0000 + client))
    }

    fn ep(n: u8) -> Target {
        (Ipv4Addr::new(10, 244, 1, n), 8080)
    }

    #[test]
    fn remembers_until_the_timeout_and_refreshes() {
        let mut t = AffinityTable::new(16);
        t.remember(key(1), ep(1), 10 * S, 0).unwrap();
        assert_eq!(t.get(&key(1), 9 * S), Some(ep(1)));
        assert_eq!(t.get(&key(2), 9 * S), None);
        t.remember(key(1), ep(2), 10 * S, 9 * S).unwrap();
        assert_eq!(t.get(&key(1), 18 * S), Some(ep(2)), "refreshed to 19 s, on its new endpoint");
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(&key(1), 19 * S), None, "past its time");
        assert!(t.is_empty(), "removed on lookup");
    }

    #[test]
    fn a_full_table_keeps_its_clients_and_refuses_new_ones_until_one_expires() {
        let mut t = AffinityTable::new(4);
        for c in 0..4 {
            t.remember(key(c), ep(1), 10 * S, c as u64 * S).unwrap();
        }
        assert_eq!(t.remember(key(9), ep(2), 10 * S, 5 * S), Err(Full));
        for c in 0..4 {
            assert_eq!(t.get(&key(c), 5 * S), Some(ep(1)), "client {c} kept");
        }
        // Refreshing a remembered client always works.
        assert_eq!(t.remember(key(0), ep(1), 10 * S, 6 * S), Ok(()));
        // Client 1's time passes at 11 s: the new client takes its place.
        assert_eq!(t.remember(key(9), ep(2), 10 * S, 11 * S), Ok(()));
        assert_eq!(t.get(&key(9), 11 * S), Some(ep(2)));
        assert_eq!(t.get(&key(1), 11 * S), None);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn expiry_is_incremental_and_in_order() {
        let mut t = AffinityTable::new(1000);
        for c in 0..1000 {
            t.remember(key(c), ep(1), 10 * S, u64::from(c) * S / 100).unwrap();
        }
        // At 15 s the first 501 (stored at 5 s or before) have passed.
        assert_eq!(t.expire(15 * S, 100), 100);
        assert_eq!(t.expire(15 * S, 1000), 401);
        assert_eq!(t.expire(15 * S, 1000), 0);
        assert_eq!(t.len(), 499);
        assert_eq!(t.get(&key(500), 15 * S), None);
        assert_eq!(t.get(&key(501), 15 * S), Some(ep(1)));
    }

    #[test]
    fn each_timeout_has_its_own_queue_and_extra_timeouts_share_the_nearest() {
        let mut t = AffinityTable::new(64);
        // A long timeout first, then a short one: the short one still expires on time.
        t.remember(key(1), ep(1), 100 * S, 0).unwrap();
        t.remember(key(2), ep(1), S, 0).unwrap();
        assert_eq!(t.expire(2 * S, 10), 1);
        assert_eq!(t.get(&key(1), 2 * S), Some(ep(1)));
        // Ten distinct timeouts: more than there are queues. Every entry still keeps its own
        // time for lookups, and every one is reclaimed once the longest has passed.
        for i in 0..10u32 {
            t.remember(key(100 + i), ep(2), u64::from(i + 1) * S, 0).unwrap();
        }
        assert_eq!(t.get(&key(100), S), None, "the 1 s entry has passed");
        assert_eq!(t.get(&key(109), 9 * S), Some(ep(2)));
        t.expire(10 * S, 100);
        assert_eq!(t.len(), 1, "only the 100 s entry is left");
        assert_eq!(t.iter().count(), 1);
    }

    /// A spoofed flood: a million distinct clients at an affinity frontend. The table stays at
    /// its capacity (no memory beyond what it reserved), the clients it held before the flood
    /// keep their endpoint, and each new client beyond the capacity is refused and counted.
    #[test]
    fn a_flood_of_a_million_clients_stays_bounded_and_keeps_the_legitimate_ones() {
        let cap = 4096;
        let mut t = AffinityTable::new(cap);
        let memory = (t.index.len(), t.entries.capacity());
        for c in 0..100 {
            t.remember(key(c), ep(7), 10_800 * S, 0).unwrap();
        }
        let mut refused = 0u64;
        for c in 0..1_000_000u32 {
            let now = S + u64::from(c) * 1000; // a million in one second
            if t.remember((6, VIP, 80, Ipv4Addr::from(0xc000_0000 + c)), ep(9), 10_800 * S, now).is_err() {
                refused += 1;
            }
            if c % 10_000 == 0 {
                // The legitimate clients keep connecting (and refreshing) through the flood.
                for l in 0..100 {
                    assert_eq!(t.get(&key(l), now), Some(ep(7)), "client {l} at flood client {c}");
                    t.remember(key(l), ep(7), 10_800 * S, now).unwrap();
                }
            }
            t.expire(now, 8);
        }
        assert_eq!(t.len(), cap);
        assert_eq!(refused, 1_000_000 - (cap as u64 - 100));
        assert_eq!((t.index.len(), t.entries.capacity()), memory, "no memory beyond what was reserved");
        assert!(t.memory() <= cap * AffinityTable::memory_per_entry());
        // Once the flood's entries pass, new clients are remembered again.
        let later = 10_802 * S;
        t.expire(later, usize::MAX);
        assert!(t.len() <= 100);
        assert_eq!(t.remember(key(5000), ep(1), 10 * S, later), Ok(()));
    }

    #[test]
    fn default_capacity_memory_is_as_documented() {
        let t = AffinityTable::default();
        assert_eq!(t.capacity(), DEFAULT_CAPACITY);
        assert!(AffinityTable::memory_per_entry() <= 56, "{}", AffinityTable::memory_per_entry());
        assert!(t.memory() <= 3 * 1024 * 1024 + 512 * 1024, "{}", t.memory());
    }

    /// Against a HashMap model, with three timeouts (each its own queue, so exact): lookups
    /// agree, and `Full` only when every entry the model holds is still within its time.
    #[test]
    fn agrees_with_a_model() {
        use proptest::prelude::*;
        let op = (0u8..3, 0u32..24, 0u64..8, 0u8..3);
        proptest!(ProptestConfig { cases: 256, ..ProptestConfig::default() }, |(ops in proptest::collection::vec(op, 1..400))| {
            let cap = 8;
            let mut t = AffinityTable::new(cap);
            let mut model: HashMap<Key, (Target, u64)> = HashMap::new();
            let mut now = 0u64;
            for (kind, c, dt, to) in ops {
                now += dt * S / 2;
                let k = key(c);
                let timeout = [2 * S, 5 * S, 11 * S][usize::from(to)];
                match kind {
                    0 => {
                        let want = model.get(&k).filter(|(_, e)| *e > now).map(|(t, _)| *t);
                        prop_assert_eq!(t.get(&k, now), want);
                        if want.is_none() {
                            model.remove(&k);
                        }
                    }
                    1 => {
                        let target = ep(c as u8);
                        match t.remember(k, target, timeout, now) {
                            Ok(()) => {
                                model.insert(k, (target, now + timeout));
                            }
                            Err(Full) => {
                                prop_assert!(!model.contains_key(&k), "refused a refresh");
                                prop_assert_eq!(model.len(), cap);
                                prop_assert!(model.values().all(|(_, e)| *e > now), "refused with an expired entry");
                            }
                        }
                    }
                    _ => {
                        t.expire(now, 3);
                    }
                }
                // The table drops an entry only once its time has passed.
                let keys: std::collections::HashSet<Key> = t.iter().map(|(k, _, _)| k).collect();
                for (k, (_, e)) in &model {
                    prop_assert!(keys.contains(k) || *e <= now, "{:?} dropped before its time", k);
                }
                model.retain(|k, _| keys.contains(k));
                prop_assert_eq!(t.len(), model.len());
                prop_assert!(t.len() <= cap);
            }
        });
    }
}
