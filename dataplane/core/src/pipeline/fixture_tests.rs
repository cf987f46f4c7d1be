//! Pipeline fixture tables: input frame, ingress port, node A's tables -> expected disposition
//! and, where the output is fully determined, the exact expected frame. Expected frames are
//! built with `testkit`'s builders, independently of the pipeline code. Finally, every drop
//! reason must be produced by at least one fixture.

use super::*;
use crate::tables::{PortId, TablesBuilder};
use crate::testkit::*;
use crate::wire::{MacAddr, VxlanPacket};
use core::net::Ipv4Addr;
use std::collections::BTreeSet;

const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// Node B's tunnel address (flannel.1's, the network address of its pod CIDR) and gateway.
const TUNNEL_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 0);
const GATEWAY_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// An address in the cluster CIDR that is no node's (the issue 17 report's first spoof).
const NO_NODES: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 5);

fn run(tables: &Tables, state: &mut WorkerState, now: Nanos, port: PortId, input: &[u8]) -> (Disposition, Vec<u8>) {
    let mut buf = umem(input);
    let mut f = FrameBuf::new(&mut buf, HEADROOM, input.len()).expect("fits");
    let d = process_frame(tables, state, now, port, &mut f);
    (d, f.data().to_vec())
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ip::new(src, dst);
    ip.ttl = ttl;
    ipv4_with(&ip, &L4::Udp { sport: 40001, dport: 53, payload })
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ip::new(src, dst);
    ip.ttl = ttl;
    ipv4_with(&ip, &L4::Tcp { sport: 41000, dport: 80, seq: 1, ack: 0, flags: 0x002, payload })
}

/// UDP to the VXLAN port carrying a hand-built VXLAN frame (what a pod would send to inject one).
fn udp_to_vxlan_port(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let inner = vxlan_frame(&Vxlan::b_to_a(), &udp(NO_NODES, POD1_IP, 64, b"injected"));
    ipv4(src, dst, &L4::Udp { sport: 40002, dport: 8472, payload: &inner[42..] })
}

