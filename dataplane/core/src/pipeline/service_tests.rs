//! The Service NAT stage: fixtures over node A's sample tables with a few Services.

use super::*;
use crate::nat::service::{Endpoint, Frontend, FrontendKind, ServicePort, ServiceTable};
use crate::nat::snat::SnatAllocator;
use crate::tables::PortId;
use crate::testkit::*;
use crate::wire::{IcmpPacket, Ipv4Packet, TcpFlags, TcpPacket, UdpPacket};
use core::net::Ipv4Addr;

const VIP_WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10); // TCP 80 -> pod2:8080 and remote pod B:8080
const VIP_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11); // UDP 53 -> pod2:5353
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12); // TCP 80 and UDP 53, no endpoints
const VIP_SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14); // TCP 80 -> pod1:8080 (hairpin)
const VIP_POD2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15); // TCP 80 -> pod2:8080 only
const S: u64 = 1_000_000_000;

fn ep(ip: Ipv4Addr, port: u16, local: bool) -> Endpoint {
    Endpoint { ip, port, ready: true, serving: true, terminating: false, local }
}

fn services() -> ServiceTable {
    let mut t = ServiceTable::default();
    let mut add = |vip: Ipv4Addr, proto: u8, port: u16, eps: &[Endpoint], name: &str| {
        let i = t.add_port(ServicePort::new(name.into(), eps, false, false, None, 16381).unwrap());
        t.add_frontend(Frontend { proto, ip: vip, port }, FrontendKind::ClusterIp, i).unwrap();
    };
    add(VIP_WEB, 6, 80, &[ep(POD2_IP, 8080, true), ep(REMOTE_POD_B, 8080, false)], "default/web:http");
    add(VIP_DNS, 17, 53, &[ep(POD2_IP, 5353, true)], "kube-system/dns:dns");
    add(VIP_EMPTY, 6, 80, &[], "default/empty:http");
    add(VIP_EMPTY, 17, 53, &[], "default/empty:dns");
    add(VIP_SELF, 6, 80, &[ep(POD1_IP, 8080, true)], "default/self:http");
    add(VIP_POD2, 6, 80, &[ep(POD2_IP, 8080, true)], "default/pod2:http");
    // NodePorts: 30080 Cluster policy, 30081 Local policy, 30082 no endpoints.
    let c = t.add_port(
        ServicePort::new(
            "default/np:http".into(),
            &[ep(POD2_IP, 8080, true), ep(REMOTE_POD_B, 8080, false)],
            false,
            false,
            None,
            16381,
        )
        .unwrap(),
    );
    t.add_node_port(6, 30080, c).unwrap();
    let l = t.add_port(
        ServicePort::new(
            "default/nplocal:http".into(),
            &[ep(POD2_IP, 8080, true), ep(REMOTE_POD_B, 8080, false)],
            true,
            false,
            None,
            16381,
        )
        .unwrap(),
    );
    t.add_node_port(6, 30081, l).unwrap();
    let e = t.add_port(ServicePort::new("default/npempty:http".into(), &[], false, false, None, 16381).unwrap());
    t.add_node_port(6, 30082, e).unwrap();
    t.add_node_port(17, 30082, e).unwrap();
    t
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_MAC: crate::wire::MacAddr = crate::wire::MacAddr([0x02, 0xcc, 0, 0, 0, 7]);

fn from_client(sport: u16, node_port: u16, flags: u16) -> Vec<u8> {
    eth(UPLINK_MAC, CLIENT_MAC, 0x0800, &tcp(CLIENT, NODE_A, sport, node_port, flags, 100, 0))
}

fn tables() -> Tables {
    tables_with_services(services())
}

fn run(t: &Tables, st: &mut WorkerState, now: u64, port: PortId, input: &[u8]) -> (Disposition, Vec<u8>) {
    let mut buf = umem(input);
    let mut f = FrameBuf::new(&mut buf, HEADROOM, input.len()).unwrap();
    let d = process_frame(t, st, now, port, &mut f);
    (d, f.data().to_vec())
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u16, seq: u32, ack: u32) -> Vec<u8> {
    ipv4(src, dst, &L4::Tcp { sport, dport, seq, ack, flags, payload: b"" })
}

/// The IPv4 packet inside `out` (an Ethernet frame, or VXLAN when encapsulated), checked.
fn inner_ip(out: &[u8], encapsulated: bool) -> Vec<u8> {
    let ip = if encapsulated { &out[64..] } else { &out[14..] };
    let p = Ipv4Packet::new_checked(ip).expect("valid IPv4");
    assert!(p.verify_checksum(), "IPv4 header checksum");
    ip[..usize::from(p.total_len())].to_vec()
}

fn tcp_view(ip: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16, TcpFlags, u32, u32) {
    let p = Ipv4Packet::new_checked(ip).unwrap();
    let t = TcpPacket::new_checked(p.payload()).unwrap();
    assert!(t.verify_checksum(p.src_addr(), p.dst_addr()), "TCP checksum after NAT");
    (p.src_addr(), p.dst_addr(), t.src_port(), t.dst_port(), t.flags(), t.seq_number(), t.ack_number())
}

/// A client source port whose flow Maglev sends to `want`.
fn sport_toward(t: &Tables, want: Ipv4Addr) -> u16 {
    (40000..41000)
        .find(|&sp| {
            let mut st = WorkerState::with_flows(0, 16);
            let (_, out) = run(t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1000, 0)));
            let encapsulated =
                out.len() > 70 && out[12..14] == [8, 0] && out[23] == 17 && out[36..38] == 8472u16.to_be_bytes();
            tcp_view(&inner_ip(&out, encapsulated)).1 == want
        })
        .expect("Maglev uses both endpoints")
}

#[test]
fn cluster_ip_to_a_local_endpoint_and_back() {
    let t = tables();
    let sp = sport_toward(&t, POD2_IP);
    let mut st = WorkerState::with_flows(0, 16);
    let (d, out) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1000, 0)));
    assert_eq!(d, Disposition::Forward(POD2));
    let (s, dst, ssp, dsp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, ssp, dsp), (POD1_IP, POD2_IP, sp, 8080), "DNAT to the endpoint, client kept");
    assert_eq!(st.flows.len(), 1);
    // The endpoint answers; the client sees the Service address.
    let synack = eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &tcp(POD2_IP, POD1_IP, 8080, sp, 0x012, 5000, 1001));
    let (d, out) = run(&t, &mut st, S, POD2, &synack);
    assert_eq!(d, Disposition::Forward(POD1));
    let (s, dst, ssp, dsp, f, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, ssp, dsp, f), (VIP_WEB, POD1_IP, 80, sp, TcpFlags(0x012)));
    assert_eq!(st.counters.port(POD1).map(|c| c.events.service_flows), Some(1));
}

#[test]
fn cluster_ip_to_a_remote_endpoint_and_the_reply_through_the_tunnel() {
    let t = tables();
    let sp = sport_toward(&t, REMOTE_POD_B);
    let mut st = WorkerState::with_flows(0, 16);
    let (d, out) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1000, 0)));
    assert_eq!(d, Disposition::Forward(UPLINK));
    let (s, dst, _, dsp, ..) = tcp_view(&inner_ip(&out, true));
    assert_eq!((s, dst, dsp), (POD1_IP, REMOTE_POD_B, 8080));
    let reply = vxlan_frame(
        &Vxlan::b_to_a(),
        &ipv4_with(
            &Ip { ttl: 63, ..Ip::new(REMOTE_POD_B, POD1_IP) },
            &L4::Tcp { sport: 8080, dport: sp, seq: 7, ack: 1001, flags: 0x012, payload: b"" },
        ),
    );
    let (d, out) = run(&t, &mut st, S, UPLINK, &reply);
    assert_eq!(d, Disposition::Forward(POD1));
    let (s, _, ssp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, ssp), (VIP_WEB, 80), "reverse NAT on the decapsulated reply");
}

