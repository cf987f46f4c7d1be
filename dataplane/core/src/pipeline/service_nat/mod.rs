//! Service NAT, between validation and routing (kube-proxy's job). A packet of a tracked flow
//! is translated as its flow says, in either direction; the first packet of a connection to a
//! Service frontend gets an endpoint and is tracked ([`new_flow`]: the "in" side, DNAT and
//! where needed SNAT); a new connection with no endpoint is refused (ICMP port unreachable, as
//! kube-proxy's reject) or, under a Local policy, dropped. ICMP errors about a translated flow get their quoted packet translated back
//! ([`icmp_error`]). Everything else passes untouched.
//!
//! Why one stage and not VPP's in2out/out2in pair: the conntrack lookup of either key yields
//! the direction, and both directions apply the same rewrite taken from the flow's keys, so
//! the split is by what the packet is (tracked, new, an ICMP error) rather than by direction.
//!
//! A flow's two keys carry its whole translation: the original key is what the client sent
//! (client -> Service), the reply key what the endpoint answers with (endpoint -> client, or ->
//! the SNAT address). Original-direction packets get the reply key's source as destination (and
//! its destination as source when SNAT'd); reply packets get the original key's destination as
//! source and its source as destination. Checksums are updated incrementally (RFC 1624).
//!
//! Contract: the packet is validated (`Ipv4Meta`); on `Translated` the frame and `m` hold the
//! translated addresses and ports, and the caller routes it (or, for a reply to a client
//! outside, sends it back by the uplink); `Answered` carries the refusal's disposition.

mod icmp_error;
mod new_flow;

use super::ctx::{Ctx, Ipv4Meta, Origin};
use super::{Disposition, DropReason, FrameBuf};
use crate::conntrack::{Dir, Flow, FlowId, FlowKey, FlowState, TcpEvent, TcpState};
use crate::nat::seqadj::{self, SeqAdj};
use crate::nat::snat::{Destination, End, Mark};
use crate::wire::checksum;
use crate::wire::{ethernet, IpProtocol, Ipv4Packet, MacAddr, TcpFlags, TcpPacket, UdpPacket};
use core::net::Ipv4Addr;

/// Flows created from outside the cluster remember where their client is: the tag holds this
/// flag and the source MAC of the client's frame (its L2 next hop on the uplink), so replies go
/// straight back out of the uplink to it.
const TAG_UPLINK_RETURN: u64 = 1 << 63;

/// What the stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nat {
    /// Not a Service flow.
    Untouched,
    /// Translated; for a reply to a client outside the cluster, the MAC to send it to.
    Translated { dir: Dir, uplink_return: Option<MacAddr> },
    /// Refused; the answer (RST / ICMP) goes here.
    Answered(Disposition),
}

fn uplink_return(tag: u64) -> Option<MacAddr> {
    (tag & TAG_UPLINK_RETURN != 0).then(|| {
        let b = tag.to_be_bytes();
        MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
    })
}

/// Applies Service NAT to the validated packet `m` describes. `client_mac` is the source MAC of
/// a frame that came from outside through the uplink.
#[inline]
pub(crate) fn apply(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &mut Ipv4Meta,
    origin: Origin,
    client_mac: Option<MacAddr>,
) -> Result<Nat, DropReason> {
    if m.protocol() == IpProtocol::Icmp && m.icmp_error && !m.is_fragment {
        return Ok(icmp_error::icmp_error(ctx, frame, m));
    }
    if !m.has_ports() || (m.is_fragment && m.protocol() != IpProtocol::Udp) {
        return Ok(Nat::Untouched);
    }
    if m.is_fragment {
        return fragment(ctx, frame, m, origin, client_mac);
    }
    translate(ctx, frame, m, origin, client_mac)
}

