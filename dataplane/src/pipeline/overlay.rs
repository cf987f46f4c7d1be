//! The overlay path: per ingress port kind, classify and validate, then route the IPv4 packet
//! to a local pod, the host port, or a remote node (VXLAN), decrementing TTL where vxnat acts
//! as a router.
//!
//! TTL follows flannel's hop count: a packet from a pod to a remote pod is decremented once on
//! each node (flannel: cni0 -> flannel.1 on the sender, flannel.1 -> cni0 on the receiver).
//! Delivery into the node stack is local delivery (no decrement), and packets from the node
//! stack were already routed by it. One difference: pod to pod on the same node is a routed
//! hop here (decremented once) where flannel's bridge switches it.

use super::reply;
use super::{Disposition, DropReason, FrameBuf, Nanos, WorkerState};
use crate::tables::{LocalPod, PortEntry, PortId, PortKind, Route, Tables};
use crate::vxlan::{decap, encap};
use crate::wire::checksum;
use crate::wire::{ethernet, icmp, tcp, udp};
use crate::wire::{EtherType, EthernetFrame, Ipv4Packet, MacAddr, TcpPacket, UdpPacket};
use core::net::Ipv4Addr;

/// Where the packet being routed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Pod,
    Host,
    Tunnel,
}

/// The per-packet context threaded through the stages.
pub(crate) struct Ctx<'t, 's> {
    pub(crate) tables: &'t Tables,
    pub(crate) state: &'s mut WorkerState,
    pub(crate) now: Nanos,
    pub(crate) ingress: PortId,
}

impl Ctx<'_, '_> {
    #[inline]
    pub(crate) fn events(&mut self) -> &mut super::EventCounters {
        &mut self.state.counters.port_mut(self.ingress).events
    }
}

/// Facts about a validated IPv4 packet at offset 14 of the frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ipv4Meta {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) proto: u8,
    pub(crate) header_len: usize,
    pub(crate) total_len: usize,
    pub(crate) ttl: u8,
    pub(crate) frag_offset: u16,
    pub(crate) is_fragment: bool,
    /// `src_port << 16 | dst_port` for TCP/UDP with a transport header present, else 0.
    pub(crate) ports: u32,
    /// An ICMP error message (never answered with another ICMP error).
    pub(crate) icmp_error: bool,
}

impl Ipv4Meta {
    /// Hash of the flow for the VXLAN source port: stable per 5-tuple (3-tuple for
    /// fragments), well mixed (murmur3's 64-bit finalizer).
    #[inline]
    pub(crate) fn flow_hash(&self) -> u32 {
        let a = (u64::from(u32::from(self.src)) << 32) | u64::from(u32::from(self.dst));
        let b = (u64::from(self.ports) << 8) | u64::from(self.proto);
        let mut h = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h as u32
    }
}

pub(crate) fn process_one(
    tables: &Tables,
    state: &mut WorkerState,
    now: Nanos,
    ingress: PortId,
    entry: &PortEntry,
    frame: &mut FrameBuf<'_>,
) -> Disposition {
    let mut ctx = Ctx { tables, state, now, ingress };
    let r = match entry.kind {
        PortKind::Pod { ip, mac } => from_local(&mut ctx, entry, frame, Some((ip, mac))),
        PortKind::Host => from_local(&mut ctx, entry, frame, None),
        PortKind::Uplink => from_uplink(&mut ctx, frame),
    };
    r.unwrap_or_else(Disposition::Drop)
}

fn eth_error(e: crate::wire::Error) -> DropReason {
    match e {
        crate::wire::Error::Malformed => DropReason::EthTooManyTags,
        _ => DropReason::EthTruncated,
    }
}

