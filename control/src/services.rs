//! Compiles Services and EndpointSlices into this node's `ServiceTable`, with kube-proxy's
//! semantics: endpoint ports come from the EndpointSlice's ports matched by the Service port's
//! name and protocol (so named targetPorts resolve as kube-proxy resolves them); conditions
//! default as the API says (`ready` absent = true, `serving` absent = `ready`, `terminating`
//! absent = false); an endpoint is local when its `nodeName` is this node.
//!
//! Topology (kube-proxy's `pkg/proxy/topology.go`, Kubernetes 1.35, where
//! PreferSameTrafficDistribution is GA): per Service port, when every ready endpoint has node
//! hints (`hints.forNodes`) and one names this node, new flows under the cluster-wide policy go
//! to the endpoints hinted for this node; else when every ready endpoint has zone hints
//! (`hints.forZones`) and one names this node's zone (its Node's `topology.kubernetes.io/zone`
//! label), to those hinted for the zone; else to every ready endpoint. As kube-proxy since
//! KEP-4444 (1.31), the hints decide, not the Service: the EndpointSlice controller writes them
//! only for Services that ask (`spec.trafficDistribution`, the `service.kubernetes.io/topology-mode`
//! annotation). Local traffic policies use this node's endpoints, hinted or not, as kube-proxy's
//! local endpoints do.
//!
//! One broken Service does not take the others down: it is reported by object and field, and
//! its last good version (if it had one) keeps serving.
//!
//! Compilation is per Service and cached (`Compiler`): after a change only the Services it
//! touched are compiled again, and the table is assembled from the cache by sharing each
//! port's compiled form (Maglev tables included) rather than copying it. A full compile spreads
//! the Services over the machine's cores.

use crate::model::{EndpointView, Key, Model, ServiceView, SliceView};
use crate::state::ClusterState;
use core::net::Ipv4Addr;
use dataplane::nat::service::{Endpoint, Frontend, FrontendKind, ServicePort, ServiceTable};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const DEFAULT_AFFINITY_S: i32 = 10800;

/// Why a Service does not compile. `what` names the Service (`Service shop/web`); the
/// messages name the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Service without a name.
    #[error("Service: metadata.name: missing")]
    NameMissing,
    /// An address field (`spec.clusterIP`, `spec.externalIPs[i]`,
    /// `status.loadBalancer.ingress[i].ip`) is not an IPv4 address.
    #[error("{what}: {field}: {value:?} is not an IPv4 address")]
    Address { what: String, field: String, value: String },
    /// The ClientIP affinity timeout is negative.
    #[error("{what}: spec.sessionAffinityConfig.clientIP.timeoutSeconds: {value}")]
    AffinityTimeout { what: String, value: i32 },
    /// `spec.ports[index].port` is not a 16-bit port.
    #[error("{what}: spec.ports[{index}].port: {value}")]
    Port { what: String, index: usize, value: i32 },
    /// `spec.ports[index].nodePort` is not a 16-bit port.
    #[error("{what}: spec.ports[{index}].nodePort: {value}")]
    NodePort { what: String, index: usize, value: i32 },
    /// `spec.loadBalancerSourceRanges[index]` is not a CIDR.
    #[error("{what}: spec.loadBalancerSourceRanges[{index}]: {value:?} is not a CIDR")]
    SourceRange { what: String, index: usize, value: String },
    /// The port's endpoint sets could not be built (the dataplane's own message, free-form:
    /// `ServicePort::new` reports a `String`).
    #[error("{0}")]
    Endpoints(String),
}

/// Which `spec.externalIPs` this node installs (issue 18; the CVE-2020-8554 class: whoever
/// may create a Service could otherwise capture the cluster's traffic to any address, the
/// nodes' own SSH and kubelet included). Refused: a node's address (`status.addresses`, every
/// Node), the cluster and Service CIDRs, and addresses that are never a unicast host's
/// (0.0.0.0/8, loopback, link-local, multicast and above); and, when `allowed` is not empty,
/// anything outside it (`nat.external_ip_cidrs`, as the API server's DenyServiceExternalIPs /
/// allowed-CIDRs admission policies do). A refused address is left out, named; the Service's
/// other frontends stay.
#[derive(Debug, Clone, Default)]
pub struct ExternalIpPolicy {
    /// Ranges refused, each with why.
    pub denied: Vec<(dataplane::wire::Ipv4Cidr, String)>,
    /// When not empty: the only ranges accepted.
    pub allowed: Vec<dataplane::wire::Ipv4Cidr>,
}

impl ExternalIpPolicy {
    /// The policy for a cluster whose pods are in `cluster` and Services in `services`.
    pub fn new(
        cluster: dataplane::wire::Ipv4Cidr,
        services: dataplane::wire::Ipv4Cidr,
        allowed: Vec<dataplane::wire::Ipv4Cidr>,
    ) -> ExternalIpPolicy {
        let mut denied = vec![
            (cluster, format!("in the cluster CIDR {cluster}")),
            (services, format!("in the Service CIDR {services}")),
        ];
        for (net, why) in [
            ("0.0.0.0/8", "not a host address"),
            ("127.0.0.0/8", "a loopback address"),
            ("169.254.0.0/16", "a link-local address"),
            ("224.0.0.0/3", "a multicast or reserved address"),
        ] {
            if let Ok(c) = net.parse() {
                denied.push((c, why.to_string()));
            }
        }
        ExternalIpPolicy { denied, allowed }
    }

    /// Why `ip` is refused, if it is; `nodes` maps every node address to its Node's name.
    fn refuses(&self, ip: Ipv4Addr, nodes: &BTreeMap<Ipv4Addr, String>) -> Option<String> {
        if let Some(node) = nodes.get(&ip) {
            return Some(format!("Node {node}'s address"));
        }
        if let Some((_, why)) = self.denied.iter().find(|(c, _)| c.contains(ip)) {
            return Some(why.clone());
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|c| c.contains(ip)) {
            return Some("outside nat.external_ip_cidrs".to_string());
        }
        None
    }
}

