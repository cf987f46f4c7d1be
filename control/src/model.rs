//! The control plane's model of the cluster: Nodes, Services and EndpointSlices by key, fed by
//! a source (the state file, or the Kubernetes API watch) as whole states, single changes or
//! relists, and answering each update with what it touched, so the compiler redoes only that.
//!
//! Both sources produce the same k8s-openapi types; the model does not know which one it has.
//!
//! Services labelled `service.kubernetes.io/service-proxy-name` (non-empty) are another
//! proxy's: the model keeps them apart ([`Model::others`]), so nothing of vxnat sees them (no
//! frontends, NodePort rules or health check servers), as kube-proxy's watch leaves them out
//! with a label selector. Those labelled with vxnat's own `proxy_name` (node.toml) are
//! vxnat's like unlabelled ones. Each Service is logged once when it is left alone, and once
//! when it is vxnat's again.

use crate::state::ClusterState;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};

/// `(namespace, name)`; cluster-scoped objects (Nodes) have an empty namespace.
pub type Key = (String, String);

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service carrying this label (non-empty) is meant for the proxy it names.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The Node label naming its zone (EndpointSlice zone hints name these).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// One object of a kind the model follows.
#[derive(Debug, Clone)]
pub enum Object {
    Node(Box<Node>),
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Service,
    Slice,
}

/// What a source reports.
#[derive(Debug, Clone)]
pub enum Update {
    /// The whole state (the file source, after each change of the file).
    State(ClusterState),
    /// An object was added or modified.
    Apply(Object),
    /// An object was deleted.
    Delete(Object),
    /// Every object of a kind, after a (re)list: objects not listed are gone.
    Relisted(Kind, Vec<Object>),
}

/// What an update touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    pub nodes: bool,
    /// Services (by key) whose object or EndpointSlices changed.
    pub services: BTreeSet<Key>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.nodes && self.services.is_empty()
    }
    pub fn merge(&mut self, o: Dirty) {
        self.nodes |= o.nodes;
        self.services.extend(o.services);
    }
}