/// ICMP destination unreachable (`code`) from `src` to `dst`, quoting `orig`'s header and 8
/// bytes.
fn icmp_unreachable(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, code: u8, orig: &[u8]) -> Vec<u8> {
    let mut body = vec![3, code, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&orig[..28]);
    let c = crate::wire::checksum::checksum(&body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_with(&Ip { ttl, ..Ip::new(src, dst) }, &L4::Raw { proto: 1, bytes: &body })
}

fn with<F: FnOnce(&mut Vec<u8>)>(mut v: Vec<u8>, f: F) -> Vec<u8> {
    f(&mut v);
    v
}

/// Recomputes the IPv4 header checksum at `at` after a test edited the header.
fn fix_ip_csum(v: &mut [u8], at: usize) {
    let hl = usize::from(v[at] & 0xf) * 4;
    v[at + 10] = 0;
    v[at + 11] = 0;
    let c = crate::wire::checksum::checksum(&v[at..at + hl]);
    v[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
}

struct Case {
    name: &'static str,
    port: PortId,
    input: Vec<u8>,
    expect: Disposition,
    /// The exact output frame, when it is fully determined.
    output: Option<Vec<u8>>,
}

fn case(name: &'static str, port: PortId, input: Vec<u8>, expect: Disposition, output: Option<Vec<u8>>) -> Case {
    Case { name, port, input, expect, output }
}

fn drop_case(name: &'static str, port: PortId, input: Vec<u8>, r: DropReason) -> Case {
    case(name, port, input, Disposition::Drop(r), None)
}

fn arp_reply(to_mac: MacAddr, to_ip: Ipv4Addr, from_mac: MacAddr) -> Vec<u8> {
    arp_reply_for(to_mac, to_ip, from_mac, GATEWAY_A)
}

fn arp_reply_for(to_mac: MacAddr, to_ip: Ipv4Addr, from_mac: MacAddr, for_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 2];
    a.extend_from_slice(&from_mac.0);
    a.extend_from_slice(&for_ip.octets());
    a.extend_from_slice(&to_mac.0);
    a.extend_from_slice(&to_ip.octets());
    eth(to_mac, from_mac, 0x0806, &a)
}

fn cases() -> Vec<Case> {
    use Disposition::*;
    use DropReason as R;
    let payload = b"vxnat says hello";
    let p1_p2 = udp(POD1_IP, POD2_IP, 64, payload);
    let p1_p2_out = eth(POD2_MAC, POD2_PORT_MAC, 0x0800, &udp(POD1_IP, POD2_IP, 63, payload));
    let b_to_a = Vxlan::b_to_a();
    let vx = |inner: &[u8]| vxlan_frame(&b_to_a, inner);
    let mut v = vec![
        // ---- pod port: forwarding
        case(
            "pod to pod on the same node, TTL decremented",
            POD2.min(POD1),
            from_pod1(&p1_p2),
            Forward(POD2),
            Some(p1_p2_out.clone()),
        ),
        case(
            "pod with CHECKSUM_PARTIAL UDP: checksum completed in software",
            POD1,
            with(from_pod1(&p1_p2), |f| make_partial(f)),
            Forward(POD2),
            Some(p1_p2_out.clone()),
        ),
        case(
            "pod with CHECKSUM_PARTIAL TCP: checksum completed in software",
            POD1,
            with(from_pod1(&tcp(POD1_IP, POD2_IP, 64, &[7u8; 999])), |f| make_partial(f)),
            Forward(POD2),
            Some(eth(POD2_MAC, POD2_PORT_MAC, 0x0800, &tcp(POD1_IP, POD2_IP, 63, &[7u8; 999]))),
        ),
        case(
            "pod to gateway goes to the host stack, TTL untouched",
            POD1,
            from_pod1(&udp(POD1_IP, GATEWAY_A, 64, payload)),
            ToHost,
            Some(eth(HOST_STACK_MAC, HOST_PORT_MAC, 0x0800, &udp(POD1_IP, GATEWAY_A, 64, payload))),
        ),
        case(
            "pod to node address goes to the host stack",
            POD1,
            from_pod1(&udp(POD1_IP, NODE_A, 64, payload)),
            ToHost,
            None,
        ),
        case(
            "pod to outside the cluster goes to the host stack (it routes and masquerades)",
            POD1,
            from_pod1(&udp(POD1_IP, EXTERNAL, 64, payload)),
            ToHost,
            Some(eth(HOST_STACK_MAC, HOST_PORT_MAC, 0x0800, &udp(POD1_IP, EXTERNAL, 64, payload))),
        ),
        case(
            "IPv4 options are forwarded untouched",
            POD1,
            from_pod1(&ipv4_with(
                &Ip { options: vec![0x94, 0x04, 0, 0], ..Ip::new(POD1_IP, POD2_IP) },
                &L4::Udp { sport: 1, dport: 2, payload },
            )),
            Forward(POD2),
            Some(eth(
                POD2_MAC,
                POD2_PORT_MAC,
                0x0800,
                &ipv4_with(
                    &Ip { options: vec![0x94, 0x04, 0, 0], ttl: 63, ..Ip::new(POD1_IP, POD2_IP) },
                    &L4::Udp { sport: 1, dport: 2, payload },
                ),
            )),
        ),
        case(
            "Ethernet padding after a short packet is trimmed",
            POD1,
            with(from_pod1(&p1_p2), |f| f.extend_from_slice(&[0u8; 20])),
            Forward(POD2),
            Some(p1_p2_out.clone()),
        ),
        case(
            "a non-initial fragment is routed on addresses alone",
            POD1,
            from_pod1(&ipv4_with(
                &Ip { frag_offset: 1480, dont_frag: false, ..Ip::new(POD1_IP, POD2_IP) },
                &L4::Raw { proto: 17, bytes: &[1u8; 100] },
            )),
            Forward(POD2),
            None,
        ),
        case(
            "pod to a pod on node B is encapsulated",
            POD1,
            from_pod1(&udp(POD1_IP, REMOTE_POD_B, 64, payload)),
            Forward(UPLINK),
            None,
        ),
        // ---- pod port: no VXLAN injection (issue 17)
        drop_case(
            "pod UDP to a remote node's VXLAN port (a hand-built VXLAN frame)",
            POD1,
            from_pod1(&udp_to_vxlan_port(POD1_IP, NODE_B)),
            R::PodToVxlanPort,
        ),
        drop_case(
            "pod UDP to this node's VXLAN port",
            POD1,
            from_pod1(&udp_to_vxlan_port(POD1_IP, NODE_A)),
            R::PodToVxlanPort,
        ),
        drop_case(
            "pod UDP to a node's VXLAN port, first fragment",
            POD1,
            from_pod1(&ipv4_with(
                &Ip { more_frags: true, dont_frag: false, ..Ip::new(POD1_IP, NODE_C) },
                &L4::Udp { sport: 40002, dport: 8472, payload: &[8, 0, 0, 0, 0, 0, 1, 0] },
            )),
            R::PodToVxlanPort,
        ),
        case(
            "pod UDP to another port of a remote node's underlay address: to the host stack as before",
            POD1,
            from_pod1(&udp(POD1_IP, NODE_B, 64, payload)),
            ToHost,
            Some(eth(HOST_STACK_MAC, HOST_PORT_MAC, 0x0800, &udp(POD1_IP, NODE_B, 64, payload))),
        ),
        case(
            "pod TCP to a node's port 8472 is not VXLAN",
            POD1,
            from_pod1(&ipv4(
                POD1_IP,
                NODE_B,
                &L4::Tcp { sport: 40003, dport: 8472, seq: 1, ack: 0, flags: 0x002, payload: b"" },
            )),
            ToHost,
            None,
        ),
        drop_case(
            "pod UDP to port 8472 of a remote node's gateway (a flannel node's VXLAN socket listens there)",
            POD1,
            from_pod1(&udp_to_vxlan_port(POD1_IP, GATEWAY_B)),
            R::PodToVxlanPort,
        ),
        drop_case(
            "pod UDP to port 8472 of a remote node's pod-network address (flannel.1's 10.244.1.0)",
            POD1,
            from_pod1(&udp_to_vxlan_port(POD1_IP, Ipv4Addr::new(10, 244, 1, 0))),
            R::PodToVxlanPort,
        ),
        case(
            "pod UDP to port 8472 of a remote pod: forwarded (pods may use any port among themselves)",
            POD1,
            from_pod1(&udp_to_vxlan_port(POD1_IP, REMOTE_POD_B)),
            Forward(UPLINK),
            None,
        ),
        // ---- pod port: ARP
        case(
            "ARP for the gateway is answered with the port's MAC",
            POD1,
            arp_request(POD1_MAC, POD1_IP, GATEWAY_A),
            Forward(POD1),
            Some(arp_reply(POD1_MAC, POD1_IP, POD1_PORT_MAC)),
        ),
        case(
            "ARP probe (sender 0.0.0.0) for the gateway is answered",
            POD1,
            arp_request(POD1_MAC, Ipv4Addr::UNSPECIFIED, GATEWAY_A),
            Forward(POD1),
            Some(arp_reply(POD1_MAC, Ipv4Addr::UNSPECIFIED, POD1_PORT_MAC)),
        ),
        drop_case(
            "ARP for another pod is not answered",
            POD1,
            arp_request(POD1_MAC, POD1_IP, POD2_IP),
            R::ArpNotForGateway,
        ),
        drop_case("ARP claiming another pod's IP", POD1, arp_request(POD1_MAC, POD2_IP, GATEWAY_A), R::ArpSpoofed),
        drop_case(
            "ARP with a sender MAC that is not the pod's",
            POD1,
            with(arp_request(POD1_MAC, POD1_IP, GATEWAY_A), |f| f[22] ^= 1),
            R::ArpSpoofed,
        ),
        drop_case(
            "unsolicited ARP reply",
            POD1,
            with(arp_request(POD1_MAC, POD1_IP, GATEWAY_A), |f| f[21] = 2),
            R::ArpReplyIgnored,
        ),
        drop_case("ARP truncated", POD1, arp_request(POD1_MAC, POD1_IP, GATEWAY_A)[..30].to_vec(), R::ArpMalformed),
        drop_case(
            "ARP for IPv6-sized addresses",
            POD1,
            with(arp_request(POD1_MAC, POD1_IP, GATEWAY_A), |f| f[19] = 16),
            R::ArpMalformed,
        ),
        drop_case(
            "ARP unicast to another MAC",
            POD1,
            with(arp_request(POD1_MAC, POD1_IP, GATEWAY_A), |f| f[..6].copy_from_slice(&POD2_MAC.0)),
            R::DstMacNotOurs,
        ),
        // ---- pod port: security and L2
        drop_case("spoofed source MAC", POD1, with(from_pod1(&p1_p2), |f| f[11] ^= 0x10), R::PodSpoofedMac),
        drop_case("spoofed source IP", POD1, from_pod1(&udp(POD2_IP, POD1_IP, 64, payload)), R::PodSpoofedIp),
        drop_case(
            "IPv4 to another MAC",
            POD1,
            with(from_pod1(&p1_p2), |f| f[..6].copy_from_slice(&POD2_MAC.0)),
            R::DstMacNotOurs,
        ),
        drop_case(
            "IPv4 to the broadcast MAC",
            POD1,
            with(from_pod1(&p1_p2), |f| f[..6].copy_from_slice(&[0xff; 6])),
            R::L2Multicast,
        ),
        drop_case("IPv6", POD1, eth(POD1_PORT_MAC, POD1_MAC, 0x86dd, &[0x60; 60]), R::Ipv6Unsupported),
        drop_case("LLDP", POD1, eth(POD1_PORT_MAC, POD1_MAC, 0x88cc, &[0; 46]), R::EthertypeUnsupported),
        drop_case(
            "VLAN-tagged frame from a pod",
            POD1,
            with(from_pod1(&p1_p2), |f| {
                f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
            }),
            R::VlanTagged,
        ),
        drop_case(
            "three VLAN tags",
            POD1,
            with(from_pod1(&p1_p2), |f| {
                f.splice(12..12, [0x88, 0xa8, 0, 1, 0x81, 0, 0, 2, 0x81, 0, 0, 3]);
            }),
            R::EthTooManyTags,
        ),
        drop_case("runt frame", POD1, from_pod1(&p1_p2)[..13].to_vec(), R::EthTruncated),
        // ---- pod port: hostile IPv4
        drop_case("IPv4 header cut short", POD1, from_pod1(&p1_p2)[..30].to_vec(), R::Ipv4Truncated),
        drop_case("IPv4 total length beyond the frame", POD1, from_pod1(&p1_p2)[..40].to_vec(), R::Ipv4Truncated),
        drop_case("IHL below 5", POD1, with(from_pod1(&p1_p2), |f| f[14] = 0x44), R::Ipv4BadLength),
        drop_case(
            "total length below the header",
            POD1,
            with(from_pod1(&p1_p2), |f| {
                f[16..18].copy_from_slice(&12u16.to_be_bytes());
                fix_ip_csum(f, 14);
            }),
            R::Ipv4BadLength,
        ),
        drop_case("version 6 in an IPv4 frame", POD1, with(from_pod1(&p1_p2), |f| f[14] = 0x65), R::Ipv4BadVersion),
        drop_case("bad IPv4 header checksum", POD1, with(from_pod1(&p1_p2), |f| f[24] ^= 0xff), R::Ipv4BadChecksum),
        drop_case(
            "reserved IPv4 flag",
            POD1,
            with(from_pod1(&p1_p2), |f| {
                f[20] |= 0x80;
                fix_ip_csum(f, 14);
            }),
            R::Ipv4ReservedFlag,
        ),
        drop_case(
            "loopback source",
            POD1,
            from_pod1(&udp(Ipv4Addr::LOCALHOST, POD2_IP, 64, payload)),
            R::Ipv4MartianSource,
        ),
        drop_case(
            "multicast destination",
            POD1,
            from_pod1(&udp(POD1_IP, Ipv4Addr::new(224, 0, 0, 251), 64, payload)),
            R::Ipv4DstMulticast,
        ),
        drop_case(
            "limited broadcast destination",
            POD1,
            from_pod1(&udp(POD1_IP, Ipv4Addr::BROADCAST, 64, payload)),
            R::Ipv4DstMulticast,
        ),
        drop_case(
            "first fragment too short for the UDP header",
            POD1,
            from_pod1(&ipv4_with(
                &Ip { more_frags: true, dont_frag: false, ..Ip::new(POD1_IP, POD2_IP) },
                &L4::Raw { proto: 17, bytes: &[1, 2, 3, 4] },
            )),
            R::Ipv4TinyFragment,
        ),
        drop_case(
            "fragment reaching past 65535 bytes",
            POD1,
            from_pod1(&ipv4_with(
                &Ip { frag_offset: 65528, dont_frag: false, ..Ip::new(POD1_IP, POD2_IP) },
                &L4::Raw { proto: 17, bytes: &[0; 16] },
            )),
            R::Ipv4FragmentOverflow,
        ),
        drop_case("UDP length below 8", POD1, with(from_pod1(&p1_p2), |f| f[39] = 4), R::L4Truncated),
        drop_case("UDP length beyond the datagram", POD1, with(from_pod1(&p1_p2), |f| f[39] = 200), R::L4Truncated),
        drop_case(
            "TCP header cut short",
            POD1,
            from_pod1(&ipv4(POD1_IP, POD2_IP, &L4::Raw { proto: 6, bytes: &[0; 12] })),
            R::L4Truncated,
        ),
        drop_case(
            "TCP data offset beyond the segment",
            POD1,
            from_pod1(&ipv4(
                POD1_IP,
                POD2_IP,
                &L4::Raw { proto: 6, bytes: &[0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0, 2, 0, 0, 0, 0, 0, 0] },
            )),
            R::L4Truncated,
        ),
        // ---- pod port: routing
        drop_case(
            "no pod at that address",
            POD1,
            from_pod1(&udp(POD1_IP, Ipv4Addr::new(10, 244, 0, 99), 64, payload)),
            R::NoSuchPod,
        ),
        drop_case(
            "cluster address no node owns",
            POD1,
            from_pod1(&udp(POD1_IP, Ipv4Addr::new(10, 244, 9, 9), 64, payload)),
            R::NoRouteToNode,
        ),
        drop_case(
            "remote node's next hop not resolved",
            POD1,
            from_pod1(&udp(POD1_IP, REMOTE_POD_C, 64, payload)),
            R::UnderlayNoNextHop,
        ),
        drop_case(
            "too big for the underlay, DF set, and an ICMP error itself: no fragmentation needed about it",
            POD1,
            from_pod1(&ipv4_with(
                &Ip::new(POD1_IP, REMOTE_POD_B),
                &L4::Raw { proto: 1, bytes: &[&[3u8, 3, 0, 0, 0, 0, 0, 0][..], &[0u8; 1451 - 28][..]].concat() },
            )),
            R::MtuExceeded,
        ),
        case(
            "largest packet that fits the underlay (1450 bytes)",
            POD1,
            from_pod1(&udp(POD1_IP, REMOTE_POD_B, 64, &[0u8; 1450 - 28])),
            Forward(UPLINK),
            None,
        ),
        drop_case(
            "TTL 1 ICMP error is not answered with another",
            POD1,
            from_pod1(&ipv4_with(
                &Ip { ttl: 1, ..Ip::new(POD1_IP, POD2_IP) },
                &L4::Raw { proto: 1, bytes: &[3, 3, 0, 0, 0, 0, 0, 0] },
            )),
            R::TtlExpired,
        ),
        // ---- host port
        case(
            "host stack to a local pod: not decremented (the host routed it)",
            HOST,
            eth(HOST_PORT_MAC, HOST_STACK_MAC, 0x0800, &udp(NODE_A, POD1_IP, 64, payload)),
            Forward(POD1),
            Some(eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &udp(NODE_A, POD1_IP, 64, payload))),
        ),
        case(
            "host stack to a pod on node B is encapsulated",
            HOST,
            eth(HOST_PORT_MAC, HOST_STACK_MAC, 0x0800, &udp(NODE_A, REMOTE_POD_B, 64, payload)),
            Forward(UPLINK),
            None,
        ),
        case(
            "host stack ARP for a local pod: proxy ARP on the host link",
            HOST,
            arp_request(HOST_STACK_MAC, GATEWAY_A, POD1_IP),
            Forward(HOST),
            Some(arp_reply_for(HOST_STACK_MAC, GATEWAY_A, HOST_PORT_MAC, POD1_IP)),
        ),
        case(
            "host stack ARP for a remote pod: proxy ARP on the host link",
            HOST,
            arp_request(HOST_STACK_MAC, GATEWAY_A, REMOTE_POD_B),
            Forward(HOST),
            Some(arp_reply_for(HOST_STACK_MAC, GATEWAY_A, HOST_PORT_MAC, REMOTE_POD_B)),
        ),
        drop_case(
            "host stack ARP for the gateway (its own address)",
            HOST,
            arp_request(HOST_STACK_MAC, NODE_A, GATEWAY_A),
            R::ArpNotForGateway,
        ),
        drop_case(
            "host stack ARP outside the cluster",
            HOST,
            arp_request(HOST_STACK_MAC, GATEWAY_A, EXTERNAL),
            R::ArpNotForGateway,
        ),
        drop_case(
            "host port frame from an unexpected MAC",
            HOST,
            eth(HOST_PORT_MAC, POD1_MAC, 0x0800, &udp(NODE_A, POD1_IP, 64, payload)),
            R::HostSpoofedMac,
        ),
        drop_case(
            "host stack sends outside the cluster through vxnat",
            HOST,
            eth(HOST_PORT_MAC, HOST_STACK_MAC, 0x0800, &udp(NODE_A, EXTERNAL, 64, payload)),
            R::HostNotRoutable,
        ),
        // ---- uplink: decapsulation
        case(
            "VXLAN from node B to a local pod",
            UPLINK,
            vx(&tcp(REMOTE_POD_B, POD1_IP, 63, payload)),
            Forward(POD1),
            Some(eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &tcp(REMOTE_POD_B, POD1_IP, 62, payload))),
        ),
        case(
            "VXLAN with a valid non-zero outer checksum",
            UPLINK,
            vxlan_frame(&Vxlan { udp_checksum: true, ..Vxlan::b_to_a() }, &tcp(REMOTE_POD_B, POD1_IP, 63, payload)),
            Forward(POD1),
            Some(eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &tcp(REMOTE_POD_B, POD1_IP, 62, payload))),
        ),
        case(
            "VXLAN from node B to node A's address goes to the host stack",
            UPLINK,
            vx(&udp(REMOTE_POD_B, NODE_A, 63, payload)),
            ToHost,
            Some(eth(HOST_STACK_MAC, HOST_PORT_MAC, 0x0800, &udp(REMOTE_POD_B, NODE_A, 63, payload))),
        ),
        // ---- uplink: the inner source must be the sending node's (issue 17)
        drop_case(
            "inner source that is no node's (a pod on node B hand-built the frame)",
            UPLINK,
            vx(&udp(NO_NODES, POD1_IP, 63, payload)),
            R::TunnelInnerSourceSpoofed,
        ),
        drop_case(
            "inner source in this node's own pod CIDR",
            UPLINK,
            vx(&udp(POD2_IP, POD1_IP, 63, payload)),
            R::TunnelInnerSourceSpoofed,
        ),
        drop_case(
            "inner source in another remote node's pod CIDR",
            UPLINK,
            vx(&udp(REMOTE_POD_C, POD1_IP, 63, payload)),
            R::TunnelInnerSourceSpoofed,
        ),
        drop_case(
            "inner source outside the cluster",
            UPLINK,
            vx(&udp(EXTERNAL, POD1_IP, 63, payload)),
            R::TunnelInnerSourceSpoofed,
        ),
        drop_case(
            "inner source is the sending node's underlay address (its stack sends from its pod network)",
            UPLINK,
            vx(&udp(NODE_B, POD1_IP, 63, payload)),
            R::TunnelInnerSourceSpoofed,
        ),
        drop_case(
            "a spoofed inner source is refused before routing",
            UPLINK,
            vx(&udp(NO_NODES, REMOTE_POD_C, 63, payload)),
            R::TunnelInnerSourceSpoofed,
        ),
        case(
            "inner source node B's gateway (its node stack, vxnat's SNAT and ICMP errors)",
            UPLINK,
            vx(&udp(GATEWAY_B, POD1_IP, 63, payload)),
            Forward(POD1),
            Some(eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &udp(GATEWAY_B, POD1_IP, 62, payload))),
        ),
        case(
            "inner source node B's tunnel address (flannel.1's: a flannel node's stack, kube-proxy's MASQUERADE)",
            UPLINK,
            vx(&udp(TUNNEL_B, POD1_IP, 63, payload)),
            Forward(POD1),
            Some(eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &udp(TUNNEL_B, POD1_IP, 62, payload))),
        ),
        case(
            "ICMP error from node B's gateway about a pod's packet",
            UPLINK,
            vx(&icmp_unreachable(GATEWAY_B, POD1_IP, 64, 3, &udp(POD1_IP, REMOTE_POD_B, 63, payload))),
            Forward(POD1),
            Some(eth(
                POD1_MAC,
                POD1_PORT_MAC,
                0x0800,
                &icmp_unreachable(GATEWAY_B, POD1_IP, 63, 3, &udp(POD1_IP, REMOTE_POD_B, 63, payload)),
            )),
        ),
        drop_case(
            "incident 1: corrupted outer UDP checksum",
            UPLINK,
            with(
                vxlan_frame(&Vxlan { udp_checksum: true, ..Vxlan::b_to_a() }, &tcp(REMOTE_POD_B, POD1_IP, 63, payload)),
                |f| f[40] ^= 0x5a,
            ),
            R::VxlanBadOuterChecksum,
        ),
        drop_case(
            "VXLAN from an unknown address",
            UPLINK,
            vxlan_frame(
                &Vxlan { src_ip: Ipv4Addr::new(192, 168, 50, 66), ..Vxlan::b_to_a() },
                &tcp(REMOTE_POD_B, POD1_IP, 63, payload),
            ),
            R::VxlanUnknownVtep,
        ),
        drop_case("wrong VNI", UPLINK, vxlan_frame(&Vxlan { vni: 2, ..Vxlan::b_to_a() }, &p1_p2), R::VxlanWrongVni),
        drop_case(
            "VXLAN without the I flag",
            UPLINK,
            vxlan_frame(&Vxlan { flags: 0, ..Vxlan::b_to_a() }, &p1_p2),
            R::VxlanBadFlags,
        ),
        drop_case(
            "VXLAN with reserved flag bits (GBP)",
            UPLINK,
            vxlan_frame(&Vxlan { flags: 0x88, ..Vxlan::b_to_a() }, &p1_p2),
            R::VxlanBadFlags,
        ),
        drop_case(
            "UDP to another port on the uplink",
            UPLINK,
            vxlan_frame(&Vxlan { dport: 4789, ..Vxlan::b_to_a() }, &p1_p2),
            R::UplinkNotVxlan,
        ),
        drop_case(
            "TCP on the uplink",
            UPLINK,
            eth(UPLINK_MAC, NODE_B_UPLINK_MAC, 0x0800, &tcp(NODE_B, NODE_A, 64, payload)),
            R::UplinkNotVxlan,
        ),
        drop_case(
            "VXLAN to another node's address",
            UPLINK,
            vxlan_frame(&Vxlan { dst_ip: NODE_C, ..Vxlan::b_to_a() }, &p1_p2),
            R::UplinkNotForNode,
        ),
        drop_case(
            "fragmented outer datagram",
            UPLINK,
            with(vx(&p1_p2), |f| {
                f[20] |= 0x20;
                fix_ip_csum(f, 14);
            }),
            R::VxlanOuterFragment,
        ),
        drop_case("frame cut inside the VXLAN header", UPLINK, vx(&p1_p2)[..46].to_vec(), R::Ipv4Truncated),
        drop_case(
            "VXLAN header cut short (lengths consistent)",
            UPLINK,
            eth(
                UPLINK_MAC,
                NODE_B_UPLINK_MAC,
                0x0800,
                &ipv4_with(
                    &Ip { dont_frag: false, ..Ip::new(NODE_B, NODE_A) },
                    &L4::Raw { proto: 17, bytes: &[0x9c, 0x40, 0x21, 0x18, 0, 12, 0, 0, 0x08, 0, 0, 0] },
                ),
            ),
            R::VxlanTruncated,
        ),
        drop_case(
            "inner frame cut short (lengths consistent)",
            UPLINK,
            vxlan_frame_raw(&Vxlan::b_to_a(), &[0u8; 10]),
            R::VxlanTruncated,
        ),
        drop_case("outer UDP length inconsistent", UPLINK, with(vx(&p1_p2), |f| f[39] = 3), R::L4Truncated),
        drop_case(
            "inner frame to another VTEP MAC",
            UPLINK,
            vxlan_frame(&Vxlan { inner_dst_mac: VTEP_C, ..Vxlan::b_to_a() }, &p1_p2),
            R::VxlanInnerDstMac,
        ),
        drop_case(
            "inner ARP",
            UPLINK,
            vxlan_frame_raw(&Vxlan::b_to_a(), &arp_request(VTEP_B, REMOTE_POD_B, POD1_IP)),
            R::VxlanInnerNotIpv4,
        ),
        drop_case(
            "decapsulated packet for another node's pod (no hairpin through the tunnel)",
            UPLINK,
            vx(&udp(REMOTE_POD_B, REMOTE_POD_C, 63, payload)),
            R::VxlanInnerNotLocal,
        ),
        drop_case(
            "decapsulated packet for the outside world",
            UPLINK,
            vx(&udp(REMOTE_POD_B, EXTERNAL, 63, payload)),
            R::VxlanInnerNotLocal,
        ),
        drop_case("ARP on the uplink", UPLINK, arp_request(NODE_B_UPLINK_MAC, NODE_B, NODE_A), R::ArpOnUplink),
        drop_case("uplink frame to another MAC", UPLINK, with(vx(&p1_p2), |f| f[5] ^= 1), R::DstMacNotOurs),
        drop_case(
            "uplink multicast",
            UPLINK,
            with(vx(&p1_p2), |f| f[..6].copy_from_slice(&[1, 0, 0x5e, 0, 0, 1])),
            R::L2Multicast,
        ),
        drop_case(
            "uplink VLAN",
            UPLINK,
            with(vx(&p1_p2), |f| {
                f.splice(12..12, [0x81, 0, 0, 7]);
            }),
            R::VlanTagged,
        ),
        drop_case("uplink IPv6", UPLINK, eth(UPLINK_MAC, NODE_B_UPLINK_MAC, 0x86dd, &[0x60; 60]), R::Ipv6Unsupported),
        drop_case(
            "uplink unknown EtherType",
            UPLINK,
            eth(UPLINK_MAC, NODE_B_UPLINK_MAC, 0x88b5, &[0; 46]),
            R::EthertypeUnsupported,
        ),
        drop_case("uplink truncated IPv4", UPLINK, vx(&p1_p2)[..20].to_vec(), R::Ipv4Truncated),
        drop_case("uplink bad outer IPv4 checksum", UPLINK, with(vx(&p1_p2), |f| f[25] ^= 1), R::Ipv4BadChecksum),
        drop_case("uplink outer IPv4 version 5", UPLINK, with(vx(&p1_p2), |f| f[14] = 0x55), R::Ipv4BadVersion),
        drop_case("uplink outer IHL 3", UPLINK, with(vx(&p1_p2), |f| f[14] = 0x43), R::Ipv4BadLength),
        drop_case("uplink runt", UPLINK, vec![0u8; 10], R::EthTruncated),
        drop_case(
            "uplink three VLAN tags",
            UPLINK,
            with(vx(&p1_p2), |f| {
                f.splice(12..12, [0x81, 0, 0, 1, 0x81, 0, 0, 2, 0x81, 0, 0, 3]);
            }),
            R::EthTooManyTags,
        ),
        // ---- unknown port
        drop_case("frame from a port that is not attached", PortId(9), from_pod1(&p1_p2), R::PortUnknown),
    ];
    // The same frame, decapsulated, with a bad inner IPv4 checksum / bad inner lengths.
    v.push(drop_case("inner IPv4 bad checksum", UPLINK, vx(&with(p1_p2.clone(), |p| p[11] ^= 1)), R::Ipv4BadChecksum));
    v
}