/// Every IPv4 address of every Node of `model` (`status.addresses`), with its Node's name.
pub fn node_addresses(model: &Model) -> BTreeMap<Ipv4Addr, String> {
    let mut v = BTreeMap::new();
    for (name, n) in &model.nodes {
        for a in n.status.as_ref().and_then(|s| s.addresses.as_ref()).into_iter().flatten() {
            if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
                v.insert(ip, name.clone());
            }
        }
    }
    v
}

fn proto_num(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        _ => None,
    }
}

/// `addr/len` with an IPv6 address and a prefix length up to 128.
fn is_ipv6_cidr(s: &str) -> bool {
    s.split_once('/')
        .is_some_and(|(a, l)| a.parse::<std::net::Ipv6Addr>().is_ok() && l.parse::<u8>().is_ok_and(|l| l <= 128))
}

fn ip(s: &str, what: &str, field: String) -> Result<Ipv4Addr, Error> {
    s.parse().map_err(|_| Error::Address { what: what.to_string(), field, value: s.to_string() })
}

/// NodePorts with the ClusterIP and port behind each, for node-local clients:
/// (protocol name, node port, ClusterIP, port).
pub fn node_port_redirects<'a>(
    services: impl IntoIterator<Item = &'a ServiceView>,
) -> Vec<(&'static str, u16, Ipv4Addr, u16)> {
    let mut v = Vec::new();
    for svc in services {
        if !matches!(svc.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            continue;
        }
        let Some(cip) = svc.cluster_ip.as_deref().and_then(|s| s.parse::<Ipv4Addr>().ok()) else { continue };
        for p in &svc.ports {
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "tcp",
                "UDP" => "udp",
                _ => continue,
            };
            if let (Some(np), Ok(port)) = (p.node_port.and_then(|n| u16::try_from(n).ok()), u16::try_from(p.port)) {
                v.push((proto, np, cip, port));
            }
        }
    }
    v
}

/// One Service port, compiled, with the frontends that lead to it.
#[derive(Debug, Clone)]
struct CompiledPort {
    port: Arc<ServicePort>,
    /// `Service ns/name`, for reports about the Service's own fields.
    what: String,
    /// `Service ns/name: spec.ports[i]`, for conflict reports.
    field: String,
    frontends: Vec<(Frontend, FrontendKind)>,
    node_ports: Vec<(u8, u16)>,
}

/// A compiled Service: its ports, and what of it was left out (each naming the field).
#[derive(Debug, Clone, Default)]
pub struct CompiledService {
    ports: Vec<CompiledPort>,
    notes: Vec<String>,
}

/// The per-Service cache and the table it assembles.
#[derive(Debug)]
pub struct Compiler {
    node: String,
    maglev_size: usize,
    /// Which external IPs are installed, and every Node's addresses for it.
    external_ips: ExternalIpPolicy,
    node_addrs: BTreeMap<Ipv4Addr, String>,
    /// This node's zone label as the cached Services were compiled with.
    zone: Option<String>,
    cache: BTreeMap<Key, CompiledService>,
    /// The current problem of each Service that has one.
    problems: BTreeMap<Key, String>,
}

impl Compiler {
    pub fn new(node: &str, maglev_size: usize) -> Compiler {
        Compiler {
            node: node.to_string(),
            maglev_size,
            external_ips: ExternalIpPolicy::default(),
            node_addrs: BTreeMap::new(),
            zone: None,
            cache: BTreeMap::new(),
            problems: BTreeMap::new(),
        }
    }

    /// Which external IPs the table installs (the default refuses none).
    pub fn set_external_ip_policy(&mut self, policy: ExternalIpPolicy) {
        self.external_ips = policy;
    }

    /// Whether `addrs` (`node_addresses`) differ from those the table was last assembled
    /// with: a Node's address that changed may let in or shut out an external IP.
    pub fn node_addresses_differ(&self, addrs: &BTreeMap<Ipv4Addr, String>) -> bool {
        *addrs != self.node_addrs
    }

