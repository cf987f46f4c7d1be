//! Oversize: a frame larger than its egress allows (an aggregated GRO/LRO frame, or one from a
//! jumbo pod). TCP is segmented, other IPv4 with DF clear fragmented ([`crate::gso`]), both
//! into the worker's spill area with their Ethernet (and, toward a remote node, VXLAN) headers;
//! with DF set the sender gets ICMP fragmentation needed carrying the usable MTU
//! ([`reply::frag_needed`]).
//!
//! Contract: the frame itself is done with (`Disposition::Spilled`) once all its packets are
//! in the spill area; if any does not fit, or segmentation refuses the packet, everything it
//! spilled is rolled back and the frame is dropped (`spill_full`, `mtu_exceeded`): never half a
//! frame. Segment size is the smaller of what the MTU allows and the MSS the receiver
//! announced, when its flow is tracked.

use super::ctx::Ctx;
use super::{encap, reply, route, service_nat, validate};
use super::{Disposition, DropReason, FrameBuf};
use crate::conntrack::FlowKey;
use crate::tables::Route;
use crate::wire::{ethernet, EthernetFrame, IpProtocol, Ipv4Packet};

#[cold]
#[inline(never)]
pub(crate) fn oversize(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    route: Route,
    flow_hash: u32,
) -> Result<Disposition, DropReason> {
    let tables = ctx.tables;
    if !tables.node.segmentation {
        return Err(DropReason::SegmentationDisabled);
    }
    let mtu = tables.node.max_inner_ip_len();
    let (port, prefix, remote) = match route {
        Route::LocalPod(p) => {
            route::deliver_pod(tables, frame, &p)?;
            (p.port, ethernet::HEADER_LEN, None)
        }
        Route::Host => {
            route::deliver_host(tables, frame)?;
            (tables.host().map(|h| h.port).ok_or(DropReason::NoHostPort)?, ethernet::HEADER_LEN, None)
        }
        Route::Remote(idx) => {
            let remote = tables.remote(idx).ok_or(DropReason::NoRouteToNode)?;
            (tables.uplink(), crate::wire::vxlan::ENCAP_OVERHEAD + ethernet::HEADER_LEN, Some(remote))
        }
        Route::NoSuchPod => return Err(DropReason::NoSuchPod),
        Route::NoNode | Route::External => return Err(DropReason::NoRouteToNode),
    };
    // The Ethernet header as delivery rewrote it: every packet gets a copy.
    let Ok(eth) = EthernetFrame::new_fixed(frame.data()).map(|e| *e.into_inner()) else {
        return Err(DropReason::Ipv4Truncated);
    };
    let ip = &frame.data()[ethernet::HEADER_LEN..];
    let Ok(h) = Ipv4Packet::new_fixed(ip) else {
        return Err(DropReason::Ipv4Truncated);
    };
    let segment = h.protocol() == IpProtocol::Tcp && !h.is_fragment();
    let mark = ctx.spill.mark();
    let result = if segment {
        // The receiver's announced MSS, when its flow is tracked (Service flows).
        let mss = Ipv4Packet::new_unchecked(ip).l4_ports().and_then(|(sport, dport)| {
            let key = FlowKey { proto: IpProtocol::Tcp.into(), src: h.src_addr(), dst: h.dst_addr(), sport, dport };
            service_nat::receiver_mss(ctx, &key)
        });
        crate::gso::segment_tcp(ip, mtu, mss, &mut ctx.spill.sink(prefix, port))
    } else if !h.dont_frag() {
        crate::gso::fragment(ip, mtu, &mut ctx.spill.sink(prefix, port))
    } else {
        let Some(m) = validate::meta_of_valid(ip) else { return Err(DropReason::Ipv4Truncated) };
        return reply::frag_needed(ctx, frame, &m, mtu as u16);
    };
    let n = match result {
        Ok(n) => n,
        Err(crate::gso::GsoError::NoRoom(_)) => {
            ctx.spill.rollback(mark);
            return Err(DropReason::SpillFull);
        }
        Err(_) => {
            ctx.spill.rollback(mark);
            return Err(DropReason::MtuExceeded);
        }
    };
    for i in mark.1..mark.1 + n {
        let Some(region) = ctx.spill.region_mut(i) else { break };
        region[prefix - ethernet::HEADER_LEN..prefix].copy_from_slice(&eth);
    }
    if let Some(remote) = remote {
        encap::spilled(ctx, remote, mark, n, prefix, flow_hash)?;
    }
    let ev = ctx.events();
    if segment {
        ev.segmented += 1;
        ev.segments_sent += n as u64;
    } else {
        ev.fragmented += 1;
        ev.fragments_sent += n as u64;
    }
    Ok(Disposition::Spilled)
}