#[test]
fn udp_service_request_and_response() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    let q = from_pod1(&ipv4(POD1_IP, VIP_DNS, &L4::Udp { sport: 33333, dport: 53, payload: b"query" }));
    let (d, out) = run(&t, &mut st, 0, POD1, &q);
    assert_eq!(d, Disposition::Forward(POD2));
    let ip = inner_ip(&out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    let u = UdpPacket::new_checked(p.payload()).unwrap();
    assert!(u.verify_checksum(p.src_addr(), p.dst_addr()));
    assert_eq!((p.dst_addr(), u.dst_port()), (POD2_IP, 5353));
    let a = eth(
        POD2_PORT_MAC,
        POD2_MAC,
        0x0800,
        &ipv4(POD2_IP, POD1_IP, &L4::Udp { sport: 5353, dport: 33333, payload: b"answer" }),
    );
    let (_, out) = run(&t, &mut st, S, POD2, &a);
    let ip = inner_ip(&out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    let u = UdpPacket::new_checked(p.payload()).unwrap();
    assert!(u.verify_checksum(p.src_addr(), p.dst_addr()));
    assert_eq!((p.src_addr(), u.src_port(), u.payload()), (VIP_DNS, 53, &b"answer"[..]));
}

/// The ICMP port unreachable in `out` (an Ethernet frame): its outer source and destination,
/// and the quoted packet's source and destination ports; checksums verified.
fn port_unreachable_view(out: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ip = inner_ip(out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    let icmp = IcmpPacket::new_checked(p.payload()).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!((icmp.msg_type(), icmp.msg_code()), (3, 3), "port unreachable");
    let q = icmp.embedded_ipv4().unwrap();
    let ports = &q.payload()[..4];
    (p.src_addr(), p.dst_addr(), u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]))
}

#[test]
fn no_endpoint_is_refused_like_kube_proxy() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    let (d, out) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_EMPTY, 41000, 80, 0x002, 1000, 0)));
    assert_eq!(d, Disposition::Forward(POD1));
    // TCP too: kube-proxy's reject is ICMP port unreachable (connect gets "connection refused").
    assert_eq!(port_unreachable_view(&out), (VIP_EMPTY, POD1_IP, 41000, 80));
    let udp = from_pod1(&ipv4(POD1_IP, VIP_EMPTY, &L4::Udp { sport: 1, dport: 53, payload: b"q" }));
    let (d, out) = run(&t, &mut st, 0, POD1, &udp);
    assert_eq!(d, Disposition::Forward(POD1));
    let ip = inner_ip(&out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    let icmp = IcmpPacket::new_checked(p.payload()).unwrap();
    assert_eq!((p.src_addr(), icmp.msg_type(), icmp.msg_code()), (VIP_EMPTY, 3, 3));
    assert!(icmp.verify_checksum());
    assert_eq!(st.counters.port(POD1).map(|c| c.drop_count(DropReason::ServiceNoEndpoint)), Some(2));
    assert_eq!(st.flows.len(), 0);
}

#[test]
fn hairpin_is_snatted_to_the_gateway() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    let (d, out) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_SELF, 42000, 80, 0x002, 1, 0)));
    assert_eq!(d, Disposition::Forward(POD1));
    let (s, dst, ssp, dsp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, dsp), (GATEWAY_A, POD1_IP, 8080));
    assert!((1024..=29999).contains(&ssp), "SNAT port {ssp}");
    let back = from_pod1(&tcp(POD1_IP, GATEWAY_A, 8080, ssp, 0x012, 9, 2));
    let (d, out) = run(&t, &mut st, S, POD1, &back);
    assert_eq!(d, Disposition::Forward(POD1));
    let (s, dst, ssp2, dsp2, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, ssp2, dsp2), (VIP_SELF, POD1_IP, 80, 42000));
}

#[test]
fn a_full_flow_table_refuses_new_flows() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 1);
    run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_POD2, 43000, 80, 0x002, 1, 0)));
    // Established (a handshake in progress would be early-dropped instead: flood_tests.rs).
    let synack = eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &tcp(POD2_IP, POD1_IP, 8080, 43000, 0x012, 9, 2));
    run(&t, &mut st, 0, POD2, &synack);
    run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_POD2, 43000, 80, 0x010, 2, 10)));
    let (d, _) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_POD2, 43001, 80, 0x002, 1, 0)));
    assert_eq!(d, Disposition::Drop(DropReason::ConntrackFull));
}

#[test]
fn a_reply_tuple_already_tracked_is_a_named_collision() {
    let t = tables();
    let sp = sport_toward(&t, POD2_IP);
    let mut st = WorkerState::with_flows(0, 16);
    run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1, 0)));
    // Same client port to another Service with the same endpoint: same reply tuple.
    let (d, _) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_POD2, sp, 80, 0x002, 1, 0)));
    assert_eq!(d, Disposition::Drop(DropReason::ConntrackCollision));
}

/// Hairpin flows through the Service (the endpoint is the client itself) are SNAT'd; with a
/// one-port range, the tuple's life decides what the next connection gets. The endpoint closes
/// first here: it holds the tuple in TIME_WAIT, so the next SYN gets it with its sequence
/// numbers moved past the old connection's (translated both ways for the flow's life), and a
/// connection while the tuple is in use is refused with a RST and counted.
#[test]
fn a_tuple_the_endpoint_closed_first_is_reused_with_offsets_and_one_in_use_is_refused() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    st.snat = SnatAllocator::new(2000..=2000, 65 * S, 1);
    let c = |sp: u16, flags: u16, seq: u32, ack: u32| from_pod1(&tcp(POD1_IP, VIP_SELF, sp, 80, flags, seq, ack));
    let e = |flags: u16, seq: u32, ack: u32| from_pod1(&tcp(POD1_IP, GATEWAY_A, 8080, 2000, flags, seq, ack));
    run(&t, &mut st, 0, POD1, &c(44000, 0x002, 100, 0));
    run(&t, &mut st, 0, POD1, &e(0x012, 900, 101));
    run(&t, &mut st, 0, POD1, &c(44000, 0x010, 101, 901));
    let (_, out) = run(&t, &mut st, S, POD1, &c(44001, 0x002, 5000, 0));
    assert_eq!(
        tcp_view(&inner_ip(&out, false)).4,
        TcpFlags::RST | TcpFlags::ACK,
        "refused while the only tuple is in use"
    );
    assert_eq!(st.counters.port(POD1).map(|c| c.drop_count(DropReason::SnatPortsExhausted)), Some(1));
    run(&t, &mut st, S, POD1, &e(0x011, 901, 101)); // the endpoint closes first
    run(&t, &mut st, S, POD1, &c(44000, 0x011, 101, 902)); // the client's FIN: seq end 102
    run(&t, &mut st, S, POD1, &e(0x010, 902, 102)); // TIME_WAIT: the tuple is given back, held
    assert_eq!(st.snat.stats(S).held, 1);
    // A new connection at 2 s: the held tuple, its SYN moved to 102 + 2^17 (the client's ISN
    // 5000 is behind the old connection's 102 as a number: the offset is what matters).
    let (d, out) = run(&t, &mut st, 2 * S, POD1, &c(44002, 0x002, 5000, 0));
    assert_eq!(d, Disposition::Forward(POD1));
    let (src, _, sp, _, flags, seq, _) = tcp_view(&inner_ip(&out, false));
    assert_eq!((src, sp, flags), (GATEWAY_A, 2000, TcpFlags::SYN), "the same tuple");
    assert_eq!(seq, 102 + (1 << 17), "past the old connection's last sequence number");
    assert_eq!(st.snat.stats(2 * S).reused_with_offsets, 1);
    // The endpoint answers; the client sees its own sequence space.
    let (_, out) = run(&t, &mut st, 2 * S, POD1, &e(0x012, 7000, seq + 1));
    let (.., flags, _, ack) = tcp_view(&inner_ip(&out, false));
    assert_eq!((flags, ack), (TcpFlags::SYN | TcpFlags::ACK, 5001), "ack translated back");
    let (_, out) = run(&t, &mut st, 2 * S, POD1, &c(44002, 0x010, 5001, 7001));
    assert_eq!(tcp_view(&inner_ip(&out, false)).5, seq + 1, "every client segment offset");
    assert_eq!(st.counters.port(POD1).map(|c| c.events.snat_reuse_bare_ack), Some(0));
    // A segment of that flow whose options cannot be walked (a timestamps option of length 0)
    // cannot be translated: dropped, named.
    let mut seg = vec![0u8; 24];
    seg[0..2].copy_from_slice(&44002u16.to_be_bytes());
    seg[2..4].copy_from_slice(&80u16.to_be_bytes());
    seg[4..8].copy_from_slice(&5001u32.to_be_bytes());
    seg[8..12].copy_from_slice(&7001u32.to_be_bytes());
    seg[12..14].copy_from_slice(&(0x6000u16 | 0x010).to_be_bytes());
    seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
    seg[20..24].copy_from_slice(&[8, 0, 1, 1]);
    let sum = crate::wire::checksum::l4_checksum(POD1_IP, VIP_SELF, 6, &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    let bad = from_pod1(&crate::testkit::ipv4(POD1_IP, VIP_SELF, &crate::testkit::L4::Raw { proto: 6, bytes: &seg }));
    let (d, _) = run(&t, &mut st, 2 * S, POD1, &bad);
    assert_eq!(d, Disposition::Drop(DropReason::ReusedTupleBadOptions));
    assert_eq!(st.counters.port(POD1).map(|c| c.drop_count(DropReason::ReusedTupleBadOptions)), Some(1));
}

