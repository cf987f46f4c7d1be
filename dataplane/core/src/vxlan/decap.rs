//! Decapsulation of VXLAN arriving on the uplink. Checks, in order: outer Ethernet is untagged
//! IPv4 to our uplink MAC; outer IPv4 is valid, for this node, not fragmented, UDP to our VXLAN
//! port; the source is a known node; a non-zero outer UDP checksum verifies; VXLAN has the I
//! flag, no reserved bits, our VNI; the inner frame is untagged IPv4 to our VTEP MAC.
//! On success the frame is trimmed to the inner Ethernet frame.

use crate::pipeline::{check_ipv4_header, vlan_error, DropReason, FrameBuf};
use crate::tables::Tables;
use crate::wire::{checksum, ethernet, udp};
use crate::wire::{EtherType, EthernetFrame, IpProtocol, Ipv4Cidr, UdpPacket, VxlanPacket};

/// The outer UDP checksum as found, before the inner packet is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OuterChecksum {
    /// Zero (none) or verifies.
    Ok,
    /// Holds only the pseudo-header sum: the sender left it to an offload (Linux
    /// `udp_set_csum` on a CHECKSUM_COMPLETE inner packet) that a veth never ran. Not corrupt.
    Partial,
    /// Does not verify as it stands. It may still be valid by local checksum offload (LCO:
    /// Linux computes the outer checksum as if the inner L4 checksum, itself left partial,
    /// were already filled in): `sum` is the verification sum over the outer datagram as
    /// received, to be re-checked after the inner checksum is completed.
    PendingInner { sum: u16 },
}

/// What decapsulation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapped {
    /// Index of the sending node.
    pub vtep: u32,
    /// The sending node's pod CIDR: the inner sources it may send from (issue 17). Taken here,
    /// with the node, so the check after validation is one prefix compare.
    pub sender_pod_cidr: Ipv4Cidr,
    pub outer_checksum: OuterChecksum,
}

/// Validates the outer headers and strips them.
///
/// Reads each header through one fixed-size `wire` view so field reads carry no further bounds
/// checks; the order of checks decides which reason a frame broken in several ways gets, and
/// matches the module doc.
#[inline]
pub fn decap(tables: &Tables, frame: &mut FrameBuf<'_>) -> Result<Decapped, DropReason> {
    let node = &tables.node;
    let (inner_start, inner_end, vtep, sender_pod_cidr, outer_checksum) = {
        let d = frame.data();
        let Ok(eth) = EthernetFrame::new_fixed(d) else {
            return Err(DropReason::EthTruncated);
        };
        match eth.ethertype_or_tpid() {
            EtherType::Ipv4 => {}
            EtherType::Arp => return Err(DropReason::ArpOnUplink),
            EtherType::Ipv6 => return Err(DropReason::Ipv6Unsupported),
            EtherType::Vlan | EtherType::QinQ => return Err(vlan_error(d)),
            EtherType::Unknown(_) => return Err(DropReason::EthertypeUnsupported),
        }
        let dst_mac = eth.dst_addr();
        if dst_mac != node.uplink_mac {
            return Err(if dst_mac.is_multicast() { DropReason::L2Multicast } else { DropReason::DstMacNotOurs });
        }
        let ip = &d[ethernet::HEADER_LEN..];
        let (h, ihl, total) = check_ipv4_header(ip)?;
        if h.dst_addr() != node.node_ip {
            return Err(DropReason::UplinkNotForNode);
        }
        if h.is_fragment() {
            return Err(DropReason::VxlanOuterFragment);
        }
        if h.protocol() != IpProtocol::Udp {
            return Err(DropReason::UplinkNotVxlan);
        }
        let datagram = &ip[ihl..total];
        let Ok(u) = UdpPacket::new_fixed(datagram) else {
            return Err(DropReason::L4Truncated);
        };
        let ulen = usize::from(u.len());
        if ulen < udp::HEADER_LEN || ulen > datagram.len() {
            return Err(DropReason::L4Truncated);
        }
        if u.dst_port() != node.vxlan_port {
            return Err(DropReason::UplinkNotVxlan);
        }
        let src = h.src_addr();
        let vtep = tables.vtep(src).ok_or(DropReason::VxlanUnknownVtep)?;
        let sender_pod_cidr = tables.remote(vtep).ok_or(DropReason::VxlanUnknownVtep)?.pod_cidr;
        let datagram = &datagram[..ulen];
        let stored = u.checksum();
        let outer_checksum = if stored == 0 {
            OuterChecksum::Ok
        } else {
            let pseudo = checksum::pseudo_header_sum(src, node.node_ip, IpProtocol::Udp.into(), ulen as u16);
            let sum = checksum::add(pseudo, checksum::sum(datagram));
            if sum == 0xffff {
                OuterChecksum::Ok
            } else if stored == pseudo || (stored == 0xffff && pseudo == 0) {
                OuterChecksum::Partial
            } else {
                OuterChecksum::PendingInner { sum }
            }
        };
        let Ok(vx) = VxlanPacket::new_fixed(&datagram[udp::HEADER_LEN..]) else {
            return Err(DropReason::VxlanTruncated);
        };
        if !vx.is_plain() {
            return Err(DropReason::VxlanBadFlags);
        }
        if vx.vni() != node.vni {
            return Err(DropReason::VxlanWrongVni);
        }
        let udp_start = ethernet::HEADER_LEN + ihl;
        (
            udp_start + udp::HEADER_LEN + crate::wire::vxlan::HEADER_LEN,
            udp_start + ulen,
            vtep,
            sender_pod_cidr,
            outer_checksum,
        )
    };
    frame.truncate(inner_end);
    frame.pull_front(inner_start);
    let Ok(inner) = EthernetFrame::new_fixed(frame.data()) else {
        return Err(DropReason::VxlanTruncated);
    };
    if inner.ethertype_or_tpid() != EtherType::Ipv4 {
        return Err(DropReason::VxlanInnerNotIpv4);
    }
    if inner.dst_addr() != node.vtep_mac {
        return Err(DropReason::VxlanInnerDstMac);
    }
    Ok(Decapped { vtep, sender_pod_cidr, outer_checksum })
}
