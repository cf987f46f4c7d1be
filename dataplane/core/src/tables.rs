//! The node's forwarding tables: one immutable snapshot that workers read and the control
//! plane replaces wholesale (a new `Arc<Tables>` swapped in between two batches). This is the only definition of what the
//! packet path knows about the world.
//!
//! Built through [`TablesBuilder`], which validates everything once so the packet path can
//! trust the snapshot; errors name the offending field.

use crate::vxlan::encap::OuterTemplate;
use crate::wire::{Ipv4Cidr, MacAddr};
use ahash::AHashMap;
use core::fmt;
use core::net::Ipv4Addr;

/// Index of a port (an AF_XDP socket) within a worker: the uplink, the host port, a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port{}", self.0)
    }
}

/// This node's identity and overlay parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's underlay address (its InternalIP or flannel public-ip).
    pub node_ip: Ipv4Addr,
    /// MAC of the uplink interface: outer source MAC.
    pub uplink_mac: MacAddr,
    /// This node's VTEP MAC (flannel's `VtepMAC`): inner destination for traffic to us,
    /// inner source for traffic we encapsulate.
    pub vtep_mac: MacAddr,
    /// This node's `spec.podCIDR`.
    pub pod_cidr: Ipv4Cidr,
    /// The whole cluster's pod network (flannel's `Network`).
    pub cluster_cidr: Ipv4Cidr,
    /// VXLAN network identifier (flannel default 1).
    pub vni: u32,
    /// VXLAN UDP destination port (flannel default 8472).
    pub vxlan_port: u16,
    /// Underlay MTU; inner packets may use `underlay_mtu - 50`.
    pub underlay_mtu: u16,
    /// Compute the outer VXLAN UDP checksum on transmit (otherwise zero, RFC 7348's default
    /// and flannel's).
    pub outer_udp_checksum: bool,
    /// Segment and fragment frames larger than their egress (off: they are dropped as
    /// `segmentation_disabled`, which is what incident 5 looked like).
    pub segmentation: bool,
}

impl NodeConfig {
    /// The pod gateway: the first address of the pod CIDR.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.pod_cidr.first_host()
    }
    /// The largest inner IPv4 packet that fits the underlay after encapsulation.
    pub fn max_inner_ip_len(&self) -> usize {
        usize::from(self.underlay_mtu).saturating_sub(crate::wire::vxlan::MTU_OVERHEAD)
    }
}

/// What a port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// The node NIC: VXLAN in and out.
    Uplink,
    /// The veth into the node's own stack.
    Host,
    /// The host end of a pod's veth, with the pod's addresses.
    Pod { ip: Ipv4Addr, mac: MacAddr },
}

/// A port as the packet path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortEntry {
    pub kind: PortKind,
    /// vxnat's own MAC on this link (the host end of the veth): the gateway MAC pods resolve.
    pub mac: MacAddr,
    /// What vxnat does with the TCP/UDP checksums of packets received here (for the uplink:
    /// of the decapsulated inner packets).
    pub checksum: ChecksumPolicy,
}

/// A port's checksum policy (incident 1: a checksum left to an offload nobody performed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumPolicy {
    /// Detect checksums holding only the pseudo-header sum (CHECKSUM_PARTIAL, what a veth
    /// peer with tx offload hands over) and complete them; full checksums pass untouched.
    #[default]
    Complete,
    /// Complete as above, and verify every full checksum: a bad one is dropped as
    /// `l4_bad_checksum`.
    Verify,
    /// Look at nothing: for peers known to send full checksums (a NIC without tx offload).
    /// A pseudo-header-only checksum would then leave vxnat as it came.
    Trust,
}

impl core::str::FromStr for ChecksumPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "complete" => Ok(ChecksumPolicy::Complete),
            "verify" => Ok(ChecksumPolicy::Verify),
            "trust" => Ok(ChecksumPolicy::Trust),
            other => Err(format!("{other:?} is not \"complete\", \"verify\" or \"trust\"")),
        }
    }
}