/// A fragment of a UDP datagram (`nat::fragments`): the first, which carries the ports, is
/// translated as any packet and its rewrite remembered; a later one takes the rewrite its
/// first got, or goes on untouched (most such are not Service traffic at all).
#[cold]
fn fragment(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &mut Ipv4Meta,
    origin: Origin,
    client_mac: Option<MacAddr>,
) -> Result<Nat, DropReason> {
    use crate::nat::fragments::{FragKey, FragNat};
    let ident =
        frame.data().get(ethernet::HEADER_LEN..).and_then(|ip| Ipv4Packet::new_fixed(ip).ok()).map(|h| h.ident());
    let Some(ident) = ident else { return Ok(Nat::Untouched) };
    let key = FragKey { src: m.src, dst: m.dst, proto: m.proto, ident };
    if m.frag_offset == 0 {
        let nat = translate(ctx, frame, m, origin, client_mac)?;
        if let Nat::Translated { dir, uplink_return } = nat {
            ctx.fragments.remember(key, FragNat { src: m.src, dst: m.dst, dir, uplink_return }, ctx.now);
        }
        return Ok(nat);
    }
    let Some(nat) = ctx.fragments.lookup(&key, ctx.now) else { return Ok(Nat::Untouched) };
    rewrite_addresses(frame, m, nat.src, nat.dst);
    ctx.events().fragments_translated += 1;
    Ok(Nat::Translated { dir: nat.dir, uplink_return: nat.uplink_return })
}

/// A packet with its transport header: a tracked flow's, or a new connection's.
#[inline]
fn translate(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &mut Ipv4Meta,
    origin: Origin,
    client_mac: Option<MacAddr>,
) -> Result<Nat, DropReason> {
    let key = FlowKey { proto: m.proto, src: m.src, dst: m.dst, sport: m.sport(), dport: m.dport() };
    let flags = if m.protocol() == IpProtocol::Tcp { tcp_flags(frame, m) } else { TcpFlags(0) };
    let hash = match ctx.hint {
        Some((k, h)) if k == key => h,
        _ => ctx.flows.hash(&key),
    };
    if let Some((id, dir)) = ctx.flows.lookup_hashed(&key, hash, ctx.now) {
        // Under tables other than those the flow's endpoint was confirmed in, confirm it again
        // (once per flow per change: no scan of the table when Services change).
        let gen = generation(ctx);
        let mut gone = false;
        if let Some(f) = ctx.flows.get(id) {
            gone = f.endpoint_gone;
            if f.checked != gen {
                match recheck(ctx, id, gen) {
                    Recheck::Kept { gone: g } => gone = g,
                    Recheck::Moved if dir == Dir::Orig => {
                        return new_flow::new_flow(ctx, frame, m, key, flags, origin, client_mac)
                    }
                    Recheck::Moved => return Err(DropReason::ServiceEndpointGone),
                }
            }
        }
        if gone && dir == Dir::Orig {
            ctx.events().to_gone_endpoint += 1;
        }
        match ctx.flows.update(id, dir, flags, m.total_len, ctx.now) {
            TcpEvent::Reopened => {
                // A new SYN on a closed flow: start over (and pick an endpoint afresh).
                if let Some(f) = ctx.flows.remove(id) {
                    release_snat(ctx, &f, ctx.now);
                }
                return new_flow::new_flow(ctx, frame, m, key, flags, origin, client_mac);
            }
            TcpEvent::BareAckToSyn => {
                ctx.events().bare_ack_to_syn += 1;
                if ctx.flows.get(id).is_some_and(|f| !f.adj.is_none()) {
                    ctx.events().snat_reuse_bare_ack += 1;
                }
                backend_event(ctx, id, |b| b.bare_ack_to_syn += 1);
            }
            TcpEvent::SynRetransmit => backend_event(ctx, id, |b| b.syn_retransmits += 1),
            TcpEvent::SynAnswered => backend_event(ctx, id, |b| b.syn_answered += 1),
            _ => {}
        }
        if flags.contains(TcpFlags::SYN) {
            record_mss(ctx, frame, m, id, dir);
        }
        let Some(f) = ctx.flows.get(id) else { return Ok(Nat::Untouched) };
        let ret = uplink_return(f.tag);
        let (src, dst) = match dir {
            Dir::Orig => ((f.reply.dst, f.reply.dport), (f.reply.src, f.reply.sport)),
            Dir::Reply => ((f.orig.dst, f.orig.dport), (f.orig.src, f.orig.sport)),
        };
        let (adj, closing) = (f.adj, is_snat(f) && (f.first_fin.is_some() || flags.contains(TcpFlags::RST)));
        rewrite(frame, m, src, dst);
        if !adj.is_none() {
            seq_adjust(frame, m, adj, dir)?;
        }
        if closing {
            snat_closing(ctx, frame, m, id, dir);
        }
        return Ok(Nat::Translated { dir, uplink_return: if dir == Dir::Reply { ret } else { None } });
    }
    new_flow::new_flow(ctx, frame, m, key, flags, origin, client_mac)
}