/// A pod port (`pod` is its IP and MAC) or the host port (`pod` is `None`).
fn from_local(
    ctx: &mut Ctx<'_, '_>,
    entry: &PortEntry,
    frame: &mut FrameBuf<'_>,
    pod: Option<(Ipv4Addr, MacAddr)>,
) -> Result<Disposition, DropReason> {
    let (src_mac, dst_mac, header_len, ethertype) = {
        let eth = EthernetFrame::new_checked(frame.data()).map_err(eth_error)?;
        (eth.src_addr(), eth.dst_addr(), eth.header_len(), eth.ethertype())
    };
    match pod {
        Some((_, mac)) if src_mac != mac => return Err(DropReason::PodSpoofedMac),
        None if ctx.tables.host().is_some_and(|h| h.stack_mac != src_mac) => {
            return Err(DropReason::HostSpoofedMac)
        }
        _ => {}
    }
    if header_len != ethernet::HEADER_LEN {
        return Err(DropReason::VlanTagged);
    }
    match ethertype {
        EtherType::Ipv4 => {}
        EtherType::Arp => return reply::arp(ctx, entry, frame, dst_mac, pod),
        EtherType::Ipv6 => return Err(DropReason::Ipv6Unsupported),
        _ => return Err(DropReason::EthertypeUnsupported),
    }
    if dst_mac != entry.mac {
        return Err(if dst_mac.is_multicast() { DropReason::L2Multicast } else { DropReason::DstMacNotOurs });
    }
    let m = validate_ipv4(frame)?;
    if let Some((ip, _)) = pod {
        if m.src != ip {
            return Err(DropReason::PodSpoofedIp);
        }
    }
    if complete_partial_checksum(frame, &m) {
        ctx.events().partial_checksums_completed += 1;
    }
    forward(ctx, frame, &m, if pod.is_some() { Origin::Pod } else { Origin::Host })
}

fn from_uplink(ctx: &mut Ctx<'_, '_>, frame: &mut FrameBuf<'_>) -> Result<Disposition, DropReason> {
    decap::decap(ctx.tables, frame)?;
    ctx.events().decapsulated += 1;
    let m = validate_ipv4(frame)?;
    forward(ctx, frame, &m, Origin::Tunnel)
}

/// Validates the IPv4 packet at offset 14 and trims Ethernet padding after it.
#[inline]
pub(crate) fn validate_ipv4(frame: &mut FrameBuf<'_>) -> Result<Ipv4Meta, DropReason> {
    let m = {
        let d = frame.data();
        let ip = Ipv4Packet::new_checked(&d[ethernet::HEADER_LEN..]).map_err(decap::ipv4_error)?;
        if ip.version() != 4 {
            return Err(DropReason::Ipv4BadVersion);
        }
        if !ip.verify_checksum() {
            return Err(DropReason::Ipv4BadChecksum);
        }
        if ip.reserved_flag() {
            return Err(DropReason::Ipv4ReservedFlag);
        }
        let src = ip.src_addr();
        let dst = ip.dst_addr();
        let s0 = src.octets()[0];
        if s0 == 0 || s0 == 127 || s0 >= 224 {
            return Err(DropReason::Ipv4MartianSource);
        }
        if dst.octets()[0] >= 224 {
            return Err(DropReason::Ipv4DstMulticast);
        }
        let header_len = ip.header_len();
        let total_len = usize::from(ip.total_len());
        let payload = ip.payload();
        let frag_offset = ip.frag_offset();
        if usize::from(frag_offset) + payload.len() > 65535 {
            return Err(DropReason::Ipv4FragmentOverflow);
        }
        let is_fragment = ip.is_fragment();
        let proto = ip.raw_protocol();
        let mut ports = 0u32;
        let mut icmp_error = false;
        if frag_offset == 0 {
            match proto {
                6 | 17 => {
                    let min = if proto == 6 { tcp::HEADER_LEN } else { udp::HEADER_LEN };
                    if payload.len() < min {
                        return Err(if is_fragment { DropReason::Ipv4TinyFragment } else { DropReason::L4Truncated });
                    }
                    if !is_fragment {
                        let ok = if proto == 6 {
                            TcpPacket::new_checked(payload).is_ok()
                        } else {
                            UdpPacket::new_checked(payload).is_ok()
                        };
                        if !ok {
                            return Err(DropReason::L4Truncated);
                        }
                    }
                    ports = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                }
                1 => {
                    icmp_error = payload.first().is_some_and(|&t| {
                        matches!(t, icmp::TYPE_DST_UNREACHABLE | 4 | 5 | icmp::TYPE_TIME_EXCEEDED | 12)
                    });
                }
                _ => {}
            }
        }
        Ipv4Meta { src, dst, proto, header_len, total_len, ttl: ip.ttl(), frag_offset, is_fragment, ports, icmp_error }
    };
    frame.truncate(ethernet::HEADER_LEN + m.total_len);
    Ok(m)
}

