//! Compile: a pure function from the node's configuration, the facts captured about it (its
//! Node, the uplink, the host port, the other nodes and their next hops, each pod's port MAC
//! recorded at attach) and the compiled Service table to the immutable `Tables` snapshot the
//! workers read. It reads nothing from the system, so a vanished interface can never make it
//! fail, and it is tested without a network. The remotes it is given are chosen by
//! `crate::remotes::select`, which leaves out (naming it) any Node the tables builder would
//! refuse, so one bad Node cannot make it fail either.

use crate::config::NodeFile;
use crate::pods::Pod;
use crate::state::{derived_vtep_mac, NodeView};
use core::net::Ipv4Addr;
use dataplane::nat::service::ServiceTable;
use dataplane::tables::{NodeConfig, PortId, Tables, TablesBuilder, TablesError};
use dataplane::wire::{Ipv4Cidr, MacAddr};
use std::sync::Arc;
use xsk::host::{HOST, UPLINK};

/// Why the tables could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checksum setting of the configuration is invalid (the message names its key).
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The tables builder refused a port, a remote node or the Services (it names the field).
    #[error(transparent)]
    Tables(#[from] TablesError),
    /// The port MAC recorded for a pod at attach does not parse.
    #[error("pod {ip} on {ifname}: port MAC {value:?}")]
    PortMac { ip: Ipv4Addr, ifname: String, value: String },
    /// The pod MAC recorded at attach does not parse.
    #[error("pod {ip} on {ifname}: MAC {value:?}")]
    PodMac { ip: Ipv4Addr, ifname: String, value: String },
}

/// The host port: vxnat's end and the node stack's end, with their MACs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub ifname: String,
    pub mac: MacAddr,
    pub stack_ifname: String,
    pub stack_mac: MacAddr,
}

/// What the tables are compiled from besides the Services and the pods: the configuration and
/// what was observed about this node and the others.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub file: NodeFile,
    /// Where NodePorts answer (`nodeport_addresses`, resolved against the node's addresses
    /// at start).
    pub nodeport_ips: Vec<core::net::Ipv4Addr>,
    /// This node's Node object.
    pub me: NodeView,
    pub vtep_mac: MacAddr,
    pub uplink_mac: MacAddr,
    pub uplink_mtu: u16,
    pub cluster: Ipv4Cidr,
    pub host: Option<HostPort>,
    /// Other nodes and the resolved MAC of the underlay next hop toward each.
    pub remotes: Vec<(NodeView, MacAddr)>,
}

/// Compiles the tables for this node with `pods` attached.
pub fn compile(facts: &NodeFacts, services: Arc<ServiceTable>, pods: &[Pod], generation: u64) -> Result<Tables, Error> {
    let file = &facts.file;
    let node = NodeConfig {
        node_ip: facts.me.node_ip,
        uplink_mac: facts.uplink_mac,
        vtep_mac: facts.vtep_mac,
        pod_cidr: facts.me.pod_cidr,
        cluster_cidr: facts.cluster,
        vni: file.vxlan.vni,
        vxlan_port: file.vxlan.port,
        underlay_mtu: facts.uplink_mtu,
        outer_udp_checksum: file.checksum.outer_compute()?,
        segmentation: file.segmentation,
    };
    let (pods_policy, host_policy, uplink_policy) = file.checksum.policies()?;
    let mut b = TablesBuilder::new(node)
        .uplink(UPLINK)
        .and_then(|b| b.checksum_policy(UPLINK, uplink_policy))?
        .generation(generation)
        .node_port_addrs(facts.nodeport_ips.clone());
    if let Some(h) = &facts.host {
        b = b.host(HOST, h.mac, h.stack_mac).and_then(|b| b.checksum_policy(HOST, host_policy))?;
    }
    for p in pods {
        let port_mac: MacAddr = p.port_mac.parse().map_err(|_| Error::PortMac {
            ip: p.ip,
            ifname: p.ifname.clone(),
            value: p.port_mac.clone(),
        })?;
        let mac: MacAddr =
            p.mac.parse().map_err(|_| Error::PodMac { ip: p.ip, ifname: p.ifname.clone(), value: p.mac.clone() })?;
        b = b.pod(PortId(p.port), port_mac, p.ip, mac).and_then(|b| b.checksum_policy(PortId(p.port), pods_policy))?;
    }
    for (r, next_hop) in &facts.remotes {
        let vtep = r.vtep_mac.unwrap_or_else(|| derived_vtep_mac(&r.name));
        b = b.remote(&r.name, r.node_ip, vtep, r.pod_cidr, *next_hop)?;
    }
    Ok(b.services(services).build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::tables::Route;

    fn view(name: &str, ip: [u8; 4], cidr: &str) -> NodeView {
        NodeView {
            name: name.into(),
            node_ip: Ipv4Addr::from(ip),
            pod_cidr: cidr.parse().expect("cidr"),
            vtep_mac: None,
            vni: None,
        }
    }

    #[test]
    fn tables_compile_from_captured_facts_alone() {
        let file = NodeFile::parse("node = \"a\"\nuplink = \"no-such-interface\"\n", std::path::Path::new("n.toml"))
            .expect("config");
        let facts = NodeFacts {
            file,
            nodeport_ips: vec![core::net::Ipv4Addr::new(192, 168, 1, 1)],
            me: view("a", [192, 168, 1, 1], "10.244.0.0/24"),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplink_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            uplink_mtu: 1500,
            cluster: "10.244.0.0/16".parse().expect("cidr"),
            host: None,
            remotes: vec![(view("b", [192, 168, 1, 2], "10.244.1.0/24"), MacAddr([2, 0, 0, 0, 0, 3]))],
        };
        // The pod's interface does not exist on this machine: compile never looks.
        let pod = Pod {
            ifname: "vanished0".into(),
            ip: Ipv4Addr::new(10, 244, 0, 5),
            mac: "02:00:00:00:00:05".into(),
            port: 2,
            port_mac: "02:00:00:00:00:04".into(),
            ifindex: 0,
        };
        let t = compile(&facts, Arc::default(), std::slice::from_ref(&pod), 7).expect("tables");
        assert_eq!(t.generation, 7);
        assert!(matches!(t.route(Ipv4Addr::new(10, 244, 0, 5)), Route::LocalPod(p) if p.port == PortId(2)));
        let bad = Pod { port_mac: String::new(), ..pod };
        let e = compile(&facts, Arc::default(), &[bad], 8).expect_err("no port MAC").to_string();
        assert!(e.contains("vanished0") && e.contains("port MAC"), "{e}");
    }
}
