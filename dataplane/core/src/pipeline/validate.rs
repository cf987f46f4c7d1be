//! Validate: the checks every IPv4 packet gets before anything acts on it, on every ingress (a
//! pod's, the host's, a client's outside the cluster, the tunnel's inner packets alike), and
//! the ingress port's L4 checksum policy.
//!
//! Contract: [`validate_ipv4`] reads the packet after the 14-byte Ethernet header through
//! `wire`'s fixed-size views only, maps each failure to one [`DropReason`] (the order of the
//! checks decides which reason a packet broken in several ways gets: it follows the README's
//! list), trims Ethernet padding, and returns the [`Ipv4Meta`] later stages work from.
//! [`l4_checksum`] then completes CHECKSUM_PARTIAL checksums and, under `verify`, drops bad
//! ones. Nothing here routes or rewrites anything else.

use super::ctx::Ipv4Meta;
use super::{DropReason, FrameBuf};
use crate::tables::ChecksumPolicy;
use crate::wire::{checksum, ethernet, icmp, ipv4, tcp, udp};
use crate::wire::{IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};

/// The checks every IPv4 header gets, on the pod side and on the uplink alike: present,
/// version 4, sane header and total lengths, wholly inside `ip`, correct header checksum.
/// Returns the fixed header's view, the header length and the total length.
///
/// One length check (the fixed view) covers every field read; only headers with options take
/// the general checksum loop.
#[inline(always)]
pub(crate) fn check_ipv4_header(ip: &[u8]) -> Result<(Ipv4Packet<&[u8; ipv4::HEADER_LEN]>, usize, usize), DropReason> {
    let Ok(h) = Ipv4Packet::new_fixed(ip) else {
        return Err(DropReason::Ipv4Truncated);
    };
    let header_len = h.header_len();
    let total_len = usize::from(h.total_len());
    if h.version() != 4 {
        return Err(DropReason::Ipv4BadVersion);
    }
    if header_len < ipv4::HEADER_LEN || total_len < header_len {
        return Err(DropReason::Ipv4BadLength);
    }
    if total_len > ip.len() {
        return Err(DropReason::Ipv4Truncated);
    }
    let sum_ok = if header_len == ipv4::HEADER_LEN {
        h.verify_fixed_checksum()
    } else {
        Ipv4Packet::new_unchecked(ip).verify_checksum()
    };
    if !sum_ok {
        return Err(DropReason::Ipv4BadChecksum);
    }
    Ok((h, header_len, total_len))
}

#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    (u32::from(sport) << 16) | u32::from(dport)
}

/// Validates the IPv4 packet after the Ethernet header and trims Ethernet padding after it.
#[inline(always)]
pub(crate) fn validate_ipv4(frame: &mut FrameBuf<'_>) -> Result<Ipv4Meta, DropReason> {
    let m = {
        let ip = frame.data().get(ethernet::HEADER_LEN..).unwrap_or_default();
        let (h, header_len, total_len) = check_ipv4_header(ip)?;
        if h.reserved_flag() {
            return Err(DropReason::Ipv4ReservedFlag);
        }
        let (src, dst) = (h.src_addr(), h.dst_addr());
        let first = src.octets()[0];
        if first == 0 || first == 127 || first >= 224 {
            return Err(DropReason::Ipv4MartianSource);
        }
        if dst.octets()[0] >= 224 {
            return Err(DropReason::Ipv4DstMulticast);
        }
        let payload = &ip[header_len..total_len];
        let frag_offset = h.frag_offset();
        if usize::from(frag_offset) + payload.len() > 65535 {
            return Err(DropReason::Ipv4FragmentOverflow);
        }
        let is_fragment = h.is_fragment();
        let proto = h.protocol();
        let mut ports = 0u32;
        let mut icmp_error = false;
        if frag_offset == 0 {
            let short = if is_fragment { DropReason::Ipv4TinyFragment } else { DropReason::L4Truncated };
            match proto {
                IpProtocol::Tcp => {
                    let Ok(t) = TcpPacket::new_fixed(payload) else { return Err(short) };
                    let doff = t.header_len();
                    if !is_fragment && (doff < tcp::HEADER_LEN || doff > payload.len()) {
                        return Err(DropReason::L4Truncated);
                    }
                    ports = ports_word(t.src_port(), t.dst_port());
                }
                IpProtocol::Udp => {
                    let Ok(u) = UdpPacket::new_fixed(payload) else { return Err(short) };
                    let ulen = usize::from(u.len());
                    if !is_fragment && (ulen < udp::HEADER_LEN || ulen > payload.len()) {
                        return Err(DropReason::L4Truncated);
                    }
                    ports = ports_word(u.src_port(), u.dst_port());
                }
                IpProtocol::Icmp => icmp_error = icmp::starts_error_message(payload),
                IpProtocol::Unknown(_) => {}
            }
        }
        Ipv4Meta {
            src,
            dst,
            proto: proto.into(),
            header_len,
            total_len,
            ttl: h.ttl(),
            frag_offset,
            is_fragment,
            ports,
            icmp_error,
        }
    };
    frame.truncate(ethernet::HEADER_LEN + m.total_len);
    Ok(m)
}

