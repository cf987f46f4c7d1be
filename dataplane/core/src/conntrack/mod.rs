//! Connection tracking: flows keyed by 5-tuple in both directions, a TCP state machine after
//! Linux nf_conntrack's (with its default timeouts), UDP and ICMP echo pseudo-states, expiry
//! with `now` passed in, and a bounded table: when it is full a new flow takes the slot of an
//! unassured one (a handshake that never completed, UDP never answered; `early_drop.rs`, with a
//! per-source quota), or, when none may go, is refused (the caller drops the packet with a named
//! reason); an established flow is never evicted.
//!
//! Storage: flows live in a slab of fixed capacity; a hash index maps each direction's key to
//! its slot. Expired flows are removed lazily on lookup and by an incremental sweep, and handed
//! back to the caller (so it can release their SNAT ports) through `take_expired`.

mod early_drop;
mod index;
mod journal;
pub mod record;
mod tcp;

pub use index::KeyHash;
pub use tcp::{TcpEvent, TcpState};

use crate::wire::{IpProtocol, TcpFlags};
use core::net::Ipv4Addr;

const S: u64 = 1_000_000_000;

/// A flow key: protocol and both endpoints. For ICMP echo, `sport` is the echo identifier and
/// `dport` is 0, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    /// The key of packets travelling the other way between the same endpoints.
    pub fn reversed(&self) -> FlowKey {
        if IpProtocol::from(self.proto) == IpProtocol::Icmp {
            return FlowKey { proto: self.proto, src: self.dst, dst: self.src, sport: self.sport, dport: 0 };
        }
        FlowKey { proto: self.proto, src: self.dst, dst: self.src, sport: self.dport, dport: self.sport }
    }
}

/// Direction of a packet relative to the flow's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Orig,
    Reply,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Orig => 0,
            Dir::Reply => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    Tcp(TcpState),
    /// UDP seen in one direction only.
    UdpUnreplied,
    /// UDP seen both ways.
    UdpReplied,
    /// ICMP echo request/reply, or any other protocol.
    Other,
}

impl FlowState {
    pub fn name(&self) -> &'static str {
        match self {
            FlowState::Tcp(t) => t.name(),
            FlowState::UdpUnreplied => "UNREPLIED",
            FlowState::UdpReplied => "ASSURED",
            FlowState::Other => "-",
        }
    }
}

/// Timeouts, in nanoseconds; defaults are those of a node running kube-proxy: nf_conntrack's,
/// except established TCP (24 h) and CLOSE_WAIT (1 h), which kube-proxy sets
/// (`conntrack.tcpEstablishedTimeout`, `tcpCloseWaitTimeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: u64,
    pub tcp_syn_recv: u64,
    pub tcp_established: u64,
    pub tcp_fin_wait: u64,
    pub tcp_close_wait: u64,
    pub tcp_last_ack: u64,
    pub tcp_time_wait: u64,
    pub tcp_close: u64,
    pub udp: u64,
    pub udp_stream: u64,
    pub other: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 120 * S,
            tcp_syn_recv: 60 * S,
            tcp_established: 86_400 * S,
            tcp_fin_wait: 120 * S,
            tcp_close_wait: 3_600 * S,
            tcp_last_ack: 30 * S,
            tcp_time_wait: 120 * S,
            tcp_close: 10 * S,
            udp: 30 * S,
            udp_stream: 120 * S,
            other: 30 * S,
        }
    }
}

impl Timeouts {
    fn of(&self, s: FlowState) -> u64 {
        match s {
            FlowState::Tcp(t) => match t {
                TcpState::SynSent => self.tcp_syn_sent,
                TcpState::SynRecv => self.tcp_syn_recv,
                TcpState::Established => self.tcp_established,
                TcpState::FinWait => self.tcp_fin_wait,
                TcpState::CloseWait => self.tcp_close_wait,
                TcpState::LastAck => self.tcp_last_ack,
                TcpState::TimeWait => self.tcp_time_wait,
                TcpState::Close => self.tcp_close,
            },
            FlowState::UdpUnreplied => self.udp,
            FlowState::UdpReplied => self.udp_stream,
            FlowState::Other => self.other,
        }
    }
}

