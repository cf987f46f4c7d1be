//! The packet pipeline: a plain function over a batch of frames from one port, the node's
//! [`Tables`] and `now`. Every frame ends in exactly one [`Disposition`]; every drop has a
//! [`DropReason`] and is counted against the ingress port.
//!
//! The stages, one file each, named as a VPP node graph (who calls whom; `─►` passes the
//! frame on, and each stage may end it instead with the dispositions listed under it):
//!
//! ```text
//! process_batch ─► classify ─┬─ pod/host port: L2 checks ─┬─ ARP ─► reply::arp ......... Forward(ingress) | Drop
//!   (mod.rs)   (classify.rs) │                            └─ IPv4 ─► validate ─► service_nat ─┬─► route
//!                            │                            (validate.rs)     (service_nat/)    └─► outside::to_outside
//!                            └─ uplink ─┬─ Service from outside ─► outside ─► validate ─► service_nat ─► route
//!                                       │                        (outside.rs)
//!                                       └─ VXLAN ─► decap ─► validate ─► service_nat ─┬─► route
//!                                                  (decap.rs → vxlan/decap.rs)        └─► outside::to_outside
//!
//! route::forward ─┬─ host / outside the cluster ─► deliver_host ....................... ToHost
//!   (route.rs)    ├─ TTL 1 ─► reply::time_exceeded ─► egress
//!                 └─ pod / remote node (TTL − 1) ─► egress ─┬─ too large ─► oversize ─┬─ Spilled (segments, fragments)
//!                                                           │          (oversize.rs)  ├─ reply::frag_needed ─► egress
//!                                                           │                         └─ Drop(spill_full, ...)
//!                                                           ├─ local pod ─► deliver_pod ........ Forward(pod port)
//!                                                           ├─ host ─► deliver_host ............ ToHost
//!                                                           └─ remote node ─► encap ............ Forward(uplink)
//!                                                                   (encap.rs → vxlan/encap.rs)
//! service_nat ─► Answered: reply::tcp_reset | reply::port_unreachable ─► egress;
//!                reply::tcp_reset_outside .......................................... Forward(uplink)
//! outside::to_outside ........................................................ Forward(uplink)
//! ```
//!
//! Where each [`Disposition`] comes from: `Forward(port)` from `egress` (a pod, or the uplink
//! after `encap`), from `reply::arp` (the ingress port), and from `outside` and
//! `reply::tcp_reset_outside` (the uplink, straight back to a client outside); `ToHost` from
//! `route::deliver_host`; `Spilled` from `oversize` only; `Drop(reason)` from any stage (each
//! file's contract names its reasons) and from `process_batch` (`port_unknown`).
//!
//! Every stage reads and writes packets through `wire`'s views only; the facts validation
//! establishes travel on as `ctx::Ipv4Meta`, with the per-batch context `ctx::Ctx`.
//! Nothing here allocates, locks or makes a syscall per packet, and nothing panics on any
//! input: lengths are checked once by the `wire` views and every failure maps to a reason.

mod backends;
mod classify;
mod counters;
mod ctx;
mod decap;
mod drop;
mod encap;
mod frame;
mod outside;
mod oversize;
mod reply;
mod route;
mod service_nat;
mod spill;
mod validate;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod flood_tests;
#[cfg(test)]
mod service_tests;

pub use backends::{BackendTable, EndpointKey, FrontendKey};
pub(crate) use classify::vlan_error;
pub use counters::{BackendCounters, Counters, EventCounters, PortCounters};
pub use drop::DropReason;
pub use frame::FrameBuf;
pub use spill::Spill;
pub(crate) use validate::check_ipv4_header;

use crate::conntrack::{FlowKey, KeyHash};
use crate::tables::{PortId, PortKind, Tables};
use crate::wire::vxlan::ENCAP_OVERHEAD;
use crate::wire::{ethernet, Ipv4Packet};

/// Monotonic time in nanoseconds, passed in by the caller (never read inside stages).
pub type Nanos = u64;

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transmit the (rewritten) frame on this port. The uplink for VXLAN, a pod port, or the
    /// ingress port itself for replies (ARP).
    Forward(PortId),
    /// Transmit on the host port, into this node's own stack.
    ToHost,
    /// Drop, counted under this reason.
    Drop(DropReason),
    /// The frame was too large for its egress and was replaced by segments or fragments, now
    /// in the worker's spill area (`WorkerState::spill`) with their egress ports; the frame
    /// itself is done with.
    Spilled,
}

