//! The first packet of a connection to a Service frontend (the "in" side of Service NAT):
//! choose an endpoint as kube-proxy's rules say (ready endpoints first, terminating ones only
//! when none is ready, traffic policies, ClientIP affinity, Maglev), allocate a TIME_WAIT-safe
//! SNAT port where the endpoint could not answer the client directly, track the flow, and
//! rewrite the packet toward the endpoint.
//!
//! Contract: not a frontend: `Untouched`. A load balancer IP's client outside the Service's
//! `loadBalancerSourceRanges`: dropped (`lb_source_range`). None on this node under a Local
//! policy while other nodes have some: dropped (`service_no_local_endpoint`). No endpoint at
//! all: refused with ICMP port unreachable (`Answered`; to a client outside, straight back out
//! of the uplink), counted as `service_no_endpoint`. No SNAT port: TCP refused with a RST, UDP
//! dropped (`snat_ports_exhausted`). A flow that cannot be tracked (`conntrack_full`,
//! `conntrack_collision`) gives its SNAT port back and is dropped.
//!
//! Floods (issue 17): a full conntrack table, or every SNAT tuple toward the endpoint taken,
//! first evicts an unassured flow (a handshake that never completed; `conntrack::early_drop`,
//! counted as `conntrack_early_drops`) and is refused only when none may go. A ClientIP
//! affinity client is remembered only once its flow is tracked, in a table of fixed capacity
//! (`nat::affinity`; full: not remembered, counted as `affinity_full`).

use super::{Nat, TAG_UPLINK_RETURN};
use crate::conntrack::{CtError, Dir, FlowKey};
use crate::nat::seqadj::{self, SeqAdj};
use crate::nat::service::{FrontendKind, NoEndpoint};
use crate::nat::snat::{Destination, End, Grant, Mark};
use crate::pipeline::ctx::{Ctx, Ipv4Meta, Origin};
use crate::pipeline::{reply, DropReason, FrameBuf};
use crate::wire::{IpProtocol, MacAddr, TcpFlags, TcpPacket};

