//! Software GRO toward pods: the in-order TCP segments of a flow that leave by one port in one
//! flush are handed over as one aggregated frame (a head frame whose headers describe them all,
//! plus the other segments' payloads), with the [`VirtioNetHdr`] that tells the kernel how to
//! treat it (`gso_type` TCPv4, `gso_size` the MSS, the checksum to be finished). A pod's TCP
//! stack then handles one 64 KiB frame where it would have handled 45 segments.
//!
//! Merge rules (those of Linux's `tcp_gro_receive`/`inet_gro_receive`, stricter where that is
//! simpler): a segment joins the open group of its flow (addresses and ports) when
//! - it is IPv4 without options or fragmentation, TCP with ACK or ACK|PSH only and a payload;
//! - its Ethernet header, IPv4 TOS/TTL/DF and TCP ACK number, window, header length and options
//!   (timestamps included) are byte-for-byte the group head's;
//! - its sequence number is the next one the group expects, and its payload is no longer than
//!   the head's (the MSS, `gso_size`);
//! - the group stays within 64 segments and an IPv4 total length of 65,535.
//!
//! A shorter segment or one with PSH joins and ends its group; anything else of the flow (a
//! FIN, an out-of-order segment, a changed ACK) ends the group and goes on its own or starts
//! the next. Groups come out in the order they started, so a flow's segments keep their order
//! (groups of different flows may pass each other, which TCP cannot tell). Up to
//! [`MAX_OPEN`] flows are merged at once; a further flow closes the oldest open group.
//!
//! Checksums: the members' checksums are not re-verified here. Frames reach a port's transmit
//! side after the pipeline validated them under the ingress port's checksum policy; the merged
//! frame carries `NEEDS_CSUM` and the kernel computes each segment's checksum (or, handing the
//! frame to a local socket, trusts it as the veth path trusts a pod's own TSO frames).
//!
//! Sans-IO: [`Coalescer::plan`] reads frames through a closure and records the groups in
//! buffers reused from flush to flush (no allocation once warm); [`Coalescer::finish`] rewrites
//! a group's head (IPv4 total length and checksum, PSH, the TCP checksum field to the
//! pseudo-header sum) and returns its virtio-net header; [`Coalescer::members`] lists the
//! frames whose payloads follow the head's. Nothing here panics, whatever the bytes.

use crate::wire::checksum;
use crate::wire::ethernet::{self, EtherType, EthernetFrame};
use crate::wire::virtio_net::{self, VirtioNetHdr};
use crate::wire::{IpProtocol, Ipv4Packet, TcpFlags, TcpPacket};

/// Flows merged at once (VPP's GRO keeps 16 per port; a pod's flush rarely holds more than a
/// few bulk flows).
pub const MAX_OPEN: usize = 8;
/// Segments per group (the kernel's GSO takes up to 64 KiB; 64 segments of a small MSS would
/// otherwise make a long chain of tiny pieces).
pub const MAX_SEGMENTS: u32 = 64;
/// The IPv4 total length a group may reach.
const MAX_IP_LEN: usize = 65_535;

const NONE: u32 = u32::MAX;

/// What a frame is, as far as merging goes.
#[derive(Debug, Clone, Copy, Default)]
struct Seg {
    /// Mergeable: IPv4/TCP with ACK or ACK|PSH and a payload, no IP options or fragments.
    ok: bool,
    psh: bool,
    /// Addresses and ports.
    flow: [u8; 12],
    seq: u32,
    /// Ethernet + IPv4 + TCP header bytes.
    hdr_len: u16,
    ip_hdr_len: u8,
    payload: u16,
}

/// One aggregated frame: a head and the members that follow it.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    /// Index of the head frame.
    pub head: u32,
    tail: u32,
    /// Frames in the group (1: the frame goes as it is).
    pub count: u32,
    /// Payload bytes of all members.
    payload: u32,
    psh: bool,
}

