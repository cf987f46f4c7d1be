//! Early drop, after netfilter's `early_drop`: when the table is full, a new flow takes the
//! slot of an *unassured* flow instead of being refused, with a per-source quota so that one
//! source (or a flood of spoofed ones) cannot take the table.
//!
//! Contract:
//! - Only a full table evicts ([`ConnTrack::insert`] calls [`ConnTrack::early_drop`] when no
//!   slot is free; callers may also ask for one with a condition, e.g. SNAT exhaustion toward
//!   one backend: [`ConnTrack::early_drop_where`]).
//! - Only an unassured flow is evicted: TCP whose handshake never completed (SYN_SENT,
//!   SYN_RECV) or that was reset (CLOSE: the connection is dead, its SNAT tuple already given
//!   back), UDP seen one way only, other protocols. Established and closing TCP and UDP with
//!   replies are never evicted. Assured-ness is read from the flow's state when its node is
//!   looked at, and a flow once seen assured leaves the list for good (netfilter's ASSURED bit
//!   is sticky too).
//! - The victim is one of the oldest unassured flows: up to [`LOOK`] of them are looked at (as
//!   netfilter looks at 8 entries), and the one whose source holds the most unassured flows is
//!   taken (ties: the oldest). A source flooding the table evicts its own flows first.
//! - Known clients are spared while young: a source that completed a TCP handshake within
//!   [`TRUST_NS`] is *known*, and its unassured flows younger than [`SPARE_NS`] are passed over
//!   (counted: `early_drop_spared`) as long as another candidate is among the [`SCAN`] nodes
//!   visited. Why: a spoofed flood turns the table over in well under a second, faster than TCP
//!   retransmits a lost ACK or first request (200 ms, then 400 ms, ...). Without this, a
//!   legitimate client's handshake whose last ACK was lost to an overloaded ring is evicted,
//!   its retransmitted request becomes a new flow on another SNAT port, and the endpoint
//!   answers it with a RST. It is a preference, not a boundary: a flood that completes
//!   handshakes from its sources (not blind, or with ACKs vxnat does not check against the
//!   window) makes them known too, and when every candidate is spared the old rule applies. A
//!   client never seen before gets no such grace.
//! - Quota: a source that already holds `quota` unassured flows (default: capacity / 128, at
//!   least 16) may only evict one of its own; if none of its own is among those looked at, its
//!   new flow is refused (`CtError::Full`, the `conntrack_full` drop).
//! - An evicted flow leaves the table as an expired one does: its timer set to `now`, removed,
//!   and queued for `take_expired`, so the caller releases its SNAT tuple (a handshake that
//!   never completed frees it at once) and counts a SYN that was never answered.
//! - Cost: O(1) per insert, no table scan: at most [`SCAN`] list nodes are visited per
//!   eviction, and each node is linked once per flow. [`ConnTrack::prune_unassured`] (called
//!   between batches) moves a hand over the list to unlink flows that are no longer unassured.
//! - Memory: [`MEMORY_PER_FLOW`] bytes per flow of capacity, reserved up front.
//!
//! How, without a hook where a flow changes state or leaves the table: every inserted flow is
//! linked, by slot, on an intrusive FIFO kept beside the table, with its source and creation
//! time, and counted against its source. A node is checked against the slot when it is looked
//! at: if the slot is empty or holds another flow (another source or creation time), or the
//! flow is now assured, the node is unlinked and its source's count decremented. So a source's
//! count is an upper bound of its unassured flows, exact once the hand has passed. A flow put
//! in the table without `insert` (carried over a restart by `restore`) is on no list: never
//! evicted.

use super::{ConnTrack, FlowState, TcpState};
use core::net::Ipv4Addr;

/// Unassured flows looked at per eviction.
pub(super) const LOOK: usize = 8;
/// List nodes visited per eviction at most (stale ones are unlinked on the way).
pub(super) const SCAN: usize = 64;
/// Bytes per flow of capacity: the list node, (at least two) source-count buckets and a
/// quarter of a known-client entry (beyond the first 1,024 entries, 8 KiB per table).
pub(super) const MEMORY_PER_FLOW: usize =
    core::mem::size_of::<Node>() + 2 * core::mem::size_of::<u64>() + core::mem::size_of::<u64>() / 4;
