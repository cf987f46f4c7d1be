//! Software segmentation and fragmentation judged by an independent parser (etherparse):
//! segments reassemble to the original byte stream, each is valid (both checksums), none
//! exceeds the MTU or the MSS, and the per-segment fields follow the kernel's GSO rules.

use dataplane::gso::{fragment, segment_tcp, tcp_segment_payload, GsoError, VecSink};
use etherparse::{IpNumber, Ipv4Header, Ipv4Options, TcpHeader, TcpOptionElement};
use proptest::prelude::*;

/// An IPv4/TCP packet with the timestamp option, `flags` (FIN|PSH|CWR|ACK mix), `len` payload
/// bytes, and `partial` = only the pseudo-header sum in the TCP checksum (CHECKSUM_PARTIAL).
fn tcp_packet(len: usize, seq: u32, ident: u16, fin: bool, psh: bool, cwr: bool, partial: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let mut t = TcpHeader::new(40000, 8080, seq, 64240);
    t.ack = true;
    t.acknowledgment_number = 77;
    t.fin = fin;
    t.psh = psh;
    t.cwr = cwr;
    t.set_options(&[TcpOptionElement::Noop, TcpOptionElement::Noop, TcpOptionElement::Timestamp(123_456, 654_321)])
        .expect("options fit");
    let mut ip = Ipv4Header::new((t.header_len() + len) as u16, 64, IpNumber::TCP, [10, 244, 0, 2], [10, 244, 1, 2])
        .expect("header");
    ip.identification = ident;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    t.checksum = t.calc_checksum_ipv4(&ip, &payload).expect("checksum");
    if partial {
        // What a veth peer with tx checksum offload hands over: the pseudo-header sum only.
        let l4_len = (t.header_len() + len) as u32;
        let mut s: u32 = 0;
        for w in [[10u8, 244], [0, 2], [10, 244], [1, 2]] {
            s += u32::from(u16::from_be_bytes(w));
        }
        s += 6 + l4_len;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        t.checksum = s as u16;
    }
    let mut out = Vec::new();
    ip.write(&mut out).expect("ip");
    t.write(&mut out).expect("tcp");
    out.extend_from_slice(&payload);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn tcp_segments_reassemble_and_are_each_valid(
        len in 0usize..20_000, mtu in 576usize..9001, mss in proptest::option::of(536u16..9000),
        seq in any::<u32>(), ident in any::<u16>(), fin in any::<bool>(), psh in any::<bool>(), cwr in any::<bool>(),
        partial in any::<bool>(),
    ) {
        let p = tcp_packet(len, seq, ident, fin, psh, cwr, partial);
        let mut sink = VecSink::new(p.len() * 2);
        let n = segment_tcp(&p, mtu, mss, &mut sink).expect("segments");
        let seg = tcp_segment_payload(20, 32, mtu, mss);
        prop_assert_eq!(n, len.div_ceil(seg).max(1));
        let mut stream = Vec::new();
        for i in 0..n {
            let s = sink.packet(i);
            prop_assert!(s.len() <= mtu, "segment {} is {} bytes > MTU {}", i, s.len(), mtu);
            let (ip, rest) = Ipv4Header::from_slice(s).expect("IPv4 parses");
            prop_assert_eq!(ip.header_checksum, ip.calc_header_checksum());
            prop_assert_eq!(usize::from(ip.total_len), s.len());
            prop_assert_eq!(ip.identification, ident.wrapping_add(i as u16));
            prop_assert!(ip.dont_fragment);
            let (t, payload) = TcpHeader::from_slice(rest).expect("TCP parses");
            prop_assert_eq!(t.checksum, t.calc_checksum_ipv4(&ip, payload).expect("fits"), "TCP checksum of segment {}", i);
            prop_assert!(payload.len() <= seg);
            prop_assert_eq!(t.sequence_number, seq.wrapping_add(stream.len() as u32));
            prop_assert_eq!(t.acknowledgment_number, 77);
            prop_assert!(t.ack);
            let last = i + 1 == n;
            prop_assert_eq!(t.fin, fin && last);
            prop_assert_eq!(t.psh, psh && last);
            prop_assert_eq!(t.cwr, cwr && i == 0);
            let opts: Vec<_> = t.options_iterator().collect::<Result<_, _>>().expect("options");
            prop_assert_eq!(opts, vec![TcpOptionElement::Noop, TcpOptionElement::Noop, TcpOptionElement::Timestamp(123_456, 654_321)]);
            stream.extend_from_slice(payload);
        }
        prop_assert_eq!(&stream[..], &p[52..], "the byte stream is intact");
    }

    #[test]
    fn fragments_reassemble_and_are_each_valid(len in 0usize..20_000, mtu in 68usize..9001, ident in any::<u16>(), with_opts in any::<bool>()) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        let mut ip = Ipv4Header::new(len as u16, 64, IpNumber::UDP, [10, 244, 0, 2], [10, 244, 1, 2]).expect("header");
        ip.identification = ident;
        if with_opts {
            // A copied option (0x94 router alert, copy bit set) and a non-copied one (0x07 record route, empty).
            ip.options = Ipv4Options::try_from(&[0x94, 4, 0, 0, 0x07, 3, 4, 0][..]).expect("options");
        }
        ip.total_len = (ip.header_len() + len) as u16;
        ip.header_checksum = ip.calc_header_checksum();
        let mut p = Vec::new();
        ip.write(&mut p).expect("ip");
        p.extend_from_slice(&payload);
        let mut sink = VecSink::new(p.len() * 2);
        let n = fragment(&p, mtu, &mut sink).expect("fragments");
        let mut data = vec![None; len];
        for i in 0..n {
            let f = sink.packet(i);
            prop_assert!(f.len() <= mtu);
            let (h, body) = Ipv4Header::from_slice(f).expect("fragment parses");
            prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
            prop_assert_eq!(h.identification, ident);
            prop_assert_eq!(h.more_fragments, i + 1 < n);
            if i > 0 && with_opts {
                prop_assert_eq!(h.options.as_slice(), &[0x94, 4, 0, 0][..], "only copied options repeat");
            }
            let off = usize::from(h.fragment_offset.value()) * 8;
            if i + 1 < n {
                prop_assert_eq!(body.len() % 8, 0);
            }
            for (k, b) in body.iter().enumerate() {
                prop_assert!(data[off + k].is_none(), "overlap at {}", off + k);
                data[off + k] = Some(*b);
            }
        }
        let got: Vec<u8> = data.into_iter().map(|b| b.expect("hole")).collect();
        prop_assert_eq!(got, payload);
    }
}

