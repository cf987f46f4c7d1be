//! Per-flow TCP sequence-number and timestamp offsets, so a SNAT tuple can be reused while the
//! backend may still hold it in TIME_WAIT.
//!
//! Why: when the SNAT allocator hands out a (SNAT address, SNAT port, backend address, backend
//! port) tuple that an earlier connection used, the backend may still have that tuple in
//! TIME_WAIT. Linux's `tcp_timewait_state_process` accepts a new SYN on a TIME_WAIT socket
//! (RFC 6191) only if it passes PAWS and is newer than the old connection: its sequence number
//! is after the old `rcv_nxt`, or it carries a timestamp whose TSval is after the old
//! `ts_recent`. Otherwise the backend answers with a bare ACK (the client then resets, and the
//! connection fails). The client's ISN and timestamp clock are its own and may well be "older",
//! so the NAT shifts the new flow's client-side sequence space and TSval clock by constants
//! chosen when the flow is created (like netfilter's `nf_conntrack_seqadj`, but with one
//! constant offset for the flow's whole life rather than a before/after pair around a rewrite
//! point: vxnat never changes payload lengths).
//!
//! What is translated ([`SeqAdj`], wrapping arithmetic mod 2^32):
//! - client -> backend ([`SeqAdj::to_backend`], the flow's original direction): the sequence
//!   number `+= seq`, every Timestamps option's TSval `+= ts`. The ACK number, SACK blocks and
//!   TSecr refer to the backend's own sequence space and clock and are left alone.
//! - backend -> client ([`SeqAdj::to_client`], the reply direction): the ACK number `-= seq`
//!   (only when the ACK flag is set; otherwise the field carries no meaning and is left as
//!   is), every SACK block edge (option kind 5) `-= seq`, every Timestamps option's TSecr
//!   `-= ts`. The sequence number and TSval are the backend's own and are left alone.
//!
//! Options are walked up to end-of-list; bytes after an end-of-list option are padding and are
//! not looked at. A segment with more than one Timestamps or SACK option has each of them
//! translated (Linux uses the last one). [`tsval`] reads the TSval a segment carries, for
//! recording the last one the backend saw: read it after [`SeqAdj::to_backend`], so that it is
//! on the backend's clock.
//!
//! ICMP errors quote a segment as it travelled, translated: an error about a client -> backend
//! segment quotes the backend's view of its sequence number, and Linux's `tcp_v4_err` ignores
//! errors whose quoted sequence number is not between `snd_una` and `snd_nxt` (a reused flow's
//! path MTU discovery would stall). [`SeqAdj::restore_quote_from_client`] and
//! [`SeqAdj::restore_quote_from_backend`] give a quote back the numbers its sender used: the
//! whole header when the quote holds it (Linux quotes up to 576 bytes), otherwise the fields
//! that are there (RFC 792 requires 8 bytes: the ports and the sequence number).
//!
//! Checksums: the TCP checksum is updated incrementally (RFC 1624: one update for the sums of
//! the changed 16-bit words; fields in options that sit at odd offsets are accounted for). The
//! checksum field must hold a full checksum (valid or not: a wrong one stays exactly as
//! wrong). This mirrors the pipeline's address/port rewrite: CHECKSUM_PARTIAL segments
//! (pseudo-header sum only) are completed at validation, before Service NAT, under the
//! `Complete` and `Verify` port policies. Under the `Trust` policy a pseudo-header-only field
//! would be updated as if it were a full checksum and leave wrong (as the address/port rewrite
//! already does); for such a field the right thing would be to leave it alone, since none of
//! the fields translated here are in the pseudo-header.
//!
//! Malformed input: the header must be at least 20 bytes, its data offset at least 5 and no
//! longer than the buffer, and every option up to end-of-list well formed (a length of at
//! least 2 that fits the header; MSS, window scale, SACK-permitted, SACK and Timestamps of a
//! length their kind allows, as [`TcpOption::parse`] checks). Anything else is an error and
//! the segment is left unchanged: it is validated in full before the first byte is written.
//! (Linux's receiver skips options of a wrong length instead, but forwarding such a segment
//! untranslated would put an out-of-window number in front of the peer; the caller drops it.)
//! Nothing here panics, whatever the bytes. [`SeqAdj::NONE`] returns at once without looking
//! at the segment, malformed or not.

use crate::wire::checksum;
use crate::wire::tcp::{self, HEADER_LEN};
use crate::wire::{TcpFlags, TcpOption, TcpPacket};

/// Constant offsets applied to one flow: `seq` to the client's sequence numbers and `ts` to its
/// TSval, as seen by the backend. Wrapping arithmetic (mod 2^32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqAdj {
    pub seq: u32,
    pub ts: u32,
}

/// Why a segment could not be translated (it is left unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqAdjError {
    /// Shorter than the fixed header, or the data offset reaches past the buffer.
    Truncated,
    /// The data offset is below 5.
    BadHeaderLen,
    /// An option is cut short or has a length its kind does not allow.
    BadOption,
}

