use super::*;
use std::collections::BTreeMap;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const SNAT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

fn tcp_key(sport: u16) -> (FlowKey, FlowKey) {
    // client:sport -> VIP:80, DNAT'd to BACKEND:8080 and SNAT'd to SNAT:2000+sport.
    let orig = FlowKey { proto: 6, src: CLIENT, dst: VIP, sport, dport: 80 };
    let reply = FlowKey { proto: 6, src: BACKEND, dst: SNAT, sport: 8080, dport: 2000 + sport };
    (orig, reply)
}

const SYN: TcpFlags = TcpFlags::SYN;
const SYNACK: TcpFlags = TcpFlags(0x012);
const ACK: TcpFlags = TcpFlags::ACK;
const FINACK: TcpFlags = TcpFlags(0x011);
const RST: TcpFlags = TcpFlags::RST;

fn state(ct: &ConnTrack, id: FlowId) -> FlowState {
    ct.get(id).unwrap().state
}

#[test]
fn tcp_lifecycle_follows_nf_conntrack_with_its_timeouts() {
    let t = Timeouts::default();
    let mut ct = ConnTrack::new(16, t);
    let (o, r) = tcp_key(40000);
    let id = ct.insert(o, r, 0, 7).unwrap();
    assert_eq!(ct.update(id, Dir::Orig, SYN, 60, 0), TcpEvent::None);
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::SynSent));
    assert_eq!(ct.get(id).unwrap().expires_at, 120 * S);
    assert_eq!(ct.lookup(&r, S), Some((id, Dir::Reply)), "the NAT'd reply key finds the flow");
    ct.update(id, Dir::Reply, SYNACK, 60, S);
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::SynRecv));
    assert_eq!(ct.update(id, Dir::Orig, ACK, 52, 2 * S), TcpEvent::Established);
    assert_eq!(ct.get(id).unwrap().expires_at, 2 * S + 86_400 * S);
    ct.update(id, Dir::Reply, FINACK, 52, 3 * S); // the backend closes first (it will hold TIME_WAIT)
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::CloseWait));
    ct.update(id, Dir::Orig, FINACK, 52, 3 * S);
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::LastAck));
    ct.update(id, Dir::Reply, ACK, 52, 4 * S);
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::TimeWait));
    assert_eq!(ct.get(id).unwrap().expires_at, 124 * S);
    let f = ct.get(id).unwrap();
    assert_eq!((f.packets, f.bytes, f.tag), ([3, 3], [164, 164], 7));
    assert!(ct.lookup(&o, 124 * S - 1).is_some());
    assert!(ct.lookup(&o, 124 * S).is_none(), "expired at the TIME_WAIT timeout");
    let gone = ct.take_expired();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].tag, 7);
    assert!(ct.take_expired().is_empty(), "handed back exactly once");
    assert!(ct.lookup(&r, 124 * S).is_none());
}

#[test]
fn a_syn_answered_by_a_bare_ack_is_the_incident_2_signature() {
    let mut ct = ConnTrack::new(4, Timeouts::default());
    let (o, r) = tcp_key(1);
    let id = ct.insert(o, r, 0, 0).unwrap();
    ct.update(id, Dir::Orig, SYN, 60, 0);
    assert_eq!(ct.update(id, Dir::Reply, ACK, 52, 1), TcpEvent::BareAckToSyn);
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::SynSent));
}

#[test]
fn rst_closes_and_a_new_syn_reopens() {
    let mut ct = ConnTrack::new(4, Timeouts::default());
    let (o, r) = tcp_key(2);
    let id = ct.insert(o, r, 0, 0).unwrap();
    ct.update(id, Dir::Orig, SYN, 60, 0);
    ct.update(id, Dir::Reply, RST, 40, 0);
    assert_eq!(state(&ct, id), FlowState::Tcp(TcpState::Close));
    assert_eq!(ct.get(id).unwrap().expires_at, 10 * S);
    assert_eq!(ct.update(id, Dir::Orig, SYN, 60, S), TcpEvent::Reopened);
}

