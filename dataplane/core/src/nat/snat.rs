//! The TIME_WAIT-safe SNAT port allocator (incident 2 in `shared/docs/incidents.md`).
//!
//! Contract: a (proto, SNAT address, SNAT port, backend address, backend port) tuple is never
//! handed out while a flow uses it, and never so that the backend, if it still holds the
//! tuple in TIME_WAIT, would answer the new SYN with a bare ACK. The same port may serve
//! different backends at once. When no tuple can be given, allocation fails and the caller
//! refuses the connection visibly (TCP RST, a counter per backend).
//!
//! What a backend holds: TIME_WAIT only on the side that sent the first FIN. So a flow's end
//! releases its tuple according to how it ended (`End`):
//! - the backend closed first: held for `hold` (the backend's TIME_WAIT, 60 s on Linux, plus a
//!   margin), with the last sequence number and TSval the backend saw from the client side
//!   (`Mark`), when known;
//! - the client closed first, a reset, a handshake that never completed, UDP: free at once;
//! - a TCP flow that went idle and expired while open: held, without a mark (the backend's
//!   state is unknown).
//!
//! Per destination (proto, SNAT address, backend address, backend port), allocation takes:
//! 1. a port never used yet, in a scrambled order (a stride co-prime to the range from a
//!    per-destination start, like `--random-fully`);
//! 2. a port freed at once, oldest first;
//! 3. a held port whose hold has passed (the FIFO of held ports is ordered by availability:
//!    the hold is one constant and releases come in time order, or slightly late, which can
//!    only delay a reuse);
//! 4. when the pool has nothing else, the oldest held port that carries a mark, for reuse with
//!    offsets (`Grant::reuse`): the caller shifts the new flow's sequence numbers and TSval
//!    past the mark for the flow's whole life (`nat::seqadj`), so the backend's TIME_WAIT
//!    accepts the SYN (RFC 6191; Linux's `tcp_timewait_state_process`);
//! 5. otherwise: `Exhausted` (every tuple in use, or held without a mark).
//!
//! Time is passed in (`now`, nanoseconds, monotonic), never read here.

use ahash::AHashMap;
use core::net::Ipv4Addr;
use std::collections::VecDeque;

/// Default SNAT source ports: below the NodePort range (30000-32767) and the kernel's ephemeral
/// range (32768-60999), so SNAT'd flows never collide with the node's own sockets or NodePorts.
pub const DEFAULT_PORTS: core::ops::RangeInclusive<u16> = 1024..=29999;
/// Default hold after the backend closed first: its TIME_WAIT (2*MSL = 60 s on Linux) and a
/// 5 s margin for the last segments in flight and timer slack.
pub const DEFAULT_HOLD_NS: u64 = 65_000_000_000;
/// How many held ports allocation looks past for one with a mark (unmarked ones are rare:
/// flows that expired while open).
const MARK_SCAN: usize = 16;

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
    /// Every port toward this destination is in use or held without a mark: refuse.
    Exhausted,
}

/// What the backend last saw from the client side of a TCP flow on this tuple, as it saw it
/// (after any offsets): the sequence number after the last byte or FIN (its `rcv_nxt`), and
/// the last TSval if the client sent timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub seq_end: u32,
    pub tsval: Option<u32>,
}

/// How a flow ended, which decides whether its tuple is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The backend sent the first FIN: it holds the tuple in TIME_WAIT.
    BackendClosedFirst(Option<Mark>),
    /// The client sent the first FIN: the backend closes without TIME_WAIT.
    ClientClosedFirst,
    /// A RST ended it.
    Reset,
    /// The handshake never completed.
    NotEstablished,
    /// It expired while open (idle): the backend's state is unknown.
    Idle,
    /// Not TCP: nothing is held.
    Datagram,
}

impl End {
    /// Names of the causes, in `SnatStats::ended` order.
    pub const NAMES: [&'static str; 6] =
        ["backend_closed_first", "client_closed_first", "reset", "not_established", "idle", "datagram"];

    fn index(self) -> usize {
        match self {
            End::BackendClosedFirst(_) => 0,
            End::ClientClosedFirst => 1,
            End::Reset => 2,
            End::NotEstablished => 3,
            End::Idle => 4,
            End::Datagram => 5,
        }
    }
}

/// A tuple handed out: its port and, when it was taken from the backend's TIME_WAIT, the mark
/// the new flow's SYN must land beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub port: u16,
    pub reuse: Option<Mark>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    port: u16,
    available_at: u64,
    mark: Option<Mark>,
}

