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
use super::service_nat::Nat;
use super::{Disposition, DropReason, FrameBuf, Nanos, PortCounters, TokenBucket};
use crate::tables::{ChecksumPolicy, LocalPod, PortEntry, PortId, PortKind, Route, Tables};
use crate::vxlan::decap::OuterChecksum;
use crate::vxlan::{decap, encap};
use crate::wire::checksum;
use crate::wire::{ethernet, icmp, ipv4, tcp, udp};
use crate::wire::{EtherType, EthernetFrame, Ipv4Packet, MacAddr};
use core::net::Ipv4Addr;

/// Where the packet being routed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Pod,
    Host,
    Tunnel,
    /// A client outside the cluster, through the uplink (NodePort, external and LB IPs).
    Outside,
}

/// The per-packet context threaded through the stages.
pub(crate) struct Ctx<'a> {
    pub(crate) tables: &'a Tables,
    pub(crate) now: Nanos,
    pub(crate) ingress: PortId,
    /// The worker's outer IPv4 ident sequence.
    pub(crate) ident: &'a mut u16,
    pub(crate) icmp_limit: &'a mut TokenBucket,
    /// The ingress port's counters, borrowed for the whole batch.
    pub(crate) counters: &'a mut PortCounters,
    pub(crate) flows: &'a mut crate::conntrack::ConnTrack,
    pub(crate) snat: &'a mut crate::nat::snat::SnatAllocator,
    pub(crate) affinity: &'a mut ahash::AHashMap<super::AffinityKey, ((Ipv4Addr, u16), Nanos)>,
    /// The current frame's flow key as the batch's prefetch pass guessed it, with its hash
    /// (so a lookup of that key does not hash it again).
    pub(crate) hint: Option<(crate::conntrack::FlowKey, crate::conntrack::KeyHash)>,
    /// Where segments and fragments of oversized frames go.
    pub(crate) spill: &'a mut super::Spill,
    /// A capture or trace in progress.
    pub(crate) observe: Option<&'a mut crate::observe::Observe>,
    pub(crate) backends: &'a mut ahash::AHashMap<(Ipv4Addr, u16), super::BackendCounters>,
}

