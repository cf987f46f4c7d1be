//! The TIME_WAIT-safe SNAT port allocator (incident 2 in `shared/docs/incidents.md`).
//!
//! Contract: a (proto, SNAT address, SNAT port, backend address, backend port) tuple is never
//! handed out while in use, nor less than `hold` after the flow that used it ended, because
//! the backend (which usually closes first) may still hold that 5-tuple in TIME_WAIT (2*MSL,
//! 60 s on Linux) and would answer a new SYN with a bare ACK. The same port may serve different
//! backends at once. When no tuple is free, allocation fails and the caller refuses the
//! connection visibly (TCP RST, a counter per backend); it never falls back to a held tuple.
//!
//! Per destination (proto, SNAT address, backend address, backend port):
//! - ports never used yet are handed out first, in a scrambled order (a stride co-prime to the
//!   range from a per-destination start, like `--random-fully`), so the first use of a port is
//!   never predictable and never a reuse;
//! - released ports join a FIFO stamped `released_at + hold`. Released in time order, the FIFO
//!   is ordered by availability, so its front answers "is a port free?": allocation and release
//!   are O(1) (amortised: the FIFO's ring buffer grows at most to the range). Releases may come
//!   slightly out of order (conntrack releases at each flow's expiry time, as it notices them);
//!   that can only delay a port's reuse, never hasten it, since only the front is ever taken and
//!   only once its own time has passed.
//!
//! Time is passed in (`now`, nanoseconds, monotonic), never read here.

use ahash::AHashMap;
use core::net::Ipv4Addr;
use std::collections::VecDeque;

/// Default SNAT source ports: below the NodePort range (30000-32767) and the kernel's ephemeral
/// range (32768-60999), so SNAT'd flows never collide with the node's own sockets or NodePorts.
pub const DEFAULT_PORTS: core::ops::RangeInclusive<u16> = 1024..=29999;
/// Default hold after a flow ends: covers the backend's TIME_WAIT (2*MSL = 60 s on Linux) twice.
pub const DEFAULT_HOLD_NS: u64 = 120_000_000_000;

/// Where SNAT'd flows go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub proto: u8,
    pub snat_ip: Ipv4Addr,
    pub backend_ip: Ipv4Addr,
    pub backend_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnatError {
    /// Every port toward this destination is in use or held: refuse the connection.
    Exhausted,
}

#[derive(Debug)]
struct Pool {
    /// How many never-used ports have been handed out.
    fresh_used: u32,
    start: u32,
    /// Released ports and when each becomes available again, oldest first.
    held: VecDeque<(u16, u64)>,
    in_use: u32,
    /// Allocations refused toward this destination.
    exhausted: u64,
}

/// Allocator statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnatStats {
    pub in_use: u64,
    /// Released, still within their hold time.
    pub held: u64,
    pub exhausted: u64,
}