/// A segment with a Timestamps option (`ts`: TSval, TSecr), built by etherparse.
fn tcp_ts(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), flags: u16, seq: u32, ack: u32, ts: (u32, u32)) -> Vec<u8> {
    use etherparse::{TcpHeader, TcpOptionElement::*};
    let mut h = TcpHeader::new(ports.0, ports.1, seq, 64240);
    h.acknowledgment_number = ack;
    (h.fin, h.syn, h.rst, h.ack) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0, flags & 0x10 != 0);
    h.set_options(&[Noop, Noop, Timestamp(ts.0, ts.1)]).expect("fits");
    h.checksum = h.calc_checksum_ipv4_raw(src.octets(), dst.octets(), &[]).expect("small");
    ipv4(src, dst, &L4::Raw { proto: 6, bytes: &h.to_bytes() })
}

/// Pod1 as the client of VIP_SELF from `sport`, and as its endpoint answering SNAT port 2000
/// (hairpin), with timestamps.
fn client_ts(sport: u16, flags: u16, seq: u32, ack: u32, ts: (u32, u32)) -> Vec<u8> {
    from_pod1(&tcp_ts(POD1_IP, VIP_SELF, (sport, 80), flags, seq, ack, ts))
}

fn endpoint_ts(flags: u16, seq: u32, ack: u32, ts: (u32, u32)) -> Vec<u8> {
    from_pod1(&tcp_ts(POD1_IP, GATEWAY_A, (8080, 2000), flags, seq, ack, ts))
}

/// Sequence number, ACK number and (TSval, TSecr) of the TCP segment in `ip`, read by
/// etherparse after the pipeline's own checks (`tcp_view`).
fn ts_view(ip: &[u8]) -> (u32, u32, (u32, u32)) {
    tcp_view(ip);
    let p = Ipv4Packet::new_checked(ip).unwrap();
    let (h, _) = etherparse::TcpHeader::from_slice(p.payload()).expect("parses");
    let ts = h.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::Timestamp(v, e)) => Some((v, e)),
        _ => None,
    });
    (h.sequence_number, h.acknowledgment_number, ts.expect("a Timestamps option"))
}

/// One hairpin connection through VIP_SELF on a one-port SNAT range, with timestamps, that the
/// endpoint closes first: the tuple is held, and the endpoint last saw the client's sequence
/// end 102 and TSval 1,000,020 on it.
fn a_tuple_held_with_timestamps(t: &Tables, st: &mut WorkerState) {
    st.snat = SnatAllocator::new(2000..=2000, 65 * S, 1);
    run(t, st, 0, POD1, &client_ts(44000, 0x002, 100, 0, (1_000_000, 0)));
    run(t, st, 0, POD1, &endpoint_ts(0x012, 900, 101, (5000, 1_000_000)));
    run(t, st, 0, POD1, &client_ts(44000, 0x010, 101, 901, (1_000_010, 5000)));
    run(t, st, S, POD1, &endpoint_ts(0x011, 901, 101, (5001, 1_000_010))); // the endpoint closes first
    run(t, st, S, POD1, &client_ts(44000, 0x011, 101, 902, (1_000_020, 5001)));
    run(t, st, S, POD1, &endpoint_ts(0x010, 902, 102, (5002, 1_000_020))); // TIME_WAIT: held
    assert_eq!(st.snat.stats(S).held, 1);
}

/// What the endpoint's TIME_WAIT judges is the SYN as it arrives, so a new client's own ISN and
/// timestamp clock do not matter: behind the old connection's, far ahead, or about to wrap, the
/// reused tuple's SYN lands just past the old connection (sequence end 102 + 2^17, TSval
/// 1,000,020 + 1000), and the client sees its own numbers in every reply.
#[test]
fn a_reused_tuple_takes_clients_whose_isn_or_clock_is_behind_ahead_or_wrapping() {
    let t = tables();
    for (what, isn, tsval) in [
        ("ISN and clock behind the old connection's", 50, 10),
        ("ISN behind, clock ahead", 7, 3_000_000),
        ("ISN ahead, clock behind", 0x8000_0000, 999_000),
        ("both far ahead", 0x9000_0000, 0xf000_0000),
        ("both about to wrap", 0xffff_fff0, 0xffff_fffe),
    ] {
        let mut st = WorkerState::with_flows(0, 16);
        a_tuple_held_with_timestamps(&t, &mut st);
        let (d, out) = run(&t, &mut st, 2 * S, POD1, &client_ts(44002, 0x002, isn, 0, (tsval, 0)));
        assert_eq!(d, Disposition::Forward(POD1), "{what}");
        let syn = inner_ip(&out, false);
        assert_eq!(tcp_view(&syn).2, 2000, "{what}: the held tuple");
        let (seq, _, (ts_seen, _)) = ts_view(&syn);
        assert_eq!((seq, ts_seen), (102 + (1 << 17), 1_001_020), "{what}: the SYN past the old connection");
        // The endpoint's SYN|ACK: the client sees its own ISN acknowledged and its TSval echoed.
        let (_, out) = run(&t, &mut st, 2 * S, POD1, &endpoint_ts(0x012, 7000, seq + 1, (6000, ts_seen)));
        let (_, ack, (_, ecr)) = ts_view(&inner_ip(&out, false));
        assert_eq!((ack, ecr), (isn.wrapping_add(1), tsval), "{what}: the reply in the client's numbers");
        // Data: the client's numbers move on from its own, the endpoint's from what it saw.
        let (_, out) = run(
            &t,
            &mut st,
            2 * S,
            POD1,
            &client_ts(44002, 0x018, isn.wrapping_add(1), 7001, (tsval.wrapping_add(5), 6000)),
        );
        let (seq2, ack2, (ts2, ecr2)) = ts_view(&inner_ip(&out, false));
        assert_eq!((seq2, ack2, ts2, ecr2), (seq + 1, 7001, 1_001_025, 6000), "{what}: every client segment");
    }
}

/// An ICMP error about a segment of a reused flow quotes it as the endpoint's side saw it
/// (offset); the client's TCP ignores an error whose quoted sequence number it never sent (path
/// MTU discovery would stall), so the quote gets the client's own numbers back: a whole quoted
/// header (Linux quotes up to 576 bytes) and RFC 792's minimum of 8 bytes alike.
#[test]
fn icmp_errors_about_a_reused_flow_quote_the_clients_own_numbers() {
    let t = tables();
    for quoted in [32, 8] {
        let mut st = WorkerState::with_flows(0, 16);
        a_tuple_held_with_timestamps(&t, &mut st);
        let (isn, tsval) = (50, 10);
        let (_, out) = run(&t, &mut st, 2 * S, POD1, &client_ts(44002, 0x002, isn, 0, (tsval, 0)));
        let (seq, ..) = ts_view(&inner_ip(&out, false));
        // The endpoint (pod1 itself: hairpin) cannot take a segment it was sent: frag needed,
        // quoting it as it arrived, offsets and all.
        let seen = tcp_ts(GATEWAY_A, POD1_IP, (2000, 8080), 0x018, seq + 1, 7001, (1_001_025, 6000));
        let mut body = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        body.extend_from_slice(&seen[..20 + quoted]);
        let sum = crate::wire::checksum::checksum(&body);
        body[2..4].copy_from_slice(&sum.to_be_bytes());
        let err = from_pod1(&ipv4(POD1_IP, GATEWAY_A, &L4::Raw { proto: 1, bytes: &body }));
        let (d, out) = run(&t, &mut st, 2 * S, POD1, &err);
        assert_eq!(d, Disposition::Forward(POD1), "quote of {quoted}");
        let ip = inner_ip(&out, false);
        let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
        assert_eq!((p.src_addr(), p.dst_addr()), (VIP_SELF, POD1_IP), "from the Service address");
        let icmp = IcmpPacket::new_checked(p.payload()).unwrap();
        assert!(icmp.verify_checksum(), "quote of {quoted}: ICMP checksum");
        let q = icmp.embedded_ipv4().unwrap();
        assert_eq!((q.src_addr(), q.dst_addr()), (POD1_IP, VIP_SELF), "the packet as the client sent it");
        let l4 = q.payload();
        assert_eq!(&l4[..4], &[0xab, 0xe2, 0, 80], "quote of {quoted}: the client's ports");
        assert_eq!(&l4[4..8], &(isn + 1).to_be_bytes(), "quote of {quoted}: the client's own sequence number");
        if quoted == 32 {
            let (h, _) = etherparse::TcpHeader::from_slice(l4).expect("a whole header");
            let ts = h.options_iterator().find_map(|o| match o {
                Ok(etherparse::TcpOptionElement::Timestamp(v, e)) => Some((v, e)),
                _ => None,
            });
            assert_eq!(ts, Some((tsval + 5, 6000)), "and its own clock");
            assert!(
                TcpPacket::new_checked(l4).unwrap().verify_checksum(POD1_IP, VIP_SELF),
                "the quoted checksum follows"
            );
        }
    }
}

