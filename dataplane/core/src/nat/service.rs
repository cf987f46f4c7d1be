//! The Service table the NAT stage reads: frontends (ClusterIP, NodePort, external IP, load
//! balancer IP, each with protocol and port) to Services, and per Service port its endpoints
//! with kube-proxy's rules for choosing among them.
//!
//! Choosing an endpoint for a new flow (kube-proxy's semantics):
//! - among ready endpoints; if none is ready, among serving-but-terminating ones; if none of
//!   those either, the connection is refused (ICMP port unreachable, counted), or, under a
//!   Local policy when other nodes have endpoints, dropped (counted);
//! - with externalTrafficPolicy Local (traffic from outside to a NodePort, external or load
//!   balancer IP) or internalTrafficPolicy Local (traffic from inside to the ClusterIP), only
//!   endpoints on this node, and the client address is kept (no SNAT);
//! - by Maglev over the candidate set, so every node picks the same endpoint for a flow.
//!
//! Existing flows keep their endpoint through conntrack, even once it is terminating, except
//! UDP ones whose endpoint left or stopped serving: those move on their next packet, as
//! kube-proxy's conntrack cleanup moves them ([`ServicePort::is_serving`]).

use super::maglev::Maglev;
use ahash::AHashMap;
use core::net::Ipv4Addr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub proto: u8,
    pub ip: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (eligible under a Local traffic policy).
    pub local: bool,
}

/// The candidate sets of one Service port, each with its Maglev table.
#[derive(Debug, Clone)]
struct Candidates {
    endpoints: Vec<Endpoint>,
    table: Maglev,
}

impl Candidates {
    fn build(eps: Vec<Endpoint>, size: usize) -> Result<Candidates, String> {
        let keys: Vec<[u8; 6]> = eps
            .iter()
            .map(|e| {
                let o = e.ip.octets();
                let p = e.port.to_be_bytes();
                [o[0], o[1], o[2], o[3], p[0], p[1]]
            })
            .collect();
        // M from the endpoint count on a ladder of primes (see `maglev::size_for`), capped at
        // the configured size: M changes only when the count crosses a rung.
        let m = super::maglev::size_for(eps.len(), size);
        Ok(Candidates { table: Maglev::build(&keys, m)?, endpoints: eps })
    }
    fn pick(&self, hash: u64) -> Option<Endpoint> {
        self.table.lookup(hash).and_then(|i| self.endpoints.get(i as usize).copied())
    }
}

/// One Service port.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// `namespace/name:port-name` for reports.
    pub name: String,
    pub external_local: bool,
    pub internal_local: bool,
    /// ClientIP session affinity timeout, if enabled.
    pub affinity_ns: Option<u64>,
    ready: Option<Candidates>,
    terminating: Option<Candidates>,
    local_ready: Option<Candidates>,
    local_terminating: Option<Candidates>,
    /// Every endpoint given, ready or not, sorted: which endpoints this port still has (for
    /// keeping per-endpoint counters only while the endpoint exists).
    all: Vec<(Ipv4Addr, u16)>,
    /// The serving ones (ready, or terminating but still serving), sorted: a UDP flow stays on
    /// its endpoint only while it is here (kube-proxy clears the conntrack entries of a UDP
    /// endpoint that left or stopped serving).
    serving: Vec<(Ipv4Addr, u16)>,
    /// `spec.loadBalancerSourceRanges`: the clients a new connection through a load balancer
    /// IP may come from. `None`: any (the field was empty); `Some` of an empty list: none (the
    /// Service named ranges, none of them IPv4).
    source_ranges: Option<Vec<crate::wire::Ipv4Cidr>>,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// No ready or serving endpoint anywhere: kube-proxy rejects (ICMP port unreachable).
    None,
    /// Under a Local traffic policy, none on this node though others have some: kube-proxy
    /// drops (a load balancer's health check sends the traffic to nodes that have one).
    NoLocal,
}

/// The choice for a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub endpoint: Endpoint,
    /// Keep the client's address (Local policy) instead of SNAT to the node.
    pub preserve_client: bool,
}

impl ServicePort {
    pub fn new(
        name: String,
        endpoints: &[Endpoint],
        external_local: bool,
        internal_local: bool,
        affinity_ns: Option<u64>,
        table_size: usize,
    ) -> Result<ServicePort, String> {
        let set = |f: &dyn Fn(&Endpoint) -> bool| -> Result<Option<Candidates>, String> {
            let v: Vec<Endpoint> = endpoints.iter().filter(|e| f(e)).copied().collect();
            if v.is_empty() {
                Ok(None)
            } else {
                Candidates::build(v, table_size).map(Some)
            }
        };
        let mut all: Vec<(Ipv4Addr, u16)> = endpoints.iter().map(|e| (e.ip, e.port)).collect();
        all.sort_unstable();
        all.dedup();
        let mut serving: Vec<(Ipv4Addr, u16)> =
            endpoints.iter().filter(|e| e.ready || e.serving).map(|e| (e.ip, e.port)).collect();
        serving.sort_unstable();
        serving.dedup();
        Ok(ServicePort {
            all,
            serving,
            source_ranges: None,
            ready: set(&|e| e.ready)?,
            terminating: set(&|e| !e.ready && e.serving && e.terminating)?,
            local_ready: set(&|e| e.local && e.ready)?,
            local_terminating: set(&|e| e.local && !e.ready && e.serving && e.terminating)?,
            name,
            external_local,
            internal_local,
            affinity_ns,
        })
    }

