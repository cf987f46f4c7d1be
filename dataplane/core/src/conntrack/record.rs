//! A flow as a fixed-size, versioned record: what survives a restart of the process.
//!
//! Contract:
//! - `encode` then `decode` gives back the same `Flow`, field for field.
//! - A record is `RECORD_LEN` bytes, little-endian, with an explicit layout (not Rust's), so a
//!   newer vxnat reads what an older one wrote for as long as `VERSION` stays; a record of
//!   another version is refused, never misread.
//! - An all-zero record is an empty slot (`Ok(None)`). Anything else must carry a valid
//!   checksum and valid field values, or it is `Corrupt`: a record being written when the
//!   process was killed is detected and skipped, never restored half old and half new.
//! - Times (`created`, `expires_at`) are in the writer's clock; the reader shifts them.
//!
//! Layout: `[0..8)` checksum of `[8..128)`; then version, protocols, state, flags, both keys,
//! the MSSes, the times, tag, counts, mark and sequence/timestamp offsets.

use super::{Dir, Flow, FlowKey, FlowState, TcpState};
use crate::nat::seqadj::SeqAdj;
use crate::nat::snat::Mark;
use core::net::Ipv4Addr;

/// Bytes per record.
pub const RECORD_LEN: usize = 128;
/// The record format. Bump it (and keep a decoder for the old one) when the layout changes.
pub const VERSION: u8 = 1;

/// A record that is neither empty nor a valid flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    Checksum,
    Version(u8),
    State(u8),
}

const FIRST_FIN: u8 = 1;
const FIRST_FIN_REPLY: u8 = 2;
const SNAT_RELEASED: u8 = 4;
const MARK: u8 = 8;
const MARK_TSVAL: u8 = 16;
const ENDPOINT_TIME_WAIT: u8 = 32;

const TCP_STATES: [TcpState; 8] = [
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::FinWait,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::TimeWait,
    TcpState::Close,
];

fn state_code(s: FlowState) -> u8 {
    match s {
        FlowState::Tcp(t) => 1 + TCP_STATES.iter().position(|x| *x == t).unwrap_or(0) as u8,
        FlowState::UdpUnreplied => 9,
        FlowState::UdpReplied => 10,
        FlowState::Other => 11,
    }
}

fn state_of(code: u8) -> Option<FlowState> {
    Some(match code {
        1..=8 => FlowState::Tcp(TCP_STATES[usize::from(code - 1)]),
        9 => FlowState::UdpUnreplied,
        10 => FlowState::UdpReplied,
        11 => FlowState::Other,
        _ => return None,
    })
}

/// Checksum of the record body: a 64-bit multiply-xor over its 15 words. Not cryptographic:
/// it only has to tell a torn write from a complete one.
fn checksum(body: &[u8; RECORD_LEN]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for w in body[8..].chunks_exact(8) {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    // Never 0, so an all-zero record is never a valid non-empty one.
    h | 1
}

/// Writes little-endian fields at increasing offsets.
struct Put<'a>(&'a mut [u8; RECORD_LEN], usize);

impl Put<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.0[self.1..self.1 + b.len()].copy_from_slice(b);
        self.1 += b.len();
    }
    fn key(&mut self, k: &FlowKey) {
        self.bytes(&k.src.octets());
        self.bytes(&k.dst.octets());
        self.bytes(&k.sport.to_le_bytes());
        self.bytes(&k.dport.to_le_bytes());
    }
}

/// Reads what `Put` wrote.
struct Get<'a>(&'a [u8; RECORD_LEN], usize);

impl Get<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.0[self.1..self.1 + N]);
        self.1 += N;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn key(&mut self, proto: u8) -> FlowKey {
        let (src, dst) = (Ipv4Addr::from(self.take::<4>()), Ipv4Addr::from(self.take::<4>()));
        FlowKey { proto, src, dst, sport: self.u16(), dport: self.u16() }
    }
}

/// The record of `f`.
pub fn encode(f: &Flow, out: &mut [u8; RECORD_LEN]) {
    *out = [0; RECORD_LEN];
    let mut flags = 0;
    match f.first_fin {
        Some(Dir::Orig) => flags |= FIRST_FIN,
        Some(Dir::Reply) => flags |= FIRST_FIN | FIRST_FIN_REPLY,
        None => {}
    }
    if f.snat_released {
        flags |= SNAT_RELEASED;
    }
    if let Some(m) = f.mark {
        flags |= MARK | if m.tsval.is_some() { MARK_TSVAL } else { 0 };
    }
    if f.endpoint_time_wait {
        flags |= ENDPOINT_TIME_WAIT;
    }
    let mut p = Put(out, 8);
    p.bytes(&[VERSION, f.orig.proto, f.reply.proto, state_code(f.state), flags, 0, 0, 0]);
    p.key(&f.orig);
    p.key(&f.reply);
    for m in f.mss {
        p.bytes(&m.to_le_bytes());
    }
    for v in [f.expires_at, f.tag, f.created, f.packets[0], f.packets[1], f.bytes[0], f.bytes[1]] {
        p.bytes(&v.to_le_bytes());
    }
    let (seq_end, tsval) = f.mark.map_or((0, 0), |m| (m.seq_end, m.tsval.unwrap_or(0)));
    for v in [seq_end, tsval, f.adj.seq, f.adj.ts] {
        p.bytes(&v.to_le_bytes());
    }
    let sum = checksum(out);
    out[..8].copy_from_slice(&sum.to_le_bytes());
}

