//! vxnat's wire code cross-checked against an independent implementation (etherparse), and
//! property tests: parse(emit(x)) == x, incremental checksum == full recomputation, CHECKSUM_PARTIAL
//! completion == the checksum a full computation gives, and every frame the pipeline emits
//! is valid to the oracle.

use core::net::Ipv4Addr;
use dataplane::pipeline::{process_frame, Disposition, FrameBuf, WorkerState};
use dataplane::testkit::{self, Ip, Vxlan, L4};
use dataplane::wire::checksum;
use dataplane::wire::{
    ArpOperation, ArpPacket, ArpRepr, EtherType, EthernetFrame, IcmpMessage, IcmpPacket, IcmpRepr, IpProtocol,
    Ipv4Packet, Ipv4Repr, MacAddr, TcpFlags, TcpPacket, TcpRepr, UdpPacket, UdpRepr, VxlanPacket, VxlanRepr,
};
use etherparse::{Ipv4Header, TcpHeader, TcpOptionElement, UdpHeader};
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn ipv4_repr() -> impl Strategy<Value = Ipv4Repr> {
    (
        addr(),
        addr(),
        any::<u8>(),
        0u16..1480,
        any::<u8>(),
        any::<u8>(),
        any::<u16>(),
        any::<bool>(),
        any::<bool>(),
        0u16..8000,
    )
        .prop_map(|(src_addr, dst_addr, proto, payload_len, ttl, dscp_ecn, ident, dont_frag, more_frags, fo)| {
            Ipv4Repr {
                src_addr,
                dst_addr,
                protocol: IpProtocol::from(proto),
                payload_len,
                ttl,
                dscp_ecn,
                ident,
                dont_frag,
                more_frags,
                frag_offset: fo * 8,
            }
        })
}

