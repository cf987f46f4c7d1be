//! Reply: frames vxnat answers itself, built in place of the frame that asked: ARP for the pod
//! gateway (and proxy ARP on the host port), ICMP errors (time exceeded, fragmentation needed,
//! port unreachable) from the pod gateway or a Service address, and TCP resets refusing a
//! Service connection.
//!
//! Contract: an answer is routed like any packet vxnat sends ([`egress`]), or goes straight
//! back out of the ingress port (ARP) or the uplink (a reset to a client outside). ICMP errors
//! are never sent about an ICMP error or a non-initial fragment (RFC 1812) and are rate-limited
//! per worker (`icmp_rate_limited`); when no answer may be sent the frame is dropped with the
//! reason of what would have been answered.

use super::ctx::{Ctx, Ipv4Meta};
use super::route::{egress, set_macs};
use super::{Disposition, DropReason, FrameBuf};
use crate::tables::PortEntry;
use crate::wire::{arp, ethernet, icmp, ipv4};
use crate::wire::{
    ArpOperation, ArpPacket, ArpRepr, EtherType, EthernetFrame, IcmpMessage, IcmpPacket, IcmpRepr, IpProtocol,
    Ipv4Packet, Ipv4Repr, MacAddr,
};
use core::net::Ipv4Addr;

/// Answers ARP in place, out of the ingress port. On a pod port (`pod` is the attached pod's
/// IP and MAC; its ARP must come from them, or from 0.0.0.0 for an RFC 5227 probe) only for
/// the pod gateway. On the host port, a point-to-point link into the node's stack, which owns
/// the gateway address as flannel's cni0 does, for every cluster address vxnat routes (proxy
/// ARP): the node resolves pods and remote pods to vxnat's end of the link.
pub(crate) fn arp(
    ctx: &mut Ctx<'_>,
    entry: &PortEntry,
    frame: &mut FrameBuf<'_>,
    dst_mac: MacAddr,
    pod: Option<(Ipv4Addr, MacAddr)>,
) -> Result<Disposition, DropReason> {
    if !dst_mac.is_broadcast() && dst_mac != entry.mac {
        return Err(DropReason::DstMacNotOurs);
    }
    let req = {
        let p = ArpPacket::new_checked(&frame.data()[ethernet::HEADER_LEN..]).map_err(|_| DropReason::ArpMalformed)?;
        ArpRepr::parse(&p).map_err(|_| DropReason::ArpMalformed)?
    };
    if let Some((ip, mac)) = pod {
        if req.source_hardware_addr != mac
            || (req.source_protocol_addr != ip && !req.source_protocol_addr.is_unspecified())
        {
            return Err(DropReason::ArpSpoofed);
        }
    }
    if req.operation != ArpOperation::Request {
        return Err(DropReason::ArpReplyIgnored);
    }
    let gateway = ctx.tables.gateway();
    let target = req.target_protocol_addr;
    let answer = match pod {
        Some(_) => target == gateway,
        None => target != gateway && ctx.tables.node.cluster_cidr.contains(target),
    };
    if !answer {
        return Err(DropReason::ArpNotForGateway);
    }
    frame.truncate(ethernet::HEADER_LEN + arp::PACKET_LEN);
    set_macs(frame, req.source_hardware_addr, entry.mac);
    let reply = ArpRepr {
        operation: ArpOperation::Reply,
        source_hardware_addr: entry.mac,
        source_protocol_addr: target,
        target_hardware_addr: req.source_hardware_addr,
        target_protocol_addr: req.source_protocol_addr,
    };
    reply.emit(&mut ArpPacket::new_unchecked(&mut frame.data_mut()[ethernet::HEADER_LEN..]));
    ctx.events().arp_replies += 1;
    Ok(Disposition::Forward(ctx.ingress))
}

/// Turns a packet whose TTL ran out into ICMP time exceeded from the pod gateway back to its
/// source (RFC 792, RFC 1812 §4.3.2.7: never about an ICMP error, a non-initial fragment;
/// rate-limited), and routes it.
pub(crate) fn time_exceeded(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
) -> Result<Disposition, DropReason> {
    let from = ctx.tables.gateway();
    icmp_error(
        ctx,
        frame,
        m,
        IcmpMessage::TimeExceeded { code: icmp::CODE_TTL_EXCEEDED },
        from,
        DropReason::TtlExpired,
    )?;
    ctx.events().icmp_time_exceeded_sent += 1;
    route_back(ctx, frame, m.src)
}