/// How long a source stays known after it completed a TCP handshake.
pub(super) const TRUST_NS: u64 = 600 * 1_000_000_000;
/// How long a known source's unassured flow is spared: TCP's first retransmissions of a lost
/// ACK or request (200, 400, 800, 1,600 ms after the first) fit in it.
pub(super) const SPARE_NS: u64 = 3 * 1_000_000_000;

const NIL: u32 = u32::MAX;
/// `prev` of a node that is on no list.
const UNLINKED: u32 = u32::MAX - 1;

/// The default quota: unassured flows one source may hold in a full table.
pub(super) fn default_quota(capacity: usize) -> u32 {
    (capacity / 128).max(16).min(u32::MAX as usize) as u32
}

#[derive(Debug, Clone, Copy)]
struct Node {
    prev: u32,
    next: u32,
    src: Ipv4Addr,
    created: u64,
}

/// What a linked node's slot holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// The flow it was linked for, still unassured.
    Unassured,
    /// That flow is assured now, or gone (the slot is empty or holds another flow).
    Not,
}

/// Whether a flow in this state may be evicted.
#[inline]
pub(super) fn unassured(s: FlowState) -> bool {
    match s {
        FlowState::Tcp(t) => matches!(t, TcpState::SynSent | TcpState::SynRecv | TcpState::Close),
        FlowState::UdpUnreplied | FlowState::Other => true,
        FlowState::UdpReplied => false,
    }
}

/// Unassured flows per source: open addressing over `u64` buckets holding
/// `source << 32 | count` (count > 0; 0 is an empty bucket), at most one source per linked
/// node, so load 1/2 at most. Hashed with a per-table random seed: spoofed sources cannot be
/// chosen to collide.
#[derive(Debug)]
struct Sources {
    buckets: Vec<u64>,
    mask: usize,
    hasher: ahash::RandomState,
}

impl Sources {
    fn new(nodes: usize) -> Sources {
        let n = (nodes.max(1) * 2).next_power_of_two();
        Sources { buckets: vec![0; n], mask: n - 1, hasher: ahash::RandomState::new() }
    }

    #[inline]
    fn home(&self, src: u32) -> usize {
        self.hasher.hash_one(src) as usize & self.mask
    }

    /// The bucket of `src`, or the empty bucket where it would go.
    #[inline]
    fn find(&self, src: u32) -> (usize, bool) {
        let mut i = self.home(src);
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return (i, false);
            }
            if (b >> 32) as u32 == src {
                return (i, true);
            }
            i = (i + 1) & self.mask;
        }
    }

    fn count(&self, src: Ipv4Addr) -> u32 {
        match self.find(u32::from(src)) {
            (i, true) => self.buckets[i] as u32,
            _ => 0,
        }
    }

    fn inc(&mut self, src: Ipv4Addr) {
        let s = u32::from(src);
        match self.find(s) {
            (i, true) => self.buckets[i] += 1,
            (i, false) => self.buckets[i] = (u64::from(s) << 32) | 1,
        }
    }

    fn dec(&mut self, src: Ipv4Addr) {
        let (mut hole, found) = self.find(u32::from(src));
        if !found {
            return;
        }
        if self.buckets[hole] as u32 > 1 {
            self.buckets[hole] -= 1;
            return;
        }
        // The last one: remove the bucket, shifting later ones of its probe run back.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let b = self.buckets[j];
            if b == 0 {
                break;
            }
            let home = self.home((b >> 32) as u32);
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = 0;
    }
}

/// Sources that completed a TCP handshake, and when (module docs): sets of [`WAYS`] entries,
/// one entry per four flows of capacity (at least 1,024), `source << 32 | seconds + 1` (0:
/// empty), the set chosen by a per-table random seed. A full set forgets its oldest source:
/// best effort, bounded memory, O(1).
#[derive(Debug)]
struct Known {
    entries: Vec<u64>,
    /// Sets - 1 (a power of two).
    mask: usize,
    hasher: ahash::RandomState,
}

/// Entries per set of [`Known`].
const WAYS: usize = 4;

impl Known {
    fn new(capacity: usize) -> Known {
        let n = (capacity / 4).max(1024).next_power_of_two();
        Known { entries: vec![0; n], mask: n / WAYS - 1, hasher: ahash::RandomState::new() }
    }

    fn set(&self, s: u32) -> core::ops::Range<usize> {
        let i = (self.hasher.hash_one(s) as usize & self.mask) * WAYS;
        i..i + WAYS
    }