    /// Load balancer and external IPs (those the guard lets in), with the ClusterIP and port
    /// behind each, for clients on the node itself: (protocol name, address, port, ClusterIP,
    /// port). kube-proxy captures a node's own traffic to them too; the node sends it to the
    /// ClusterIP, which its routes bring to vxnat.
    pub fn local_redirects(&self, model: &Model) -> Vec<(&'static str, Ipv4Addr, u16, Ipv4Addr, u16)> {
        let mut v = Vec::new();
        for svc in model.services.values() {
            // Most Services have neither: a scan of 100,000 costs ~2.5 ms instead of ~37 ms
            // when each is looked at further (control_scale).
            if svc.lb_ips.is_empty() && svc.external_ips.is_empty() {
                continue;
            }
            let Some(cip) = svc.cluster_ip.as_deref().and_then(|s| s.parse::<Ipv4Addr>().ok()) else { continue };
            let lb = svc.lb_ips.iter().flatten().filter_map(|s| s.parse::<Ipv4Addr>().ok());
            let ext = svc
                .external_ips
                .iter()
                .filter_map(|s| s.parse::<Ipv4Addr>().ok())
                .filter(|ip| self.external_ips.refuses(*ip, &self.node_addrs).is_none());
            let addrs: Vec<Ipv4Addr> = lb.chain(ext).collect();
            for p in &svc.ports {
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => "tcp",
                    "UDP" => "udp",
                    _ => continue,
                };
                let Ok(port) = u16::try_from(p.port) else { continue };
                v.extend(addrs.iter().map(|&a| (proto, a, port, cip, port)));
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every Node's addresses (`node_addresses`), which external IPs may not be: read when
    /// the table is assembled, so a Node change needs no Service compiled again.
    pub fn set_node_addresses(&mut self, addrs: BTreeMap<Ipv4Addr, String>) {
        self.node_addrs = addrs;
    }

    /// Every Service's current problem, in key order.
    pub fn problems(&self) -> Vec<String> {
        self.problems.values().cloned().collect()
    }

    /// Every Service's current problem with the Service's key, in key order.
    pub fn keyed_problems(&self) -> impl Iterator<Item = (&Key, &String)> {
        self.problems.iter()
    }

    /// Whether this node's zone label in `model` differs from the one the cached Services were
    /// compiled with (then [`Compiler::compile_changed`] compiles every Service again).
    pub fn zone_changed(&self, model: &Model) -> bool {
        model.zone_of(&self.node) != self.zone.as_deref()
    }

    /// Compiles every Service of `model`, on all cores. Returns the problems found.
    pub fn compile_all(&mut self, model: &Model) -> Vec<String> {
        self.cache.clear();
        self.problems.clear();
        self.zone = model.zone_of(&self.node).map(str::to_string);
        let keys: Vec<&Key> = model.services.keys().collect();
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(keys.len().max(1));
        let chunk = keys.len().div_ceil(threads).max(1);
        let (node, zone, size) = (&self.node, self.zone.as_deref(), self.maglev_size);
        let results: Vec<Vec<(Key, Result<CompiledService, Error>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = keys
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|k| {
                                let svc = &model.services[*k];
                                ((*k).clone(), compile_service(svc, &model.slices_of(k), node, zone, size))
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
        });
        let mut problems = Vec::new();
        for (k, r) in results.into_iter().flatten() {
            match r {
                Ok(c) => {
                    self.cache.insert(k, c);
                }
                Err(e) => {
                    let e = e.to_string();
                    self.problems.insert(k, e.clone());
                    problems.push(e);
                }
            }
        }
        problems
    }

    /// Compiles the Services in `dirty` again (a Service gone from the model leaves the
    /// cache), or every Service when this node's zone label changed (which endpoints are
    /// hinted for this node's zone is decided at compile time; a zone change is rare, so it
    /// costs one full compile rather than a zone-aware cache). A Service that no longer
    /// compiles keeps its last good version. Returns the problems found.
    pub fn compile_changed<'a>(&mut self, model: &Model, dirty: impl IntoIterator<Item = &'a Key>) -> Vec<String> {
        let keys: Vec<Key> = if self.zone_changed(model) {
            self.zone = model.zone_of(&self.node).map(str::to_string);
            let all: std::collections::BTreeSet<&Key> = self.cache.keys().chain(model.services.keys()).collect();
            all.into_iter().cloned().collect()
        } else {
            dirty.into_iter().cloned().collect()
        };
        let mut problems = Vec::new();
        for k in &keys {
            self.problems.remove(k);
            let Some(svc) = model.services.get(k) else {
                self.cache.remove(k);
                continue;
            };
            match compile_service(svc, &model.slices_of(k), &self.node, self.zone.as_deref(), self.maglev_size) {
                Ok(c) => {
                    self.cache.insert(k.clone(), c);
                }
                Err(e) => {
                    let e = if self.cache.contains_key(k) {
                        format!("{e}; its last good version stays")
                    } else {
                        e.to_string()
                    };
                    self.problems.insert(k.clone(), e.clone());
                    problems.push(e);
                }
            }
        }
        problems
    }

    /// The table of every cached Service, in key order (so when two Services claim one
    /// frontend, the same one wins on every node), and the conflicts found.
    pub fn table(&self) -> (ServiceTable, Vec<String>) {
        let (table, conflicts) = self.table_keyed();
        (table, conflicts.into_iter().map(|(_, e)| e).collect())
    }

    /// As [`Compiler::table`], each conflict with the key of the Service that lost it.
    pub fn table_keyed(&self) -> (ServiceTable, Vec<(Key, String)>) {
        let mut table = ServiceTable::default();
        let mut problems = Vec::new();
        for (key, c) in &self.cache {
            problems.extend(c.notes.iter().map(|n| (key.clone(), n.clone())));
            let mut refused = std::collections::BTreeSet::new();
            for p in &c.ports {
                let idx = table.add_shared_port(p.port.clone());
                for &(f, kind) in &p.frontends {
                    if kind == FrontendKind::ExternalIp {
                        if let Some(why) = self.external_ips.refuses(f.ip, &self.node_addrs) {
                            if refused.insert(f.ip) {
                                problems.push((
                                    key.clone(),
                                    format!("{}: spec.externalIPs: {}: {why}; not installed", p.what, f.ip),
                                ));
                            }
                            continue;
                        }
                    }
                    if let Err(e) = table.add_frontend(f, kind, idx) {
                        problems.push((key.clone(), format!("{}: {e}", p.field)));
                    }
                }
                for &(proto, np) in &p.node_ports {
                    if let Err(e) = table.add_node_port(proto, np, idx) {
                        problems.push((key.clone(), format!("{}.nodePort: {e}", p.field)));
                    }
                }
            }
        }
        (table, problems)
    }
}

/// The compiled table for a whole state, and what was skipped (each message names the object
/// and field).
pub fn compile(state: &ClusterState, node: &str, maglev_size: usize) -> (ServiceTable, Vec<String>) {
    let model = Model::from_state(state.clone());
    let mut c = Compiler::new(node, maglev_size);
    let mut problems = c.compile_all(&model);
    let (table, conflicts) = c.table();
    problems.extend(conflicts);
    (table, problems)
}

/// Which ready endpoints of a Service port new flows under the cluster-wide policy prefer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every ready endpoint (no usable hints).
    All,
    /// Those hinted for this node (`hints.forNodes`).
    Node,
    /// Those hinted for this node's zone (`hints.forZones`).
    Zone,
}

/// kube-proxy's `topologyModeFromHints` over one Service port's endpoints (each with its
/// hints), for node `node` in zone `zone`: node hints first, then zone hints, each used only
/// when every ready endpoint has one and at least one names this node (zone). Endpoints that
/// are not ready do not count either way.
pub fn topology(endpoints: &[(Endpoint, &EndpointView)], node: &str, zone: Option<&str>) -> Topology {
    let ready: Vec<&EndpointView> = endpoints.iter().filter(|(e, _)| e.ready).map(|(_, v)| *v).collect();
    if ready.is_empty() {
        return Topology::All;
    }
    if ready.iter().all(|v| !v.node_hints.is_empty()) && ready.iter().any(|v| v.node_hints.iter().any(|n| n == node)) {
        return Topology::Node;
    }
    if let Some(zone) = zone {
        if ready.iter().all(|v| !v.zone_hints.is_empty())
            && ready.iter().any(|v| v.zone_hints.iter().any(|z| z == zone))
        {
            return Topology::Zone;
        }
    }
    Topology::All
}