#[test]
fn exhaustion_and_impossible_mtus_are_reported() {
    let p = tcp_packet(10_000, 1, 1, false, false, false, false);
    let mut sink = VecSink::new(0);
    sink.limit = 3;
    assert_eq!(segment_tcp(&p, 1500, None, &mut sink), Err(GsoError::NoRoom(3)));
    assert_eq!(segment_tcp(&p, 52, None, &mut VecSink::new(0)), Err(GsoError::MtuTooSmall));
    assert_eq!(segment_tcp(&p[..30], 1500, None, &mut VecSink::new(0)), Err(GsoError::Malformed));
    assert_eq!(fragment(&p, 27, &mut VecSink::new(0)), Err(GsoError::MtuTooSmall));
    // The MSS the flow announced wins over a larger MTU (options counted against it).
    let mut sink = VecSink::new(0);
    assert_eq!(segment_tcp(&p, 9000, Some(1000), &mut sink), Ok(10_000usize.div_ceil(988)));
}

// ---- Through the pipeline: oversized frames from a pod, and aggregated ones from the uplink.

use dataplane::pipeline::{process_frame, Disposition, DropReason, FrameBuf, WorkerState};
use dataplane::testkit::{self, Ip, Vxlan, L4, POD1, POD1_IP, REMOTE_POD_B, UPLINK};

