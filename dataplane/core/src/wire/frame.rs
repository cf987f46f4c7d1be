//! Whole frames, for the tools that look at any frame the node saw: the filter, trace and
//! capture, and the control plane's packet summaries. The pipeline validates with its own
//! checks and drop reasons; these walkers instead accept what they cannot vouch for and stop
//! where a frame stops making sense, reading everything through the views' panic-free
//! accessors.

use super::{ethernet, ipv4, udp, vxlan};
use super::{Error, EtherType, EthernetFrame, IpProtocol, Ipv4Packet, Result, VxlanPacket};

/// The UDP ports the tools recognise as VXLAN: flannel's (Linux's default) and IANA's.
pub const VXLAN_PORTS: [u16; 2] = [vxlan::FLANNEL_PORT, vxlan::IANA_PORT];

/// The IPv4 packet of an untagged Ethernet frame. `Unsupported` when the frame is not IPv4,
/// `Truncated` when it is shorter than its headers, `Malformed` for a version other than 4 or
/// an IHL below 5. Nothing past the fixed header is checked.
pub fn ipv4(frame: &[u8]) -> Result<Ipv4Packet<&[u8]>> {
    let eth = EthernetFrame::new_fixed(frame)?;
    if eth.ethertype_or_tpid() != EtherType::Ipv4 {
        return Err(Error::Unsupported);
    }
    let ip = EthernetFrame::new_unchecked(frame).into_payload();
    let h = Ipv4Packet::new_fixed(ip)?;
    if h.version() != 4 || h.header_len() < ipv4::HEADER_LEN {
        return Err(Error::Malformed);
    }
    Ok(Ipv4Packet::new_unchecked(ip))
}

/// The VXLAN header and the inner frame (possibly short or empty) of a VXLAN packet: UDP to
/// one of [`VXLAN_PORTS`], not a later fragment, with the UDP and VXLAN headers present. The
/// inner frame is what the buffer holds after them, whatever the outer lengths claim: a frame
/// with a broken length field is exactly what one traces.
pub fn vxlan<'a>(ip: &Ipv4Packet<&'a [u8]>) -> Option<(VxlanPacket<&'a [u8; vxlan::HEADER_LEN]>, &'a [u8])> {
    if ip.protocol() != IpProtocol::Udp || !VXLAN_PORTS.contains(&ip.ports()?.1) {
        return None;
    }
    let vx = l4_bytes(ip).get(udp::HEADER_LEN..)?;
    let header = VxlanPacket::new_fixed(vx).ok()?;
    Some((header, vx.get(vxlan::HEADER_LEN..).unwrap_or_default()))
}

/// What the buffer holds after the IPv4 header, whatever the total length claims (the bytes
/// a tool shows for a packet, broken or not).
pub fn l4_bytes<'a>(ip: &Ipv4Packet<&'a [u8]>) -> &'a [u8] {
    ip.clone().into_inner().get(ip.header_len()..).unwrap_or_default()
}

/// The inner Ethernet frame of a VXLAN frame, when it holds at least an Ethernet header.
pub fn vxlan_inner(frame: &[u8]) -> Option<&[u8]> {
    let (_, inner) = vxlan(&ipv4(frame).ok()?)?;
    (inner.len() >= ethernet::HEADER_LEN).then_some(inner)
}

/// The innermost IPv4 packet of a frame: for VXLAN carrying IPv4, the inner packet; otherwise
/// the frame's own.
pub fn innermost_ipv4(frame: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let outer = ipv4(frame).ok()?;
    match vxlan_inner(frame).and_then(|inner| ipv4(inner).ok()) {
        Some(inner) => Some(inner),
        None => Some(outer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{ipv4 as ip_packet, vxlan_frame, Vxlan, L4};

    #[test]
    fn walks_into_vxlan_and_stops_at_broken_frames() {
        let inner = ip_packet(
            [10, 244, 1, 5].into(),
            [10, 244, 0, 2].into(),
            &L4::Udp { sport: 53, dport: 5000, payload: b"x" },
        );
        let frame = vxlan_frame(&Vxlan::b_to_a(), &inner);
        let outer = ipv4(&frame).expect("outer IPv4");
        assert_eq!(outer.ports().map(|p| p.1), Some(vxlan::FLANNEL_PORT));
        let (vx, _) = vxlan(&outer).expect("VXLAN");
        assert_eq!(vx.vni(), 1);
        assert_eq!(innermost_ipv4(&frame).expect("inner").dst_addr(), core::net::Ipv4Addr::new(10, 244, 0, 2));
        // Cut anywhere: no panic, and never a view of a header that is not there.
        for n in 0..frame.len() {
            let cut = &frame[..n];
            if let Ok(ip) = ipv4(cut) {
                let _ = (ip.ports(), ip.payload(), vxlan(&ip), innermost_ipv4(cut));
            }
        }
        assert_eq!(ipv4(&frame[..14 + 19]).unwrap_err(), Error::Truncated);
        let mut v6 = frame.clone();
        v6[14] = 0x65;
        assert_eq!(ipv4(&v6).unwrap_err(), Error::Malformed);
    }
}