/// The node stack's end of the host port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort {
    pub port: PortId,
    /// MAC of the interface inside the node stack: destination of frames we deliver there.
    pub stack_mac: MacAddr,
}

/// Another node of the cluster, reachable over VXLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    /// Its underlay address (VXLAN destination; the source we accept VXLAN from).
    pub node_ip: Ipv4Addr,
    /// Its VtepMAC from flannel's backend-data annotation.
    pub vtep_mac: MacAddr,
    pub pod_cidr: Ipv4Cidr,
    /// Resolved underlay next hop (the node itself on a shared link, else a router). Zero
    /// until resolved.
    pub next_hop_mac: MacAddr,
    /// Pre-built outer headers for this node.
    pub(crate) template: OuterTemplate,
}

/// A pod attached to a port of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPod {
    pub port: PortId,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

/// Longest-prefix match over the remote nodes' pod CIDRs: one hash probe per distinct prefix
/// length present. The fallback when [`DirectIndex`] does not apply.
#[derive(Debug, Clone, Default)]
struct PrefixTable {
    /// Distinct prefix lengths, longest first.
    lens: Vec<u8>,
    map: AHashMap<u64, u32>,
}

impl PrefixTable {
    fn key(len: u8, addr: u32) -> u64 {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        (u64::from(len) << 32) | u64::from(addr & mask)
    }
    fn insert(&mut self, cidr: Ipv4Cidr, value: u32) -> Option<u32> {
        let len = cidr.prefix_len();
        if !self.lens.contains(&len) {
            self.lens.push(len);
            self.lens.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.map.insert(Self::key(len, u32::from(cidr.address())), value)
    }
    #[inline]
    fn lookup(&self, addr: Ipv4Addr) -> Option<u32> {
        let a = u32::from(addr);
        self.lens.iter().find_map(|&len| self.map.get(&Self::key(len, a)).copied())
    }
}

/// Largest direct-indexed table (entries); beyond it lookups fall back to hashing.
const DIRECT_MAX_BITS: u8 = 16;

/// A direct-indexed map from the addresses of one prefix to `u32` values, by slicing the
/// address bits under the prefix: `slot = (addr & !mask) >> shift`. Flannel gives every node a
/// same-sized subnet of one Network, so remote pod CIDRs index a table of 2^(L-C) slots (256
/// for a /16 split in /24s), and a node's pods a table of 2^(32-L) slots.
#[derive(Debug, Clone)]
struct DirectIndex {
    net: u32,
    mask: u32,
    shift: u32,
    /// Value + 1; 0 means empty.
    slots: Vec<u32>,
}

impl DirectIndex {
    /// For keys inside `outer`, at granularity `/key_len`. `None` if the table would be too big.
    fn new(outer: Ipv4Cidr, key_len: u8) -> Option<DirectIndex> {
        let bits = key_len.checked_sub(outer.prefix_len())?;
        if bits > DIRECT_MAX_BITS {
            return None;
        }
        Some(DirectIndex {
            net: u32::from(outer.network().address()),
            mask: outer.netmask_u32(),
            shift: 32 - u32::from(key_len),
            slots: vec![0; 1usize << bits],
        })
    }
    #[inline]
    fn slot(&self, addr: u32) -> Option<usize> {
        if addr & self.mask != self.net {
            return None;
        }
        // shift may be 32 only when key_len is 0, which implies bits == 0: one slot.
        Some(((addr & !self.mask).checked_shr(self.shift).unwrap_or(0)) as usize)
    }
    fn insert(&mut self, addr: u32, value: u32) {
        if let Some(i) = self.slot(addr) {
            if let Some(s) = self.slots.get_mut(i) {
                *s = value + 1;
            }
        }
    }
    #[inline]
    fn get(&self, addr: u32) -> Option<u32> {
        let i = self.slot(addr)?;
        match self.slots.get(i) {
            Some(&v) if v != 0 => Some(v - 1),
            _ => None,
        }
    }
}

/// Remote pod CIDR lookup: direct-indexed when all remote pod CIDRs have one length inside the
/// cluster CIDR (the flannel layout), longest-prefix hashing otherwise.
#[derive(Debug, Clone)]
enum RemoteIndex {
    Direct(DirectIndex),
    Hashed(PrefixTable),
}

impl RemoteIndex {
    #[inline]
    fn lookup(&self, addr: Ipv4Addr) -> Option<u32> {
        match self {
            RemoteIndex::Direct(d) => d.get(u32::from(addr)),
            RemoteIndex::Hashed(h) => h.lookup(addr),
        }
    }
}

/// One immutable snapshot of everything the packet path consults.
#[derive(Debug, Clone)]
pub struct Tables {
    pub node: NodeConfig,
    ports: Vec<Option<PortEntry>>,
    uplink: PortId,
    host: Option<HostPort>,
    pods: Vec<LocalPod>,
    /// Pod address -> index into `pods`; direct-indexed over the pod CIDR when it is /16 or
    /// longer, hashed otherwise.
    pod_direct: Option<DirectIndex>,
    pod_hashed: AHashMap<u32, u32>,
    remotes: Vec<RemoteNode>,
    vteps: AHashMap<u32, u32>,
    routes: RemoteIndex,
    /// Other addresses of this node delivered to the host port (beyond `node_ip`).
    host_addrs: Vec<Ipv4Addr>,
    /// Where NodePorts answer (`nodeport_addresses`; by default `node_ip` alone).
    node_port_addrs: Vec<Ipv4Addr>,
    /// The pod gateway, cached (it is compared on every packet).
    gateway: Ipv4Addr,
    /// Service frontends and their endpoints.
    services: std::sync::Arc<crate::nat::service::ServiceTable>,
    /// Bumped by the control plane on every publish.
    pub generation: u64,
}

/// Where the routing stage sends an IPv4 destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    LocalPod(LocalPod),
    /// This node's own stack (node addresses, the pod gateway).
    Host,
    /// A pod CIDR of another node: index into `remotes`.
    Remote(u32),
    /// In this node's pod CIDR, but nothing attached there.
    NoSuchPod,
    /// In the cluster CIDR, but no node owns it.
    NoNode,
    /// Outside the cluster network.
    External,
}