/// The client closes first (or the flow is reset): the endpoint keeps no TIME_WAIT, so the
/// tuple is free the moment the flow closes, and the next connection gets it untouched.
#[test]
fn a_tuple_the_client_closed_first_or_reset_is_free_at_once() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    st.snat = SnatAllocator::new(2000..=2000, 65 * S, 1);
    let c = |sp: u16, flags: u16, seq: u32| from_pod1(&tcp(POD1_IP, VIP_SELF, sp, 80, flags, seq, 1));
    let e = |flags: u16, ack: u32| from_pod1(&tcp(POD1_IP, GATEWAY_A, 8080, 2000, flags, 1, ack));
    run(&t, &mut st, 0, POD1, &c(44000, 0x002, 100));
    run(&t, &mut st, 0, POD1, &e(0x012, 101));
    run(&t, &mut st, 0, POD1, &c(44000, 0x010, 101));
    run(&t, &mut st, S, POD1, &c(44000, 0x011, 101)); // the client closes first
    run(&t, &mut st, S, POD1, &e(0x011, 102)); // its FIN acknowledges the client's: passive
    run(&t, &mut st, S, POD1, &c(44000, 0x010, 102)); // TIME_WAIT on the client's side only
    let (d, out) = run(&t, &mut st, S, POD1, &c(44001, 0x002, 7777));
    assert_eq!(d, Disposition::Forward(POD1));
    let (_, _, sp, _, flags, seq, _) = tcp_view(&inner_ip(&out, false));
    assert_eq!((sp, flags, seq), (2000, TcpFlags::SYN, 7777), "the tuple at once, without offsets");
    run(&t, &mut st, S, POD1, &e(0x004, 0)); // reset by the endpoint
    let (_, out) = run(&t, &mut st, S, POD1, &c(44003, 0x002, 1234));
    let (src, _, sp, _, flags, seq, _) = tcp_view(&inner_ip(&out, false));
    assert_eq!((src, sp, flags, seq), (GATEWAY_A, 2000, TcpFlags::SYN, 1234), "free at once after a reset too");
    let stats = st.snat.stats(S);
    assert_eq!((stats.held, stats.reused_with_offsets, stats.exhausted), (0, 0, 0));
    assert_eq!((stats.ended[1], stats.ended[2]), (1, 1), "client_closed_first, reset");
}

/// The first client port whose NodePort flow Maglev sends to `want`, with the disposition.
fn client_sport_toward(t: &Tables, node_port: u16, want: Ipv4Addr) -> u16 {
    (50000..51000)
        .find(|&sp| {
            let mut st = WorkerState::with_flows(0, 16);
            let (d, out) = run(t, &mut st, 0, UPLINK, &from_client(sp, node_port, 0x002));
            let encapsulated = d == Disposition::Forward(UPLINK);
            tcp_view(&inner_ip(&out, encapsulated)).1 == want
        })
        .expect("Maglev uses both endpoints")
}

#[test]
fn node_port_cluster_policy_snats_and_replies_go_straight_back_by_the_uplink() {
    let t = tables();
    // Local endpoint.
    let sp = client_sport_toward(&t, 30080, POD2_IP);
    let mut st = WorkerState::with_flows(0, 16);
    let (d, out) = run(&t, &mut st, 0, UPLINK, &from_client(sp, 30080, 0x002));
    assert_eq!(d, Disposition::Forward(POD2));
    let (s, dst, snat_port, dsp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!(
        (s, dst, dsp),
        (GATEWAY_A, POD2_IP, 8080),
        "Cluster policy: the endpoint sees the node (its pod-network address)"
    );
    let reply = eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &tcp(POD2_IP, GATEWAY_A, 8080, snat_port, 0x012, 1, 101));
    let (d, out) = run(&t, &mut st, S, POD2, &reply);
    assert_eq!(d, Disposition::Forward(UPLINK), "the reply leaves by the uplink");
    assert_eq!((&out[0..6], &out[6..12]), (&CLIENT_MAC.0[..], &UPLINK_MAC.0[..]), "to the client's next hop");
    let (s, dst, ssp, dsp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, ssp, dsp), (NODE_A, CLIENT, 30080, sp));
    // Remote endpoint: encapsulated there, the reply comes back through the tunnel.
    let sp = client_sport_toward(&t, 30080, REMOTE_POD_B);
    let (d, out) = run(&t, &mut st, 2 * S, UPLINK, &from_client(sp, 30080, 0x002));
    assert_eq!(d, Disposition::Forward(UPLINK));
    let (s, dst, snat_port, ..) = tcp_view(&inner_ip(&out, true));
    assert_eq!((s, dst), (GATEWAY_A, REMOTE_POD_B));
    let back = vxlan_frame(
        &Vxlan::b_to_a(),
        &ipv4_with(
            &Ip { ttl: 63, ..Ip::new(REMOTE_POD_B, GATEWAY_A) },
            &L4::Tcp { sport: 8080, dport: snat_port, seq: 1, ack: 101, flags: 0x012, payload: b"" },
        ),
    );
    let (d, out) = run(&t, &mut st, 3 * S, UPLINK, &back);
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert_eq!(&out[0..6], &CLIENT_MAC.0[..]);
    let (s, dst, ssp, dsp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, ssp, dsp), (NODE_A, CLIENT, 30080, sp));
}

/// Over a veth underlay the client's checksum arrives pseudo-header-only; it must be completed
/// before NAT updates it, or the endpoint's kernel drops the segment.
#[test]
fn an_outside_clients_partial_checksum_is_completed_before_nat() {
    let t = tables();
    let sp = client_sport_toward(&t, 30080, POD2_IP);
    let mut st = WorkerState::with_flows(0, 16);
    let mut syn = from_client(sp, 30080, 0x002);
    make_partial(&mut syn);
    let (d, out) = run(&t, &mut st, 0, UPLINK, &syn);
    assert_eq!(d, Disposition::Forward(POD2));
    tcp_view(&inner_ip(&out, false)); // asserts the checksum verifies
}

/// Under a Local policy, a node without a local endpoint drops new connections (no answer: a
/// load balancer's health check steers clients away), as kube-proxy does; with no endpoint
/// anywhere, it refuses as any Service without endpoints does.
#[test]
fn local_policy_without_a_local_endpoint_drops_and_without_any_refuses() {
    let local_np = |eps: &[Endpoint]| {
        let mut t = ServiceTable::default();
        let i = t.add_port(ServicePort::new("default/l:http".into(), eps, true, true, None, 16381).unwrap());
        t.add_node_port(6, 30081, i).unwrap();
        t.add_frontend(Frontend { proto: 6, ip: VIP_WEB, port: 80 }, FrontendKind::ClusterIp, i).unwrap();
        tables_with_services(t)
    };
    let remote_only = local_np(&[ep(REMOTE_POD_B, 8080, false)]);
    let mut st = WorkerState::with_flows(0, 16);
    let (d, _) = run(&remote_only, &mut st, 0, UPLINK, &from_client(52100, 30081, 0x002));
    assert_eq!(d, Disposition::Drop(DropReason::ServiceNoLocalEndpoint), "externalTrafficPolicy: Local");
    let (d, _) = run(&remote_only, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, 45300, 80, 0x002, 1, 0)));
    assert_eq!(d, Disposition::Drop(DropReason::ServiceNoLocalEndpoint), "internalTrafficPolicy: Local");
    let none = local_np(&[]);
    let (d, out) = run(&none, &mut st, 0, UPLINK, &from_client(52101, 30081, 0x002));
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert_eq!(port_unreachable_view(&out), (NODE_A, CLIENT, 52101, 30081));
    assert_eq!(st.flows.len(), 0);
}

#[test]
fn node_port_local_policy_keeps_the_client_and_uses_local_endpoints() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 64);
    for sp in 52000..52020 {
        let (d, out) = run(&t, &mut st, 0, UPLINK, &from_client(sp, 30081, 0x002));
        assert_eq!(d, Disposition::Forward(POD2), "Local: only this node's endpoint");
        let (s, dst, ssp, ..) = tcp_view(&inner_ip(&out, false));
        assert_eq!((s, dst, ssp), (CLIENT, POD2_IP, sp), "the client address is kept");
    }
    let reply = eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &tcp(POD2_IP, CLIENT, 8080, 52000, 0x012, 1, 101));
    let (d, out) = run(&t, &mut st, S, POD2, &reply);
    assert_eq!(d, Disposition::Forward(UPLINK));
    let (s, dst, ssp, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((s, dst, ssp), (NODE_A, CLIENT, 30081));
}