    /// Bytes of this port's Maglev tables and endpoint lists.
    pub fn table_bytes(&self) -> usize {
        [&self.ready, &self.terminating, &self.local_ready, &self.local_terminating]
            .into_iter()
            .flatten()
            .map(|c| c.table.size() * 4 + c.endpoints.len() * core::mem::size_of::<Endpoint>())
            .sum::<usize>()
            + (self.all.len() + self.serving.len()) * core::mem::size_of::<(Ipv4Addr, u16)>()
    }

    /// With `spec.loadBalancerSourceRanges` (see the field): `None` lets any client in.
    pub fn with_source_ranges(mut self, ranges: Option<Vec<crate::wire::Ipv4Cidr>>) -> ServicePort {
        self.source_ranges = ranges;
        self
    }

    /// New flows under the cluster-wide policy choose among the ready endpoints `preferred`
    /// keeps, when it keeps any, instead of among every ready one: EndpointSlice topology
    /// hints, chosen by the control plane as kube-proxy's `CategorizeEndpoints` chooses them.
    /// The Local sets, the serving-but-terminating fallback and which endpoints count as
    /// serving (UDP flows to the others stay) are left as they are, as kube-proxy restricts its
    /// cluster endpoints only. `table_size` as for [`ServicePort::new`].
    pub fn preferring(
        mut self,
        preferred: impl Fn(&Endpoint) -> bool,
        table_size: usize,
    ) -> Result<ServicePort, String> {
        if let Some(c) = &self.ready {
            let v: Vec<Endpoint> = c.endpoints.iter().filter(|e| preferred(e)).copied().collect();
            if !v.is_empty() && v.len() < c.endpoints.len() {
                self.ready = Some(Candidates::build(v, table_size)?);
            }
        }
        Ok(self)
    }

    /// Whether a client at `src` may open a connection through a load balancer IP (kube-proxy
    /// applies the ranges there only: NodePorts, external IPs and the ClusterIP stay open).
    #[inline]
    pub fn admits(&self, src: Ipv4Addr) -> bool {
        self.source_ranges.as_ref().is_none_or(|r| r.iter().any(|c| c.contains(src)))
    }

    /// Whether `ip:port` is one of this port's serving endpoints (ready, or terminating and
    /// still serving).
    pub fn is_serving(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.serving.binary_search(&(ip, port)).is_ok()
    }

    /// Whether `ip:port` is one of this port's endpoints (ready, terminating or neither).
    pub fn has_endpoint(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.all.binary_search(&(ip, port)).is_ok()
    }

    /// `e` if it is still a candidate for a new flow of this kind (ClientIP affinity keeps a
    /// client on its endpoint only while that endpoint would still be chosen from).
    pub fn still_usable(&self, kind: FrontendKind, from_outside: bool, e: (Ipv4Addr, u16)) -> Option<Choice> {
        let local = match kind {
            FrontendKind::ClusterIp => self.internal_local,
            _ => self.external_local && from_outside,
        };
        let (ready, terminating) =
            if local { (&self.local_ready, &self.local_terminating) } else { (&self.ready, &self.terminating) };
        let c = ready.as_ref().or(terminating.as_ref())?;
        let endpoint = *c.endpoints.iter().find(|x| (x.ip, x.port) == e)?;
        Some(Choice { endpoint, preserve_client: local && kind != FrontendKind::ClusterIp })
    }

    /// The endpoint for a new flow arriving on a frontend of `kind` (`from_outside`: the client
    /// is outside the cluster network), by `hash` (of the flow, or of the client address
    /// under session affinity).
    pub fn choose(&self, kind: FrontendKind, from_outside: bool, hash: u64) -> Result<Choice, NoEndpoint> {
        let local = match kind {
            FrontendKind::ClusterIp => self.internal_local,
            _ => self.external_local && from_outside,
        };
        let (ready, terminating) =
            if local { (&self.local_ready, &self.local_terminating) } else { (&self.ready, &self.terminating) };
        let none = || {
            let anywhere = self.ready.is_some() || self.terminating.is_some();
            if local && anywhere {
                NoEndpoint::NoLocal
            } else {
                NoEndpoint::None
            }
        };
        let c = ready.as_ref().or(terminating.as_ref()).ok_or_else(none)?;
        let endpoint = c.pick(hash).ok_or_else(none)?;
        Ok(Choice { endpoint, preserve_client: local && kind != FrontendKind::ClusterIp })
    }
}