/// The flow a record holds: `Ok(None)` for an empty slot.
pub fn decode(r: &[u8; RECORD_LEN]) -> Result<Option<Flow>, Corrupt> {
    if r.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let mut g = Get(r, 0);
    if g.u64() != checksum(r) {
        return Err(Corrupt::Checksum);
    }
    let (version, orig_proto, reply_proto, code, flags) = (g.u8(), g.u8(), g.u8(), g.u8(), g.u8());
    if version != VERSION {
        return Err(Corrupt::Version(version));
    }
    let state = state_of(code).ok_or(Corrupt::State(code))?;
    g.take::<3>();
    let (orig, reply) = (g.key(orig_proto), g.key(reply_proto));
    let mss = [g.u16(), g.u16()];
    let (expires_at, tag, created) = (g.u64(), g.u64(), g.u64());
    let (packets, bytes) = ([g.u64(), g.u64()], [g.u64(), g.u64()]);
    let (seq_end, tsval, seq, ts) = (g.u32(), g.u32(), g.u32(), g.u32());
    let first_fin = match (flags & FIRST_FIN != 0, flags & FIRST_FIN_REPLY != 0) {
        (false, _) => None,
        (true, false) => Some(Dir::Orig),
        (true, true) => Some(Dir::Reply),
    };
    Ok(Some(Flow {
        orig,
        reply,
        state,
        expires_at,
        tag,
        packets,
        bytes,
        created,
        mss,
        first_fin,
        snat_released: flags & SNAT_RELEASED != 0,
        mark: (flags & MARK != 0).then_some(Mark { seq_end, tsval: (flags & MARK_TSVAL != 0).then_some(tsval) }),
        adj: SeqAdj { seq, ts },
        endpoint_time_wait: flags & ENDPOINT_TIME_WAIT != 0,
        checked: crate::conntrack::UNCHECKED,
        endpoint_gone: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u64) -> Flow {
        let b = |x: u64| x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(i as u32 % 64);
        let key = |s: u64| FlowKey {
            proto: if s.is_multiple_of(3) { 17 } else { 6 },
            src: Ipv4Addr::from(b(s) as u32),
            dst: Ipv4Addr::from(b(s + 1) as u32),
            sport: b(s + 2) as u16,
            dport: b(s + 3) as u16,
        };
        let code = (i % 11) as u8 + 1;
        Flow {
            orig: key(i),
            reply: key(i + 7),
            state: state_of(code).expect("valid code"),
            expires_at: b(i + 10),
            tag: b(i + 11),
            packets: [b(i + 12), b(i + 13)],
            bytes: [b(i + 14), b(i + 15)],
            created: b(i + 16),
            mss: [b(i + 17) as u16, b(i + 18) as u16],
            first_fin: [None, Some(Dir::Orig), Some(Dir::Reply)][(i % 3) as usize],
            snat_released: i.is_multiple_of(2),
            mark: [None, Some(Mark { seq_end: b(i) as u32, tsval: None }), Some(Mark { seq_end: 7, tsval: Some(9) })]
                [(i % 3) as usize],
            adj: SeqAdj { seq: b(i + 19) as u32, ts: b(i + 20) as u32 },
            endpoint_time_wait: i.is_multiple_of(5),
            checked: crate::conntrack::UNCHECKED,
            endpoint_gone: false,
        }
    }

    #[test]
    fn every_field_round_trips() {
        for i in 0..2000 {
            let f = flow(i);
            let mut r = [0u8; RECORD_LEN];
            encode(&f, &mut r);
            assert_eq!(decode(&r), Ok(Some(f)), "flow {i}");
        }
    }

    #[test]
    fn an_empty_slot_is_none() {
        assert_eq!(decode(&[0; RECORD_LEN]), Ok(None));
    }

    /// A write cut short at any byte (the process killed mid-copy) over an older record, or
    /// over an empty slot, is never taken for a flow.
    #[test]
    fn torn_writes_are_corrupt_never_a_flow() {
        let (mut old, mut new) = ([0u8; RECORD_LEN], [0u8; RECORD_LEN]);
        encode(&flow(1), &mut old);
        encode(&flow(2), &mut new);
        for before in [old, [0u8; RECORD_LEN]] {
            for cut in 1..RECORD_LEN {
                let mut torn = before;
                torn[..cut].copy_from_slice(&new[..cut]);
                if torn == new || torn == before {
                    continue;
                }
                assert!(decode(&torn).is_err(), "cut at {cut} decoded as a flow");
            }
        }
    }

    #[test]
    fn another_version_or_state_is_refused() {
        let mut r = [0u8; RECORD_LEN];
        encode(&flow(3), &mut r);
        for (at, value, want) in [(8, 2, Corrupt::Version(2)), (11, 12, Corrupt::State(12)), (11, 0, Corrupt::State(0))]
        {
            let mut x = r;
            x[at] = value;
            let sum = checksum(&x);
            x[..8].copy_from_slice(&sum.to_le_bytes());
            assert_eq!(decode(&x), Err(want));
        }
    }
}