#[test]
fn node_port_without_endpoints_refuses_the_outside_client() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    let (d, out) = run(&t, &mut st, 0, UPLINK, &from_client(53000, 30082, 0x002));
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert_eq!(&out[0..6], &CLIENT_MAC.0[..]);
    assert_eq!(port_unreachable_view(&out), (NODE_A, CLIENT, 53000, 30082));
    // Not a NodePort: still the uplink's named drop.
    let (d, _) = run(&t, &mut st, 0, UPLINK, &from_client(53001, 31999, 0x002));
    assert_eq!(d, Disposition::Drop(DropReason::UplinkNotVxlan));
}

/// UDP from outside to a Service without endpoints is rejected as kube-proxy rejects it: ICMP
/// port unreachable from the Service address, straight back by the uplink to the client's next
/// hop, quoting the client's datagram.
#[test]
fn udp_node_port_without_endpoints_answers_the_outside_client_port_unreachable() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    let dgram = ipv4(CLIENT, NODE_A, &L4::Udp { sport: 53000, dport: 30082, payload: b"query" });
    let (d, out) = run(&t, &mut st, 0, UPLINK, &eth(UPLINK_MAC, CLIENT_MAC, 0x0800, &dgram));
    assert_eq!(d, Disposition::Forward(UPLINK));
    assert_eq!((&out[0..6], &out[6..12]), (&CLIENT_MAC.0[..], &UPLINK_MAC.0[..]));
    let ip = inner_ip(&out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    assert_eq!((p.src_addr(), p.dst_addr()), (NODE_A, CLIENT));
    let icmp = IcmpPacket::new_checked(p.payload()).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!((icmp.msg_type(), icmp.msg_code()), (3, 3), "port unreachable");
    assert_eq!(&p.payload()[8..8 + 28], &dgram[..28], "quotes the client's header and 8 bytes");
    assert_eq!(st.counters.drop_total(DropReason::ServiceNoEndpoint), 1, "counted as the refusal");
}

/// Node A's tables where VIP_WEB's only Service port has endpoints `eps` and affinity `affinity`.
fn tables_with_web(eps: &[Endpoint], affinity: Option<u64>) -> Tables {
    let mut t = ServiceTable::default();
    let i = t.add_port(ServicePort::new("default/web:http".into(), eps, false, false, affinity, 16381).unwrap());
    t.add_frontend(Frontend { proto: 6, ip: VIP_WEB, port: 80 }, FrontendKind::ClusterIp, i).unwrap();
    tables_with_services(t)
}

#[test]
fn endpoint_lifecycle_across_table_swaps() {
    let pod2 = ep(POD2_IP, 8080, true);
    let remote = ep(REMOTE_POD_B, 8080, false);
    let terminating = |e: Endpoint| Endpoint { ready: false, serving: true, terminating: true, ..e };
    let dst_of = |t: &Tables, st: &mut WorkerState, sp: u16, flags: u16| -> Ipv4Addr {
        let (d, out) = run(t, st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, flags, 1, 1)));
        tcp_view(&inner_ip(&out, d == Disposition::Forward(UPLINK))).1
    };
    let mut st = WorkerState::with_flows(0, 256);
    // v1: pod2 only. A flow is established to it.
    let v1 = tables_with_web(&[pod2], None);
    assert_eq!(dst_of(&v1, &mut st, 45000, 0x002), POD2_IP);
    // v2: pod2 terminating, the remote endpoint ready. The existing flow stays on pod2;
    // every new flow goes to the ready endpoint.
    let v2 = tables_with_web(&[terminating(pod2), remote], None);
    assert_eq!(dst_of(&v2, &mut st, 45000, 0x010), POD2_IP, "existing flow continues to the terminating endpoint");
    for sp in 45001..45030 {
        assert_eq!(dst_of(&v2, &mut st, sp, 0x002), REMOTE_POD_B, "new flows only to ready endpoints");
    }
    // v3: no ready endpoint, pod2 still serving while terminating: new flows go there.
    let v3 = tables_with_web(&[terminating(pod2)], None);
    assert_eq!(dst_of(&v3, &mut st, 45100, 0x002), POD2_IP, "serving+terminating used when none is ready");
    // v4: no endpoints: the existing flow still finishes; new connections are refused.
    let v4 = tables_with_web(&[], None);
    assert_eq!(dst_of(&v4, &mut st, 45000, 0x010), POD2_IP, "the tracked flow still reaches its endpoint");
    let (_, out) = run(&v4, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, 45200, 80, 0x002, 1, 0)));
    assert_eq!(port_unreachable_view(&out), (VIP_WEB, POD1_IP, 45200, 80));
}

#[test]
fn client_ip_affinity_holds_across_endpoint_changes_until_its_timeout() {
    let mk = |eps: &[Endpoint]| tables_with_web(eps, Some(10 * S));
    let dst_of = |t: &Tables, st: &mut WorkerState, now: u64, sp: u16| -> Ipv4Addr {
        let (d, out) = run(t, st, now, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1, 0)));
        tcp_view(&inner_ip(&out, d == Disposition::Forward(UPLINK))).1
    };
    let mut st = WorkerState::with_flows(0, 256);
    let one = mk(&[ep(POD2_IP, 8080, true)]);
    assert_eq!(dst_of(&one, &mut st, 0, 46000), POD2_IP);
    // More endpoints appear: the client stays on its endpoint for every new connection...
    let many: Vec<Endpoint> = std::iter::once(ep(POD2_IP, 8080, true))
        .chain((5..15).map(|i| ep(Ipv4Addr::new(10, 244, 1, i), 8080, false)))
        .collect();
    let t = mk(&many);
    for (k, sp) in (46001..46020).enumerate() {
        assert_eq!(dst_of(&t, &mut st, (k as u64 + 1) * S, sp), POD2_IP, "affinity within the timeout");
    }
    // ...and 10 s after its last new connection (at 19 s) it is chosen for afresh: where a
    // client without history goes (Maglev on its address), which here is not its old endpoint.
    let fresh = dst_of(&t, &mut WorkerState::with_flows(0, 16), 0, 46050);
    assert_ne!(fresh, POD2_IP, "precondition: the fresh choice differs, so the test can tell");
    assert_eq!(dst_of(&t, &mut st, 28 * S, 46100), POD2_IP, "9 s after the last connection: still sticky");
    assert_eq!(dst_of(&t, &mut st, 37 * S, 46101), POD2_IP, "the 28 s connection refreshed the timeout (to 38 s)");
    assert_eq!(dst_of(&t, &mut st, 50 * S, 46102), fresh, "idle past the timeout: chosen afresh");
}

/// An ICMP fragmentation needed message (its type, code and checksum, next-hop `mtu`) quoting
/// the first 28 bytes of the IPv4 packet `quoted`.
fn frag_needed_body(quoted: &[u8], mtu: u16) -> Vec<u8> {
    let mut body = vec![3, 4, 0, 0, 0, 0];
    body.extend_from_slice(&mtu.to_be_bytes());
    body.extend_from_slice(&quoted[..28]);
    let c = crate::wire::checksum::checksum(&body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    body
}

/// Path MTU discovery through a Service: the endpoint answers a too-big segment with ICMP
/// fragmentation-needed; the client must receive it about the packet it sent (to the Service
/// address), from the Service address, with every checksum valid.
#[test]
fn icmp_frag_needed_from_the_endpoint_is_translated_for_the_client() {
    let t = tables();
    let sp = sport_toward(&t, POD2_IP);
    let mut st = WorkerState::with_flows(0, 16);
    run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1000, 0)));
    // What pod2 received (after DNAT) and quotes back: pod1:sp -> pod2:8080.
    let seen = tcp(POD1_IP, POD2_IP, sp, 8080, 0x018, 1001, 1);
    let body = frag_needed_body(&seen, 1400);
    let err = eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &ipv4(POD2_IP, POD1_IP, &L4::Raw { proto: 1, bytes: &body }));
    let (d, out) = run(&t, &mut st, S, POD2, &err);
    assert_eq!(d, Disposition::Forward(POD1));
    let ip = inner_ip(&out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    assert_eq!((p.src_addr(), p.dst_addr()), (VIP_WEB, POD1_IP), "from the Service address to the client");
    let icmp = IcmpPacket::new_checked(p.payload()).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!((icmp.msg_type(), icmp.msg_code(), icmp.next_hop_mtu()), (3, 4, 1400));
    let q = icmp.embedded_ipv4().unwrap();
    assert!(q.verify_checksum(), "quoted header checksum");
    assert_eq!((q.src_addr(), q.dst_addr()), (POD1_IP, VIP_WEB), "the quote is the packet as the client sent it");
    assert_eq!(&q.payload()[..4], &[(sp >> 8) as u8, sp as u8, 0, 80]);
}