impl core::fmt::Display for SeqAdjError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SeqAdjError::Truncated => "TCP header truncated",
            SeqAdjError::BadHeaderLen => "TCP data offset below 5",
            SeqAdjError::BadOption => "malformed TCP option",
        })
    }
}

impl std::error::Error for SeqAdjError {}

/// At most this many 32-bit fields fit in 40 bytes of options.
const MAX_EDITS: usize = 10;

/// The 32-bit option fields to shift, found while validating: offsets from the start of the
/// options and the amount to add to each.
#[derive(Debug)]
struct Edits {
    n: usize,
    at: [u8; MAX_EDITS],
    delta: [u32; MAX_EDITS],
}

impl Edits {
    #[inline(always)]
    fn push(&mut self, at: usize, delta: u32) {
        // Fields never overlap and the options are at most 40 bytes, so this always fits.
        if let (Some(a), Some(d)) = (self.at.get_mut(self.n), self.delta.get_mut(self.n)) {
            *a = at as u8;
            *d = delta;
            self.n += 1;
        }
    }
}

/// Which way a segment travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    ToBackend,
    ToClient,
}

impl SeqAdj {
    /// No offsets: the flow needs no translation.
    pub const NONE: SeqAdj = SeqAdj { seq: 0, ts: 0 };

    /// Whether both offsets are zero.
    #[inline(always)]
    pub fn is_none(&self) -> bool {
        self.seq == 0 && self.ts == 0
    }

    /// The offsets that undo these ones.
    #[inline]
    pub fn inverse(&self) -> SeqAdj {
        SeqAdj { seq: self.seq.wrapping_neg(), ts: self.ts.wrapping_neg() }
    }

    /// Client -> backend (the flow's original direction), on a TCP segment `tcp` (header and
    /// payload, with a full checksum): seq `+= self.seq`; every Timestamps option's TSval
    /// `+= self.ts`. The checksum is updated incrementally. The ACK number, SACK blocks and
    /// TSecr are left alone (they refer to the backend's own sequence space and clock).
    ///
    /// On error the segment is unchanged. [`SeqAdj::NONE`] returns at once.
    #[inline]
    pub fn to_backend(&self, tcp: &mut [u8]) -> Result<(), SeqAdjError> {
        if self.is_none() {
            return Ok(());
        }
        self.apply(tcp, Way::ToBackend)
    }

    /// Backend -> client (the reply direction): ack `-= self.seq` (only when the ACK flag is
    /// set); every SACK block edge (option kind 5) `-= self.seq`; every Timestamps option's
    /// TSecr `-= self.ts`. The checksum is updated incrementally.
    ///
    /// On error the segment is unchanged. [`SeqAdj::NONE`] returns at once.
    #[inline]
    pub fn to_client(&self, tcp: &mut [u8]) -> Result<(), SeqAdjError> {
        if self.is_none() {
            return Ok(());
        }
        self.apply(tcp, Way::ToClient)
    }

    /// An ICMP error's quote of a segment the client sent (translated by
    /// [`SeqAdj::to_backend`]), made what the client sent again: the sequence number and
    /// TSval shifted back. A quote that ends inside the header or its options has only its
    /// sequence number restored (the part every quote holds; the one `tcp_v4_err` checks), and
    /// its TCP checksum, when quoted, updated to match. A quote under 8 bytes is left alone.
    pub fn restore_quote_from_client(&self, quote: &mut [u8]) {
        if self.is_none() || self.inverse().to_backend(quote).is_ok() {
            return;
        }
        shift_quoted(quote, tcp::SEQ_OFFSET, self.seq.wrapping_neg());
    }

    /// An ICMP error's quote of a segment the backend sent (translated by
    /// [`SeqAdj::to_client`]), made what the backend sent again: the ACK number, SACK edges
    /// and TSecr shifted back. A quote that ends inside the header or its options has only its
    /// ACK number restored, when the quote reaches the flags that say it is one.
    pub fn restore_quote_from_backend(&self, quote: &mut [u8]) {
        if self.is_none() || self.inverse().to_client(quote).is_ok() {
            return;
        }
        let ack = quote.get(tcp::FLAGS_BYTE_OFFSET).is_some_and(|&f| f & TcpFlags::ACK.0 as u8 != 0);
        if ack {
            shift_quoted(quote, tcp::ACK_OFFSET, self.seq);
        }
    }