/// Every Service frontend of the cluster, as seen from this node.
#[derive(Debug, Clone)]
pub struct ServiceTable {
    /// Which content this is: a new value, process-wide, whenever a table is made or changed
    /// (never `u32::MAX`); a clone keeps it with the content. Flows record the epoch their
    /// endpoint was confirmed in, and check it again under another (`service_nat::recheck`).
    epoch: u32,
    frontends: AHashMap<Frontend, (u32, FrontendKind)>,
    /// NodePorts answer on every node address: (proto, port) -> port index.
    node_ports: AHashMap<(u8, u16), u32>,
    /// Shared with the control plane's per-Service cache: assembling a table after one
    /// Service changed clones pointers, not Maglev tables.
    ports: Vec<Arc<ServicePort>>,
}

/// The next table epoch (control plane only: an atomic per table built or changed).
fn next_epoch() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static EPOCH: AtomicU32 = AtomicU32::new(0);
    loop {
        let e = EPOCH.fetch_add(1, Ordering::Relaxed);
        if e != u32::MAX {
            return e;
        }
    }
}

impl Default for ServiceTable {
    fn default() -> ServiceTable {
        ServiceTable { epoch: next_epoch(), frontends: AHashMap::new(), node_ports: AHashMap::new(), ports: Vec::new() }
    }
}

impl ServiceTable {
    /// This content's epoch (see the field).
    #[inline]
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn add_port(&mut self, port: ServicePort) -> u32 {
        self.add_shared_port(Arc::new(port))
    }

    pub fn add_shared_port(&mut self, port: Arc<ServicePort>) -> u32 {
        self.epoch = next_epoch();
        self.ports.push(port);
        (self.ports.len() - 1) as u32
    }

    /// Bytes of Maglev tables and endpoint lists (for memory reports).
    pub fn table_bytes(&self) -> usize {
        self.ports.iter().map(|p| p.table_bytes()).sum()
    }

    /// Registers a frontend; an address/port claimed twice keeps the first claim and reports the
    /// conflict.
    pub fn add_frontend(&mut self, f: Frontend, kind: FrontendKind, port: u32) -> Result<(), String> {
        if let Some((other, _)) = self.frontends.get(&f) {
            return Err(format!("{}:{} ({}) is also {}", f.ip, f.port, f.proto, self.ports[*other as usize].name));
        }
        self.epoch = next_epoch();
        self.frontends.insert(f, (port, kind));
        Ok(())
    }

    pub fn add_node_port(&mut self, proto: u8, node_port: u16, port: u32) -> Result<(), String> {
        if let Some(other) = self.node_ports.get(&(proto, node_port)) {
            return Err(format!("nodePort {node_port} is also {}", self.ports[*other as usize].name));
        }
        self.epoch = next_epoch();
        self.node_ports.insert((proto, node_port), port);
        Ok(())
    }

    /// The Service port behind a destination, if any: `node_addr` says whether `ip` is one of
    /// this node's addresses (where NodePorts answer).
    #[inline]
    pub fn lookup(&self, proto: u8, ip: Ipv4Addr, port: u16, node_addr: bool) -> Option<(&ServicePort, FrontendKind)> {
        if let Some(&(i, kind)) = self.frontends.get(&Frontend { proto, ip, port }) {
            return self.ports.get(i as usize).map(|p| (&**p, kind));
        }
        if node_addr {
            if let Some(&i) = self.node_ports.get(&(proto, port)) {
                return self.ports.get(i as usize).map(|p| (&**p, FrontendKind::NodePort));
            }
        }
        None
    }