/// One tracked connection. Laid out (C order) so that what a lookup and the per-packet
/// update touch (both keys, state, expiry, tag, packet counts) fills the first cache line of
/// its 64-byte aligned slot; byte counts and creation time are on the second.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C)]
pub struct Flow {
    /// The key of the first packet (as it arrived, before NAT).
    pub orig: FlowKey,
    /// The key reply packets arrive with (after NAT: from the backend, to the SNAT address).
    pub reply: FlowKey,
    pub state: FlowState,
    pub expires_at: u64,
    /// Opaque data of the caller's (its NAT decision, e.g. a backend and SNAT port).
    pub tag: u64,
    /// Packets and bytes, original then reply direction.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub created: u64,
    /// The MSS each side announced in its SYN (original, then reply direction); 0: unknown.
    pub mss: [u16; 2],
    /// TCP: the direction of the first FIN (the side that closed first holds TIME_WAIT).
    pub first_fin: Option<Dir>,
    /// The caller's SNAT tuple was already given back (when the flow closed, before it
    /// expires from the table): not to be released again.
    pub snat_released: bool,
    /// Service NAT: the original direction's last sequence number end and TSval as the
    /// endpoint saw them, recorded once the flow is closing (for reusing its SNAT tuple).
    pub mark: Option<crate::nat::snat::Mark>,
    /// Service NAT: sequence and timestamp offsets of a flow on a reused SNAT tuple.
    pub adj: crate::nat::seqadj::SeqAdj,
    /// Service NAT: the endpoint sent a FIN before it had the client's (it closed first, or
    /// both closed at once): it will hold the tuple in TIME_WAIT.
    pub endpoint_time_wait: bool,
    /// Service NAT: the Service table epoch (`ServiceTable::epoch`) in which this flow's
    /// endpoint was last confirmed; [`UNCHECKED`] for a flow never checked (restored, or just
    /// inserted). A hit under another checks again (`service_nat::recheck`).
    pub checked: u32,
    /// Service NAT: at the last check, the endpoint had left its Service (a TCP flow is kept
    /// until it ends, as kube-proxy keeps it; its packets are counted).
    pub endpoint_gone: bool,
}

/// `Flow::checked` of a flow whose endpoint was never checked against the tables.
pub const UNCHECKED: u32 = u32::MAX;

impl Flow {
    #[inline]
    fn key(&self, dir: Dir) -> &FlowKey {
        match dir {
            Dir::Orig => &self.orig,
            Dir::Reply => &self.reply,
        }
    }
}

/// A flow's storage: cache-line aligned, so a flow spans exactly the lines prefetched for it.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Slot(Option<Flow>);

/// Identifies a flow while it lives (a slot; reused after removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId(u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtError {
    /// The table is at capacity: the new flow is refused.
    Full,
    /// One of the two keys is already tracked.
    Exists,
}

#[derive(Debug)]
pub struct ConnTrack {
    slots: Vec<Slot>,
    free: Vec<u32>,
    index: index::Index,
    timeouts: Timeouts,
    sweep_at: usize,
    expired: Vec<Flow>,
    /// What the index's hashes are keyed with (random per table).
    hash_key: index::HashKey,
    /// An empty buffer with room, swapped in for `expired` by `take_expired`
    /// (`recycle_expired` gives it back): no allocation per batch with expiries.
    expired_spare: Vec<Flow>,
    /// Slots whose persistent fields changed since the last `drain_journal` (when enabled).
    journal: Option<journal::Journal>,
    /// Unassured flows, for early drop when the table is full (`early_drop.rs`).
    early: early_drop::EarlyDrop,
}

impl ConnTrack {
    /// A table for at most `capacity` flows (memory is reserved up front).
    /// Capacity is capped at what the index can address (2^31 - 1 flows).
    pub fn new(capacity: usize, timeouts: Timeouts) -> ConnTrack {
        let capacity = capacity.min(index::Index::MAX_SLOTS);
        let mut slots = Vec::with_capacity(capacity);
        crate::cpu::advise_huge_pages(&slots);
        slots.resize_with(capacity, || Slot(None));
        ConnTrack {
            slots,
            free: (0..capacity as u32).rev().collect(),
            index: index::Index::with_capacity(capacity * 2),
            timeouts,
            sweep_at: 0,
            expired: Vec::new(),
            hash_key: index::HashKey::random(),
            expired_spare: Vec::new(),
            journal: None,
            early: early_drop::EarlyDrop::new(capacity),
        }
    }

