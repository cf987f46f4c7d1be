//! TCP (RFC 9293) header, flags and the options vxnat reads or writes: MSS, window scale,
//! SACK-permitted, SACK blocks (read only) and timestamps.

use super::{checksum, chunk, chunk_mut, get_u16, get_u32, set_u16, set_u32, Error, Field, Result};
use core::net::Ipv4Addr;

mod field {
    use super::Field;
    pub(super) const SRC_PORT: Field = 0..2;
    pub(super) const DST_PORT: Field = 2..4;
    pub(super) const SEQ: Field = 4..8;
    pub(super) const ACK: Field = 8..12;
    pub(super) const OFF_FLAGS: Field = 12..14;
    pub(super) const WINDOW: Field = 14..16;
    pub(super) const CHECKSUM: Field = 16..18;
    pub(super) const URGENT: Field = 18..20;
}

pub const HEADER_LEN: usize = 20;
pub const MAX_HEADER_LEN: usize = 60;
/// Offset of the checksum field within the header.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;
/// Offsets of the sequence and acknowledgment numbers, and of the byte holding FIN..CWR: for
/// the partial headers ICMP errors quote, which a view cannot be made of.
pub const SEQ_OFFSET: usize = field::SEQ.start;
pub const ACK_OFFSET: usize = field::ACK.start;
pub const FLAGS_BYTE_OFFSET: usize = field::OFF_FLAGS.start + 1;

/// The nine TCP flag bits.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x001);
    pub const SYN: TcpFlags = TcpFlags(0x002);
    pub const RST: TcpFlags = TcpFlags(0x004);
    pub const PSH: TcpFlags = TcpFlags(0x008);
    pub const ACK: TcpFlags = TcpFlags(0x010);
    pub const URG: TcpFlags = TcpFlags(0x020);
    pub const ECE: TcpFlags = TcpFlags(0x040);
    pub const CWR: TcpFlags = TcpFlags(0x080);
    pub const NS: TcpFlags = TcpFlags(0x100);
    const NAMES: [(TcpFlags, &'static str); 9] = [
        (Self::SYN, "SYN"),
        (Self::ACK, "ACK"),
        (Self::FIN, "FIN"),
        (Self::RST, "RST"),
        (Self::PSH, "PSH"),
        (Self::URG, "URG"),
        (Self::ECE, "ECE"),
        (Self::CWR, "CWR"),
        (Self::NS, "NS"),
    ];

    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn intersects(self, other: TcpFlags) -> bool {
        self.0 & other.0 != 0
    }
    /// These flags with `other`'s cleared.
    pub const fn without(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & !other.0)
    }
}

impl core::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, o: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | o.0)
    }
}

impl core::fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

/// One option from the header's option list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    EndOfList,
    NoOperation,
    MaxSegmentSize(u16),
    WindowScale(u8),
    SackPermitted,
    /// Raw SACK blocks (pairs of 32-bit edges).
    SackRange(&'a [u8]),
    Timestamps {
        tsval: u32,
        tsecr: u32,
    },
    Unknown {
        kind: u8,
        data: &'a [u8],
    },
}

impl<'a> TcpOption<'a> {
    /// Parses one option; returns it and the rest of the buffer.
    pub fn parse(b: &'a [u8]) -> Result<(TcpOption<'a>, &'a [u8])> {
        let (&kind, rest) = b.split_first().ok_or(Error::Truncated)?;
        match kind {
            0 => return Ok((TcpOption::EndOfList, &[])),
            1 => return Ok((TcpOption::NoOperation, rest)),
            _ => {}
        }
        let (&len, _) = rest.split_first().ok_or(Error::Truncated)?;
        let len = usize::from(len);
        if len < 2 {
            return Err(Error::Malformed);
        }
        let data = b.get(2..len).ok_or(Error::Truncated)?;
        let rest = &b[len..];
        let opt = match (kind, len) {
            (2, 4) => TcpOption::MaxSegmentSize(u16::from_be_bytes([data[0], data[1]])),
            (3, 3) => TcpOption::WindowScale(data[0]),
            (4, 2) => TcpOption::SackPermitted,
            (5, l) if l >= 10 && (l - 2) % 8 == 0 => TcpOption::SackRange(data),
            (8, 10) => TcpOption::Timestamps {
                tsval: u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
                tsecr: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
            },
            (2 | 3 | 4 | 5 | 8, _) => return Err(Error::Malformed),
            _ => TcpOption::Unknown { kind, data },
        };
        Ok((opt, rest))
    }