#[derive(Debug)]
struct Pool {
    /// How many never-used ports have been handed out.
    fresh_used: u32,
    start: u32,
    /// Ports freed at once, oldest first.
    free: VecDeque<u16>,
    /// Held ports, by availability.
    held: VecDeque<Held>,
    in_use: u32,
    /// Allocations refused toward this destination.
    exhausted: u64,
    /// Ports restored in use or held (`restore`) that the fresh sequence has not reached yet:
    /// it passes over them, as they come back through `release` when their flow ends.
    skip: ahash::AHashSet<u16>,
}

impl Pool {
    fn new(start: u32) -> Pool {
        Pool {
            fresh_used: 0,
            start,
            free: VecDeque::new(),
            held: VecDeque::new(),
            in_use: 0,
            exhausted: 0,
            skip: ahash::AHashSet::new(),
        }
    }

    /// The next never-used port, if any is left (never `excluded`).
    #[inline]
    fn fresh(&mut self, lo: u16, span: u32, stride: u32, excluded: Option<u16>) -> Option<u16> {
        while self.fresh_used < span {
            let off = (u64::from(self.start) + u64::from(self.fresh_used) * u64::from(stride)) % u64::from(span);
            self.fresh_used += 1;
            let port = lo + off as u16;
            if Some(port) != excluded && (self.skip.is_empty() || !self.skip.remove(&port)) {
                return Some(port);
            }
        }
        None
    }
}

/// Allocator statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnatStats {
    pub in_use: u64,
    /// Released, still within their hold time.
    pub held: u64,
    pub exhausted: u64,
    /// Flows ended, by cause (`End::NAMES`).
    pub ended: [u64; 6],
    /// Tuples taken from a backend's TIME_WAIT with sequence/timestamp offsets.
    pub reused_with_offsets: u64,
}