/// Compiles one Service with its EndpointSlices, for node `node` in zone `zone` (its Node's
/// `topology.kubernetes.io/zone` label).
pub fn compile_service(
    svc: &ServiceView,
    slices: &[&SliceView],
    node: &str,
    zone: Option<&str>,
    maglev_size: usize,
) -> Result<CompiledService, Error> {
    let ns = svc.namespace.as_str();
    if svc.name.is_empty() {
        return Err(Error::NameMissing);
    }
    let name = svc.name.as_str();
    let what = format!("Service {ns}/{name}");
    let mut out = CompiledService::default();
    if !svc.has_spec {
        return Ok(out);
    }
    let kind = svc.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(out);
    }
    let cluster_ip = match svc.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None, // headless: nothing to translate
        Some(s) => Some(ip(s, &what, "spec.clusterIP".into())?),
    };
    let external_ips: Vec<Ipv4Addr> = svc
        .external_ips
        .iter()
        .enumerate()
        .map(|(i, s)| ip(s, &what, format!("spec.externalIPs[{i}]")))
        .collect::<Result<_, _>>()?;
    let lb_ips: Vec<Ipv4Addr> = svc
        .lb_ips
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.as_deref().map(|s| ip(s, &what, format!("status.loadBalancer.ingress[{i}].ip"))))
        .collect::<Result<_, _>>()?;
    // kube-proxy's IPv4 proxier keeps the IPv4 ranges; a Service that named ranges, none of
    // them IPv4, admits no IPv4 client (rather than all of them).
    let source_ranges = if svc.lb_source_ranges.is_empty() {
        None
    } else {
        let mut v = Vec::new();
        for (i, r) in svc.lb_source_ranges.iter().enumerate() {
            let r = r.trim();
            match r.parse::<dataplane::wire::Ipv4Cidr>() {
                Ok(c) => v.push(c.network()),
                Err(_) if is_ipv6_cidr(r) => {}
                Err(_) => return Err(Error::SourceRange { what: what.clone(), index: i, value: r.to_string() }),
            }
        }
        Some(v)
    };
    let external_local = svc.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = svc.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_ns = if svc.session_affinity.as_deref() == Some("ClientIP") {
        let t = svc.affinity_timeout.unwrap_or(DEFAULT_AFFINITY_S);
        Some(u64::try_from(t).map_err(|_| Error::AffinityTimeout { what: what.clone(), value: t })? * 1_000_000_000)
    } else {
        None
    };
    let slices: Vec<&&SliceView> = slices.iter().filter(|s| s.address_type == "IPv4").collect();
    for (pi, sp) in svc.ports.iter().enumerate() {
        let field = format!("{what}: spec.ports[{pi}]");
        let Some(proto) = proto_num(sp.protocol.as_deref()) else {
            out.notes.push(format!(
                "{field}.protocol: {} is not supported by vxnat (TCP and UDP are); this port is left out",
                sp.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let port = u16::try_from(sp.port).map_err(|_| Error::Port { what: what.clone(), index: pi, value: sp.port })?;
        let mut endpoints: Vec<(Endpoint, &EndpointView)> = Vec::new();
        for s in &slices {
            let Some(ep_port) = s
                .ports
                .iter()
                .find(|(n, p, _)| *n == sp.name && proto_num(p.as_deref()) == Some(proto))
                .and_then(|(_, _, p)| *p)
            else {
                continue;
            };
            let Ok(ep_port) = u16::try_from(ep_port) else { continue };
            for e in &s.endpoints {
                let Some(addr) = e.address.as_deref().and_then(|a| a.parse::<Ipv4Addr>().ok()) else { continue };
                let ready = e.ready.unwrap_or(true);
                let serving = e.serving.unwrap_or(ready);
                let terminating = e.terminating.unwrap_or(false);
                let local = e.node_name.as_deref() == Some(node);
                endpoints.push((Endpoint { ip: addr, port: ep_port, ready, serving, terminating, local }, e));
            }
        }
        // Deduplicate (an endpoint may appear in several slices during updates).
        endpoints.sort_by_key(|(e, _)| (e.ip, e.port));
        endpoints.dedup_by_key(|(e, _)| (e.ip, e.port));
        let port_name = sp.name.clone().unwrap_or_else(|| port.to_string());
        let plain: Vec<Endpoint> = endpoints.iter().map(|(e, _)| *e).collect();
        let mut compiled = ServicePort::new(
            format!("{ns}/{name}:{port_name}"),
            &plain,
            external_local,
            internal_local,
            affinity_ns,
            maglev_size,
        )
        .map_err(Error::Endpoints)?
        .with_source_ranges(source_ranges.clone());
        // Topology restricts the cluster-wide ready set only (see the module docs); with no
        // usable hints every endpoint is preferred and the port stays as built.
        let mode = topology(&endpoints, node, zone);
        let hinted = |v: &EndpointView| match mode {
            Topology::All => true,
            Topology::Node => v.node_hints.iter().any(|n| n == node),
            Topology::Zone => v.zone_hints.iter().any(|z| Some(z.as_str()) == zone),
        };
        let preferred: std::collections::BTreeSet<(Ipv4Addr, u16)> =
            endpoints.iter().filter(|(_, v)| hinted(v)).map(|(e, _)| (e.ip, e.port)).collect();
        if preferred.len() < endpoints.len() {
            compiled =
                compiled.preferring(|e| preferred.contains(&(e.ip, e.port)), maglev_size).map_err(Error::Endpoints)?;
        }
        let mut p = CompiledPort {
            port: Arc::new(compiled),
            what: what.clone(),
            field,
            frontends: Vec::new(),
            node_ports: Vec::new(),
        };
        if let Some(cip) = cluster_ip {
            p.frontends.push((Frontend { proto, ip: cip, port }, FrontendKind::ClusterIp));
        }
        p.frontends.extend(external_ips.iter().map(|&ip| (Frontend { proto, ip, port }, FrontendKind::ExternalIp)));
        p.frontends.extend(lb_ips.iter().map(|&ip| (Frontend { proto, ip, port }, FrontendKind::LoadBalancer)));
        if matches!(kind, "NodePort" | "LoadBalancer") {
            if let Some(np) = sp.node_port {
                let np = u16::try_from(np).map_err(|_| Error::NodePort { what: what.clone(), index: pi, value: np })?;
                p.node_ports.push((proto, np));
            }
        }
        out.ports.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    type: NodePort
    clusterIP: 10.96.0.20
    externalIPs: [203.0.113.7]
    externalTrafficPolicy: Local
    sessionAffinity: ClientIP
    ports:
    - {name: http, port: 80, targetPort: http-alt, protocol: TCP, nodePort: 30080}
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
  status:
    loadBalancer:
      ingress: [{ip: 198.51.100.9}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8081, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
  endpoints:
  - {addresses: [10.244.0.5], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.5], nodeName: node-b}
  - {addresses: [10.244.1.6], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-b}
- apiVersion: v1
  kind: Service
  metadata: {name: broken, namespace: shop}
  spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: headless, namespace: shop}
  spec: {clusterIP: None, ports: [{port: 80}]}
"#;

    fn table() -> (ServiceTable, Vec<String>) {
        compile(&ClusterState::parse(STATE).unwrap(), "node-a", 16381)
    }

    #[test]
    fn every_kind_of_frontend_resolves_to_the_named_endpoint_port() {
        let (t, problems) = table();
        assert_eq!(
            problems,
            vec!["Service shop/broken: spec.clusterIP: \"10.96.0.300\" is not an IPv4 address".to_string()]
        );
        let (p, k) = t.lookup(6, Ipv4Addr::new(10, 96, 0, 20), 80, false).unwrap();
        assert_eq!((k, p.name.as_str()), (FrontendKind::ClusterIp, "shop/web:http"));
        let c = p.choose(k, false, 12345).unwrap();
        assert_eq!(c.endpoint.port, 8081, "named targetPort resolved through the slice's ports");
        assert!(c.endpoint.ready);
        assert_eq!(t.lookup(6, Ipv4Addr::new(203, 0, 113, 7), 80, false).unwrap().1, FrontendKind::ExternalIp);
        assert_eq!(t.lookup(6, Ipv4Addr::new(198, 51, 100, 9), 80, false).unwrap().1, FrontendKind::LoadBalancer);
        assert_eq!(t.lookup(6, Ipv4Addr::new(192, 168, 77, 1), 30080, true).unwrap().1, FrontendKind::NodePort);
        let (udp, _) = t.lookup(17, Ipv4Addr::new(10, 96, 0, 20), 53, false).unwrap();
        assert_eq!(udp.choose(FrontendKind::ClusterIp, false, 1).unwrap().endpoint.port, 5353);
        assert!(t.lookup(6, Ipv4Addr::new(10, 96, 0, 20), 53, false).is_none());
    }

    #[test]
    fn local_policy_and_affinity_come_through() {
        let (t, _) = table();
        let (p, _) = t.lookup(6, Ipv4Addr::new(192, 168, 77, 1), 30080, true).unwrap();
        assert_eq!(p.affinity_ns, Some(10800 * 1_000_000_000));
        for h in 0..100 {
            let c = p.choose(FrontendKind::NodePort, true, h).unwrap();
            assert_eq!(c.endpoint.ip, Ipv4Addr::new(10, 244, 0, 5), "Local: only node-a's endpoint");
            assert!(c.preserve_client);
        }
        // From node-b's point of view only its ready endpoint is local.
        let (tb, _) = compile(&ClusterState::parse(STATE).unwrap(), "node-b", 16381);
        let (pb, _) = tb.lookup(6, Ipv4Addr::new(192, 168, 77, 2), 30080, true).unwrap();
        assert_eq!(pb.choose(FrontendKind::NodePort, true, 3).unwrap().endpoint.ip, Ipv4Addr::new(10, 244, 1, 5));
    }

    /// (protocol, address, port) probed, and the port name and endpoints chosen there.
    type Resolved = (u8, Ipv4Addr, u16, Option<(String, Vec<Ipv4Addr>)>);

    fn lookups(t: &ServiceTable) -> Vec<Resolved> {
        let probes = [
            (6u8, Ipv4Addr::new(10, 96, 0, 20), 80u16, false),
            (17, Ipv4Addr::new(10, 96, 0, 20), 53, false),
            (6, Ipv4Addr::new(10, 96, 0, 22), 80, false),
            (6, Ipv4Addr::new(192, 168, 77, 1), 30080, true),
        ];
        probes
            .iter()
            .map(|&(proto, ip, port, node)| {
                let r = t.lookup(proto, ip, port, node).map(|(p, k)| {
                    let picks = (0..64u64)
                        .filter_map(|h| p.choose(k, false, h.wrapping_mul(0x9e37_79b9_7f4a_7c15)).ok())
                        .map(|c| c.endpoint.ip)
                        .collect();
                    (p.name.clone(), picks)
                });
                (proto, ip, port, r)
            })
            .collect()
    }

    /// Compiling only what changed gives the same table as compiling everything again.
    #[test]
    fn incremental_compile_matches_a_full_one() {
        use crate::model::Update;
        let mut model = Model::from_state(ClusterState::parse(STATE).unwrap());
        let mut inc = Compiler::new("node-a", 16381);
        inc.compile_all(&model);
        let extra = r#"
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.22, ports: [{name: http, port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.1.9]}, {addresses: [10.244.0.9]}]
"#;
        // Add a Service, then take an endpoint out of web's slice.
        for text in [
            format!("{STATE}{extra}"),
            format!("{STATE}{extra}").replace("  - {addresses: [10.244.1.5], nodeName: node-b}\n", ""),
        ] {
            let dirty = model.apply(Update::State(ClusterState::parse(&text).unwrap()));
            assert!(!dirty.services.is_empty() && dirty.services.len() <= 2, "{dirty:?}");
            inc.compile_changed(&model, &dirty.services);
            let mut full = Compiler::new("node-a", 16381);
            full.compile_all(&model);
            assert_eq!(lookups(&inc.table().0), lookups(&full.table().0));
            assert_eq!(inc.problems(), full.problems());
        }
        let web = lookups(&inc.table().0)[0].3.clone().unwrap();
        assert!(!web.1.contains(&Ipv4Addr::new(10, 244, 1, 5)), "removed endpoint no longer chosen: {web:?}");
    }

    /// A Service that stops compiling keeps its last good version, and says so.
    #[test]
    fn a_broken_service_keeps_its_last_good_version() {
        use crate::model::Update;
        let mut model = Model::from_state(ClusterState::parse(STATE).unwrap());
        let mut c = Compiler::new("node-a", 16381);
        c.compile_all(&model);
        let broken = STATE.replace("externalIPs: [203.0.113.7]", "externalIPs: [203.0.113.700]");
        let dirty = model.apply(Update::State(ClusterState::parse(&broken).unwrap()));
        let problems = c.compile_changed(&model, &dirty.services);
        assert_eq!(
            problems,
            vec!["Service shop/web: spec.externalIPs[0]: \"203.0.113.700\" is not an IPv4 address; its last good version stays"]
        );
        assert!(c.table().0.lookup(6, Ipv4Addr::new(203, 0, 113, 7), 80, false).is_some(), "last good version serves");
        assert_eq!(c.problems().len(), 2, "web's and broken's: {:?}", c.problems());
    }

    const GUARDED: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a}
  spec: {podCIDR: 10.244.0.0/24}
  status: {addresses: [{type: InternalIP, address: 192.168.77.1}, {type: Hostname, address: node-a}]}
- apiVersion: v1
  kind: Service
  metadata: {name: grab, namespace: shop}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.30
    externalIPs: [192.168.77.1, 10.244.0.9, 10.96.0.99, 127.0.0.1, 224.0.0.5, 203.0.113.7, 198.51.100.4]
    loadBalancerSourceRanges: [" 198.51.100.0/24", "2001:db8::/32"]
    ports:
    - {name: ssh, port: 22, protocol: TCP}
    - {name: sig, port: 2905, protocol: SCTP}
  status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}