/// What [`validate_ipv4`] established, read again from a packet that passed it (`ip` starts at
/// its header): for stages handed the frame without its facts. The ports are not read (the
/// callers build answers from these facts, never a flow key).
pub(crate) fn meta_of_valid(ip: &[u8]) -> Option<Ipv4Meta> {
    let h = Ipv4Packet::new_fixed(ip).ok()?;
    let proto = h.protocol();
    Some(Ipv4Meta {
        src: h.src_addr(),
        dst: h.dst_addr(),
        proto: proto.into(),
        header_len: h.header_len(),
        total_len: usize::from(h.total_len()),
        ttl: h.ttl(),
        frag_offset: h.frag_offset(),
        is_fragment: h.is_fragment(),
        ports: 0,
        icmp_error: proto == IpProtocol::Icmp && icmp::starts_error_message(Ipv4Packet::new_unchecked(ip).payload()),
    })
}

/// Applies the ingress port's checksum policy to a validated packet. Returns the completed
/// field's old and new values when a CHECKSUM_PARTIAL checksum was completed.
#[inline(always)]
pub(crate) fn l4_checksum(
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

/// The validated packet's TCP/UDP segment (up to the IPv4 total length).
#[inline(always)]
fn l4_range(m: &Ipv4Meta) -> core::ops::Range<usize> {
    ethernet::HEADER_LEN + m.header_len..ethernet::HEADER_LEN + m.total_len
}

/// Whether a TCP/UDP checksum verifies (fragments, other protocols and UDP without a checksum
/// pass: there is nothing to verify here).
#[cold]
fn verify_l4_checksum(frame: &FrameBuf<'_>, m: &Ipv4Meta) -> bool {
    if m.is_fragment || !m.has_ports() {
        return true;
    }
    let Some(l4) = frame.data().get(l4_range(m)) else { return false };
    match m.protocol() {
        // Validated: 8 <= UDP length <= IP payload; the checksum covers the UDP length.
        IpProtocol::Udp => UdpPacket::new_checked(l4).is_ok_and(|u| u.verify_checksum(m.src, m.dst)),
        _ => TcpPacket::new_unchecked(l4).verify_checksum(m.src, m.dst),
    }
}

/// The checksum field of a validated TCP/UDP header.
fn l4_checksum_field(l4: &[u8], proto: IpProtocol) -> u16 {
    match proto {
        IpProtocol::Tcp => TcpPacket::new_fixed(l4).map_or(0, |t| t.checksum()),
        _ => UdpPacket::new_fixed(l4).map_or(0, |u| u.checksum()),
    }
}

/// Completes a TCP/UDP checksum left as CHECKSUM_PARTIAL (pseudo-header sum only) by the
/// sender's stack, which AF_XDP on a veth hands over as is. A full checksum — right or
/// wrong — is left alone here (whether to verify it is the port's checksum policy, checked
/// separately). Returns the field's old and new values when it completed one.
#[inline(always)]
fn complete_partial_checksum(frame: &mut FrameBuf<'_>, m: &Ipv4Meta) -> Option<(u16, u16)> {
    if m.is_fragment {
        return None;
    }
    let l4 = frame.data_mut().get_mut(l4_range(m))?;
    let (l4, field, stored) = match m.protocol() {
        IpProtocol::Tcp => {
            let stored = TcpPacket::new_fixed(l4).ok()?.checksum();
            (l4, tcp::CHECKSUM_OFFSET, stored)
        }
        IpProtocol::Udp => {
            // Validated: 8 <= UDP length <= IP payload.
            let (ulen, stored) = UdpPacket::new_fixed(l4).map(|u| (usize::from(u.len()), u.checksum())).ok()?;
            if stored == 0 {
                return None;
            }
            (l4.get_mut(..ulen)?, udp::CHECKSUM_OFFSET, stored)
        }
        _ => return None,
    };
    let pseudo = checksum::pseudo_header_sum(m.src, m.dst, m.proto, l4.len() as u16);
    // Cheap test first: only a field holding exactly the pseudo-header sum can be partial
    // (0x0000 and 0xffff are the same number in one's complement).
    if stored != pseudo && stored.wrapping_add(1) | pseudo.wrapping_add(1) > 1 {
        return None;
    }
    let udp = m.protocol() == IpProtocol::Udp;
    match checksum::complete_if_partial(m.src, m.dst, m.proto, l4, field, udp) {
        checksum::L4ChecksumState::Partial => Some((stored, l4_checksum_field(l4, m.protocol()))),
        _ => None,
    }
}
