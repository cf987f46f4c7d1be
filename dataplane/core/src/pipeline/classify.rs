//! Classify: the graph's entry for one frame. By ingress port kind it decides what the frame
//! is and which stage takes it:
//!
//! - **pod port**: the source MAC must be the attached pod's (`pod_spoofed_mac`); ARP goes to
//!   [`reply::arp`]; IPv4 must be addressed to the port's MAC, pass [`validate`], come from the
//!   pod's IP (`pod_spoofed_ip`) and have its L4 checksum handled by the port's policy; then
//!   Service NAT and [`route`] (or, for a translated reply to a client outside, [`outside`]).
//! - **host port**: the same, with the node stack's MAC and no source-IP restriction.
//! - **uplink**: a Service candidate from outside the cluster goes to [`outside`]; everything
//!   else is the tunnel's, [`decap`].
//!
//! Contract: returns the frame's one [`Disposition`]; a drop is returned, not counted (the
//! batch loop counts every `Drop` against the ingress port).

use super::ctx::{Ctx, Origin};
use super::service_nat::{self, Nat};
use super::{decap, outside, reply, route, validate};
use super::{Disposition, DropReason, FrameBuf};
use crate::tables::{PortEntry, PortKind};
use crate::wire::{EtherType, EthernetFrame, MacAddr};
use core::net::Ipv4Addr;

#[inline]
pub(crate) fn process_one(ctx: &mut Ctx<'_>, entry: &PortEntry, frame: &mut FrameBuf<'_>) -> Disposition {
    let r = match entry.kind {
        PortKind::Pod { ip, mac } => from_local(ctx, entry, frame, Some((ip, mac))),
        PortKind::Host => from_local(ctx, entry, frame, None),
        PortKind::Uplink => from_uplink(ctx, entry, frame),
    };
    r.unwrap_or_else(Disposition::Drop)
}

/// A tagged frame where untagged ones are expected: say whether it is even well formed.
#[cold]
pub(crate) fn vlan_error(d: &[u8]) -> DropReason {
    match EthernetFrame::new_checked(d) {
        Err(crate::wire::Error::Malformed) => DropReason::EthTooManyTags,
        Err(_) => DropReason::EthTruncated,
        Ok(_) => DropReason::VlanTagged,
    }
}

/// A pod port (`pod` is its IP and MAC) or the host port (`pod` is `None`).
#[inline(always)]
fn from_local(
    ctx: &mut Ctx<'_>,
    entry: &PortEntry,
    frame: &mut FrameBuf<'_>,
    pod: Option<(Ipv4Addr, MacAddr)>,
) -> Result<Disposition, DropReason> {
    let (dst_mac, src_mac, ethertype) = {
        let Ok(eth) = EthernetFrame::new_fixed(frame.data()) else {
            return Err(DropReason::EthTruncated);
        };
        (eth.dst_addr(), eth.src_addr(), eth.ethertype_or_tpid())
    };
    match pod {
        Some((_, mac)) if src_mac != mac => return Err(DropReason::PodSpoofedMac),
        None if ctx.tables.host().is_some_and(|h| h.stack_mac != src_mac) => return Err(DropReason::HostSpoofedMac),
        _ => {}
    }
    match ethertype {
        EtherType::Ipv4 => {}
        EtherType::Arp => return reply::arp(ctx, entry, frame, dst_mac, pod),
        EtherType::Ipv6 => return Err(DropReason::Ipv6Unsupported),
        EtherType::Vlan | EtherType::QinQ => return Err(vlan_error(frame.data())),
        EtherType::Unknown(_) => return Err(DropReason::EthertypeUnsupported),
    }
    if dst_mac != entry.mac {
        return Err(if dst_mac.is_multicast() { DropReason::L2Multicast } else { DropReason::DstMacNotOurs });
    }
    let m = validate::validate_ipv4(frame)?;
    if let Some((ip, _)) = pod {
        if m.src != ip {
            return Err(DropReason::PodSpoofedIp);
        }
    }
    if validate::l4_checksum(entry.checksum, frame, &m)?.is_some() {
        ctx.events().partial_checksums_completed += 1;
    }
    let mut m = m;
    let origin = if pod.is_some() { Origin::Pod } else { Origin::Host };
    match service_nat::apply(ctx, frame, &mut m, origin, None)? {
        Nat::Answered(d) => Ok(d),
        Nat::Translated { uplink_return: Some(mac), .. } => outside::to_outside(ctx, frame, &m, mac),
        _ => route::forward(ctx, frame, &m, origin),
    }
}

/// The uplink: Service traffic from outside the cluster, or the tunnel.
#[inline(always)]
fn from_uplink(ctx: &mut Ctx<'_>, entry: &PortEntry, frame: &mut FrameBuf<'_>) -> Result<Disposition, DropReason> {
    if let Some(client_mac) = outside::service_candidate(ctx.tables, frame.data()) {
        return outside::from_outside(ctx, entry.checksum, frame, client_mac);
    }
    decap::from_tunnel(ctx, entry.checksum, frame)
}
