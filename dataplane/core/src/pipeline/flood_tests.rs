//! Issue 17, bounded and fair state under floods, through the whole pipeline: a spoofed SYN
//! flood at a ClientIP-affinity NodePort (conntrack early drop, the capped affinity table), SNAT
//! exhaustion relieved by early drop, and per-endpoint state pruned under endpoint churn.

use super::*;
use crate::nat::service::{Endpoint, ServicePort, ServiceTable};
use crate::nat::snat::SnatAllocator;
use crate::testkit::*;
use crate::wire::{Ipv4Packet, MacAddr, TcpPacket};
use core::net::Ipv4Addr;

const S: u64 = 1_000_000_000;
const NODE_PORT: u16 = 30080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0xcc, 0, 0, 0, 7]);

fn ep(ip: Ipv4Addr) -> Endpoint {
    Endpoint { ip, port: 8080, ready: true, serving: true, terminating: false, local: true }
}

/// Node A with one NodePort (Cluster policy: SNAT'd) to `eps`, with ClientIP affinity
/// `affinity`.
fn node_port_tables(eps: &[Endpoint], affinity: Option<u64>) -> Tables {
    let mut t = ServiceTable::default();
    let i = t.add_port(ServicePort::new("default/np:http".into(), eps, false, false, affinity, 16381).unwrap());
    t.add_node_port(6, NODE_PORT, i).unwrap();
    tables_with_services(t)
}

fn from_outside(client: Ipv4Addr, sport: u16, flags: u16, seq: u32, ack: u32) -> Vec<u8> {
    let l4 = L4::Tcp { sport, dport: NODE_PORT, seq, ack, flags, payload: b"" };
    eth(UPLINK_MAC, CLIENT_MAC, 0x0800, &ipv4(client, NODE_A, &l4))
}

fn run(t: &Tables, st: &mut WorkerState, now: u64, port: PortId, input: &[u8]) -> (Disposition, Vec<u8>) {
    let mut buf = umem(input);
    let mut f = FrameBuf::new(&mut buf, HEADROOM, input.len()).unwrap();
    let d = process_frame(t, st, now, port, &mut f);
    (d, f.data().to_vec())
}

/// (source, destination, source port, TCP flags) of the unencapsulated frame `out`.
fn view(out: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, crate::wire::TcpFlags) {
    let p = Ipv4Packet::new_checked(&out[14..]).unwrap();
    let t = TcpPacket::new_checked(p.payload()).unwrap();
    (p.src_addr(), p.dst_addr(), t.src_port(), t.flags())
}

/// A full handshake of the outside client from `sport`; returns the endpoint it reached, or
/// `None` if any step failed.
fn connect(t: &Tables, st: &mut WorkerState, now: u64, sport: u16) -> Option<Ipv4Addr> {
    let (d, out) = run(t, st, now, UPLINK, &from_outside(CLIENT, sport, 0x002, 1, 0));
    let pod = match d {
        Disposition::Forward(p) if p == POD1 || p == POD2 => p,
        _ => return None,
    };
    let (src, endpoint, snat_port, _) = view(&out);
    assert_eq!(src, GATEWAY_A, "SNAT'd to the gateway");
    let (port_mac, mac) = if pod == POD1 { (POD1_PORT_MAC, POD1_MAC) } else { (POD2_PORT_MAC, POD2_MAC) };
    let synack = L4::Tcp { sport: 8080, dport: snat_port, seq: 500, ack: 2, flags: 0x012, payload: b"" };
    let (d, out) = run(t, st, now, pod, &eth(port_mac, mac, 0x0800, &ipv4(endpoint, GATEWAY_A, &synack)));
    if d != Disposition::Forward(UPLINK) || view(&out).1 != CLIENT {
        return None;
    }
    let (d, _) = run(t, st, now, UPLINK, &from_outside(CLIENT, sport, 0x010, 2, 501));
    (d == Disposition::Forward(pod)).then_some(endpoint)
}

fn events(st: &WorkerState) -> EventCounters {
    st.counters.port(UPLINK).map(|c| c.events.clone()).unwrap_or_default()
}