/// ICMP port unreachable from `from` (the Service address) for a UDP datagram nobody serves.
pub(crate) fn port_unreachable(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    from: Ipv4Addr,
) -> Result<Disposition, DropReason> {
    let msg = IcmpMessage::DstUnreachable { code: icmp::CODE_PORT_UNREACHABLE, next_hop_mtu: 0 };
    icmp_error(ctx, frame, m, msg, from, DropReason::ServiceNoEndpoint)?;
    route_back(ctx, frame, m.src)
}

/// ICMP port unreachable from `from` (the Service address) to a client outside the cluster,
/// straight back out of the uplink to `mac` (the L2 next hop its frame came from), as a TCP
/// reset to such a client goes: the node may have no route to it that vxnat knows.
pub(crate) fn port_unreachable_outside(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    from: Ipv4Addr,
    mac: MacAddr,
) -> Result<Disposition, DropReason> {
    let msg = IcmpMessage::DstUnreachable { code: icmp::CODE_PORT_UNREACHABLE, next_hop_mtu: 0 };
    icmp_error(ctx, frame, m, msg, from, DropReason::ServiceNoEndpoint)?;
    set_macs(frame, mac, ctx.tables.node.uplink_mac);
    Ok(Disposition::Forward(ctx.tables.uplink()))
}

/// ICMP fragmentation needed (RFC 1191) from the pod gateway to the source of a packet with DF
/// set that is larger than its egress allows, carrying the usable MTU, so the sender's path MTU
/// adapts.
pub(crate) fn frag_needed(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    mtu: u16,
) -> Result<Disposition, DropReason> {
    let msg = IcmpMessage::DstUnreachable { code: icmp::CODE_FRAG_NEEDED, next_hop_mtu: mtu };
    let from = ctx.tables.gateway();
    icmp_error(ctx, frame, m, msg, from, DropReason::MtuExceeded)?;
    ctx.events().icmp_frag_needed_sent += 1;
    route_back(ctx, frame, m.src)
}

/// Rewrites the frame into an ICMP error about the packet `m` describes, from `from` back to
/// its source. `refused` is the reason to report when no error may be sent.
fn icmp_error(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    message: IcmpMessage,
    from: Ipv4Addr,
    refused: DropReason,
) -> Result<(), DropReason> {
    if m.frag_offset != 0 || m.icmp_error {
        return Err(refused);
    }
    if !ctx.icmp_limit.take(ctx.now) {
        return Err(DropReason::IcmpRateLimited);
    }
    let quoted = (m.header_len + icmp::QUOTED_L4_LEN).min(m.total_len);
    let mut quote = [0u8; ipv4::MAX_HEADER_LEN + icmp::QUOTED_L4_LEN];
    quote[..quoted].copy_from_slice(&frame.data()[ethernet::HEADER_LEN..ethernet::HEADER_LEN + quoted]);
    let icmp_len = icmp::HEADER_LEN + quoted;
    let ip_start = ethernet::HEADER_LEN;
    let icmp_start = ip_start + ipv4::HEADER_LEN;
    if !frame.set_len(icmp_start + icmp_len) {
        return Err(DropReason::NoHeadroom);
    }
    let ident = ctx.next_ident();
    let d = frame.data_mut();
    if let Ok(mut eth) = EthernetFrame::new_fixed_mut(d) {
        eth.set_ethertype(EtherType::Ipv4);
    }
    Ipv4Repr {
        src_addr: from,
        dst_addr: m.src,
        protocol: IpProtocol::Icmp,
        payload_len: icmp_len as u16,
        ttl: 64,
        dscp_ecn: 0,
        ident,
        dont_frag: false,
        more_frags: false,
        frag_offset: 0,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut d[ip_start..icmp_start]));
    IcmpRepr { message, data: &quote[..quoted] }
        .emit(&mut IcmpPacket::new_unchecked(&mut d[icmp_start..icmp_start + icmp_len]));
    Ok(())
}

