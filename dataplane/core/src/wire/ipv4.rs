//! IPv4 (RFC 791): header with options, fragment fields, header checksum; and CIDR prefixes.

use super::{checksum, chunk, chunk_mut, get_u16, set_u16, Error, Field, Result};
use core::fmt;
use core::net::Ipv4Addr;

mod field {
    use super::Field;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const DSCP_ECN: usize = 1;
    pub(super) const LENGTH: Field = 2..4;
    pub(super) const IDENT: Field = 4..6;
    pub(super) const FLG_OFF: Field = 6..8;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: Field = 10..12;
    pub(super) const SRC: Field = 12..16;
    pub(super) const DST: Field = 16..20;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;
/// Longest IPv4 header (IHL 15).
pub const MAX_HEADER_LEN: usize = 60;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const FLAG_RESERVED: u16 = 0x8000;
const OFFSET_MASK: u16 = 0x1fff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpProtocol {
    Icmp,
    Tcp,
    Udp,
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(v: u8) -> Self {
        match v {
            1 => IpProtocol::Icmp,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            o => IpProtocol::Unknown(o),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(v: IpProtocol) -> u8 {
        match v {
            IpProtocol::Icmp => 1,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Unknown(o) => o,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<'a> Ipv4Packet<&'a [u8; HEADER_LEN]> {
    /// A view of the fixed 20-byte header at the front of `bytes` (see the module contract:
    /// options and payload are out of view). Field reads are plain loads.
    #[inline(always)]
    pub fn new_fixed(bytes: &'a [u8]) -> Result<Self> {
        chunk(bytes).map(Self::new_unchecked)
    }

    /// Whether the 20 bytes in view carry a valid header checksum: the whole check for a
    /// header without options (IHL 5), summed without a loop. A longer header is not wholly in
    /// view: verify it on a full view.
    #[inline(always)]
    pub fn verify_fixed_checksum(&self) -> bool {
        checksum::sum_ipv4_header(self.buffer) == 0xffff
    }
}

impl<'a> Ipv4Packet<&'a mut [u8; HEADER_LEN]> {
    /// A mutable view of the fixed 20-byte header at the front of `bytes`.
    #[inline(always)]
    pub fn new_fixed_mut(bytes: &'a mut [u8]) -> Result<Self> {
        chunk_mut(bytes).map(Self::new_unchecked)
    }
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Checks IHL and total length against each other and against the buffer. Bytes past the
    /// total length (Ethernet padding) are allowed and ignored by `payload`.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// For the original datagram embedded in an ICMP error: the header must be complete, but
    /// the datagram itself is usually cut short (RFC 792 quotes header + 8 bytes), so the total
    /// length may exceed the buffer. `payload` then returns what is present.
    pub fn new_checked_truncated(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_header_len()?;
        if usize::from(p.total_len()) < p.header_len() {
            return Err(Error::BadLength);
        }
        Ok(p)
    }

    fn check_header_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let hl = self.header_len();
        if hl < HEADER_LEN {
            return Err(Error::BadLength);
        }
        if hl > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn check_len(&self) -> Result<()> {
        self.check_header_len()?;
        let total = usize::from(self.total_len());
        if total < self.header_len() {
            return Err(Error::BadLength);
        }
        if total > self.buffer.as_ref().len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }
    /// Header length in bytes (IHL * 4), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }
    pub fn total_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }
    pub fn ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::IDENT)
    }
    fn flags_offset(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::FLG_OFF)
    }
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & FLAG_DF != 0
    }
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & FLAG_MF != 0
    }
    /// The reserved ("evil") flag bit.
    pub fn reserved_flag(&self) -> bool {
        self.flags_offset() & FLAG_RESERVED != 0
    }
    /// Fragment offset **in bytes** (the field counts 8-byte units; this is the only accessor
    /// for it, so every reader uses the same unit). Zero for an unfragmented packet and for a
    /// first fragment.
    pub fn frag_offset(&self) -> u16 {
        (self.flags_offset() & OFFSET_MASK) << 3
    }
    /// Part of a fragmented datagram (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & (FLAG_MF | OFFSET_MASK) != 0
    }
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    pub fn protocol(&self) -> IpProtocol {
        self.buffer.as_ref()[field::PROTOCOL].into()
    }
    pub fn raw_protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }
    pub fn header_checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }
    /// The options bytes (empty when IHL is 5, or when they are not in view).
    pub fn options(&self) -> &[u8] {
        self.buffer.as_ref().get(HEADER_LEN..self.header_len()).unwrap_or_default()
    }
    /// Whether the header checksum verifies; false when the header is not wholly in view.
    pub fn verify_checksum(&self) -> bool {
        self.buffer.as_ref().get(..self.header_len()).is_some_and(checksum::verify)
    }
    /// The datagram's payload, up to the total length (or the buffer's end when truncated).
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        let end = usize::from(self.total_len()).min(b.len());
        b.get(self.header_len()..end).unwrap_or_default()
    }
    /// The first four bytes after the header read as source and destination port, where TCP
    /// and UDP both keep them; `None` when they are not in view. Says nothing of whether the
    /// packet has ports: see [`Ipv4Packet::ports`] for that judgement.
    #[inline(always)]
    pub fn l4_ports(&self) -> Option<(u16, u16)> {
        let hl = self.header_len();
        let p = self.buffer.as_ref().get(hl..)?.first_chunk::<4>()?;
        Some((u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])))
    }
    /// Source and destination port of a TCP or UDP packet that carries its transport header
    /// (not a later fragment), when they are in view.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.protocol() {
            IpProtocol::Tcp | IpProtocol::Udp if self.frag_offset() == 0 => self.l4_ports(),
            _ => None,
        }
    }
    /// Writes the options that later fragments repeat (copy bit set, RFC 791) into `out`,
    /// padded to a 4-byte boundary with end-of-list; returns their length. The walk stops at
    /// end-of-list or at an option overrunning the header.
    pub fn copied_options(&self, out: &mut [u8; MAX_HEADER_LEN - HEADER_LEN]) -> usize {
        let opts = self.options();
        let (mut i, mut n) = (0, 0);
        while i < opts.len() {
            let kind = opts[i];
            match kind {
                0 => break,
                1 => i += 1,
                _ => {
                    let len = usize::from(opts.get(i + 1).copied().unwrap_or(0));
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
        while n % 4 != 0 {
            out[n] = 0;
            n += 1;
        }
        n
    }
}

impl<'a> Ipv4Packet<&'a [u8]> {
    /// The payload (as [`Ipv4Packet::payload`]), borrowed for as long as the buffer.
    pub fn into_payload(self) -> &'a [u8] {
        let end = usize::from(self.total_len()).min(self.buffer.len());
        self.buffer.get(self.header_len()..end).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_version_ihl(&mut self, header_len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((header_len / 4) as u8 & 0x0f);
    }
    pub fn set_dscp_ecn(&mut self, v: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = v;
    }
    pub fn set_total_len(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::LENGTH, v);
    }
    pub fn set_ident(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::IDENT, v);
    }
    /// Sets DF, MF and the fragment offset (in bytes, a multiple of 8) together.
    pub fn set_frag(&mut self, dont_frag: bool, more_frags: bool, offset: u16) {
        let mut v = (offset >> 3) & OFFSET_MASK;
        if dont_frag {
            v |= FLAG_DF;
        }
        if more_frags {
            v |= FLAG_MF;
        }
        set_u16(self.buffer.as_mut(), field::FLG_OFF, v);
    }
    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v;
    }
    pub fn set_protocol(&mut self, p: IpProtocol) {
        self.buffer.as_mut()[field::PROTOCOL] = p.into();
    }
    pub fn set_header_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
    /// Recomputes the header checksum from scratch (over the header bytes in view).
    pub fn fill_checksum(&mut self) {
        self.set_header_checksum(0);
        let b = self.buffer.as_ref();
        let c = checksum::checksum(&b[..self.header_len().min(b.len())]);
        self.set_header_checksum(c);
    }
    /// Decrements TTL by one, updating the checksum incrementally (RFC 1624; the same
    /// arithmetic as Linux `ip_decrease_ttl`: TTL is the high byte of its 16-bit word, so the
    /// checksum grows by 0x0100 with end-around carry). Returns the new TTL. The caller has
    /// checked that TTL is above 1.
    pub fn decrement_ttl(&mut self) -> u8 {
        let check = u32::from(self.header_checksum()) + 0x0100;
        let check = (check + u32::from(check >= 0xffff)) as u16;
        let ttl = self.ttl().wrapping_sub(1);
        self.set_ttl(ttl);
        self.set_header_checksum(check);
        ttl
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        let end = usize::from(self.total_len()).min(self.buffer.as_ref().len());
        self.buffer.as_mut().get_mut(hl..end).unwrap_or_default()
    }
}