impl Tables {
    #[inline]
    pub fn port(&self, id: PortId) -> Option<&PortEntry> {
        self.ports.get(usize::from(id.0)).and_then(Option::as_ref)
    }
    pub fn ports(&self) -> impl Iterator<Item = (PortId, &PortEntry)> {
        self.ports.iter().enumerate().filter_map(|(i, p)| p.as_ref().map(|p| (PortId(i as u16), p)))
    }
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }
    pub fn uplink(&self) -> PortId {
        self.uplink
    }
    pub fn host(&self) -> Option<&HostPort> {
        self.host.as_ref()
    }
    #[inline]
    pub fn remote(&self, idx: u32) -> Option<&RemoteNode> {
        self.remotes.get(idx as usize)
    }
    pub fn remotes(&self) -> &[RemoteNode] {
        &self.remotes
    }
    pub fn pods(&self) -> impl Iterator<Item = &LocalPod> {
        self.pods.iter()
    }
    #[inline]
    fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&LocalPod> {
        let a = u32::from(ip);
        let i = match &self.pod_direct {
            Some(d) => d.get(a),
            None => self.pod_hashed.get(&a).copied(),
        }?;
        self.pods.get(i as usize)
    }
    /// The remote node whose underlay address is `ip` (a known VTEP).
    #[inline]
    pub fn vtep(&self, ip: Ipv4Addr) -> Option<u32> {
        self.vteps.get(&u32::from(ip)).copied()
    }
    #[inline]
    pub fn services(&self) -> &crate::nat::service::ServiceTable {
        &self.services
    }

    /// The pod gateway (first address of the pod CIDR).
    #[inline]
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    #[inline]
    pub fn is_local_addr(&self, ip: Ipv4Addr) -> bool {
        ip == self.node.node_ip || self.host_addrs.contains(&ip)
    }

    /// Whether NodePorts answer on `ip` (kube-proxy's `--nodeport-addresses`).
    #[inline]
    pub fn is_node_port_addr(&self, ip: Ipv4Addr) -> bool {
        self.node_port_addrs.contains(&ip)
    }

    /// Where NodePorts answer: the uplink's XDP program redirects NodePort traffic to these.
    pub fn node_port_addrs(&self) -> &[Ipv4Addr] {
        &self.node_port_addrs
    }

    /// Whether `ip` is a node's underlay address, where its VXLAN socket listens: this node's
    /// (`node_ip`, or another host address outside the cluster network) or a remote node's.
    /// One hash probe; the packet path asks only about UDP to the VXLAN port.
    #[inline]
    pub fn is_node_underlay_addr(&self, ip: Ipv4Addr) -> bool {
        (self.is_local_addr(ip) && !self.node.cluster_cidr.contains(ip)) || self.vtep(ip).is_some()
    }

    /// Routes an IPv4 destination.
    #[inline]
    pub fn route(&self, dst: Ipv4Addr) -> Route {
        if self.node.pod_cidr.contains(dst) {
            // The gateway, and node addresses taken from the pod CIDR (its network address on
            // the host port, as flannel puts 10.244.X.0/32 on flannel.1).
            if dst == self.gateway || self.host_addrs.contains(&dst) {
                return Route::Host;
            }
            return match self.pod_by_ip(dst) {
                Some(p) => Route::LocalPod(*p),
                None => Route::NoSuchPod,
            };
        }
        if self.is_local_addr(dst) {
            return Route::Host;
        }
        if !self.node.cluster_cidr.contains(dst) {
            return Route::External;
        }
        match self.routes.lookup(dst) {
            Some(idx) => Route::Remote(idx),
            None => Route::NoNode,
        }
    }
}