/// The Service table's epoch, as flows record it (`Flow::checked`): it changes only when
/// Services or endpoints do, so a pod attached elsewhere sends no flow through `recheck`.
#[inline]
fn generation(ctx: &Ctx<'_>) -> u32 {
    ctx.tables.services().epoch()
}

/// What a check of a flow's endpoint against the current tables found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recheck {
    /// The flow stays; `gone`: its endpoint has left the Service (TCP: kept until it ends).
    Kept { gone: bool },
    /// A UDP flow whose endpoint left or stopped serving: removed (its SNAT tuple released),
    /// so that the client's next packet starts a new flow on a serving endpoint.
    Moved,
}

/// Checks the flow's endpoint against the current tables (kube-proxy's conntrack cleanup on
/// endpoint changes, done lazily on the flow's next packet instead of by a table scan):
/// - UDP: the endpoint must still be serving its Service (present, and ready or terminating
///   but serving); otherwise the flow is removed (`udp_flows_moved`). A client that keeps
///   sending from one port (DNS resolvers do) is moved instead of black-holed
///   (kubernetes#125467, #126130).
/// - TCP: the flow is kept whatever happened (an established connection may still finish on
///   a terminating or removed endpoint); an endpoint no longer in the Service marks it, and
///   its packets toward the endpoint are counted (`to_gone_endpoint`).
#[cold]
fn recheck(ctx: &mut Ctx<'_>, id: FlowId, gen: u32) -> Recheck {
    let Some(f) = ctx.flows.get(id) else { return Recheck::Kept { gone: false } };
    let (orig, ep) = (f.orig, (f.reply.src, f.reply.sport));
    let tables = ctx.tables;
    let port =
        tables.services().lookup(orig.proto, orig.dst, orig.dport, tables.is_node_port_addr(orig.dst)).map(|p| p.0);
    if IpProtocol::from(orig.proto) == IpProtocol::Udp {
        if !port.is_some_and(|p| p.is_serving(ep.0, ep.1)) {
            if let Some(f) = ctx.flows.remove(id) {
                release_snat(ctx, &f, ctx.now);
            }
            ctx.events().udp_flows_moved += 1;
            return Recheck::Moved;
        }
        if let Some(f) = ctx.flows.get_mut(id) {
            f.checked = gen;
        }
        return Recheck::Kept { gone: false };
    }
    let gone = !port.is_some_and(|p| p.has_endpoint(ep.0, ep.1));
    if let Some(f) = ctx.flows.get_mut(id) {
        f.checked = gen;
        f.endpoint_gone = gone;
    }
    Recheck::Kept { gone }
}

/// The validated packet's transport header onward.
#[inline]
fn l4_of<'f>(frame: &'f FrameBuf<'_>, m: &Ipv4Meta) -> Option<&'f [u8]> {
    frame.data().get(ethernet::HEADER_LEN + m.header_len..ethernet::HEADER_LEN + m.total_len)
}

/// Remembers the MSS a SYN or SYN|ACK announced (for segmenting toward that side later).
#[cold]
fn record_mss(ctx: &mut Ctx<'_>, frame: &FrameBuf<'_>, m: &Ipv4Meta, id: crate::conntrack::FlowId, dir: Dir) {
    let Some(mss) = l4_of(frame, m).and_then(|l4| TcpPacket::new_checked(l4).ok()).and_then(|t| t.max_seg_size())
    else {
        return;
    };
    if let Some(f) = ctx.flows.get_mut(id) {
        f.mss[if dir == Dir::Orig { 0 } else { 1 }] = mss;
    }
}