    fn note(&mut self, src: Ipv4Addr, now: u64) {
        let s = u32::from(src);
        let set = self.set(s);
        let e = (u64::from(s) << 32) | u64::from(secs(now).saturating_add(1));
        let ways = &mut self.entries[set];
        // Its own entry, else an empty one, else the oldest.
        let i = ways
            .iter()
            .position(|&w| w != 0 && (w >> 32) as u32 == s)
            .or_else(|| ways.iter().position(|&w| w == 0))
            .unwrap_or_else(|| (0..WAYS).min_by_key(|&i| ways[i] as u32).unwrap_or(0));
        ways[i] = e;
    }

    /// Whether `src` completed a handshake within `TRUST_NS` of `now`.
    fn knows(&self, src: Ipv4Addr, now: u64) -> bool {
        let s = u32::from(src);
        self.entries[self.set(s)].iter().any(|&e| {
            e != 0
                && (e >> 32) as u32 == s
                && u64::from(secs(now)).saturating_sub(u64::from(e as u32 - 1)) * 1_000_000_000 <= TRUST_NS
        })
    }
}

#[inline]
fn secs(ns: u64) -> u32 {
    (ns / 1_000_000_000).min(u64::from(u32::MAX - 1)) as u32
}

/// The early-drop state of a table (module docs).
#[derive(Debug)]
pub(super) struct EarlyDrop {
    /// One node per slot.
    nodes: Vec<Node>,
    head: u32,
    tail: u32,
    linked: usize,
    /// The housekeeping hand: the next node `prune_unassured` looks at (NIL: the head).
    hand: u32,
    sources: Sources,
    known: Known,
    quota: u32,
    /// Flows evicted.
    drops: u64,
    /// Candidates passed over because a known source's flow was young.
    spared: u64,
    /// New flows refused because their source was over its quota.
    over_quota: u64,
}

impl EarlyDrop {
    pub(super) fn new(capacity: usize) -> EarlyDrop {
        EarlyDrop {
            nodes: vec![Node { prev: UNLINKED, next: NIL, src: Ipv4Addr::UNSPECIFIED, created: 0 }; capacity],
            head: NIL,
            tail: NIL,
            linked: 0,
            hand: NIL,
            sources: Sources::new(capacity),
            known: Known::new(capacity),
            quota: default_quota(capacity),
            drops: 0,
            spared: 0,
            over_quota: 0,
        }
    }

    /// A flow from `src` created at `created` now occupies `slot` (called by `insert`): linked
    /// at the tail, counted against its source. A node still linked for the slot's previous
    /// flow is unlinked first.
    pub(super) fn track(&mut self, slot: u32, src: Ipv4Addr, created: u64) {
        let Some(n) = self.nodes.get(slot as usize) else { return };
        if n.prev != UNLINKED {
            self.unlink(slot);
        }
        self.nodes[slot as usize] = Node { prev: self.tail, next: NIL, src, created };
        if self.tail == NIL {
            self.head = slot;
        } else {
            self.nodes[self.tail as usize].next = slot;
        }
        self.tail = slot;
        self.linked += 1;
        self.sources.inc(src);
    }

    /// `src` completed a TCP handshake at `now` (called by `update` on the transition).
    pub(super) fn handshake_completed(&mut self, src: Ipv4Addr, now: u64) {
        self.known.note(src, now);
    }

    fn unlink(&mut self, slot: u32) {
        let Node { prev, next, src, .. } = self.nodes[slot as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        if self.hand == slot {
            self.hand = next;
        }
        self.nodes[slot as usize].prev = UNLINKED;
        self.nodes[slot as usize].next = NIL;
        self.linked -= 1;
        self.sources.dec(src);
    }
}

impl ConnTrack {
    /// What the slot of a linked node holds now.
    #[inline]
    fn early_status(&self, slot: u32) -> Status {
        let n = &self.early.nodes[slot as usize];
        match self.slots.get(slot as usize).and_then(|s| s.0.as_ref()) {
            Some(f) if f.orig.src == n.src && f.created == n.created && unassured(f.state) => Status::Unassured,
            _ => Status::Not,
        }
    }