#[test]
fn fixture_table() {
    let tables = tables();
    let mut failures = Vec::new();
    for c in cases() {
        let mut state = WorkerState::new(0);
        let (d, out) = run(&tables, &mut state, 0, c.port, &c.input);
        if d != c.expect {
            failures.push(format!("{}: got {d:?}, expected {:?}", c.name, c.expect));
            continue;
        }
        if let Some(expected) = &c.output {
            if &out != expected {
                failures
                    .push(format!("{}: output differs\n got      {:02x?}\n expected {:02x?}", c.name, out, expected));
            }
        }
        // The drop is counted against the ingress port, exactly once.
        if let Disposition::Drop(r) = d {
            let counted = state.counters.port(c.port).map(|p| p.drop_count(r)).unwrap_or(0);
            if counted != 1 {
                failures.push(format!("{}: drop {r} counted {counted} times", c.name));
            }
        }
    }
    assert!(failures.is_empty(), "{} fixture(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_drop_reason_has_a_fixture() {
    let tables = tables();
    let mut seen: BTreeSet<DropReason> = BTreeSet::new();
    for c in cases() {
        if let Disposition::Drop(r) = c.expect {
            seen.insert(r);
        }
    }
    // Reasons that need other tables or state are covered by dedicated tests below.
    // TxRingFull, TxBacklog and EgressPortDown are counted by the AF_XDP worker (xsk tests).
    let dedicated = [
        DropReason::NoHostPort,
        DropReason::IcmpRateLimited,
        DropReason::NoHeadroom,
        DropReason::TxRingFull,
        DropReason::TxBacklog,
        DropReason::EgressPortDown,
        // Counted by the worker's packet-socket path (xsk's bulk.rs) when the kernel refuses a
        // message; no test provokes the kernel into refusing one.
        DropReason::TxRefused,
        // Service NAT reasons: service_tests.rs.
        DropReason::ServiceNoEndpoint,
        DropReason::SnatPortsExhausted,
        DropReason::ConntrackFull,
        DropReason::ConntrackCollision,
        DropReason::ReusedTupleBadOptions,
        DropReason::ServiceEndpointGone,
        DropReason::LbSourceRange,
        DropReason::ServiceNoLocalEndpoint,
        // Segmentation: tests/tests/gso.rs fills the spill area.
        DropReason::SpillFull,
        // Needs the verify policy: tests/tests/checksum_policy.rs.
        DropReason::L4BadChecksum,
        // Needs segmentation off: tests/tests/gso.rs.
        DropReason::SegmentationDisabled,
    ];
    let _ = &tables;
    let missing: Vec<_> = DropReason::ALL.iter().filter(|r| !seen.contains(r) && !dedicated.contains(r)).collect();
    assert!(missing.is_empty(), "drop reasons without a fixture: {missing:?}");
}

/// Reads the outer UDP source port and IPv4 ident of an encapsulated frame.
fn outer_sport_ident(out: &[u8]) -> (u16, u16) {
    (u16::from_be_bytes([out[34], out[35]]), u16::from_be_bytes([out[18], out[19]]))
}

#[test]
fn encapsulation_matches_flannel_byte_for_byte() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let inner = tcp(POD1_IP, REMOTE_POD_B, 64, b"GET / HTTP/1.1\r\n\r\n");
    let (d, out) = run(&tables, &mut state, 0, POD1, &from_pod1(&inner));
    assert_eq!(d, Disposition::Forward(UPLINK));
    let (sport, ident) = outer_sport_ident(&out);
    assert!((32768..61000).contains(&sport), "source port {sport} outside the ephemeral range");
    let expected_inner = tcp(POD1_IP, REMOTE_POD_B, 63, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(out, vxlan_frame(&Vxlan::a_to_b(ident, sport), &expected_inner));
    let vx = VxlanPacket::new_checked(&out[42..]).expect("vxlan header");
    assert_eq!(vx.vni(), 1);
    assert_eq!(state.counters.port(POD1).map(|p| p.events.encapsulated), Some(1));
}

#[test]
fn outer_source_port_follows_the_inner_flow() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let mut port_of = |sport: u16| {
        let ip = ipv4(POD1_IP, REMOTE_POD_B, &L4::Udp { sport, dport: 53, payload: b"q" });
        outer_sport_ident(&run(&tables, &mut state, 0, POD1, &from_pod1(&ip)).1).0
    };
    let a = port_of(1000);
    assert_eq!(a, port_of(1000), "same flow, same outer port (keeps the flow on one underlay path)");
    let distinct: BTreeSet<u16> = (1000..1064).map(&mut port_of).collect();
    assert!(distinct.len() > 56, "64 flows spread over only {} outer ports", distinct.len());
}