    pub fn buffer_len(&self) -> usize {
        match self {
            TcpOption::EndOfList | TcpOption::NoOperation => 1,
            TcpOption::MaxSegmentSize(_) => 4,
            TcpOption::WindowScale(_) => 3,
            TcpOption::SackPermitted => 2,
            TcpOption::SackRange(d) => 2 + d.len(),
            TcpOption::Timestamps { .. } => 10,
            TcpOption::Unknown { data, .. } => 2 + data.len(),
        }
    }

    /// Writes the option at the start of `b`; returns the bytes written.
    pub fn emit(&self, b: &mut [u8]) -> usize {
        let n = self.buffer_len();
        match *self {
            TcpOption::EndOfList => b[0] = 0,
            TcpOption::NoOperation => b[0] = 1,
            TcpOption::MaxSegmentSize(m) => {
                b[..2].copy_from_slice(&[2, 4]);
                b[2..4].copy_from_slice(&m.to_be_bytes());
            }
            TcpOption::WindowScale(s) => b[..3].copy_from_slice(&[3, 3, s]),
            TcpOption::SackPermitted => b[..2].copy_from_slice(&[4, 2]),
            TcpOption::SackRange(d) => {
                b[..2].copy_from_slice(&[5, n as u8]);
                b[2..n].copy_from_slice(d);
            }
            TcpOption::Timestamps { tsval, tsecr } => {
                b[..2].copy_from_slice(&[8, 10]);
                b[2..6].copy_from_slice(&tsval.to_be_bytes());
                b[6..10].copy_from_slice(&tsecr.to_be_bytes());
            }
            TcpOption::Unknown { kind, data } => {
                b[..2].copy_from_slice(&[kind, n as u8]);
                b[2..n].copy_from_slice(data);
            }
        }
        n
    }
}

/// Iterates over the options of a header; yields an error once and stops on malformed input.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<TcpOption<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match TcpOption::parse(self.rest) {
            Ok((TcpOption::EndOfList, _)) => {
                self.rest = &[];
                None
            }
            Ok((opt, rest)) => {
                self.rest = rest;
                Some(Ok(opt))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// Flag bits within the data offset / flags word.
const FLAGS_MASK: u16 = 0x01ff;

#[derive(Debug, Clone)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<'a> TcpPacket<&'a [u8; HEADER_LEN]> {
    /// A view of the fixed 20-byte header at the front of `bytes` (see the module contract:
    /// options and payload are out of view).
    #[inline(always)]
    pub fn new_fixed(bytes: &'a [u8]) -> Result<Self> {
        chunk(bytes).map(Self::new_unchecked)
    }
}