impl Ctx<'_> {
    #[inline]
    pub(crate) fn events(&mut self) -> &mut super::EventCounters {
        &mut self.counters.events
    }
    #[inline]
    pub(crate) fn next_ident(&mut self) -> u16 {
        *self.ident = self.ident.wrapping_add(1);
        *self.ident
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

#[inline]
pub(crate) fn process_one(ctx: &mut Ctx<'_>, entry: &PortEntry, frame: &mut FrameBuf<'_>) -> Disposition {
    let r = match entry.kind {
        PortKind::Pod { ip, mac } => from_local(ctx, entry, frame, Some((ip, mac))),
        PortKind::Host => from_local(ctx, entry, frame, None),
        PortKind::Uplink => from_uplink(ctx, entry.checksum, frame),
    };
    r.unwrap_or_else(Disposition::Drop)
}

#[inline(always)]
fn mac_at(h: &[u8; ethernet::HEADER_LEN], at: usize) -> MacAddr {
    MacAddr([h[at], h[at + 1], h[at + 2], h[at + 3], h[at + 4], h[at + 5]])
}

/// A tagged frame where untagged ones are expected: say whether it is even well formed.
#[cold]
fn vlan_error(d: &[u8]) -> DropReason {
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
        let Some(h) = frame.data().first_chunk::<{ ethernet::HEADER_LEN }>() else {
            return Err(DropReason::EthTruncated);
        };
        (mac_at(h, 0), mac_at(h, 6), u16::from_be_bytes([h[12], h[13]]))
    };
    match pod {
        Some((_, mac)) if src_mac != mac => return Err(DropReason::PodSpoofedMac),
        None if ctx.tables.host().is_some_and(|h| h.stack_mac != src_mac) => return Err(DropReason::HostSpoofedMac),
        _ => {}
    }
    match EtherType::from(ethertype) {
        EtherType::Ipv4 => {}
        EtherType::Arp => return reply::arp(ctx, entry, frame, dst_mac, pod),
        EtherType::Ipv6 => return Err(DropReason::Ipv6Unsupported),
        EtherType::Vlan | EtherType::QinQ => return Err(vlan_error(frame.data())),
        EtherType::Unknown(_) => return Err(DropReason::EthertypeUnsupported),
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
    if l4_checksum(entry.checksum, frame, &m)?.is_some() {
        ctx.events().partial_checksums_completed += 1;
    }
    let mut m = m;
    let origin = if pod.is_some() { Origin::Pod } else { Origin::Host };
    match super::service_nat::apply(ctx, frame, &mut m, origin, None)? {
        Nat::Answered(d) => Ok(d),
        Nat::Translated { uplink_return: Some(mac), .. } => to_outside(ctx, frame, &m, mac),
        _ => forward(ctx, frame, &m, origin),
    }
}

#[inline(always)]
fn from_uplink(ctx: &mut Ctx<'_>, policy: ChecksumPolicy, frame: &mut FrameBuf<'_>) -> Result<Disposition, DropReason> {
    if let Some(client_mac) = service_candidate(ctx.tables, frame.data()) {
        return from_outside(ctx, policy, frame, client_mac);
    }
    let d = decap::decap(ctx.tables, frame)?;
    let m = validate_ipv4(frame)?;
    // A veth underlay delivers what the sender left to offloads: complete the inner checksum,
    // then judge the outer one (see `OuterChecksum`).
    let completed = l4_checksum(policy, frame, &m)?;
    match d.outer_checksum {
        OuterChecksum::Ok => {}
        OuterChecksum::Partial => ctx.events().outer_partial_checksums += 1,
        OuterChecksum::PendingInner { sum } => match completed {
            // RFC 1624: the inner field went from `old` to `new`; the outer sum follows.
            Some((old, new)) if checksum::add(checksum::add(sum, !old), new) == 0xffff => {
                ctx.events().outer_partial_checksums += 1;
            }
            _ => return Err(DropReason::VxlanBadOuterChecksum),
        },
    }
    if completed.is_some() {
        ctx.events().partial_checksums_completed += 1;
    }
    ctx.events().decapsulated += 1;
    let mut m = m;
    match super::service_nat::apply(ctx, frame, &mut m, Origin::Tunnel, None)? {
        Nat::Answered(d) => Ok(d),
        Nat::Translated { uplink_return: Some(mac), .. } => to_outside(ctx, frame, &m, mac),
        _ => forward(ctx, frame, &m, Origin::Tunnel),
    }
}

/// An untagged IPv4 TCP/UDP frame to our uplink MAC that is not VXLAN to this node: maybe a
/// client outside the cluster reaching a NodePort, external or load balancer IP. Returns the
/// client's (next hop's) MAC.
fn service_candidate(tables: &Tables, d: &[u8]) -> Option<MacAddr> {
    let e = d.first_chunk::<{ ethernet::HEADER_LEN }>()?;
    if e[12..14] != [0x08, 0x00] || e[0..6] != tables.node.uplink_mac.0 {
        return None;
    }
    let ip = d.get(ethernet::HEADER_LEN..)?.first_chunk::<{ ipv4::HEADER_LEN }>()?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    if proto != 6 && proto != 17 {
        return None;
    }
    if proto == 17 && ip[16..20] == tables.node.node_ip.octets() {
        let at = ethernet::HEADER_LEN + ihl + 2;
        if d.get(at..at + 2) == Some(&tables.node.vxlan_port.to_be_bytes()[..]) {
            return None;
        }
    }
    Some(MacAddr([e[6], e[7], e[8], e[9], e[10], e[11]]))
}

/// A client outside the cluster: only Service traffic is accepted.
fn from_outside(
    ctx: &mut Ctx<'_>,
    policy: ChecksumPolicy,
    frame: &mut FrameBuf<'_>,
    client_mac: MacAddr,
) -> Result<Disposition, DropReason> {
    let mut m = validate_ipv4(frame)?;
    // A veth underlay hands over what the sender left to offloads; NAT's incremental update
    // needs a complete checksum to start from.
    if l4_checksum(policy, frame, &m)?.is_some() {
        ctx.events().partial_checksums_completed += 1;
    }
    match super::service_nat::apply(ctx, frame, &mut m, Origin::Outside, Some(client_mac))? {
        Nat::Answered(d) => Ok(d),
        Nat::Translated { .. } => forward(ctx, frame, &m, Origin::Outside),
        Nat::Untouched => Err(if m.dst == ctx.tables.node.node_ip {
            DropReason::UplinkNotVxlan
        } else {
            DropReason::UplinkNotForNode
        }),
    }
}

/// A translated reply to a client outside the cluster: straight back out of the uplink to the
/// client's L2 next hop, as a router would (TTL decremented).
fn to_outside(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    mac: MacAddr,
) -> Result<Disposition, DropReason> {
    if m.ttl <= 1 {
        return Err(DropReason::TtlExpired);
    }
    Ipv4Packet::new_unchecked(&mut frame.data_mut()[ethernet::HEADER_LEN..]).decrement_ttl();
    set_macs(frame, mac, ctx.tables.node.uplink_mac);
    Ok(Disposition::Forward(ctx.tables.uplink()))
}

/// The checks every IPv4 header gets, on the pod side and on the uplink alike: present,
/// version 4, sane header and total lengths, wholly inside `ip`, correct header checksum.
/// Returns the fixed header, the header length and the total length.
///
/// One length check (`first_chunk`) covers every field read; only headers with options take
/// the general checksum loop.
#[inline(always)]
pub(crate) fn check_ipv4_header(ip: &[u8]) -> Result<(&[u8; ipv4::HEADER_LEN], usize, usize), DropReason> {
    let Some(h) = ip.first_chunk::<{ ipv4::HEADER_LEN }>() else {
        return Err(DropReason::Ipv4Truncated);
    };
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 {
        return Err(DropReason::Ipv4BadVersion);
    }
    if header_len < ipv4::HEADER_LEN || total_len < header_len {
        return Err(DropReason::Ipv4BadLength);
    }
    if total_len > ip.len() {
        return Err(DropReason::Ipv4Truncated);
    }
    let sum_ok = if header_len == ipv4::HEADER_LEN {
        checksum::sum_ipv4_header(h) == 0xffff
    } else {
        checksum::verify(&ip[..header_len])
    };
    if !sum_ok {
        return Err(DropReason::Ipv4BadChecksum);
    }
    Ok((h, header_len, total_len))
}

/// Validates the IPv4 packet at offset 14 and trims Ethernet padding after it.
#[inline(always)]
pub(crate) fn validate_ipv4(frame: &mut FrameBuf<'_>) -> Result<Ipv4Meta, DropReason> {
    let m = {
        let d = frame.data();
        let ip = d.get(ethernet::HEADER_LEN..).unwrap_or_default();
        let (h, header_len, total_len) = check_ipv4_header(ip)?;
        let flags_offset = u16::from_be_bytes([h[6], h[7]]);
        if flags_offset & 0x8000 != 0 {
            return Err(DropReason::Ipv4ReservedFlag);
        }
        let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
        let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
        if h[12] == 0 || h[12] == 127 || h[12] >= 224 {
            return Err(DropReason::Ipv4MartianSource);
        }
        if h[16] >= 224 {
            return Err(DropReason::Ipv4DstMulticast);
        }
        let payload = &ip[header_len..total_len];
        let frag_offset = (flags_offset & 0x1fff) << 3;
        if usize::from(frag_offset) + payload.len() > 65535 {
            return Err(DropReason::Ipv4FragmentOverflow);
        }
        let is_fragment = flags_offset & 0x3fff != 0;
        let proto = h[9];
        let mut ports = 0u32;
        let mut icmp_error = false;
        if frag_offset == 0 {
            match proto {
                6 => {
                    let Some(t) = payload.first_chunk::<{ tcp::HEADER_LEN }>() else {
                        return Err(if is_fragment { DropReason::Ipv4TinyFragment } else { DropReason::L4Truncated });
                    };
                    let doff = usize::from(t[12] >> 4) * 4;
                    if !is_fragment && (doff < tcp::HEADER_LEN || doff > payload.len()) {
                        return Err(DropReason::L4Truncated);
                    }
                    ports = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
                }
                17 => {
                    let Some(u) = payload.first_chunk::<{ udp::HEADER_LEN }>() else {
                        return Err(if is_fragment { DropReason::Ipv4TinyFragment } else { DropReason::L4Truncated });
                    };
                    let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
                    if !is_fragment && (ulen < udp::HEADER_LEN || ulen > payload.len()) {
                        return Err(DropReason::L4Truncated);
                    }
                    ports = u32::from_be_bytes([u[0], u[1], u[2], u[3]]);
                }
                1 => {
                    icmp_error = payload.first().is_some_and(|&t| {
                        matches!(t, icmp::TYPE_DST_UNREACHABLE | 4 | 5 | icmp::TYPE_TIME_EXCEEDED | 12)
                    });
                }
                _ => {}
            }
        }
        Ipv4Meta { src, dst, proto, header_len, total_len, ttl: h[8], frag_offset, is_fragment, ports, icmp_error }
    };
    frame.truncate(ethernet::HEADER_LEN + m.total_len);
    Ok(m)
}

/// Applies the ingress port's checksum policy to a validated packet. Returns the completed
/// field's old and new values when a CHECKSUM_PARTIAL checksum was completed.
#[inline(always)]
fn l4_checksum(
    policy: ChecksumPolicy,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
) -> Result<Option<(u16, u16)>, DropReason> {
    match policy {
        ChecksumPolicy::Trust => Ok(None),
        ChecksumPolicy::Complete => Ok(complete_partial_checksum(frame, m)),
        ChecksumPolicy::Verify => {
            let completed = complete_partial_checksum(frame, m);
            if completed.is_none() && !verify_l4_checksum(frame, m) {
                return Err(DropReason::L4BadChecksum);
            }
            Ok(completed)
        }
    }
}

/// Whether a TCP/UDP checksum verifies (fragments, other protocols and UDP without a checksum
/// pass: there is nothing to verify here).
#[cold]
fn verify_l4_checksum(frame: &FrameBuf<'_>, m: &Ipv4Meta) -> bool {
    if m.is_fragment || (m.proto != 6 && m.proto != 17) {
        return true;
    }
    let start = ethernet::HEADER_LEN + m.header_len;
    let Some(l4) = frame.data().get(start..ethernet::HEADER_LEN + m.total_len) else { return false };
    let l4 = if m.proto == 17 {
        let ulen = l4.get(4..6).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        if l4.get(6..8) == Some(&[0, 0][..]) {
            return true;
        }
        match l4.get(..ulen) {
            Some(u) => u,
            None => return false,
        }
    } else {
        l4
    };
    checksum::verify_l4(m.src, m.dst, m.proto, l4)
}

/// Completes a TCP/UDP checksum left as CHECKSUM_PARTIAL (pseudo-header sum only) by the
/// sender's stack, which AF_XDP on a veth hands over as is. A full checksum — right or
/// wrong — is left alone (verification policy is per port, later). Returns the field's old
/// and new values when it completed one.
#[inline(always)]
fn complete_partial_checksum(frame: &mut FrameBuf<'_>, m: &Ipv4Meta) -> Option<(u16, u16)> {
    if m.is_fragment {
        return None;
    }
    let start = ethernet::HEADER_LEN + m.header_len;
    let end = ethernet::HEADER_LEN + m.total_len;
    let l4 = frame.data_mut().get_mut(start..end)?;
    let (field, l4) = match m.proto {
        6 => (tcp::CHECKSUM_OFFSET, l4),
        17 => {
            // Validated: 8 <= UDP length <= IP payload.
            let u = l4.first_chunk::<{ udp::HEADER_LEN }>()?;
            let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
            (udp::CHECKSUM_OFFSET, l4.get_mut(..ulen)?)
        }
        _ => return None,
    };
    let f = l4.get(field..field + 2)?;
    let stored = u16::from_be_bytes([f[0], f[1]]);
    if m.proto == 17 && stored == 0 {
        return None;
    }
    let pseudo = checksum::pseudo_header_sum(m.src, m.dst, m.proto, l4.len() as u16);
    // Cheap test first: only a field holding exactly the pseudo-header sum can be partial
    // (0x0000 and 0xffff are the same number in one's complement).
    if stored != pseudo && stored.wrapping_add(1) | pseudo.wrapping_add(1) > 1 {
        return None;
    }
    match checksum::complete_if_partial(m.src, m.dst, m.proto, l4, field, m.proto == 17) {
        checksum::L4ChecksumState::Partial => Some((stored, u16::from_be_bytes([l4[field], l4[field + 1]]))),
        _ => None,
    }
}

/// Routes a validated packet and hands it to its egress.
#[inline(always)]
fn forward(
    ctx: &mut Ctx<'_>,
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
        (Route::Host | Route::External, Origin::Outside) => Err(DropReason::UplinkNotForNode),
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
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    route: Route,
    flow_hash: u32,
) -> Result<Disposition, DropReason> {
    // Every egress carries IPv4 packets of at most the pod MTU (the tunnel: the underlay MTU
    // less VXLAN; pods and the host port are configured with the same).
    if frame.len() > ethernet::HEADER_LEN + ctx.tables.node.max_inner_ip_len() {
        return oversize(ctx, frame, route, flow_hash);
    }
    match route {
        Route::LocalPod(p) => deliver_pod(ctx.tables, frame, &p),
        Route::Host => deliver_host(ctx.tables, frame),
        Route::Remote(idx) => {
            let remote = ctx.tables.remote(idx).ok_or(DropReason::NoRouteToNode)?;
            let ident = ctx.next_ident();
            encap::encap(frame, &ctx.tables.node, remote, ident, flow_hash)?;
            ctx.events().encapsulated += 1;
            Ok(Disposition::Forward(ctx.tables.uplink()))
        }
        Route::NoSuchPod => Err(DropReason::NoSuchPod),
        Route::NoNode | Route::External => Err(DropReason::NoRouteToNode),
    }
}

/// A frame larger than its egress allows (an aggregated GRO/LRO frame, or one from a jumbo
/// pod): TCP is segmented, other IPv4 with DF clear fragmented, both into the spill area with
/// their Ethernet (and, toward a remote node, VXLAN) headers; with DF set the sender gets ICMP
/// fragmentation needed carrying the usable MTU.
#[cold]
#[inline(never)]
fn oversize(
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
            deliver_pod(tables, frame, &p)?;
            (p.port, ethernet::HEADER_LEN, None)
        }
        Route::Host => {
            deliver_host(tables, frame)?;
            (tables.host().map(|h| h.port).ok_or(DropReason::NoHostPort)?, ethernet::HEADER_LEN, None)
        }
        Route::Remote(idx) => {
            let remote = tables.remote(idx).ok_or(DropReason::NoRouteToNode)?;
            (tables.uplink(), crate::wire::vxlan::ENCAP_OVERHEAD + ethernet::HEADER_LEN, Some(remote))
        }
        Route::NoSuchPod => return Err(DropReason::NoSuchPod),
        Route::NoNode | Route::External => return Err(DropReason::NoRouteToNode),
    };
    let Some(eth) = frame.data().first_chunk::<{ ethernet::HEADER_LEN }>().copied() else {
        return Err(DropReason::Ipv4Truncated);
    };
    let ip = &frame.data()[ethernet::HEADER_LEN..];
    let (proto, frag) = (ip[9], u16::from_be_bytes([ip[6], ip[7]]));
    let (df, is_fragment) = (frag & 0x4000 != 0, frag & 0x3fff != 0);
    let mark = ctx.spill.mark();
    let result = if proto == 6 && !is_fragment {
        // The receiver's announced MSS, when its flow is tracked (Service flows).
        let mss = ip.get(usize::from(ip[0] & 0x0f) * 4..).and_then(|l4| l4.first_chunk::<4>()).and_then(|p| {
            let key = crate::conntrack::FlowKey {
                proto: 6,
                src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
                sport: u16::from_be_bytes([p[0], p[1]]),
                dport: u16::from_be_bytes([p[2], p[3]]),
            };
            super::service_nat::receiver_mss(ctx, &key)
        });
        let ip = &frame.data()[ethernet::HEADER_LEN..];
        crate::gso::segment_tcp(ip, mtu, mss, &mut ctx.spill.sink(prefix, port))
    } else if !df {
        crate::gso::fragment(ip, mtu, &mut ctx.spill.sink(prefix, port))
    } else {
        let m = meta_of(ip);
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
        let ident = if remote.is_some() { ctx.next_ident() } else { 0 };
        let Some(region) = ctx.spill.region_mut(i) else { break };
        let len = region.len();
        region[prefix - ethernet::HEADER_LEN..prefix].copy_from_slice(&eth);
        if let Some(remote) = remote {
            let mut f = FrameBuf::new(region, prefix - ethernet::HEADER_LEN, len - (prefix - ethernet::HEADER_LEN))
                .ok_or(DropReason::NoHeadroom)?;
            if let Err(e) = encap::encap(&mut f, &tables.node, remote, ident, flow_hash) {
                ctx.spill.rollback(mark);
                return Err(e);
            }
        }
    }
    let ev = ctx.events();
    if proto == 6 && !is_fragment {
        ev.segmented += 1;
        ev.segments_sent += n as u64;
    } else {
        ev.fragmented += 1;
        ev.fragments_sent += n as u64;
    }
    if remote.is_some() {
        ev.encapsulated += n as u64;
    }
    Ok(Disposition::Spilled)
}

/// What `check_ipv4_header` would say of an already validated IPv4 header.
fn meta_of(ip: &[u8]) -> Ipv4Meta {
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let proto = ip[9];
    let icmp_error = proto == 1
        && ip
            .get(header_len)
            .is_some_and(|&t| matches!(t, icmp::TYPE_DST_UNREACHABLE | 4 | 5 | icmp::TYPE_TIME_EXCEEDED | 12));
    Ipv4Meta {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto,
        header_len,
        total_len: usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        ttl: ip[8],
        frag_offset: frag & 0x1fff,
        is_fragment: frag & 0x3fff != 0,
        ports: 0,
        icmp_error,
    }
}

#[inline]
fn set_macs(frame: &mut FrameBuf<'_>, dst: MacAddr, src: MacAddr) {
    if let Some(h) = frame.data_mut().first_chunk_mut::<12>() {
        h[..6].copy_from_slice(&dst.0);
        h[6..].copy_from_slice(&src.0);
    }
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
