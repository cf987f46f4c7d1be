//! UDP (RFC 768).

use super::{checksum, chunk, chunk_mut, get_u16, set_u16, Error, Field, Result};
use core::net::Ipv4Addr;

mod field {
    use super::Field;
    pub(super) const SRC_PORT: Field = 0..2;
    pub(super) const DST_PORT: Field = 2..4;
    pub(super) const LENGTH: Field = 4..6;
    pub(super) const CHECKSUM: Field = 6..8;
}

pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field within the header.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<'a> UdpPacket<&'a [u8; HEADER_LEN]> {
    /// A view of the 8-byte header at the front of `bytes` (see the module contract).
    #[inline(always)]
    pub fn new_fixed(bytes: &'a [u8]) -> Result<Self> {
        chunk(bytes).map(Self::new_unchecked)
    }
}

impl<'a> UdpPacket<&'a mut [u8; HEADER_LEN]> {
    /// A mutable view of the 8-byte header at the front of `bytes`.
    #[inline(always)]
    pub fn new_fixed_mut(bytes: &'a mut [u8]) -> Result<Self> {
        chunk_mut(bytes).map(Self::new_unchecked)
    }
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }
    /// Checks the header fits and the length field is between 8 and the buffer length.
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
        let l = usize::from(self.len());
        if l < HEADER_LEN {
            return Err(Error::BadLength);
        }
        if l > len {
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
    /// The length field: header plus payload.
    pub fn len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }
    pub fn payload(&self) -> &[u8] {
        let end = usize::from(self.len()).min(self.buffer.as_ref().len()).max(HEADER_LEN);
        &self.buffer.as_ref()[HEADER_LEN..end]
    }
    /// Zero means "no checksum" for IPv4 (RFC 768) and always verifies.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let l = usize::from(self.len()).min(self.buffer.as_ref().len());
        checksum::verify_l4(src, dst, 17, &self.buffer.as_ref()[..l])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn set_src_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::SRC_PORT, v);
    }
    pub fn set_dst_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::DST_PORT, v);
    }
    pub fn set_len(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::LENGTH, v);
    }
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }
    /// Computes the checksum over header and payload (up to the length field).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let l = usize::from(self.len()).min(self.buffer.as_ref().len());
        let mut c = checksum::l4_checksum(src, dst, 17, &self.buffer.as_ref()[..l]);
        if c == 0 {
            c = 0xffff;
        }
        self.set_checksum(c);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len()).min(self.buffer.as_ref().len()).max(HEADER_LEN);
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: u16,
}

impl UdpRepr {
    /// Parses and verifies the checksum (unless it is zero). Port 0 as destination is refused.
    pub fn parse<T: AsRef<[u8]>>(p: &UdpPacket<T>, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Self> {
        p.check_len()?;
        if p.dst_port() == 0 {
            return Err(Error::Malformed);
        }
        if !p.verify_checksum(src, dst) {
            return Err(Error::Checksum);
        }
        Ok(UdpRepr { src_port: p.src_port(), dst_port: p.dst_port(), payload_len: p.len() - HEADER_LEN as u16 })
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Writes the header; the payload must already be in place. With `checksum_addrs` the
    /// checksum is computed, otherwise it is left zero (allowed for IPv4, used by VXLAN).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        p: &mut UdpPacket<T>,
        checksum_addrs: Option<(Ipv4Addr, Ipv4Addr)>,
    ) {
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len(self.payload_len.saturating_add(HEADER_LEN as u16));
        p.set_checksum(0);
        if let Some((s, d)) = checksum_addrs {
            p.fill_checksum(s, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    // A DNS-ish datagram 53000 -> 53 with payload "vxnat" and its checksum.
    const PACKET: [u8; 13] = [0xcf, 0x08, 0x00, 0x35, 0x00, 0x0d, 0x00, 0x00, b'v', b'x', b'n', b'a', b't'];

    fn fixture() -> Vec<u8> {
        let mut p = PACKET.to_vec();
        let c = checksum::l4_checksum(SRC, DST, 17, &p);
        p[6..8].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn deconstruct() {
        let b = fixture();
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.src_port(), 53000);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.payload(), b"vxnat");
        assert_eq!(UdpRepr::parse(&p, SRC, DST).unwrap(), UdpRepr { src_port: 53000, dst_port: 53, payload_len: 5 });
    }

    #[test]
    fn construct() {
        let mut b = [0u8; 13];
        b[8..].copy_from_slice(b"vxnat");
        UdpRepr { src_port: 53000, dst_port: 53, payload_len: 5 }
            .emit(&mut UdpPacket::new_unchecked(&mut b[..]), Some((SRC, DST)));
        assert_eq!(b.to_vec(), fixture());
    }

    #[test]
    fn rejects_bad_length_and_checksum() {
        let b = fixture();
        for n in 0..b.len() {
            assert!(UdpPacket::new_checked(&b[..n]).is_err());
        }
        let mut short = fixture();
        short[5] = 7;
        assert_eq!(UdpPacket::new_checked(&short[..]).unwrap_err(), Error::BadLength);
        let mut bad = fixture();
        bad[9] ^= 0x40;
        assert_eq!(UdpRepr::parse(&UdpPacket::new_checked(&bad[..]).unwrap(), SRC, DST), Err(Error::Checksum));
        let mut none = PACKET;
        none[9] ^= 0x40; // a zero checksum is not checked
        assert!(UdpRepr::parse(&UdpPacket::new_checked(&none[..]).unwrap(), SRC, DST).is_ok());
    }
}