impl<'a> TcpPacket<&'a mut [u8; HEADER_LEN]> {
    /// A mutable view of the fixed 20-byte header at the front of `bytes`.
    #[inline(always)]
    pub fn new_fixed_mut(bytes: &'a mut [u8]) -> Result<Self> {
        chunk_mut(bytes).map(Self::new_unchecked)
    }
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        TcpPacket { buffer }
    }
    /// Checks the fixed header fits and the data offset is between 5 and the buffer length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    pub fn check_len(&self) -> Result<()> {
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
    pub fn into_inner(self) -> T {
        self.buffer
    }
    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SRC_PORT)
    }
    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::DST_PORT)
    }
    pub fn seq_number(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::SEQ)
    }
    pub fn ack_number(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::ACK)
    }
    /// Header length in bytes (data offset * 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::OFF_FLAGS.start] >> 4) * 4
    }
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(get_u16(self.buffer.as_ref(), field::OFF_FLAGS) & FLAGS_MASK)
    }
    pub fn window_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::WINDOW)
    }
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }
    pub fn urgent_at(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::URGENT)
    }
    pub fn options(&self) -> TcpOptions<'_> {
        TcpOptions { rest: self.options_bytes() }
    }
    /// The options bytes (empty when the data offset is 5, or when they are not in view).
    pub fn options_bytes(&self) -> &[u8] {
        self.buffer.as_ref().get(HEADER_LEN..self.header_len()).unwrap_or_default()
    }
    /// The MSS option's value as Linux's `tcp_parse_options` reads it: options of the wrong
    /// length are skipped, the walk ends at end-of-list, at a length below 2 or at an option
    /// cut short; `None` when there is none or it is zero. (The [`TcpOptions`] iterator is
    /// stricter: it stops at the first malformed option.)
    pub fn max_seg_size(&self) -> Option<u16> {
        let opts = self.options_bytes();
        let mut i = 0;
        while i < opts.len() {
            match opts[i] {
                0 => return None,
                1 => i += 1,
                kind => {
                    let len = usize::from(*opts.get(i + 1)?);
                    if len < 2 {
                        return None;
                    }
                    if kind == 2 && len == 4 {
                        let v = u16::from_be_bytes([*opts.get(i + 2)?, *opts.get(i + 3)?]);
                        return (v > 0).then_some(v);
                    }
                    i += len;
                }
            }
        }
        None
    }
    pub fn payload(&self) -> &[u8] {
        self.buffer.as_ref().get(self.header_len()..).unwrap_or_default()
    }
    /// Verifies the checksum over the whole buffer (header and payload).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        checksum::verify_l4(src, dst, 6, self.buffer.as_ref())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    pub fn set_src_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::SRC_PORT, v);
    }
    pub fn set_dst_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::DST_PORT, v);
    }
    pub fn set_seq_number(&mut self, v: u32) {
        set_u32(self.buffer.as_mut(), field::SEQ, v);
    }
    pub fn set_ack_number(&mut self, v: u32) {
        set_u32(self.buffer.as_mut(), field::ACK, v);
    }
    /// Sets the data offset (header length in bytes, a multiple of 4) and the flags.
    pub fn set_header_len_flags(&mut self, header_len: usize, flags: TcpFlags) {
        let v = (((header_len / 4) as u16) << 12) | (flags.0 & FLAGS_MASK);
        set_u16(self.buffer.as_mut(), field::OFF_FLAGS, v);
    }
    /// Sets the flags, keeping the data offset and the reserved bits.
    pub fn set_flags(&mut self, flags: TcpFlags) {
        let v = (get_u16(self.buffer.as_ref(), field::OFF_FLAGS) & !FLAGS_MASK) | (flags.0 & FLAGS_MASK);
        set_u16(self.buffer.as_mut(), field::OFF_FLAGS, v);
    }
    pub fn set_window_len(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::WINDOW, v);
    }
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }
    pub fn set_urgent_at(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::URGENT, v);
    }
    /// Computes the checksum over the whole buffer.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let c = checksum::l4_checksum(src, dst, 6, self.buffer.as_ref());
        self.set_checksum(c);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        self.buffer.as_mut().get_mut(h..).unwrap_or_default()
    }
}

/// A TCP header with the options vxnat understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq_number: u32,
    pub ack_number: u32,
    pub flags: TcpFlags,
    pub window_len: u16,
    pub urgent_at: u16,
    pub max_seg_size: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamps: Option<(u32, u32)>,
    pub payload_len: usize,
}

