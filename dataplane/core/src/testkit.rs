//! A sample node and frame builders, shared by unit tests, the integration tests, the
//! criterion benchmarks and the fuzz target. Not used by the packet path.
//!
//! Topology (node A is "this" node):
//! - underlay 192.168.50.0/24, MTU 1500; node A 192.168.50.1, node B .2, node C .3 (node C's
//!   next hop unresolved);
//! - cluster 10.244.0.0/16; pod CIDRs A 10.244.0.0/24, B 10.244.1.0/24, C 10.244.2.0/24;
//! - ports on A: uplink 0, host 1, pod 10.244.0.2 on 2, pod 10.244.0.3 on 3.

use crate::tables::{NodeConfig, PortId, Tables, TablesBuilder};
use crate::wire::checksum;
use crate::wire::{Ipv4Cidr, MacAddr};
use core::net::Ipv4Addr;

pub const UPLINK: PortId = PortId(0);
pub const HOST: PortId = PortId(1);
pub const POD1: PortId = PortId(2);
pub const POD2: PortId = PortId(3);

pub const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
pub const NODE_C: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
pub const GATEWAY_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const POD2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
pub const REMOTE_POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
pub const REMOTE_POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);

pub const UPLINK_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xa0, 0x01]);
pub const NODE_B_UPLINK_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xb0, 0x01]);
pub const VTEP_A: MacAddr = MacAddr([0x0e, 0xa1, 0, 0, 0, 0x0a]);
pub const VTEP_B: MacAddr = MacAddr([0x0e, 0xa1, 0, 0, 0, 0x0b]);
pub const VTEP_C: MacAddr = MacAddr([0x0e, 0xa1, 0, 0, 0, 0x0c]);
pub const HOST_PORT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x01, 0x01]);
pub const HOST_STACK_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x01, 0x02]);
pub const POD1_PORT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x02, 0x01]);
pub const POD1_MAC: MacAddr = MacAddr([0x0a, 0x58, 10, 244, 0, 2]);
pub const POD2_PORT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x03, 0x01]);
pub const POD2_MAC: MacAddr = MacAddr([0x0a, 0x58, 10, 244, 0, 3]);

/// Headroom in front of each frame, as the AF_XDP UMEM frames will have.
pub const HEADROOM: usize = 256;
/// Size of a frame buffer (a UMEM chunk).
pub const FRAME_SIZE: usize = 4096;

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().unwrap_or_else(|_| unreachable!("testkit CIDR literal"))
}

pub fn node_config() -> NodeConfig {
    NodeConfig {
        node_ip: NODE_A,
        uplink_mac: UPLINK_MAC,
        vtep_mac: VTEP_A,
        pod_cidr: cidr("10.244.0.0/24"),
        cluster_cidr: cidr("10.244.0.0/16"),
        vni: 1,
        vxlan_port: 8472,
        underlay_mtu: 1500,
        outer_udp_checksum: false,
        segmentation: true,
    }
}

/// Node A's tables.
pub fn tables() -> Tables {
    tables_with_services(crate::nat::service::ServiceTable::default())
}

/// Node A's tables with `services`.
pub fn tables_with_services(services: impl Into<std::sync::Arc<crate::nat::service::ServiceTable>>) -> Tables {
    match builder(node_config()).map(|b| b.services(services)).and_then(|b| b.build()) {
        Ok(t) => t,
        Err(e) => unreachable!("testkit tables are valid: {e}"),
    }
}

/// Node A's ports and remotes on `node`, not built yet (tests adjust policies first).
pub fn builder(node: NodeConfig) -> Result<TablesBuilder, crate::tables::TablesError> {
    TablesBuilder::new(node)
        .uplink(UPLINK)
        .and_then(|b| b.host(HOST, HOST_PORT_MAC, HOST_STACK_MAC))
        .and_then(|b| b.pod(POD1, POD1_PORT_MAC, POD1_IP, POD1_MAC))
        .and_then(|b| b.pod(POD2, POD2_PORT_MAC, POD2_IP, POD2_MAC))
        .and_then(|b| b.remote("node-b", NODE_B, VTEP_B, cidr("10.244.1.0/24"), NODE_B_UPLINK_MAC))
        .and_then(|b| b.remote("node-c", NODE_C, VTEP_C, cidr("10.244.2.0/24"), MacAddr::ZERO))
}

