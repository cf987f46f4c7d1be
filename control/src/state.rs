//! The cluster state as Kubernetes objects: what `kubectl get nodes,services,endpointslices -A
//! -o yaml` prints (a `List`), or several YAML documents, each a `List` or a single object.
//! Parsed into k8s-openapi's types, the same ones the Kubernetes API watch (`source`) produces.
//!
//! Errors name the object and the field: `Node node-b: metadata.annotations[...]: ...`.

use core::net::Ipv4Addr;
use dataplane::wire::{Ipv4Cidr, MacAddr};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use std::path::PathBuf;

pub const ANNOTATION_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANNOTATION_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const ANNOTATION_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";

/// Why the cluster state or a Node could not be read. `what` names the object
/// (`Service shop/web`, or `Node in document 2` when it has no name), `node` the Node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state file could not be read.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The state file's content is invalid (`source` says where).
    #[error("{}: {source}", path.display())]
    InFile { path: PathBuf, source: Box<Error> },
    /// A YAML document (numbered from 1) does not parse.
    #[error("document {doc}: {source}")]
    Document { doc: usize, source: serde_yaml_ng::Error },
    /// A `List`'s `items` is not a sequence.
    #[error("{what}: items: not a list")]
    ItemsNotList { what: String },
    /// An object has no `kind`.
    #[error("{what}: kind: missing")]
    KindMissing { what: String },
    /// An object does not deserialize into its type, as a whole.
    #[error("{what}: {source}")]
    Object { what: String, source: serde_yaml_ng::Error },
    /// An object does not deserialize into its type: `path` is the field
    /// (`spec.ports[0].port`).
    #[error("{what}: {path}: {source}")]
    Field { what: String, path: String, source: serde_yaml_ng::Error },
    /// A Node without a name.
    #[error("Node: metadata.name: missing")]
    NodeNameMissing,
    #[error("Node {node}: spec: missing")]
    NodeSpecMissing { node: String },
    #[error("Node {node}: spec.podCIDR: missing (flannel needs one per node)")]
    PodCidrMissing { node: String },
    #[error("Node {node}: spec.podCIDR: {value:?} is not an IPv4 CIDR")]
    PodCidr { node: String, value: String },
    /// flannel's public-ip annotation is not an IPv4 address.
    #[error("Node {node}: metadata.annotations[{ANNOTATION_PUBLIC_IP}]: {value:?} is not an IPv4 address")]
    PublicIp { node: String, value: String },
    /// Neither an IPv4 InternalIP nor flannel's public-ip annotation.
    #[error("Node {node}: status.addresses: no IPv4 InternalIP (and no {ANNOTATION_PUBLIC_IP} annotation)")]
    NoInternalIp { node: String },
    #[error("Node {node}: status.addresses: bad InternalIP")]
    BadInternalIp { node: String },
    /// flannel's backend-data annotation is not the JSON flannel writes.
    #[error("Node {node}: metadata.annotations[{ANNOTATION_BACKEND_DATA}]: {source}")]
    BackendData { node: String, source: serde_json::Error },
    /// The backend-data annotation's VtepMAC is not a MAC address.
    #[error("Node {node}: metadata.annotations[{ANNOTATION_BACKEND_DATA}]: VtepMAC {value:?} is not a MAC address")]
    VtepMac { node: String, value: String },
}

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}

fn describe(v: &serde_yaml_ng::Value, doc: usize) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("object");
    let meta = v.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str());
    let ns = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str());
    match (ns, name) {
        (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
        (None, Some(n)) => format!("{kind} {n}"),
        _ => format!("{kind} in document {doc}"),
    }
}

/// Deserializes one object into its k8s-openapi type; an error names the field by its path
/// (`Service shop/web: spec.ports[0].port: invalid type: ...`).
fn typed<T: serde::de::DeserializeOwned>(item: serde_yaml_ng::Value, what: &str) -> Result<T, Error> {
    serde_path_to_error::deserialize(item).map_err(|e| {
        let path = e.path().to_string();
        let source = e.into_inner();
        let what = what.to_string();
        if path == "." {
            Error::Object { what, source }
        } else {
            Error::Field { what, path, source }
        }
    })
}