pub(super) fn new_flow(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &mut Ipv4Meta,
    key: FlowKey,
    flags: TcpFlags,
    origin: Origin,
    client_mac: Option<MacAddr>,
) -> Result<Nat, DropReason> {
    let tables = ctx.tables;
    let Some((sp, kind)) = tables.services().lookup(key.proto, key.dst, key.dport, tables.is_node_port_addr(key.dst))
    else {
        return Ok(Nat::Untouched);
    };
    if kind == FrontendKind::LoadBalancer && !sp.admits(key.src) {
        return Err(DropReason::LbSourceRange);
    }
    let tcp = m.protocol() == IpProtocol::Tcp;
    let from_outside = origin == Origin::Outside || !tables.node.cluster_cidr.contains(key.src);
    // ClientIP affinity: hash the client alone, so Maglev keeps it on one endpoint.
    let hash = match sp.affinity_ns {
        Some(_) => u64::from(u32::from(key.src)).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        None => u64::from(m.flow_hash()).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(m.flow_hash()),
    };
    // ClientIP affinity: the client's last endpoint while within the timeout and still a
    // candidate; otherwise a fresh choice, remembered once the flow is tracked (below).
    let affinity_key = (key.proto, key.dst, key.dport, key.src);
    let sticky = sp.affinity_ns.and_then(|_| {
        let e = ctx.affinity.get(&affinity_key, ctx.now)?;
        sp.still_usable(kind, from_outside, e)
    });
    let chosen = match sticky {
        Some(c) => Ok(c),
        None => sp.choose(kind, from_outside, hash),
    };
    let choice = match chosen {
        Ok(c) => c,
        Err(NoEndpoint::NoLocal) => return Err(DropReason::ServiceNoLocalEndpoint),
        Err(NoEndpoint::None) => {
            // kube-proxy's reject: ICMP port unreachable, TCP and UDP alike (a TCP client's
            // connect fails with "connection refused" as it would on a RST), from the Service
            // address; to a client outside, straight back to its next hop.
            // Counted once: here when answered (the frame leaves as the answer), by the caller
            // when not (rate-limited, or from outside with no next hop known to answer by).
            let answer = match client_mac.filter(|_| origin == Origin::Outside) {
                Some(mac) => reply::port_unreachable_outside(ctx, frame, m, key.dst, mac),
                None if origin == Origin::Outside => return Err(DropReason::ServiceNoEndpoint),
                None => reply::port_unreachable(ctx, frame, m, key.dst),
            };
            if answer.is_ok() {
                ctx.counters.drops[DropReason::ServiceNoEndpoint.index()] += 1;
            }
            return answer.map(Nat::Answered);
        }
    };
    let ep = choice.endpoint;
    // SNAT when the endpoint could not answer the client directly:
    // - hairpin: a pod reaching itself through its Service must see another source, or its
    //   kernel drops the packet as a martian;
    // - clients outside the cluster under externalTrafficPolicy Cluster: the endpoint, maybe on
    //   another node, must answer through this node, which holds the flow.
    // The SNAT address is this node's address on the pod network (its gateway, which every node
    // routes here over VXLAN), with a TIME_WAIT-safe port.
    let snat = ep.ip == key.src || (from_outside && !choice.preserve_client);
    let mut reuse = None;
    let (snat_ip, snat_port) = if snat {
        let d = Destination { proto: key.proto, snat_ip: tables.gateway(), backend_ip: ep.ip, backend_port: ep.port };
        let granted = match ctx.snat.try_allocate(d, ctx.now) {
            Some(g) => Ok(g),
            None => allocate_after_early_drop(ctx, d, key.src),
        };
        match granted {
            Ok(g) => {
                reuse = g.reuse;
                (tables.gateway(), g.port)
            }
            Err(_) if !tcp => return Err(DropReason::SnatPortsExhausted),
            Err(_) => {
                ctx.counters.drops[DropReason::SnatPortsExhausted.index()] += 1;
                let answer = match client_mac.filter(|_| origin == Origin::Outside) {
                    Some(mac) => reply::tcp_reset_outside(ctx, frame, m, mac),
                    None => reply::tcp_reset(ctx, frame, m),
                };
                return answer.map(Nat::Answered);
            }
        }
    } else {
        (key.src, key.sport)
    };
    let reply_key = FlowKey { proto: key.proto, src: ep.ip, dst: snat_ip, sport: ep.port, dport: snat_port };
    let tag = match client_mac {
        Some(mac) if origin == Origin::Outside => {
            let b = mac.0;
            TAG_UPLINK_RETURN | u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
        }
        _ => 0,
    };
    let (early_drops, spared) = (ctx.flows.early_drops(), ctx.flows.early_drop_spared());
    let mut inserted = ctx.flows.insert(key, reply_key, ctx.now, tag);
    if inserted == Err(CtError::Exists) && snat {
        // The tuple's previous flow has closed (its tuple was given back when it did) but is
        // still in the table, in TIME_WAIT or CLOSE: the new connection supersedes it.
        if ctx.flows.evict_closed(&reply_key).is_some() {
            inserted = ctx.flows.insert(key, reply_key, ctx.now, tag);
        }
    }
    let id = match inserted {
        Ok(id) => id,
        Err(e) => {
            if snat_ip != key.src {
                let d = Destination { proto: key.proto, snat_ip, backend_ip: ep.ip, backend_port: ep.port };
                // Never used: free at once, or, taken from a backend's TIME_WAIT, held again
                // with its mark (a SYN that never left cannot have moved the backend on).
                let end = if reuse.is_some() { End::BackendClosedFirst(reuse) } else { End::NotEstablished };
                ctx.snat.release(d, snat_port, ctx.now, end);
            }
            return Err(match e {
                CtError::Full => DropReason::ConntrackFull,
                CtError::Exists => DropReason::ConntrackCollision,
            });
        }
    };
    // A full table took the slot of an unassured flow (queued as expired: its SNAT tuple is
    // released with the batch's expired flows).
    let evicted = ctx.flows.early_drops() - early_drops;
    if evicted > 0 {
        ctx.events().conntrack_early_drops += evicted;
        ctx.events().early_drop_spared += ctx.flows.early_drop_spared() - spared;
    }
    ctx.flows.update(id, Dir::Orig, flags, m.total_len, ctx.now);
    let gen = super::generation(ctx);
    if let Some(f) = ctx.flows.get_mut(id) {
        // Chosen from these tables: confirmed in them.
        f.checked = gen;
    }
    if flags.contains(TcpFlags::SYN) {
        super::record_mss(ctx, frame, m, id, Dir::Orig);
    }
    ctx.events().service_flows += 1;
    if tcp && flags.contains(TcpFlags::SYN) {
        ctx.backends.entry((ep.ip, ep.port), (key.proto, key.dst, key.dport)).syns += 1;
    }
    if let Some(t) = sp.affinity_ns {
        // Only now that the flow exists: a refused connection leaves no trace here.
        if ctx.affinity.remember(affinity_key, (ep.ip, ep.port), t, ctx.now).is_err() {
            ctx.events().affinity_full += 1;
        }
    }
    super::rewrite(frame, m, (snat_ip, snat_port), (ep.ip, ep.port));
    if let Some(mark) = reuse {
        // A tuple the endpoint may still hold in TIME_WAIT: this flow's sequence numbers and
        // timestamps are offset for its whole life, so its SYN lands beyond the old connection.
        let adj = super::l4_of(frame, m).map_or(SeqAdj::NONE, |l4| reuse_offsets(mark, l4));
        if let Some(f) = ctx.flows.get_mut(id) {
            f.adj = adj;
            // Until this flow moves the endpoint on, the tuple's previous mark stands.
            f.mark = Some(mark);
        }
        super::seq_adjust(frame, m, adj, Dir::Orig)?;
    }
    Ok(Nat::Translated { dir: Dir::Orig, uplink_return: None })
}