#[test]
fn ttl_expiry_toward_a_remote_pod_answers_time_exceeded_to_the_pod() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let orig = udp(POD1_IP, REMOTE_POD_B, 1, b"traceroute probe");
    let (d, out) = run(&tables, &mut state, 0, POD1, &from_pod1(&orig));
    assert_eq!(d, Disposition::Forward(POD1));
    let mut icmp_body = vec![11, 0, 0, 0, 0, 0, 0, 0];
    icmp_body.extend_from_slice(&orig[..28]);
    let c = crate::wire::checksum::checksum(&icmp_body);
    icmp_body[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = Ip { ttl: 64, ident: 1, dont_frag: false, ..Ip::new(GATEWAY_A, POD1_IP) };
    let expected = eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &ipv4_with(&ip, &L4::Raw { proto: 1, bytes: &icmp_body }));
    assert_eq!(out, expected);
    assert_eq!(state.counters.port(POD1).map(|p| p.events.icmp_time_exceeded_sent), Some(1));
}

#[test]
fn ttl_expiry_after_decap_is_answered_through_the_tunnel() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let orig = tcp(REMOTE_POD_B, POD1_IP, 1, b"x");
    let (d, out) = run(&tables, &mut state, 0, UPLINK, &vxlan_frame(&Vxlan::b_to_a(), &orig));
    assert_eq!(d, Disposition::Forward(UPLINK));
    // Decapsulate what we sent and check it is time exceeded to the remote pod.
    let inner_ip = &out[50 + 14..];
    let ip = crate::wire::Ipv4Packet::new_checked(inner_ip).expect("inner ip");
    assert_eq!((ip.src_addr(), ip.dst_addr()), (GATEWAY_A, REMOTE_POD_B));
    let icmp = crate::wire::IcmpPacket::new_checked(ip.payload()).expect("icmp");
    assert_eq!((icmp.msg_type(), icmp.msg_code()), (11, 0));
    assert!(icmp.verify_checksum());
    assert_eq!(icmp.embedded_ipv4().expect("quote").dst_addr(), POD1_IP);
}