#[derive(Debug)]
pub struct SnatAllocator {
    lo: u16,
    span: u32,
    stride: u32,
    hold: u64,
    pools: AHashMap<Destination, Pool>,
    exhausted: u64,
    seed: u64,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl SnatAllocator {
    /// Ports from `ports` (inclusive), held for `hold_ns` after release. `seed` scrambles the
    /// order in which fresh ports are handed out (per destination).
    pub fn new(ports: core::ops::RangeInclusive<u16>, hold_ns: u64, seed: u64) -> SnatAllocator {
        let lo = *ports.start();
        let span = u32::from(*ports.end()).saturating_sub(u32::from(lo)) + 1;
        // A stride near span/φ, co-prime to the span, visits every port once.
        let mut stride = ((u64::from(span) * 0x9e37_79b9) >> 32) as u32 | 1;
        while span > 1 && gcd(stride, span) != 1 {
            stride += 2;
        }
        SnatAllocator {
            lo,
            span,
            stride: stride.max(1) % span.max(1),
            hold: hold_ns,
            pools: AHashMap::new(),
            exhausted: 0,
            seed,
        }
    }

    pub fn with_defaults(seed: u64) -> SnatAllocator {
        Self::new(DEFAULT_PORTS, DEFAULT_HOLD_NS, seed)
    }

    fn start_for(&self, d: &Destination) -> u32 {
        let mut h = self.seed ^ (u64::from(u32::from(d.backend_ip)) << 32) ^ u64::from(u32::from(d.snat_ip));
        h ^= (u64::from(d.backend_port) << 8) | u64::from(d.proto);
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (h % u64::from(self.span)) as u32
    }

    /// A source port for a new flow toward `d`, or `Exhausted`.
    pub fn allocate(&mut self, d: Destination, now: u64) -> Result<u16, SnatError> {
        let start = self.start_for(&d);
        let (span, stride, lo) = (self.span, self.stride, self.lo);
        let pool = self.pools.entry(d).or_insert_with(|| Pool {
            fresh_used: 0,
            start,
            held: VecDeque::new(),
            in_use: 0,
            exhausted: 0,
        });
        let port = if pool.fresh_used < span {
            let off = (u64::from(pool.start) + u64::from(pool.fresh_used) * u64::from(stride)) % u64::from(span);
            pool.fresh_used += 1;
            lo + off as u16
        } else {
            match pool.held.front() {
                Some(&(p, available_at)) if available_at <= now => {
                    pool.held.pop_front();
                    p
                }
                _ => {
                    self.exhausted += 1;
                    pool.exhausted += 1;
                    return Err(SnatError::Exhausted);
                }
            }
        };
        pool.in_use += 1;
        Ok(port)
    }

    /// The flow that used `port` toward `d` ended at `now`; the tuple is held for the hold time.
    /// The caller releases each allocated port exactly once (conntrack does, on flow removal).
    pub fn release(&mut self, d: Destination, port: u16, now: u64) {
        if let Some(pool) = self.pools.get_mut(&d) {
            pool.in_use = pool.in_use.saturating_sub(1);
            pool.held.push_back((port, now.saturating_add(self.hold)));
        }
    }

    /// Refusals per destination (backend), non-zero only: `snat ports exhausted` per backend.
    pub fn exhausted_by_destination(&self) -> Vec<(Destination, u64)> {
        let mut v: Vec<(Destination, u64)> =
            self.pools.iter().filter(|(_, p)| p.exhausted > 0).map(|(d, p)| (*d, p.exhausted)).collect();
        v.sort_unstable();
        v
    }

    /// Forgets destinations whose ports are all free and past their hold (bounded memory for
    /// backends that come and go). Call off the hot path.
    pub fn compact(&mut self, now: u64) {
        self.pools.retain(|_, p| p.in_use > 0 || p.exhausted > 0 || p.held.back().is_some_and(|&(_, t)| t > now));
    }

    pub fn stats(&self, now: u64) -> SnatStats {
        let mut s = SnatStats { exhausted: self.exhausted, ..Default::default() };
        for p in self.pools.values() {
            s.in_use += u64::from(p.in_use);
            s.held += p.held.iter().filter(|(_, t)| *t > now).count() as u64;
        }
        s
    }

    /// Tuples released and still held, with the nanoseconds of hold left (for `vxnat ctl
    /// flows`), at most `limit`.
    pub fn held_tuples(&self, now: u64, limit: usize) -> Vec<(Destination, u16, u64)> {
        let mut v = Vec::new();
        for (d, p) in &self.pools {
            for &(port, until) in p.held.iter().filter(|(_, t)| *t > now) {
                if v.len() >= limit {
                    return v;
                }
                v.push((*d, port, until - now));
            }
        }
        v
    }

    /// Ports of the range, for tests and reports.
    pub fn range_len(&self) -> u32 {
        self.span
    }

    pub fn hold_ns(&self) -> u64 {
        self.hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const S: u64 = 1_000_000_000;

    fn dest(n: u8) -> Destination {
        Destination {
            proto: 6,
            snat_ip: Ipv4Addr::new(192, 168, 77, 1),
            backend_ip: Ipv4Addr::new(10, 244, 1, n),
            backend_port: 8080,
        }
    }

    #[test]
    fn fresh_ports_cover_the_range_once_in_scrambled_order() {
        let mut a = SnatAllocator::new(1000..=1999, 10 * S, 7);
        let got: Vec<u16> = (0..1000).map(|_| a.allocate(dest(1), 0).unwrap()).collect();
        let set: BTreeSet<u16> = got.iter().copied().collect();
        assert_eq!(set.len(), 1000);
        assert!(set.iter().all(|p| (1000..=1999).contains(p)));
        let sequential = got.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(sequential < 10, "ports handed out in order: {sequential} consecutive pairs");
        assert_eq!(a.allocate(dest(1), 0), Err(SnatError::Exhausted));
    }

    #[test]
    fn a_released_tuple_is_held_for_the_whole_hold_time() {
        let mut a = SnatAllocator::new(2000..=2001, 120 * S, 1);
        let p = a.allocate(dest(1), 0).unwrap();
        let q = a.allocate(dest(1), 0).unwrap();
        a.release(dest(1), p, 10 * S);
        // Held until 130 s: refused (visibly), never reused early.
        assert_eq!(a.allocate(dest(1), 129 * S + 999_999_999), Err(SnatError::Exhausted));
        assert_eq!(a.allocate(dest(1), 130 * S), Ok(p));
        assert_ne!(p, q);
        assert_eq!(a.stats(130 * S).exhausted, 1);
        assert_eq!(a.exhausted_by_destination(), vec![(dest(1), 1)]);
    }

    #[test]
    fn out_of_order_releases_never_hasten_reuse() {
        let mut a = SnatAllocator::new(6000..=6001, 100 * S, 1);
        let p = a.allocate(dest(1), 0).unwrap();
        let q = a.allocate(dest(1), 0).unwrap();
        a.release(dest(1), p, 50 * S); // available at 150 s
        a.release(dest(1), q, 10 * S); // available at 110 s, but queued behind p
        assert_eq!(a.allocate(dest(1), 120 * S), Err(SnatError::Exhausted), "q is free but p is not: waiting is safe");
        assert_eq!(a.allocate(dest(1), 150 * S), Ok(p));
        assert_eq!(a.allocate(dest(1), 150 * S), Ok(q));
    }

    #[test]
    fn the_same_port_serves_different_backends_at_once() {
        let mut a = SnatAllocator::new(3000..=3000, 120 * S, 1);
        assert_eq!(a.allocate(dest(1), 0), Ok(3000));
        assert_eq!(a.allocate(dest(2), 0), Ok(3000));
        assert_eq!(a.allocate(dest(1), 0), Err(SnatError::Exhausted));
    }

    #[test]
    fn default_range_excludes_nodeports_and_the_ephemeral_range() {
        assert!(!DEFAULT_PORTS.contains(&30000) && !DEFAULT_PORTS.contains(&32767) && !DEFAULT_PORTS.contains(&32768));
        const { assert!(DEFAULT_HOLD_NS >= 120 * S) };
    }

    #[test]
    fn compact_forgets_idle_destinations_only() {
        let mut a = SnatAllocator::new(4000..=4009, 5 * S, 1);
        let p = a.allocate(dest(1), 0).unwrap();
        let _q = a.allocate(dest(2), 0).unwrap();
        a.release(dest(1), p, 0);
        a.compact(S);
        assert_eq!(a.pools.len(), 2, "dest 1 still held, dest 2 in use");
        a.compact(6 * S);
        assert_eq!(a.pools.len(), 1);
    }

    /// Reference model: a map of every tuple to (in use?, available from). Random operations
    /// with time driven by the test; the allocator must never hand out a tuple the model says
    /// is in use or held, and must only report exhaustion when the model has no free tuple.
    #[test]
    fn agrees_with_a_reference_model() {
        use proptest::prelude::*;
        let strategy = proptest::collection::vec((0u8..3, any::<bool>(), 0u64..40), 1..400);
        proptest!(ProptestConfig { cases: 256, ..ProptestConfig::default() }, |(ops in strategy)| {
            let hold = 30 * S;
            let mut a = SnatAllocator::new(5000..=5007, hold, 3);
            // (dest, port) -> (in_use, available_at)
            let mut model: BTreeMap<(u8, u16), (bool, u64)> = BTreeMap::new();
            let mut live: Vec<(u8, u16)> = Vec::new();
            let mut now = 0u64;
            for (d, alloc, dt) in ops {
                now += dt * S / 4;
                if alloc || live.is_empty() {
                    let free_in_model = (5000..=5007u16).any(|p| model.get(&(d, p)).is_none_or(|&(u, t)| !u && t <= now));
                    match a.allocate(dest(d), now) {
                        Ok(p) => {
                            let entry = model.get(&(d, p)).copied();
                            prop_assert!(entry.is_none_or(|(u, t)| !u && t <= now), "handed out in-use or held tuple {d}/{p} at {now}: {entry:?}");
                            model.insert((d, p), (true, 0));
                            live.push((d, p));
                        }
                        Err(SnatError::Exhausted) => prop_assert!(!free_in_model, "exhausted although the model has a free port"),
                    }
                } else {
                    let i = (dt as usize) % live.len();
                    let (d, p) = live.swap_remove(i);
                    a.release(dest(d), p, now);
                    model.insert((d, p), (false, now + hold));
                }
            }
        });
    }
}