/// Runs one frame (in a buffer with room for headers) through the pipeline.
fn run(state: &mut WorkerState, port: dataplane::tables::PortId, frame: &[u8]) -> Disposition {
    let tables = testkit::tables();
    let mut buf = vec![0u8; 256 + frame.len() + 256];
    buf[256..256 + frame.len()].copy_from_slice(frame);
    let mut f = FrameBuf::new(&mut buf, 256, frame.len()).expect("fits");
    process_frame(&tables, state, 0, port, &mut f)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

/// The inner IPv4 packets of what the pipeline spilled toward `port`, checked to be valid
/// (inner checksums by etherparse; outer headers too when VXLAN).
fn spilled_inner(state: &WorkerState, port: dataplane::tables::PortId, vxlan: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (bytes, p) in state.spill.packets() {
        assert_eq!(p, port);
        let inner = if vxlan {
            let outer = etherparse::SlicedPacket::from_ethernet(bytes).expect("outer parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &outer.net else { panic!("outer not IPv4") };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "outer IPv4 checksum");
            assert!(usize::from(h.total_len) <= 1500, "outer fits the underlay MTU");
            let Some(etherparse::TransportSlice::Udp(u)) = &outer.transport else { panic!("outer not UDP") };
            assert_eq!(u.destination_port(), 8472);
            bytes[14 + 20 + 8 + 8..].to_vec()
        } else {
            bytes.to_vec()
        };
        assert!(inner.len() - 14 <= 1450, "inner packet fits the pod MTU: {}", inner.len() - 14);
        let p = etherparse::SlicedPacket::from_ethernet(&inner).expect("inner parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("inner not IPv4") };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "inner IPv4 checksum");
        if let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport {
            assert_eq!(t.calc_checksum_ipv4(h.source, h.destination).ok(), Some(t.checksum()), "inner TCP checksum");
        }
        out.push(inner[14..].to_vec());
    }
    out
}

fn tcp_stream(packets: &[Vec<u8>]) -> Vec<u8> {
    packets.iter().flat_map(|p| p[40..].to_vec()).collect()
}

#[test]
fn an_oversized_tcp_frame_from_a_pod_leaves_as_encapsulated_segments() {
    let data = payload(30_000);
    let l4 = L4::Tcp { sport: 40000, dport: 8080, seq: 1000, ack: 1, flags: 0x018, payload: &data };
    let frame = testkit::from_pod1(&testkit::ipv4(POD1_IP, REMOTE_POD_B, &l4));
    let mut state = WorkerState::new(0);
    assert_eq!(run(&mut state, POD1, &frame), Disposition::Spilled);
    let segs = spilled_inner(&state, UPLINK, true);
    assert_eq!(segs.len(), 30_000usize.div_ceil(1410));
    assert_eq!(tcp_stream(&segs), data, "stream intact");
    let ev = &state.counters.port(POD1).expect("port").events;
    assert_eq!((ev.segmented, ev.segments_sent), (1, segs.len() as u64));
}

#[test]
fn an_aggregated_frame_from_the_uplink_reaches_the_pod_as_segments() {
    let data = payload(20_000);
    let l4 = L4::Tcp { sport: 8080, dport: 40000, seq: 7, ack: 1, flags: 0x011, payload: &data };
    let inner = testkit::ipv4(REMOTE_POD_B, POD1_IP, &l4);
    let frame = testkit::vxlan_frame(&Vxlan::b_to_a(), &inner);
    let mut state = WorkerState::new(0);
    assert_eq!(run(&mut state, UPLINK, &frame), Disposition::Spilled);
    let segs = spilled_inner(&state, POD1, false);
    assert_eq!(tcp_stream(&segs), data);
    // FIN only on the last segment.
    let fins: Vec<bool> = segs.iter().map(|s| s[33] & 0x01 != 0).collect();
    assert!(fins[..fins.len() - 1].iter().all(|f| !f) && fins[fins.len() - 1]);
}

#[test]
fn oversized_udp_is_fragmented_with_df_clear_and_refused_with_frag_needed_with_df_set() {
    let data = payload(4000);
    let udp = L4::Udp { sport: 5000, dport: 53, payload: &data };
    let clear = Ip { dont_frag: false, ..Ip::new(POD1_IP, REMOTE_POD_B) };
    let mut state = WorkerState::new(0);
    let frame = testkit::from_pod1(&testkit::ipv4_with(&clear, &udp));
    assert_eq!(run(&mut state, POD1, &frame), Disposition::Spilled);
    let frags = spilled_inner(&state, UPLINK, true);
    assert_eq!(frags.len(), 3);
    let mut whole = Vec::new();
    for f in &frags {
        whole.extend_from_slice(&f[20..]);
    }
    assert_eq!(&whole[8..], &data[..], "fragments carry the datagram in order");
    // DF set: ICMP fragmentation needed back to the pod, with the usable MTU.
    let mut state = WorkerState::new(0);
    let frame = testkit::from_pod1(&testkit::ipv4(POD1_IP, REMOTE_POD_B, &udp));
    let d = run(&mut state, POD1, &frame);
    assert_eq!(d, Disposition::Forward(POD1));
    assert!(state.spill.is_empty());
    assert_eq!(state.counters.port(POD1).expect("port").events.icmp_frag_needed_sent, 1);
}

#[test]
fn frag_needed_carries_the_usable_mtu() {
    let data = payload(3000);
    let udp = L4::Udp { sport: 5000, dport: 53, payload: &data };
    let frame = testkit::from_pod1(&testkit::ipv4(POD1_IP, REMOTE_POD_B, &udp));
    let tables = testkit::tables();
    let mut state = WorkerState::new(0);
    let mut buf = vec![0u8; 256 + frame.len()];
    buf[256..].copy_from_slice(&frame);
    let mut f = FrameBuf::new(&mut buf, 256, frame.len()).expect("fits");
    assert_eq!(process_frame(&tables, &mut state, 0, POD1, &mut f), Disposition::Forward(POD1));
    let p = etherparse::SlicedPacket::from_ethernet(f.data()).expect("parses");
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("not ICMP: {p:?}") };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1450 }
        )
    );
}