    /// The frontends clients outside the cluster reach through the uplink: external and load
    /// balancer IPs, and NodePorts on each of `node_port_addrs`. (address, port, protocol)
    pub fn uplink_frontends(&self, node_port_addrs: &[Ipv4Addr]) -> Vec<(Ipv4Addr, u16, u8)> {
        let mut v: Vec<(Ipv4Addr, u16, u8)> = self
            .frontends
            .iter()
            .filter(|(_, (_, k))| matches!(k, FrontendKind::ExternalIp | FrontendKind::LoadBalancer))
            .map(|(f, _)| (f.ip, f.port, f.proto))
            .collect();
        for &addr in node_port_addrs {
            v.extend(self.node_ports.keys().map(|&(proto, port)| (addr, port, proto)));
        }
        v.sort_unstable();
        v
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len() + self.node_ports.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 244, if local { 0 } else { 1 }, last),
            port: 8080,
            ready,
            serving,
            terminating,
            local,
        }
    }

    fn port(eps: &[Endpoint], ext_local: bool, int_local: bool) -> ServicePort {
        ServicePort::new("default/web:http".into(), eps, ext_local, int_local, None, 16381).unwrap()
    }

    #[test]
    fn ready_endpoints_share_new_flows() {
        let p = port(
            &[ep(2, true, true, false, true), ep(3, true, true, false, false), ep(4, false, false, false, false)],
            false,
            false,
        );
        let mut seen = std::collections::BTreeSet::new();
        for h in 0..1000u64 {
            let c = p.choose(FrontendKind::ClusterIp, false, h.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap();
            assert!(c.endpoint.ready);
            assert!(!c.preserve_client);
            seen.insert(c.endpoint.ip);
        }
        assert_eq!(seen.len(), 2, "both ready endpoints used, the unready one never");
    }

    #[test]
    fn terminating_endpoints_only_when_none_is_ready() {
        let p = port(&[ep(2, false, true, true, false), ep(3, false, false, true, false)], false, false);
        let c = p.choose(FrontendKind::ClusterIp, false, 1).unwrap();
        assert_eq!(c.endpoint.ip, Ipv4Addr::new(10, 244, 1, 2), "serving+terminating is used, non-serving is not");
        let p = port(&[ep(2, false, true, true, false), ep(5, true, true, false, false)], false, false);
        for h in 0..100 {
            assert!(p.choose(FrontendKind::ClusterIp, false, h).unwrap().endpoint.ready);
        }
        assert_eq!(
            port(&[ep(3, false, false, true, false)], false, false).choose(FrontendKind::ClusterIp, false, 1),
            Err(NoEndpoint::None)
        );
        assert_eq!(port(&[], false, false).choose(FrontendKind::NodePort, true, 1), Err(NoEndpoint::None));
    }

    #[test]
    fn external_traffic_policy_local_keeps_the_client_and_uses_local_endpoints() {
        let p = port(&[ep(2, true, true, false, true), ep(3, true, true, false, false)], true, false);
        for h in 0..200 {
            let c = p.choose(FrontendKind::NodePort, true, h).unwrap();
            assert!(c.endpoint.local && c.preserve_client);
            // From inside the cluster the policy does not apply.
            assert!(!p.choose(FrontendKind::ClusterIp, false, h).unwrap().preserve_client);
        }
        let remote_only = port(&[ep(3, true, true, false, false)], true, false);
        assert_eq!(remote_only.choose(FrontendKind::LoadBalancer, true, 1), Err(NoEndpoint::NoLocal));
    }

    #[test]
    fn internal_traffic_policy_local_restricts_cluster_ip() {
        let p = port(&[ep(2, true, true, false, true), ep(3, true, true, false, false)], false, true);
        for h in 0..200 {
            let c = p.choose(FrontendKind::ClusterIp, false, h).unwrap();
            assert!(c.endpoint.local && !c.preserve_client);
        }
    }

    #[test]
    fn frontends_and_node_ports_resolve() {
        let mut t = ServiceTable::default();
        let i = t.add_port(port(&[ep(2, true, true, false, true)], false, false));
        t.add_frontend(Frontend { proto: 6, ip: Ipv4Addr::new(10, 96, 0, 10), port: 80 }, FrontendKind::ClusterIp, i)
            .unwrap();
        t.add_node_port(6, 30080, i).unwrap();
        assert!(t.lookup(6, Ipv4Addr::new(10, 96, 0, 10), 80, false).is_some());
        assert!(t.lookup(17, Ipv4Addr::new(10, 96, 0, 10), 80, false).is_none());
        assert_eq!(t.lookup(6, Ipv4Addr::new(192, 168, 77, 1), 30080, true).map(|x| x.1), Some(FrontendKind::NodePort));
        assert!(
            t.lookup(6, Ipv4Addr::new(192, 168, 77, 9), 30080, false).is_none(),
            "NodePorts only on node addresses"
        );
        assert!(t.add_node_port(6, 30080, i).is_err());
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_flows_and_a_few_others() {
        let all: Vec<Endpoint> = (2..12).map(|i| ep(i, true, true, false, false)).collect();
        let before = port(&all, false, false);
        let after = port(&all[1..], false, false);
        let (mut moved, mut others) = (0, 0);
        for h in 0..20_000u64 {
            let h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let a = before.choose(FrontendKind::ClusterIp, false, h).unwrap().endpoint;
            let b = after.choose(FrontendKind::ClusterIp, false, h).unwrap().endpoint;
            if a != all[0] {
                others += 1;
                moved += usize::from(a != b);
            }
        }
        assert!((moved as f64) / (others as f64) < 0.05, "{moved}/{others} unaffected flows moved");
    }
}
