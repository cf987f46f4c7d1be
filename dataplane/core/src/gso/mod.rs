//! Software segmentation and fragmentation: what the kernel's GSO does when a packet is larger
//! than its way out allows, done here because aggregated frames (GRO/LRO on the uplink, a jumbo
//! pod) reach vxnat and must leave through a smaller MTU (incident 5: dropped instead).
//!
//! - TCP: cut into segments of at most `mss` payload bytes (the smaller of what the MTU allows
//!   and the MSS the flow announced), each with the original IPv4 and TCP options copied
//!   (timestamps included), the sequence number advanced, IP IDs counting up from the
//!   original's, FIN and PSH only on the last segment, CWR only on the first, and both
//!   checksums computed from scratch (so a CHECKSUM_PARTIAL input comes out right too).
//! - Other IPv4 with DF clear: fragmented (RFC 791): 8-byte aligned fragment payloads, MF on all
//!   but the last (the original's MF kept on the last when the input was itself a fragment),
//!   options whose copy bit is set repeated in later fragments, header checksums recomputed.
//! - DF set: the caller answers with ICMP fragmentation needed (see `pipeline`).
//!
//! Output goes to a [`Sink`] that hands out a buffer per packet, so nothing is allocated here.

use crate::wire::ipv4;
use crate::wire::{IpProtocol, Ipv4Packet, TcpFlags, TcpPacket};