fn drops(st: &WorkerState, r: DropReason) -> u64 {
    st.counters.drop_total(r)
}

/// A spoofed SYN flood (20,000 distinct sources) at an affinity NodePort, on a worker with 512
/// flows and 256 affinity entries. The legitimate client, connecting throughout, completes
/// every handshake, always on its endpoint; the flood churns through the unassured flows
/// (early drop), never refused; the tables stay at their capacity; SNAT tuples of evicted
/// flows come back.
#[test]
fn a_spoofed_syn_flood_at_an_affinity_node_port_keeps_the_legitimate_client_served() {
    let t = node_port_tables(&[ep(POD1_IP), ep(POD2_IP)], Some(10_800 * S));
    let mut st = WorkerState::with_capacities(0, 512, 256, crate::conntrack::Timeouts::default());
    let home = connect(&t, &mut st, 0, 50_000).expect("the client connects before the flood");
    let (mut served, mut tried) = (0, 0);
    for i in 0..20_000u32 {
        let now = S + u64::from(i) * 50_000; // 20 k SYN/s
        let spoofed = Ipv4Addr::from(0x6440_0000 + i); // 100.64.0.0/10
        let (d, _) = run(&t, &mut st, now, UPLINK, &from_outside(spoofed, 1024 + (i % 60_000) as u16, 0x002, 7, 0));
        assert!(matches!(d, Disposition::Forward(_)), "flood SYN {i}: {d:?}");
        if i % 500 == 0 {
            tried += 1;
            let got = connect(&t, &mut st, now, 50_001 + (i / 500) as u16);
            assert_eq!(got, Some(home), "the client's connection at flood SYN {i}");
            served += 1;
        }
        maintain(&t, &mut st, now, 64);
        assert!(st.flows.len() <= 512 && st.affinity.len() <= 256);
    }
    assert_eq!(served, tried);
    let ev = events(&st);
    assert!(ev.conntrack_early_drops >= 20_000 - 512, "{ev:?}");
    assert_eq!(ev.affinity_full, 20_000 - 255, "every flood client after the table filled");
    assert_eq!(drops(&st, DropReason::ConntrackFull), 0);
    assert_eq!(drops(&st, DropReason::SnatPortsExhausted), 0);
    let snat = st.snat.stats(S * 2);
    assert!(snat.in_use <= 512, "SNAT tuples of evicted flows are released: {snat:?}");
    assert_eq!(st.affinity.get(&(6, NODE_A, NODE_PORT, CLIENT), 2 * S), Some((home, 8080)));
}

/// A flow refused (here: a table full of established flows) leaves nothing in the affinity
/// table.
#[test]
fn a_refused_flow_is_not_remembered_for_affinity() {
    let t = node_port_tables(&[ep(POD1_IP), ep(POD2_IP)], Some(10_800 * S));
    let mut st = WorkerState::with_capacities(0, 1, 16, crate::conntrack::Timeouts::default());
    assert!(connect(&t, &mut st, 0, 50_000).is_some());
    assert_eq!(st.affinity.len(), 1);
    let (d, _) = run(&t, &mut st, S, UPLINK, &from_outside(Ipv4Addr::new(100, 64, 0, 1), 1, 0x002, 7, 0));
    assert_eq!(d, Disposition::Drop(DropReason::ConntrackFull));
    assert_eq!((st.affinity.len(), events(&st).conntrack_early_drops), (1, 0));
}

