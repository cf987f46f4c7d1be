//! Decapsulation of VXLAN arriving on the uplink. Checks, in order: outer Ethernet is untagged
//! IPv4 to our uplink MAC; outer IPv4 is valid, for this node, not fragmented, UDP to our VXLAN
//! port; the source is a known node; a non-zero outer UDP checksum verifies; VXLAN has the I
//! flag, no reserved bits, our VNI; the inner frame is untagged IPv4 to our VTEP MAC.
//! On success the frame is trimmed to the inner Ethernet frame.

use crate::pipeline::{check_ipv4_header, DropReason, FrameBuf};
use crate::tables::Tables;
use crate::wire::{checksum, ethernet, udp, vxlan};
use crate::wire::{EtherType, EthernetFrame};
use core::net::Ipv4Addr;

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
    pub outer_checksum: OuterChecksum,
}

/// Validates the outer headers and strips them.
///
/// Reads each header through one fixed-size view (`first_chunk`) so field reads carry no
/// further bounds checks; the order of checks decides which reason a frame broken in several
/// ways gets, and matches the module doc.
#[inline]
pub fn decap(tables: &Tables, frame: &mut FrameBuf<'_>) -> Result<Decapped, DropReason> {
    let node = &tables.node;
    let (inner_start, inner_end, vtep, outer_checksum) = {
        let d = frame.data();
        let Some(e) = d.first_chunk::<{ ethernet::HEADER_LEN }>() else {
            return Err(DropReason::EthTruncated);
        };
        match EtherType::from(u16::from_be_bytes([e[12], e[13]])) {
            EtherType::Ipv4 => {}
            EtherType::Arp => return Err(DropReason::ArpOnUplink),
            EtherType::Ipv6 => return Err(DropReason::Ipv6Unsupported),
            EtherType::Vlan | EtherType::QinQ => {
                return Err(match EthernetFrame::new_checked(d) {
                    Err(crate::wire::Error::Malformed) => DropReason::EthTooManyTags,
                    Err(_) => DropReason::EthTruncated,
                    Ok(_) => DropReason::VlanTagged,
                })
            }
            EtherType::Unknown(_) => return Err(DropReason::EthertypeUnsupported),
        }
        if e[0..6] != node.uplink_mac.0 {
            return Err(if e[0] & 1 == 1 { DropReason::L2Multicast } else { DropReason::DstMacNotOurs });
        }
        let ip = &d[ethernet::HEADER_LEN..];
        let (h, ihl, total) = check_ipv4_header(ip)?;
        if h[16..20] != node.node_ip.octets() {
            return Err(DropReason::UplinkNotForNode);
        }
        if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return Err(DropReason::VxlanOuterFragment);
        }
        if h[9] != 17 {
            return Err(DropReason::UplinkNotVxlan);
        }
        let datagram = &ip[ihl..total];
        let Some(u) = datagram.first_chunk::<{ udp::HEADER_LEN }>() else {
            return Err(DropReason::L4Truncated);
        };
        let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
        if ulen < udp::HEADER_LEN || ulen > datagram.len() {
            return Err(DropReason::L4Truncated);
        }
        if u16::from_be_bytes([u[2], u[3]]) != node.vxlan_port {
            return Err(DropReason::UplinkNotVxlan);
        }
        let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
        let vtep = tables.vtep(src).ok_or(DropReason::VxlanUnknownVtep)?;
        let datagram = &datagram[..ulen];
        let stored = u16::from_be_bytes([u[6], u[7]]);
        let outer_checksum = if stored == 0 {
            OuterChecksum::Ok
        } else {
            let pseudo = checksum::pseudo_header_sum(src, node.node_ip, 17, ulen as u16);
            let sum = checksum::add(pseudo, checksum::sum(datagram));
            if sum == 0xffff {
                OuterChecksum::Ok
            } else if stored == pseudo || (stored == 0xffff && pseudo == 0) {
                OuterChecksum::Partial
            } else {
                OuterChecksum::PendingInner { sum }
            }
        };
        let Some(vx) = datagram[udp::HEADER_LEN..].first_chunk::<{ vxlan::HEADER_LEN }>() else {
            return Err(DropReason::VxlanTruncated);
        };
        if vx[0] != vxlan::FLAG_I || vx[1..4] != [0, 0, 0] || vx[7] != 0 {
            return Err(DropReason::VxlanBadFlags);
        }
        if u32::from_be_bytes([0, vx[4], vx[5], vx[6]]) != node.vni {
            return Err(DropReason::VxlanWrongVni);
        }
        let udp_start = ethernet::HEADER_LEN + ihl;
        (udp_start + udp::HEADER_LEN + vxlan::HEADER_LEN, udp_start + ulen, vtep, outer_checksum)
    };
    frame.truncate(inner_end);
    frame.pull_front(inner_start);
    let Some(inner) = frame.data().first_chunk::<{ ethernet::HEADER_LEN }>() else {
        return Err(DropReason::VxlanTruncated);
    };
    if inner[12..14] != [0x08, 0x00] {
        return Err(DropReason::VxlanInnerNotIpv4);
    }
    if inner[0..6] != node.vtep_mac.0 {
        return Err(DropReason::VxlanInnerDstMac);
    }
    Ok(Decapped { vtep, outer_checksum })
}