/// The groups of one flush, in the order they started.
#[derive(Debug, Default)]
pub struct Coalescer {
    segs: Vec<Seg>,
    next: Vec<u32>,
    groups: Vec<Group>,
    /// (flow, group index) of the groups still open, oldest first.
    open: Vec<([u8; 12], u32)>,
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Groups frames `0..n`; `frame(i)` is frame i's bytes (Ethernet on), or `None` for one
    /// that cannot be read whole (it then goes on its own).
    pub fn plan<'a>(&mut self, n: usize, frame: impl Fn(usize) -> Option<&'a [u8]>) -> &[Group] {
        self.segs.clear();
        self.next.clear();
        self.groups.clear();
        self.open.clear();
        for i in 0..n {
            let bytes = frame(i);
            let seg = bytes.map(parse).unwrap_or_default();
            self.segs.push(seg);
            self.next.push(NONE);
            let i = i as u32;
            // (A frame that is not TCP has no flow to continue.)
            let open = if seg.hdr_len == 0 { None } else { self.open.iter().position(|(f, _)| *f == seg.flow) };
            if let Some(at) = open {
                let g = self.open[at].1;
                if seg.ok
                    && self.fits(g, &seg)
                    && same_headers(frame(self.groups[g as usize].head as usize), bytes, &seg)
                {
                    let grp = &mut self.groups[g as usize];
                    self.next[grp.tail as usize] = i;
                    grp.tail = i;
                    grp.count += 1;
                    grp.payload += u32::from(seg.payload);
                    grp.psh = seg.psh;
                    let head_payload = self.segs[grp.head as usize].payload;
                    if seg.psh || seg.payload < head_payload || grp.count >= MAX_SEGMENTS {
                        self.open.remove(at);
                    }
                    continue;
                }
                // Anything else of this flow ends its group: order within the flow is kept.
                self.open.remove(at);
            }
            let g = self.groups.len() as u32;
            self.groups.push(Group { head: i, tail: i, count: 1, payload: u32::from(seg.payload), psh: seg.psh });
            if seg.ok && !seg.psh {
                if self.open.len() == MAX_OPEN {
                    self.open.remove(0);
                }
                self.open.push((seg.flow, g));
            }
        }
        &self.groups
    }

    /// Whether `seg` continues group `g`: the next sequence number, no longer than the head's
    /// payload, within the size limits.
    fn fits(&self, g: u32, seg: &Seg) -> bool {
        let Some(grp) = self.groups.get(g as usize) else { return false };
        let head = self.segs[grp.head as usize];
        let next_seq = head.seq.wrapping_add(grp.payload);
        let ip_len = usize::from(head.hdr_len) - ethernet::HEADER_LEN + grp.payload as usize + usize::from(seg.payload);
        seg.seq == next_seq && seg.payload <= head.payload && grp.count < MAX_SEGMENTS && ip_len <= MAX_IP_LEN
    }

    /// The groups of the last [`Coalescer::plan`].
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The frames after the head in group `g`, in order, each with the offset its payload
    /// starts at (the bytes to send after the head's).
    pub fn members(&self, g: &Group) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut at = self.next.get(g.head as usize).copied().unwrap_or(NONE);
        core::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let i = at as usize;
            at = self.next.get(i).copied().unwrap_or(NONE);
            Some((i, usize::from(self.segs.get(i)?.hdr_len)))
        })
    }

    /// Rewrites group `g`'s head frame (`head`, its bytes) to describe the whole group and
    /// returns the virtio-net header to send with it. A group of one is left as it is (no
    /// offload asked for).
    pub fn finish(&self, g: &Group, head: &mut [u8]) -> VirtioNetHdr {
        let Some(seg) = self.segs.get(g.head as usize).copied() else { return VirtioNetHdr::default() };
        if g.count < 2 || !seg.ok {
            return VirtioNetHdr::default();
        }
        let ip_at = ethernet::HEADER_LEN;
        let ip_hl = usize::from(seg.ip_hdr_len);
        let tcp_hl = usize::from(seg.hdr_len) - ip_at - ip_hl;
        let ip_len = ip_hl + tcp_hl + g.payload as usize;
        let Some(ip) = head.get_mut(ip_at..) else { return VirtioNetHdr::default() };
        let (iph, l4) = ip.split_at_mut(ip_hl.min(ip.len()));
        let Ok(mut h) = Ipv4Packet::new_fixed_mut(iph) else { return VirtioNetHdr::default() };
        h.set_total_len(ip_len as u16);
        h.fill_checksum();
        let (src, dst) = (h.src_addr(), h.dst_addr());
        let Ok(mut t) = TcpPacket::new_fixed_mut(l4) else { return VirtioNetHdr::default() };
        if g.psh {
            t.set_flags(t.flags() | TcpFlags::PSH);
        }
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum; the kernel adds the rest.
        t.set_checksum(checksum::pseudo_header_sum(src, dst, 6, (tcp_hl + g.payload as usize) as u16));
        VirtioNetHdr {
            flags: virtio_net::F_NEEDS_CSUM,
            gso_type: virtio_net::GSO_TCPV4,
            hdr_len: seg.hdr_len,
            gso_size: seg.payload,
            csum_start: (ip_at + ip_hl) as u16,
            csum_offset: crate::wire::tcp::CHECKSUM_OFFSET as u16,
        }
    }
}