impl ClusterState {
    pub fn parse(text: &str) -> Result<ClusterState, Error> {
        let mut state = ClusterState::default();
        for (doc, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = serde_yaml_ng::Value::deserialize(de).map_err(|e| Error::Document { doc: doc + 1, source: e })?;
            if v.is_null() {
                continue;
            }
            let items: Vec<serde_yaml_ng::Value> = match v.get("kind").and_then(|k| k.as_str()) {
                Some("List") | Some("NodeList") | Some("ServiceList") | Some("EndpointSliceList") => {
                    match v.get("items") {
                        Some(serde_yaml_ng::Value::Sequence(s)) => s.clone(),
                        Some(serde_yaml_ng::Value::Null) | None => Vec::new(),
                        Some(_) => return Err(Error::ItemsNotList { what: describe(&v, doc + 1) }),
                    }
                }
                _ => vec![v],
            };
            for item in items {
                let what = describe(&item, doc + 1);
                let kind = item.get("kind").and_then(|k| k.as_str()).map(str::to_string);
                match kind.as_deref() {
                    Some("Node") => state.nodes.push(typed(item, &what)?),
                    Some("Service") => state.services.push(typed(item, &what)?),
                    Some("EndpointSlice") => state.endpoint_slices.push(typed(item, &what)?),
                    // Other kinds (Endpoints, Pods, ...) are not vxnat's business.
                    Some(_) => {}
                    None => return Err(Error::KindMissing { what }),
                }
            }
        }
        Ok(state)
    }

    pub fn load(path: &std::path::Path) -> Result<ClusterState, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read { path: path.to_path_buf(), source: e })?;
        Self::parse(&text).map_err(|e| Error::InFile { path: path.to_path_buf(), source: Box::new(e) })
    }
}

/// What vxnat needs from a Node, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub pod_cidr: Ipv4Cidr,
    /// Underlay address: flannel's public-ip annotation, else the InternalIP.
    pub node_ip: Ipv4Addr,
    /// VtepMAC from flannel's backend-data annotation, when present.
    pub vtep_mac: Option<MacAddr>,
    /// VNI from backend-data, when present.
    pub vni: Option<u32>,
}

#[derive(Deserialize)]
struct BackendData {
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC")]
    vtep_mac: Option<String>,
}

impl NodeView {
    pub fn from_node(n: &Node) -> Result<NodeView, Error> {
        let name = n.metadata.name.clone().ok_or(Error::NodeNameMissing)?;
        let node = || name.clone();
        let spec = n.spec.as_ref().ok_or_else(|| Error::NodeSpecMissing { node: node() })?;
        let cidr_s = spec.pod_cidr.as_deref().ok_or_else(|| Error::PodCidrMissing { node: node() })?;
        let pod_cidr: Ipv4Cidr =
            cidr_s.parse().map_err(|_| Error::PodCidr { node: node(), value: cidr_s.to_string() })?;
        let ann = n.metadata.annotations.as_ref();
        let public = ann.and_then(|a| a.get(ANNOTATION_PUBLIC_IP));
        let node_ip = match public {
            Some(p) => p.parse().map_err(|_| Error::PublicIp { node: node(), value: p.clone() })?,
            None => {
                let addrs = n.status.as_ref().and_then(|s| s.addresses.as_ref());
                let internal = addrs
                    .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP" && a.address.parse::<Ipv4Addr>().is_ok()))
                    .ok_or_else(|| Error::NoInternalIp { node: node() })?;
                internal.address.parse().map_err(|_| Error::BadInternalIp { node: node() })?
            }
        };
        let (vtep_mac, vni) = match ann.and_then(|a| a.get(ANNOTATION_BACKEND_DATA)) {
            None => (None, None),
            Some(raw) => {
                let bd: BackendData =
                    serde_json::from_str(raw).map_err(|e| Error::BackendData { node: node(), source: e })?;
                let mac = match bd.vtep_mac {
                    Some(m) => Some(m.parse::<MacAddr>().map_err(|_| Error::VtepMac { node: node(), value: m })?),
                    None => None,
                };
                (mac, bd.vni)
            }
        };
        Ok(NodeView { name, pod_cidr, node_ip, vtep_mac, vni })
    }
}