/// The MSS the receiver of a TCP packet with this (translated) tuple announced, if its flow is
/// tracked: a packet travelling in a flow's original direction goes to the side whose SYN|ACK
/// announced `mss[1]`, and the other way round.
pub(crate) fn receiver_mss(ctx: &mut Ctx<'_>, key: &FlowKey) -> Option<u16> {
    let (id, dir) = ctx.flows.lookup(&key.reversed(), ctx.now)?;
    let f = ctx.flows.get(id)?;
    // The reversed tuple matched `dir`: this packet travels the other way.
    let mss = if dir == Dir::Reply { f.mss[1] } else { f.mss[0] };
    (mss > 0).then_some(mss)
}

/// Counts a handshake event against the flow's endpoint.
#[cold]
fn backend_event(ctx: &mut Ctx<'_>, id: crate::conntrack::FlowId, f: impl FnOnce(&mut super::BackendCounters)) {
    if let Some(flow) = ctx.flows.get(id) {
        f(ctx.backends.entry((flow.reply.src, flow.reply.sport), (flow.orig.proto, flow.orig.dst, flow.orig.dport)));
    }
}

/// Whether the flow's source was translated (it holds a SNAT tuple).
#[inline]
fn is_snat(f: &Flow) -> bool {
    f.reply.dst != f.orig.src || f.reply.dport != f.orig.sport
}

/// How a flow ended, for its SNAT tuple (`nat::snat` decides what that means for reuse).
fn end_of(f: &Flow) -> End {
    let FlowState::Tcp(state) = f.state else { return End::Datagram };
    match (state, f.first_fin) {
        // A flow on a reused tuple that ended before closing: the endpoint's TIME_WAIT from the
        // tuple's previous connection may still be there. Held again, with the mark it was
        // reused by (or a later one).
        (TcpState::Close | TcpState::SynSent | TcpState::SynRecv, None) if !f.adj.is_none() => {
            End::BackendClosedFirst(f.mark)
        }
        (TcpState::Close, _) => End::Reset,
        (TcpState::SynSent | TcpState::SynRecv, _) => End::NotEstablished,
        // The backend sent a FIN before it had the client's and the client's FIN followed
        // (TIME_WAIT, or LAST_ACK whose final ACK was not seen): the backend holds the tuple.
        (TcpState::TimeWait | TcpState::LastAck, _) if f.endpoint_time_wait => End::BackendClosedFirst(f.mark),
        (TcpState::TimeWait, _) => End::ClientClosedFirst,
        // Expired while open or half-closed: the backend's state is unknown.
        _ => End::Idle,
    }
}

/// Returns the SNAT tuple of a flow that leaves the table (if it had one, and it was not given
/// back when the flow closed) to the allocator. A tuple held once its flow is gone would live
/// on only in the allocator, so whenever a tuple is held (here, or when its flow closed,
/// `snat_closing`) the flow is also handed to the conntrack journal as retired
/// (`ConnTrack::retire`), for a successor process to keep holding it (`pipeline::restore`).
pub(crate) fn release_snat(ctx: &mut Ctx<'_>, f: &Flow, now: u64) {
    if !is_snat(f) || f.snat_released {
        return;
    }
    let end = end_of(f);
    ctx.snat.release(destination(f), f.reply.dport, now, end);
    if holds(end) {
        ctx.flows.retire(f, now.saturating_add(ctx.snat.hold_ns()));
    }
}