fn tcp_repr() -> impl Strategy<Value = TcpRepr> {
    (
        (1u16.., 1u16.., any::<u32>(), any::<u32>(), 0u16..0x200, any::<u16>(), any::<u16>()),
        (
            proptest::option::of(any::<u16>()),
            proptest::option::of(0u8..15),
            any::<bool>(),
            proptest::option::of(any::<(u32, u32)>()),
        ),
        0usize..1500,
    )
        .prop_map(|((sp, dp, seq, ack, flags, win, urg), (mss, ws, sack, ts), payload_len)| TcpRepr {
            src_port: sp,
            dst_port: dp,
            seq_number: seq,
            ack_number: ack,
            flags: TcpFlags(flags),
            window_len: win,
            urgent_at: urg,
            max_seg_size: mss,
            window_scale: ws,
            sack_permitted: sack,
            timestamps: ts,
            payload_len,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ipv4_round_trips_and_agrees_with_etherparse(r in ipv4_repr()) {
        let mut buf = vec![0u8; 20 + usize::from(r.payload_len)];
        r.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]));
        let p = Ipv4Packet::new_checked(&buf[..]).expect("checked");
        prop_assert_eq!(Ipv4Repr::parse(&p).expect("parse"), r);
        let (h, _) = Ipv4Header::from_slice(&buf).expect("etherparse parses it");
        prop_assert_eq!(h.source, r.src_addr.octets());
        prop_assert_eq!(h.destination, r.dst_addr.octets());
        prop_assert_eq!(h.time_to_live, r.ttl);
        prop_assert_eq!(h.identification, r.ident);
        prop_assert_eq!(h.dont_fragment, r.dont_frag);
        prop_assert_eq!(h.more_fragments, r.more_frags);
        prop_assert_eq!(h.fragment_offset.value() * 8, r.frag_offset);
        prop_assert_eq!(h.protocol.0, u8::from(r.protocol));
        prop_assert_eq!(h.total_len, 20 + r.payload_len);
        prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
    }

    #[test]
    fn ipv4_options_are_parsed_as_etherparse_parses_them(words in 0usize..=10, fill in any::<u8>(), r in ipv4_repr()) {
        let hl = 20 + 4 * words;
        let mut buf = vec![fill; hl + 8];
        r.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]));
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_version_ihl(hl);
        p.set_total_len((hl + 8) as u16);
        p.fill_checksum();
        let p = Ipv4Packet::new_checked(&buf[..]).expect("checked");
        let (h, rest) = Ipv4Header::from_slice(&buf).expect("etherparse");
        prop_assert_eq!(&h.options[..], p.options());
        prop_assert_eq!(rest, p.payload());
        prop_assert_eq!(h.calc_header_checksum(), p.header_checksum());
    }

    #[test]
    fn tcp_round_trips_and_agrees_with_etherparse(r in tcp_repr(), src in addr(), dst in addr(), seed in any::<u8>()) {
        let mut buf = vec![0u8; r.buffer_len()];
        let hl = r.header_len();
        for (i, b) in buf[hl..].iter_mut().enumerate() { *b = seed.wrapping_add(i as u8); }
        r.emit(&mut TcpPacket::new_unchecked(&mut buf[..]), src, dst);
        let p = TcpPacket::new_checked(&buf[..]).expect("checked");
        prop_assert_eq!(TcpRepr::parse(&p, src, dst).expect("parse"), r);
        let (h, payload) = TcpHeader::from_slice(&buf).expect("etherparse parses it");
        prop_assert_eq!(h.source_port, r.src_port);
        prop_assert_eq!(h.destination_port, r.dst_port);
        prop_assert_eq!(h.sequence_number, r.seq_number);
        prop_assert_eq!(h.acknowledgment_number, r.ack_number);
        prop_assert_eq!(h.syn, r.flags.contains(TcpFlags::SYN));
        prop_assert_eq!(h.fin, r.flags.contains(TcpFlags::FIN));
        prop_assert_eq!(h.cwr, r.flags.contains(TcpFlags::CWR));
        prop_assert_eq!(h.ns, r.flags.contains(TcpFlags::NS));
        prop_assert_eq!(h.window_size, r.window_len);
        let mut mss = None; let mut ws = None; let mut sack = false; let mut ts = None;
        for o in h.options_iterator() {
            match o.expect("etherparse reads our options") {
                TcpOptionElement::MaximumSegmentSize(m) => mss = Some(m),
                TcpOptionElement::WindowScale(s) => ws = Some(s),
                TcpOptionElement::SelectiveAcknowledgementPermitted => sack = true,
                TcpOptionElement::Timestamp(a, b) => ts = Some((a, b)),
                _ => {}
            }
        }
        prop_assert_eq!((mss, ws, sack, ts), (r.max_seg_size, r.window_scale, r.sack_permitted, r.timestamps));
        let oracle = h.calc_checksum_ipv4_raw(src.octets(), dst.octets(), payload).expect("fits");
        prop_assert_eq!(oracle, p.checksum());
    }

    #[test]
    fn udp_round_trips_and_agrees_with_etherparse(sp in any::<u16>(), dp in 1u16.., payload in proptest::collection::vec(any::<u8>(), 0..1500), src in addr(), dst in addr()) {
        let r = UdpRepr { src_port: sp, dst_port: dp, payload_len: payload.len() as u16 };
        let mut buf = vec![0u8; r.buffer_len()];
        buf[8..].copy_from_slice(&payload);
        r.emit(&mut UdpPacket::new_unchecked(&mut buf[..]), Some((src, dst)));
        let p = UdpPacket::new_checked(&buf[..]).expect("checked");
        prop_assert_eq!(UdpRepr::parse(&p, src, dst).expect("parse"), r);
        let (h, _) = UdpHeader::from_slice(&buf).expect("etherparse");
        prop_assert_eq!(h.length as usize, buf.len());
        let oracle = h.calc_checksum_ipv4_raw(src.octets(), dst.octets(), &payload).expect("fits");
        prop_assert_eq!(oracle, p.checksum());
    }

    #[test]
    fn icmp_echo_round_trips_and_agrees_with_etherparse(ident in any::<u16>(), seq in any::<u16>(), reply in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let message = if reply { IcmpMessage::EchoReply { ident, seq_no: seq } } else { IcmpMessage::EchoRequest { ident, seq_no: seq } };
        let r = IcmpRepr { message, data: &data };
        let mut buf = vec![0u8; r.buffer_len()];
        r.emit(&mut IcmpPacket::new_unchecked(&mut buf[..]));
        let p = IcmpPacket::new_checked(&buf[..]).expect("checked");
        prop_assert_eq!(IcmpRepr::parse(&p).expect("parse"), r);
        let s = etherparse::Icmpv4Slice::from_slice(&buf).expect("etherparse");
        let mut h = s.header();
        h.update_checksum(s.payload());
        prop_assert_eq!(h.checksum, p.checksum());
    }

    #[test]
    fn arp_round_trips_and_agrees_with_etherparse(sha in any::<[u8; 6]>(), spa in addr(), tha in any::<[u8; 6]>(), tpa in addr(), op in 1u16..3) {
        let r = ArpRepr {
            operation: ArpOperation::from(op),
            source_hardware_addr: MacAddr(sha),
            source_protocol_addr: spa,
            target_hardware_addr: MacAddr(tha),
            target_protocol_addr: tpa,
        };
        let mut buf = [0u8; 28];
        r.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
        prop_assert_eq!(ArpRepr::parse(&ArpPacket::new_checked(&buf[..]).expect("checked")).expect("parse"), r);
        let a = etherparse::ArpPacket::from_slice(&buf).expect("etherparse").try_eth_ipv4().expect("eth/ipv4");
        prop_assert_eq!(a.sender_mac, sha);
        prop_assert_eq!(a.target_mac, tha);
        prop_assert_eq!(a.sender_ipv4, spa.octets());
        prop_assert_eq!(a.target_ipv4, tpa.octets());
        prop_assert_eq!(a.operation.0, op);
    }

    #[test]
    fn vxlan_round_trips(vni in 0u32..0x0100_0000) {
        let mut buf = [0u8; 8];
        VxlanRepr { vni }.emit(&mut VxlanPacket::new_unchecked(&mut buf[..]));
        prop_assert_eq!(VxlanRepr::parse(&VxlanPacket::new_checked(&buf[..]).expect("checked")), Ok(VxlanRepr { vni }));
    }

    #[test]
    fn vlan_tags_are_skipped_as_etherparse_skips_them(vid in 0u16..4095, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .single_vlan(etherparse::VlanId::try_new(vid).expect("vid"))
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut frame = Vec::new();
        builder.write(&mut frame, &payload).expect("write");
        let f = EthernetFrame::new_checked(&frame[..]).expect("checked");
        prop_assert_eq!(f.ethertype(), EtherType::Ipv4);
        prop_assert_eq!(f.vlan_id(), Some(vid));
        prop_assert_eq!(f.header_len(), 18);
        let ip = Ipv4Packet::new_checked(f.payload()).expect("ip");
        prop_assert!(ip.verify_checksum());
    }

    #[test]
    fn incremental_update_equals_full_recomputation(mut data in proptest::collection::vec(any::<u8>(), 4..400), word in any::<usize>(), new16 in any::<u16>(), new32 in any::<u32>()) {
        let n = data.len() / 2 * 2;
        data.truncate(n);
        let at = (word % (n / 2)) * 2;
        let before = checksum::checksum(&data);
        let old16 = u16::from_be_bytes([data[at], data[at + 1]]);
        data[at..at + 2].copy_from_slice(&new16.to_be_bytes());
        let inc = checksum::update16(before, old16, new16);
        let full = checksum::checksum(&data);
        // One's complement has two zeros; the checksum fields must agree as numbers mod 0xffff.
        prop_assert!(inc == full || (inc % 0xffff == full % 0xffff), "inc {:#x} full {:#x}", inc, full);
        if n >= 4 && at + 4 <= n {
            let before = checksum::checksum(&data);
            let old32 = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            data[at..at + 4].copy_from_slice(&new32.to_be_bytes());
            let inc = checksum::update32(before, old32, new32);
            let full = checksum::checksum(&data);
            prop_assert!(inc == full || (inc % 0xffff == full % 0xffff), "inc {:#x} full {:#x}", inc, full);
        }
    }

    #[test]
    fn wide_sum_agrees_with_etherparse(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        // etherparse sums native-endian words; its result is meant to be written with
        // `to_ne_bytes`, so read it back as the big-endian field value.
        let native = etherparse::checksum::Sum16BitWords::new().add_slice(&data).ones_complement();
        prop_assert_eq!(checksum::checksum(&data), u16::from_be_bytes(native.to_ne_bytes()));
    }

    #[test]
    fn partial_completion_equals_full_checksum(tcp_proto in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..1400), src in addr(), dst in addr()) {
        let l4 = if tcp_proto {
            L4::Tcp { sport: 1234, dport: 80, seq: 9, ack: 7, flags: 0x18, payload: &payload }
        } else {
            L4::Udp { sport: 1234, dport: 53, payload: &payload }
        };
        let full = testkit::eth(MacAddr::ZERO, MacAddr::ZERO, 0x0800, &testkit::ipv4(src, dst, &l4));
        let mut partial = full.clone();
        testkit::make_partial(&mut partial);
        let (proto, field) = if tcp_proto { (6u8, 16usize) } else { (17, 6) };
        let l4_bytes = &mut partial[34..];
        let state = checksum::classify_l4(src, dst, proto, l4_bytes, field);
        if state == checksum::L4ChecksumState::Partial {
            checksum::complete_partial(l4_bytes, field, !tcp_proto);
        } else {
            // A pseudo-header sum that happens to verify as a full checksum: nothing to do.
            prop_assert_eq!(state, checksum::L4ChecksumState::Valid);
        }
        prop_assert_eq!(&partial, &full);
    }

    /// Pod -> remote pod, with the pod's CHECKSUM_PARTIAL offload: what leaves the uplink is
    /// valid VXLAN to etherparse, and the inner packet's checksums verify.
    #[test]
    fn encapsulated_frames_are_valid_to_the_oracle(tcp_proto in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..1400), sport in 1u16.., partial in any::<bool>()) {
        let l4 = if tcp_proto {
            L4::Tcp { sport, dport: 443, seq: 1, ack: 2, flags: 0x18, payload: &payload }
        } else {
            L4::Udp { sport, dport: 53, payload: &payload }
        };
        let mut frame = testkit::from_pod1(&testkit::ipv4(testkit::POD1_IP, testkit::REMOTE_POD_B, &l4));
        if partial { testkit::make_partial(&mut frame); }
        let (d, out) = run(testkit::POD1, &frame);
        prop_assert_eq!(d, Disposition::Forward(testkit::UPLINK));
        let outer = etherparse::SlicedPacket::from_ethernet(&out).expect("outer parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &outer.net else { panic!("outer not IPv4") };
        let h = ip.header().to_header();
        prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
        prop_assert!(!h.dont_fragment);
        prop_assert_eq!(h.source, testkit::NODE_A.octets());
        prop_assert_eq!(h.destination, testkit::NODE_B.octets());
        let Some(etherparse::TransportSlice::Udp(u)) = &outer.transport else { panic!("outer not UDP") };
        prop_assert_eq!(u.destination_port(), 8472);
        prop_assert_eq!(u.checksum(), 0);
        prop_assert_eq!(usize::from(u.length()), out.len() - 34);
        let inner = etherparse::SlicedPacket::from_ethernet(&u.payload()[8..]).expect("inner parses");
        assert_inner_valid(&inner)?;
    }

    /// VXLAN from node B -> local pod: the delivered frame is valid to the oracle.
    #[test]
    fn decapsulated_frames_are_valid_to_the_oracle(tcp_proto in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..1400), ttl in 2u8..) {
        let l4 = if tcp_proto {
            L4::Tcp { sport: 5555, dport: 80, seq: 1, ack: 2, flags: 0x10, payload: &payload }
        } else {
            L4::Udp { sport: 5555, dport: 53, payload: &payload }
        };
        let inner = testkit::ipv4_with(&Ip { ttl, ..Ip::new(testkit::REMOTE_POD_B, testkit::POD1_IP) }, &l4);
        let (d, out) = run(testkit::UPLINK, &testkit::vxlan_frame(&Vxlan::b_to_a(), &inner));
        prop_assert_eq!(d, Disposition::Forward(testkit::POD1));
        let p = etherparse::SlicedPacket::from_ethernet(&out).expect("parses");
        assert_inner_valid(&p)?;
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
        prop_assert_eq!(ip.header().ttl(), ttl - 1);
    }

    /// Arbitrary bytes on any port never panic and always get a disposition; a drop is
    /// counted exactly once.
    #[test]
    fn arbitrary_bytes_never_panic(port in 0u16..5, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let tables = testkit::tables();
        let mut state = WorkerState::new(0);
        let mut buf = testkit::umem(&bytes);
        let mut f = FrameBuf::new(&mut buf, testkit::HEADROOM, bytes.len()).expect("fits");
        let d = process_frame(&tables, &mut state, 0, dataplane::tables::PortId(port), &mut f);
        if let Disposition::Drop(r) = d {
            prop_assert_eq!(state.counters.drop_total(r), 1);
        }
    }

    /// Valid frames with one byte flipped: never a panic; anything forwarded still has a valid
    /// outer/inner IPv4 header checksum.
    #[test]
    fn mutated_frames_never_panic(which in 0usize..3, at in any::<usize>(), xor in 1u8..) {
        let inner = testkit::ipv4(testkit::REMOTE_POD_B, testkit::POD1_IP, &L4::Tcp { sport: 1, dport: 2, seq: 3, ack: 4, flags: 0x10, payload: b"0123456789" });
        let (port, mut frame) = match which {
            0 => (testkit::UPLINK, testkit::vxlan_frame(&Vxlan::b_to_a(), &inner)),
            1 => (testkit::POD1, testkit::from_pod1(&testkit::ipv4(testkit::POD1_IP, testkit::REMOTE_POD_B, &L4::Udp { sport: 1, dport: 2, payload: b"abc" }))),
            _ => (testkit::POD1, testkit::arp_request(testkit::POD1_MAC, testkit::POD1_IP, testkit::GATEWAY_A)),
        };
        let i = at % frame.len();
        frame[i] ^= xor;
        let (d, out) = run(port, &frame);
        if matches!(d, Disposition::Forward(_) | Disposition::ToHost) && out.len() > 34 && out[12..14] == [8, 0] {
            let ip = Ipv4Packet::new_checked(&out[14..]).expect("forwarded IPv4 parses");
            prop_assert!(ip.verify_checksum());
        }
    }
}

