//! Decapsulation of VXLAN arriving on the uplink. Checks, in order: outer Ethernet is untagged
//! IPv4 to our uplink MAC; outer IPv4 is valid, for this node, not fragmented, UDP to our VXLAN
//! port; the source is a known node; a non-zero outer UDP checksum verifies; VXLAN has the I
//! flag, no reserved bits, our VNI; the inner frame is untagged IPv4 to our VTEP MAC.
//! On success the frame is trimmed to the inner Ethernet frame.

use crate::pipeline::{DropReason, FrameBuf};
use crate::tables::Tables;
use crate::wire::{ethernet, udp, vxlan};
use crate::wire::{EtherType, EthernetFrame, IpProtocol, Ipv4Packet, UdpPacket, VxlanPacket};

/// Maps an IPv4 view error to its drop reason.
pub(crate) fn ipv4_error(e: crate::wire::Error) -> DropReason {
    match e {
        crate::wire::Error::BadLength => DropReason::Ipv4BadLength,
        _ => DropReason::Ipv4Truncated,
    }
}

/// Validates the outer headers and strips them; returns the index of the sending node.
#[inline]
pub fn decap(tables: &Tables, frame: &mut FrameBuf<'_>) -> Result<u32, DropReason> {
    let node = &tables.node;
    let (inner_start, inner_end, vtep) = {
        let d = frame.data();
        let eth = EthernetFrame::new_checked(d).map_err(|e| match e {
            crate::wire::Error::Malformed => DropReason::EthTooManyTags,
            _ => DropReason::EthTruncated,
        })?;
        if eth.header_len() != ethernet::HEADER_LEN {
            return Err(DropReason::VlanTagged);
        }
        match eth.ethertype() {
            EtherType::Ipv4 => {}
            EtherType::Arp => return Err(DropReason::ArpOnUplink),
            EtherType::Ipv6 => return Err(DropReason::Ipv6Unsupported),
            _ => return Err(DropReason::EthertypeUnsupported),
        }
        let dst_mac = eth.dst_addr();
        if dst_mac != node.uplink_mac {
            return Err(if dst_mac.is_multicast() { DropReason::L2Multicast } else { DropReason::DstMacNotOurs });
        }
        let ip = Ipv4Packet::new_checked(&d[ethernet::HEADER_LEN..]).map_err(ipv4_error)?;
        if ip.version() != 4 {
            return Err(DropReason::Ipv4BadVersion);
        }
        if !ip.verify_checksum() {
            return Err(DropReason::Ipv4BadChecksum);
        }
        if ip.dst_addr() != node.node_ip {
            return Err(DropReason::UplinkNotForNode);
        }
        if ip.is_fragment() {
            return Err(DropReason::VxlanOuterFragment);
        }
        if ip.protocol() != IpProtocol::Udp {
            return Err(DropReason::UplinkNotVxlan);
        }
        let u = UdpPacket::new_checked(ip.payload()).map_err(|_| DropReason::L4Truncated)?;
        if u.dst_port() != node.vxlan_port {
            return Err(DropReason::UplinkNotVxlan);
        }
        let vtep = tables.vtep(ip.src_addr()).ok_or(DropReason::VxlanUnknownVtep)?;
        if !u.verify_checksum(ip.src_addr(), ip.dst_addr()) {
            return Err(DropReason::VxlanBadOuterChecksum);
        }
        let vx = VxlanPacket::new_checked(u.payload()).map_err(|_| DropReason::VxlanTruncated)?;
        if !vx.has_vni_flag() || !vx.reserved_clear() {
            return Err(DropReason::VxlanBadFlags);
        }
        if vx.vni() != node.vni {
            return Err(DropReason::VxlanWrongVni);
        }
        let udp_start = ethernet::HEADER_LEN + ip.header_len();
        (udp_start + udp::HEADER_LEN + vxlan::HEADER_LEN, udp_start + usize::from(u.len()), vtep)
    };
    frame.truncate(inner_end);
    frame.pull_front(inner_start);
    let d = frame.data();
    let inner = EthernetFrame::new_checked(d).map_err(|_| DropReason::VxlanTruncated)?;
    if inner.header_len() != ethernet::HEADER_LEN || inner.ethertype() != EtherType::Ipv4 {
        return Err(DropReason::VxlanInnerNotIpv4);
    }
    if inner.dst_addr() != node.vtep_mac {
        return Err(DropReason::VxlanInnerDstMac);
    }
    Ok(vtep)
}