/// An IPv4 header without options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub protocol: IpProtocol,
    pub payload_len: u16,
    pub ttl: u8,
    pub dscp_ecn: u8,
    pub ident: u16,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// In bytes; a multiple of 8.
    pub frag_offset: u16,
}

impl Ipv4Repr {
    /// Parses and validates: version 4, lengths, reserved flag clear, header checksum.
    /// Options are accepted and skipped.
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> Result<Self> {
        p.check_len()?;
        if p.version() != 4 || p.reserved_flag() {
            return Err(Error::Malformed);
        }
        if !p.verify_checksum() {
            return Err(Error::Checksum);
        }
        Ok(Ipv4Repr {
            src_addr: p.src_addr(),
            dst_addr: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: p.total_len() - p.header_len() as u16,
            ttl: p.ttl(),
            dscp_ecn: p.dscp_ecn(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
            more_frags: p.more_frags(),
            frag_offset: p.frag_offset(),
        })
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes a 20-byte header (no options) with a valid checksum.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Ipv4Packet<T>) {
        p.set_version_ihl(HEADER_LEN);
        p.set_dscp_ecn(self.dscp_ecn);
        p.set_total_len(self.payload_len.saturating_add(HEADER_LEN as u16));
        p.set_ident(self.ident);
        p.set_frag(self.dont_frag, self.more_frags, self.frag_offset);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src_addr);
        p.set_dst_addr(self.dst_addr);
        p.fill_checksum();
    }
}