/// ICMP error generation limit, as Linux's `icmp_msgs_per_sec` / `icmp_msgs_burst`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    per_sec: u64,
    burst: u64,
    tokens: u64,
    last: Nanos,
}

impl TokenBucket {
    pub(crate) fn new(per_sec: u64, burst: u64) -> Self {
        TokenBucket { per_sec, burst, tokens: burst, last: 0 }
    }
    pub(crate) fn take(&mut self, now: Nanos) -> bool {
        if self.per_sec > 0 && now > self.last {
            let interval = 1_000_000_000 / self.per_sec;
            let add = (now - self.last) / interval.max(1);
            if add > 0 {
                self.tokens = (self.tokens + add).min(self.burst);
                self.last += add * interval;
                if self.tokens == self.burst {
                    self.last = now;
                }
            }
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }
}

/// Per-worker mutable state: counters, the outer IPv4 ident counter, the ICMP limiter.
#[derive(Debug)]
pub struct WorkerState {
    pub counters: Counters,
    ident: u16,
    icmp_limit: TokenBucket,
    /// This worker's tracked connections (Service NAT).
    pub flows: crate::conntrack::ConnTrack,
    /// SNAT ports, held after their flows end (incident 2).
    pub snat: crate::nat::snat::SnatAllocator,
    /// ClientIP session affinity: (frontend, client) -> (endpoint, expiry); bounded, O(1)
    /// expiry (`nat::affinity`).
    pub affinity: crate::nat::affinity::AffinityTable,
    /// First fragments' translations, for the fragments after them (`nat::fragments`).
    pub fragments: crate::nat::fragments::Fragments,
    /// Segments and fragments of oversized frames, for the worker to send and clear.
    pub spill: Spill,
    /// A capture or trace in progress (`None`: the pipeline does not look).
    pub observe: Option<Box<crate::observe::Observe>>,
    /// Handshake outcomes per Service endpoint (touched on SYNs, SYN|ACKs and expiries only),
    /// kept while the endpoint is in the tables (`backends.rs`).
    pub backends: BackendTable,
    /// SNAT destinations (pools) beyond which `maintain` forgets idle ones.
    snat_compact_at: usize,
}

/// (protocol, frontend address, frontend port, client address).
pub type AffinityKey = crate::nat::affinity::Key;

/// Conntrack tables larger than this are prefetched batch by batch.
const PREFETCH_FROM_FLOWS: usize = 4096;
/// Frames of a batch that get a prefetch pass and a key hint.
const HINTS: usize = 64;

/// Affinity entries reclaimed per batch at most (and per `maintain` call): more than a batch
/// can add, so expired entries never pile up, and a bounded cost per batch.
const AFFINITY_EXPIRE_PER_BATCH: usize = 2 * HINTS;
/// Endpoint counters looked at per `maintain` call (`BackendTable::prune`).
const BACKENDS_PRUNE_PER_CALL: usize = 4;
/// Unassured-flow list nodes looked at per `maintain` call, per flow slot the sweep looks at
/// (`ConnTrack::prune_unassured`): each is a flow read out of order, so fewer than the sweep's.
const UNASSURED_PRUNE_DIVISOR: usize = 2;
/// SNAT destinations kept before idle ones are forgotten (then twice what is left).
const SNAT_COMPACT_FROM: usize = 1024;

/// Default flows per worker (`ConnTrack::memory_per_flow` bytes each at capacity: ~207).
pub const DEFAULT_FLOWS: usize = 65536;

impl WorkerState {
    /// `worker` seeds the IPv4 ident sequence so workers do not emit the same idents in step.
    pub fn new(worker: u16) -> Self {
        Self::with_flows(worker, DEFAULT_FLOWS)
    }

    /// A worker tracking at most `flows` connections.
    pub fn with_flows(worker: u16, flows: usize) -> Self {
        Self::with_flows_and_timeouts(worker, flows, crate::conntrack::Timeouts::default())
    }

