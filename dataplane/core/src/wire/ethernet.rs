//! Ethernet II frames, with up to two 802.1Q / 802.1ad tags skipped.

use super::{chunk, chunk_mut, get_u16, set_u16, Error, Field, Result};
use core::fmt;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    pub fn from_bytes(b: &[u8]) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[..6]);
        MacAddr(m)
    }
    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }
    /// Group bit set: broadcast or multicast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
    /// A unicast, non-zero address (what a host may use as its source).
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && *self != Self::ZERO
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl core::str::FromStr for MacAddr {
    type Err = Error;
    /// Parses `aa:bb:cc:dd:ee:ff` (also with `-` separators).
    fn from_str(s: &str) -> Result<MacAddr> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split([':', '-']) {
            if n == 6 || part.len() != 2 {
                return Err(Error::Malformed);
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| Error::Malformed)?;
            n += 1;
        }
        if n != 6 {
            return Err(Error::Malformed);
        }
        Ok(MacAddr(out))
    }
}

/// EtherType values vxnat distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtherType {
    Ipv4,
    Arp,
    Ipv6,
    Vlan,
    QinQ,
    Unknown(u16),
}

impl From<u16> for EtherType {
    fn from(v: u16) -> Self {
        match v {
            0x0800 => EtherType::Ipv4,
            0x0806 => EtherType::Arp,
            0x86dd => EtherType::Ipv6,
            0x8100 => EtherType::Vlan,
            0x88a8 => EtherType::QinQ,
            other => EtherType::Unknown(other),
        }
    }
}

impl From<EtherType> for u16 {
    fn from(v: EtherType) -> u16 {
        match v {
            EtherType::Ipv4 => 0x0800,
            EtherType::Arp => 0x0806,
            EtherType::Ipv6 => 0x86dd,
            EtherType::Vlan => 0x8100,
            EtherType::QinQ => 0x88a8,
            EtherType::Unknown(o) => o,
        }
    }
}

mod field {
    use super::Field;
    pub(super) const DST: Field = 0..6;
    pub(super) const SRC: Field = 6..12;
    pub(super) const ETHERTYPE: Field = 12..14;
    pub(super) const TAG_LEN: usize = 4;
}

/// Length of an untagged Ethernet header.
pub const HEADER_LEN: usize = 14;
/// Most VLAN tags skipped (802.1ad outer + 802.1Q inner).
pub const MAX_TAGS: usize = 2;

fn is_tag(t: u16) -> bool {
    t == 0x8100 || t == 0x88a8
}

/// A read/write view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<'a> EthernetFrame<&'a [u8; HEADER_LEN]> {
    /// A view of the untagged 14-byte header at the front of `bytes` (see the module contract):
    /// addresses and [`EthernetFrame::ethertype_or_tpid`] are plain loads; tags are out of view.
    #[inline(always)]
    pub fn new_fixed(bytes: &'a [u8]) -> Result<Self> {
        chunk(bytes).map(Self::new_unchecked)
    }
}

impl<'a> EthernetFrame<&'a mut [u8; HEADER_LEN]> {
    /// A mutable view of the 14-byte header at the front of `bytes`.
    #[inline(always)]
    pub fn new_fixed_mut(bytes: &'a mut [u8]) -> Result<Self> {
        chunk_mut(bytes).map(Self::new_unchecked)
    }
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// Checks that the header, including any VLAN tags, fits in the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let mut off = field::ETHERTYPE.start;
        for _ in 0..=MAX_TAGS {
            if b.len() < off + 2 {
                return Err(Error::Truncated);
            }
            if !is_tag(get_u16(b, off..off + 2)) {
                return Ok(());
            }
            off += field::TAG_LEN;
        }
        // More tags than we skip: refuse rather than guess.
        Err(Error::Malformed)
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst_addr(&self) -> MacAddr {
        MacAddr::from_bytes(&self.buffer.as_ref()[field::DST])
    }

    pub fn src_addr(&self) -> MacAddr {
        MacAddr::from_bytes(&self.buffer.as_ref()[field::SRC])
    }

    /// Offset of the final (inner) EtherType field.
    fn ethertype_offset(&self) -> usize {
        let b = self.buffer.as_ref();
        let mut off = field::ETHERTYPE.start;
        for _ in 0..MAX_TAGS {
            if b.len() >= off + field::TAG_LEN + 2 && is_tag(get_u16(b, off..off + 2)) {
                off += field::TAG_LEN;
            } else {
                break;
            }
        }
        off
    }

    /// The type field right after the addresses: an untagged frame's EtherType, or a tagged
    /// frame's first TPID (`EtherType::Vlan`, `EtherType::QinQ`). Ports that carry untagged
    /// traffic only read this one; [`EthernetFrame::ethertype`] skips tags.
    #[inline]
    pub fn ethertype_or_tpid(&self) -> EtherType {
        EtherType::from(get_u16(self.buffer.as_ref(), field::ETHERTYPE))
    }

    /// The EtherType of the payload, after any VLAN tags.
    pub fn ethertype(&self) -> EtherType {
        let off = self.ethertype_offset();
        EtherType::from(get_u16(self.buffer.as_ref(), off..off + 2))
    }

