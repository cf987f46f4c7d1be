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

use crate::wire::checksum;
use core::net::Ipv4Addr;

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

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

struct Ip {
    hl: usize,
    total: usize,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

fn parse_ip(p: &[u8]) -> Option<Ip> {
    let v = *p.first()?;
    let hl = usize::from(v & 0x0f) * 4;
    if v >> 4 != 4 || hl < 20 || p.len() < hl {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total < hl || total > p.len() {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    Some(Ip { hl, total, src, dst })
}

fn finish_ip_header(h: &mut [u8], total: usize, ident: u16) {
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&ident.to_be_bytes());
    h[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
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
    let ip = parse_ip(p).ok_or(GsoError::Malformed)?;
    if p[9] != 6 {
        return Err(GsoError::Malformed);
    }
    let tcp = &p[ip.hl..ip.total];
    let thl = usize::from(tcp.get(12).ok_or(GsoError::Malformed)? >> 4) * 4;
    if thl < 20 || tcp.len() < thl {
        return Err(GsoError::Malformed);
    }
    let payload = &tcp[thl..];
    let seg = tcp_segment_payload(ip.hl, thl, mtu, mss);
    if seg == 0 {
        return Err(GsoError::MtuTooSmall);
    }
    let seq0 = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ident0 = u16::from_be_bytes([p[4], p[5]]);
    let flags0 = tcp[13];
    let n = payload.len().div_ceil(seg).max(1);
    for i in 0..n {
        let chunk = &payload[(i * seg).min(payload.len())..((i + 1) * seg).min(payload.len())];
        let total = ip.hl + thl + chunk.len();
        let out = sink.next(total).ok_or(GsoError::NoRoom(i))?;
        out[..ip.hl].copy_from_slice(&p[..ip.hl]);
        finish_ip_header(&mut out[..ip.hl], total, ident0.wrapping_add(i as u16));
        let t = &mut out[ip.hl..];
        t[..thl].copy_from_slice(&tcp[..thl]);
        t[4..8].copy_from_slice(&seq0.wrapping_add((i * seg) as u32).to_be_bytes());
        let mut flags = flags0;
        if i + 1 < n {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        t[13] = flags;
        t[thl..thl + chunk.len()].copy_from_slice(chunk);
        t[16..18].copy_from_slice(&[0, 0]);
        let c = checksum::l4_checksum(ip.src, ip.dst, 6, &t[..thl + chunk.len()]);
        t[16..18].copy_from_slice(&c.to_be_bytes());
    }
    Ok(n)
}

/// The options of an IPv4 header that later fragments repeat (copy bit set), RFC 791.
fn copied_options(opts: &[u8], out: &mut [u8; 40]) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < opts.len() {
        let kind = opts[i];
        match kind {
            0 => break,
            1 => i += 1,
            _ => {
                let len = usize::from(*opts.get(i + 1).unwrap_or(&0));
                if len < 2 || i + len > opts.len() {
                    break;
                }
                if kind & 0x80 != 0 {
                    out[n..n + len].copy_from_slice(&opts[i..i + len]);
                    n += len;
                }
                i += len;
            }
        }
    }
    // Pad to a 4-byte boundary with end-of-options.
    while n % 4 != 0 {
        out[n] = 0;
        n += 1;
    }
    n
}

/// Fragments the IPv4 packet `p` (DF must be clear; the caller checks) so that every fragment's
/// total length is at most `mtu`. Returns the number of fragments written.
pub fn fragment(p: &[u8], mtu: usize, sink: &mut impl Sink) -> Result<usize, GsoError> {
    let ip = parse_ip(p).ok_or(GsoError::Malformed)?;
    let frag_field = u16::from_be_bytes([p[6], p[7]]);
    let (orig_mf, orig_off) = (frag_field & 0x2000 != 0, usize::from(frag_field & 0x1fff) * 8);
    let data = &p[ip.hl..ip.total];
    let mut later_opts = [0u8; 40];
    let later_opts_len = copied_options(&p[20..ip.hl], &mut later_opts);
    let mut pos = 0;
    let mut count = 0;
    while pos < data.len() || count == 0 {
        let hl = if count == 0 { ip.hl } else { 20 + later_opts_len };
        let room = mtu.saturating_sub(hl) & !7;
        if room == 0 {
            return Err(GsoError::MtuTooSmall);
        }
        let take = room.min(data.len() - pos);
        let last = pos + take == data.len();
        let total = hl + take;
        let out = sink.next(total).ok_or(GsoError::NoRoom(count))?;
        out[..20].copy_from_slice(&p[..20]);
        if count == 0 {
            out[20..hl].copy_from_slice(&p[20..ip.hl]);
        } else {
            out[20..hl].copy_from_slice(&later_opts[..later_opts_len]);
        }
        out[0] = 0x40 | (hl / 4) as u8;
        let off = (orig_off + pos) / 8;
        let mf = !last || orig_mf;
        let field = (frag_field & 0x4000) | if mf { 0x2000 } else { 0 } | (off as u16 & 0x1fff);
        out[6..8].copy_from_slice(&field.to_be_bytes());
        out[hl..total].copy_from_slice(&data[pos..pos + take]);
        let ident = u16::from_be_bytes([p[4], p[5]]);
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