    /// A worker tracking at most `flows` connections with these timeouts, remembering as many
    /// ClientIP-affinity clients as it tracks flows, from 1,024 up to
    /// `nat::affinity::DEFAULT_CAPACITY` (65,536: 3.5 MiB). (A small flow table, as tests and
    /// the fuzzer build one per input, gets a small affinity table too.)
    pub fn with_flows_and_timeouts(worker: u16, flows: usize, timeouts: crate::conntrack::Timeouts) -> Self {
        let affinity = flows.clamp(1024, crate::nat::affinity::DEFAULT_CAPACITY);
        Self::with_capacities(worker, flows, affinity, timeouts)
    }

    /// A worker tracking at most `flows` connections and remembering at most `affinity`
    /// ClientIP-affinity clients (`nat::affinity`), with these timeouts.
    pub fn with_capacities(worker: u16, flows: usize, affinity: usize, timeouts: crate::conntrack::Timeouts) -> Self {
        WorkerState {
            flows: crate::conntrack::ConnTrack::new(flows, timeouts),
            affinity: crate::nat::affinity::AffinityTable::new(affinity),
            fragments: crate::nat::fragments::Fragments::default(),
            snat: crate::nat::snat::SnatAllocator::with_defaults(
                u64::from(worker).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed,
            ),
            counters: Counters::default(),
            ident: worker.wrapping_mul(0x9e37),
            icmp_limit: TokenBucket::new(1000, 50),
            spill: Spill::default(),
            observe: None,
            backends: BackendTable::default(),
            snat_compact_at: SNAT_COMPACT_FROM,
        }
    }

    /// The stages' view of this state for a batch received on `ingress`.
    fn ctx<'a>(&'a mut self, tables: &'a Tables, now: Nanos, ingress: PortId) -> ctx::Ctx<'a> {
        let WorkerState {
            counters, ident, icmp_limit, flows, snat, affinity, fragments, spill, observe, backends, ..
        } = self;
        ctx::Ctx {
            tables,
            now,
            ingress,
            ident,
            icmp_limit,
            counters: counters.port_mut(ingress),
            flows,
            snat,
            affinity,
            fragments,
            spill,
            observe: observe.as_deref_mut(),
            backends,
            hint: None,
        }
    }