/// Path MTU discovery through a NodePort: a router on the way to a client outside answers the
/// endpoint's reply (as it left the node: NODE_A:30080 -> client) with fragmentation needed,
/// addressed to the node. The uplink hands it to vxnat (the XDP program redirects ICMP errors
/// about a frontend's packets), which sends it on to the endpoint with the quote as the
/// endpoint sent it (endpoint:8080 -> the node's SNAT address and port), from that SNAT
/// address.
#[test]
fn icmp_frag_needed_from_a_router_outside_reaches_the_node_port_endpoint() {
    let t = tables();
    let sp = client_sport_toward(&t, 30080, POD2_IP);
    let mut st = WorkerState::with_flows(0, 16);
    let (_, out) = run(&t, &mut st, 0, UPLINK, &from_client(sp, 30080, 0x002));
    let snat_port = tcp_view(&inner_ip(&out, false)).2;
    let router = Ipv4Addr::new(198, 51, 100, 1);
    // What the router received and quotes: the reply as it left the node.
    let left = tcp(NODE_A, CLIENT, 30080, sp, 0x018, 1, 101);
    let body = frag_needed_body(&left, 1200);
    let err = eth(UPLINK_MAC, CLIENT_MAC, 0x0800, &ipv4(router, NODE_A, &L4::Raw { proto: 1, bytes: &body }));
    let (d, out) = run(&t, &mut st, S, UPLINK, &err);
    assert_eq!(d, Disposition::Forward(POD2), "to the endpoint");
    let ip = inner_ip(&out, false);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    assert_eq!(
        (p.src_addr(), p.dst_addr()),
        (GATEWAY_A, POD2_IP),
        "to the endpoint, from the SNAT address (its only peer; a remote node drops outside sources from the tunnel)"
    );
    let icmp = IcmpPacket::new_checked(p.payload()).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!((icmp.msg_type(), icmp.msg_code(), icmp.next_hop_mtu()), (3, 4, 1200));
    let q = icmp.embedded_ipv4().unwrap();
    assert!(q.verify_checksum());
    assert_eq!((q.src_addr(), q.dst_addr()), (POD2_IP, GATEWAY_A), "the quote as the endpoint sent it");
    let ports = &q.payload()[..4];
    assert_eq!(ports, &[0x1f, 0x90, (snat_port >> 8) as u8, snat_port as u8]);
    // An ICMP error about nothing vxnat sent: a named drop, as other stray uplink traffic.
    let stray = tcp(NODE_A, CLIENT, 30080, 9, 0x018, 1, 101);
    let body = frag_needed_body(&stray, 1200);
    let err = eth(UPLINK_MAC, CLIENT_MAC, 0x0800, &ipv4(router, NODE_A, &L4::Raw { proto: 1, bytes: &body }));
    assert_eq!(run(&t, &mut st, S, UPLINK, &err).0, Disposition::Drop(DropReason::UplinkNotVxlan));
}

/// A state whose SNAT range is two ports (hairpin flows through VIP_SELF take them), its
/// conntrack journal on, as a process keeping a flow file has it.
fn two_port_state(journal: bool) -> WorkerState {
    let mut st = WorkerState::with_flows(0, 16);
    st.snat = SnatAllocator::new(2000..=2001, 65 * S, 1);
    if journal {
        st.flows.enable_journal();
    }
    st
}

/// Pod1 as the client of VIP_SELF from `sport`.
fn hairpin_client(sport: u16, flags: u16, seq: u32, ack: u32) -> Vec<u8> {
    from_pod1(&tcp(POD1_IP, VIP_SELF, sport, 80, flags, seq, ack))
}

/// Pod1 as the endpoint, answering SNAT port `port`.
fn hairpin_endpoint(port: u16, flags: u16, seq: u32, ack: u32) -> Vec<u8> {
    from_pod1(&tcp(POD1_IP, GATEWAY_A, 8080, port, flags, seq, ack))
}

/// A hairpin connection from `sport` opened at 0 (client ISN 100, endpoint's 900) and closed
/// by the endpoint first at 1 s: its tuple, held with the mark 102.
fn hairpin_closed_by_endpoint(t: &Tables, st: &mut WorkerState, sport: u16) -> u16 {
    let port = tcp_view(&inner_ip(&run(t, st, 0, POD1, &hairpin_client(sport, 0x002, 100, 0)).1, false)).2;
    run(t, st, 0, POD1, &hairpin_endpoint(port, 0x012, 900, 101));
    run(t, st, 0, POD1, &hairpin_client(sport, 0x010, 101, 901));
    run(t, st, S, POD1, &hairpin_endpoint(port, 0x011, 901, 101));
    run(t, st, S, POD1, &hairpin_client(sport, 0x011, 101, 902));
    run(t, st, S, POD1, &hairpin_endpoint(port, 0x010, 902, 102));
    port
}

/// The slot records a flow file would hold for `st`'s journal.
fn flow_file_of(st: &mut WorkerState) -> Vec<[u8; crate::conntrack::record::RECORD_LEN]> {
    use crate::conntrack::record::{self, RECORD_LEN};
    let mut file = vec![[0u8; RECORD_LEN]; st.flows.capacity()];
    st.flows.drain_journal(|slot, f| match f {
        Some(f) => record::encode(f, &mut file[slot as usize]),
        None => file[slot as usize] = [0; RECORD_LEN],
    });
    file
}

/// A restart (`restore`): the flows a process wrote out through the conntrack journal, read
/// back by a new process (record by record, as the flow file holds them), carry on as they
/// were. An open SNAT'd flow keeps its tuple and its translation both ways, a ClusterIP flow its
/// endpoint, and a tuple the endpoint closed first stays held with its mark: the next
/// connection is not given the open flow's tuple, and reuses the held one past the old
/// connection's last sequence number, exactly as the old process would have.
#[test]
fn flows_carried_over_a_restart_keep_their_nat_and_their_tuples() {
    use crate::conntrack::record;
    let t = tables();
    let mut st = two_port_state(true);
    let (c, e) = (hairpin_client, hairpin_endpoint);
    // Flow A: open.
    let a = tcp_view(&inner_ip(&run(&t, &mut st, 0, POD1, &c(44000, 0x002, 100, 0)).1, false)).2;
    run(&t, &mut st, 0, POD1, &e(a, 0x012, 900, 101));
    run(&t, &mut st, 0, POD1, &c(44000, 0x010, 101, 901));
    // Flow B: the endpoint closes first; its tuple is held with the mark 102.
    let b = hairpin_closed_by_endpoint(&t, &mut st, 44001);
    // A ClusterIP flow to the local endpoint.
    let sp = sport_toward(&t, POD2_IP);
    run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1000, 0)));
    assert_eq!((st.flows.len(), st.snat.stats(S).held), (3, 1));
    // What the flow file would hold.
    let file = flow_file_of(&mut st);
    // The new process, at its own clock's 10 s.
    let now = 10 * S;
    let mut st2 = two_port_state(false);
    let flows = file.iter().filter_map(|r| record::decode(r).expect("intact"));
    assert_eq!(restore(&mut st2, flows, [], now), Restored { flows: 3, held: 0, refused: 0 });
    assert_eq!((st2.snat.stats(now).in_use, st2.snat.stats(now).held), (1, 1));
    // Flow A goes on with its tuple, both ways.
    let (_, out) = run(&t, &mut st2, now, POD1, &c(44000, 0x018, 101, 901));
    let (src, dst, sport, dport, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((src, dst, sport, dport), (GATEWAY_A, POD1_IP, a, 8080), "same tuple");
    let (_, out) = run(&t, &mut st2, now, POD1, &e(a, 0x010, 901, 102));
    let (src, _, sport, dport, ..) = tcp_view(&inner_ip(&out, false));
    assert_eq!((src, sport, dport), (VIP_SELF, 80, 44000));
    // The ClusterIP flow's reply is translated back to the Service address.
    let back = eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &tcp(POD2_IP, POD1_IP, 8080, sp, 0x012, 5000, 1001));
    let (_, out) = run(&t, &mut st2, now, POD2, &back);
    assert_eq!(tcp_view(&inner_ip(&out, false)).0, VIP_WEB);
    // A new connection gets the held tuple, past its mark, not the open one's.
    let (_, out) = run(&t, &mut st2, now, POD1, &c(44002, 0x002, 5000, 0));
    let (src, _, port, _, flags, seq, _) = tcp_view(&inner_ip(&out, false));
    assert_eq!((src, port, flags, seq), (GATEWAY_A, b, TcpFlags::SYN, 102 + (1 << 17)));
    // And a third, with both tuples taken, is refused.
    let (_, out) = run(&t, &mut st2, now, POD1, &c(44003, 0x002, 5000, 0));
    assert_eq!(tcp_view(&inner_ip(&out, false)).4, TcpFlags::RST | TcpFlags::ACK);
}