#[test]
fn icmp_errors_are_rate_limited_and_counted() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    state.set_icmp_limit(10, 2);
    let f = from_pod1(&udp(POD1_IP, POD2_IP, 1, b"x"));
    let got: Vec<_> = (0..4).map(|_| run(&tables, &mut state, 0, POD1, &f).0).collect();
    assert_eq!(got[..2], [Disposition::Forward(POD1); 2]);
    assert_eq!(got[2..], [Disposition::Drop(DropReason::IcmpRateLimited); 2]);
    // 100 ms later one more token (10 per second).
    assert_eq!(run(&tables, &mut state, 100_000_000, POD1, &f).0, Disposition::Forward(POD1));
    assert_eq!(state.counters.drop_total(DropReason::IcmpRateLimited), 2);
}

#[test]
fn no_host_port_configured() {
    let t = TablesBuilder::new(node_config())
        .uplink(UPLINK)
        .and_then(|b| b.pod(POD1, POD1_PORT_MAC, POD1_IP, POD1_MAC))
        .and_then(|b| b.build())
        .expect("valid");
    let mut state = WorkerState::new(0);
    let (d, _) = run(&t, &mut state, 0, POD1, &from_pod1(&udp(POD1_IP, NODE_A, 64, b"x")));
    assert_eq!(d, Disposition::Drop(DropReason::NoHostPort));
}