#[test]
fn a_full_spill_area_refuses_whole_frames() {
    let data = payload(60_000);
    let l4 = L4::Tcp { sport: 40000, dport: 8080, seq: 1, ack: 1, flags: 0x010, payload: &data };
    let frame = testkit::from_pod1(&testkit::ipv4(POD1_IP, REMOTE_POD_B, &l4));
    let mut state = WorkerState::new(0);
    let per_frame = 60_000usize.div_ceil(1410);
    let mut accepted = 0;
    // The worker would drain the spill after each batch; here nobody does.
    for _ in 0..100 {
        match run(&mut state, POD1, &frame) {
            Disposition::Spilled => accepted += 1,
            Disposition::Drop(DropReason::SpillFull) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(accepted >= 32, "a whole batch of aggregated frames fits: {accepted}");
    assert_eq!(state.spill.len(), accepted * per_frame, "no partial frame left behind");
    assert_eq!(state.counters.port(POD1).expect("port").drops[DropReason::SpillFull.index()], 1);
}

#[test]
fn with_segmentation_off_an_oversized_frame_is_a_named_drop() {
    let data = payload(5000);
    let l4 = L4::Tcp { sport: 40000, dport: 8080, seq: 1, ack: 1, flags: 0x010, payload: &data };
    let frame = testkit::from_pod1(&testkit::ipv4(POD1_IP, REMOTE_POD_B, &l4));
    let node = dataplane::tables::NodeConfig { segmentation: false, ..testkit::node_config() };
    let tables = testkit::builder(node).and_then(|b| b.build()).expect("tables");
    let mut state = WorkerState::new(0);
    let mut buf = vec![0u8; 256 + frame.len()];
    buf[256..].copy_from_slice(&frame);
    let mut f = FrameBuf::new(&mut buf, 256, frame.len()).expect("fits");
    assert_eq!(
        process_frame(&tables, &mut state, 0, POD1, &mut f),
        Disposition::Drop(DropReason::SegmentationDisabled)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Hostile input never panics: arbitrary bytes, and valid packets with any byte changed.
    #[test]
    fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000), mtu in 0usize..2000, mss in proptest::option::of(any::<u16>())) {
        let mut sink = VecSink::new(0);
        sink.limit = 64;
        let _ = segment_tcp(&bytes, mtu, mss, &mut sink);
        sink.clear();
        let _ = fragment(&bytes, mtu, &mut sink);
    }

    #[test]
    fn mutated_packets_never_panic(len in 0usize..4000, at in any::<usize>(), byte in any::<u8>(), mtu in 20usize..2000) {
        let mut p = tcp_packet(len, 1, 1, true, true, true, false);
        let i = at % p.len();
        p[i] = byte;
        let mut sink = VecSink::new(0);
        sink.limit = 512;
        let _ = segment_tcp(&p, mtu, None, &mut sink);
        sink.clear();
        let _ = fragment(&p, mtu, &mut sink);
    }
}

#[test]
fn filters_parse_any_text_without_panicking() {
    use dataplane::filter::Filter;
    use proptest::test_runner::TestRunner;
    let words = prop::collection::vec(
        prop::sample::select(vec![
            "host",
            "net",
            "port",
            "src",
            "dst",
            "tcp",
            "udp",
            "icmp",
            "proto",
            "and",
            "or",
            "not",
            "(",
            ")",
            "!",
            "&&",
            "||",
            "10.0.0.1",
            "10.0.0.0/8",
            "80",
            "x",
            "300",
            "/",
            "",
        ]),
        0..12,
    );
    TestRunner::default()
        .run(&words, |w| {
            let _ = Filter::parse(&w.join(" "));
            let _ = Filter::parse(&w.concat());
            Ok(())
        })
        .expect("no panic");
}

/// An IPv4/TCP packet with an MSS option (as SYNs carry), valid checksums.
fn tcp_mss(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    ports: (u16, u16),
    flags: u8,
    mss: Option<u16>,
    payload: &[u8],
) -> Vec<u8> {
    let opts: Vec<u8> = mss.map(|m| vec![2, 4, (m >> 8) as u8, m as u8]).unwrap_or_default();
    let thl = 20 + opts.len();
    let mut t = Vec::new();
    t.extend_from_slice(&ports.0.to_be_bytes());
    t.extend_from_slice(&ports.1.to_be_bytes());
    t.extend_from_slice(&100u32.to_be_bytes());
    t.extend_from_slice(&200u32.to_be_bytes());
    t.extend_from_slice(&[((thl / 4) as u8) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(payload);
    let c = dataplane::wire::checksum::l4_checksum(src, dst, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    testkit::ipv4(src, dst, &L4::Raw { proto: 6, bytes: &t })
}

/// Segments toward a Service endpoint respect the MSS the endpoint announced in its SYN|ACK
/// (500 here), not only the MTU.
#[test]
fn segments_respect_the_mss_the_receiver_announced() {
    use testkit::SERVICE_VIP;
    let tables = testkit::tables_with_service();
    let mut state = WorkerState::new(0);
    let run = |port, frame: Vec<u8>, state: &mut WorkerState| {
        let mut buf = vec![0u8; 256 + frame.len()];
        buf[256..].copy_from_slice(&frame);
        let mut f = FrameBuf::new(&mut buf, 256, frame.len()).expect("fits");
        process_frame(&tables, state, 0, port, &mut f)
    };
    // SYN from the pod (MSS 1410), SYN|ACK from the endpoint on node B (MSS 500), ACK.
    let syn = testkit::from_pod1(&tcp_mss(POD1_IP, SERVICE_VIP, (40000, 80), 0x02, Some(1410), &[]));
    assert_eq!(run(POD1, syn, &mut state), Disposition::Forward(UPLINK));
    let synack =
        testkit::vxlan_frame(&Vxlan::b_to_a(), &tcp_mss(REMOTE_POD_B, POD1_IP, (8080, 40000), 0x12, Some(500), &[]));
    assert_eq!(run(UPLINK, synack, &mut state), Disposition::Forward(POD1));
    state.spill.clear();
    // An aggregated 5000-byte data frame toward the Service.
    let data = payload(5000);
    let big = testkit::from_pod1(&tcp_mss(POD1_IP, SERVICE_VIP, (40000, 80), 0x18, None, &data));
    assert_eq!(run(POD1, big, &mut state), Disposition::Spilled);
    let segs = spilled_inner(&state, UPLINK, true);
    assert_eq!(segs.len(), 10, "5000 bytes in segments of at most 500");
    assert!(segs.iter().all(|s| s.len() - 40 <= 500));
    assert_eq!(tcp_stream(&segs), data);
}