/// The SNAT tuple of a flow carried over from an earlier process (`pipeline::restore`), and
/// until when it is held (`None`: in use while the flow has not given it back). Once given
/// back, held as the flow's end says, from `now` (when it was given back is not recorded, so
/// its hold restarts: it ends later than it would have, never earlier). Nothing for a flow
/// without a tuple, or whose tuple is free.
#[allow(clippy::type_complexity)]
pub(crate) fn snat_restore_of(
    snat: &crate::nat::snat::SnatAllocator,
    f: &Flow,
    now: u64,
) -> Option<(Destination, u16, Option<(u64, Option<Mark>)>)> {
    if !is_snat(f) {
        return None;
    }
    let until = now.saturating_add(snat.hold_ns());
    let hold = match (f.snat_released, end_of(f)) {
        (false, _) => None,
        (true, End::BackendClosedFirst(mark)) => Some((until, mark)),
        (true, End::Idle) => Some((until, None)),
        (true, _) => return None,
    };
    Some((destination(f), f.reply.dport, hold))
}

fn destination(f: &Flow) -> Destination {
    Destination { proto: f.orig.proto, snat_ip: f.reply.dst, backend_ip: f.reply.src, backend_port: f.reply.sport }
}

/// A SNAT'd TCP flow that is closing: record what the backend last saw from the client side
/// (its mark, for a later reuse of the tuple), and give the tuple back as soon as the flow has
/// closed (TIME_WAIT or a reset), not when it expires from the table minutes later.
#[cold]
fn snat_closing(ctx: &mut Ctx<'_>, frame: &FrameBuf<'_>, m: &Ipv4Meta, id: FlowId, dir: Dir) {
    let now = ctx.now;
    let Some(f) = ctx.flows.get_mut(id) else { return };
    if dir == Dir::Orig {
        if let Some(l4) = l4_of(frame, m) {
            if let Ok(t) = TcpPacket::new_checked(l4) {
                let fl = t.flags();
                let len = t.payload().len() as u32
                    + u32::from(fl.contains(TcpFlags::SYN))
                    + u32::from(fl.contains(TcpFlags::FIN));
                let end = t.seq_number().wrapping_add(len);
                let tsval = seqadj::tsval(l4);
                // Keep the furthest sequence end (a retransmission is not newer) and the latest
                // TSval the backend saw.
                let seq_end = match f.mark {
                    Some(old) if (end.wrapping_sub(old.seq_end) as i32) < 0 => old.seq_end,
                    _ => end,
                };
                f.mark = Some(Mark { seq_end, tsval: tsval.or(f.mark.and_then(|k| k.tsval)) });
            }
        }
    }
    if dir == Dir::Reply && !f.endpoint_time_wait {
        // The endpoint's FIN: it closes actively (and will hold TIME_WAIT) unless it had
        // already received the client's FIN, which its ACK field shows. A FIN that does not
        // acknowledge the client's is a simultaneous close: both sides hold TIME_WAIT.
        if let Some(t) = l4_of(frame, m).and_then(|l4| TcpPacket::new_checked(l4).ok()) {
            if t.flags().contains(TcpFlags::FIN) {
                // (The packet is already translated back: its ack is in the client's sequence
                // space, the mark in the endpoint's.)
                let acked = t.ack_number().wrapping_add(f.adj.seq);
                let passive = f.first_fin == Some(Dir::Orig)
                    && f.mark.is_some_and(|k| t.flags().contains(TcpFlags::ACK) && acked == k.seq_end);
                f.endpoint_time_wait = !passive;
            }
        }
    }
    if matches!(f.state, FlowState::Tcp(TcpState::TimeWait | TcpState::Close)) && !f.snat_released {
        f.snat_released = true;
        let (d, port, end) = (destination(f), f.reply.dport, end_of(f));
        let retired = holds(end).then(|| f.clone());
        ctx.snat.release(d, port, now, end);
        if let Some(f) = retired {
            // The flow may leave the table before the hold ends (a new SYN reopens its key),
            // and its state then no longer says how it ended.
            ctx.flows.retire(&f, now.saturating_add(ctx.snat.hold_ns()));
        }
    }
}

/// Whether a flow that ended so leaves its tuple held.
fn holds(end: End) -> bool {
    matches!(end, End::BackendClosedFirst(_) | End::Idle)
}