"#;

    fn guarded(allowed: &[&str]) -> (ServiceTable, Vec<String>) {
        let model = Model::from_state(ClusterState::parse(GUARDED).unwrap());
        let mut c = Compiler::new("node-a", 16381);
        let cidr = |s: &str| s.parse::<dataplane::wire::Ipv4Cidr>().unwrap();
        c.set_external_ip_policy(ExternalIpPolicy::new(
            cidr("10.244.0.0/16"),
            cidr("10.96.0.0/12"),
            allowed.iter().map(|a| cidr(a)).collect(),
        ));
        let mut problems = c.compile_all(&model);
        c.set_node_addresses(node_addresses(&model));
        let (t, conflicts) = c.table();
        problems.extend(conflicts);
        (t, problems)
    }

    /// External IPs that would capture a node's own traffic, pods' or Services' addresses, or
    /// non-unicast ones are left out, each named (CVE-2020-8554 class); the rest install. An
    /// SCTP port is named and left out, the TCP port stays. Source ranges reach the port.
    #[test]
    fn external_ips_a_node_or_the_cluster_owns_are_refused_named_and_the_rest_installed() {
        let (t, problems) = guarded(&[]);
        let installed: Vec<Ipv4Addr> =
            ["192.168.77.1", "10.244.0.9", "10.96.0.99", "127.0.0.1", "224.0.0.5", "203.0.113.7", "198.51.100.4"]
                .iter()
                .map(|a| a.parse().unwrap())
                .filter(|&a| t.lookup(6, a, 22, false).is_some_and(|(_, k)| k == FrontendKind::ExternalIp))
                .collect();
        assert_eq!(installed, vec![Ipv4Addr::new(203, 0, 113, 7), Ipv4Addr::new(198, 51, 100, 4)]);
        let said = problems.join("\n");
        for want in [
            "Service shop/grab: spec.externalIPs: 192.168.77.1: Node node-a's address; not installed",
            "spec.externalIPs: 10.244.0.9: in the cluster CIDR 10.244.0.0/16",
            "spec.externalIPs: 10.96.0.99: in the Service CIDR 10.96.0.0/12",
            "spec.externalIPs: 127.0.0.1: a loopback address",
            "spec.externalIPs: 224.0.0.5: a multicast or reserved address",
            "Service shop/grab: spec.ports[1].protocol: SCTP is not supported by vxnat (TCP and UDP are); this port is left out",
        ] {
            assert!(said.contains(want), "{want}: {said}");
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
        // The ClusterIP and the load balancer IP stay; the source ranges (the IPv6 one
        // skipped) apply there.
        let (p, k) = t.lookup(6, Ipv4Addr::new(198, 51, 100, 9), 22, false).unwrap();
        assert_eq!(k, FrontendKind::LoadBalancer);
        assert!(p.admits(Ipv4Addr::new(198, 51, 100, 200)) && !p.admits(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(t.lookup(6, Ipv4Addr::new(10, 96, 0, 30), 22, false).is_some());
        // With an allow-list, only what it holds.
        let (t, problems) = guarded(&["198.51.100.0/24"]);
        assert!(t.lookup(6, Ipv4Addr::new(203, 0, 113, 7), 22, false).is_none());
        assert!(t.lookup(6, Ipv4Addr::new(198, 51, 100, 4), 22, false).is_some());
        assert!(problems.iter().any(|p| p.contains("203.0.113.7: outside nat.external_ip_cidrs")), "{problems:?}");
    }

    #[test]
    fn a_source_range_that_is_not_a_cidr_names_its_field() {
        let bad = GUARDED.replace("\" 198.51.100.0/24\"", "\"198.51.100.0/33\"");
        let model = Model::from_state(ClusterState::parse(&bad).unwrap());
        let mut c = Compiler::new("node-a", 16381);
        let problems = c.compile_all(&model);
        assert_eq!(
            problems,
            vec!["Service shop/grab: spec.loadBalancerSourceRanges[0]: \"198.51.100.0/33\" is not a CIDR".to_string()]
        );
    }

    /// Three zones; node-a is in zone-a. Endpoints .2 (node-a) and .3 (node-c) are hinted
    /// for zone-a, .4 (node-b) for zone-b; .5 is not ready and has no hints (it does not
    /// count). The Service asks for nothing: the hints alone decide, as in kube-proxy.
    const ZONED: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
  spec: {podCIDR: 10.244.0.0/24}
- apiVersion: v1
  kind: Node
  metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}
  spec: {podCIDR: 10.244.1.0/24}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    type: NodePort
    clusterIP: 10.96.0.20
    ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.2], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.2.3], nodeName: node-c, zone: zone-c, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.1.4], nodeName: node-b, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
  - {addresses: [10.244.1.5], nodeName: node-b, conditions: {ready: false}}