/// What `frame` is for merging.
fn parse(frame: &[u8]) -> Seg {
    let mut s = Seg::default();
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return s };
    if eth.ethertype() != EtherType::Ipv4 || eth.header_len() != ethernet::HEADER_LEN {
        return s;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return s };
    if ip.protocol() != IpProtocol::Tcp || ip.version() != 4 {
        return s;
    }
    let Ok(t) = TcpPacket::new_checked(ip.payload()) else { return s };
    s.flow[..4].copy_from_slice(&ip.src_addr().octets());
    s.flow[4..8].copy_from_slice(&ip.dst_addr().octets());
    s.flow[8..10].copy_from_slice(&t.src_port().to_be_bytes());
    s.flow[10..12].copy_from_slice(&t.dst_port().to_be_bytes());
    s.seq = t.seq_number();
    s.ip_hdr_len = ip.header_len() as u8;
    s.hdr_len = (ethernet::HEADER_LEN + ip.header_len() + t.header_len()) as u16;
    s.payload = t.payload().len() as u16;
    let flags = t.flags();
    s.psh = flags.contains(TcpFlags::PSH);
    let plain = flags == TcpFlags::ACK || flags == TcpFlags::ACK | TcpFlags::PSH;
    // Frames with padding after the IP packet (a short frame) are not merged: their tail is
    // not payload.
    let exact = ethernet::HEADER_LEN + usize::from(ip.total_len()) == frame.len();
    s.ok = plain && s.payload > 0 && ip.header_len() == 20 && !ip.is_fragment() && exact;
    s
}

/// Whether the member's headers match the head's where the merged frame speaks for both:
/// Ethernet, IPv4 TOS/flags/TTL/protocol/addresses, TCP ports/ACK/offset/window/options.
fn same_headers(head: Option<&[u8]>, member: Option<&[u8]>, seg: &Seg) -> bool {
    let (Some(h), Some(m)) = (head, member) else { return false };
    let hl = usize::from(seg.hdr_len);
    let (Some(h), Some(m)) = (h.get(..hl), m.get(..hl)) else { return false };
    let ip = ethernet::HEADER_LEN;
    let tcp = ip + usize::from(seg.ip_hdr_len);
    // Ethernet; IPv4 version/IHL/TOS; flags (not the fragment offset, 0 in both); TTL and
    // protocol; addresses. Skipped: total length, ID, header checksum.
    h[..ip + 2] == m[..ip + 2]
        && h[ip + 6] == m[ip + 6]
        && h[ip + 8..ip + 10] == m[ip + 8..ip + 10]
        && h[ip + 12..tcp] == m[ip + 12..tcp]
        // TCP: ports; ACK number, data offset, flags but PSH, window; options. Skipped:
        // sequence number, checksum, urgent pointer (URG is not mergeable).
        && h[tcp..tcp + 4] == m[tcp..tcp + 4]
        && h[tcp + 8..tcp + 13] == m[tcp + 8..tcp + 13]
        && (h[tcp + 13] | 0x08) == (m[tcp + 13] | 0x08)
        && h[tcp + 14..tcp + 16] == m[tcp + 14..tcp + 16]
        && h[tcp + 20..] == m[tcp + 20..]
}

#[cfg(test)]
mod tests;