#[test]
fn no_headroom_for_encapsulation() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let frame = from_pod1(&udp(POD1_IP, REMOTE_POD_B, 64, b"x"));
    let mut buf = frame.clone();
    let mut f = FrameBuf::new(&mut buf, 0, frame.len()).expect("fits");
    let d = process_frame(&tables, &mut state, 0, POD1, &mut f);
    assert_eq!(d, Disposition::Drop(DropReason::NoHeadroom));
}

#[test]
fn batch_counts_rx_and_each_drop() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let good = from_pod1(&udp(POD1_IP, POD2_IP, 64, b"x"));
    let bad = from_pod1(&udp(POD2_IP, POD1_IP, 64, b"x"));
    let mut bufs: Vec<Vec<u8>> = [&good, &bad, &good].iter().map(|f| umem(f)).collect();
    let lens = [good.len(), bad.len(), good.len()];
    let mut frames: Vec<FrameBuf<'_>> =
        bufs.iter_mut().zip(lens).map(|(b, l)| FrameBuf::new(b, HEADROOM, l).expect("fits")).collect();
    let mut out = [Disposition::ToHost; 3];
    process_batch(&tables, &mut state, 0, POD1, &mut frames, &mut out);
    assert_eq!(
        out,
        [Disposition::Forward(POD2), Disposition::Drop(DropReason::PodSpoofedIp), Disposition::Forward(POD2)]
    );
    let c = state.counters.port(POD1).expect("counted");
    assert_eq!(c.rx_packets, 3);
    assert_eq!(c.rx_bytes, (2 * good.len() + bad.len()) as u64);
    assert_eq!(c.total_drops(), 1);
    assert_eq!(c.nonzero_drops().collect::<Vec<_>>(), vec![(DropReason::PodSpoofedIp, 1)]);
}

