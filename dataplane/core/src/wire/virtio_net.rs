//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes, little-endian): what a packet
//! socket with `PACKET_VNET_HDR` or a TAP with `IFF_VNET_HDR` puts in front of a frame, so an
//! aggregated (GSO) frame crosses as one: "this is 64 KiB of TCP to be cut at `gso_size`, and
//! its checksum is to be finished from `csum_start`".
//!
//! Layout (`include/uapi/linux/virtio_net.h`): `u8 flags; u8 gso_type; le16 hdr_len, gso_size,
//! csum_start, csum_offset`. The kernel rejects a header that does not fit its frame
//! (`virtio_net_hdr_to_skb`: the checksum field must lie inside the frame, a GSO type must come
//! with a size); [`VirtioNetHdr::check`] applies the same rules to a header read from a socket
//! (hostile input), and [`VirtioNetHdr::emit`] writes one.

use super::{Error, Result};

/// Header length (no `num_buffers`: vxnat asks for the 10-byte form).
pub const LEN: usize = 10;

/// `flags`: the checksum is to be computed from `csum_start`, stored at `csum_start +
/// csum_offset` (the field holds the pseudo-header sum).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified (receive side).
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// Flag bit of `gso_type`: the segments carry ECN (CWR on the first).
pub const GSO_ECN: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Bytes of headers (Ethernet + IP + L4) repeated in every segment.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where the checksummed part starts, from the start of the frame.
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads a header from the first [`LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<VirtioNetHdr> {
        let b: &[u8; LEN] = b.get(..LEN).and_then(|b| b.try_into().ok()).ok_or(Error::Truncated)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into `b`.
    pub fn emit(&self, b: &mut [u8; LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// Whether the header is consistent with a frame of `frame_len` bytes, as the kernel
    /// judges one: a known GSO type (ECN bit aside) with a non-zero size, a checksum field
    /// inside the frame when `NEEDS_CSUM` is set, headers no longer than the frame. TCP GSO
    /// needs `NEEDS_CSUM` (the segments' checksums are computed from it).
    pub fn check(&self, frame_len: usize) -> Result<()> {
        let gso = self.gso_type & !GSO_ECN;
        if !matches!(gso, GSO_NONE | GSO_TCPV4 | GSO_UDP | GSO_TCPV6 | GSO_UDP_L4) {
            return Err(Error::Unsupported);
        }
        if self.flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
            return Err(Error::Malformed);
        }
        if usize::from(self.hdr_len) > frame_len {
            return Err(Error::BadLength);
        }
        if gso != GSO_NONE && (self.gso_size == 0 || self.flags & F_NEEDS_CSUM == 0) {
            return Err(Error::Malformed);
        }
        if self.flags & F_NEEDS_CSUM != 0 {
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(Error::BadLength);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCPv4 GSO frame: 66 bytes of headers (Ethernet, IPv4, TCP with timestamps), MSS 1398.
    const TCP: VirtioNetHdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 66,
        gso_size: 1398,
        csum_start: 34,
        csum_offset: 16,
    };

    #[test]
    fn parse_emit_round_trip_little_endian() {
        let h = TCP;
        let mut b = [0u8; LEN];
        h.emit(&mut b);
        assert_eq!(b, [1, 1, 66, 0, 0x76, 0x05, 34, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b), Ok(h));
        assert_eq!(h.check(66 + 10 * 1398), Ok(()));
    }

    #[test]
    fn inconsistent_headers_are_refused() {
        let ok = TCP;
        assert_eq!(VirtioNetHdr::parse(&[0; 9]), Err(Error::Truncated));
        assert_eq!(VirtioNetHdr { gso_type: 2, ..ok }.check(2000), Err(Error::Unsupported));
        assert_eq!(VirtioNetHdr { gso_type: GSO_TCPV4 | GSO_ECN, ..ok }.check(2000), Ok(()));
        assert_eq!(VirtioNetHdr { flags: 4, ..ok }.check(2000), Err(Error::Malformed));
        assert_eq!(VirtioNetHdr { gso_size: 0, ..ok }.check(2000), Err(Error::Malformed));
        assert_eq!(VirtioNetHdr { flags: 0, ..ok }.check(2000), Err(Error::Malformed), "TCP GSO without NEEDS_CSUM");
        assert_eq!(ok.check(51), Err(Error::BadLength), "checksum field past the end");
        assert_eq!(VirtioNetHdr { hdr_len: 3000, ..ok }.check(2000), Err(Error::BadLength));
        assert_eq!(VirtioNetHdr::default().check(0), Ok(()), "no offloads, empty frame");
    }

    #[test]
    fn any_bytes_parse_and_check_without_panicking() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b: [u8; 10] = core::array::from_fn(|i| (x >> ((i * 7) % 57)) as u8);
            let h = VirtioNetHdr::parse(&b).expect("10 bytes");
            let _ = h.check((x >> 48) as usize);
            let mut back = [0u8; LEN];
            h.emit(&mut back);
            assert_eq!(back, b);
        }
    }
}