/// A configuration error, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablesError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for TablesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for TablesError {}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, TablesError> {
    Err(TablesError { field: field.into(), message: message.into() })
}

/// Assembles and validates a [`Tables`] snapshot.
#[derive(Debug, Clone)]
pub struct TablesBuilder {
    node: NodeConfig,
    ports: Vec<Option<PortEntry>>,
    uplink: Option<PortId>,
    host: Option<HostPort>,
    pods: Vec<LocalPod>,
    remotes: Vec<RemoteNode>,
    host_addrs: Vec<Ipv4Addr>,
    node_port_addrs: Option<Vec<Ipv4Addr>>,
    generation: u64,
    services: std::sync::Arc<crate::nat::service::ServiceTable>,
}

impl TablesBuilder {
    pub fn new(node: NodeConfig) -> Self {
        TablesBuilder {
            node,
            ports: Vec::new(),
            uplink: None,
            host: None,
            pods: Vec::new(),
            remotes: Vec::new(),
            host_addrs: Vec::new(),
            node_port_addrs: None,
            generation: 0,
            services: std::sync::Arc::default(),
        }
    }

    /// The Service table (compiled by the control plane).
    /// The Service table (shared: tables rebuilt for a pod change reuse it as is).
    pub fn services(mut self, services: impl Into<std::sync::Arc<crate::nat::service::ServiceTable>>) -> Self {
        self.services = services.into();
        self
    }

    fn set_port(&mut self, id: PortId, entry: PortEntry) -> Result<(), TablesError> {
        let i = usize::from(id.0);
        if self.ports.len() <= i {
            self.ports.resize(i + 1, None);
        }
        if self.ports[i].is_some() {
            return err(format!("ports[{}]", id.0), "port id used twice");
        }
        if !entry.mac.is_unicast() {
            return err(format!("ports[{}].mac", id.0), format!("{} is not a unicast MAC", entry.mac));
        }
        self.ports[i] = Some(entry);
        Ok(())
    }