#[test]
fn udp_unreplied_then_replied_timeouts() {
    let mut ct = ConnTrack::new(4, Timeouts::default());
    let o = FlowKey { proto: 17, src: CLIENT, dst: VIP, sport: 5353, dport: 53 };
    let id = ct.insert(o, o.reversed(), 0, 0).unwrap();
    ct.update(id, Dir::Orig, TcpFlags(0), 40, 0);
    assert_eq!((state(&ct, id), ct.get(id).unwrap().expires_at), (FlowState::UdpUnreplied, 30 * S));
    ct.update(id, Dir::Reply, TcpFlags(0), 80, S);
    assert_eq!((state(&ct, id), ct.get(id).unwrap().expires_at), (FlowState::UdpReplied, 121 * S));
}

#[test]
fn icmp_echo_keys_pair_by_identifier() {
    let o = FlowKey { proto: 1, src: CLIENT, dst: BACKEND, sport: 0x1234, dport: 0 };
    assert_eq!(o.reversed(), FlowKey { proto: 1, src: BACKEND, dst: CLIENT, sport: 0x1234, dport: 0 });
    let mut ct = ConnTrack::new(4, Timeouts::default());
    let id = ct.insert(o, o.reversed(), 0, 0).unwrap();
    assert_eq!(ct.lookup(&o.reversed(), 1), Some((id, Dir::Reply)));
}

#[test]
fn a_full_table_refuses_new_flows_and_never_evicts_established_ones() {
    let mut ct = ConnTrack::new(2, Timeouts::default());
    let a = ct.insert(tcp_key(1).0, tcp_key(1).1, 0, 1).unwrap();
    let b = ct.insert(tcp_key(2).0, tcp_key(2).1, 0, 2).unwrap();
    for id in [a, b] {
        ct.update(id, Dir::Orig, SYN, 60, 0);
        ct.update(id, Dir::Reply, SYNACK, 60, 0);
        ct.update(id, Dir::Orig, ACK, 52, 0);
    }
    assert_eq!(ct.insert(tcp_key(3).0, tcp_key(3).1, 0, 3), Err(CtError::Full));
    assert_eq!(ct.insert(tcp_key(1).0, tcp_key(9).1, 0, 3), Err(CtError::Exists));
    assert_eq!(ct.get(a).unwrap().tag, 1, "existing flows untouched");
    assert_eq!(ct.early_drops(), 0);
    // After the ESTABLISHED timeout a sweep frees both slots.
    ct.sweep(86_400 * S, 10);
    assert_eq!(ct.take_expired().len(), 2);
    assert!(ct.insert(tcp_key(3).0, tcp_key(3).1, 86_400 * S, 3).is_ok());
}

/// netfilter's early_drop: a table full of handshakes that never completed takes a new flow
/// in place of the oldest of them (handed back as expired, for its SNAT port).
#[test]
fn a_full_table_of_unassured_flows_early_drops_the_oldest() {
    let mut ct = ConnTrack::new(2, Timeouts::default());
    let a = ct.insert(tcp_key(1).0, tcp_key(1).1, 0, 1).unwrap();
    ct.update(a, Dir::Orig, SYN, 60, 0);
    let b = ct.insert(tcp_key(2).0, tcp_key(2).1, S, 2).unwrap();
    ct.update(b, Dir::Orig, SYN, 60, S);
    let c = ct.insert(tcp_key(3).0, tcp_key(3).1, 2 * S, 3).expect("early drop");
    assert_eq!(ct.early_drops(), 1);
    let gone = ct.take_expired();
    assert_eq!((gone.len(), gone[0].tag, gone[0].expires_at), (1, 1, 2 * S), "the oldest, expired now");
    assert!(ct.lookup(&tcp_key(1).0, 2 * S).is_none() && ct.lookup(&tcp_key(1).1, 2 * S).is_none());
    assert_eq!(ct.get(b).unwrap().tag, 2);
    assert_eq!(ct.get(c).unwrap().tag, 3);
}

#[test]
fn memory_per_flow_is_small() {
    let m = ConnTrack::memory_per_flow();
    // Two cache lines of flow, four 8-byte index buckets, early drop's 40 bytes and the
    // journal's 5 (rounded up).
    assert!(m <= 208, "{m} bytes per flow");
    // What a lookup and the per-packet update touch sits on the flow's first line.
    assert!(core::mem::offset_of!(Flow, packets) + 16 <= 64);
    assert!(core::mem::offset_of!(Flow, expires_at) + 8 <= 64);
}