    /// Starts recording which slots change (a flow created, removed, its state or NAT fields
    /// changed; not its counters or timer), for `drain_journal`. Every live flow is recorded
    /// as changed, so the first drain writes the whole table.
    pub fn enable_journal(&mut self) {
        let mut j = journal::Journal::new(self.slots.len());
        // The scan ends at the last live flow: a restarted worker enables the journal with
        // its carried flows in the lowest slots (the free list hands them out in order), and
        // reading the whole table (tens of MB) would lengthen a takeover's gap.
        let mut left = self.len();
        for (i, s) in self.slots.iter().enumerate() {
            if left == 0 {
                break;
            }
            if s.0.is_some() {
                j.mark(i as u32);
                left -= 1;
            }
        }
        self.journal = Some(j);
    }

    /// Hands each slot changed since the last call, with its flow (`None`: now empty), to
    /// `write`, once per slot, and forgets them. Nothing if the journal is not enabled.
    pub fn drain_journal(&mut self, mut write: impl FnMut(u32, Option<&Flow>)) {
        let Some(j) = self.journal.as_mut() else { return };
        let slots = &self.slots;
        j.drain(|slot| write(slot, slots.get(slot as usize).and_then(|s| s.0.as_ref())));
    }

    /// Records, when the journal is enabled, that `f` left the table while the backend may
    /// hold its SNAT tuple until `held_until` (then in its `expires_at`; `snat_released` set):
    /// a successor must keep holding the tuple though no flow carries it
    /// (`drain_retired`). Called per connection that ends so, never per packet.
    pub fn retire(&mut self, f: &Flow, held_until: u64) {
        if let Some(j) = self.journal.as_mut() {
            j.retired.push(Flow { expires_at: held_until, snat_released: true, ..f.clone() });
        }
    }

    /// Hands each flow retired since the last call to `write`, and forgets them.
    pub fn drain_retired(&mut self, mut write: impl FnMut(&Flow)) {
        if let Some(j) = self.journal.as_mut() {
            for f in j.retired.drain(..) {
                write(&f);
            }
        }
    }

    #[inline]
    fn changed(&mut self, slot: u32) {
        if let Some(j) = self.journal.as_mut() {
            j.mark(slot);
        }
    }

