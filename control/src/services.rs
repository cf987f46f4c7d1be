//! Compiles Services and EndpointSlices into this node's `ServiceTable`, with kube-proxy's
//! semantics: endpoint ports come from the EndpointSlice's ports matched by the Service port's
//! name and protocol (so named targetPorts resolve as kube-proxy resolves them); conditions
//! default as the API says (`ready` absent = true, `serving` absent = `ready`, `terminating`
//! absent = false); an endpoint is local when its `nodeName` is this node.
//!
//! One broken Service does not take the others down: it is reported by object and field, and
//! its last good version (if it had one) keeps serving.
//!
//! Compilation is per Service and cached (`Compiler`): after a change only the Services it
//! touched are compiled again, and the table is assembled from the cache by sharing each
//! port's compiled form (Maglev tables included) rather than copying it. A full compile spreads
//! the Services over the machine's cores.

use crate::model::{Key, Model, ServiceView, SliceView};
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
    /// The port's endpoint sets could not be built (the dataplane's own message, free-form:
    /// `ServicePort::new` reports a `String`).
    #[error("{0}")]
    Endpoints(String),
}

fn proto_num(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        _ => None,
    }
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
    /// `Service ns/name: spec.ports[i]`, for conflict reports.
    field: String,
    frontends: Vec<(Frontend, FrontendKind)>,
    node_ports: Vec<(u8, u16)>,
}

/// A compiled Service: its ports.
#[derive(Debug, Clone, Default)]
pub struct CompiledService {
    ports: Vec<CompiledPort>,
}

/// The per-Service cache and the table it assembles.
#[derive(Debug)]
pub struct Compiler {
    node: String,
    maglev_size: usize,
    cache: BTreeMap<Key, CompiledService>,
    /// The current problem of each Service that has one.
    problems: BTreeMap<Key, String>,
}

impl Compiler {
    pub fn new(node: &str, maglev_size: usize) -> Compiler {
        Compiler { node: node.to_string(), maglev_size, cache: BTreeMap::new(), problems: BTreeMap::new() }
    }

    /// Every Service's current problem, in key order.
    pub fn problems(&self) -> Vec<String> {
        self.problems.values().cloned().collect()
    }

    /// Every Service's current problem with the Service's key, in key order.
    pub fn keyed_problems(&self) -> impl Iterator<Item = (&Key, &String)> {
        self.problems.iter()
    }

    /// Compiles every Service of `model`, on all cores. Returns the problems found.
    pub fn compile_all(&mut self, model: &Model) -> Vec<String> {
        self.cache.clear();
        self.problems.clear();
        let keys: Vec<&Key> = model.services.keys().collect();
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(keys.len().max(1));
        let chunk = keys.len().div_ceil(threads).max(1);
        let (node, size) = (&self.node, self.maglev_size);
        let results: Vec<Vec<(Key, Result<CompiledService, Error>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = keys
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|k| {
                                ((*k).clone(), compile_service(&model.services[*k], &model.slices_of(k), node, size))
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
    /// cache). A Service that no longer compiles keeps its last good version. Returns the
    /// problems found.
    pub fn compile_changed<'a>(&mut self, model: &Model, dirty: impl IntoIterator<Item = &'a Key>) -> Vec<String> {
        let mut problems = Vec::new();
        for k in dirty {
            self.problems.remove(k);
            let Some(svc) = model.services.get(k) else {
                self.cache.remove(k);
                continue;
            };
            match compile_service(svc, &model.slices_of(k), &self.node, self.maglev_size) {
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
            for p in &c.ports {
                let idx = table.add_shared_port(p.port.clone());
                for &(f, kind) in &p.frontends {
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

/// Compiles one Service with its EndpointSlices.
pub fn compile_service(
    svc: &ServiceView,
    slices: &[&SliceView],
    node: &str,
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
            continue; // SCTP: not handled by vxnat
        };
        let port = u16::try_from(sp.port).map_err(|_| Error::Port { what: what.clone(), index: pi, value: sp.port })?;
        let mut endpoints = Vec::new();
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
                endpoints.push(Endpoint { ip: addr, port: ep_port, ready, serving, terminating, local });
            }
        }
        // Deduplicate (an endpoint may appear in several slices during updates).
        endpoints.sort_by_key(|e| (e.ip, e.port));
        endpoints.dedup_by_key(|e| (e.ip, e.port));
        let port_name = sp.name.clone().unwrap_or_else(|| port.to_string());
        let compiled = ServicePort::new(
            format!("{ns}/{name}:{port_name}"),
            &endpoints,
            external_local,
            internal_local,
            affinity_ns,
            maglev_size,
        )
        .map_err(Error::Endpoints)?;
        let mut p = CompiledPort { port: Arc::new(compiled), field, frontends: Vec::new(), node_ports: Vec::new() };
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
}