    /// Sets the checksum policy of an already added port.
    pub fn checksum_policy(mut self, id: PortId, policy: ChecksumPolicy) -> Result<Self, TablesError> {
        match self.ports.get_mut(usize::from(id.0)) {
            Some(Some(e)) => {
                e.checksum = policy;
                Ok(self)
            }
            _ => err(format!("ports[{}].checksum", id.0), "no such port"),
        }
    }

    pub fn uplink(mut self, id: PortId) -> Result<Self, TablesError> {
        let mac = self.node.uplink_mac;
        self.set_port(id, PortEntry { kind: PortKind::Uplink, mac, checksum: ChecksumPolicy::Complete })?;
        self.uplink = Some(id);
        Ok(self)
    }

    /// The host port: `mac` is vxnat's end, `stack_mac` the node stack's end.
    pub fn host(mut self, id: PortId, mac: MacAddr, stack_mac: MacAddr) -> Result<Self, TablesError> {
        if !stack_mac.is_unicast() {
            return err("host.stack_mac", format!("{stack_mac} is not a unicast MAC"));
        }
        self.set_port(id, PortEntry { kind: PortKind::Host, mac, checksum: ChecksumPolicy::Complete })?;
        self.host = Some(HostPort { port: id, stack_mac });
        Ok(self)
    }

    /// Another address of this node that the host port receives.
    pub fn host_addr(mut self, ip: Ipv4Addr) -> Self {
        self.host_addrs.push(ip);
        self
    }

    /// Where NodePorts answer (unset: `node_ip` alone). Addresses other than `node_ip` are
    /// this node's too: the host port receives them.
    pub fn node_port_addrs(mut self, addrs: Vec<Ipv4Addr>) -> Self {
        for &a in &addrs {
            if a != self.node.node_ip && !self.host_addrs.contains(&a) {
                self.host_addrs.push(a);
            }
        }
        self.node_port_addrs = Some(addrs);
        self
    }

    /// A pod on `id`: `port_mac` is vxnat's end of its veth, `ip`/`mac` the pod's.
    pub fn pod(mut self, id: PortId, port_mac: MacAddr, ip: Ipv4Addr, mac: MacAddr) -> Result<Self, TablesError> {
        let f = format!("pods[{ip}]");
        if !self.node.pod_cidr.contains(ip) {
            return err(format!("{f}.ip"), format!("{ip} is outside this node's podCIDR {}", self.node.pod_cidr));
        }
        if ip == self.node.gateway_ip()
            || ip == self.node.pod_cidr.network().address()
            || ip == self.node.pod_cidr.broadcast()
        {
            return err(format!("{f}.ip"), format!("{ip} is the network, gateway or broadcast address"));
        }
        if !mac.is_unicast() {
            return err(format!("{f}.mac"), format!("{mac} is not a unicast MAC"));
        }
        if self.pods.iter().any(|p| p.ip == ip) {
            return err(format!("{f}.ip"), "address attached twice");
        }
        self.set_port(
            id,
            PortEntry { kind: PortKind::Pod { ip, mac }, mac: port_mac, checksum: ChecksumPolicy::Complete },
        )?;
        self.pods.push(LocalPod { port: id, ip, mac });
        Ok(self)
    }