    /// The VLAN ID of the outermost tag, if the frame is tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        let b = self.buffer.as_ref();
        match b.get(HEADER_LEN..HEADER_LEN + 2) {
            Some(tci) if is_tag(get_u16(b, field::ETHERTYPE)) => Some(u16::from_be_bytes([tci[0], tci[1]]) & 0x0fff),
            _ => None,
        }
    }

    /// Header length including VLAN tags.
    pub fn header_len(&self) -> usize {
        self.ethertype_offset() + 2
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<'a> EthernetFrame<&'a [u8]> {
    /// The payload after the header (and any tags), borrowed for as long as the buffer.
    pub fn into_payload(self) -> &'a [u8] {
        let h = self.header_len();
        self.buffer.get(h..).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_addr(&mut self, a: MacAddr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.0);
    }
    pub fn set_src_addr(&mut self, a: MacAddr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.0);
    }
    /// Sets the EtherType of an untagged frame.
    pub fn set_ethertype(&mut self, t: EtherType) {
        set_u16(self.buffer.as_mut(), field::ETHERTYPE, t.into());
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.buffer.as_mut()[h..]
    }
}

/// An untagged Ethernet II header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetRepr {
    pub src: MacAddr,
    pub dst: MacAddr,
    pub ethertype: EtherType,
}

impl EthernetRepr {
    /// Parses the header; tags are skipped, so `ethertype` is the payload's type.
    pub fn parse<T: AsRef<[u8]>>(frame: &EthernetFrame<T>) -> Result<Self> {
        frame.check_len()?;
        Ok(EthernetRepr { src: frame.src_addr(), dst: frame.dst_addr(), ethertype: frame.ethertype() })
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes an untagged header at the start of `frame`'s buffer (which must hold 14 bytes).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut EthernetFrame<T>) {
        frame.set_dst_addr(self.dst);
        frame.set_src_addr(self.src);
        frame.set_ethertype(self.ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An ARP request as captured on a LAN: dst broadcast, src 52:54:00:12:34:56, type ARP.
    const UNTAGGED: [u8; 16] =
        [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06, 0x00, 0x01];
    // The same with an 802.1Q tag, VLAN 100, priority 0.
    const TAGGED: [u8; 20] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x81, 0x00, 0x00, 0x64, 0x08, 0x06,
        0x00, 0x01,
    ];

    #[test]
    fn deconstruct_untagged() {
        let f = EthernetFrame::new_checked(&UNTAGGED[..]).unwrap();
        assert_eq!(f.dst_addr(), MacAddr::BROADCAST);
        assert_eq!(f.src_addr(), MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]));
        assert_eq!(f.ethertype(), EtherType::Arp);
        assert_eq!(f.header_len(), 14);
        assert_eq!(f.vlan_id(), None);
        assert_eq!(f.payload(), &[0x00, 0x01]);
    }

    #[test]
    fn deconstruct_tagged_skips_the_tag() {
        let f = EthernetFrame::new_checked(&TAGGED[..]).unwrap();
        assert_eq!(f.ethertype(), EtherType::Arp);
        assert_eq!(f.header_len(), 18);
        assert_eq!(f.vlan_id(), Some(100));
        assert_eq!(f.payload(), &[0x00, 0x01]);
    }

    #[test]
    fn construct_matches_fixture() {
        let mut buf = [0u8; 16];
        buf[14..].copy_from_slice(&[0, 1]);
        let repr = EthernetRepr {
            dst: MacAddr::BROADCAST,
            src: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            ethertype: EtherType::Arp,
        };
        repr.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
        assert_eq!(buf, UNTAGGED);
    }

    #[test]
    fn truncated_tag_is_rejected_at_every_length() {
        for n in 0..TAGGED.len() {
            let r = EthernetFrame::new_checked(&TAGGED[..n]);
            if n < 18 {
                assert!(r.is_err(), "len {n}");
            } else {
                assert!(r.is_ok(), "len {n}");
            }
        }
    }

    #[test]
    fn mac_parse_and_display() {
        let m: MacAddr = "0a:58:0a:f4:00:01".parse().unwrap();
        assert_eq!(m.to_string(), "0a:58:0a:f4:00:01");
        assert!("0a:58:0a:f4:00".parse::<MacAddr>().is_err());
        assert!("0a:58:0a:f4:00:01:02".parse::<MacAddr>().is_err());
        assert!("zz:58:0a:f4:00:01".parse::<MacAddr>().is_err());
    }

    #[test]
    fn fixed_view_sees_the_tag_not_past_it() {
        let f = EthernetFrame::new_fixed(&TAGGED[..]).unwrap();
        assert_eq!(f.ethertype_or_tpid(), EtherType::Vlan);
        assert_eq!(f.vlan_id(), None); // the tag's TCI is out of view
        assert_eq!(EthernetFrame::new_checked(&TAGGED[..]).unwrap().ethertype_or_tpid(), EtherType::Vlan);
        assert_eq!(EthernetFrame::new_fixed(&UNTAGGED[..]).unwrap().ethertype_or_tpid(), EtherType::Arp);
        assert_eq!(EthernetFrame::new_fixed(&UNTAGGED[..13]).unwrap_err(), Error::Truncated);
    }
}
