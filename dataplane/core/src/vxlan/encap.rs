//! Encapsulation toward a remote node, exactly as flannel.1 (a Linux VXLAN device with
//! `nolearning`, static FDB/neighbour entries) does it:
//! outer Ethernet: our uplink MAC -> underlay next hop; outer IPv4: node IP -> remote node IP,
//! TTL 64, DF clear, TOS 0; outer UDP: source port from a hash of the inner flow mapped into
//! the ephemeral range 32768..=60999 as `udp_flow_src_port` does, destination 8472 (default),
//! checksum zero (RFC 7348 allows it for IPv4) unless the node computes it (`outer_udp_checksum`);
//! VXLAN: I flag, VNI; inner Ethernet: our VTEP MAC -> the remote's VtepMAC.
//!
//! Per remote node the 50 constant-ish bytes are built once ([`OuterTemplate`]); per packet we
//! copy them and patch five fields, with the outer IPv4 checksum finished from a precomputed
//! partial sum.

use crate::pipeline::{DropReason, FrameBuf};
use crate::tables::{NodeConfig, RemoteNode};
use crate::wire::vxlan::ENCAP_OVERHEAD;
use crate::wire::{checksum, ethernet, ipv4, udp};
use crate::wire::{EtherType, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, MacAddr};
use crate::wire::{UdpPacket, VxlanPacket, VxlanRepr};
use core::net::Ipv4Addr;

/// Outer TTL (Linux `ip4_dst_hoplimit` default).
pub const OUTER_TTL: u8 = 64;
/// `udp_flow_src_port` range when none is configured: the ephemeral port range.
pub const SRC_PORT_MIN: u32 = 32768;
pub const SRC_PORT_MAX_EXCL: u32 = 61000;

/// Where each outer header starts in the 50 bytes.
const OFF_IP: usize = ethernet::HEADER_LEN;
const OFF_UDP: usize = OFF_IP + ipv4::HEADER_LEN;
const OFF_VXLAN: usize = OFF_UDP + udp::HEADER_LEN;

/// Pre-built outer headers toward one remote node.
#[derive(Clone, PartialEq, Eq)]
pub struct OuterTemplate {
    bytes: [u8; ENCAP_OVERHEAD],
    /// Sum of the outer IPv4 header with total length, ident and checksum zero.
    ip_sum_base: u16,
}

impl core::fmt::Debug for OuterTemplate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OuterTemplate").field("ip_sum_base", &self.ip_sum_base).finish_non_exhaustive()
    }
}

impl OuterTemplate {
    pub fn new(node: &NodeConfig, remote_ip: Ipv4Addr, next_hop_mac: MacAddr) -> OuterTemplate {
        let mut b = [0u8; ENCAP_OVERHEAD];
        EthernetRepr { dst: next_hop_mac, src: node.uplink_mac, ethertype: EtherType::Ipv4 }
            .emit(&mut EthernetFrame::new_unchecked(&mut b[..OFF_IP]));
        // Total length, ident and checksum stay zero here: patched per packet.
        let mut ip = Ipv4Packet::new_unchecked(&mut b[OFF_IP..OFF_UDP]);
        ip.set_version_ihl(ipv4::HEADER_LEN);
        ip.set_ttl(OUTER_TTL);
        ip.set_protocol(IpProtocol::Udp);
        ip.set_src_addr(node.node_ip);
        ip.set_dst_addr(remote_ip);
        let ip_sum_base = checksum::sum(&b[OFF_IP..OFF_UDP]);
        // Source port and length per packet; checksum zero unless computed.
        UdpPacket::new_unchecked(&mut b[OFF_UDP..OFF_VXLAN]).set_dst_port(node.vxlan_port);
        VxlanRepr { vni: node.vni }.emit(&mut VxlanPacket::new_unchecked(&mut b[OFF_VXLAN..]));
        OuterTemplate { bytes: b, ip_sum_base }
    }
}

/// The outer UDP source port for a flow hash, as Linux `udp_flow_src_port` computes it.
#[inline]
pub fn flow_src_port(hash: u32) -> u16 {
    let h = hash ^ (hash << 16);
    ((u64::from(h) * u64::from(SRC_PORT_MAX_EXCL - SRC_PORT_MIN)) >> 32) as u16 + SRC_PORT_MIN as u16
}

/// Encapsulates the frame in place. On entry the frame is an untagged inner Ethernet frame
/// whose IPv4 packet fills it exactly; on success it starts with the outer Ethernet header.
#[inline]
pub fn encap(
    frame: &mut FrameBuf<'_>,
    node: &NodeConfig,
    remote: &RemoteNode,
    ident: u16,
    flow_hash: u32,
) -> Result<(), DropReason> {
    let inner_len = frame.len();
    if inner_len.saturating_sub(ethernet::HEADER_LEN) > node.max_inner_ip_len() {
        // The pipeline segments or fragments oversized packets before they get here.
        return Err(DropReason::MtuExceeded);
    }
    if remote.next_hop_mac == MacAddr::ZERO {
        return Err(DropReason::UnderlayNoNextHop);
    }
    if let Ok(mut inner) = EthernetFrame::new_fixed_mut(frame.data_mut()) {
        inner.set_dst_addr(remote.vtep_mac);
        inner.set_src_addr(node.vtep_mac);
    }
    if !frame.push_front(ENCAP_OVERHEAD) {
        return Err(DropReason::NoHeadroom);
    }
    let t = &remote.template;
    let Some(d) = frame.data_mut().first_chunk_mut::<ENCAP_OVERHEAD>() else {
        return Err(DropReason::NoHeadroom);
    };
    *d = t.bytes;
    // Lengths fit u16: inner_len is bounded by the underlay MTU checked above.
    let ip_total = (ENCAP_OVERHEAD - OFF_IP + inner_len) as u16;
    let udp_len = (ENCAP_OVERHEAD - OFF_UDP + inner_len) as u16;
    let mut ip = Ipv4Packet::new_unchecked(&mut d[OFF_IP..OFF_UDP]);
    ip.set_total_len(ip_total);
    ip.set_ident(ident);
    ip.set_header_checksum(!checksum::add(checksum::add(t.ip_sum_base, ip_total), ident));
    let mut udp = UdpPacket::new_unchecked(&mut d[OFF_UDP..OFF_VXLAN]);
    udp.set_src_port(flow_src_port(flow_hash));
    udp.set_len(udp_len);
    if node.outer_udp_checksum {
        outer_checksum(frame.data_mut(), node.node_ip, remote.node_ip);
    }
    Ok(())
}

/// Fills the outer UDP checksum of an encapsulated frame (over the whole datagram: the inner
/// checksums are complete by now, so the sum is exact).
#[cold]
fn outer_checksum(d: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) {
    if let Some(udp) = d.get_mut(OFF_UDP..) {
        UdpPacket::new_unchecked(udp).fill_checksum(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_port_stays_in_the_ephemeral_range() {
        for h in [0u32, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX, 0x8000_0000] {
            let p = u32::from(flow_src_port(h));
            assert!((SRC_PORT_MIN..SRC_PORT_MAX_EXCL).contains(&p), "{h:#x} -> {p}");
        }
        // Like the kernel's formula, the port is taken from the high bits of the hash.
        assert_ne!(flow_src_port(0x1000_0000), flow_src_port(0x2000_0000));
        assert_eq!(flow_src_port(0), 32768);
        assert_eq!(flow_src_port(u32::MAX ^ 0xffff), 60999);
    }
}
