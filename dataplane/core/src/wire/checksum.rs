//! Internet checksum arithmetic (RFC 1071, RFC 1624) and CHECKSUM_PARTIAL completion.
//!
//! This module is arithmetic only; *when* to verify, complete or trust a checksum is policy and
//! lives with the ports. All values are in host order and represent big-endian 16-bit words
//! as they appear on the wire.
//!
//! Terms used throughout:
//! - a *sum* is the folded one's-complement sum of a run of 16-bit words (never complemented);
//! - a *checksum* is the complement of a sum, the value written into a header field.
//!
//! The data is summed eight bytes at a time in native byte order with end-around carry; the
//! one's-complement sum is byte-order independent (RFC 1071 §2(B)), so the folded native sum is
//! byte-swapped once at the end instead of swapping every word.

use core::net::Ipv4Addr;

/// Adds `w` to `acc` with end-around carry.
#[inline(always)]
fn add_carry(acc: u64, w: u64) -> u64 {
    let (s, carry) = acc.overflowing_add(w);
    // Cannot overflow: if the add carried, s < w <= u64::MAX.
    s + u64::from(carry)
}

/// Folds a 64-bit end-around-carry accumulator down to 16 bits.
#[inline(always)]
fn fold64(acc: u64) -> u16 {
    let a = (acc >> 32) + (acc & 0xffff_ffff); // <= 0x1_ffff_fffe
    let a = (a >> 32) + (a & 0xffff_ffff); // <= 0xffff_ffff
    let a = (a >> 16) + (a & 0xffff); // <= 0x1_fffe
    let a = (a >> 16) + (a & 0xffff); // <= 0xffff
    a as u16
}

#[inline(always)]
fn word_at<const N: usize>(chunk: &[u8]) -> [u8; N] {
    let mut w = [0u8; N];
    w.copy_from_slice(&chunk[..N]);
    w
}

/// Native-order accumulator over `data` (not yet folded or swapped).
#[inline]
fn accumulate(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut wide = data.chunks_exact(32);
    for c in &mut wide {
        // Four independent loads per iteration; the adds chain through carries but the loads
        // and the carry flag keep the loop at roughly one cycle per 8 bytes.
        acc = add_carry(acc, u64::from_ne_bytes(word_at::<8>(&c[0..8])));
        acc = add_carry(acc, u64::from_ne_bytes(word_at::<8>(&c[8..16])));
        acc = add_carry(acc, u64::from_ne_bytes(word_at::<8>(&c[16..24])));
        acc = add_carry(acc, u64::from_ne_bytes(word_at::<8>(&c[24..32])));
    }
    let mut rest = wide.remainder().chunks_exact(8);
    for c in &mut rest {
        acc = add_carry(acc, u64::from_ne_bytes(word_at::<8>(c)));
    }
    let mut tail = rest.remainder().chunks_exact(2);
    for c in &mut tail {
        acc = add_carry(acc, u64::from(u16::from_ne_bytes(word_at::<2>(c))));
    }
    if let [odd] = tail.remainder() {
        // A trailing odd byte is the high byte of a zero-padded big-endian word.
        acc = add_carry(acc, u64::from(u16::from_ne_bytes([*odd, 0])));
    }
    acc
}

/// The folded one's-complement sum of `data` (big-endian words, odd length zero-padded).
#[inline]
pub fn sum(data: &[u8]) -> u16 {
    u16::from_be(fold64(accumulate(data)))
}

/// The sum of an option-less IPv4 header: five 32-bit loads, no loop (the hot-path case).
#[inline]
pub fn sum_ipv4_header(h: &[u8; 20]) -> u16 {
    let w = |i: usize| u64::from(u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
    fold64(w(0) + w(4) + w(8) + w(12) + w(16))
}

/// One's-complement addition of two folded sums.
#[inline]
pub fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The checksum of `data`: the complement of its sum.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !sum(data)
}

/// The sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768) for an upper-layer packet of
/// `l4_len` bytes.
#[inline]
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u16) -> u16 {
    let s = u32::from(src);
    let d = u32::from(dst);
    let acc = u64::from(s >> 16)
        + u64::from(s & 0xffff)
        + u64::from(d >> 16)
        + u64::from(d & 0xffff)
        + u64::from(protocol)
        + u64::from(l4_len);
    fold64(acc)
}