    /// Another node. `next_hop_mac` may be zero while unresolved (its traffic is then a
    /// counted drop).
    pub fn remote(
        mut self,
        name: &str,
        node_ip: Ipv4Addr,
        vtep_mac: MacAddr,
        pod_cidr: Ipv4Cidr,
        next_hop_mac: MacAddr,
    ) -> Result<Self, TablesError> {
        let f = format!("nodes[{name}]");
        if node_ip == self.node.node_ip {
            return err(format!("{f}.node_ip"), format!("{node_ip} is this node's own address"));
        }
        if !vtep_mac.is_unicast() {
            return err(format!("{f}.vtep_mac"), format!("{vtep_mac} is not a unicast MAC"));
        }
        let pod_cidr = pod_cidr.network();
        if !self.node.cluster_cidr.contains(pod_cidr.address())
            || pod_cidr.prefix_len() < self.node.cluster_cidr.prefix_len()
        {
            return err(
                format!("{f}.pod_cidr"),
                format!("{pod_cidr} is not inside the cluster CIDR {}", self.node.cluster_cidr),
            );
        }
        let overlaps = |a: Ipv4Cidr, b: Ipv4Cidr| a.contains(b.address()) || b.contains(a.address());
        if overlaps(pod_cidr, self.node.pod_cidr) {
            return err(
                format!("{f}.pod_cidr"),
                format!("{pod_cidr} overlaps this node's podCIDR {}", self.node.pod_cidr),
            );
        }
        if let Some(o) = self.remotes.iter().find(|r| overlaps(r.pod_cidr, pod_cidr)) {
            return err(format!("{f}.pod_cidr"), format!("{pod_cidr} overlaps node {}'s {}", o.name, o.pod_cidr));
        }
        if let Some(o) = self.remotes.iter().find(|r| r.node_ip == node_ip) {
            return err(format!("{f}.node_ip"), format!("{node_ip} is also node {}'s address", o.name));
        }
        let template = OuterTemplate::new(&self.node, node_ip, next_hop_mac);
        self.remotes.push(RemoteNode { name: name.to_string(), node_ip, vtep_mac, pod_cidr, next_hop_mac, template });
        Ok(self)
    }

    pub fn generation(mut self, g: u64) -> Self {
        self.generation = g;
        self
    }

    pub fn build(self) -> Result<Tables, TablesError> {
        let n = &self.node;
        if !n.cluster_cidr.contains(n.pod_cidr.address()) {
            return err("node.pod_cidr", format!("{} is outside the cluster CIDR {}", n.pod_cidr, n.cluster_cidr));
        }
        if n.pod_cidr.prefix_len() > 30 {
            return err("node.pod_cidr", format!("{} leaves no room for pods", n.pod_cidr));
        }
        if n.vni > 0x00ff_ffff {
            return err("vxlan.vni", format!("{} does not fit 24 bits", n.vni));
        }
        if n.vxlan_port == 0 {
            return err("vxlan.port", "must not be 0");
        }
        if usize::from(n.underlay_mtu) < 68 + crate::wire::vxlan::MTU_OVERHEAD {
            return err("underlay_mtu", format!("{} is too small for VXLAN", n.underlay_mtu));
        }
        if !n.vtep_mac.is_unicast() {
            return err("node.vtep_mac", format!("{} is not a unicast MAC", n.vtep_mac));
        }
        let uplink = match self.uplink {
            Some(u) => u,
            None => return err("uplink", "no uplink port"),
        };
        let mut pod_direct = DirectIndex::new(n.pod_cidr, 32);
        let mut pod_hashed = AHashMap::new();
        for (i, p) in self.pods.iter().enumerate() {
            match &mut pod_direct {
                Some(d) => d.insert(u32::from(p.ip), i as u32),
                None => {
                    pod_hashed.insert(u32::from(p.ip), i as u32);
                }
            }
        }
        let mut vteps = AHashMap::with_capacity(self.remotes.len());
        for (i, r) in self.remotes.iter().enumerate() {
            vteps.insert(u32::from(r.node_ip), i as u32);
        }
        let one_len = self.remotes.first().map(|r| r.pod_cidr.prefix_len());
        let direct = match one_len {
            Some(len) if self.remotes.iter().all(|r| r.pod_cidr.prefix_len() == len) => {
                DirectIndex::new(n.cluster_cidr, len)
            }
            _ => DirectIndex::new(n.cluster_cidr, n.cluster_cidr.prefix_len()),
        };
        let routes = match direct {
            Some(mut d) if self.remotes.iter().all(|r| Some(r.pod_cidr.prefix_len()) == one_len) => {
                for (i, r) in self.remotes.iter().enumerate() {
                    d.insert(u32::from(r.pod_cidr.address()), i as u32);
                }
                RemoteIndex::Direct(d)
            }
            _ => {
                let mut h = PrefixTable::default();
                for (i, r) in self.remotes.iter().enumerate() {
                    h.insert(r.pod_cidr, i as u32);
                }
                RemoteIndex::Hashed(h)
            }
        };
        let gateway = n.gateway_ip();
        let node_port_addrs = self.node_port_addrs.unwrap_or_else(|| vec![self.node.node_ip]);
        Ok(Tables {
            node: self.node,
            ports: self.ports,
            uplink,
            host: self.host,
            pods: self.pods,
            pod_direct,
            pod_hashed,
            remotes: self.remotes,
            vteps,
            routes,
            host_addrs: self.host_addrs,
            node_port_addrs,
            gateway,
            services: self.services,
            generation: self.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("cidr literal")
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0x77, n])
    }

