//! ICMPv4 (RFC 792): echo, destination unreachable (with fragmentation-needed's next-hop MTU,
//! RFC 1191) and time exceeded, whose bodies quote the original datagram's header.

use super::{checksum, chunk, get_u16, set_u16, Error, Field, Ipv4Packet, Result};

mod field {
    use super::Field;
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: Field = 2..4;
    pub(super) const REST: Field = 4..8;
    pub(super) const ECHO_IDENT: Field = 4..6;
    pub(super) const ECHO_SEQ: Field = 6..8;
    pub(super) const NEXT_HOP_MTU: Field = 6..8;
}

pub const HEADER_LEN: usize = 8;
pub const TYPE_ECHO_REPLY: u8 = 0;
pub const TYPE_DST_UNREACHABLE: u8 = 3;
pub const TYPE_ECHO_REQUEST: u8 = 8;
pub const TYPE_TIME_EXCEEDED: u8 = 11;
/// Destination unreachable codes.
pub const CODE_PORT_UNREACHABLE: u8 = 3;
pub const CODE_FRAG_NEEDED: u8 = 4;
/// Time exceeded code: TTL reached zero in transit.
pub const CODE_TTL_EXCEEDED: u8 = 0;
/// How much of the original datagram past its IP header an ICMP error quotes (RFC 792).
pub const QUOTED_L4_LEN: usize = 8;

/// Whether an ICMP type is an error message (unreachable, source quench, redirect, time
/// exceeded, parameter problem) as opposed to a query.
pub const fn is_error_type(msg_type: u8) -> bool {
    matches!(msg_type, TYPE_DST_UNREACHABLE | 4 | 5 | TYPE_TIME_EXCEEDED | 12)
}

/// Whether the ICMP message starting at `msg` is an error message. Only the type byte is read,
/// so a message cut short still says what it is; an empty one is not an error.
#[inline]
pub fn starts_error_message(msg: &[u8]) -> bool {
    msg.first().is_some_and(|&t| is_error_type(t))
}

#[derive(Debug, Clone)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<'a> IcmpPacket<&'a [u8; HEADER_LEN]> {
    /// A view of the 8-byte header at the front of `bytes` (see the module contract).
    #[inline(always)]
    pub fn new_fixed(bytes: &'a [u8]) -> Result<Self> {
        chunk(bytes).map(Self::new_unchecked)
    }
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        IcmpPacket { buffer }
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
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }
    pub fn echo_ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::ECHO_IDENT)
    }
    pub fn echo_seq_no(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::ECHO_SEQ)
    }
    pub fn next_hop_mtu(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::NEXT_HOP_MTU)
    }
    pub fn rest_of_header(&self) -> u32 {
        super::get_u32(self.buffer.as_ref(), field::REST)
    }
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
    pub fn verify_checksum(&self) -> bool {
        checksum::verify(self.buffer.as_ref())
    }
    /// An error message (unreachable, time exceeded, ...) as opposed to a query.
    pub fn is_error(&self) -> bool {
        is_error_type(self.msg_type())
    }
    /// For an error message: the quoted original datagram's header (its payload is usually
    /// only the first 8 bytes of the original upper-layer header).
    pub fn embedded_ipv4(&self) -> Result<Ipv4Packet<&[u8]>> {
        if !self.is_error() {
            return Err(Error::Unsupported);
        }
        Ipv4Packet::new_checked_truncated(self.data())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    pub fn set_msg_type(&mut self, v: u8) {
        self.buffer.as_mut()[field::TYPE] = v;
    }
    pub fn set_msg_code(&mut self, v: u8) {
        self.buffer.as_mut()[field::CODE] = v;
    }
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }
    pub fn set_rest_of_header(&mut self, v: u32) {
        super::set_u32(self.buffer.as_mut(), field::REST, v);
    }
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(c);
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

/// The message kinds vxnat distinguishes; the rest are carried as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpMessage {
    EchoRequest {
        ident: u16,
        seq_no: u16,
    },
    EchoReply {
        ident: u16,
        seq_no: u16,
    },
    /// `next_hop_mtu` is meaningful for code 4 (fragmentation needed), zero otherwise.
    DstUnreachable {
        code: u8,
        next_hop_mtu: u16,
    },
    TimeExceeded {
        code: u8,
    },
    Other {
        msg_type: u8,
        code: u8,
        rest: u32,
    },
}

/// An ICMP message with its body: echo data, or the quoted original datagram for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpRepr<'a> {
    pub message: IcmpMessage,
    pub data: &'a [u8],
}