/// Reference model: a map of live flows with their expiry. Random inserts, packets, time
/// steps, sweeps; lookups must agree with the model, capacity must hold, and every flow must
/// leave exactly once (removed, or handed back as expired).
#[test]
fn agrees_with_a_reference_model() {
    use proptest::prelude::*;
    let op = (0u8..4, 0u16..24, 0u64..50);
    proptest!(ProptestConfig { cases: 256, ..ProptestConfig::default() }, |(ops in proptest::collection::vec(op, 1..300))| {
        let t = Timeouts { udp: 10 * S, udp_stream: 20 * S, ..Timeouts::default() };
        let cap = 8;
        let mut ct = ConnTrack::new(cap, t);
        let mut model: BTreeMap<u16, u64> = BTreeMap::new(); // sport -> expires_at
        let mut gone = 0usize;
        let mut created = 0usize;
        let mut now = 0u64;
        let key = |p: u16| FlowKey { proto: 17, src: CLIENT, dst: VIP, sport: p, dport: 53 };
        for (kind, p, dt) in ops {
            now += dt * S / 4;
            // What the model says is live now.
            let live_in_model = model.get(&p).is_some_and(|&e| e > now);
            match kind {
                0 => {
                    let expired_in_model: Vec<u16> = model.iter().filter(|(_, &e)| e <= now).map(|(k, _)| *k).collect();
                    let (full, drops) = (ct.len() == cap, ct.early_drops());
                    let res = ct.insert(key(p), key(p).reversed(), now, u64::from(p));
                    prop_assert!(ct.early_drops() == drops || full, "early drop with room left");
                    match res {
                        Ok(id) => {
                            prop_assert!(!live_in_model);
                            ct.update(id, Dir::Orig, TcpFlags(0), 40, now);
                            model.insert(p, now + 10 * S);
                            created += 1;
                        }
                        Err(CtError::Exists) => prop_assert!(model.contains_key(&p), "Exists for an unknown key"),
                        Err(CtError::Full) => prop_assert!(model.len() >= cap || !expired_in_model.is_empty()),
                    }
                }
                1 => {
                    let got = ct.lookup(&key(p), now);
                    prop_assert_eq!(got.is_some(), live_in_model, "lookup of {} at {}", p, now);
                    if let Some((id, _)) = got {
                        ct.update(id, Dir::Reply, TcpFlags(0), 80, now);
                        model.insert(p, now + 20 * S);
                    } else if model.get(&p).is_some_and(|&e| e <= now) {
                        model.remove(&p);
                    }
                }
                2 => {
                    ct.sweep(now, cap);
                    model.retain(|_, e| *e > now);
                }
                _ => {
                    if live_in_model {
                        if let Some((id, _)) = ct.lookup(&key(p), now) {
                            prop_assert!(ct.remove(id).is_some());
                            model.remove(&p);
                            gone += 1;
                        }
                    }
                }
            }
            // Expired, or evicted by early drop (an unreplied flow in a full table): gone
            // from the model too.
            for f in ct.take_expired() {
                model.remove(&f.orig.sport);
                gone += 1;
            }
            prop_assert!(ct.len() <= cap);
            prop_assert_eq!(ct.len() + gone, created, "every flow leaves exactly once");
        }
    });
}

#[test]
fn handshake_events_name_retransmitted_and_answered_syns() {
    let mut ct = ConnTrack::new(16, Timeouts::default());
    let (o, r) = tcp_key(40001);
    let id = ct.insert(o, r, 0, 0).unwrap();
    assert_eq!(ct.update(id, Dir::Orig, SYN, 60, 0), TcpEvent::None, "the first SYN");
    assert_eq!(ct.update(id, Dir::Orig, SYN, 60, S), TcpEvent::SynRetransmit);
    assert_eq!(ct.update(id, Dir::Orig, SYN, 60, 3 * S), TcpEvent::SynRetransmit);
    assert_eq!(ct.update(id, Dir::Reply, SYNACK, 60, 3 * S), TcpEvent::SynAnswered);
    assert_eq!(ct.update(id, Dir::Orig, ACK, 52, 3 * S), TcpEvent::Established);
}