/// The journal hands out what changed since the last drain: a new flow, a state change, a
/// removal; not a packet that changes nothing but counters.
#[test]
fn the_journal_records_state_changes_not_every_packet() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    st.flows.enable_journal();
    let sp = sport_toward(&t, POD2_IP);
    let drained = |st: &mut WorkerState| {
        let mut v = Vec::new();
        st.flows.drain_journal(|slot, f| v.push((slot, f.map(|f| f.state.name()))));
        v
    };
    let syn = from_pod1(&tcp(POD1_IP, VIP_WEB, sp, 80, 0x002, 1000, 0));
    run(&t, &mut st, 0, POD1, &syn);
    let first = drained(&mut st);
    assert_eq!(first.len(), 1, "{first:?}");
    run(&t, &mut st, 0, POD1, &syn); // a retransmitted SYN: same state
    assert_eq!(drained(&mut st), []);
    run(&t, &mut st, 0, POD2, &eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &tcp(POD2_IP, POD1_IP, 8080, sp, 0x012, 5, 1001)));
    assert_eq!(drained(&mut st), [(first[0].0, Some("SYN_RECV"))]);
}

/// A tuple whose flow has left the table while the endpoint still holds it in TIME_WAIT (the
/// client reused its port: the new SYN reopened the flow's key) lives on only in the
/// allocator; the journal hands the flow out as retired, and a restart holds the tuple again
/// with its mark: the next connection reuses it past the mark, not as a fresh port.
#[test]
fn a_held_tuple_whose_flow_left_the_table_is_still_held_after_a_restart() {
    use crate::conntrack::record;
    let t = tables();
    let mut st = two_port_state(true);
    let c = hairpin_client;
    let held = hairpin_closed_by_endpoint(&t, &mut st, 44000);
    // The client's next connection from the same port: the old flow leaves the table, the
    // new one takes the other tuple (fresh ones come before held ones).
    let other = tcp_view(&inner_ip(&run(&t, &mut st, 2 * S, POD1, &c(44000, 0x002, 7000, 0)).1, false)).2;
    assert_ne!(other, held);
    let slots = flow_file_of(&mut st);
    let mut retired = Vec::new();
    st.flows.drain_retired(|f| retired.push(f.clone()));
    assert_eq!(retired.len(), 1, "the reopened flow, its tuple held");
    let now = 10 * S;
    let mut st2 = two_port_state(false);
    let flows = slots.iter().filter_map(|r| record::decode(r).expect("intact"));
    assert_eq!(restore(&mut st2, flows, retired, now), Restored { flows: 1, held: 1, refused: 0 });
    let (_, out) = run(&t, &mut st2, now, POD1, &c(44001, 0x002, 5000, 0));
    let (_, _, port, _, flags, seq, _) = tcp_view(&inner_ip(&out, false));
    assert_eq!((port, flags, seq), (held, TcpFlags::SYN, 102 + (1 << 17)), "reused past its mark, not fresh");
}

/// Node A's tables where VIP_DNS (UDP 53) has endpoints `eps` (port 5353).
fn tables_with_dns(eps: &[Endpoint]) -> Tables {
    let mut t = ServiceTable::default();
    let i = t.add_port(ServicePort::new("kube-system/dns:dns".into(), eps, false, false, None, 16381).unwrap());
    t.add_frontend(Frontend { proto: 17, ip: VIP_DNS, port: 53 }, FrontendKind::ClusterIp, i).unwrap();
    tables_with_services(t)
}

/// Where a query from pod 1's port `sport` to VIP_DNS goes under `t` (the endpoint address).
fn dns_query(t: &Tables, st: &mut WorkerState, now: u64, sport: u16) -> (Disposition, Option<Ipv4Addr>) {
    let q = from_pod1(&ipv4(POD1_IP, VIP_DNS, &L4::Udp { sport, dport: 53, payload: b"query" }));
    let (d, out) = run(t, st, now, POD1, &q);
    let dst = match d {
        Disposition::Forward(p) => Some(Ipv4Packet::new_checked(&inner_ip(&out, p == UPLINK)[..]).unwrap().dst_addr()),
        _ => None,
    };
    (d, dst)
}

/// kube-proxy clears the conntrack entries of a UDP endpoint that leaves its Service or stops
/// serving, so a client that keeps sending from one port (a resolver) moves to another
/// endpoint instead of sending into the void (kubernetes#125467). vxnat does it on the flow's
/// next packet: the table epoch changed, the endpoint is checked again.
#[test]
fn a_udp_flow_moves_when_its_endpoint_leaves_or_stops_serving_and_not_otherwise() {
    let local = ep(POD2_IP, 5353, true);
    let remote = ep(REMOTE_POD_B, 5353, false);
    let mut st = WorkerState::with_flows(0, 64);
    let both = tables_with_dns(&[local, remote]);
    // A client port whose flow goes to the local endpoint.
    let sport = (33000..34000)
        .find(|&sp| dns_query(&both, &mut WorkerState::with_flows(0, 4), 0, sp).1 == Some(POD2_IP))
        .expect("Maglev uses both");
    assert_eq!(dns_query(&both, &mut st, 0, sport).1, Some(POD2_IP));
    // Counted against the port the packet that found the flow stale came in on.
    let moved = |st: &WorkerState| {
        [POD1, POD2].iter().map(|&p| st.counters.port(p).map_or(0, |c| c.events.udp_flows_moved)).sum::<u64>()
    };

    // Terminating but still serving: kept (kube-proxy clears only when serving changes).
    let terminating = Endpoint { ready: false, serving: true, terminating: true, ..local };
    let v2 = tables_with_dns(&[terminating, remote]);
    assert_eq!(dns_query(&v2, &mut st, S, sport).1, Some(POD2_IP), "a serving endpoint keeps its flow");
    assert_eq!(moved(&st), 0);
    // Removed from the slice: the next query moves to the other endpoint, and stays there.
    let v3 = tables_with_dns(&[remote]);
    assert_eq!(dns_query(&v3, &mut st, 2 * S, sport).1, Some(REMOTE_POD_B), "moved on its next packet");
    assert_eq!(dns_query(&v3, &mut st, 3 * S, sport).1, Some(REMOTE_POD_B));
    assert_eq!(moved(&st), 1);
    assert_eq!(st.flows.len(), 1, "the old flow was removed, one new flow");
    // A late answer from the endpoint that left is a named drop, not passed on untranslated.
    let late = eth(
        POD2_PORT_MAC,
        POD2_MAC,
        0x0800,
        &ipv4(POD2_IP, POD1_IP, &L4::Udp { sport: 5353, dport: sport, payload: b"late" }),
    );
    let v4 = tables_with_dns(&[Endpoint { ready: false, serving: false, terminating: true, ..remote }, local]);
    // Under v4 the remote endpoint stopped serving (and pod 2 is back): the query moves again.
    assert_eq!(dns_query(&v4, &mut st, 4 * S, sport).1, Some(POD2_IP), "not serving: moved");
    assert_eq!(moved(&st), 2);
    let v5 = tables_with_dns(&[remote]);
    let (d, _) = run(&v5, &mut st, 5 * S, POD2, &late);
    assert_eq!(d, Disposition::Drop(DropReason::ServiceEndpointGone));
    assert_eq!(moved(&st), 3);
    // No endpoint at all: the flow ends and the query is refused as any new one would be.
    let v6 = tables_with_dns(&[]);
    let (d, _) = dns_query(&v6, &mut st, 6 * S, sport);
    assert!(matches!(d, Disposition::Forward(POD1)), "port unreachable back to the pod: {d:?}");
    assert_eq!(st.counters.drop_total(DropReason::ServiceNoEndpoint), 1);
}