    /// Evicts an unassured flow for a new flow from `src` (module docs) and returns the slot
    /// it freed; `None`: nothing may be evicted (the new flow is refused).
    pub(super) fn early_drop(&mut self, src: Ipv4Addr, now: u64) -> Option<u32> {
        if self.early_drop_where(src, now, |_| true) {
            self.free.pop()
        } else {
            None
        }
    }

    /// Evicts one of the oldest unassured flows that satisfies `eligible`, for a new flow from
    /// `src`, under the same rules and cost as when the table is full (module docs). The flow
    /// is queued for `take_expired`. Returns whether one was evicted.
    pub fn early_drop_where(&mut self, src: Ipv4Addr, now: u64, eligible: impl Fn(&super::Flow) -> bool) -> bool {
        // (slot, source, the source's count), oldest first: candidates, and the young flows
        // of known sources passed over (module docs).
        let mut cand = [(NIL, Ipv4Addr::UNSPECIFIED, 0u32); LOOK];
        let mut spare = [(NIL, Ipv4Addr::UNSPECIFIED, 0u32); LOOK];
        let (mut n, mut m, mut visited, mut at) = (0, 0, 0, self.early.head);
        while at != NIL && n < LOOK && visited < SCAN {
            visited += 1;
            let next = self.early.nodes[at as usize].next;
            if self.early_status(at) == Status::Unassured {
                if self.get(super::FlowId(at)).is_some_and(&eligible) {
                    let Node { src: s, created, .. } = self.early.nodes[at as usize];
                    let c = (at, s, self.early.sources.count(s));
                    if now.saturating_sub(created) < SPARE_NS && self.early.known.knows(s, now) {
                        if m < LOOK {
                            spare[m] = c;
                            m += 1;
                        }
                    } else {
                        cand[n] = c;
                        n += 1;
                    }
                }
            } else {
                self.early.unlink(at);
            }
            at = next;
        }
        let (cand, spare) = (&cand[..n], &spare[..m]);
        let victim = if self.early.sources.count(src) >= self.early.quota {
            // Over its quota: only its own oldest.
            let own = cand.iter().find(|c| c.1 == src).or_else(|| spare.iter().find(|c| c.1 == src));
            if own.is_none() {
                self.early.over_quota += 1;
            }
            own
        } else {
            // The source holding the most; the oldest of equals (the first found).
            fn heaviest(list: &[(u32, Ipv4Addr, u32)]) -> Option<&(u32, Ipv4Addr, u32)> {
                list.iter().fold(None, |best: Option<&(u32, Ipv4Addr, u32)>, c| match best {
                    Some(b) if b.2 >= c.2 => Some(b),
                    _ => Some(c),
                })
            }
            heaviest(cand).or_else(|| heaviest(spare))
        };
        if let Some(v) = victim {
            // Known sources' young flows passed over for this one.
            self.early.spared += spare.iter().filter(|c| c.0 != v.0).count() as u64;
        }
        let Some(&(slot, ..)) = victim else { return false };
        self.early.unlink(slot);
        if let Some(f) = self.slots.get_mut(slot as usize).and_then(|s| s.0.as_mut()) {
            // It leaves as if it had expired now (its SNAT hold, if any, counts from now).
            f.expires_at = now;
        }
        self.remove_slot(slot, true);
        self.early.drops += 1;
        true
    }

    /// Housekeeping between batches: the hand looks at up to `budget` nodes of the list and
    /// unlinks those whose flow is assured now or gone, so per-source counts stay close to the
    /// truth and the list holds unassured flows. O(budget).
    pub fn prune_unassured(&mut self, budget: usize) {
        for _ in 0..budget {
            if self.early.linked == 0 {
                self.early.hand = NIL;
                return;
            }
            let at = if self.early.hand == NIL { self.early.head } else { self.early.hand };
            self.early.hand = self.early.nodes[at as usize].next;
            if self.early_status(at) == Status::Not {
                self.early.unlink(at);
            }
        }
    }

    /// Flows evicted by early drop since the table was made.
    pub fn early_drops(&self) -> u64 {
        self.early.drops
    }

    /// Known sources' young unassured flows passed over by evictions (module docs), counted
    /// once per eviction that passed them.
    pub fn early_drop_spared(&self) -> u64 {
        self.early.spared
    }

    /// New flows refused because their source held its quota of unassured flows.
    pub fn early_drop_refusals(&self) -> u64 {
        self.early.over_quota
    }