fn run(port: dataplane::tables::PortId, frame: &[u8]) -> (Disposition, Vec<u8>) {
    let tables = testkit::tables();
    let mut state = WorkerState::new(0);
    let mut buf = testkit::umem(frame);
    let mut f = FrameBuf::new(&mut buf, testkit::HEADROOM, frame.len()).expect("fits");
    let d = process_frame(&tables, &mut state, 0, port, &mut f);
    (d, f.data().to_vec())
}

fn assert_inner_valid(p: &etherparse::SlicedPacket<'_>) -> Result<(), TestCaseError> {
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        return Err(TestCaseError::fail("inner not IPv4"));
    };
    let h = ip.header().to_header();
    prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
    match &p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => {
            let c = t.calc_checksum_ipv4(h.source, h.destination);
            prop_assert_eq!(c.ok(), Some(t.checksum()), "inner TCP checksum");
        }
        Some(etherparse::TransportSlice::Udp(u)) => {
            let hdr = u.to_header();
            let c = hdr.calc_checksum_ipv4_raw(h.source, h.destination, u.payload()).expect("fits");
            prop_assert_eq!(c, u.checksum(), "inner UDP checksum");
        }
        other => return Err(TestCaseError::fail(format!("unexpected transport {other:?}"))),
    }
    Ok(())
}