/// Applies a reused tuple's offsets to a packet of its flow (already translated). A segment
/// whose options cannot be walked is dropped: forwarded untranslated it would carry sequence
/// numbers from the wrong space.
#[inline]
fn seq_adjust(frame: &mut FrameBuf<'_>, m: &Ipv4Meta, adj: SeqAdj, dir: Dir) -> Result<(), DropReason> {
    let l4 = frame
        .data_mut()
        .get_mut(ethernet::HEADER_LEN + m.header_len..ethernet::HEADER_LEN + m.total_len)
        .ok_or(DropReason::ReusedTupleBadOptions)?;
    match dir {
        Dir::Orig => adj.to_backend(l4),
        Dir::Reply => adj.to_client(l4),
    }
    .map_err(|_| DropReason::ReusedTupleBadOptions)
}

fn tcp_flags(frame: &FrameBuf<'_>, m: &Ipv4Meta) -> TcpFlags {
    match frame.data().get(ethernet::HEADER_LEN + m.header_len..).map(TcpPacket::new_fixed) {
        Some(Ok(t)) => t.flags(),
        _ => TcpFlags(0),
    }
}

/// Rewrites source and destination address and port, with incremental checksum updates.
/// Rewrites a later fragment's addresses (it has no transport header: only the IPv4 header
/// checksum changes).
fn rewrite_addresses(frame: &mut FrameBuf<'_>, m: &mut Ipv4Meta, src: Ipv4Addr, dst: Ipv4Addr) {
    let (os, od, ns, nd) = (u32::from(m.src), u32::from(m.dst), u32::from(src), u32::from(dst));
    if let Some(Ok(mut h)) = frame.data_mut().get_mut(ethernet::HEADER_LEN..).map(Ipv4Packet::new_fixed_mut) {
        h.set_header_checksum(checksum::update32(checksum::update32(h.header_checksum(), os, ns), od, nd));
        h.set_src_addr(src);
        h.set_dst_addr(dst);
        m.src = src;
        m.dst = dst;
    }
}

fn rewrite(frame: &mut FrameBuf<'_>, m: &mut Ipv4Meta, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) {
    let (old_sport, old_dport) = (m.sport(), m.dport());
    if (m.src, old_sport, m.dst, old_dport) == (src.0, src.1, dst.0, dst.1) {
        return;
    }
    let (os, od, ns, nd) = (u32::from(m.src), u32::from(m.dst), u32::from(src.0), u32::from(dst.0));
    // The new L4 checksum after the addresses (pseudo-header) and ports changed.
    let l4_sum = |c: u16| {
        checksum::update16(
            checksum::update16(checksum::update32(checksum::update32(c, os, ns), od, nd), old_sport, src.1),
            old_dport,
            dst.1,
        )
    };
    let Some((ip, l4)) =
        frame.data_mut().get_mut(ethernet::HEADER_LEN..).and_then(|b| b.split_at_mut_checked(m.header_len))
    else {
        return;
    };
    if let Ok(mut h) = Ipv4Packet::new_fixed_mut(ip) {
        h.set_header_checksum(checksum::update32(checksum::update32(h.header_checksum(), os, ns), od, nd));
        h.set_src_addr(src.0);
        h.set_dst_addr(dst.0);
    }
    match m.protocol() {
        IpProtocol::Tcp => {
            if let Ok(mut t) = TcpPacket::new_fixed_mut(l4) {
                t.set_checksum(l4_sum(t.checksum()));
                t.set_src_port(src.1);
                t.set_dst_port(dst.1);
            }
        }
        _ => {
            if let Ok(mut u) = UdpPacket::new_fixed_mut(l4) {
                // Zero: sent without a checksum, and stays so (RFC 768); a computed zero is 0xffff.
                if u.checksum() != 0 {
                    let c = l4_sum(u.checksum());
                    u.set_checksum(if c == 0 { 0xffff } else { c });
                }
                u.set_src_port(src.1);
                u.set_dst_port(dst.1);
            }
        }
    }
    m.src = src.0;
    m.dst = dst.0;
    m.ports = (u32::from(src.1) << 16) | u32::from(dst.1);
}