    /// Tracks a flow carried over from an earlier process (`record::decode`), every field as
    /// it was (its creation time already shifted to this clock) except its timer, which
    /// restarts: the record holds the timer of the flow's last state change, not of its last
    /// packet, so a live UDP stream would otherwise come back expired. Refused like `insert`
    /// when a key is already tracked or the table is full.
    pub fn restore(&mut self, mut f: Flow, now: u64) -> Result<FlowId, CtError> {
        f.expires_at = now.saturating_add(self.timeouts.of(f.state));
        let (ho, hr) = (self.hash(&f.orig), self.hash(&f.reply));
        if f.orig == f.reply || self.find(&f.orig, ho).is_some() || self.find(&f.reply, hr).is_some() {
            return Err(CtError::Exists);
        }
        let Some(slot) = self.free.pop() else {
            return Err(CtError::Full);
        };
        self.slots[slot as usize] = Slot(Some(f));
        self.index.insert(ho, slot, Dir::Orig);
        self.index.insert(hr, slot, Dir::Reply);
        self.changed(slot);
        Ok(FlowId(slot))
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of memory per flow at capacity: its slot, its index buckets (two keys per flow,
    /// the index at most half full), early drop's bookkeeping, and the journal's (a list
    /// entry and a bit, when enabled, as a daemon keeping a flow file has it).
    pub fn memory_per_flow() -> usize {
        core::mem::size_of::<Slot>()
            + 4 * index::Index::entry_size()
            + Self::early_drop_memory_per_flow()
            + core::mem::size_of::<u32>()
            + 1
    }

    /// Batch prefetch, stage 1 (VPP style): the index bucket of each key. Non-blocking: the
    /// misses of a whole batch overlap.
    #[inline]
    pub fn prefetch_buckets(&self, hashes: &[KeyHash]) {
        for &h in hashes {
            self.index.prefetch(h);
        }
    }

    /// Stage 2: read the (now cached) buckets and prefetch the flows they point to.
    #[inline]
    pub fn prefetch_flows(&self, hashes: &[KeyHash]) {
        for &h in hashes {
            if let Some(slot) = self.index.home_slot(h) {
                if let Some(f) = self.slots.get(slot as usize) {
                    crate::cpu::prefetch_first_line(f);
                }
            }
        }
    }

    /// The index entry for `key`, confirmed against the key its flow holds.
    #[inline]
    fn find(&self, key: &FlowKey, h: KeyHash) -> Option<(u32, Dir)> {
        let slots = &self.slots;
        self.index.get(h, |s, d| slots.get(s as usize).and_then(|x| x.0.as_ref()).is_some_and(|f| f.key(d) == key))
    }

    /// Starts tracking a flow whose first packet had key `orig` and whose replies will carry
    /// `reply`.
    pub fn insert(&mut self, orig: FlowKey, reply: FlowKey, now: u64, tag: u64) -> Result<FlowId, CtError> {
        let (ho, hr) = (self.hash(&orig), self.hash(&reply));
        if orig == reply || self.find(&orig, ho).is_some() || self.find(&reply, hr).is_some() {
            return Err(CtError::Exists);
        }
        // Full: take the slot of an unassured flow if one may go (`early_drop.rs`).
        let Some(slot) = self.free.pop().or_else(|| self.early_drop(orig.src, now)) else {
            return Err(CtError::Full);
        };
        let state = match IpProtocol::from(orig.proto) {
            IpProtocol::Tcp => FlowState::Tcp(TcpState::SynSent),
            IpProtocol::Udp => FlowState::UdpUnreplied,
            _ => FlowState::Other,
        };
        let expires_at = now.saturating_add(self.timeouts.of(state));
        self.slots[slot as usize] = Slot(Some(Flow {
            orig,
            reply,
            state,
            created: now,
            expires_at,
            packets: [0; 2],
            bytes: [0; 2],
            tag,
            mss: [0; 2],
            first_fin: None,
            snat_released: false,
            mark: None,
            adj: crate::nat::seqadj::SeqAdj::NONE,
            endpoint_time_wait: false,
            checked: UNCHECKED,
            endpoint_gone: false,
        }));
        self.index.insert(ho, slot, Dir::Orig);
        self.index.insert(hr, slot, Dir::Reply);
        self.changed(slot);
        self.early.track(slot, orig.src, now);
        Ok(FlowId(slot))
    }

    /// The live flow a packet with `key` belongs to, and its direction. An expired flow is
    /// removed here (and queued for `take_expired`) and `None` returned.
    pub fn lookup(&mut self, key: &FlowKey, now: u64) -> Option<(FlowId, Dir)> {
        self.lookup_hashed(key, self.hash(key), now)
    }

    /// `lookup` with the key's hash already computed (by the batch's prefetch pass).
    #[inline]
    pub fn lookup_hashed(&mut self, key: &FlowKey, h: KeyHash, now: u64) -> Option<(FlowId, Dir)> {
        let (slot, dir) = self.find(key, h)?;
        let expired = self.slots[slot as usize].0.as_ref().is_none_or(|f| f.expires_at <= now);
        if expired {
            self.remove_slot(slot, true);
            return None;
        }
        Some((FlowId(slot), dir))
    }

    pub fn get(&self, id: FlowId) -> Option<&Flow> {
        self.slots.get(id.0 as usize)?.0.as_ref()
    }

    /// The flow, to change: recorded in the journal as changed (callers change NAT fields
    /// here, at a flow's start and end, not per packet).
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        self.changed(id.0);
        self.slots.get_mut(id.0 as usize)?.0.as_mut()
    }

    /// Accounts a packet of `len` bytes in direction `dir` (with its TCP flags for TCP),
    /// advances the state and restarts the timer. Returns what the TCP state machine noticed.
    pub fn update(&mut self, id: FlowId, dir: Dir, flags: TcpFlags, len: usize, now: u64) -> TcpEvent {
        let timeouts = self.timeouts;
        let Some(f) = self.slots.get_mut(id.0 as usize).and_then(|s| s.0.as_mut()) else {
            return TcpEvent::None;
        };
        f.packets[dir.index()] += 1;
        f.bytes[dir.index()] += len as u64;
        let (state, first_fin) = (f.state, f.first_fin);
        let mut event = TcpEvent::None;
        f.state = match f.state {
            FlowState::Tcp(t) => {
                if flags.contains(TcpFlags::FIN) && f.first_fin.is_none() {
                    f.first_fin = Some(dir);
                }
                let (next, ev) = t.next(dir, flags);
                // The flow's own first SYN is not a retransmission.
                event = if ev == TcpEvent::SynRetransmit && f.packets[0] <= 1 { TcpEvent::None } else { ev };
                FlowState::Tcp(next)
            }
            FlowState::UdpUnreplied if dir == Dir::Reply => FlowState::UdpReplied,
            s => s,
        };
        f.expires_at = now.saturating_add(timeouts.of(f.state));
        // The journal records state changes only: a restored flow's timer restarts anyway.
        if f.state != state || f.first_fin != first_fin {
            if state == FlowState::Tcp(TcpState::SynRecv) && f.state == FlowState::Tcp(TcpState::Established) {
                // A handshake completed: its client is known to early drop for a while.
                let src = f.orig.src;
                self.early.handshake_completed(src, now);
            }
            self.changed(id.0);
        }
        event
    }

    /// Removes the flow `key` belongs to if it is a TCP flow that has closed (TIME_WAIT or
    /// CLOSE), as a new connection on its tuple supersedes it (netfilter kills such an entry
    /// on a new SYN too). Returns it; `None` if there was none, or it is still open.
    pub fn evict_closed(&mut self, key: &FlowKey) -> Option<Flow> {
        let (slot, _) = self.find(key, self.hash(key))?;
        let closed = self
            .slots
            .get(slot as usize)?
            .0
            .as_ref()
            .is_some_and(|f| matches!(f.state, FlowState::Tcp(TcpState::TimeWait | TcpState::Close)));
        if closed {
            self.remove_slot(slot, false)
        } else {
            None
        }
    }

    /// Stops tracking a flow; returns it.
    pub fn remove(&mut self, id: FlowId) -> Option<Flow> {
        self.remove_slot(id.0, false)
    }

    fn remove_slot(&mut self, slot: u32, to_expired: bool) -> Option<Flow> {
        let f = self.slots.get_mut(slot as usize)?.0.take()?;
        let (ho, hr) = (self.hash(&f.orig), self.hash(&f.reply));
        self.index.remove(ho, slot, Dir::Orig);
        self.index.remove(hr, slot, Dir::Reply);
        self.free.push(slot);
        self.changed(slot);
        if to_expired {
            self.expired.push(f);
            None
        } else {
            Some(f)
        }
    }

    /// Examines up to `budget` slots from where the last sweep stopped and removes expired
    /// flows (queued for `take_expired`). Call regularly off the per-packet path; a full pass
    /// takes capacity / budget calls.
    pub fn sweep(&mut self, now: u64, budget: usize) {
        let n = self.slots.len();
        if n == 0 {
            return;
        }
        for _ in 0..budget.min(n) {
            let i = self.sweep_at;
            self.sweep_at = (self.sweep_at + 1) % n;
            if self.slots[i].0.as_ref().is_some_and(|f| f.expires_at <= now) {
                self.remove_slot(i as u32, true);
            }
        }
    }

    /// Flows removed because they expired since the last call (each exactly once).
    pub fn take_expired(&mut self) -> Vec<Flow> {
        core::mem::replace(&mut self.expired, core::mem::take(&mut self.expired_spare))
    }

    /// Gives back a buffer `take_expired` returned, emptied, for the next one.
    pub fn recycle_expired(&mut self, mut v: Vec<Flow>) {
        v.clear();
        if v.capacity() > self.expired_spare.capacity() {
            self.expired_spare = v;
        }
    }

    /// `key`'s hash in this table (keyed: `index::HashKey`), for `lookup_hashed` and the
    /// prefetch stages.
    #[inline]
    pub fn hash(&self, key: &FlowKey) -> KeyHash {
        KeyHash::keyed(key, self.hash_key)
    }

    /// Every live flow (for `vxnat ctl flows`).
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.slots.iter().filter_map(|s| s.0.as_ref())
    }
}

#[cfg(test)]
mod tests;