/// The ClusterIP used by [`tables_with_service`]: TCP 10.96.0.10:80 -> the pod on node B :8080.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Node A's tables plus one ClusterIP Service whose only endpoint is on node B.
pub fn tables_with_service() -> Tables {
    use crate::nat::service::{Endpoint, Frontend, FrontendKind, ServicePort, ServiceTable};
    let mut svc = ServiceTable::default();
    let ep = Endpoint { ip: REMOTE_POD_B, port: 8080, ready: true, serving: true, terminating: false, local: false };
    let built =
        ServicePort::new("default/web:http".into(), &[ep], false, false, None, crate::nat::maglev::DEFAULT_TABLE_SIZE)
            .map(|p| svc.add_port(p))
            .and_then(|i| {
                svc.add_frontend(Frontend { proto: 6, ip: SERVICE_VIP, port: 80 }, FrontendKind::ClusterIp, i)
            });
    if let Err(e) = built {
        unreachable!("testkit service is valid: {e}");
    }
    tables_with_services(svc)
}

/// A frame buffer holding `frame` after [`HEADROOM`] bytes.
pub fn umem(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; FRAME_SIZE.max(HEADROOM + frame.len())];
    v[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
    v
}

/// Transport payloads for [`ipv4`].
#[derive(Debug, Clone)]
pub enum L4<'a> {
    Udp {
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u16,
        payload: &'a [u8],
    },
    IcmpEcho {
        ident: u16,
        seq: u16,
        payload: &'a [u8],
    },
    /// Any protocol number and bytes, as is.
    Raw {
        proto: u8,
        bytes: &'a [u8],
    },
}

/// Header fields for [`ipv4_with`].
#[derive(Debug, Clone)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub ident: u16,
    pub dont_frag: bool,
    pub more_frags: bool,
    pub frag_offset: u16,
    /// Options, a multiple of 4 bytes.
    pub options: Vec<u8>,
}

impl Ip {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Ip {
        Ip { src, dst, ttl: 64, ident: 0x1234, dont_frag: true, more_frags: false, frag_offset: 0, options: Vec::new() }
    }
}