    fn apply(&self, tcp: &mut [u8], way: Way) -> Result<(), SeqAdjError> {
        // Validate everything (and find the option fields) before the first write.
        let mut edits = Edits { n: 0, at: [0; MAX_EDITS], delta: [0; MAX_EDITS] };
        let flags = {
            let t = checked(tcp)?;
            let (ts_at, ts_delta, sack_delta) = match way {
                // TSval is the first half of the option's data, TSecr the second.
                Way::ToBackend => (2, self.ts, 0),
                Way::ToClient => (6, self.ts.wrapping_neg(), self.seq.wrapping_neg()),
            };
            let opts = t.options_bytes();
            // What Linux sends on every segment of an established flow without SACK blocks:
            // NOP, NOP, Timestamps and nothing else (the walk would find just the same).
            if let [1, 1, 8, 10, _, _, _, _, _, _, _, _] = opts {
                if ts_delta != 0 {
                    edits.push(2 + ts_at, ts_delta);
                }
            } else {
                walk(opts, |at, opt| match opt {
                    TcpOption::Timestamps { .. } if ts_delta != 0 => edits.push(at + ts_at, ts_delta),
                    TcpOption::SackRange(edges) if sack_delta != 0 => {
                        for i in (0..edges.len()).step_by(4) {
                            edits.push(at + 2 + i, sack_delta);
                        }
                    }
                    _ => {}
                })?;
            }
            t.flags()
        };
        let (fixed, opts) = tcp.split_at_mut_checked(HEADER_LEN).ok_or(SeqAdjError::Truncated)?;
        let mut t = TcpPacket::new_fixed_mut(fixed).map_err(|_| SeqAdjError::Truncated)?;
        // Nothing fails from here on.
        let mut sums = Sums::default();
        match way {
            Way::ToBackend if self.seq != 0 => {
                let (old, new) = shifted(t.seq_number(), self.seq);
                sums.add(old, new);
                t.set_seq_number(new);
            }
            Way::ToClient if self.seq != 0 && flags.contains(TcpFlags::ACK) => {
                let (old, new) = shifted(t.ack_number(), self.seq.wrapping_neg());
                sums.add(old, new);
                t.set_ack_number(new);
            }
            _ => {}
        }
        for (&at, &delta) in edits.at.iter().zip(edits.delta.iter()).take(edits.n) {
            let at = usize::from(at);
            let Some(field) = opts.get_mut(at..at + 4).and_then(|f| <&mut [u8; 4]>::try_from(f).ok()) else {
                continue;
            };
            let (old, new) = shifted(u32::from_be_bytes(*field), delta);
            // The options start at an even offset (20); a field at an odd one straddles three
            // 16-bit words, and its bytes add up as its byte-swapped value does (RFC 1071 §2(B)).
            if at % 2 == 0 {
                sums.add(old, new);
            } else {
                sums.add(old.swap_bytes(), new.swap_bytes());
            }
            *field = new.to_be_bytes();
        }
        t.set_checksum(sums.update(t.checksum()));
        Ok(())
    }
}

/// The sums of the 16-bit words that changed, before and after: one RFC 1624 update for all
/// the fields (`HC' = ~(~HC + ~m + m')` with `m` and `m'` the sums of the old and new words)
/// instead of one per field, which would chain a fold per word.
#[derive(Debug, Default)]
struct Sums {
    old: u64,
    new: u64,
}

impl Sums {
    /// A 32-bit field (as two 16-bit words) went from `old` to `new`.
    #[inline(always)]
    fn add(&mut self, old: u32, new: u32) {
        self.old += u64::from(old >> 16) + u64::from(old & 0xffff);
        self.new += u64::from(new >> 16) + u64::from(new & 0xffff);
    }

    /// The checksum `c` updated for every change added.
    #[inline(always)]
    fn update(&self, c: u16) -> u16 {
        checksum::update16(c, fold(self.old), fold(self.new))
    }
}

/// Folds a sum of fewer than 2^16 16-bit words (here at most 22) to 16 bits, end-around carry.
#[inline(always)]
fn fold(x: u64) -> u16 {
    let x = (x >> 16) + (x & 0xffff); // <= 0x1_fffe for x < 2^32
    let x = (x >> 16) + (x & 0xffff); // <= 0xffff
    x as u16
}

#[inline(always)]
fn shifted(old: u32, delta: u32) -> (u32, u32) {
    (old, old.wrapping_add(delta))
}

/// Adds `delta` to the 32-bit field at `at` of a (possibly truncated) quoted TCP header, and
/// updates the quoted checksum when the quote reaches it. Nothing when the field is not there.
fn shift_quoted(quote: &mut [u8], at: usize, delta: u32) {
    let Some(field) = quote.get_mut(at..at + 4).and_then(|f| <&mut [u8; 4]>::try_from(f).ok()) else { return };
    let (old, new) = shifted(u32::from_be_bytes(*field), delta);
    *field = new.to_be_bytes();
    if let Some(c) = quote.get_mut(tcp::CHECKSUM_OFFSET..tcp::CHECKSUM_OFFSET + 2) {
        let mut sums = Sums::default();
        sums.add(old, new);
        let updated = sums.update(u16::from_be_bytes([c[0], c[1]]));
        c.copy_from_slice(&updated.to_be_bytes());
    }
}

/// A view of the segment with its header length checked (20 <= data offset * 4 <= length).
#[inline(always)]
fn checked(tcp: &[u8]) -> Result<TcpPacket<&[u8]>, SeqAdjError> {
    TcpPacket::new_checked(tcp).map_err(|e| match e {
        crate::wire::Error::BadLength => SeqAdjError::BadHeaderLen,
        _ => SeqAdjError::Truncated,
    })
}