/// Whether `data`, which contains its own checksum field, verifies.
///
/// A correct checksum makes the sum of everything (field included) 0xffff (negative zero).
#[inline]
pub fn verify(data: &[u8]) -> bool {
    sum(data) == 0xffff
}

/// Whether an upper-layer packet (TCP, UDP or ICMP-less protocols using the pseudo-header)
/// verifies against its pseudo-header.
#[inline]
pub fn verify_l4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> bool {
    match u16::try_from(l4.len()) {
        Ok(len) => add(pseudo_header_sum(src, dst, protocol, len), sum(l4)) == 0xffff,
        Err(_) => false,
    }
}

/// The checksum to write into an upper-layer header whose checksum field is currently zero.
#[inline]
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> u16 {
    let len = u16::try_from(l4.len()).unwrap_or(u16::MAX);
    !add(pseudo_header_sum(src, dst, protocol, len), sum(l4))
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changed from
/// `old` to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline]
pub fn update16(checksum: u16, old: u16, new: u16) -> u16 {
    !add(add(!checksum, !old), new)
}

/// RFC 1624 update for a 32-bit field (an IPv4 address) that changed from `old` to `new`.
#[inline]
pub fn update32(checksum: u16, old: u32, new: u32) -> u16 {
    let hc = add(add(!checksum, !(old >> 16) as u16), !(old as u16));
    !add(add(hc, (new >> 16) as u16), new as u16)
}

/// The kind of checksum an upper-layer field holds, as seen when a frame arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4ChecksumState {
    /// The checksum verifies.
    Valid,
    /// The field holds only the pseudo-header sum: the sender used CHECKSUM_PARTIAL and left
    /// the rest to an offload (what AF_XDP on a veth delivers).
    Partial,
    /// Neither: the checksum is wrong.
    Invalid,
}

/// Classifies the checksum in `l4[field]` (the two bytes at `field`).
///
/// A field equal to the pseudo-header sum (or its alternate zero form) that does not verify
/// is a pseudo-header-only checksum; anything else that does not verify is invalid.
#[inline]
pub fn classify_l4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8], field: usize) -> L4ChecksumState {
    let Ok(len) = u16::try_from(l4.len()) else {
        return L4ChecksumState::Invalid;
    };
    let Some(bytes) = l4.get(field..field + 2) else {
        return L4ChecksumState::Invalid;
    };
    let pseudo = pseudo_header_sum(src, dst, protocol, len);
    if add(pseudo, sum(l4)) == 0xffff {
        return L4ChecksumState::Valid;
    }
    let stored = u16::from_be_bytes([bytes[0], bytes[1]]);
    // 0x0000 and 0xffff are both zero in one's-complement arithmetic.
    if stored == pseudo || (stored == 0 && pseudo == 0xffff) || (stored == 0xffff && pseudo == 0) {
        L4ChecksumState::Partial
    } else {
        L4ChecksumState::Invalid
    }
}