    /// Flows on the early-drop list: an upper bound of the unassured flows (exact once the
    /// housekeeping hand has passed).
    pub fn unassured_len(&self) -> usize {
        self.early.linked
    }

    /// The unassured flows one source may hold in a full table (module docs).
    pub fn set_source_quota(&mut self, quota: u32) {
        self.early.quota = quota.max(1);
    }

    pub fn source_quota(&self) -> u32 {
        self.early.quota
    }

    /// Bytes per flow of capacity that early drop adds to `memory_per_flow` (module docs).
    pub const fn early_drop_memory_per_flow() -> usize {
        MEMORY_PER_FLOW
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::{default_quota, Sources, MEMORY_PER_FLOW};
    use crate::wire::TcpFlags;

    const S: u64 = 1_000_000_000;
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const SNAT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

    /// A TCP flow from `src:sport` to the VIP, DNAT'd to the backend and SNAT'd to a port of
    /// its own.
    fn keys(src: Ipv4Addr, sport: u16, snat_port: u16) -> (FlowKey, FlowKey) {
        (
            FlowKey { proto: 6, src, dst: VIP, sport, dport: 80 },
            FlowKey { proto: 6, src: BACKEND, dst: SNAT, sport: 8080, dport: snat_port },
        )
    }

    fn establish(ct: &mut ConnTrack, id: FlowId, now: u64) {
        ct.update(id, Dir::Orig, TcpFlags::SYN, 60, now);
        ct.update(id, Dir::Reply, TcpFlags(0x012), 60, now);
        ct.update(id, Dir::Orig, TcpFlags::ACK, 52, now);
        assert_eq!(ct.get(id).unwrap().state, FlowState::Tcp(TcpState::Established));
    }

    fn spoofed(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(0xc633_0000 + i)
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unassured_flow_as_if_it_expired() {
        let mut ct = ConnTrack::new(4, Timeouts::default());
        let legit = Ipv4Addr::new(192, 168, 77, 100);
        let (o, r) = keys(legit, 1000, 1);
        let est = ct.insert(o, r, 0, 0).unwrap();
        establish(&mut ct, est, 0);
        for i in 0..3 {
            let (o, r) = keys(spoofed(i), 2000, 10 + i as u16);
            let id = ct.insert(o, r, S + u64::from(i), 0).unwrap();
            ct.update(id, Dir::Orig, TcpFlags::SYN, 60, S);
        }
        assert_eq!(ct.len(), 4);
        // Full: the next flow evicts the oldest unassured one (spoofed 0), not the established.
        let (o, r) = keys(spoofed(9), 2000, 99);
        assert!(ct.insert(o, r, 5 * S, 0).is_ok());
        assert_eq!(ct.early_drops(), 1);
        let gone = ct.take_expired();
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].orig.src, gone[0].expires_at), (spoofed(0), 5 * S), "the oldest, expired now");
        assert!(ct.get(est).is_some(), "the established flow stays");
        assert!(ct.lookup(&keys(spoofed(0), 2000, 10).0, 5 * S).is_none(), "its keys are gone from the index");
    }

    #[test]
    fn a_table_full_of_assured_flows_refuses() {
        let mut ct = ConnTrack::new(3, Timeouts::default());
        let udp = |ct: &mut ConnTrack, p: u16| {
            let o = FlowKey { proto: 17, src: Ipv4Addr::new(10, 0, 0, 1), dst: VIP, sport: p, dport: 53 };
            let id = ct.insert(o, o.reversed(), 0, 0).unwrap();
            ct.update(id, Dir::Reply, TcpFlags(0), 60, 0); // replied: assured
        };
        udp(&mut ct, 1);
        udp(&mut ct, 2);
        let (o, r) = keys(spoofed(1), 1, 1);
        let id = ct.insert(o, r, 0, 0).unwrap();
        establish(&mut ct, id, 0);
        let (o, r) = keys(spoofed(2), 1, 2);
        assert_eq!(ct.insert(o, r, S, 0), Err(CtError::Full));
        assert_eq!(ct.early_drops(), 0);
        assert_eq!(ct.unassured_len(), 0, "the assured flows were unlinked on the way");
    }