/// An IPv4 prefix such as `10.244.0.0/16`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
    /// Derived from `prefix_len` once; `contains` is on the packet path.
    mask: u32,
}

impl Ipv4Cidr {
    /// Returns `None` for a prefix longer than 32. The address is kept as given; use
    /// `network()` for the masked form.
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Cidr> {
        if prefix_len > 32 {
            None
        } else {
            let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len) };
            Some(Ipv4Cidr { addr, prefix_len, mask })
        }
    }
    pub const fn address(&self) -> Ipv4Addr {
        self.addr
    }
    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    #[inline]
    pub const fn netmask_u32(&self) -> u32 {
        self.mask
    }
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr { addr: Ipv4Addr::from(u32::from(self.addr) & self.mask), ..*self }
    }
    #[inline]
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        (u32::from(a) ^ u32::from(self.addr)) & self.mask == 0
    }
    /// The first host address (network + 1): where flannel puts the pod gateway.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.addr) & self.netmask_u32()).wrapping_add(1))
    }
    /// The directed broadcast address of the prefix.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.netmask_u32())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl fmt::Debug for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl core::str::FromStr for Ipv4Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Ipv4Cidr> {
        let (a, l) = s.split_once('/').ok_or(Error::Malformed)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| Error::Malformed)?;
        let len: u8 = l.parse().map_err(|_| Error::Malformed)?;
        Ipv4Cidr::new(addr, len).ok_or(Error::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 192.168.0.1 -> 192.168.0.199, UDP, total 0x73, DF, TTL 64 (a textbook header).
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];

    fn datagram() -> Vec<u8> {
        let mut v = HEADER.to_vec();
        v.resize(0x73, 0x5a);
        v
    }

    #[test]
    fn deconstruct() {
        let d = datagram();
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        let r = Ipv4Repr::parse(&p).unwrap();
        assert_eq!(r.src_addr, Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(r.dst_addr, Ipv4Addr::new(192, 168, 0, 199));
        assert_eq!(r.protocol, IpProtocol::Udp);
        assert_eq!(r.payload_len, 0x73 - 20);
        assert!(r.dont_frag && !r.more_frags);
        assert_eq!(r.ttl, 64);
        assert_eq!(p.payload().len(), 0x73 - 20);
    }

    #[test]
    fn construct() {
        let d = datagram();
        let r = Ipv4Repr::parse(&Ipv4Packet::new_checked(&d[..]).unwrap()).unwrap();
        let mut out = [0u8; 20];
        r.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, HEADER);
    }

    #[test]
    fn options_and_fragments() {
        // IHL 6 with a 4-byte Router Alert option; MF set, offset 1480.
        let mut d = vec![
            0x46, 0x00, 0x00, 0x20, 0x12, 0x34, 0x20, 0xb9, 0x40, 0x11, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 0x94, 0x04,
            0x00, 0x00,
        ];
        d.resize(0x20, 0);
        let mut p = Ipv4Packet::new_checked(&mut d[..]).unwrap();
        p.fill_checksum();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.options(), &[0x94, 0x04, 0, 0]);
        assert!(p.is_fragment() && p.more_frags());
        assert_eq!(p.frag_offset(), 1480);
        assert_eq!(p.payload().len(), 8);
        assert!(Ipv4Repr::parse(&p).is_ok());
    }

    #[test]
    fn rejects_bad_lengths() {
        let d = datagram();
        for n in 0..0x73 {
            assert!(Ipv4Packet::new_checked(&d[..n]).is_err(), "len {n}");
        }
        let mut bad_ihl = datagram();
        bad_ihl[0] = 0x44;
        assert_eq!(Ipv4Packet::new_checked(&bad_ihl[..]).unwrap_err(), Error::BadLength);
        let mut short_total = datagram();
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new_checked(&short_total[..]).unwrap_err(), Error::BadLength);
        let mut bad_sum = datagram();
        bad_sum[11] ^= 1;
        assert_eq!(Ipv4Repr::parse(&Ipv4Packet::new_checked(&bad_sum[..]).unwrap()), Err(Error::Checksum));
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut d = datagram();
        let mut p = Ipv4Packet::new_checked(&mut d[..]).unwrap();
        for expect in (1..64).rev() {
            assert_eq!(p.decrement_ttl(), expect);
            assert!(p.verify_checksum());
        }
    }

    #[test]
    fn cidr() {
        let c: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 1)));
        assert_eq!(c.first_host(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 244, 1, 255));
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
    }

    #[test]
    fn fixed_view_reads_the_header_and_never_reads_past_it() {
        let d = datagram();
        let h = Ipv4Packet::new_fixed(&d[..]).unwrap();
        assert_eq!((h.version(), h.header_len(), h.ttl()), (4, 20, 64));
        assert_eq!(h.protocol(), IpProtocol::Udp);
        assert!(h.verify_fixed_checksum());
        assert_eq!(Ipv4Packet::new_fixed(&d[..19]).unwrap_err(), Error::Truncated);
        // IHL 15 on a 20-byte view: options and payload are out of view, nothing panics.
        let mut long = HEADER;
        long[0] = 0x4f;
        let h = Ipv4Packet::new_fixed(&long[..]).unwrap();
        assert!(h.options().is_empty() && h.payload().is_empty());
        assert!(!h.verify_checksum());
        assert_eq!(h.l4_ports(), None);
    }

    #[test]
    fn fragment_offset_is_in_bytes_and_later_fragments_have_no_ports() {
        let mut d = datagram();
        d[20..24].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        assert_eq!(p.ports(), Some((40000, 53)));
        let mut p = Ipv4Packet::new_checked(&mut d[..]).unwrap();
        p.set_frag(false, true, 1480);
        assert_eq!(&p.into_inner()[6..8], &[0x20, 0xb9]); // MF, 185 units of 8 bytes
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        assert_eq!(p.frag_offset(), 1480);
        assert!(p.is_fragment() && p.more_frags() && !p.dont_frag());
        assert_eq!(p.ports(), None);
        assert_eq!(p.l4_ports(), Some((40000, 53)));
    }

    #[test]
    fn copied_options_keep_only_the_copy_bit() {
        // Router Alert (copied, 4 bytes), NOP, Record Route (not copied, 7 bytes), EOL.
        let mut d = vec![0x48, 0, 0, 0x24, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        d.extend_from_slice(&[0x94, 4, 0, 0, 1, 7, 7, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        d.resize(0x24, 0);
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        let mut out = [0xaa; 40];
        assert_eq!(p.copied_options(&mut out), 4);
        assert_eq!(&out[..4], &[0x94, 4, 0, 0]);
    }
}