/// Where packets are written: asked for a buffer of exactly `len` bytes per packet, in order.
/// `None` means no room (e.g. no free UMEM frame): segmentation stops and reports it.
pub trait Sink {
    fn next(&mut self, len: usize) -> Option<&mut [u8]>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoError {
    /// The input is not a well-formed IPv4 packet of the expected kind.
    Malformed,
    /// The MTU cannot carry the headers plus one byte (or 8 bytes for a fragment).
    MtuTooSmall,
    /// The sink ran out of buffers after `usize` packets.
    NoRoom(usize),
}

/// The input as an IPv4 packet: version 4, header and total length consistent with `p`.
fn parse_ip(p: &[u8]) -> Result<Ipv4Packet<&[u8]>, GsoError> {
    match Ipv4Packet::new_checked(p) {
        Ok(ip) if ip.version() == 4 => Ok(ip),
        _ => Err(GsoError::Malformed),
    }
}

/// Completes a copied IPv4 header for one output packet: total length, ident, checksum.
fn finish_ip_header(h: &mut [u8], total: usize, ident: u16) {
    let mut ip = Ipv4Packet::new_unchecked(h);
    ip.set_total_len(total as u16);
    ip.set_ident(ident);
    ip.fill_checksum();
}

/// The TCP payload bytes per segment for a packet with these headers through `mtu`, capped by
/// the flow's announced `mss` when known.
pub fn tcp_segment_payload(ip_hl: usize, tcp_hl: usize, mtu: usize, mss: Option<u16>) -> usize {
    let by_mtu = mtu.saturating_sub(ip_hl + tcp_hl);
    // An announced MSS counts a header without options; options eat into it (RFC 6691).
    let by_mss = mss.map_or(usize::MAX, |m| usize::from(m).saturating_sub(tcp_hl - 20));
    by_mtu.min(by_mss)
}

/// Segments the IPv4/TCP packet `p` (IPv4 header onward; bytes past its total length are
/// ignored). Returns the number of segments written. A packet that already fits is written
/// as one segment (with its checksums recomputed).
pub fn segment_tcp(p: &[u8], mtu: usize, mss: Option<u16>, sink: &mut impl Sink) -> Result<usize, GsoError> {
    let ip = parse_ip(p)?;
    if ip.protocol() != IpProtocol::Tcp {
        return Err(GsoError::Malformed);
    }
    let (hl, src, dst, ident0) = (ip.header_len(), ip.src_addr(), ip.dst_addr(), ip.ident());
    let tcp = ip.into_payload();
    let th = TcpPacket::new_checked(tcp).map_err(|_| GsoError::Malformed)?;
    let thl = th.header_len();
    let payload = th.payload();
    let seg = tcp_segment_payload(hl, thl, mtu, mss);
    if seg == 0 {
        return Err(GsoError::MtuTooSmall);
    }
    let (seq0, flags0) = (th.seq_number(), th.flags());
    let n = payload.len().div_ceil(seg).max(1);
    for i in 0..n {
        let chunk = &payload[(i * seg).min(payload.len())..((i + 1) * seg).min(payload.len())];
        let total = hl + thl + chunk.len();
        let out = sink.next(total).ok_or(GsoError::NoRoom(i))?;
        out[..hl].copy_from_slice(&p[..hl]);
        finish_ip_header(&mut out[..hl], total, ident0.wrapping_add(i as u16));
        let t = &mut out[hl..];
        t[..thl].copy_from_slice(&tcp[..thl]);
        t[thl..thl + chunk.len()].copy_from_slice(chunk);
        let mut seg_tcp = TcpPacket::new_unchecked(&mut t[..thl + chunk.len()]);
        seg_tcp.set_seq_number(seq0.wrapping_add((i * seg) as u32));
        let mut flags = flags0;
        if i + 1 < n {
            flags = flags.without(TcpFlags::FIN | TcpFlags::PSH);
        }
        if i > 0 {
            flags = flags.without(TcpFlags::CWR);
        }
        seg_tcp.set_flags(flags);
        seg_tcp.fill_checksum(src, dst);
    }
    Ok(n)
}

/// Fragments the IPv4 packet `p` (DF must be clear; the caller checks) so that every fragment's
/// total length is at most `mtu`. Returns the number of fragments written.
pub fn fragment(p: &[u8], mtu: usize, sink: &mut impl Sink) -> Result<usize, GsoError> {
    let ip = parse_ip(p)?;
    let (dont_frag, orig_mf, orig_off) = (ip.dont_frag(), ip.more_frags(), usize::from(ip.frag_offset()));
    let (first_hl, ident) = (ip.header_len(), ip.ident());
    let mut later_opts = [0u8; ipv4::MAX_HEADER_LEN - ipv4::HEADER_LEN];
    let later_opts_len = ip.copied_options(&mut later_opts);
    let data = ip.into_payload();
    let mut pos = 0;
    let mut count = 0;
    while pos < data.len() || count == 0 {
        let hl = if count == 0 { first_hl } else { ipv4::HEADER_LEN + later_opts_len };
        let room = mtu.saturating_sub(hl) & !7;
        if room == 0 {
            return Err(GsoError::MtuTooSmall);
        }
        let take = room.min(data.len() - pos);
        let last = pos + take == data.len();
        let total = hl + take;
        let out = sink.next(total).ok_or(GsoError::NoRoom(count))?;
        out[..ipv4::HEADER_LEN].copy_from_slice(&p[..ipv4::HEADER_LEN]);
        if count == 0 {
            out[ipv4::HEADER_LEN..hl].copy_from_slice(&p[ipv4::HEADER_LEN..first_hl]);
        } else {
            out[ipv4::HEADER_LEN..hl].copy_from_slice(&later_opts[..later_opts_len]);
        }
        let mut h = Ipv4Packet::new_unchecked(&mut out[..hl]);
        h.set_version_ihl(hl);
        // The offset in bytes; MF on all but the last, and on the last too when the input was
        // itself a fragment that was not the last.
        h.set_frag(dont_frag, !last || orig_mf, (orig_off + pos) as u16);
        out[hl..total].copy_from_slice(&data[pos..pos + take]);
        finish_ip_header(&mut out[..hl], total, ident);
        pos += take;
        count += 1;
    }
    Ok(count)
}

/// A sink writing packets back to back into one buffer, for tests and benchmarks.
#[derive(Debug)]
pub struct VecSink {
    pub buf: Vec<u8>,
    pub packets: Vec<(usize, usize)>,
    /// Refuse packets beyond this many (to test exhaustion).
    pub limit: usize,
}

impl VecSink {
    pub fn new(capacity: usize) -> VecSink {
        VecSink { buf: Vec::with_capacity(capacity), packets: Vec::new(), limit: usize::MAX }
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.packets.clear();
    }
    pub fn packet(&self, i: usize) -> &[u8] {
        let (s, l) = self.packets[i];
        &self.buf[s..s + l]
    }
}

impl Sink for VecSink {
    fn next(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.packets.len() >= self.limit {
            return None;
        }
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        self.packets.push((start, len));
        Some(&mut self.buf[start..])
    }
}