    #[test]
    fn a_handshake_that_was_reset_may_be_evicted() {
        let mut ct = ConnTrack::new(1, Timeouts::default());
        let (o, r) = keys(spoofed(1), 1, 1);
        let id = ct.insert(o, r, 0, 0).unwrap();
        ct.update(id, Dir::Orig, TcpFlags::SYN, 60, 0);
        ct.update(id, Dir::Reply, TcpFlags::RST, 40, 0);
        assert_eq!(ct.get(id).unwrap().state, FlowState::Tcp(TcpState::Close));
        let (o, r) = keys(spoofed(2), 1, 2);
        assert!(ct.insert(o, r, S, 0).is_ok());
        assert_eq!(ct.take_expired()[0].orig.src, spoofed(1));
    }

    #[test]
    fn the_source_holding_the_most_unassured_flows_loses_one_first() {
        let mut ct = ConnTrack::new(8, Timeouts::default());
        let hog = Ipv4Addr::new(203, 0, 113, 7);
        // Oldest first: one flow of another source, then the hog's five, then two others.
        ct.insert(keys(spoofed(1), 1, 1).0, keys(spoofed(1), 1, 1).1, 0, 0).unwrap();
        for p in 0..5 {
            ct.insert(keys(hog, 100 + p, 100 + p).0, keys(hog, 100 + p, 100 + p).1, 1, 0).unwrap();
        }
        for i in 2..4 {
            ct.insert(keys(spoofed(i), 1, i as u16).0, keys(spoofed(i), 1, i as u16).1, 2, 0).unwrap();
        }
        let (o, r) = keys(spoofed(9), 1, 9);
        ct.insert(o, r, 3, 0).unwrap();
        let gone = ct.take_expired();
        assert_eq!((gone.len(), gone[0].orig.src, gone[0].orig.sport), (1, hog, 100), "the hog's oldest");
    }

    #[test]
    fn a_source_over_its_quota_evicts_only_its_own_flows() {
        let mut ct = ConnTrack::new(64, Timeouts::default());
        ct.set_source_quota(4);
        let hog = Ipv4Addr::new(203, 0, 113, 7);
        // Sixty flows of others (older), four of the hog's.
        for i in 0..60 {
            ct.insert(keys(spoofed(i), 1, i as u16).0, keys(spoofed(i), 1, i as u16).1, 0, 0).unwrap();
        }
        for p in 0..4 {
            ct.insert(keys(hog, 100 + p, 100 + p).0, keys(hog, 100 + p, 100 + p).1, 1, 0).unwrap();
        }
        // The hog holds its quota and none of its flows is among the oldest: refused.
        let (o, r) = keys(hog, 200, 200);
        assert_eq!(ct.insert(o, r, 2, 0), Err(CtError::Full));
        assert_eq!((ct.early_drops(), ct.early_drop_refusals()), (0, 1));
        // Another source may still come in (evicting the oldest).
        let (o, r) = keys(Ipv4Addr::new(192, 168, 77, 100), 1, 300);
        assert!(ct.insert(o, r, 2, 0).is_ok());
        assert_eq!(ct.take_expired()[0].orig.src, spoofed(0));
    }

