//! Two pods on one node, for tests that drive an AF_XDP worker directly (no `vxnat run`):
//! a node namespace and two pod namespaces, each pod a routed /32 endpoint behind a veth
//! (`vxp1`, `vxp2` on the node), and the tables that route between them.

use crate::netns::Netns;
use dataplane::tables::{NodeConfig, PortId, Tables, TablesBuilder};
use dataplane::wire::MacAddr;
use std::net::Ipv4Addr;

pub const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
/// The pods' port numbers (after the uplink's 0 and the host port's 1).
pub const P1: PortId = PortId(2);
pub const P2: PortId = PortId(3);

#[derive(Debug)]
pub struct TwoPods {
    pub node: Netns,
    pub pod1: Netns,
    pub pod2: Netns,
}

impl TwoPods {
    /// The namespaces (names start with `tag`) and the pods' veths. Pods are routed /32
    /// endpoints: every destination, same node or not, goes to the gateway, the only address
    /// vxnat answers ARP for on a pod port.
    pub fn new(tag: &str) -> TwoPods {
        let node = Netns::new(&format!("{tag}node"));
        let pod1 = Netns::new(&format!("{tag}pod1"));
        let pod2 = Netns::new(&format!("{tag}pod2"));
        for (pod, host_if, ip) in [(&pod1, "vxp1", "10.244.0.2/32"), (&pod2, "vxp2", "10.244.0.3/32")] {
            node.ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name]);
            node.ip(&["link", "set", host_if, "up"]);
            pod.ip(&["addr", "add", ip, "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "10.244.0.1", "dev", "eth0", "scope", "link"]);
            pod.ip(&["route", "add", "default", "via", "10.244.0.1", "dev", "eth0"]);
        }
        TwoPods { node, pod1, pod2 }
    }

    /// Tables for node 192.168.99.1 (10.244.0.0/24) with the uplink as port 0 (`uplink_mac`)
    /// and the two pods as `P1`, `P2`.
    pub fn tables(&self, uplink_mac: MacAddr) -> Tables {
        let node = NodeConfig {
            node_ip: Ipv4Addr::new(192, 168, 99, 1),
            uplink_mac,
            vtep_mac: MacAddr([0x0e, 0, 0, 0, 0x99, 1]),
            pod_cidr: "10.244.0.0/24".parse().expect("cidr"),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            vni: 1,
            vxlan_port: 8472,
            underlay_mtu: 1500,
            outer_udp_checksum: false,
            segmentation: true,
        };
        TablesBuilder::new(node)
            .uplink(PortId(0))
            .and_then(|b| b.pod(P1, self.node.mac("vxp1"), POD1, self.pod1.mac("eth0")))
            .and_then(|b| b.pod(P2, self.node.mac("vxp2"), POD2, self.pod2.mac("eth0")))
            .and_then(|b| b.build())
            .expect("valid tables")
    }
}