impl TcpRepr {
    /// Parses the header and its options and verifies the checksum over `p`'s whole buffer.
    pub fn parse<T: AsRef<[u8]>>(p: &TcpPacket<T>, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Self> {
        p.check_len()?;
        if p.src_port() == 0 || p.dst_port() == 0 {
            return Err(Error::Malformed);
        }
        if !p.verify_checksum(src, dst) {
            return Err(Error::Checksum);
        }
        let mut r = TcpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            seq_number: p.seq_number(),
            ack_number: p.ack_number(),
            flags: p.flags(),
            window_len: p.window_len(),
            urgent_at: p.urgent_at(),
            max_seg_size: None,
            window_scale: None,
            sack_permitted: false,
            timestamps: None,
            payload_len: p.payload().len(),
        };
        for opt in p.options() {
            match opt? {
                TcpOption::MaxSegmentSize(m) => r.max_seg_size = Some(m),
                TcpOption::WindowScale(s) => r.window_scale = Some(s),
                TcpOption::SackPermitted => r.sack_permitted = true,
                TcpOption::Timestamps { tsval, tsecr } => r.timestamps = Some((tsval, tsecr)),
                _ => {}
            }
        }
        Ok(r)
    }

    fn options_len(&self) -> usize {
        let mut n = 0;
        if self.max_seg_size.is_some() {
            n += 4;
        }
        if self.sack_permitted {
            n += 2;
        }
        if self.timestamps.is_some() {
            n += 10;
        }
        if self.window_scale.is_some() {
            n += 3;
        }
        n
    }

    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options_len().div_ceil(4) * 4
    }

    pub fn buffer_len(&self) -> usize {
        self.header_len() + self.payload_len
    }

    /// Writes header and options (MSS, SACK-permitted, timestamps, window scale, then EOL
    /// padding) into `p`, whose buffer holds exactly `buffer_len()` bytes with the payload
    /// already in place, and computes the checksum.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut TcpPacket<T>, src: Ipv4Addr, dst: Ipv4Addr) {
        let hl = self.header_len();
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_seq_number(self.seq_number);
        p.set_ack_number(self.ack_number);
        p.set_header_len_flags(hl, self.flags);
        p.set_window_len(self.window_len);
        p.set_urgent_at(self.urgent_at);
        let opts = &mut p.buffer.as_mut()[HEADER_LEN..hl];
        let mut at = 0;
        if let Some(m) = self.max_seg_size {
            at += TcpOption::MaxSegmentSize(m).emit(&mut opts[at..]);
        }
        if self.sack_permitted {
            at += TcpOption::SackPermitted.emit(&mut opts[at..]);
        }
        if let Some((tsval, tsecr)) = self.timestamps {
            at += TcpOption::Timestamps { tsval, tsecr }.emit(&mut opts[at..]);
        }
        if let Some(s) = self.window_scale {
            at += TcpOption::WindowScale(s).emit(&mut opts[at..]);
        }
        opts[at..].fill(0);
        p.fill_checksum(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

    /// A Linux SYN: 41000 -> 80, MSS 1410, SACK-permitted, timestamps, NOP, WS 7.
    fn linux_syn() -> Vec<u8> {
        let mut b = vec![
            0xa0, 0x28, 0x00, 0x50, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x00, 0x00,
            0x00, 0x00, // fixed header, doff 10, SYN
            0x02, 0x04, 0x05, 0x82, // MSS 1410
            0x04, 0x02, // SACK permitted
            0x08, 0x0a, 0x00, 0x01, 0x02, 0x03, 0x00, 0x00, 0x00, 0x00, // TS
            0x01, // NOP
            0x03, 0x03, 0x07, // WS 7
        ];
        let c = checksum::l4_checksum(SRC, DST, 6, &b);
        b[16..18].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn deconstruct_linux_syn() {
        let b = linux_syn();
        let p = TcpPacket::new_checked(&b[..]).unwrap();
        let r = TcpRepr::parse(&p, SRC, DST).unwrap();
        assert_eq!(r.src_port, 41000);
        assert_eq!(r.dst_port, 80);
        assert_eq!(r.seq_number, 0x12345678);
        assert_eq!(r.flags, TcpFlags::SYN);
        assert_eq!(r.window_len, 64240);
        assert_eq!(r.max_seg_size, Some(1410));
        assert!(r.sack_permitted);
        assert_eq!(r.timestamps, Some((0x00010203, 0)));
        assert_eq!(r.window_scale, Some(7));
        assert_eq!(r.payload_len, 0);
    }

    #[test]
    fn construct_round_trips() {
        let b = linux_syn();
        let r = TcpRepr::parse(&TcpPacket::new_checked(&b[..]).unwrap(), SRC, DST).unwrap();
        let mut out = vec![0u8; r.buffer_len()];
        r.emit(&mut TcpPacket::new_unchecked(&mut out[..]), SRC, DST);
        let p = TcpPacket::new_checked(&out[..]).unwrap();
        assert_eq!(TcpRepr::parse(&p, SRC, DST).unwrap(), r);
    }

    #[test]
    fn malformed_options_are_errors_not_panics() {
        let mut b = linux_syn();
        b[21] = 9; // MSS option claiming 9 bytes
        let c = checksum::l4_checksum(SRC, DST, 6, &{
            let mut z = b.clone();
            z[16] = 0;
            z[17] = 0;
            z
        });
        b[16..18].copy_from_slice(&c.to_be_bytes());
        let p = TcpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(TcpRepr::parse(&p, SRC, DST), Err(Error::Malformed));
        let mut b = linux_syn();
        b[12] = 0x40; // doff 4
        assert_eq!(TcpPacket::new_checked(&b[..]).unwrap_err(), Error::BadLength);
        let b = linux_syn();
        for n in 0..b.len() {
            assert!(TcpPacket::new_checked(&b[..n]).is_err());
        }
    }

    #[test]
    fn flags_debug() {
        assert_eq!(format!("{:?}", TcpFlags::SYN | TcpFlags::ACK), "SYN|ACK");
        assert_eq!(format!("{:?}", TcpFlags(0)), "-");
    }

    #[test]
    fn set_flags_keeps_the_data_offset_and_reserved_bits() {
        let mut b = linux_syn();
        b[12] |= 0x0e; // reserved bits
        let mut p = TcpPacket::new_checked(&mut b[..]).unwrap();
        let flags = p.flags().without(TcpFlags::SYN) | TcpFlags::ACK;
        p.set_flags(flags);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), TcpFlags::ACK);
        assert_eq!(b[12] & 0x0e, 0x0e);
    }

    #[test]
    fn max_seg_size_skips_wrong_length_options_as_linux_does() {
        let b = linux_syn();
        assert_eq!(TcpPacket::new_checked(&b[..]).unwrap().max_seg_size(), Some(1410));
        // Window scale with a bogus length 4 before the MSS: skipped, the MSS still found
        // (the strict iterator stops there).
        let mut b = linux_syn();
        b[20..28].copy_from_slice(&[3, 4, 7, 0, 2, 4, 0x05, 0x82]);
        let p = TcpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.max_seg_size(), Some(1410));
        assert!(p.options().any(|o| o.is_err()));
        // A zero MSS, an option running past the header, a fixed view: none.
        let mut b = linux_syn();
        b[22..24].copy_from_slice(&[0, 0]);
        assert_eq!(TcpPacket::new_checked(&b[..]).unwrap().max_seg_size(), None);
        let mut b = linux_syn();
        b[37] = 30;
        assert_eq!(TcpPacket::new_checked(&b[..]).unwrap().max_seg_size(), Some(1410));
        assert_eq!(TcpPacket::new_fixed(&linux_syn()[..]).unwrap().max_seg_size(), None);
    }
}