    /// A flood churning a full table, and a known client (it completed a handshake before)
    /// whose next handshake stalls (its last ACK lost): the flood evicts its own flows around
    /// it for `SPARE_NS`, then the stalled one may go as any other. A client never seen before
    /// gets no such grace.
    #[test]
    fn a_known_clients_young_handshake_is_passed_over_while_the_flood_churns() {
        use super::SPARE_NS;
        let mut ct = ConnTrack::new(16, Timeouts::default());
        let known = Ipv4Addr::new(192, 168, 77, 100);
        let stranger = Ipv4Addr::new(192, 168, 77, 101);
        let (o, r) = keys(known, 1000, 1000);
        let first = ct.insert(o, r, 0, 0).unwrap();
        establish(&mut ct, first, 0);
        // Both clients start a handshake the endpoint answers; neither client's ACK arrives.
        let half_open = |ct: &mut ConnTrack, src: Ipv4Addr, port: u16, now: u64| {
            let (o, r) = keys(src, port, port + u16::from(src.octets()[3]));
            let id = ct.insert(o, r, now, 0).unwrap();
            ct.update(id, Dir::Orig, TcpFlags::SYN, 60, now);
            ct.update(id, Dir::Reply, TcpFlags(0x012), 60, now);
            id
        };
        let stalled = half_open(&mut ct, known, 1001, S);
        let strangers = half_open(&mut ct, stranger, 1001, S);
        // The flood: a SYN per millisecond, far more than the table holds.
        let mut gone = Vec::new();
        let mut i = 0u32;
        let mut flood_until = |ct: &mut ConnTrack, until: u64, gone: &mut Vec<Flow>| {
            while S + u64::from(i) * 1_000_000 < until {
                let now = S + 1 + u64::from(i) * 1_000_000;
                let (o, r) = keys(spoofed(i), 2000, (3000 + i % 60_000) as u16);
                if let Ok(id) = ct.insert(o, r, now, 0) {
                    ct.update(id, Dir::Orig, TcpFlags::SYN, 60, now);
                }
                gone.extend(ct.take_expired());
                i += 1;
            }
        };
        flood_until(&mut ct, S + SPARE_NS - 1_000_000, &mut gone);
        assert!(ct.early_drops() > 2_000, "{}", ct.early_drops());
        assert!(gone.iter().any(|f| f.orig.src == stranger), "a stranger's stalled handshake goes with the flood");
        assert!(ct.get(strangers).is_none_or(|f| f.orig.src != stranger));
        assert_eq!(ct.get(stalled).map(|f| f.orig.src), Some(known), "the known client's is spared");
        assert!(ct.early_drop_spared() >= ct.early_drops() - 100, "{}", ct.early_drop_spared());
        // Its ACK arrives (retransmitted): established, and it stays for good.
        ct.update(stalled, Dir::Orig, TcpFlags::ACK, 52, S + SPARE_NS / 2);
        assert_eq!(ct.get(stalled).unwrap().state, FlowState::Tcp(TcpState::Established));
        // Another stalled one, past its grace: evicted like the flood's.
        let late = half_open(&mut ct, known, 1002, S + SPARE_NS);
        flood_until(&mut ct, S + 2 * SPARE_NS + 100_000_000, &mut gone);
        assert!(ct.get(late).is_none_or(|f| f.orig.sport != 1002), "spared only while young");
        assert_eq!(ct.get(first).map(|f| f.orig.sport), Some(1000), "the established flow stays");
    }

    /// When every candidate within reach is a known client's young flow, the plain rule
    /// applies: a flood that made its sources known cannot fill the table for good.
    #[test]
    fn when_only_known_young_flows_are_left_one_of_them_goes() {
        let mut ct = ConnTrack::new(8, Timeouts::default());
        // Eight sources complete a handshake (known), then their connections are reset (CLOSE:
        // unassured, evictable).
        for i in 0..8u32 {
            let (o, r) = keys(spoofed(i), 1, i as u16);
            let id = ct.insert(o, r, 0, 0).unwrap();
            establish(&mut ct, id, 0);
            ct.update(id, Dir::Orig, TcpFlags::RST, 40, 0);
        }
        // Ten seconds on, each starts another handshake: the old ones go, each eviction passing
        // over the young ones before it (0 + 1 + ... + 7).
        for i in 0..8u32 {
            let (o, r) = keys(spoofed(i), 2, 100 + i as u16);
            ct.insert(o, r, 10 * S, 0).unwrap();
        }
        assert_eq!((ct.early_drops(), ct.early_drop_spared()), (8, 28));
        // Only known sources' young flows are left: one of them goes (the oldest), not refused.
        let (o, r) = keys(spoofed(99), 1, 999);
        assert!(ct.insert(o, r, 10 * S + 1, 0).is_ok(), "not refused");
        assert_eq!(ct.early_drops(), 9);
        let gone = ct.take_expired();
        assert_eq!((gone.last().unwrap().orig.src, gone.last().unwrap().orig.sport), (spoofed(0), 2));
    }