/// How long a handshake must have waited before SNAT exhaustion may evict it: the initial SYN
/// retransmission timeout. A handshake that old has lost its first round anyway (its client
/// retransmits, and gets a new flow), while younger ones are most likely legitimate
/// connections in progress, which a burst of new ones should be refused beside rather than
/// cut. (A full conntrack table evicts without it, as netfilter does: refusing is all that
/// is left there.)
const SNAT_EARLY_DROP_AGE_NS: u64 = 1_000_000_000;

/// Every SNAT tuple toward `d` is taken: evict an unassured flow holding one that has waited
/// `SNAT_EARLY_DROP_AGE_NS` (a handshake that never completed, as a full conntrack table does;
/// `conntrack::early_drop`, same rules and per-source quota), give its tuple back at once, and
/// allocate again (`Exhausted`, counted, if none may go).
#[cold]
fn allocate_after_early_drop(
    ctx: &mut Ctx<'_>,
    d: Destination,
    src: core::net::Ipv4Addr,
) -> Result<Grant, crate::nat::snat::SnatError> {
    let now = ctx.now;
    let holds_tuple = |f: &crate::conntrack::Flow| {
        super::is_snat(f)
            && !f.snat_released
            && super::destination(f) == d
            && now.saturating_sub(f.created) >= SNAT_EARLY_DROP_AGE_NS
    };
    let spared = ctx.flows.early_drop_spared();
    if ctx.flows.early_drop_where(src, now, holds_tuple) {
        ctx.events().conntrack_early_drops += 1;
        ctx.events().early_drop_spared += ctx.flows.early_drop_spared() - spared;
        crate::pipeline::release_expired(ctx);
    }
    ctx.snat.allocate(d, ctx.now)
}

/// How far past the old connection's last sequence number a reused tuple's SYN lands: beyond
/// anything it could still have in flight (a full unscaled window), far inside the half of the
/// sequence space `after()` accepts.
const REUSE_SEQ_GAP: u32 = 1 << 17;
/// How far past the old connection's last TSval the new SYN's lands (RFC 6191 needs it newer;
/// one second of a 1 kHz clock covers a segment of the old connection we did not see).
const REUSE_TS_GAP: u32 = 1000;

/// The offsets that move a new SYN (`l4`, the client's) past `mark`: its sequence number to
/// `mark.seq_end + REUSE_SEQ_GAP` and, when both carry timestamps, its TSval to
/// `mark.tsval + REUSE_TS_GAP`. Without timestamps on either side the sequence number alone
/// satisfies `tcp_timewait_state_process`.
fn reuse_offsets(mark: Mark, l4: &[u8]) -> SeqAdj {
    let Ok(t) = TcpPacket::new_checked(l4) else { return SeqAdj::NONE };
    let seq = mark.seq_end.wrapping_add(REUSE_SEQ_GAP).wrapping_sub(t.seq_number());
    let ts = match (mark.tsval, seqadj::tsval(l4)) {
        (Some(old), Some(new)) => old.wrapping_add(REUSE_TS_GAP).wrapping_sub(new),
        _ => 0,
    };
    // Offsets of zero would be mistaken for "no offsets": nudge by one.
    SeqAdj { seq: seq.max(1), ts }
}
