//! Zero-copy typed views of the headers vxnat handles, in the style of smoltcp's `wire`.
//!
//! Contract: each `*Packet<T>` wraps a byte buffer. `new_unchecked` does no checking;
//! `new_checked` validates lengths once, and after it succeeds **no accessor panics**, whatever
//! the bytes say. Untrusted input always goes through `new_checked`. Each header also has a
//! small `*Repr` with `parse` (validating semantics) and `emit`, and `buffer_len`.
//!
//! Field byte ranges are constants in a private `field` module per header; multi-byte fields
//! are big-endian on the wire.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod tcp;
pub mod udp;
pub mod vxlan;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{EtherType, EthernetFrame, EthernetRepr, MacAddr};
pub use icmp::{IcmpMessage, IcmpPacket, IcmpRepr};
pub use ipv4::{IpProtocol, Ipv4Cidr, Ipv4Packet, Ipv4Repr};
pub use tcp::{TcpFlags, TcpOption, TcpPacket, TcpRepr};
pub use udp::{UdpPacket, UdpRepr};
pub use vxlan::{VxlanPacket, VxlanRepr};

/// A byte range within a header.
pub(crate) type Field = core::ops::Range<usize>;

/// Why a buffer could not be viewed or parsed as a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer is shorter than the header (or than a length field inside it claims).
    Truncated,
    /// A length field is inconsistent (IHL below minimum, total length below header length,
    /// TCP data offset below 5, UDP length below 8, ...).
    BadLength,
    /// A field holds a value the format does not allow (IP version, ARP hardware type, ...).
    Malformed,
    /// A checksum does not verify.
    Checksum,
    /// Well-formed but not something vxnat handles (an unknown ICMP type in a typed parse).
    Unsupported,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Truncated => "buffer truncated",
            Error::BadLength => "inconsistent length field",
            Error::Malformed => "malformed header field",
            Error::Checksum => "checksum does not verify",
            Error::Unsupported => "unsupported header",
        })
    }
}

impl std::error::Error for Error {}

pub type Result<T> = core::result::Result<T, Error>;

#[inline(always)]
pub(crate) fn get_u16(b: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([b[f.start], b[f.start + 1]])
}

#[inline(always)]
pub(crate) fn get_u32(b: &[u8], f: Field) -> u32 {
    u32::from_be_bytes([b[f.start], b[f.start + 1], b[f.start + 2], b[f.start + 3]])
}

#[inline(always)]
pub(crate) fn set_u16(b: &mut [u8], f: Field, v: u16) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub(crate) fn set_u32(b: &mut [u8], f: Field, v: u32) {
    b[f].copy_from_slice(&v.to_be_bytes());
}
