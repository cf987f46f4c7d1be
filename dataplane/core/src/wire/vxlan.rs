//! VXLAN (RFC 7348): an 8-byte header after outer UDP; flags with the I bit, a 24-bit VNI.

use super::{chunk, Error, Field, Result};

mod field {
    use super::Field;
    pub(super) const FLAGS: usize = 0;
    pub(super) const RESERVED1: Field = 1..4;
    pub(super) const VNI: Field = 4..7;
    pub(super) const RESERVED2: usize = 7;
}

pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid. RFC 7348 requires it set.
pub const FLAG_I: u8 = 0x08;
/// IANA's port is 4789; Linux's historical default, used by flannel, is 8472.
pub const FLANNEL_PORT: u16 = 8472;
/// IANA's VXLAN port.
pub const IANA_PORT: u16 = 4789;
/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8): what encapsulation adds in front of
/// the inner Ethernet frame.
pub const ENCAP_OVERHEAD: usize = 50;
/// What the inner IPv4 packet may occupy of the underlay MTU: outer IPv4 + UDP + VXLAN +
/// inner Ethernet = 50 bytes, the figure flannel subtracts for pod MTUs.
pub const MTU_OVERHEAD: usize = 50;

#[derive(Debug, Clone)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<'a> VxlanPacket<&'a [u8; HEADER_LEN]> {
    /// A view of the 8-byte header at the front of `bytes` (see the module contract).
    #[inline(always)]
    pub fn new_fixed(bytes: &'a [u8]) -> Result<Self> {
        chunk(bytes).map(Self::new_unchecked)
    }
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        VxlanPacket { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    /// The header Linux accepts without extensions: flags exactly I, reserved fields zero.
    pub fn is_plain(&self) -> bool {
        self.flags() == FLAG_I && self.reserved_clear()
    }
    pub fn has_vni_flag(&self) -> bool {
        self.flags() & FLAG_I != 0
    }
    /// Reserved flag bits and reserved fields are all zero (Linux drops frames where they are
    /// not, when no extension is configured; so do we).
    pub fn reserved_clear(&self) -> bool {
        let b = self.buffer.as_ref();
        b[field::FLAGS] & !FLAG_I == 0 && b[field::RESERVED1] == [0, 0, 0] && b[field::RESERVED2] == 0
    }
    pub fn vni(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }
    pub fn payload(&self) -> &[u8] {
        self.buffer.as_ref().get(HEADER_LEN..).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// Writes flags = I, VNI, reserved zero.
    pub fn set_header(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        let v = (vni & 0x00ff_ffff).to_be_bytes();
        b[..HEADER_LEN].copy_from_slice(&[FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    /// 24-bit VXLAN network identifier.
    pub vni: u32,
}

impl VxlanRepr {
    pub fn parse<T: AsRef<[u8]>>(p: &VxlanPacket<T>) -> Result<Self> {
        p.check_len()?;
        if !p.has_vni_flag() || !p.reserved_clear() {
            return Err(Error::Malformed);
        }
        Ok(VxlanRepr { vni: p.vni() })
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut VxlanPacket<T>) {
        p.set_header(self.vni);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // flannel's header for VNI 1, as captured on UDP/8472.
    const VNI1: [u8; 8] = [0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00];

    #[test]
    fn deconstruct() {
        let p = VxlanPacket::new_checked(&VNI1[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p).unwrap(), VxlanRepr { vni: 1 });
    }

    #[test]
    fn construct() {
        let mut b = [0xffu8; 8];
        VxlanRepr { vni: 1 }.emit(&mut VxlanPacket::new_unchecked(&mut b[..]));
        assert_eq!(b, VNI1);
        VxlanRepr { vni: 0xabcdef }.emit(&mut VxlanPacket::new_unchecked(&mut b[..]));
        assert_eq!(VxlanPacket::new_unchecked(&b[..]).vni(), 0xabcdef);
    }

    #[test]
    fn rejects_missing_i_flag_and_reserved_bits() {
        let mut b = VNI1;
        b[0] = 0;
        assert_eq!(VxlanRepr::parse(&VxlanPacket::new_unchecked(&b[..])), Err(Error::Malformed));
        let mut b = VNI1;
        b[7] = 1;
        assert_eq!(VxlanRepr::parse(&VxlanPacket::new_unchecked(&b[..])), Err(Error::Malformed));
        assert_eq!(VxlanPacket::new_checked(&VNI1[..7]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn plain_header_is_exactly_the_i_flag() {
        assert!(VxlanPacket::new_fixed(&VNI1[..]).unwrap().is_plain());
        let mut b = VNI1;
        b[0] = 0x0c;
        assert!(!VxlanPacket::new_fixed(&b[..]).unwrap().is_plain());
        b = VNI1;
        b[2] = 1;
        assert!(!VxlanPacket::new_fixed(&b[..]).unwrap().is_plain());
    }
}