/// Walks the options up to end-of-list, calling `f` with each option's offset from the start
/// of the options; fails at the first malformed one.
#[inline(always)]
fn walk<'a>(opts: &'a [u8], mut f: impl FnMut(usize, TcpOption<'a>)) -> Result<(), SeqAdjError> {
    let mut rest = opts;
    while let Some(&kind) = rest.first() {
        let at = opts.len() - rest.len();
        if kind == 1 {
            // No-operation, half the options Linux sends: skipped here without a parse call.
            rest = rest.get(1..).unwrap_or_default();
            continue;
        }
        let (opt, next) = TcpOption::parse(rest).map_err(|_| SeqAdjError::BadOption)?;
        if opt == TcpOption::EndOfList {
            break;
        }
        f(at, opt);
        rest = next;
    }
    Ok(())
}

/// The TSval of a segment's Timestamps option (the last one, as Linux reads it), if any: for
/// recording the last one a backend saw. `None` also when the header or its options are
/// malformed (such a segment is not translated either).
pub fn tsval(tcp: &[u8]) -> Option<u32> {
    let t = checked(tcp).ok()?;
    let mut found = None;
    walk(t.options_bytes(), |_, opt| {
        if let TcpOption::Timestamps { tsval, .. } = opt {
            found = Some(tsval);
        }
    })
    .ok()?;
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::verify_l4;
    use core::net::Ipv4Addr;
    use etherparse::{TcpHeader, TcpOptionElement};

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

    /// xorshift64*: deterministic pseudo-random numbers for the randomized cases.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn u32(&mut self) -> u32 {
            (self.next() >> 32) as u32
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() >> 33) as usize % n
        }
        /// Mostly random, often next to the wrap-around point.
        fn edgy(&mut self) -> u32 {
            match self.below(4) {
                0 => 0xffff_ff00 | (self.u32() & 0xff),
                1 => self.u32() & 0xff,
                _ => self.u32(),
            }
        }
    }

    /// The fields a test segment is built from.
    #[derive(Debug, Clone)]
    struct Seg {
        seq: u32,
        ack: u32,
        ack_flag: bool,
        syn: bool,
        opts: Vec<TcpOptionElement>,
        payload: Vec<u8>,
    }

    impl Seg {
        /// The segment as bytes, with a full checksum, built by etherparse.
        fn bytes(&self) -> Vec<u8> {
            let mut h = TcpHeader::new(41000, 8080, self.seq, 64240);
            h.acknowledgment_number = self.ack;
            h.ack = self.ack_flag;
            h.syn = self.syn;
            h.psh = !self.payload.is_empty();
            h.set_options(&self.opts).expect("options fit");
            h.checksum = h.calc_checksum_ipv4_raw(SRC.octets(), DST.octets(), &self.payload).expect("small");
            let mut b = h.to_bytes().to_vec();
            b.extend_from_slice(&self.payload);
            assert!(verify_l4(SRC, DST, 6, &b));
            b
        }

        /// The same segment with `f` applied to each option.
        fn map_opts(&self, f: impl Fn(&TcpOptionElement) -> TcpOptionElement) -> Seg {
            Seg { opts: self.opts.iter().map(f).collect(), ..self.clone() }
        }
    }

    fn random_seg(r: &mut Rng) -> Seg {
        use TcpOptionElement::*;
        let ts = Timestamp(r.edgy(), r.edgy());
        let sack = |r: &mut Rng, n: usize| {
            let mut more = [None; 3];
            for m in more.iter_mut().take(n - 1) {
                *m = Some((r.edgy(), r.edgy()));
            }
            SelectiveAcknowledgement((r.edgy(), r.edgy()), more)
        };
        let opts = match r.below(7) {
            0 => vec![],
            1 => vec![Noop, Noop, ts],
            2 => vec![Noop, Noop, ts, Noop, Noop, sack(r, 1)],
            3 => vec![Noop, Noop, ts, Noop, Noop, sack(r, 2)],
            4 => vec![Noop, Noop, ts, Noop, Noop, sack(r, 3)],
            5 => vec![Noop, Noop, sack(r, 4)],
            _ => vec![MaximumSegmentSize(1410), SelectiveAcknowledgementPermitted, ts, Noop, WindowScale(7)],
        };
        let syn = r.below(6) == 0;
        let payload: Vec<u8> = (0..r.below(80)).map(|_| r.next() as u8).collect();
        Seg { seq: r.edgy(), ack: r.edgy(), ack_flag: r.below(5) != 0, syn, opts, payload }
    }

    fn random_adj(r: &mut Rng) -> SeqAdj {
        match r.below(5) {
            0 => SeqAdj { seq: r.edgy(), ts: 0 },
            1 => SeqAdj { seq: 0, ts: r.edgy() },
            _ => SeqAdj { seq: r.edgy(), ts: r.edgy() },
        }
    }

    /// Equal, where the checksums may differ only as the two forms of one's-complement zero
    /// (and the translated one verifies).
    fn assert_same_segment(got: &[u8], want: &[u8], what: &str) {
        assert!(verify_l4(SRC, DST, 6, got), "{what}: checksum does not verify");
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            if !(16..18).contains(&i) {
                assert_eq!(g, w, "{what}: byte {i} differs\n got {got:02x?}\nwant {want:02x?}");
            }
        }
        let (g, w) = (u16::from_be_bytes([got[16], got[17]]), u16::from_be_bytes([want[16], want[17]]));
        assert!(g == w || (g, w) == (0, 0xffff) || (g, w) == (0xffff, 0), "{what}: checksum {g:#06x} != {w:#06x}");
    }

    #[test]
    fn to_backend_shifts_seq_and_tsval_only() {
        let mut r = Rng(0x5eed_0001);
        for case in 0..600 {
            let seg = random_seg(&mut r);
            let adj = random_adj(&mut r);
            let want = Seg { seq: seg.seq.wrapping_add(adj.seq), ..seg.clone() }.map_opts(|o| match *o {
                TcpOptionElement::Timestamp(v, e) => TcpOptionElement::Timestamp(v.wrapping_add(adj.ts), e),
                ref o => o.clone(),
            });
            let mut b = seg.bytes();
            adj.to_backend(&mut b).expect("well formed");
            assert_same_segment(&b, &want.bytes(), &format!("case {case}: {adj:?} on {seg:?}"));
            // And as an independent parser reads it.
            let (h, payload) = TcpHeader::from_slice(&b).expect("parses");
            assert_eq!(h.sequence_number, want.seq);
            assert_eq!(h.acknowledgment_number, seg.ack);
            assert_eq!(payload, &seg.payload[..]);
            let opts: Vec<_> = h.options_iterator().map(|o| o.expect("option")).collect();
            assert_eq!(opts, want.opts, "case {case}");
        }
    }

    #[test]
    fn to_client_shifts_ack_sack_edges_and_tsecr_only() {
        let mut r = Rng(0x5eed_0002);
        for case in 0..600 {
            let seg = random_seg(&mut r);
            let adj = random_adj(&mut r);
            let back = |x: u32| x.wrapping_sub(adj.seq);
            let ack = if seg.ack_flag { back(seg.ack) } else { seg.ack };
            let want = Seg { ack, ..seg.clone() }.map_opts(|o| match *o {
                TcpOptionElement::Timestamp(v, e) => TcpOptionElement::Timestamp(v, e.wrapping_sub(adj.ts)),
                TcpOptionElement::SelectiveAcknowledgement((a, b), more) => TcpOptionElement::SelectiveAcknowledgement(
                    (back(a), back(b)),
                    more.map(|m| m.map(|(a, b)| (back(a), back(b)))),
                ),
                ref o => o.clone(),
            });
            let mut b = seg.bytes();
            adj.to_client(&mut b).expect("well formed");
            assert_same_segment(&b, &want.bytes(), &format!("case {case}: {adj:?} on {seg:?}"));
            let (h, payload) = TcpHeader::from_slice(&b).expect("parses");
            assert_eq!(h.sequence_number, seg.seq);
            assert_eq!(h.acknowledgment_number, ack);
            assert_eq!(payload, &seg.payload[..]);
            let opts: Vec<_> = h.options_iterator().map(|o| o.expect("option")).collect();
            assert_eq!(opts, want.opts, "case {case}");
        }
    }

    #[test]
    fn the_inverse_offsets_give_back_the_original_bytes() {
        let mut r = Rng(0x5eed_0003);
        for case in 0..400 {
            let seg = random_seg(&mut r);
            let adj = random_adj(&mut r);
            let orig = seg.bytes();
            let mut b = orig.clone();
            adj.to_backend(&mut b).expect("well formed");
            adj.inverse().to_backend(&mut b).expect("well formed");
            assert_same_segment(&b, &orig, &format!("to_backend, case {case}"));
            let mut b = orig.clone();
            adj.to_client(&mut b).expect("well formed");
            adj.inverse().to_client(&mut b).expect("well formed");
            assert_same_segment(&b, &orig, &format!("to_client, case {case}"));
        }
    }

    /// ICMP errors quote what they are about: a whole quoted segment gets every field back; a
    /// quote cut anywhere from 8 bytes on gets the sequence number (a client's segment) or the
    /// ACK number (a backend's, when the flags are quoted) back, and a quoted checksum stays
    /// consistent with the fields changed.
    #[test]
    fn quotes_get_their_senders_numbers_back_however_short() {
        let mut r = Rng(0x5eed_0004);
        for case in 0..400 {
            let seg = random_seg(&mut r);
            let adj = random_adj(&mut r);
            let orig = seg.bytes();
            let hl = usize::from(orig[12] >> 4) * 4;
            for len in [orig.len(), hl, 8, 12, 14, 16, 18, 20, 22, 30] {
                let len = len.min(orig.len());
                let what = format!("case {case}, quote of {len} bytes: {adj:?} on {seg:?}");
                // A client's segment, as the backend got it, quoted back to the client.
                let mut sent = orig.clone();
                adj.to_backend(&mut sent).expect("well formed");
                let mut quote = sent[..len].to_vec();
                adj.restore_quote_from_client(&mut quote);
                if len == orig.len() {
                    assert_same_segment(&quote, &orig, &what);
                } else if len >= 8 {
                    assert_eq!(quote[4..8], orig[4..8], "{what}: sequence number");
                    if len >= 18 && len < hl {
                        // Only the sequence number moved back: the checksum moved with it.
                        let sum = |b: &[u8]| u16::from_be_bytes([b[16], b[17]]);
                        let mut want = sent.clone();
                        SeqAdj { seq: adj.seq.wrapping_neg(), ts: 0 }.to_backend(&mut want).expect("well formed");
                        assert!(
                            sum(&quote) == sum(&want) || (sum(&quote) ^ sum(&want)) == 0xffff,
                            "{what}: quoted checksum"
                        );
                    }
                } else {
                    assert_eq!(quote, sent[..len], "{what}: too short to touch");
                }
                // A backend's segment, as the client got it, quoted back to the backend.
                let mut sent = orig.clone();
                adj.to_client(&mut sent).expect("well formed");
                let mut quote = sent[..len].to_vec();
                adj.restore_quote_from_backend(&mut quote);
                if len == orig.len() {
                    assert_same_segment(&quote, &orig, &what);
                } else if len >= 14 {
                    assert_eq!(quote[4..12], orig[4..12], "{what}: sequence and ACK numbers");
                } else {
                    assert_eq!(quote, sent[..len], "{what}: without the flags, the ACK field is left");
                }
            }
        }
    }

    #[test]
    fn offsets_wrap_around() {
        use TcpOptionElement::*;
        let adj = SeqAdj { seq: 0x20, ts: 0x20 };
        let seg = Seg {
            seq: 0xffff_fff0,
            ack: 0x10,
            ack_flag: true,
            syn: false,
            opts: vec![
                Noop,
                Noop,
                Timestamp(0xffff_fff0, 0x10),
                Noop,
                Noop,
                SelectiveAcknowledgement((0x8, 0x18), [None; 3]),
            ],
            payload: b"GET / HTTP/1.1\r\n".to_vec(),
        };
        let mut b = seg.bytes();
        adj.to_backend(&mut b).expect("well formed");
        let (h, _) = TcpHeader::from_slice(&b).expect("parses");
        assert_eq!(h.sequence_number, 0x10);
        assert_eq!(h.options_iterator().nth(2).expect("ts").expect("ok"), Timestamp(0x10, 0x10));
        assert!(verify_l4(SRC, DST, 6, &b));

        let mut b = seg.bytes();
        adj.to_client(&mut b).expect("well formed");
        let (h, _) = TcpHeader::from_slice(&b).expect("parses");
        assert_eq!(h.acknowledgment_number, 0xffff_fff0);
        let opts: Vec<_> = h.options_iterator().map(|o| o.expect("option")).collect();
        assert_eq!(opts[2], Timestamp(0xffff_fff0, 0xffff_fff0));
        assert_eq!(opts[5], SelectiveAcknowledgement((0xffff_ffe8, 0xffff_fff8), [None; 3]));
        assert!(verify_l4(SRC, DST, 6, &b));
    }

    #[test]
    fn a_segment_without_options_only_has_seq_or_ack_changed() {
        let adj = SeqAdj { seq: 0x0102_0304, ts: 0x7777 };
        let seg = Seg { seq: 1000, ack: 2000, ack_flag: true, syn: false, opts: vec![], payload: b"hi".to_vec() };
        let mut b = seg.bytes();
        adj.to_backend(&mut b).expect("well formed");
        assert_same_segment(&b, &Seg { seq: 1000 + 0x0102_0304, ..seg.clone() }.bytes(), "to_backend");
        let mut b = seg.bytes();
        adj.to_client(&mut b).expect("well formed");
        assert_same_segment(&b, &Seg { ack: 2000u32.wrapping_sub(0x0102_0304), ..seg.clone() }.bytes(), "to_client");
        // Without the ACK flag the ACK field is not a number to translate.
        let syn = Seg { ack_flag: false, syn: true, ack: 0, ..seg.clone() };
        let mut b = syn.bytes();
        adj.to_client(&mut b).expect("well formed");
        assert_eq!(b, syn.bytes());
    }

    /// Raw options at odd offsets (NOP, then the option): the checksum update must account for
    /// fields straddling 16-bit words.
    #[test]
    fn options_at_odd_offsets() {
        let mut r = Rng(0x5eed_0004);
        for case in 0..300 {
            let (tsval, tsecr) = (r.edgy(), r.edgy());
            let edges: Vec<u32> = (0..4).map(|_| r.edgy()).collect();
            let mut opts = vec![1u8, 8, 10];
            opts.extend_from_slice(&tsval.to_be_bytes());
            opts.extend_from_slice(&tsecr.to_be_bytes());
            // SACK at offset 31: its edges at 33, 37, 41, 45.
            opts.extend_from_slice(&[5, 18]);
            for e in &edges {
                opts.extend_from_slice(&e.to_be_bytes());
            }
            opts.extend_from_slice(&[1, 1, 1]); // 1 + 10 + 18 + 3 = 32
            let mut h = TcpHeader::new(41000, 8080, r.u32(), 501);
            h.ack = true;
            h.acknowledgment_number = r.u32();
            h.set_options_raw(&opts).expect("fits");
            let payload: Vec<u8> = (0..r.below(40)).map(|_| r.next() as u8).collect();
            h.checksum = h.calc_checksum_ipv4_raw(SRC.octets(), DST.octets(), &payload).expect("small");
            let mut orig = h.to_bytes().to_vec();
            orig.extend_from_slice(&payload);
            assert!(verify_l4(SRC, DST, 6, &orig));

            let adj = random_adj(&mut r);
            let mut b = orig.clone();
            adj.to_backend(&mut b).expect("well formed");
            let mut want = orig.clone();
            want[4..8].copy_from_slice(&h.sequence_number.wrapping_add(adj.seq).to_be_bytes());
            want[23..27].copy_from_slice(&tsval.wrapping_add(adj.ts).to_be_bytes());
            want[16..18].copy_from_slice(&[0, 0]);
            let c = checksum::l4_checksum(SRC, DST, 6, &want);
            want[16..18].copy_from_slice(&c.to_be_bytes());
            assert_same_segment(&b, &want, &format!("to_backend, case {case}"));

            let mut b = orig.clone();
            adj.to_client(&mut b).expect("well formed");
            let mut want = orig.clone();
            want[8..12].copy_from_slice(&h.acknowledgment_number.wrapping_sub(adj.seq).to_be_bytes());
            want[27..31].copy_from_slice(&tsecr.wrapping_sub(adj.ts).to_be_bytes());
            for (i, e) in edges.iter().enumerate() {
                want[33 + 4 * i..37 + 4 * i].copy_from_slice(&e.wrapping_sub(adj.seq).to_be_bytes());
            }
            want[16..18].copy_from_slice(&[0, 0]);
            let c = checksum::l4_checksum(SRC, DST, 6, &want);
            want[16..18].copy_from_slice(&c.to_be_bytes());
            assert_same_segment(&b, &want, &format!("to_client, case {case}"));
        }
    }

    /// A 20-byte header (ACK, checksum not filled) followed by `opts`, with the data offset
    /// covering them.
    fn with_raw_options(opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0xa0, 0x28, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0x10, 0x01, 0xf5, 0, 0, 0, 0];
        b[12] = (((20 + opts.len()) / 4) as u8) << 4;
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn malformed_segments_are_refused_and_left_unchanged() {
        let ts = [8u8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let mut cases: Vec<(&str, Vec<u8>, SeqAdjError)> = vec![
            ("empty", vec![], SeqAdjError::Truncated),
            ("19 bytes", vec![0x50; 19], SeqAdjError::Truncated),
            // The TS option's length claims 10 bytes; the header ends 2 bytes in.
            ("truncated TS", with_raw_options(&[1, 1, 8, 10]), SeqAdjError::BadOption),
            ("TS of length 8", with_raw_options(&[8, 8, 0, 0, 0, 1, 0, 0, 0, 2, 1, 1]), SeqAdjError::BadOption),
            ("SACK of length 11", with_raw_options(&[5, 11, 0, 0, 0, 1, 0, 0, 0, 2, 0, 1]), SeqAdjError::BadOption),
            ("SACK of length 2", with_raw_options(&[1, 1, 5, 2]), SeqAdjError::BadOption),
            ("option length 0", with_raw_options(&[1, 1, 30, 0]), SeqAdjError::BadOption),
            ("option length 1", with_raw_options(&[1, 1, 30, 1]), SeqAdjError::BadOption),
            ("kind without length", with_raw_options(&[1, 1, 1, 30]), SeqAdjError::BadOption),
        ];
        // A well-formed TS first, then a malformed option: nothing may be written.
        let mut ts_then_bad = vec![1, 1];
        ts_then_bad.extend_from_slice(&ts);
        ts_then_bad.extend_from_slice(&[5, 11, 0, 0]);
        cases.push(("TS then bad SACK", with_raw_options(&ts_then_bad), SeqAdjError::BadOption));
        let mut doff4 = with_raw_options(&[]);
        doff4[12] = 0x40;
        cases.push(("data offset 4", doff4, SeqAdjError::BadHeaderLen));
        // Data offset 15 (60 bytes) on a 32-byte segment.
        let mut long = with_raw_options(&[1, 1]);
        long.extend_from_slice(&[1; 10]);
        long[12] = 0xf0;
        cases.push(("header_len > len", long, SeqAdjError::Truncated));
        // Data offset 8 with only the fixed header present.
        let mut short = with_raw_options(&[]);
        short[12] = 0x80;
        cases.push(("options missing", short, SeqAdjError::Truncated));
        let adj = SeqAdj { seq: 0x1234_5678, ts: 0x9abc_def0 };
        for (what, orig, err) in cases {
            for way in [Way::ToBackend, Way::ToClient] {
                let mut b = orig.clone();
                let got = match way {
                    Way::ToBackend => adj.to_backend(&mut b),
                    Way::ToClient => adj.to_client(&mut b),
                };
                assert_eq!(got, Err(err), "{what} {way:?}");
                assert_eq!(b, orig, "{what} {way:?}: changed");
            }
            assert_eq!(tsval(&orig), None, "{what}");
        }
    }

    #[test]
    fn none_touches_nothing_even_malformed() {
        let mut r = Rng(0x5eed_0005);
        for _ in 0..50 {
            let orig = random_seg(&mut r).bytes();
            let mut b = orig.clone();
            assert_eq!(SeqAdj::NONE.to_backend(&mut b), Ok(()));
            assert_eq!(SeqAdj::NONE.to_client(&mut b), Ok(()));
            assert_eq!(b, orig);
        }
        let mut bad = with_raw_options(&[1, 1, 8, 10]);
        let orig = bad.clone();
        assert_eq!(SeqAdj::NONE.to_backend(&mut bad), Ok(()));
        assert_eq!(SeqAdj::NONE.to_client(&mut []), Ok(()));
        assert_eq!(bad, orig);
        assert!(SeqAdj::NONE.is_none() && SeqAdj::default().is_none());
        assert!(!SeqAdj { seq: 0, ts: 1 }.is_none() && !SeqAdj { seq: 1, ts: 0 }.is_none());
    }

    #[test]
    fn options_after_end_of_list_are_padding() {
        // EOL, then bytes that would read as a TS option: neither parsed nor translated.
        let mut b = with_raw_options(&[0, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 0]);
        let c = checksum::l4_checksum(SRC, DST, 6, &b);
        b[16..18].copy_from_slice(&c.to_be_bytes());
        let adj = SeqAdj { seq: 0, ts: 5 };
        let orig = b.clone();
        adj.to_backend(&mut b).expect("well formed");
        assert_eq!(b, orig);
        assert_eq!(tsval(&b), None);
    }

    #[test]
    fn tsval_reads_the_last_timestamps_option() {
        use TcpOptionElement::*;
        let seg = Seg {
            seq: 1,
            ack: 0,
            ack_flag: false,
            syn: true,
            opts: vec![
                MaximumSegmentSize(1460),
                SelectiveAcknowledgementPermitted,
                Timestamp(0xdead_beef, 0),
                Noop,
                WindowScale(7),
            ],
            payload: vec![],
        };
        assert_eq!(tsval(&seg.bytes()), Some(0xdead_beef));
        assert_eq!(tsval(&Seg { opts: vec![], ..seg.clone() }.bytes()), None);
        let two = Seg { opts: vec![Timestamp(1, 0), Timestamp(2, 0)], ..seg.clone() };
        assert_eq!(tsval(&two.bytes()), Some(2));
        // Both are translated.
        let mut b = two.bytes();
        SeqAdj { seq: 0, ts: 10 }.to_backend(&mut b).expect("well formed");
        let (h, _) = TcpHeader::from_slice(&b).expect("parses");
        let opts: Vec<_> = h.options_iterator().map(|o| o.expect("option")).collect();
        assert_eq!(opts, vec![Timestamp(11, 0), Timestamp(12, 0)]);
        assert!(verify_l4(SRC, DST, 6, &b));
    }

    /// Hostile bytes: never a panic; refused ones are unchanged; accepted ones keep a valid
    /// checksum valid.
    #[test]
    fn random_bytes_never_panic_and_keep_checksums() {
        let mut r = Rng(0x5eed_0006);
        for _ in 0..20_000 {
            let len = r.below(72);
            let mut b: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
            if len >= 20 {
                // Mostly plausible data offsets, and options built from the kinds that matter.
                if r.below(2) == 0 {
                    b[12] = ((5 + r.below(11)) as u8) << 4 | (b[12] & 0x0f);
                }
                for x in b.iter_mut().take(60).skip(20) {
                    if r.below(3) == 0 {
                        *x = [0, 1, 2, 3, 4, 5, 8, 10, 18, 34][r.below(10)];
                    }
                }
                b[16] = 0;
                b[17] = 0;
                let c = checksum::l4_checksum(SRC, DST, 6, &b);
                b[16..18].copy_from_slice(&c.to_be_bytes());
            }
            let adj = random_adj(&mut r);
            for way in [Way::ToBackend, Way::ToClient] {
                let orig = b.clone();
                let res = match way {
                    Way::ToBackend => adj.to_backend(&mut b),
                    Way::ToClient => adj.to_client(&mut b),
                };
                match res {
                    Err(_) => assert_eq!(b, orig),
                    Ok(()) => assert!(len < 20 || verify_l4(SRC, DST, 6, &b), "{orig:02x?}"),
                }
                let _ = tsval(&b);
            }
        }
    }
}