/// Routes a frame vxnat built back toward `to`.
fn route_back(ctx: &mut Ctx<'_>, frame: &mut FrameBuf<'_>, to: Ipv4Addr) -> Result<Disposition, DropReason> {
    let route = ctx.tables.route(to);
    let hash = u32::from(to).wrapping_mul(0x9e37_79b9);
    egress(ctx, frame, route, hash)
}

/// Refuses a TCP segment nobody serves with a reset from `from` (the Service address and
/// port), as RFC 793 §3.4 says: to a segment with ACK, `<SEQ=SEG.ACK><CTL=RST>`; otherwise
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>` (SYN and FIN count in SEG.LEN).
pub(crate) fn tcp_reset(ctx: &mut Ctx<'_>, frame: &mut FrameBuf<'_>, m: &Ipv4Meta) -> Result<Disposition, DropReason> {
    build_tcp_reset(ctx, frame, m)?;
    route_back(ctx, frame, m.src)
}

/// The same reset, to a client outside the cluster: straight back out of the uplink to `mac`,
/// the L2 next hop its segment came from.
pub(crate) fn tcp_reset_outside(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    mac: crate::wire::MacAddr,
) -> Result<Disposition, DropReason> {
    build_tcp_reset(ctx, frame, m)?;
    set_macs(frame, mac, ctx.tables.node.uplink_mac);
    Ok(Disposition::Forward(ctx.tables.uplink()))
}

fn build_tcp_reset(ctx: &mut Ctx<'_>, frame: &mut FrameBuf<'_>, m: &Ipv4Meta) -> Result<(), DropReason> {
    use crate::wire::{tcp, TcpFlags};
    let l4 = ethernet::HEADER_LEN + m.header_len;
    let (seq, ack, flags, seg_len) = {
        let t = frame.data().get(l4..ethernet::HEADER_LEN + m.total_len).ok_or(DropReason::L4Truncated)?;
        let p = crate::wire::TcpPacket::new_checked(t).map_err(|_| DropReason::L4Truncated)?;
        let f = p.flags();
        let len =
            p.payload().len() as u32 + u32::from(f.contains(TcpFlags::SYN)) + u32::from(f.contains(TcpFlags::FIN));
        (p.seq_number(), p.ack_number(), f, len)
    };
    if flags.contains(TcpFlags::RST) {
        return Err(DropReason::ServiceNoEndpoint);
    }
    let (sport, dport) = (m.sport(), m.dport());
    let ip_start = ethernet::HEADER_LEN;
    let tcp_start = ip_start + ipv4::HEADER_LEN;
    if !frame.set_len(tcp_start + tcp::HEADER_LEN) {
        return Err(DropReason::NoHeadroom);
    }
    let ident = ctx.next_ident();
    let d = frame.data_mut();
    Ipv4Repr {
        src_addr: m.dst,
        dst_addr: m.src,
        protocol: IpProtocol::Tcp,
        payload_len: tcp::HEADER_LEN as u16,
        ttl: 64,
        dscp_ecn: 0,
        ident,
        dont_frag: true,
        more_frags: false,
        frag_offset: 0,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut d[ip_start..tcp_start]));
    let mut t = crate::wire::TcpPacket::new_unchecked(&mut d[tcp_start..tcp_start + tcp::HEADER_LEN]);
    t.set_src_port(dport);
    t.set_dst_port(sport);
    if flags.contains(TcpFlags::ACK) {
        t.set_seq_number(ack);
        t.set_ack_number(0);
        t.set_header_len_flags(tcp::HEADER_LEN, TcpFlags::RST);
    } else {
        t.set_seq_number(0);
        t.set_ack_number(seq.wrapping_add(seg_len));
        t.set_header_len_flags(tcp::HEADER_LEN, TcpFlags::RST | TcpFlags::ACK);
    }
    t.set_window_len(0);
    t.set_urgent_at(0);
    t.fill_checksum(m.dst, m.src);
    ctx.events().tcp_resets_sent += 1;
    Ok(())
}