    /// A spoofed SYN flood at a small table: a million SYNs from distinct sources, with a
    /// legitimate client connecting (handshake completed before the next flood packet) every
    /// thousand. Every legitimate connection is tracked and stays; the table stays at its
    /// capacity with the flood's flows churning through it; each insert does bounded work.
    #[test]
    fn a_spoofed_syn_flood_churns_through_unassured_flows_and_spares_the_established() {
        let cap = 4096;
        let mut ct = ConnTrack::new(cap, Timeouts::default());
        let legit = Ipv4Addr::new(192, 168, 77, 100);
        let mut established = Vec::new();
        let (mut legit_ok, mut evicted) = (0, 0);
        for i in 0..1_000_000u32 {
            let now = u64::from(i) * 1000;
            let (o, r) = keys(spoofed(i), 1234, (i % 60_000) as u16);
            let r = FlowKey { dst: Ipv4Addr::from(0x0a00_0000 + i), ..r };
            if let Ok(id) = ct.insert(o, r, now, 0) {
                ct.update(id, Dir::Orig, TcpFlags::SYN, 60, now);
            }
            if i % 1000 == 0 {
                let (o, r) = keys(legit, (i / 1000) as u16, 0);
                let r = FlowKey { dst: legit, dport: (i / 1000) as u16, ..r };
                let id = ct.insert(o, r, now, 0).expect("the legitimate client is never refused");
                establish(&mut ct, id, now);
                established.push(id);
                legit_ok += 1;
            }
            evicted += ct.take_expired().len();
            ct.prune_unassured(16);
        }
        assert_eq!(legit_ok, 1000);
        assert_eq!(ct.len(), cap);
        for id in established {
            assert_eq!(ct.get(id).map(|f| f.orig.src), Some(legit), "an established connection was evicted");
        }
        assert_eq!(ct.early_drops() as usize, evicted);
        assert!(evicted >= 1_000_000 - cap, "{evicted}");
        assert!(ct.unassured_len() <= cap);
    }

    #[test]
    fn a_slot_reused_without_insert_is_not_mistaken_for_its_old_flow() {
        let mut ct = ConnTrack::new(2, Timeouts::default());
        let (o, r) = keys(spoofed(1), 1, 1);
        let id = ct.insert(o, r, 0, 0).unwrap();
        // Another flow in the same slot, put there without `insert` (as a flow carried over
        // from an earlier process is): same source, another creation time, still unassured.
        ct.get_mut(id).unwrap().created = 77;
        let (o, r) = keys(spoofed(2), 1, 2);
        ct.insert(o, r, S, 0).unwrap();
        let (o, r) = keys(spoofed(3), 1, 3);
        assert!(ct.insert(o, r, 2 * S, 0).is_ok(), "evicts spoofed 2, not the flow it knows nothing of");
        assert_eq!(ct.take_expired()[0].orig.src, spoofed(2));
        assert!(ct.lookup(&keys(spoofed(1), 1, 1).0, 2 * S).is_some());
    }

    #[test]
    fn pruning_unlinks_what_became_assured_and_keeps_counts_exact() {
        let mut ct = ConnTrack::new(16, Timeouts::default());
        let src = Ipv4Addr::new(10, 0, 0, 9);
        let ids: Vec<FlowId> =
            (0..10).map(|p| ct.insert(keys(src, p, p).0, keys(src, p, p).1, 0, 0).unwrap()).collect();
        assert_eq!(ct.early.sources.count(src), 10);
        for id in &ids[..7] {
            establish(&mut ct, *id, 0);
        }
        ct.remove(ids[9]);
        ct.prune_unassured(100);
        assert_eq!((ct.unassured_len(), ct.early.sources.count(src)), (2, 2));
    }

    #[test]
    fn source_counts_agree_with_a_model() {
        use proptest::prelude::*;
        proptest!(ProptestConfig { cases: 256, ..ProptestConfig::default() }, |(ops in proptest::collection::vec((any::<bool>(), 0u32..40), 1..300))| {
            let mut s = Sources::new(32);
            let mut model = std::collections::HashMap::new();
            for (inc, k) in ops {
                let a = Ipv4Addr::from(k.wrapping_mul(0x0100_0001));
                if inc && model.values().sum::<u32>() < 32 {
                    s.inc(a);
                    *model.entry(a).or_insert(0) += 1;
                } else if !inc {
                    s.dec(a);
                    if let Some(c) = model.get_mut(&a) {
                        *c -= 1;
                        if *c == 0 {
                            model.remove(&a);
                        }
                    }
                }
                for j in 0..40u32 {
                    let b = Ipv4Addr::from(j.wrapping_mul(0x0100_0001));
                    prop_assert_eq!(s.count(b), model.get(&b).copied().unwrap_or(0));
                }
            }
        });
    }

    #[test]
    fn memory_per_flow_is_as_documented() {
        assert_eq!(MEMORY_PER_FLOW, 42);
        assert_eq!(default_quota(65536), 512);
        assert_eq!(default_quota(100), 16);
    }
}