/// Completes a TCP/UDP checksum left as CHECKSUM_PARTIAL (pseudo-header sum only) by the
/// sender's stack, which AF_XDP on a veth hands over as is. A full checksum — right or
/// wrong — is left alone (verification policy is per port, later). Returns whether it
/// completed one.
#[inline]
fn complete_partial_checksum(frame: &mut FrameBuf<'_>, m: &Ipv4Meta) -> bool {
    if m.is_fragment {
        return false;
    }
    let (field, is_udp) = match m.proto {
        6 => (tcp::CHECKSUM_OFFSET, false),
        17 => (udp::CHECKSUM_OFFSET, true),
        _ => return false,
    };
    let start = ethernet::HEADER_LEN + m.header_len;
    let end = ethernet::HEADER_LEN + m.total_len;
    let l4 = &mut frame.data_mut()[start..end];
    let l4 = if is_udp {
        // Validated: 8 <= UDP length <= IP payload.
        let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        &mut l4[..ulen]
    } else {
        l4
    };
    let stored = u16::from_be_bytes([l4[field], l4[field + 1]]);
    if is_udp && stored == 0 {
        return false;
    }
    let pseudo = checksum::pseudo_header_sum(m.src, m.dst, m.proto, l4.len() as u16);
    // Cheap test first: only a field holding exactly the pseudo-header sum can be partial.
    if stored != pseudo && !(stored == 0xffff && pseudo == 0) && !(stored == 0 && pseudo == 0xffff) {
        return false;
    }
    match checksum::classify_l4(m.src, m.dst, m.proto, l4, field) {
        checksum::L4ChecksumState::Partial => checksum::complete_partial(l4, field, is_udp),
        _ => false,
    }
}

/// Routes a validated packet and hands it to its egress.
fn forward(
    ctx: &mut Ctx<'_, '_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    origin: Origin,
) -> Result<Disposition, DropReason> {
    let route = ctx.tables.route(m.dst);
    match (route, origin) {
        (Route::NoSuchPod, _) => Err(DropReason::NoSuchPod),
        (Route::NoNode, _) => Err(DropReason::NoRouteToNode),
        (Route::Host | Route::External, Origin::Host) => Err(DropReason::HostNotRoutable),
        (Route::Remote(_) | Route::External, Origin::Tunnel) => Err(DropReason::VxlanInnerNotLocal),
        // Into the node stack: local delivery for node addresses; for destinations outside
        // the cluster the node stack routes (and masquerades) as it does behind flannel.
        (Route::Host | Route::External, _) => deliver_host(ctx.tables, frame),
        (Route::LocalPod(_) | Route::Remote(_), _) => {
            if origin != Origin::Host {
                if m.ttl <= 1 {
                    return reply::time_exceeded(ctx, frame, m);
                }
                let mut ip = Ipv4Packet::new_unchecked(&mut frame.data_mut()[ethernet::HEADER_LEN..]);
                ip.decrement_ttl();
            }
            egress(ctx, frame, route, m.flow_hash())
        }
    }
}

/// Sends a routed frame (starting with a 14-byte Ethernet header) out of its egress.
#[inline]
pub(crate) fn egress(
    ctx: &mut Ctx<'_, '_>,
    frame: &mut FrameBuf<'_>,
    route: Route,
    flow_hash: u32,
) -> Result<Disposition, DropReason> {
    match route {
        Route::LocalPod(p) => deliver_pod(ctx.tables, frame, &p),
        Route::Host => deliver_host(ctx.tables, frame),
        Route::Remote(idx) => {
            let remote = ctx.tables.remote(idx).ok_or(DropReason::NoRouteToNode)?;
            let ident = ctx.state.next_ident();
            encap::encap(frame, &ctx.tables.node, remote, ident, flow_hash)?;
            ctx.events().encapsulated += 1;
            Ok(Disposition::Forward(ctx.tables.uplink()))
        }
        Route::NoSuchPod => Err(DropReason::NoSuchPod),
        Route::NoNode | Route::External => Err(DropReason::NoRouteToNode),
    }
}

#[inline]
fn set_macs(frame: &mut FrameBuf<'_>, dst: MacAddr, src: MacAddr) {
    let d = frame.data_mut();
    d[0..6].copy_from_slice(&dst.0);
    d[6..12].copy_from_slice(&src.0);
}

fn deliver_pod(tables: &Tables, frame: &mut FrameBuf<'_>, p: &LocalPod) -> Result<Disposition, DropReason> {
    let port = tables.port(p.port).ok_or(DropReason::NoSuchPod)?;
    set_macs(frame, p.mac, port.mac);
    Ok(Disposition::Forward(p.port))
}

fn deliver_host(tables: &Tables, frame: &mut FrameBuf<'_>) -> Result<Disposition, DropReason> {
    let host = tables.host().ok_or(DropReason::NoHostPort)?;
    let port = tables.port(host.port).ok_or(DropReason::NoHostPort)?;
    set_macs(frame, host.stack_mac, port.mac);
    Ok(Disposition::ToHost)
}