    #[test]
    fn routes_every_kind_of_destination() {
        let t = testkit::tables();
        assert!(matches!(t.route(testkit::POD2_IP), Route::LocalPod(p) if p.port == testkit::POD2));
        assert_eq!(t.route(testkit::GATEWAY_A), Route::Host);
        assert_eq!(t.route(testkit::NODE_A), Route::Host);
        assert_eq!(t.route(Ipv4Addr::new(10, 244, 0, 77)), Route::NoSuchPod);
        assert_eq!(t.route(testkit::REMOTE_POD_B), Route::Remote(0));
        assert_eq!(t.route(testkit::REMOTE_POD_C), Route::Remote(1));
        assert_eq!(t.route(Ipv4Addr::new(10, 244, 200, 1)), Route::NoNode);
        assert_eq!(t.route(Ipv4Addr::new(8, 8, 8, 8)), Route::External);
    }

    /// Mixed remote prefix lengths force the hashed longest-prefix table; it must answer
    /// exactly as the direct-indexed one does for the same addresses.
    #[test]
    fn hashed_and_direct_remote_lookups_agree() {
        let node = testkit::node_config();
        let uniform = TablesBuilder::new(node.clone())
            .uplink(PortId(0))
            .and_then(|b| b.remote("b", Ipv4Addr::new(192, 168, 50, 2), mac(2), cidr("10.244.1.0/24"), mac(12)))
            .and_then(|b| b.remote("c", Ipv4Addr::new(192, 168, 50, 3), mac(3), cidr("10.244.7.0/24"), mac(13)))
            .and_then(|b| b.build())
            .expect("valid");
        let mixed = TablesBuilder::new(node)
            .uplink(PortId(0))
            .and_then(|b| b.remote("b", Ipv4Addr::new(192, 168, 50, 2), mac(2), cidr("10.244.1.0/24"), mac(12)))
            .and_then(|b| b.remote("c", Ipv4Addr::new(192, 168, 50, 3), mac(3), cidr("10.244.7.0/24"), mac(13)))
            .and_then(|b| b.remote("d", Ipv4Addr::new(192, 168, 50, 4), mac(4), cidr("10.244.128.0/20"), mac(14)))
            .and_then(|b| b.build())
            .expect("valid");
        assert!(matches!(uniform.routes, RemoteIndex::Direct(_)));
        assert!(matches!(mixed.routes, RemoteIndex::Hashed(_)));
        for third in 0..=255u8 {
            for last in [0u8, 1, 77, 255] {
                let a = Ipv4Addr::new(10, 244, third, last);
                let m = mixed.route(a);
                if (128..144).contains(&third) {
                    assert_eq!(m, Route::Remote(2), "{a}");
                } else {
                    assert_eq!(uniform.route(a), m, "{a}");
                }
            }
        }
    }