impl<'a> IcmpRepr<'a> {
    /// Parses and verifies the checksum. Error messages must quote at least a complete IPv4
    /// header.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(p: &'a IcmpPacket<&'a T>) -> Result<Self> {
        p.check_len()?;
        if !p.verify_checksum() {
            return Err(Error::Checksum);
        }
        let rest = p.rest_of_header();
        let message = match (p.msg_type(), p.msg_code()) {
            (TYPE_ECHO_REQUEST, 0) => IcmpMessage::EchoRequest { ident: p.echo_ident(), seq_no: p.echo_seq_no() },
            (TYPE_ECHO_REPLY, 0) => IcmpMessage::EchoReply { ident: p.echo_ident(), seq_no: p.echo_seq_no() },
            (TYPE_DST_UNREACHABLE, code) if code <= 15 && (rest >> 16) == 0 => {
                let mtu = if code == CODE_FRAG_NEEDED { p.next_hop_mtu() } else { 0 };
                if code != CODE_FRAG_NEEDED && rest != 0 {
                    return Err(Error::Malformed);
                }
                IcmpMessage::DstUnreachable { code, next_hop_mtu: mtu }
            }
            (TYPE_TIME_EXCEEDED, code @ 0..=1) if rest == 0 => IcmpMessage::TimeExceeded { code },
            (TYPE_DST_UNREACHABLE | TYPE_TIME_EXCEEDED | TYPE_ECHO_REQUEST | TYPE_ECHO_REPLY, _) => {
                return Err(Error::Malformed)
            }
            (msg_type, code) => IcmpMessage::Other { msg_type, code, rest },
        };
        if p.is_error() {
            p.embedded_ipv4()?;
        }
        Ok(IcmpRepr { message, data: &p.buffer.as_ref()[HEADER_LEN..] })
    }

    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// For error messages, the quoted original header.
    pub fn embedded(&self) -> Option<Ipv4Packet<&'a [u8]>> {
        match self.message {
            IcmpMessage::DstUnreachable { .. } | IcmpMessage::TimeExceeded { .. } => {
                Ipv4Packet::new_checked_truncated(self.data).ok()
            }
            _ => None,
        }
    }

    /// Writes the message into `p` (which holds exactly `buffer_len()` bytes) and its checksum.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut IcmpPacket<T>) {
        let (t, c, rest) = match self.message {
            IcmpMessage::EchoRequest { ident, seq_no } => {
                (TYPE_ECHO_REQUEST, 0, (u32::from(ident) << 16) | u32::from(seq_no))
            }
            IcmpMessage::EchoReply { ident, seq_no } => {
                (TYPE_ECHO_REPLY, 0, (u32::from(ident) << 16) | u32::from(seq_no))
            }
            IcmpMessage::DstUnreachable { code, next_hop_mtu } => (TYPE_DST_UNREACHABLE, code, u32::from(next_hop_mtu)),
            IcmpMessage::TimeExceeded { code } => (TYPE_TIME_EXCEEDED, code, 0),
            IcmpMessage::Other { msg_type, code, rest } => (msg_type, code, rest),
        };
        p.set_msg_type(t);
        p.set_msg_code(c);
        p.set_rest_of_header(rest);
        p.data_mut()[..self.data.len()].copy_from_slice(self.data);
        p.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    // `ping` echo request: ident 0x1234, seq 1, 8 bytes of data, with its checksum.
    const ECHO: [u8; 16] =
        [0x08, 0x00, 0x00, 0x00, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h'];

    fn echo() -> Vec<u8> {
        let mut b = ECHO.to_vec();
        let c = checksum::checksum(&b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn deconstruct_echo() {
        let b = echo();
        let p = IcmpPacket::new_checked(&b[..]).unwrap();
        let r = IcmpRepr::parse(&p).unwrap();
        assert_eq!(r.message, IcmpMessage::EchoRequest { ident: 0x1234, seq_no: 1 });
        assert_eq!(r.data, b"abcdefgh");
        assert!(r.embedded().is_none());
    }

    #[test]
    fn construct_echo() {
        let mut out = [0u8; 16];
        IcmpRepr { message: IcmpMessage::EchoRequest { ident: 0x1234, seq_no: 1 }, data: b"abcdefgh" }
            .emit(&mut IcmpPacket::new_unchecked(&mut out[..]));
        assert_eq!(out.to_vec(), echo());
    }

    #[test]
    fn frag_needed_quotes_the_original_header() {
        let mut orig = [0u8; 28];
        let hdr = super::super::Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 244, 0, 2),
            dst_addr: Ipv4Addr::new(10, 244, 1, 3),
            protocol: super::super::IpProtocol::Udp,
            payload_len: 1472,
            ttl: 63,
            dscp_ecn: 0,
            ident: 7,
            dont_frag: true,
            more_frags: false,
            frag_offset: 0,
        };
        hdr.emit(&mut Ipv4Packet::new_unchecked(&mut orig[..]));
        orig[20..28].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0x05, 0xc8, 0, 0]);
        let repr = IcmpRepr {
            message: IcmpMessage::DstUnreachable { code: CODE_FRAG_NEEDED, next_hop_mtu: 1450 },
            data: &orig,
        };
        let mut out = vec![0u8; repr.buffer_len()];
        repr.emit(&mut IcmpPacket::new_unchecked(&mut out[..]));
        let p = IcmpPacket::new_checked(&out[..]).unwrap();
        assert_eq!(p.next_hop_mtu(), 1450);
        let parsed = IcmpRepr::parse(&p).unwrap();
        assert_eq!(parsed, repr);
        let inner = parsed.embedded().unwrap();
        assert_eq!(inner.dst_addr(), Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(inner.total_len(), 1492);
        assert_eq!(inner.payload(), &orig[20..28]);
    }

    #[test]
    fn rejects_bad_checksum_and_short_quotes() {
        let mut b = echo();
        b[9] ^= 1;
        assert_eq!(IcmpRepr::parse(&IcmpPacket::new_checked(&b[..]).unwrap()), Err(Error::Checksum));
        // Time exceeded quoting only 10 bytes: not a complete IP header.
        let mut te = vec![11, 0, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6];
        let c = checksum::checksum(&te);
        te[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(IcmpRepr::parse(&IcmpPacket::new_checked(&te[..]).unwrap()), Err(Error::Truncated));
    }

    #[test]
    fn a_cut_short_message_still_says_whether_it_is_an_error() {
        assert!(starts_error_message(&[TYPE_TIME_EXCEEDED]));
        assert!(!starts_error_message(&[TYPE_ECHO_REQUEST, 0]));
        assert!(!starts_error_message(&[]));
        assert_eq!(IcmpPacket::new_fixed(&echo()[..]).unwrap().echo_ident(), 0x1234);
        assert_eq!(IcmpPacket::new_fixed(&echo()[..7]).unwrap_err(), Error::Truncated);
    }
}
