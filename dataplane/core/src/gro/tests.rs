//! GRO merge rules, with etherparse building the segments and reading the merged frames, and
//! vxnat's own segmentation (`gso`) cutting them up again: GRO then GSO gives back what came in.

use super::*;
use crate::wire::checksum::complete_partial;
use etherparse::{PacketBuilder, TcpOptionElement};

const A: [u8; 4] = [10, 244, 1, 7];
const B: [u8; 4] = [10, 244, 0, 2];

/// A segment of flow `sport` -> 8080 with `payload` bytes at `seq`, flags ACK (+ extra), a
/// timestamps option `ts`.
fn seg(sport: u16, seq: u32, payload: &[u8], extra: &str, ts: u32) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(A, B, 63)
        .tcp(sport, 8080, seq, 502)
        .ack(7777)
        .options(&[TcpOptionElement::Noop, TcpOptionElement::Noop, TcpOptionElement::Timestamp(ts, 99)])
        .expect("fits");
    for f in extra.chars() {
        b = match f {
            'P' => b.psh(),
            'F' => b.fin(),
            'S' => b.syn(),
            'R' => b.rst(),
            'U' => b.urg(1),
            _ => b,
        };
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("write");
    out
}

fn data(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

/// The bytes each group hands the kernel: the finished head, then the members' payloads.
fn emit(frames: &mut [Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
    let mut c = Coalescer::new();
    let groups = {
        let view: Vec<Vec<u8>> = frames.to_vec();
        c.plan(view.len(), |i| view.get(i).map(|v| &v[..])).to_vec()
    };
    groups
        .iter()
        .map(|g| {
            let hdr = c.finish(g, &mut frames[g.head as usize]);
            let mut bytes = frames[g.head as usize].clone();
            for (i, at) in c.members(g) {
                bytes.extend_from_slice(&frames[i][at..]);
            }
            assert_eq!(hdr.check(bytes.len()), Ok(()), "the kernel would take the header");
            (hdr, bytes)
        })
        .collect()
}

/// The merged frame, read by etherparse after the kernel's part (the checksum finished): its
/// sequence number, flags (PSH), payload.
fn read(hdr: &VirtioNetHdr, frame: &[u8]) -> (u32, bool, Vec<u8>) {
    let mut f = frame.to_vec();
    if hdr.flags & virtio_net::F_NEEDS_CSUM != 0 {
        let start = usize::from(hdr.csum_start);
        assert!(complete_partial(&mut f[start..], usize::from(hdr.csum_offset), false));
    }
    let p = etherparse::SlicedPacket::from_ethernet(&f).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    assert_eq!(usize::from(ip.header().total_len()), f.len() - 14, "total length covers the group");
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else { panic!("TCP") };
    let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).expect("fits");
    assert_eq!(t.checksum(), want, "TCP checksum once the kernel finished it");
    (t.sequence_number(), t.psh(), t.payload().to_vec())
}

#[test]
fn a_run_of_segments_becomes_one_frame_and_segments_back_into_the_same() {
    let payloads: Vec<Vec<u8>> = (0..45).map(|i| data(1398, i as u8)).collect();
    let mut frames: Vec<Vec<u8>> =
        payloads.iter().enumerate().map(|(i, p)| seg(41000, 1000 + 1398 * i as u32, p, "", 5)).collect();
    let originals = frames.clone();
    let out = emit(&mut frames);
    assert_eq!(out.len(), 1, "45 in-order segments: one group");
    let (hdr, merged) = &out[0];
    assert_eq!(
        (hdr.gso_type, hdr.gso_size, hdr.hdr_len, hdr.csum_start, hdr.csum_offset),
        (virtio_net::GSO_TCPV4, 1398, 14 + 20 + 32, 34, 16)
    );
    let (seq, _, payload) = read(hdr, merged);
    assert_eq!(seq, 1000);
    assert_eq!(payload, payloads.concat());
    // What the kernel's segmentation (here vxnat's own) makes of it: the segments that came in.
    struct Collect(Vec<Vec<u8>>);
    impl crate::gso::Sink for Collect {
        fn next(&mut self, len: usize) -> Option<&mut [u8]> {
            self.0.push(vec![0; len]);
            self.0.last_mut().map(|v| &mut v[..])
        }
    }
    let mut merged = merged.clone();
    complete_partial(&mut merged[34..], 16, false);
    let mut segs = Collect(Vec::new());
    crate::gso::segment_tcp(&merged[14..], 20 + 32 + 1398, None, &mut segs).expect("segments");
    assert_eq!(segs.0.len(), 45);
    for (k, (got, want)) in segs.0.iter().zip(&originals).enumerate() {
        // Byte for byte but the IP ID, which counts up from the head's (Linux's GSO does the
        // same), and the header checksum that follows it.
        let want = &want[14..];
        assert_eq!((&got[..4], &got[6..10], &got[12..]), (&want[..4], &want[6..10], &want[12..]), "segment {k}");
        assert_eq!(u16::from_be_bytes([got[4], got[5]]), k as u16, "segment {k}: IP ID");
        assert!(crate::wire::checksum::verify(&got[..20]), "segment {k}: IPv4 header checksum");
    }
}

#[test]
fn flows_merge_apart_and_each_keeps_its_order() {
    let mut frames = Vec::new();
    for i in 0..10u32 {
        frames.push(seg(41000, 1000 + 100 * i, &data(100, 1), "", 5));
        frames.push(seg(42000, 5000 + 100 * i, &data(100, 2), "", 5));
    }
    let out = emit(&mut frames);
    assert_eq!(out.len(), 2);
    for ((hdr, f), first) in out.iter().zip([1000, 5000]) {
        let (seq, _, payload) = read(hdr, f);
        assert_eq!((seq, payload.len()), (first, 1000));
    }
}

#[test]
fn what_cannot_join_ends_the_group_and_keeps_its_place() {
    let p = data(500, 3);
    // (what, frames in, (sequence number, payload length) of each frame out)
    type Case = (&'static str, Vec<Vec<u8>>, Vec<(u32, usize)>);
    let cases: Vec<Case> = vec![
        (
            "a gap (a lost segment): a new group from it",
            vec![seg(41000, 0, &p, "", 5), seg(41000, 500, &p, "", 5), seg(41000, 1500, &p, "", 5)],
            vec![(0, 1000), (1500, 500)],
        ),
        (
            "PSH joins and ends its group",
            vec![seg(41000, 0, &p, "", 5), seg(41000, 500, &p, "P", 5), seg(41000, 1000, &p, "", 5)],
            vec![(0, 1000), (1000, 500)],
        ),
        (
            "a shorter segment joins and ends its group",
            vec![seg(41000, 0, &p, "", 5), seg(41000, 500, &p[..100], "", 5), seg(41000, 600, &p, "", 5)],
            vec![(0, 600), (600, 500)],
        ),
        (
            "a longer segment does not join",
            vec![seg(41000, 0, &p[..100], "", 5), seg(41000, 100, &p, "", 5)],
            vec![(0, 100), (100, 500)],
        ),
        (
            "FIN goes on its own, after the data before it",
            vec![seg(41000, 0, &p, "", 5), seg(41000, 500, &p, "", 5), seg(41000, 1000, &p, "F", 5)],
            vec![(0, 1000), (1000, 500)],
        ),
        (
            "a new timestamp starts a new group",
            vec![seg(41000, 0, &p, "", 5), seg(41000, 500, &p, "", 6), seg(41000, 1000, &p, "", 6)],
            vec![(0, 500), (500, 1000)],
        ),
        (
            "SYN, RST, URG are never merged",
            vec![seg(41000, 0, &p, "S", 5), seg(41000, 0, &p, "R", 5)],
            vec![(0, 500), (0, 500)],
        ),
        ("a bare ACK is not merged", vec![seg(41000, 0, b"", "", 5), seg(41000, 0, b"", "", 5)], vec![(0, 0), (0, 0)]),
    ];
    for (what, mut frames, want) in cases {
        let out = emit(&mut frames);
        let got: Vec<(u32, usize)> = out
            .iter()
            .map(|(h, f)| {
                let (seq, _, payload) = read(h, f);
                (seq, payload.len())
            })
            .collect();
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn groups_stay_within_64_segments_and_64_kib() {
    let mut frames: Vec<Vec<u8>> = (0..100u32).map(|i| seg(41000, 100 * i, &data(100, 4), "", 5)).collect();
    let out = emit(&mut frames);
    assert_eq!(out.iter().map(|(_, f)| read(&out[0].0, f).2.len()).collect::<Vec<_>>(), vec![6400, 3600]);
    let mut frames: Vec<Vec<u8>> = (0..50u32).map(|i| seg(41000, 1448 * i, &data(1448, 5), "", 5)).collect();
    let out = emit(&mut frames);
    let sizes: Vec<usize> = out.iter().map(|(h, f)| read(h, f).2.len()).collect();
    assert_eq!(sizes, vec![1448 * 45, 1448 * 5], "45 x 1448 + 52 bytes of headers fit in 65,535; 46 do not");
    assert!(out.iter().all(|(_, f)| f.len() - 14 <= 65_535));
}

#[test]
fn more_flows_than_open_slots_still_keep_every_flow_in_order() {
    let mut frames = Vec::new();
    for round in 0..4u32 {
        for flow in 0..12u16 {
            frames.push(seg(40000 + flow, 100 * round, &data(100, flow as u8), "", 5));
        }
    }
    let out = emit(&mut frames);
    let mut next = [0u32; 12];
    for (h, f) in &out {
        let (seq, _, payload) = read(h, f);
        let sport = u16::from_be_bytes([f[34], f[35]]);
        let k = usize::from(sport - 40000);
        assert_eq!(seq, next[k], "flow {k} in order");
        next[k] += payload.len() as u32;
    }
    assert_eq!(next, [400; 12]);
}

/// Random mixes of flows, flags, gaps and lengths: whatever is merged, each flow's bytes come
/// out in the order they went in, every header would be accepted, and nothing panics.
#[test]
fn random_mixes_keep_every_flows_stream() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..300 {
        let mut seqs = [0u32; 3];
        let mut frames = Vec::new();
        let mut want: [Vec<(u32, Vec<u8>)>; 3] = Default::default();
        for _ in 0..rnd(80) {
            let f = rnd(3) as usize;
            let len = [0, 1, 100, 1398][rnd(4) as usize];
            let flags = ["", "", "", "P", "F"][rnd(5) as usize];
            if rnd(10) == 0 {
                seqs[f] += 7; // a gap
            }
            let p = data(len, rnd(256) as u8);
            frames.push(seg(41000 + f as u16, seqs[f], &p, flags, rnd(2) as u32));
            want[f].push((seqs[f], p.clone()));
            seqs[f] += len as u32;
        }
        let out = emit(&mut frames);
        let mut got: [Vec<(u32, Vec<u8>)>; 3] = Default::default();
        for (h, fr) in &out {
            let (seq, _, payload) = read(h, fr);
            let f = usize::from(u16::from_be_bytes([fr[34], fr[35]]) - 41000);
            got[f].push((seq, payload));
        }
        for f in 0..3 {
            let flat = |v: &[(u32, Vec<u8>)]| -> Vec<u8> { v.iter().flat_map(|(_, p)| p.clone()).collect() };
            assert_eq!(flat(&got[f]), flat(&want[f]), "flow {f}: the same bytes in the same order");
            assert_eq!(got[f].first().map(|g| g.0), want[f].first().map(|w| w.0));
        }
    }
}

#[test]
fn any_bytes_plan_and_finish_without_panicking() {
    let mut x = 0x0123_4567_89ab_cdefu64;
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for n in 0..400 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut f = seg(41000, (x >> 32) as u32 % 3 * 10, &data(10, 0), "", 5);
        // Corrupt a few bytes anywhere, or cut the frame short.
        for k in 0..(x % 4) {
            let at = ((x >> (8 * k)) as usize) % f.len();
            f[at] ^= (x >> 40) as u8 | 1;
        }
        if n % 7 == 0 {
            f.truncate((x % f.len() as u64) as usize);
        }
        frames.push(f);
    }
    let mut c = Coalescer::new();
    let view = frames.clone();
    let groups = c.plan(view.len(), |i| view.get(i).map(|v| &v[..])).to_vec();
    for g in &groups {
        let _ = c.finish(g, &mut frames[g.head as usize]);
        let _ = c.members(g).count();
    }
    assert_eq!(groups.iter().map(|g| g.count as usize).sum::<usize>(), frames.len(), "every frame goes out once");
}