    #[test]
    fn wide_pod_cidrs_fall_back_to_hashing() {
        let mut node = testkit::node_config();
        node.cluster_cidr = cidr("10.0.0.0/8");
        node.pod_cidr = cidr("10.0.0.0/12"); // 2^20 addresses: too many to index directly
        let t = TablesBuilder::new(node)
            .uplink(PortId(0))
            .and_then(|b| b.pod(PortId(1), mac(1), Ipv4Addr::new(10, 9, 8, 7), mac(9)))
            .and_then(|b| b.build())
            .expect("valid");
        assert!(t.pod_direct.is_none());
        assert!(matches!(t.route(Ipv4Addr::new(10, 9, 8, 7)), Route::LocalPod(p) if p.port == PortId(1)));
        assert_eq!(t.route(Ipv4Addr::new(10, 9, 8, 6)), Route::NoSuchPod);
    }

    #[test]
    fn builder_errors_name_the_field() {
        let node = testkit::node_config();
        let base = || TablesBuilder::new(node.clone()).uplink(PortId(0)).expect("uplink");
        let e = base().pod(PortId(1), mac(1), Ipv4Addr::new(10, 244, 5, 5), mac(5)).expect_err("outside podCIDR");
        assert_eq!(e.field, "pods[10.244.5.5].ip");
        let e = base().pod(PortId(1), mac(1), Ipv4Addr::new(10, 244, 0, 1), mac(5)).expect_err("gateway");
        assert!(e.message.contains("gateway"), "{e}");
        let e = base()
            .pod(PortId(1), mac(1), Ipv4Addr::new(10, 244, 0, 5), mac(5))
            .and_then(|b| b.pod(PortId(2), mac(2), Ipv4Addr::new(10, 244, 0, 5), mac(6)))
            .expect_err("twice");
        assert_eq!(e.field, "pods[10.244.0.5].ip");
        let e = base().pod(PortId(0), mac(1), Ipv4Addr::new(10, 244, 0, 5), mac(5)).expect_err("port reused");
        assert_eq!(e.field, "ports[0]");
        let e = base().remote("b", node.node_ip, mac(2), cidr("10.244.1.0/24"), mac(3)).expect_err("own ip");
        assert_eq!(e.field, "nodes[b].node_ip");
        let e =
            base().remote("b", Ipv4Addr::new(1, 2, 3, 4), mac(2), cidr("10.244.0.0/23"), mac(3)).expect_err("overlap");
        assert_eq!(e.field, "nodes[b].pod_cidr");
        let e =
            base().remote("b", Ipv4Addr::new(1, 2, 3, 4), mac(2), cidr("10.245.0.0/24"), mac(3)).expect_err("outside");
        assert!(e.message.contains("not inside the cluster CIDR"), "{e}");
        let e = base()
            .remote("b", Ipv4Addr::new(1, 2, 3, 4), mac(2), cidr("10.244.1.0/24"), mac(3))
            .and_then(|b| b.remote("c", Ipv4Addr::new(1, 2, 3, 4), mac(4), cidr("10.244.2.0/24"), mac(3)))
            .expect_err("same ip");
        assert_eq!(e.field, "nodes[c].node_ip");
        let e = base()
            .remote("b", Ipv4Addr::new(1, 2, 3, 4), MacAddr::BROADCAST, cidr("10.244.1.0/24"), mac(3))
            .expect_err("mac");
        assert_eq!(e.field, "nodes[b].vtep_mac");
        let mut bad = node.clone();
        bad.vni = 1 << 24;
        assert_eq!(
            TablesBuilder::new(bad).uplink(PortId(0)).and_then(|b| b.build()).expect_err("vni").field,
            "vxlan.vni"
        );
        let mut bad = node.clone();
        bad.underlay_mtu = 100;
        assert_eq!(
            TablesBuilder::new(bad).uplink(PortId(0)).and_then(|b| b.build()).expect_err("mtu").field,
            "underlay_mtu"
        );
        assert_eq!(TablesBuilder::new(node).build().expect_err("no uplink").field, "uplink");
    }
}