/// Completes a CHECKSUM_PARTIAL upper-layer packet in place: the field at `field` holds the
/// pseudo-header sum and the data has not been summed yet; this does what the offload would
/// have done (sum from the start of the L4 header, field included, complement, store).
///
/// For UDP a computed zero is sent as 0xffff (RFC 768: zero means "no checksum").
/// Returns `false` (and changes nothing) when `field` is out of range.
#[inline]
pub fn complete_partial(l4: &mut [u8], field: usize, is_udp: bool) -> bool {
    if l4.len() < field + 2 {
        return false;
    }
    let mut c = checksum(l4);
    if is_udp && c == 0 {
        c = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// [`classify_l4`] and, for a partial checksum, [`complete_partial`], in one pass over the
/// data: the field already holds the pseudo-header sum, so the sum of the segment as it
/// stands both tells "valid" from "partial" and, complemented, is the completed checksum.
/// Returns the state found (the field is rewritten only when it was `Partial`).
#[inline]
pub fn complete_if_partial(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    l4: &mut [u8],
    field: usize,
    is_udp: bool,
) -> L4ChecksumState {
    let Ok(len) = u16::try_from(l4.len()) else {
        return L4ChecksumState::Invalid;
    };
    let Some(bytes) = l4.get(field..field + 2) else {
        return L4ChecksumState::Invalid;
    };
    let stored = u16::from_be_bytes([bytes[0], bytes[1]]);
    let pseudo = pseudo_header_sum(src, dst, protocol, len);
    let data_sum = sum(l4);
    if add(pseudo, data_sum) == 0xffff {
        return L4ChecksumState::Valid;
    }
    if stored != pseudo && !(stored == 0 && pseudo == 0xffff) && !(stored == 0xffff && pseudo == 0) {
        return L4ChecksumState::Invalid;
    }
    let mut c = !data_sum;
    if is_udp && c == 0 {
        c = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
    L4ChecksumState::Partial
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-at-a-time reference, as RFC 1071 writes it.
    fn naive_sum(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let w =
                if pair.len() == 2 { u16::from_be_bytes([pair[0], pair[1]]) } else { u16::from_be_bytes([pair[0], 0]) };
            acc += u32::from(w);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn ipv4_header_checksum_of_a_known_header() {
        // The classic example header: 192.168.0.1 -> 192.168.0.199, UDP, checksum 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert!(verify(&hdr));
        hdr[10] = 0;
        hdr[11] = 0;
        assert_eq!(checksum(&hdr), 0xb861);
    }

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071 §3 worked example: bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
        assert_eq!(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    }

    #[test]
    fn wide_sum_matches_bytewise_reference_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..2100u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for start in 0..9 {
            for len in 0..300 {
                let d = &data[start..start + len];
                assert_eq!(sum(d), naive_sum(d), "start {start} len {len}");
            }
        }
        assert_eq!(sum(&data), naive_sum(&data));
        let ff = vec![0xffu8; 4001];
        assert_eq!(sum(&ff), naive_sum(&ff));
    }

    #[test]
    fn incremental_update_of_an_address_matches_recomputation() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        let old = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        let new = u32::from(Ipv4Addr::new(10, 244, 1, 7));
        hdr[12..16].copy_from_slice(&new.to_be_bytes());
        let updated = update32(0xb861, old, new);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&hdr));
    }

    #[test]
    fn partial_checksum_is_detected_and_completed() {
        let src = Ipv4Addr::new(10, 244, 0, 2);
        let dst = Ipv4Addr::new(10, 244, 1, 3);
        // UDP 40000 -> 53, 12 bytes of payload.
        let mut udp = vec![0x9c, 0x40, 0x00, 0x35, 0x00, 0x14, 0x00, 0x00];
        udp.extend_from_slice(b"hello, world");
        let pseudo = pseudo_header_sum(src, dst, 17, udp.len() as u16);
        udp[6..8].copy_from_slice(&pseudo.to_be_bytes());
        assert_eq!(classify_l4(src, dst, 17, &udp, 6), L4ChecksumState::Partial);
        assert!(complete_partial(&mut udp, 6, true));
        assert!(verify_l4(src, dst, 17, &udp));
        assert_eq!(classify_l4(src, dst, 17, &udp, 6), L4ChecksumState::Valid);
        udp[9] ^= 1;
        assert_eq!(classify_l4(src, dst, 17, &udp, 6), L4ChecksumState::Invalid);
    }

    #[test]
    fn one_pass_completion_matches_the_two_step_one() {
        let src = Ipv4Addr::new(10, 244, 0, 2);
        let dst = Ipv4Addr::new(10, 244, 1, 3);
        for len in [0usize, 1, 7, 100, 1401] {
            let mut tcp = vec![0u8; 20 + len];
            for (i, b) in tcp.iter_mut().enumerate() {
                *b = (i * 7 + len) as u8;
            }
            let pseudo = pseudo_header_sum(src, dst, 6, tcp.len() as u16);
            tcp[16..18].copy_from_slice(&pseudo.to_be_bytes());
            let mut two_step = tcp.clone();
            assert_eq!(classify_l4(src, dst, 6, &two_step, 16), L4ChecksumState::Partial);
            complete_partial(&mut two_step, 16, false);
            assert_eq!(complete_if_partial(src, dst, 6, &mut tcp, 16, false), L4ChecksumState::Partial);
            assert_eq!(tcp, two_step);
            assert_eq!(complete_if_partial(src, dst, 6, &mut tcp, 16, false), L4ChecksumState::Valid);
            tcp[5] ^= 0x10;
            assert_eq!(complete_if_partial(src, dst, 6, &mut tcp, 16, false), L4ChecksumState::Invalid);
        }
    }
}