#[test]
fn every_truncation_of_valid_frames_ends_in_a_named_drop() {
    let tables = tables();
    let frames = [
        (POD1, from_pod1(&tcp(POD1_IP, REMOTE_POD_B, 64, b"payload bytes"))),
        (POD1, arp_request(POD1_MAC, POD1_IP, GATEWAY_A)),
        (UPLINK, vxlan_frame(&Vxlan::b_to_a(), &tcp(REMOTE_POD_B, POD1_IP, 64, b"payload"))),
        (HOST, eth(HOST_PORT_MAC, HOST_STACK_MAC, 0x0800, &udp(NODE_A, REMOTE_POD_B, 64, b"p"))),
    ];
    for (port, f) in frames {
        for n in 0..f.len() {
            let mut state = WorkerState::new(0);
            let (d, _) = run(&tables, &mut state, 0, port, &f[..n]);
            assert!(matches!(d, Disposition::Drop(_)), "{port} truncated to {n} bytes: {d:?}");
        }
    }
}

/// What a Linux VXLAN sender over a veth delivers (incident 1's mechanism, benign form): the
/// outer UDP checksum left to an offload. Pseudo-header only, or computed by local checksum
/// offload over an inner checksum that is itself partial. Both are accepted and the inner
/// checksum completed; a corrupt frame in the same shape is still dropped.
#[test]
fn offload_pending_outer_checksums_from_a_linux_sender() {
    let tables = tables();
    let inner = tcp(REMOTE_POD_B, POD1_IP, 63, b"through flannel.1");
    let expected = eth(POD1_MAC, POD1_PORT_MAC, 0x0800, &tcp(REMOTE_POD_B, POD1_IP, 62, b"through flannel.1"));

    // (a) Inner complete, outer holds the pseudo-header sum only.
    let mut a = vxlan_frame(&Vxlan::b_to_a(), &inner);
    let udp_len = (a.len() - 34) as u16;
    let pseudo = crate::wire::checksum::pseudo_header_sum(NODE_B, NODE_A, 17, udp_len);
    a[40..42].copy_from_slice(&pseudo.to_be_bytes());
    let mut state = WorkerState::new(0);
    assert_eq!(run(&tables, &mut state, 0, UPLINK, &a), (Disposition::Forward(POD1), expected.clone()));
    assert_eq!(state.counters.port(UPLINK).map(|c| c.events.outer_partial_checksums), Some(1));

    // (b) LCO: outer valid as if the inner TCP checksum were filled in; inner left partial.
    let mut b = vxlan_frame(&Vxlan { udp_checksum: true, ..Vxlan::b_to_a() }, &inner);
    make_partial(&mut b[50..]);
    let mut state = WorkerState::new(0);
    assert_eq!(run(&tables, &mut state, 0, UPLINK, &b), (Disposition::Forward(POD1), expected));
    let c = state.counters.port(UPLINK).map(|c| c.events.clone()).unwrap_or_default();
    assert_eq!((c.outer_partial_checksums, c.partial_checksums_completed), (1, 1));

    // (c) The same shape corrupted in flight in what the outer checksum covers (the inner
    // Ethernet source): the inner completes, but the outer checksum then disagrees. (Under LCO
    // the outer checksum does not depend on the inner payload, whose checksum the sender never
    // computed: a payload flip there is undetectable by anyone, by construction.)
    let mut bad = b.clone();
    bad[50 + 6] ^= 0x20;
    let mut state = WorkerState::new(0);
    assert_eq!(run(&tables, &mut state, 0, UPLINK, &bad).0, Disposition::Drop(DropReason::VxlanBadOuterChecksum));
}

