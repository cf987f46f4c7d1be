//! Zero-copy typed views of the headers vxnat handles, in the style of smoltcp's `wire`: the
//! only place in the crate (and in the control plane's packet summaries) that knows where a
//! field sits in a header. Stages, segmentation, the filter and the observers read and write
//! packets through these views and never index header bytes themselves.
//!
//! Contract: each `*Packet<T>` wraps a byte buffer. There are three ways to build one:
//! - `new_checked(buffer)` validates the lengths once (header present, length fields consistent
//!   with each other and the buffer); untrusted input always goes through it (or `new_fixed`).
//! - `new_fixed(bytes)` (and `new_fixed_mut`) views only the fixed part of the header, a
//!   `&[u8; N]` chunk taken from the front of `bytes` (`Error::Truncated` when it is shorter).
//!   With the length a constant, every field read compiles to a plain load with no bounds check
//!   left: this is the hot path's speed trick, kept here rather than in the stages. Only the
//!   fixed part is in view: options and payload read as empty, and a checksum over a header
//!   longer than the chunk does not verify.
//! - `new_unchecked(buffer)` does no checking, for buffers a caller has already validated or
//!   is building.
//!
//! After `new_checked` or `new_fixed` succeeds **no accessor panics**, whatever the bytes say
//! (length-dependent accessors see only the bytes in view). Each header also has a small
//! `*Repr` with `parse` (validating semantics), `emit` and `buffer_len`. [`frame`] walks whole
//! frames for the tools (the IPv4 packet of a frame, the inner frame of VXLAN) and
//! [`PrettyPrinter`] prints one in a line.
//!
//! Field byte ranges are constants in a private `field` module per header; multi-byte fields
//! are big-endian on the wire.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod frame;
pub mod icmp;
pub mod ipv4;
pub mod pretty;
pub mod tcp;
pub mod udp;
pub mod virtio_net;
pub mod vxlan;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{EtherType, EthernetFrame, EthernetRepr, MacAddr};
pub use icmp::{IcmpMessage, IcmpPacket, IcmpRepr};
pub use ipv4::{IpProtocol, Ipv4Cidr, Ipv4Packet, Ipv4Repr};
pub use pretty::PrettyPrinter;
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

/// The first `N` bytes of `b` as a fixed-size chunk (what `new_fixed` views).
#[inline(always)]
pub(crate) fn chunk<const N: usize>(b: &[u8]) -> Result<&[u8; N]> {
    b.first_chunk().ok_or(Error::Truncated)
}

/// The first `N` bytes of `b` as a mutable fixed-size chunk (what `new_fixed_mut` views).
#[inline(always)]
pub(crate) fn chunk_mut<const N: usize>(b: &mut [u8]) -> Result<&mut [u8; N]> {
    b.first_chunk_mut().ok_or(Error::Truncated)
}

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