/// A TCP flow whose endpoint left is kept until it ends (as kube-proxy keeps it), and what is
/// still sent to the endpoint is counted.
#[test]
fn a_tcp_flow_to_an_endpoint_that_left_is_kept_and_counted() {
    let pod2 = ep(POD2_IP, 8080, true);
    let mut st = WorkerState::with_flows(0, 64);
    let v1 = tables_with_web(&[pod2], None);
    let send = |t: &Tables, st: &mut WorkerState, flags: u16| {
        let (d, out) = run(t, st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_WEB, 45000, 80, flags, 1, 1)));
        tcp_view(&inner_ip(&out, d == Disposition::Forward(UPLINK))).1
    };
    assert_eq!(send(&v1, &mut st, 0x002), POD2_IP);
    let gone = |st: &WorkerState| st.counters.port(POD1).map_or(0, |c| c.events.to_gone_endpoint);
    let v2 = tables_with_web(&[ep(REMOTE_POD_B, 8080, false)], None);
    for _ in 0..3 {
        assert_eq!(send(&v2, &mut st, 0x010), POD2_IP, "kept on its endpoint");
    }
    assert_eq!(gone(&st), 3);
    // The endpoint comes back: no longer counted.
    let v3 = tables_with_web(&[pod2], None);
    assert_eq!(send(&v3, &mut st, 0x010), POD2_IP);
    assert_eq!(gone(&st), 3);
    assert_eq!(st.counters.port(POD1).map_or(0, |c| c.events.udp_flows_moved), 0);
}

/// `body` (a transport header and payload) as IPv4 fragments of at most `size` bytes of body
/// each, with identification `ident`.
fn fragments_of(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, body: &[u8], size: usize) -> Vec<Vec<u8>> {
    body.chunks(size)
        .enumerate()
        .map(|(i, c)| {
            let ip = Ip {
                ident,
                dont_frag: false,
                more_frags: (i + 1) * size < body.len(),
                frag_offset: (i * size) as u16,
                ..Ip::new(src, dst)
            };
            ipv4_with(&ip, &L4::Raw { proto: 17, bytes: c })
        })
        .collect()
}

/// The reassembled transport body of `ips` (fragments in order), checking that every fragment
/// has the same addresses and a valid header checksum.
fn reassembled(ips: &[Vec<u8>]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    let mut body = Vec::new();
    let first = Ipv4Packet::new_checked(&ips[0][..]).unwrap();
    let (src, dst) = (first.src_addr(), first.dst_addr());
    for ip in ips {
        let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
        assert!(p.verify_checksum(), "IPv4 header checksum of every fragment");
        assert_eq!((p.src_addr(), p.dst_addr()), (src, dst), "every fragment translated alike");
        assert_eq!(usize::from(p.frag_offset()), body.len(), "in order, no gap");
        body.extend_from_slice(p.payload());
    }
    (src, dst, body)
}

/// A UDP datagram larger than the MTU, to a Service and back, in fragments: the first carries
/// the ports and goes through conntrack; the later ones take its address rewrite
/// (`nat::fragments`). Reassembled, each way's datagram has the translated addresses and ports
/// and a UDP checksum that verifies over the whole. (netfilter reassembles before NAT; kube-proxy
/// users send large DNS-over-UDP answers and syslog this way.)
#[test]
fn a_fragmented_udp_datagram_to_a_service_and_its_fragmented_answer_are_translated() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let query = ipv4(POD1_IP, VIP_DNS, &L4::Udp { sport: 33333, dport: 53, payload: &payload });
    let mut out = Vec::new();
    for f in fragments_of(POD1_IP, VIP_DNS, 0x4242, &query[20..], 1400) {
        let (d, o) = run(&t, &mut st, 0, POD1, &from_pod1(&f));
        assert_eq!(d, Disposition::Forward(POD2));
        out.push(inner_ip(&o, false));
    }
    let (src, dst, body) = reassembled(&out);
    assert_eq!((src, dst), (POD1_IP, POD2_IP));
    let u = UdpPacket::new_checked(&body[..]).unwrap();
    assert_eq!((u.src_port(), u.dst_port(), u.payload()), (33333, 5353, &payload[..]));
    assert!(u.verify_checksum(src, dst), "the UDP checksum holds for the reassembled datagram");
    let translated = |st: &WorkerState, p| st.counters.port(p).map_or(0, |c| c.events.fragments_translated);
    assert_eq!(translated(&st, POD1), 2);

    // The answer, fragmented by the endpoint.
    let answer = ipv4(POD2_IP, POD1_IP, &L4::Udp { sport: 5353, dport: 33333, payload: &payload[..2500] });
    let mut back = Vec::new();
    for f in fragments_of(POD2_IP, POD1_IP, 0x9999, &answer[20..], 1400) {
        let (d, o) = run(&t, &mut st, S, POD2, &eth(POD2_PORT_MAC, POD2_MAC, 0x0800, &f));
        assert_eq!(d, Disposition::Forward(POD1));
        back.push(inner_ip(&o, false));
    }
    let (src, dst, body) = reassembled(&back);
    assert_eq!((src, dst), (VIP_DNS, POD1_IP));
    let u = UdpPacket::new_checked(&body[..]).unwrap();
    assert_eq!((u.src_port(), u.dst_port()), (53, 33333));
    assert!(u.verify_checksum(src, dst));
    assert_eq!(translated(&st, POD2), 1);

    // A later fragment whose first was never seen goes on untouched.
    let stray = &fragments_of(POD1_IP, VIP_DNS, 0x7777, &query[20..], 1400)[1];
    let (_, o) = run(&t, &mut st, 2 * S, POD1, &from_pod1(stray));
    let p = Ipv4Packet::new_checked(&inner_ip(&o, false)[..]).unwrap().dst_addr();
    assert_eq!(p, VIP_DNS, "not translated");
    assert_eq!(translated(&st, POD1), 2);
}

/// `loadBalancerSourceRanges`: a new connection through the load balancer IP is let in only
/// from the ranges (a named drop otherwise); the same Service's NodePort stays open, as
/// kube-proxy applies the ranges to load balancer IPs only. A Service whose ranges held no
/// IPv4 one admits no IPv4 client there.
#[test]
fn load_balancer_source_ranges_admit_only_their_clients_at_the_load_balancer_ip() {
    const LB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
    let with_ranges = |ranges: Option<Vec<crate::wire::Ipv4Cidr>>| {
        let mut t = ServiceTable::default();
        let p = ServicePort::new("default/lb:http".into(), &[ep(POD2_IP, 8080, true)], false, false, None, 16381)
            .unwrap()
            .with_source_ranges(ranges);
        let i = t.add_port(p);
        t.add_frontend(Frontend { proto: 6, ip: LB, port: 80 }, FrontendKind::LoadBalancer, i).unwrap();
        t.add_node_port(6, 30090, i).unwrap();
        tables_with_services(t)
    };
    let syn = |src: Ipv4Addr, dst: Ipv4Addr, dport: u16| {
        eth(UPLINK_MAC, CLIENT_MAC, 0x0800, &tcp(src, dst, 40000, dport, 0x002, 1, 0))
    };
    let stranger = Ipv4Addr::new(192, 0, 2, 66);
    let t = with_ranges(Some(vec!["198.51.100.0/24".parse().unwrap()]));
    let mut st = WorkerState::with_flows(0, 16);
    assert_eq!(run(&t, &mut st, 0, UPLINK, &syn(CLIENT, LB, 80)).0, Disposition::Forward(POD2), "in range");
    assert_eq!(run(&t, &mut st, 0, UPLINK, &syn(stranger, LB, 80)).0, Disposition::Drop(DropReason::LbSourceRange));
    assert_eq!(run(&t, &mut st, 0, UPLINK, &syn(stranger, NODE_A, 30090)).0, Disposition::Forward(POD2), "NodePort");
    assert_eq!(st.flows.len(), 2, "the refused connection left no flow");
    let none = with_ranges(Some(Vec::new()));
    let mut st = WorkerState::with_flows(0, 16);
    assert_eq!(run(&none, &mut st, 0, UPLINK, &syn(CLIENT, LB, 80)).0, Disposition::Drop(DropReason::LbSourceRange));
    let open = with_ranges(None);
    assert_eq!(run(&open, &mut st, 0, UPLINK, &syn(stranger, LB, 80)).0, Disposition::Forward(POD2), "no ranges");
}

/// A refusal past the ICMP rate limit is dropped unanswered, counted once, as the rate limit's.
#[test]
fn refusals_past_the_icmp_rate_limit_are_dropped_and_counted_once() {
    let t = tables();
    let mut st = WorkerState::with_flows(0, 16);
    st.set_icmp_limit(1, 2);
    let mut answered = 0;
    for sp in 0..10u16 {
        let (d, _) = run(&t, &mut st, 0, POD1, &from_pod1(&tcp(POD1_IP, VIP_EMPTY, 41000 + sp, 80, 0x002, 1, 0)));
        match d {
            Disposition::Forward(POD1) => answered += 1,
            d => assert_eq!(d, Disposition::Drop(DropReason::IcmpRateLimited)),
        }
    }
    assert_eq!(answered, 2, "the burst");
    let counted =
        (st.counters.drop_total(DropReason::ServiceNoEndpoint), st.counters.drop_total(DropReason::IcmpRateLimited));
    assert_eq!(counted, (2, 8), "each refusal counted once");
}