/// Eight SNAT ports toward the only endpoint, all held by spoofed handshakes that never
/// complete: the client's SYN evicts one of them (its tuple freed at once) instead of being
/// refused. Once every tuple is held by an established connection, a SYN is refused.
#[test]
fn snat_exhaustion_early_drops_a_handshake_holding_a_tuple_toward_that_endpoint() {
    let t = node_port_tables(&[ep(POD2_IP)], None);
    let mut st = WorkerState::with_flows(0, 1024);
    st.snat = SnatAllocator::new(20000..=20007, 65 * S, 1);
    for i in 0..8u32 {
        let (d, _) = run(&t, &mut st, 0, UPLINK, &from_outside(Ipv4Addr::from(0x6440_0000 + i), 1000, 0x002, 7, 0));
        assert_eq!(d, Disposition::Forward(POD2));
    }
    for p in 0..8 {
        assert_eq!(connect(&t, &mut st, S, 50_000 + p), Some(POD2_IP), "connection {p}");
    }
    assert_eq!(events(&st).conntrack_early_drops, 8);
    assert_eq!(drops(&st, DropReason::SnatPortsExhausted), 0);
    assert_eq!(st.snat.stats(S).exhausted, 0, "not counted as exhausted: room was made");
    let (d, out) = run(&t, &mut st, 2 * S, UPLINK, &from_outside(CLIENT, 60_000, 0x002, 7, 0));
    assert_eq!(d, Disposition::Forward(UPLINK), "refused with a RST");
    assert!(view(&out).3.contains(crate::wire::TcpFlags::RST));
    assert_eq!(drops(&st, DropReason::SnatPortsExhausted), 1);
}

/// Endpoints come and go (3,000 generations of tables, one new endpoint each, one connection
/// to it that is reset): the per-endpoint counters keep only endpoints in the current tables,
/// and the SNAT pools of endpoints gone idle are forgotten.
#[test]
fn endpoint_churn_leaves_bounded_state() {
    let mut st = WorkerState::with_flows(0, 1024);
    let stay = ep(POD2_IP);
    let mut max = (0, 0);
    for g in 0..3000u32 {
        let now = u64::from(g) * S / 10;
        // A remote endpoint (reached over VXLAN) for this generation only.
        let gone = Endpoint {
            ip: Ipv4Addr::from(0x0af4_0100 + (g % 250) + 1),
            port: 9000 + (g / 250) as u16,
            local: false,
            ..stay
        };
        let t = node_port_tables(&[stay, gone], None);
        for sport in [1000 + (g % 50_000) as u16, 2000 + (g % 50_000) as u16] {
            run(&t, &mut st, now, UPLINK, &from_outside(CLIENT, sport, 0x002, 7, 0));
            run(&t, &mut st, now, UPLINK, &from_outside(CLIENT, sport, 0x004, 8, 0));
        }
        for _ in 0..2 {
            maintain(&t, &mut st, now, 64);
        }
        max = (max.0.max(st.backends.len()), max.1.max(st.snat.pools()));
    }
    assert!(max.0 <= 4, "endpoint counters: at most {} at once", max.0);
    assert!(max.1 <= SNAT_COMPACT_FROM + 1, "SNAT pools: at most {} at once", max.1);
    // The endpoint that stayed keeps its counts through it all.
    let kept = st.backends.get(&(stay.ip, stay.port)).expect("kept").syns;
    assert!(kept > 1000, "{kept}");
}

/// An endpoint's counters stay while it is in the tables, ready or not, and go once it is not.
#[test]
fn endpoint_counters_follow_the_tables() {
    let t1 = node_port_tables(&[ep(POD1_IP), ep(POD2_IP)], None);
    let mut st = WorkerState::with_flows(0, 64);
    for sport in 1000..1040 {
        run(&t1, &mut st, 0, UPLINK, &from_outside(CLIENT, sport, 0x002, 7, 0));
    }
    assert_eq!(st.backends.len(), 2);
    maintain(&t1, &mut st, 0, 8);
    assert_eq!(st.backends.len(), 2);
    let unready = Endpoint { ready: false, serving: false, ..ep(POD1_IP) };
    let t2 = node_port_tables(&[unready, ep(POD2_IP)], None);
    maintain(&t2, &mut st, 0, 8);
    assert_eq!(st.backends.len(), 2, "not ready is still there");
    let t3 = node_port_tables(&[ep(POD2_IP)], None);
    maintain(&t3, &mut st, 0, 8);
    assert_eq!(st.backends.len(), 1);
    assert!(st.backends.contains(&(POD2_IP, 8080)));
}