/// A stable, locally administered VTEP MAC for a node without a VtepMAC annotation (vxnat's
/// own node before it publishes one): derived from the node name, so restarts keep it.
pub fn derived_vtep_mac(node: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let b = h.to_be_bytes();
    MacAddr([0x0e, b[0], b[1], b[2], b[3], b[4]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata:
    name: node-a
    annotations:
      flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"0e:a1:00:00:00:0a"}'
      flannel.alpha.coreos.com/backend-type: vxlan
      flannel.alpha.coreos.com/public-ip: 192.168.50.1
  spec:
    podCIDR: 10.244.0.0/24
    podCIDRs: [10.244.0.0/24]
  status:
    addresses:
    - {type: InternalIP, address: 192.168.50.1}
    - {type: Hostname, address: node-a}
- apiVersion: v1
  kind: Node
  metadata: {name: node-b}
  spec: {podCIDR: 10.244.1.0/24}
  status:
    addresses: [{type: InternalIP, address: 192.168.50.2}]
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    clusterIP: 10.96.0.10
    ports: [{port: 80, targetPort: 8080, protocol: TCP}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.1.5], conditions: {ready: true}}]
"#;

    #[test]
    fn kubectl_list_output_loads_as_is() {
        let s = ClusterState::parse(LIST).unwrap();
        assert_eq!((s.nodes.len(), s.services.len(), s.endpoint_slices.len()), (2, 1, 1));
        let a = NodeView::from_node(&s.nodes[0]).unwrap();
        assert_eq!(a.node_ip, Ipv4Addr::new(192, 168, 50, 1));
        assert_eq!(a.vtep_mac, Some("0e:a1:00:00:00:0a".parse().unwrap()));
        assert_eq!(a.vni, Some(1));
        let b = NodeView::from_node(&s.nodes[1]).unwrap();
        assert_eq!((b.node_ip, b.vtep_mac), (Ipv4Addr::new(192, 168, 50, 2), None));
    }

    #[test]
    fn several_documents_load_too() {
        let docs = "kind: Node\napiVersion: v1\nmetadata: {name: x}\nspec: {podCIDR: 10.244.3.0/24}\n---\n---\nkind: ConfigMap\napiVersion: v1\nmetadata: {name: y}\n";
        let s = ClusterState::parse(docs).unwrap();
        assert_eq!(s.nodes.len(), 1);
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let bad = LIST.replace("10.244.1.0/24", "10.244.1.0/99");
        let s = ClusterState::parse(&bad).unwrap();
        let e = NodeView::from_node(&s.nodes[1]).unwrap_err().to_string();
        assert_eq!(e, "Node node-b: spec.podCIDR: \"10.244.1.0/99\" is not an IPv4 CIDR");
        let bad = LIST.replace("\"VtepMAC\":\"0e:a1:00:00:00:0a\"", "\"VtepMAC\":\"nope\"");
        let s = ClusterState::parse(&bad).unwrap();
        let e = NodeView::from_node(&s.nodes[0]).unwrap_err().to_string();
        assert!(
            e.starts_with("Node node-a: metadata.annotations[flannel.alpha.coreos.com/backend-data]: VtepMAC"),
            "{e}"
        );
        let e = ClusterState::parse("kind: Node\nmetadata: {name: z}\nspec: {podCIDR: 7}\n").unwrap_err().to_string();
        assert!(e.starts_with("Node z:"), "{e}");
        let e = ClusterState::parse("items: [1]\nkind: List\n").unwrap_err().to_string();
        assert!(e.contains("kind: missing"), "{e}");
    }

    #[test]
    fn derived_vtep_mac_is_stable_and_local() {
        let m = derived_vtep_mac("node-a");
        assert_eq!(m, derived_vtep_mac("node-a"));
        assert_ne!(m, derived_vtep_mac("node-b"));
        assert!(m.is_unicast() && m.0[0] & 2 == 2);
    }
}