"#;

    /// The endpoints new flows take through `ip:port` (`node`: a node address, for NodePorts;
    /// `outside`: from a client outside the cluster).
    fn picks(t: &ServiceTable, ip: Ipv4Addr, port: u16, node: bool, outside: bool) -> Vec<u8> {
        let (p, k) = t.lookup(6, ip, port, node).expect("a frontend");
        let mut v: Vec<u8> = (0..512u64)
            .filter_map(|h| p.choose(k, outside, h.wrapping_mul(0x9e37_79b9_7f4a_7c15)).ok())
            .map(|c| c.endpoint.ip.octets()[3])
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn cluster_ip_picks(yaml: &str, node: &str) -> Vec<u8> {
        let (t, problems) = compile(&ClusterState::parse(yaml).unwrap(), node, 16381);
        assert!(problems.is_empty(), "{problems:?}");
        picks(&t, Ipv4Addr::new(10, 96, 0, 20), 80, false, false)
    }

    #[test]
    fn zone_hints_send_new_flows_to_this_zones_endpoints() {
        assert_eq!(cluster_ip_picks(ZONED, "node-a"), vec![2, 3], "zone-a's hinted endpoints, one on another node");
        assert_eq!(cluster_ip_picks(ZONED, "node-b"), vec![4]);
        // NodePorts under the Cluster policy too, from outside or inside.
        let (t, _) = compile(&ClusterState::parse(ZONED).unwrap(), "node-a", 16381);
        assert_eq!(picks(&t, Ipv4Addr::new(192, 168, 77, 1), 30080, true, true), vec![2, 3]);
        // The others stay serving: a UDP flow on one is kept, as kube-proxy's conntrack
        // cleanup keeps it.
        let (p, _) = t.lookup(6, Ipv4Addr::new(10, 96, 0, 20), 80, false).unwrap();
        assert!(p.is_serving(Ipv4Addr::new(10, 244, 1, 4), 8080));
    }

    #[test]
    fn each_missing_condition_falls_back_to_every_ready_endpoint() {
        let all = vec![2, 3, 4];
        // This node has no zone label (or an empty one).
        let unlabelled =
            ZONED.replace("{name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}", "{name: node-a}");
        assert_eq!(cluster_ip_picks(&unlabelled, "node-a"), all);
        let empty = ZONED.replace("topology.kubernetes.io/zone: zone-a}", "topology.kubernetes.io/zone: \"\"}");
        assert_eq!(cluster_ip_picks(&empty, "node-a"), all);
        // A ready endpoint without hints (an empty forZones is none either).
        let unhinted = ZONED.replace(
            "{addresses: [10.244.1.4], nodeName: node-b, zone: zone-b, hints: {forZones: [{name: zone-b}]}}",
            "{addresses: [10.244.1.4], nodeName: node-b, zone: zone-b}",
        );
        assert_eq!(cluster_ip_picks(&unhinted, "node-a"), all);
        assert_eq!(cluster_ip_picks(&ZONED.replace("[{name: zone-b}]", "[]"), "node-a"), all);
        // No endpoint hinted for this node's zone.
        let elsewhere = ZONED.replace("topology.kubernetes.io/zone: zone-a}", "topology.kubernetes.io/zone: zone-d}");
        assert_eq!(cluster_ip_picks(&elsewhere, "node-a"), all);
        // A node that is not in the state at all.
        assert_eq!(cluster_ip_picks(ZONED, "node-x"), all);
        // No ready endpoint: the serving-but-terminating fallback, unrestricted.
        let terminating = ZONED
            .replace(
                "nodeName: node-a, zone",
                "conditions: {ready: false, serving: true, terminating: true}, nodeName: node-a, zone",
            )
            .replace(
                "nodeName: node-c, zone",
                "conditions: {ready: false, serving: true, terminating: true}, nodeName: node-c, zone",
            )
            .replace(
                "nodeName: node-b, zone",
                "conditions: {ready: false, serving: true, terminating: true}, nodeName: node-b, zone",
            );
        assert_eq!(cluster_ip_picks(&terminating, "node-a"), all);
    }

    /// The Service's own fields do not switch hints on or off (kube-proxy since KEP-4444:
    /// the EndpointSlice controller writes hints only for Services that ask): PreferClose
    /// without hints is every endpoint; hints without PreferClose are used.
    #[test]
    fn the_hints_decide_not_the_services_fields() {
        let asking = |y: &str| {
            y.replace(
                "metadata: {name: web, namespace: shop}",
                "metadata: {name: web, namespace: shop, annotations: {service.kubernetes.io/topology-mode: Auto}}",
            )
            .replace("type: NodePort\n", "type: NodePort\n    trafficDistribution: PreferClose\n")
        };
        assert!(ClusterState::parse(&asking(ZONED)).unwrap().services[0]
            .spec
            .as_ref()
            .is_some_and(|s| s.traffic_distribution.as_deref() == Some("PreferClose")));
        assert_eq!(cluster_ip_picks(&asking(ZONED), "node-a"), vec![2, 3]);
        let no_hints = ZONED
            .replace(", hints: {forZones: [{name: zone-a}]}", "")
            .replace(", hints: {forZones: [{name: zone-b}]}", "");
        assert_eq!(cluster_ip_picks(&asking(&no_hints), "node-a"), vec![2, 3, 4]);
        assert_eq!(cluster_ip_picks(ZONED, "node-a"), vec![2, 3]);
    }

    /// Node hints (PreferSameNode) come first when every ready endpoint has one and one names
    /// this node; otherwise zone hints are considered.
    #[test]
    fn node_hints_come_before_zone_hints() {
        let by_node = ZONED
            .replace(
                "hints: {forZones: [{name: zone-a}]}}\n  - {addresses: [10.244.2.3]",
                "hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}\n  - {addresses: [10.244.2.3]",
            )
            .replace(
                "zone: zone-c, hints: {forZones: [{name: zone-a}]}",
                "zone: zone-c, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-c}]}",
            )
            .replace(
                "hints: {forZones: [{name: zone-b}]}",
                "hints: {forZones: [{name: zone-b}], forNodes: [{name: node-b}]}",
            );
        assert_eq!(cluster_ip_picks(&by_node, "node-a"), vec![2]);
        assert_eq!(cluster_ip_picks(&by_node, "node-b"), vec![4]);
        // No endpoint for this node (node-d, in zone-a by its label): the zone hints.
        let node_d = by_node.replace(
            "{name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}",
            "{name: node-d, labels: {topology.kubernetes.io/zone: zone-a}}",
        );
        assert_eq!(cluster_ip_picks(&node_d, "node-d"), vec![2, 3]);
        // One ready endpoint without a node hint: the zone hints.
        let partial = by_node.replace(", forNodes: [{name: node-b}]", "");
        assert_eq!(cluster_ip_picks(&partial, "node-a"), vec![2, 3]);
    }

    /// Local policies use this node's endpoints, hinted for it or not; the cluster-wide
    /// traffic of the same Service follows the hints.
    #[test]
    fn local_traffic_policies_take_precedence_over_hints() {
        // node-b's endpoint .4 is hinted for zone-a only (topology-mode Auto balances zones
        // that way); node-b is in zone-b, where .5 (node-b, ready now) is hinted.
        let yaml = ZONED
            .replace("    type: NodePort\n", "    type: NodePort\n    externalTrafficPolicy: Local\n")
            .replace("hints: {forZones: [{name: zone-b}]}", "hints: {forZones: [{name: zone-a}]}")
            .replace(
                "{addresses: [10.244.1.5], nodeName: node-b, conditions: {ready: false}}",
                "{addresses: [10.244.2.5], nodeName: node-c, zone: zone-b, hints: {forZones: [{name: zone-b}]}}",
            );
        let (t, _) = compile(&ClusterState::parse(&yaml).unwrap(), "node-b", 16381);
        let node_b = Ipv4Addr::new(192, 168, 77, 2);
        assert_eq!(picks(&t, node_b, 30080, true, true), vec![4], "externalTrafficPolicy Local: the local endpoint");
        assert_eq!(picks(&t, node_b, 30080, true, false), vec![5], "from inside: the cluster policy, zone-b's");
        assert_eq!(picks(&t, Ipv4Addr::new(10, 96, 0, 20), 80, false, false), vec![5]);
        // internalTrafficPolicy Local: the ClusterIP takes the local endpoint, hinted or not.
        let internal = yaml.replace("externalTrafficPolicy: Local", "internalTrafficPolicy: Local");
        let (t, _) = compile(&ClusterState::parse(&internal).unwrap(), "node-b", 16381);
        assert_eq!(picks(&t, Ipv4Addr::new(10, 96, 0, 20), 80, false, false), vec![4]);
        assert_eq!(picks(&t, node_b, 30080, true, true), vec![5], "the NodePort's Cluster policy follows the hints");
    }

    /// A change of this node's zone label alone compiles every Service again.
    #[test]
    fn a_zone_label_change_recompiles() {
        use crate::model::Update;
        let mut model = Model::from_state(ClusterState::parse(ZONED).unwrap());
        let mut c = Compiler::new("node-a", 16381);
        c.compile_all(&model);
        assert_eq!(picks(&c.table().0, Ipv4Addr::new(10, 96, 0, 20), 80, false, false), vec![2, 3]);
        let moved = ZONED.replace("topology.kubernetes.io/zone: zone-a}", "topology.kubernetes.io/zone: zone-b}");
        let dirty = model.apply(Update::State(ClusterState::parse(&moved).unwrap()));
        assert!(dirty.nodes && dirty.services.is_empty(), "{dirty:?}");
        assert!(c.zone_changed(&model));
        c.compile_changed(&model, &dirty.services);
        assert!(!c.zone_changed(&model));
        assert_eq!(picks(&c.table().0, Ipv4Addr::new(10, 96, 0, 20), 80, false, false), vec![4]);
    }

    /// A Service labelled for another proxy gets nothing from vxnat; one labelled with
    /// vxnat's `proxy_name` is handled like an unlabelled one.
    #[test]
    fn services_labelled_for_another_proxy_are_left_alone() {
        let labelled = |name: &str| {
            ZONED.replace(
                "metadata: {name: web, namespace: shop}",
                &format!("metadata: {{name: web, namespace: shop, labels: {{service.kubernetes.io/service-proxy-name: {name}}}}}"),
            )
        };
        let cluster_ip = Ipv4Addr::new(10, 96, 0, 20);
        let (t, problems) = compile(&ClusterState::parse(&labelled("cilium")).unwrap(), "node-a", 16381);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(t.lookup(6, cluster_ip, 80, false).is_none());
        assert!(t.lookup(6, Ipv4Addr::new(192, 168, 77, 1), 30080, true).is_none());
        let model = Model::from_state(ClusterState::parse(&labelled("cilium")).unwrap());
        assert!(node_port_redirects(model.services.values()).is_empty(), "no node-local NodePort rule either");
        // With vxnat's own name set, its Services are handled and others' still left.
        let mut model = Model::from_state(ClusterState::parse(&labelled("vxnat")).unwrap());
        assert!(model.services.is_empty());
        let dirty = model.set_proxy_name(Some("vxnat"));
        assert_eq!(dirty.services, [("shop".to_string(), "web".to_string())].into());
        let mut c = Compiler::new("node-a", 16381);
        c.compile_all(&model);
        assert!(c.table().0.lookup(6, cluster_ip, 80, false).is_some());
        let dirty = model.apply(crate::model::Update::State(ClusterState::parse(&labelled("cilium")).unwrap()));
        c.compile_changed(&model, &dirty.services);
        assert!(c.table().0.lookup(6, cluster_ip, 80, false).is_none(), "relabelled for another proxy: removed");
        // An empty label is no label.
        let (t, _) = compile(&ClusterState::parse(&labelled("\"\"")).unwrap(), "node-a", 16381);
        assert!(t.lookup(6, cluster_ip, 80, false).is_some());
    }
}