    /// Sets the ICMP error rate limit (messages per second, burst).
    pub fn set_icmp_limit(&mut self, per_sec: u64, burst: u64) {
        self.icmp_limit = TokenBucket::new(per_sec, burst);
    }
}

/// Runs a batch of frames received on `ingress` through the pipeline, writing one
/// disposition per frame into `out` (which must be at least as long as `frames`; extra frames
/// are left untouched and unprocessed).
pub fn process_batch(
    tables: &Tables,
    state: &mut WorkerState,
    now: Nanos,
    ingress: PortId,
    frames: &mut [FrameBuf<'_>],
    out: &mut [Disposition],
) {
    let n = frames.len().min(out.len());
    let mut bytes = 0u64;
    for f in frames[..n].iter() {
        bytes += f.len() as u64;
    }
    if let Some(o) = state.observe.as_deref_mut() {
        o.before(ingress, frames[..n].iter().map(|f| f.data()));
    }
    // Expired affinity entries go a few per batch, from the heads of the expiry queues: never
    // a scan, however many clients a flood brought.
    state.affinity.expire(now, AFFINITY_EXPIRE_PER_BATCH);
    // Expiry costs a few slots per batch: a full pass over the table every capacity/8 batches.
    state.flows.sweep(now, 8);
    let port = state.counters.port_mut(ingress);
    port.rx(n as u64, bytes);
    let Some(entry) = tables.port(ingress).copied() else {
        for o in out[..n].iter_mut() {
            *o = Disposition::Drop(DropReason::PortUnknown);
        }
        port.drops[DropReason::PortUnknown.index()] += n as u64;
        return;
    };
    // Prefetch stages (VPP style): each frame's conntrack bucket, then its flow, for the whole
    // batch before any lookup; the misses overlap and the lookups below hit cache. Only worth it
    // once the table outgrows the caches.
    const NO_HINT: Option<(FlowKey, KeyHash)> = None;
    let mut hints = [NO_HINT; HINTS];
    if state.flows.len() > PREFETCH_FROM_FLOWS {
        let uplink = entry.kind == PortKind::Uplink;
        let mut hashes =
            [KeyHash::of(&FlowKey { proto: 0, src: [0; 4].into(), dst: [0; 4].into(), sport: 0, dport: 0 }); HINTS];
        let mut k = 0;
        for (f, hint) in frames[..n.min(HINTS)].iter().zip(hints.iter_mut()) {
            if let Some(key) = peek_flow_key(f.data(), uplink) {
                let h = state.flows.hash(&key);
                *hint = Some((key, h));
                hashes[k] = h;
                k += 1;
            }
        }
        state.flows.prefetch_buckets(&hashes[..k]);
        state.flows.prefetch_flows(&hashes[..k]);
    }
    // Borrowed once per batch: per-packet counting is a plain add, no lookup.
    let mut ctx = state.ctx(tables, now, ingress);
    release_expired(&mut ctx);
    let observing = ctx.observe.is_some();
    for (i, (frame, o)) in frames[..n].iter_mut().zip(out[..n].iter_mut()).enumerate() {
        ctx.hint = hints.get(i).copied().flatten();
        let spilled_from = if observing { observe_before(&mut ctx, i) } else { 0 };
        let d = classify::process_one(&mut ctx, &entry, frame);
        if let Disposition::Drop(r) = d {
            ctx.counters.drops[r.index()] += 1;
        }
        if observing {
            if let Some(ob) = ctx.observe.as_deref_mut() {
                observe_after(ob, tables, i, d, frame, ctx.spill, spilled_from);
            }
        }
        *o = d;
    }
    release_expired(&mut ctx);
}

/// Tells the observer which frame comes next; returns where its spilled packets will start.
#[cold]
fn observe_before(ctx: &mut ctx::Ctx<'_>, i: usize) -> usize {
    if let Some(ob) = ctx.observe.as_deref_mut() {
        ob.frame = i;
    }
    ctx.spill.len()
}

/// Tells the observer what became of frame `i`: its verdict and what left where.
#[cold]
fn observe_after(
    ob: &mut crate::observe::Observe,
    tables: &Tables,
    i: usize,
    d: Disposition,
    frame: &FrameBuf<'_>,
    spill: &Spill,
    spilled_from: usize,
) {
    match d {
        Disposition::Forward(p) => ob.after(i, d, core::iter::once((p, frame.data()))),
        Disposition::ToHost => match tables.host() {
            Some(h) => ob.after(i, d, core::iter::once((h.port, frame.data()))),
            None => ob.after(i, d, core::iter::empty()),
        },
        Disposition::Spilled => ob.after(i, d, spill.packets().skip(spilled_from).map(|(b, p)| (p, b))),
        Disposition::Drop(_) => ob.after(i, d, core::iter::empty()),
    }
}

/// A cheap guess at the conntrack key of a frame (TCP/UDP over untagged IPv4 at the usual
/// offsets; for the uplink, inside VXLAN behind option-less outer headers). Only a hint for the
/// touch pass: a wrong guess costs one wasted load, never a wrong decision.
#[inline]
fn peek_flow_key(d: &[u8], uplink: bool) -> Option<FlowKey> {
    let at = if uplink { ENCAP_OVERHEAD + ethernet::HEADER_LEN } else { ethernet::HEADER_LEN };
    let ip = d.get(at..)?;
    let h = Ipv4Packet::new_fixed(ip).ok()?;
    if h.version() != 4 {
        return None;
    }
    let (sport, dport) = Ipv4Packet::new_unchecked(ip).ports()?;
    Some(FlowKey { proto: h.protocol().into(), src: h.src_addr(), dst: h.dst_addr(), sport, dport })
}

/// Flows that expired (found by the sweep or on lookup) give back their SNAT ports, held from
/// the moment each flow expired (not when it was noticed).
fn release_expired(ctx: &mut ctx::Ctx<'_>) {
    let mut gone = ctx.flows.take_expired();
    for f in gone.drain(..) {
        let ended = f.expires_at;
        if f.state == crate::conntrack::FlowState::Tcp(crate::conntrack::TcpState::SynSent) {
            ctx.backends
                .entry((f.reply.src, f.reply.sport), (f.orig.proto, f.orig.dst, f.orig.dport))
                .syn_unanswered += 1;
        }
        service_nat::release_snat(ctx, &f, ended);
    }
    ctx.flows.recycle_expired(gone);
}

/// Housekeeping between batches (the worker calls it every pass, busy or idle): expires up to
/// `budget` flow slots, releasing their SNAT ports and counting SYNs that were never answered,
/// so flows expire on time even when no traffic arrives to sweep them.
pub fn maintain(tables: &Tables, state: &mut WorkerState, now: Nanos, budget: usize) {
    state.flows.sweep(now, budget);
    release_expired(&mut state.ctx(tables, now, tables.uplink()));
    // Bounded state under floods and churn, each a few entries per call (issue 17): expired
    // affinity clients, the unassured-flow list's per-source counts, counters of endpoints
    // that left the tables, and SNAT pools of destinations gone idle.
    state.affinity.expire(now, AFFINITY_EXPIRE_PER_BATCH);
    state.flows.prune_unassured(budget / UNASSURED_PRUNE_DIVISOR);
    state.backends.prune(tables, BACKENDS_PRUNE_PER_CALL);
    if state.snat.pools() > state.snat_compact_at {
        // Amortized O(1) per destination created: the pass runs only once the pools doubled
        // since the last one. Exhaustion counts stay while their endpoint has counters.
        let backends = &state.backends;
        state.snat.compact_where(now, |d| backends.contains(&(d.backend_ip, d.backend_port)));
        state.snat_compact_at = (2 * state.snat.pools()).max(SNAT_COMPACT_FROM);
    }
}

/// What `restore` made of the flows of an earlier process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    pub flows: usize,
    /// Tuples held again for flows that had already left the table (`retired`).
    pub held: usize,
    /// Not tracked again: a key already tracked, or the table full (a smaller `max_flows`).
    pub refused: usize,
}

/// Carries over the flows an earlier process tracked (a restart): each is tracked again with
/// its NAT state and its timer restarted, and its SNAT tuple is marked in use, or held, so it
/// is never handed out again while the backend may hold it. Call before the first batch.
///
/// `retired` are flows that had left the table while their tuple was still held
/// (`ConnTrack::retire`, their `expires_at` the hold's end on this clock): each tuple no
/// restored flow uses or holds is held again until then.
pub fn restore(
    state: &mut WorkerState,
    flows: impl IntoIterator<Item = crate::conntrack::Flow>,
    retired: impl IntoIterator<Item = crate::conntrack::Flow>,
    now: Nanos,
) -> Restored {
    let mut r = Restored::default();
    let mut taken = ahash::AHashSet::new();
    for f in flows {
        match state.flows.restore(f.clone(), now) {
            Ok(_) => {
                if let Some((d, port, hold)) = service_nat::snat_restore_of(&state.snat, &f, now) {
                    taken.insert((d, port));
                    state.snat.restore(d, port, hold);
                }
                r.flows += 1;
            }
            Err(_) => r.refused += 1,
        }
    }
    for f in retired {
        let Some((d, port, Some((_, mark)))) = service_nat::snat_restore_of(&state.snat, &f, now) else { continue };
        if f.expires_at > now && taken.insert((d, port)) {
            state.snat.restore(d, port, Some((f.expires_at, mark)));
            r.held += 1;
        }
    }
    r
}

/// Convenience for one frame (tests, tools); the batch function is the hot path.
pub fn process_frame(
    tables: &Tables,
    state: &mut WorkerState,
    now: Nanos,
    ingress: PortId,
    frame: &mut FrameBuf<'_>,
) -> Disposition {
    let mut out = [Disposition::Drop(DropReason::PortUnknown)];
    process_batch(tables, state, now, ingress, core::slice::from_mut(frame), &mut out);
    out[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(1000, 3);
        assert!(b.take(0) && b.take(0) && b.take(0));
        assert!(!b.take(0));
        assert!(!b.take(500_000)); // half a token
        assert!(b.take(1_000_000));
        assert!(!b.take(1_000_000));
        // Long idle refills to the burst, not beyond.
        for _ in 0..3 {
            assert!(b.take(10_000_000_000));
        }
        assert!(!b.take(10_000_000_000));
    }
}
