//! Per-port checksum policies (complete, verify, trust) and the outer VXLAN UDP checksum
//! (zero or computed), through the pipeline; etherparse judges what comes out.

use dataplane::pipeline::{process_frame, Disposition, DropReason, FrameBuf, WorkerState};
use dataplane::tables::{ChecksumPolicy, Tables};
use dataplane::testkit::{self, Vxlan, L4, POD1, POD1_IP, REMOTE_POD_B, UPLINK};

fn tables(policy: ChecksumPolicy, outer: bool) -> Tables {
    let node = dataplane::tables::NodeConfig { outer_udp_checksum: outer, ..testkit::node_config() };
    testkit::builder(node)
        .and_then(|b| b.checksum_policy(POD1, policy))
        .and_then(|b| b.checksum_policy(UPLINK, policy))
        .and_then(|b| b.build())
        .expect("tables")
}

fn run(t: &Tables, port: dataplane::tables::PortId, frame: &[u8]) -> (Disposition, Vec<u8>, WorkerState) {
    let mut state = WorkerState::new(0);
    let mut buf = vec![0u8; 128 + frame.len() + 64];
    buf[128..128 + frame.len()].copy_from_slice(frame);
    let mut f = FrameBuf::new(&mut buf, 128, frame.len()).expect("fits");
    let d = process_frame(t, &mut state, 0, port, &mut f);
    let out = f.data().to_vec();
    (d, out, state)
}

fn udp_from_pod1() -> Vec<u8> {
    testkit::from_pod1(&testkit::ipv4(POD1_IP, REMOTE_POD_B, &L4::Udp { sport: 5000, dport: 53, payload: b"query" }))
}

/// The inner UDP checksum of an encapsulated frame, and whether etherparse finds it right.
fn inner_udp_ok(out: &[u8]) -> bool {
    let p = etherparse::SlicedPacket::from_ethernet(&out[50..]).expect("inner parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("inner not IPv4") };
    let h = ip.header().to_header();
    let Some(etherparse::TransportSlice::Udp(u)) = &p.transport else { panic!("inner not UDP") };
    u.to_header().calc_checksum_ipv4_raw(h.source, h.destination, u.payload()).ok() == Some(u.checksum())
}

#[test]
fn verify_drops_a_bad_checksum_by_name_and_completes_a_partial_one() {
    let t = tables(ChecksumPolicy::Verify, false);
    let mut bad = udp_from_pod1();
    let n = bad.len();
    bad[n - 1] ^= 0xff; // payload corrupted after the checksum was computed
    assert_eq!(run(&t, POD1, &bad).0, Disposition::Drop(DropReason::L4BadChecksum));
    let (d, out, _) = run(&t, POD1, &udp_from_pod1());
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert!(inner_udp_ok(&out));
    let mut partial = udp_from_pod1();
    testkit::make_partial(&mut partial);
    let (d, out, state) = run(&t, POD1, &partial);
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert!(inner_udp_ok(&out), "completed in software");
    assert_eq!(state.counters.port(POD1).expect("port").events.partial_checksums_completed, 1);
}

#[test]
fn complete_fixes_partial_checksums_and_trust_looks_at_nothing() {
    let mut partial = udp_from_pod1();
    testkit::make_partial(&mut partial);
    let (_, out, _) = run(&tables(ChecksumPolicy::Complete, false), POD1, &partial);
    assert!(inner_udp_ok(&out));
    let (d, out, _) = run(&tables(ChecksumPolicy::Trust, false), POD1, &partial);
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert!(!inner_udp_ok(&out), "trust: the pseudo-header-only checksum goes out as it came");
    // Complete does not judge full checksums, right or wrong.
    let mut bad = udp_from_pod1();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    assert_eq!(run(&tables(ChecksumPolicy::Complete, false), POD1, &bad).0, Disposition::Forward(UPLINK));
}

#[test]
fn the_outer_udp_checksum_is_zero_or_computed_and_verified_on_receive() {
    let (_, out, _) = run(&tables(ChecksumPolicy::Complete, false), POD1, &udp_from_pod1());
    assert_eq!(&out[40..42], &[0, 0], "zero by default (RFC 7348, flannel)");
    let (_, out, _) = run(&tables(ChecksumPolicy::Complete, true), POD1, &udp_from_pod1());
    let p = etherparse::SlicedPacket::from_ethernet(&out).expect("outer parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("outer not IPv4") };
    let h = ip.header().to_header();
    let Some(etherparse::TransportSlice::Udp(u)) = &p.transport else { panic!("outer not UDP") };
    assert_ne!(u.checksum(), 0);
    assert_eq!(u.to_header().calc_checksum_ipv4_raw(h.source, h.destination, u.payload()).ok(), Some(u.checksum()));
    // Received: a computed outer checksum passes, a corrupted one is a named drop (incident 1).
    let inner = testkit::ipv4(REMOTE_POD_B, POD1_IP, &L4::Udp { sport: 53, dport: 5000, payload: b"answer" });
    let good = testkit::vxlan_frame(&Vxlan { udp_checksum: true, ..Vxlan::b_to_a() }, &inner);
    let t = tables(ChecksumPolicy::Complete, false);
    assert_eq!(run(&t, UPLINK, &good).0, Disposition::Forward(POD1));
    let mut bad = good.clone();
    bad[40] ^= 0x01;
    let (d, _, state) = run(&t, UPLINK, &bad);
    assert_eq!(d, Disposition::Drop(DropReason::VxlanBadOuterChecksum));
    assert_eq!(state.counters.port(UPLINK).expect("port").drops[DropReason::VxlanBadOuterChecksum.index()], 1);
}