/// Issue 17: each spoofed inner source is counted once by name against the uplink, is not
/// counted as decapsulated, and a legitimate frame from the same node still is. A pod's UDP
/// to a node's VXLAN port is counted by name against its pod port.
#[test]
fn spoofed_inner_sources_and_vxlan_injection_are_counted_by_name() {
    let tables = tables();
    let mut state = WorkerState::new(0);
    let spoofs = [NO_NODES, Ipv4Addr::new(10, 244, 0, 9), REMOTE_POD_C];
    for src in spoofs {
        let (d, _) = run(&tables, &mut state, 0, UPLINK, &vxlan_frame(&Vxlan::b_to_a(), &udp(src, POD1_IP, 63, b"x")));
        assert_eq!(d, Disposition::Drop(DropReason::TunnelInnerSourceSpoofed), "inner source {src}");
    }
    let uplink = state.counters.port(UPLINK).expect("uplink counted");
    let named: Vec<_> = uplink.nonzero_drops().map(|(r, n)| (r.name(), n)).collect();
    assert_eq!(named, vec![("tunnel_inner_source_spoofed", 3)]);
    assert_eq!(uplink.events.decapsulated, 0, "a spoofed frame is not counted as decapsulated");
    let (d, _) =
        run(&tables, &mut state, 0, UPLINK, &vxlan_frame(&Vxlan::b_to_a(), &udp(REMOTE_POD_B, POD1_IP, 63, b"x")));
    assert_eq!(d, Disposition::Forward(POD1));
    assert_eq!(state.counters.port(UPLINK).map(|p| p.events.decapsulated), Some(1));

    for dst in [NODE_A, NODE_B, NODE_C] {
        let (d, _) = run(&tables, &mut state, 0, POD1, &from_pod1(&udp_to_vxlan_port(POD1_IP, dst)));
        assert_eq!(d, Disposition::Drop(DropReason::PodToVxlanPort), "to {dst}");
    }
    let pod = state.counters.port(POD1).expect("pod port counted");
    let named: Vec<_> = pod.nonzero_drops().map(|(r, n)| (r.name(), n)).collect();
    assert_eq!(named, vec![("pod_to_vxlan_port", 3)]);
    assert!(DropReason::TunnelInnerSourceSpoofed.help().contains("sending node's pod CIDR"));
}

/// Node B's tables: the testkit's node A seen from the other side (pod B on port 2).
fn node_b_tables() -> Tables {
    let node = crate::tables::NodeConfig {
        node_ip: NODE_B,
        uplink_mac: NODE_B_UPLINK_MAC,
        vtep_mac: VTEP_B,
        pod_cidr: "10.244.1.0/24".parse().expect("cidr"),
        ..node_config()
    };
    TablesBuilder::new(node)
        .uplink(PortId(0))
        .and_then(|b| b.host(PortId(1), HOST_PORT_MAC, HOST_STACK_MAC))
        .and_then(|b| b.pod(PortId(2), POD1_PORT_MAC, REMOTE_POD_B, POD1_MAC))
        .and_then(|b| b.remote("node-a", NODE_A, VTEP_A, "10.244.0.0/24".parse().expect("cidr"), UPLINK_MAC))
        .and_then(|b| b.build())
        .expect("node B's tables")
}

/// Every inner source vxnat puts into the tunnel passes the receiving node's source check:
/// its pods', its node stack's (from the gateway: the host port's route says `src`), its
/// ICMP errors' (from the gateway) and its NodePort SNAT (to the gateway). Node A's output is
/// fed, byte for byte, to node B's pipeline.
#[test]
fn what_vxnat_sends_through_the_tunnel_passes_the_peers_source_check() {
    use crate::nat::service::{Endpoint, ServicePort, ServiceTable};
    let mut svc = ServiceTable::default();
    let ep = Endpoint { ip: REMOTE_POD_B, port: 8080, ready: true, serving: true, terminating: false, local: false };
    let np = ServicePort::new("default/np:http".into(), &[ep], false, false, None, 16381).expect("port");
    let i = svc.add_port(np);
    svc.add_node_port(6, 30080, i).expect("node port");
    let a = tables_with_services(svc);
    let b = node_b_tables();
    let client = eth(
        UPLINK_MAC,
        MacAddr([0x02, 0xcc, 0, 0, 0, 7]),
        0x0800,
        &ipv4(EXTERNAL, NODE_A, &L4::Tcp { sport: 50000, dport: 30080, seq: 1, ack: 0, flags: 0x002, payload: b"" }),
    );
    let inputs = [
        ("a pod", POD1, from_pod1(&udp(POD1_IP, REMOTE_POD_B, 64, b"pod"))),
        ("the node stack", HOST, eth(HOST_PORT_MAC, HOST_STACK_MAC, 0x0800, &udp(GATEWAY_A, REMOTE_POD_B, 64, b"n"))),
        ("time exceeded", UPLINK, vxlan_frame(&Vxlan::b_to_a(), &udp(REMOTE_POD_B, POD1_IP, 1, b"traceroute"))),
        ("NodePort SNAT", UPLINK, client),
    ];
    for (what, port, input) in inputs {
        let mut sa = WorkerState::new(0);
        let (d, out) = run(&a, &mut sa, 0, port, &input);
        assert_eq!(d, Disposition::Forward(UPLINK), "{what}: node A encapsulates");
        let mut sb = WorkerState::new(0);
        let (d, _) = run(&b, &mut sb, 0, PortId(0), &out);
        assert_eq!(d, Disposition::Forward(PortId(2)), "{what}: node B delivers to pod B");
    }
}

/// The spoof drop is not a `vxlan_*` reason because the frame was decapsulated: a trace shows
/// the inner packet, with its spoofed source, at the post-decap point.
#[test]
fn a_trace_shows_the_decapsulated_packet_of_a_spoofed_source() {
    use crate::observe::Observe;
    let tables = tables();
    let mut state = WorkerState::new(0);
    state.observe = Some(Box::new(Observe::trace(crate::filter::Filter::default(), 1)));
    let inner = udp(NO_NODES, POD1_IP, 63, b"x");
    let (d, _) = run(&tables, &mut state, 0, UPLINK, &vxlan_frame(&Vxlan::b_to_a(), &inner));
    assert_eq!(d, Disposition::Drop(DropReason::TunnelInnerSourceSpoofed));
    let t = &state.observe.as_ref().expect("observing").traces[0];
    assert_eq!(t.drop_reason(), Some(DropReason::TunnelInnerSourceSpoofed));
    assert_eq!(t.post_decap.as_deref(), Some(&eth(VTEP_A, VTEP_B, 0x0800, &inner)[..]));
}