fn l4_bytes(src: Ipv4Addr, dst: Ipv4Addr, l4: &L4<'_>) -> (u8, Vec<u8>) {
    match *l4 {
        L4::Udp { sport, dport, payload } => {
            let mut b = Vec::with_capacity(8 + payload.len());
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(payload);
            let mut c = checksum::l4_checksum(src, dst, 17, &b);
            if c == 0 {
                c = 0xffff;
            }
            b[6..8].copy_from_slice(&c.to_be_bytes());
            (17, b)
        }
        L4::Tcp { sport, dport, seq, ack, flags, payload } => {
            let mut b = Vec::with_capacity(20 + payload.len());
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(&ack.to_be_bytes());
            b.extend_from_slice(&(0x5000u16 | (flags & 0x1ff)).to_be_bytes());
            b.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
            b.extend_from_slice(payload);
            let c = checksum::l4_checksum(src, dst, 6, &b);
            b[16..18].copy_from_slice(&c.to_be_bytes());
            (6, b)
        }
        L4::IcmpEcho { ident, seq, payload } => {
            let mut b = vec![8, 0, 0, 0];
            b.extend_from_slice(&ident.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(payload);
            let c = checksum::checksum(&b);
            b[2..4].copy_from_slice(&c.to_be_bytes());
            (1, b)
        }
        L4::Raw { proto, bytes } => (proto, bytes.to_vec()),
    }
}

/// An IPv4 packet with valid header and transport checksums.
pub fn ipv4_with(ip: &Ip, l4: &L4<'_>) -> Vec<u8> {
    let (proto, body) = l4_bytes(ip.src, ip.dst, l4);
    let hl = 20 + ip.options.len();
    let mut b = vec![0u8; hl];
    b[0] = 0x40 | (hl / 4) as u8;
    b[2..4].copy_from_slice(&((hl + body.len()) as u16).to_be_bytes());
    b[4..6].copy_from_slice(&ip.ident.to_be_bytes());
    let mut fo = (ip.frag_offset >> 3) & 0x1fff;
    if ip.dont_frag {
        fo |= 0x4000;
    }
    if ip.more_frags {
        fo |= 0x2000;
    }
    b[6..8].copy_from_slice(&fo.to_be_bytes());
    b[8] = ip.ttl;
    b[9] = proto;
    b[12..16].copy_from_slice(&ip.src.octets());
    b[16..20].copy_from_slice(&ip.dst.octets());
    b[20..hl].copy_from_slice(&ip.options);
    let c = checksum::checksum(&b);
    b[10..12].copy_from_slice(&c.to_be_bytes());
    b.extend_from_slice(&body);
    b
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: &L4<'_>) -> Vec<u8> {
    ipv4_with(&Ip::new(src, dst), l4)
}

/// An untagged Ethernet frame.
pub fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(14 + payload.len());
    b.extend_from_slice(&dst.0);
    b.extend_from_slice(&src.0);
    b.extend_from_slice(&ethertype.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// An ARP request frame (broadcast) from `sha`/`spa` for `tpa`.
pub fn arp_request(sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sha.0);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    eth(MacAddr::BROADCAST, sha, 0x0806, &a)
}

/// A frame from pod 1 (to its gateway MAC) carrying `packet`.
pub fn from_pod1(packet: &[u8]) -> Vec<u8> {
    eth(POD1_PORT_MAC, POD1_MAC, 0x0800, packet)
}

/// Outer header fields of a VXLAN frame for [`vxlan_frame`].
#[derive(Debug, Clone)]
pub struct Vxlan {
    pub outer_src_mac: MacAddr,
    pub outer_dst_mac: MacAddr,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub ident: u16,
    pub sport: u16,
    pub dport: u16,
    pub vni: u32,
    pub flags: u8,
    pub inner_src_mac: MacAddr,
    pub inner_dst_mac: MacAddr,
    /// Compute the outer UDP checksum instead of leaving it zero.
    pub udp_checksum: bool,
}

impl Vxlan {
    /// What flannel on node B sends to node A.
    pub fn b_to_a() -> Vxlan {
        Vxlan {
            outer_src_mac: NODE_B_UPLINK_MAC,
            outer_dst_mac: UPLINK_MAC,
            src_ip: NODE_B,
            dst_ip: NODE_A,
            ident: 0x0101,
            sport: 40000,
            dport: 8472,
            vni: 1,
            flags: 0x08,
            inner_src_mac: VTEP_B,
            inner_dst_mac: VTEP_A,
            udp_checksum: false,
        }
    }
    /// What node A should send to node B (the `ident` and `sport` depend on state and flow).
    pub fn a_to_b(ident: u16, sport: u16) -> Vxlan {
        Vxlan {
            outer_src_mac: UPLINK_MAC,
            outer_dst_mac: NODE_B_UPLINK_MAC,
            src_ip: NODE_A,
            dst_ip: NODE_B,
            ident,
            sport,
            dport: 8472,
            vni: 1,
            flags: 0x08,
            inner_src_mac: VTEP_A,
            inner_dst_mac: VTEP_B,
            udp_checksum: false,
        }
    }
}

/// A complete VXLAN frame carrying `inner_ip` (an IPv4 packet) in an inner Ethernet frame.
pub fn vxlan_frame(v: &Vxlan, inner_ip: &[u8]) -> Vec<u8> {
    vxlan_frame_raw(v, &eth(v.inner_dst_mac, v.inner_src_mac, 0x0800, inner_ip))
}

/// A complete VXLAN frame carrying any inner Ethernet frame.
pub fn vxlan_frame_raw(v: &Vxlan, inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![v.flags, 0, 0, 0];
    vx.extend_from_slice(&v.vni.to_be_bytes()[1..]);
    vx.push(0);
    vx.extend_from_slice(inner);
    let mut udp = Vec::new();
    udp.extend_from_slice(&v.sport.to_be_bytes());
    udp.extend_from_slice(&v.dport.to_be_bytes());
    udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&vx);
    if v.udp_checksum {
        let mut c = checksum::l4_checksum(v.src_ip, v.dst_ip, 17, &udp);
        if c == 0 {
            c = 0xffff;
        }
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = Ip::new(v.src_ip, v.dst_ip);
    ip.dont_frag = false;
    ip.ident = v.ident;
    let outer = ipv4_with(&ip, &L4::Raw { proto: 17, bytes: &udp });
    eth(v.outer_dst_mac, v.outer_src_mac, 0x0800, &outer)
}

/// Rewrites the TCP/UDP checksum of the IPv4 packet at offset 14 of `frame` into the
/// CHECKSUM_PARTIAL form a veth delivers over AF_XDP: the pseudo-header sum only.
pub fn make_partial(frame: &mut [u8]) {
    let ip = &frame[14..];
    let hl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let field = match proto {
        6 => 16,
        17 => 6,
        _ => return,
    };
    let pseudo = checksum::pseudo_header_sum(src, dst, proto, (total - hl) as u16);
    let at = 14 + hl + field;
    frame[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
}