/// What vxnat reads of a Service, kept instead of the whole object (a k8s-openapi `Service`
/// is a few KiB in memory; this is what compiling it needs, as the API spelled it, so errors
/// still name the field).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: String,
    /// Empty when the object had none (reported at compile time).
    pub name: String,
    pub has_spec: bool,
    pub type_: Option<String>,
    pub cluster_ip: Option<String>,
    pub external_ips: Vec<String>,
    /// `status.loadBalancer.ingress[i].ip` (None for hostname-only entries).
    pub lb_ips: Vec<Option<String>>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub session_affinity: Option<String>,
    pub affinity_timeout: Option<i32>,
    /// `spec.healthCheckNodePort`, as the API gave it (checked where it is used:
    /// `crate::healthcheck`).
    pub health_check_node_port: Option<i32>,
    /// `spec.loadBalancerSourceRanges`, as the API gave them (parsed at compile time).
    pub lb_source_ranges: Vec<String>,
    pub ports: Vec<ServicePortView>,
    /// The `service.kubernetes.io/service-proxy-name` label; None when absent or empty.
    pub proxy_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePortView {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// What vxnat reads of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceView {
    pub address_type: String,
    pub ports: Vec<(Option<String>, Option<String>, Option<i32>)>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointView {
    /// The first address (the one kube-proxy uses).
    pub address: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    /// `hints.forZones[].name`: the zones whose nodes should send to this endpoint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`: the nodes that should send to this endpoint.
    pub node_hints: Vec<String>,
}

impl From<&Service> for ServiceView {
    fn from(s: &Service) -> ServiceView {
        let spec = s.spec.as_ref();
        ServiceView {
            namespace: s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: s.metadata.name.clone().unwrap_or_default(),
            has_spec: spec.is_some(),
            type_: spec.and_then(|x| x.type_.clone()),
            cluster_ip: spec.and_then(|x| x.cluster_ip.clone()),
            external_ips: spec.and_then(|x| x.external_ips.clone()).unwrap_or_default(),
            lb_ips: s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .map(|v| v.iter().map(|g| g.ip.clone()).collect())
                .unwrap_or_default(),
            external_traffic_policy: spec.and_then(|x| x.external_traffic_policy.clone()),
            internal_traffic_policy: spec.and_then(|x| x.internal_traffic_policy.clone()),
            session_affinity: spec.and_then(|x| x.session_affinity.clone()),
            affinity_timeout: spec
                .and_then(|x| x.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            health_check_node_port: spec.and_then(|x| x.health_check_node_port),
            lb_source_ranges: spec.and_then(|x| x.load_balancer_source_ranges.clone()).unwrap_or_default(),
            ports: spec
                .and_then(|x| x.ports.as_ref())
                .map(|ps| {
                    ps.iter()
                        .map(|p| ServicePortView {
                            name: p.name.clone(),
                            protocol: p.protocol.clone(),
                            port: p.port,
                            node_port: p.node_port,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            proxy_name: s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(PROXY_NAME_LABEL))
                .filter(|v| !v.is_empty())
                .cloned(),
        }
    }
}

impl From<&EndpointSlice> for SliceView {
    fn from(s: &EndpointSlice) -> SliceView {
        SliceView {
            address_type: s.address_type.clone(),
            ports: s.ports.iter().flatten().map(|p| (p.name.clone(), p.protocol.clone(), p.port)).collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    let c = e.conditions.as_ref();
                    let h = e.hints.as_ref();
                    EndpointView {
                        address: e.addresses.first().cloned(),
                        ready: c.and_then(|c| c.ready),
                        serving: c.and_then(|c| c.serving),
                        terminating: c.and_then(|c| c.terminating),
                        node_name: e.node_name.clone(),
                        zone_hints: h
                            .and_then(|h| h.for_zones.as_ref())
                            .map(|z| z.iter().map(|z| z.name.clone()).collect())
                            .unwrap_or_default(),
                        node_hints: h
                            .and_then(|h| h.for_nodes.as_ref())
                            .map(|n| n.iter().map(|n| n.name.clone()).collect())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub nodes: BTreeMap<String, Node>,
    /// The Services vxnat handles.
    pub services: BTreeMap<Key, ServiceView>,
    /// The Services labelled for another proxy (see the module docs), kept so that a change
    /// of the label or of `proxy_name` brings them back without a relist.
    pub others: BTreeMap<Key, ServiceView>,
    /// vxnat's own `service.kubernetes.io/service-proxy-name` (`proxy_name` in node.toml).
    proxy_name: Option<String>,
    pub slices: BTreeMap<Key, SliceView>,
    /// The Service each slice belongs to.
    slice_owner: BTreeMap<Key, Key>,
    /// Service key -> keys of its EndpointSlices (by the `kubernetes.io/service-name` label).
    slices_of: BTreeMap<Key, BTreeSet<Key>>,
}

fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, namespaced: bool) -> Key {
    let ns = if namespaced { m.namespace.clone().unwrap_or_else(|| "default".into()) } else { String::new() };
    (ns, m.name.clone().unwrap_or_default())
}

/// The Service an EndpointSlice belongs to.
fn owner(s: &EndpointSlice) -> Option<Key> {
    let name = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((s.metadata.namespace.clone().unwrap_or_else(|| "default".into()), name.clone()))
}

impl Model {
    pub fn from_state(state: ClusterState) -> Model {
        let mut m = Model::default();
        m.apply(Update::State(state));
        m
    }

    /// The `topology.kubernetes.io/zone` label of Node `node`; None when it has none (or an
    /// empty one, which no zone hint can name), or the Node is unknown.
    pub fn zone_of(&self, node: &str) -> Option<&str> {
        let labels = self.nodes.get(node)?.metadata.labels.as_ref()?;
        labels.get(ZONE_LABEL).map(String::as_str).filter(|z| !z.is_empty())
    }

    /// Sets vxnat's own proxy name (None or empty: none, and every labelled Service is
    /// another proxy's); returns the Services that moved between [`Model::services`] and
    /// [`Model::others`].
    pub fn set_proxy_name(&mut self, name: Option<&str>) -> Dirty {
        let mut d = Dirty::default();
        let name = name.filter(|n| !n.is_empty()).map(str::to_string);
        if name == self.proxy_name {
            return d;
        }
        self.proxy_name = name;
        let keys: Vec<Key> = self.services.keys().chain(self.others.keys()).cloned().collect();
        for k in keys {
            if let Some(v) = self.services.get(&k).or_else(|| self.others.get(&k)).cloned() {
                self.place(k, v, &mut d);
            }
        }
        d
    }

    /// Whether vxnat handles a Service with this view.
    fn handles(&self, v: &ServiceView) -> bool {
        v.proxy_name.is_none() || v.proxy_name == self.proxy_name
    }

    /// Files a Service under `services` or `others`; marks it dirty when what vxnat handles
    /// changed.
    fn place(&mut self, key: Key, v: ServiceView, d: &mut Dirty) {
        if self.handles(&v) {
            if self.others.remove(&key).is_some() {
                tracing::info!(
                    "Service {}/{}: now handled by vxnat (metadata.labels[{PROXY_NAME_LABEL}]: {})",
                    key.0,
                    key.1,
                    v.proxy_name.as_deref().unwrap_or("none")
                );
            }
            if self.services.get(&key) != Some(&v) {
                self.services.insert(key.clone(), v);
                d.services.insert(key);
            }
        } else {
            if self.services.remove(&key).is_some() {
                d.services.insert(key.clone());
            }
            let label = v.proxy_name.clone().unwrap_or_default();
            if self.others.insert(key.clone(), v).is_none() {
                // kube-proxy says nothing (its watch never sees such a Service); once, at
                // info, so an operator can tell why a Service has no frontends here.
                tracing::info!(
                    "Service {}/{}: metadata.labels[{PROXY_NAME_LABEL}]: {label:?} (vxnat's proxy_name: {}); left to that proxy",
                    key.0,
                    key.1,
                    self.proxy_name.as_deref().map(|n| format!("{n:?}")).unwrap_or_else(|| "none".into())
                );
            }
        }
    }

    /// The EndpointSlices of a Service.
    pub fn slices_of(&self, service: &Key) -> Vec<&SliceView> {
        self.slices_of.get(service).into_iter().flatten().filter_map(|k| self.slices.get(k)).collect()
    }

    /// Applies an update; returns what changed (an object re-sent unchanged touches nothing).
    pub fn apply(&mut self, u: Update) -> Dirty {
        let mut d = Dirty::default();
        match u {
            Update::State(s) => {
                d.merge(self.relist(Kind::Node, s.nodes.into_iter().map(|n| Object::Node(Box::new(n))).collect()));
                d.merge(
                    self.relist(Kind::Service, s.services.into_iter().map(|n| Object::Service(Box::new(n))).collect()),
                );
                d.merge(
                    self.relist(
                        Kind::Slice,
                        s.endpoint_slices.into_iter().map(|n| Object::Slice(Box::new(n))).collect(),
                    ),
                );
            }
            Update::Apply(o) => self.upsert(o, &mut d),
            Update::Delete(o) => self.delete(&o, &mut d),
            Update::Relisted(kind, objs) => d = self.relist(kind, objs),
        }
        d
    }

    fn relist(&mut self, kind: Kind, objs: Vec<Object>) -> Dirty {
        let mut d = Dirty::default();
        let mut listed = BTreeSet::new();
        for o in objs {
            listed.insert(Self::key_of(&o));
            self.upsert(o, &mut d);
        }
        let gone: Vec<Key> = match kind {
            Kind::Node => {
                self.nodes.keys().map(|n| (String::new(), n.clone())).filter(|k| !listed.contains(k)).collect()
            }
            Kind::Service => {
                self.services.keys().chain(self.others.keys()).filter(|k| !listed.contains(*k)).cloned().collect()
            }
            Kind::Slice => self.slices.keys().filter(|k| !listed.contains(*k)).cloned().collect(),
        };
        for k in gone {
            self.remove(kind, &k, &mut d);
        }
        d
    }

    fn key_of(o: &Object) -> Key {
        match o {
            Object::Node(n) => meta_key(&n.metadata, false),
            Object::Service(s) => meta_key(&s.metadata, true),
            Object::Slice(s) => meta_key(&s.metadata, true),
        }
    }

    fn upsert(&mut self, o: Object, d: &mut Dirty) {
        let key = Self::key_of(&o);
        match o {
            Object::Node(n) => {
                if self.nodes.get(&key.1) != Some(&*n) {
                    self.nodes.insert(key.1, *n);
                    d.nodes = true;
                }
            }
            Object::Service(s) => self.place(key, ServiceView::from(&*s), d),
            Object::Slice(s) => {
                let v = SliceView::from(&*s);
                let new_owner = owner(&s);
                if self.slices.get(&key) == Some(&v) && self.slice_owner.get(&key) == new_owner.as_ref() {
                    return;
                }
                self.slices.insert(key.clone(), v);
                if let Some(o) = self.slice_owner.remove(&key) {
                    if Some(&o) != new_owner.as_ref() {
                        self.unlink(&o, &key);
                    }
                    d.services.insert(o);
                }
                if let Some(o) = new_owner {
                    self.slice_owner.insert(key.clone(), o.clone());
                    self.slices_of.entry(o.clone()).or_default().insert(key);
                    d.services.insert(o);
                }
            }
        }
    }

    fn unlink(&mut self, service: &Key, slice: &Key) {
        if let Some(set) = self.slices_of.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_of.remove(service);
            }
        }
    }

    fn delete(&mut self, o: &Object, d: &mut Dirty) {
        let kind = match o {
            Object::Node(_) => Kind::Node,
            Object::Service(_) => Kind::Service,
            Object::Slice(_) => Kind::Slice,
        };
        self.remove(kind, &Self::key_of(o), d);
    }

    fn remove(&mut self, kind: Kind, key: &Key, d: &mut Dirty) {
        match kind {
            Kind::Node => {
                if self.nodes.remove(&key.1).is_some() {
                    d.nodes = true;
                }
            }
            Kind::Service => {
                self.others.remove(key);
                if self.services.remove(key).is_some() {
                    d.services.insert(key.clone());
                }
            }
            Kind::Slice => {
                if self.slices.remove(key).is_some() {
                    if let Some(o) = self.slice_owner.remove(key) {
                        self.unlink(&o, key);
                        d.services.insert(o);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> ClusterState {
        ClusterState::parse(yaml).expect("valid state")
    }

    const BASE: &str = r#"
kind: List
items:
- {kind: Node, apiVersion: v1, metadata: {name: node-a}, spec: {podCIDR: 10.244.0.0/24}}
- {kind: Service, apiVersion: v1, metadata: {name: web, namespace: shop}, spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}}
- {kind: Service, apiVersion: v1, metadata: {name: db, namespace: shop}, spec: {clusterIP: 10.96.0.21, ports: [{port: 5432}]}}
- kind: EndpointSlice
  apiVersion: discovery.k8s.io/v1
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.0.5]}]
"#;

    fn key(ns: &str, n: &str) -> Key {
        (ns.into(), n.into())
    }

    #[test]
    fn a_whole_state_diffs_to_the_services_it_touched() {
        let mut m = Model::from_state(state(BASE));
        assert_eq!(m.slices_of(&key("shop", "web")).len(), 1);
        // Same state again: nothing.
        assert!(m.apply(Update::State(state(BASE))).is_empty());
        // One endpoint added to web's slice: web only.
        let changed =
            BASE.replace("[{addresses: [10.244.0.5]}]", "[{addresses: [10.244.0.5]}, {addresses: [10.244.1.5]}]");
        let d = m.apply(Update::State(state(&changed)));
        assert_eq!(d, Dirty { nodes: false, services: [key("shop", "web")].into() });
        // db removed: db only; and it is gone from the model.
        let without_db = changed.replace(
            "- {kind: Service, apiVersion: v1, metadata: {name: db, namespace: shop}, spec: {clusterIP: 10.96.0.21, ports: [{port: 5432}]}}\n",
            "",
        );
        let d = m.apply(Update::State(state(&without_db)));
        assert_eq!(d.services, [key("shop", "db")].into());
        assert!(!m.services.contains_key(&key("shop", "db")));
    }

    #[test]
    fn slice_events_touch_their_service_and_relists_remove_what_is_gone() {
        let mut m = Model::from_state(state(BASE));
        let s = state(BASE).endpoint_slices[0].clone();
        // The slice moves to another Service (label changed): both are touched.
        let mut moved = s.clone();
        moved.metadata.labels.as_mut().map(|l| l.insert(SERVICE_NAME_LABEL.into(), "db".into()));
        let d = m.apply(Update::Apply(Object::Slice(Box::new(moved.clone()))));
        assert_eq!(d.services, [key("shop", "web"), key("shop", "db")].into());
        assert!(m.slices_of(&key("shop", "web")).is_empty());
        assert_eq!(m.slices_of(&key("shop", "db")).len(), 1);
        let d = m.apply(Update::Delete(Object::Slice(Box::new(moved))));
        assert_eq!(d.services, [key("shop", "db")].into());
        assert!(m.slices.is_empty());
        // A relist of Services that no longer lists db removes it.
        let web = state(BASE).services[0].clone();
        let d = m.apply(Update::Relisted(Kind::Service, vec![Object::Service(Box::new(web))]));
        assert_eq!(d.services, [key("shop", "db")].into());
        assert_eq!(m.services.len(), 1);
        // A Node relist that drops nothing changes nothing; an empty one drops node-a.
        let n = state(BASE).nodes[0].clone();
        assert!(m.apply(Update::Relisted(Kind::Node, vec![Object::Node(Box::new(n))])).is_empty());
        assert!(m.apply(Update::Relisted(Kind::Node, vec![])).nodes);
        assert!(m.nodes.is_empty());
    }

    /// A Service labelled for another proxy is kept apart and touches nothing; its label
    /// changing, or vxnat's `proxy_name`, moves it; delete and relist reach it there too.
    #[test]
    fn services_labelled_for_another_proxy_are_kept_apart() {
        let mut m = Model::from_state(state(BASE));
        let mut web = state(BASE).services[0].clone();
        web.metadata.labels = Some([(PROXY_NAME_LABEL.to_string(), "other".to_string())].into());
        let d = m.apply(Update::Apply(Object::Service(Box::new(web.clone()))));
        assert_eq!(d.services, [key("shop", "web")].into(), "it was vxnat's: its frontends go");
        assert!(!m.services.contains_key(&key("shop", "web")) && m.others.contains_key(&key("shop", "web")));
        assert!(m.apply(Update::Apply(Object::Service(Box::new(web.clone())))).is_empty());
        // vxnat's own name set: still another proxy's; set to "other": vxnat's.
        assert!(m.set_proxy_name(Some("vxnat")).is_empty());
        assert_eq!(m.set_proxy_name(Some("other")).services, [key("shop", "web")].into());
        assert!(m.services.contains_key(&key("shop", "web")) && m.others.is_empty());
        assert_eq!(m.set_proxy_name(Some("")).services, [key("shop", "web")].into(), "empty is none");
        // Deleted, and relisted away, from where it is kept.
        m.apply(Update::Delete(Object::Service(Box::new(web.clone()))));
        assert!(m.others.is_empty() && !m.services.contains_key(&key("shop", "web")));
        m.apply(Update::Apply(Object::Service(Box::new(web))));
        m.apply(Update::Relisted(Kind::Service, vec![]));
        assert!(m.others.is_empty() && m.services.is_empty());
    }
}