#[derive(Debug)]
pub struct SnatAllocator {
    lo: u16,
    span: u32,
    stride: u32,
    hold: u64,
    pools: AHashMap<Destination, Pool>,
    /// A port of the range never handed out (`exclude`).
    excluded: Option<u16>,
    exhausted: u64,
    ended: [u64; 6],
    reused: u64,
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
    /// Ports from `ports` (inclusive), held for `hold_ns` after the backend closed first.
    /// `seed` scrambles the order in which fresh ports are handed out (per destination).
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
            excluded: None,
            exhausted: 0,
            ended: [0; 6],
            reused: 0,
            seed,
        }
    }

    /// Never hands out `port`, should the range include it: the VXLAN port, so that pods can
    /// be refused anything to a node's VXLAN port (`pod_to_vxlan_port`) without refusing
    /// replies to SNAT'd flows.
    pub fn exclude(&mut self, port: u16) {
        self.excluded = Some(port);
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

    /// A tuple for a new flow toward `d`, or `Exhausted` (counted, per destination too).
    pub fn allocate(&mut self, d: Destination, now: u64) -> Result<Grant, SnatError> {
        self.try_allocate(d, now).ok_or_else(|| {
            self.exhausted += 1;
            if let Some(pool) = self.pools.get_mut(&d) {
                pool.exhausted += 1;
            }
            SnatError::Exhausted
        })
    }

    /// `allocate` without counting a refusal: for a caller that can still make room (early
    /// drop of a flow holding a tuple toward `d`) and then calls `allocate`.
    pub fn try_allocate(&mut self, d: Destination, now: u64) -> Option<Grant> {
        let start = self.start_for(&d);
        let (span, stride, lo, excluded) = (self.span, self.stride, self.lo, self.excluded);
        let pool = self.pools.entry(d).or_insert_with(|| Pool::new(start));
        let grant = if let Some(port) = pool.fresh(lo, span, stride, excluded) {
            Grant { port, reuse: None }
        } else if let Some(port) = pool.free.pop_front() {
            Grant { port, reuse: None }
        } else if pool.held.front().is_some_and(|h| h.available_at <= now) {
            let h = pool.held.pop_front().expect("front checked");
            Grant { port: h.port, reuse: None }
        } else if let Some(i) = pool.held.iter().take(MARK_SCAN).position(|h| h.mark.is_some()) {
            let h = pool.held.remove(i).expect("position is in range");
            self.reused += 1;
            Grant { port: h.port, reuse: h.mark }
        } else {
            return None;
        };
        pool.in_use += 1;
        Some(grant)
    }

    /// The flow that used `port` toward `d` ended at `now`, as `end` says: its tuple is held or
    /// freed (module docs). The caller releases each allocated tuple exactly once.
    pub fn release(&mut self, d: Destination, port: u16, now: u64, end: End) {
        self.ended[end.index()] += 1;
        let Some(pool) = self.pools.get_mut(&d) else { return };
        pool.in_use = pool.in_use.saturating_sub(1);
        match end {
            End::BackendClosedFirst(mark) => {
                pool.held.push_back(Held { port, available_at: now.saturating_add(self.hold), mark })
            }
            End::Idle => pool.held.push_back(Held { port, available_at: now.saturating_add(self.hold), mark: None }),
            End::ClientClosedFirst | End::Reset | End::NotEstablished | End::Datagram => pool.free.push_back(port),
        }
    }

    /// A tuple that a flow carried over from an earlier process (a restart) uses
    /// (`hold: None`), or that such a flow released and the backend may still hold until
    /// `available_at` (with the flow's mark, if it has one). Call before any allocation toward
    /// `d`: the tuple is never handed out again until its flow releases it, or its hold
    /// passes.
    pub fn restore(&mut self, d: Destination, port: u16, hold: Option<(u64, Option<Mark>)>) {
        let start = self.start_for(&d);
        let pool = self.pools.entry(d).or_insert_with(|| Pool::new(start));
        pool.skip.insert(port);
        match hold {
            None => pool.in_use += 1,
            Some((available_at, mark)) => {
                let at = pool.held.partition_point(|h| h.available_at <= available_at);
                pool.held.insert(at, Held { port, available_at, mark });
            }
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
        self.compact_where(now, |_| true);
    }

    /// `compact`, also forgetting the refusal count of an idle destination unless
    /// `keep_exhausted` says it still matters (its backend still exists): without that, every
    /// backend that ever ran out of ports would be kept, with its metric series. O(pools).
    pub fn compact_where(&mut self, now: u64, keep_exhausted: impl Fn(&Destination) -> bool) {
        self.pools.retain(|d, p| {
            p.in_use > 0
                || p.held.back().is_some_and(|h| h.available_at > now)
                || (p.exhausted > 0 && keep_exhausted(d))
        });
    }

    /// Destinations with a pool (in use, held, or remembered for their refusals).
    pub fn pools(&self) -> usize {
        self.pools.len()
    }

    pub fn stats(&self, now: u64) -> SnatStats {
        let mut s = SnatStats {
            exhausted: self.exhausted,
            ended: self.ended,
            reused_with_offsets: self.reused,
            ..Default::default()
        };
        for p in self.pools.values() {
            s.in_use += u64::from(p.in_use);
            s.held += p.held.iter().filter(|h| h.available_at > now).count() as u64;
        }
        s
    }

    /// Tuples released and still held, with the nanoseconds of hold left (for `vxnat ctl
    /// flows`), at most `limit`.
    pub fn held_tuples(&self, now: u64, limit: usize) -> Vec<(Destination, u16, u64)> {
        let mut v = Vec::new();
        for (d, p) in &self.pools {
            for h in p.held.iter().filter(|h| h.available_at > now) {
                if v.len() >= limit {
                    return v;
                }
                v.push((*d, h.port, h.available_at - now));
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

    const HELD: End = End::BackendClosedFirst(None);
    const MARK: Mark = Mark { seq_end: 1000, tsval: Some(77) };

    fn port(a: &mut SnatAllocator, d: Destination, now: u64) -> Result<u16, SnatError> {
        a.allocate(d, now).map(|g| g.port)
    }

    #[test]
    fn fresh_ports_cover_the_range_once_in_scrambled_order() {
        let mut a = SnatAllocator::new(1000..=1999, 10 * S, 7);
        let got: Vec<u16> = (0..1000).map(|_| port(&mut a, dest(1), 0).unwrap()).collect();
        let set: BTreeSet<u16> = got.iter().copied().collect();
        assert_eq!(set.len(), 1000);
        assert!(set.iter().all(|p| (1000..=1999).contains(p)));
        let sequential = got.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(sequential < 10, "ports handed out in order: {sequential} consecutive pairs");
        assert_eq!(a.allocate(dest(1), 0), Err(SnatError::Exhausted));
    }

    #[test]
    fn a_tuple_the_backend_closed_first_is_held_for_the_whole_hold_time() {
        let mut a = SnatAllocator::new(2000..=2001, 65 * S, 1);
        let p = port(&mut a, dest(1), 0).unwrap();
        let q = port(&mut a, dest(1), 0).unwrap();
        a.release(dest(1), p, 10 * S, HELD);
        // Held until 75 s without a mark: refused (visibly), never reused early.
        assert_eq!(a.allocate(dest(1), 75 * S - 1), Err(SnatError::Exhausted));
        assert_eq!(a.allocate(dest(1), 75 * S), Ok(Grant { port: p, reuse: None }), "after the hold: plain reuse");
        assert_ne!(p, q);
        let st = a.stats(75 * S);
        assert_eq!((st.exhausted, st.ended[0], st.reused_with_offsets), (1, 1, 0));
        assert_eq!(a.exhausted_by_destination(), vec![(dest(1), 1)]);
    }

    #[test]
    fn a_tuple_the_client_closed_or_reset_is_free_at_once() {
        let mut a = SnatAllocator::new(2000..=2000, 65 * S, 1);
        for end in [End::ClientClosedFirst, End::Reset, End::NotEstablished, End::Datagram] {
            let p = port(&mut a, dest(1), 0).unwrap();
            assert_eq!(a.allocate(dest(1), 0), Err(SnatError::Exhausted), "in use");
            a.release(dest(1), p, S, end);
            assert_eq!(a.allocate(dest(1), S), Ok(Grant { port: p, reuse: None }), "{end:?}: free at once");
            a.release(dest(1), p, S, End::Datagram);
            assert_eq!(port(&mut a, dest(1), S), Ok(p));
            a.release(dest(1), p, S, end);
            let _ = port(&mut a, dest(1), S);
            a.release(dest(1), p, S, end);
            let _ = port(&mut a, dest(1), S);
            a.release(dest(1), p, S, End::ClientClosedFirst);
        }
        assert_eq!(a.stats(S).held, 0);
    }

    #[test]
    fn a_held_tuple_with_a_mark_is_reused_only_when_nothing_else_is_left() {
        let mut a = SnatAllocator::new(2000..=2002, 65 * S, 1);
        let ports: Vec<u16> = (0..3).map(|_| port(&mut a, dest(1), 0).unwrap()).collect();
        a.release(dest(1), ports[0], S, End::BackendClosedFirst(Some(MARK)));
        a.release(dest(1), ports[1], 2 * S, End::Idle);
        a.release(dest(1), ports[2], 3 * S, End::ClientClosedFirst);
        assert_eq!(a.allocate(dest(1), 4 * S), Ok(Grant { port: ports[2], reuse: None }), "the free one first");
        assert_eq!(
            a.allocate(dest(1), 4 * S),
            Ok(Grant { port: ports[0], reuse: Some(MARK) }),
            "then the marked one, with its mark"
        );
        assert_eq!(a.allocate(dest(1), 4 * S), Err(SnatError::Exhausted), "the unmarked idle one waits out its hold");
        assert_eq!(a.allocate(dest(1), 67 * S), Ok(Grant { port: ports[1], reuse: None }));
        assert_eq!(a.stats(67 * S).reused_with_offsets, 1);
    }

    #[test]
    fn the_same_port_serves_different_backends_at_once() {
        let mut a = SnatAllocator::new(3000..=3000, 120 * S, 1);
        assert_eq!(port(&mut a, dest(1), 0), Ok(3000));
        assert_eq!(port(&mut a, dest(2), 0), Ok(3000));
        assert_eq!(a.allocate(dest(1), 0), Err(SnatError::Exhausted));
    }

    #[test]
    fn default_range_excludes_nodeports_and_the_ephemeral_range() {
        assert!(!DEFAULT_PORTS.contains(&30000) && !DEFAULT_PORTS.contains(&32767) && !DEFAULT_PORTS.contains(&32768));
        const { assert!(DEFAULT_HOLD_NS > 60 * S) };
    }

    #[test]
    fn compact_where_forgets_refusals_of_backends_that_are_gone() {
        let mut a = SnatAllocator::new(4000..=4000, 5 * S, 1);
        for d in [dest(1), dest(2)] {
            let p = port(&mut a, d, 0).unwrap();
            assert_eq!(a.allocate(d, 0), Err(SnatError::Exhausted));
            a.release(d, p, 0, End::Reset);
        }
        a.compact(S);
        assert_eq!(a.pools(), 2, "plain compact keeps refusal counts");
        a.compact_where(S, |d| *d == dest(1));
        assert_eq!(a.exhausted_by_destination(), vec![(dest(1), 1)]);
        assert_eq!(a.stats(S).exhausted, 2, "the total stays");
    }

    #[test]
    fn compact_forgets_idle_destinations_only() {
        let mut a = SnatAllocator::new(4000..=4009, 5 * S, 1);
        let p = port(&mut a, dest(1), 0).unwrap();
        let _q = port(&mut a, dest(2), 0).unwrap();
        a.release(dest(1), p, 0, HELD);
        a.compact(S);
        assert_eq!(a.pools.len(), 2, "dest 1 still held, dest 2 in use");
        a.compact(6 * S);
        assert_eq!(a.pools.len(), 1);
    }

    /// Reference model: a map of every tuple to (in use?, available from, mark). Random
    /// operations with time driven by the test; the allocator must never hand out a tuple the
    /// model says is in use, must hand out a held one only with its mark, and must only report
    /// exhaustion when the model has neither a free tuple nor a marked one.
    /// Tuples restored in use or held (a restart) are never handed out fresh; they come back
    /// only through `release`, or once their hold has passed.
    #[test]
    fn restored_tuples_are_not_handed_out_again() {
        let mut a = SnatAllocator::new(4000..=4009, 5 * S, 1);
        for p in [4001, 4004, 4007] {
            a.restore(dest(1), p, None);
        }
        a.restore(dest(1), 4009, Some((3 * S, None)));
        let got: Vec<u16> = (0..6).map(|_| port(&mut a, dest(1), 0).unwrap()).collect();
        assert!(got.iter().all(|p| ![4001, 4004, 4007, 4009].contains(p)), "{got:?}");
        assert_eq!(port(&mut a, dest(1), 0), Err(SnatError::Exhausted), "held until 3 s");
        assert_eq!(port(&mut a, dest(1), 3 * S), Ok(4009));
        a.release(dest(1), 4004, 3 * S, End::Reset);
        assert_eq!(port(&mut a, dest(1), 3 * S), Ok(4004));
        assert_eq!(a.stats(3 * S).in_use, 10, "every port of the range");
    }

    /// The excluded port (the VXLAN port) is never handed out, whatever the order.
    #[test]
    fn an_excluded_port_is_never_handed_out() {
        for seed in 0..32 {
            let mut a = SnatAllocator::new(8470..=8474, 5 * S, seed);
            a.exclude(8472);
            let got: Vec<u16> = (0..4).map(|_| port(&mut a, dest(1), 0).unwrap()).collect();
            assert!(!got.contains(&8472), "seed {seed}: {got:?}");
            assert_eq!(port(&mut a, dest(1), 0), Err(SnatError::Exhausted), "seed {seed}");
        }
    }

    #[test]
    fn agrees_with_a_reference_model() {
        use proptest::prelude::*;
        let strategy = proptest::collection::vec((0u8..3, any::<bool>(), 0u64..40, 0u8..4), 1..400);
        proptest!(ProptestConfig { cases: 256, ..ProptestConfig::default() }, |(ops in strategy)| {
            let hold = 30 * S;
            let mut a = SnatAllocator::new(5000..=5007, hold, 3);
            // (dest, port) -> (in_use, available_at, mark)
            let mut model: BTreeMap<(u8, u16), (bool, u64, Option<Mark>)> = BTreeMap::new();
            let mut live: Vec<(u8, u16)> = Vec::new();
            let mut now = 0u64;
            for (d, alloc, dt, how) in ops {
                now += dt * S / 4;
                if alloc || live.is_empty() {
                    let usable = |e: Option<&(bool, u64, Option<Mark>)>| e.is_none_or(|&(u, t, m)| !u && (t <= now || m.is_some()));
                    let any_usable = (5000..=5007u16).any(|p| usable(model.get(&(d, p))));
                    match a.allocate(dest(d), now) {
                        Ok(g) => {
                            let entry = model.get(&(d, g.port)).copied();
                            prop_assert!(usable(entry.as_ref()), "handed out in-use or unmarked held tuple {d}/{} at {now}: {entry:?}", g.port);
                            if let Some((_, t, m)) = entry {
                                if t > now {
                                    prop_assert_eq!(g.reuse, m, "a held tuple comes with its mark");
                                }
                            }
                            model.insert((d, g.port), (true, 0, None));
                            live.push((d, g.port));
                        }
                        Err(SnatError::Exhausted) => prop_assert!(!any_usable, "exhausted although the model has a usable port"),
                    }
                } else {
                    let i = (dt as usize) % live.len();
                    let (d, p) = live.swap_remove(i);
                    let mark = Mark { seq_end: u32::from(p), tsval: None };
                    let (end, held, m) = match how {
                        0 => (End::BackendClosedFirst(Some(mark)), true, Some(mark)),
                        1 => (End::Idle, true, None),
                        2 => (End::ClientClosedFirst, false, None),
                        _ => (End::Reset, false, None),
                    };
                    a.release(dest(d), p, now, end);
                    model.insert((d, p), (false, if held { now + hold } else { 0 }, m));
                }
            }
        });
    }
}
