//! Which other Nodes this node reaches: chosen object by object, with a last good state, so one
//! bad Node never keeps the tables from being built (the incident of issue 17: a Node whose
//! podCIDR overlapped node-b's made every later compile fail, and a new Service next to it
//! never answered).
//!
//! Contract: [`select`] is pure (it reads nothing from the system). From this node, the cluster
//! CIDR, the model's Nodes and the remotes of the tables in use (the last good ones), it returns
//! remotes the tables builder always accepts (the checks of
//! `dataplane::tables::TablesBuilder::remote`, made here first: every podCIDR inside the
//! cluster CIDR and overlapping neither this node's nor another remote's, no address twice or
//! this node's, unicast VTEP MACs), and one [`Problem`] per Node left out or held back, naming
//! the Node and the field.
//!
//! - A Node that does not read (no podCIDR, an unparsable one, a bad annotation) or that
//!   conflicts is left out; if it was in the tables, its last good version stays instead, as a
//!   Service that stops compiling keeps its last good version.
//! - Who wins a conflict (two Nodes claiming one range or address): this node's own Node,
//!   always; then Nodes in the tables now, unchanged; then Nodes in them whose object changed;
//!   then Nodes new to the tables; within each, the older Node (`metadata.creationTimestamp`),
//!   then name order. So the Node that appears with a range another Node already uses is the
//!   one left out, and after a restart (no last good state yet) the older one still wins.
//! - This node's own Node is never a remote. Its podCIDR and address are wired into the host
//!   port and the XDP program at start: a change (or a version that does not read) is reported
//!   and the start-time values stay until vxnat restarts.

use crate::skips::Problem;
use crate::state::{derived_vtep_mac, NodeView, ANNOTATION_BACKEND_DATA, ANNOTATION_PUBLIC_IP};
use dataplane::wire::Ipv4Cidr;
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;

/// The kind the problems are reported under.
pub const KIND: &str = crate::skips::NODE;

/// The remotes chosen, in the order they won, and the Nodes left out or held back.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub remotes: Vec<NodeView>,
    pub problems: Vec<Problem>,
}

/// A Node as a candidate for the tables.
struct Candidate<'a> {
    /// 0: in the tables unchanged, 1: in the tables but changed, 2: new.
    tier: u8,
    created: Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    name: &'a str,
    node: &'a Node,
    current: Result<NodeView, String>,
    last: Option<&'a NodeView>,
}

/// Chooses the remotes among `nodes` (the model's, by name) for node `me`; `last_good` are the
/// remotes of the tables in use.
pub fn select(me: &NodeView, cluster: Ipv4Cidr, nodes: &BTreeMap<String, Node>, last_good: &[NodeView]) -> Selection {
    let mut problems = Vec::new();
    let mut candidates = Vec::new();
    let last_good: std::collections::HashMap<&str, &NodeView> =
        last_good.iter().map(|v| (v.name.as_str(), v)).collect();
    for (key, node) in nodes {
        let name = node.metadata.name.as_deref().unwrap_or(key.as_str());
        let current = NodeView::from_node(node).map_err(|e| e.to_string());
        if name == me.name {
            let why = match &current {
                Ok(v) if v.pod_cidr != me.pod_cidr || v.node_ip != me.node_ip => Some(format!(
                    "Node {name}: spec.podCIDR or address: changed to {} at {} (from {} at {})",
                    v.pod_cidr, v.node_ip, me.pod_cidr, me.node_ip
                )),
                Ok(_) => None,
                Err(e) => Some(e.clone()),
            };
            if let Some(why) = why {
                problems.push(Problem::new(KIND, name, format!("{why}; this node keeps its own until vxnat restarts")));
            }
            continue;
        }
        let last = last_good.get(name).copied();
        let tier = match (last, &current) {
            (Some(l), Ok(c)) if l == c => 0,
            (Some(_), _) => 1,
            (None, _) => 2,
        };
        candidates.push(Candidate {
            tier,
            created: node.metadata.creation_timestamp.as_ref(),
            name,
            node,
            current,
            last,
        });
    }
    // Older first, and a Node without a creation time after those with one.
    candidates.sort_by(|a, b| {
        (a.tier, a.created.is_none(), a.created, a.name).cmp(&(b.tier, b.created.is_none(), b.created, b.name))
    });
    let mut taken = Taken::default();
    for c in candidates {
        let why = match &c.current {
            Ok(v) => match conflict(me, cluster, &taken, c.node, v) {
                None => {
                    taken.add(v.clone());
                    continue;
                }
                Some(why) => why,
            },
            Err(e) => e.clone(),
        };
        let fallback =
            c.last.filter(|l| c.current.as_ref() != Ok(*l) && conflict(me, cluster, &taken, c.node, l).is_none());
        let message = match fallback {
            Some(l) => {
                taken.add(l.clone());
                format!("{why}; its last good version stays (podCIDR {} at {})", l.pod_cidr, l.node_ip)
            }
            None => format!("{why}; left out of the tables (no route to its pods)"),
        };
        problems.push(Problem::new(KIND, c.name, message));
    }
    Selection { remotes: taken.chosen, problems }
}

/// The remotes chosen so far, indexed so each check is a lookup: `select` runs on every Node
/// change, and a scan of every chosen Node per candidate would be quadratic in the cluster.
#[derive(Default)]
struct Taken {
    chosen: Vec<NodeView>,
    /// First address of each chosen range -> (last address, index in `chosen`). The ranges are
    /// disjoint, so a range overlaps one of them iff the one starting last at or before its
    /// end reaches its start.
    ranges: BTreeMap<u32, (u32, usize)>,
    addresses: std::collections::HashMap<core::net::Ipv4Addr, usize>,
}

impl Taken {
    fn add(&mut self, v: NodeView) {
        let c = v.pod_cidr.network();
        self.ranges.insert(u32::from(c.address()), (u32::from(c.broadcast()), self.chosen.len()));
        self.addresses.insert(v.node_ip, self.chosen.len());
        self.chosen.push(v);
    }

    fn overlapping(&self, c: Ipv4Cidr) -> Option<&NodeView> {
        let (first, last) = (u32::from(c.network().address()), u32::from(c.broadcast()));
        let (_, &(end, i)) = self.ranges.range(..=last).next_back()?;
        (end >= first).then(|| &self.chosen[i])
    }

    fn with_address(&self, ip: core::net::Ipv4Addr) -> Option<&NodeView> {
        self.addresses.get(&ip).map(|&i| &self.chosen[i])
    }
}

/// Why remote `v` (the view of `node`) cannot join `taken`, naming the Node and the field; the
/// tables builder refuses exactly these.
fn conflict(me: &NodeView, cluster: Ipv4Cidr, taken: &Taken, node: &Node, v: &NodeView) -> Option<String> {
    let n = &v.name;
    let annotations = node.metadata.annotations.as_ref();
    // Where the address came from (`NodeView::from_node` prefers flannel's annotation).
    let ip_field = || {
        if annotations.is_some_and(|a| a.contains_key(ANNOTATION_PUBLIC_IP)) {
            format!("metadata.annotations[{ANNOTATION_PUBLIC_IP}]")
        } else {
            "status.addresses[InternalIP]".to_string()
        }
    };
    let overlaps = |a: Ipv4Cidr, b: Ipv4Cidr| a.contains(b.address()) || b.contains(a.address());
    let cidr = v.pod_cidr.network();
    let vtep = v.vtep_mac.unwrap_or_else(|| derived_vtep_mac(n));
    if v.node_ip == me.node_ip {
        return Some(format!("Node {n}: {}: {} is this node's ({}) own address", ip_field(), v.node_ip, me.name));
    }
    if !vtep.is_unicast() {
        return Some(format!(
            "Node {n}: metadata.annotations[{ANNOTATION_BACKEND_DATA}]: VtepMAC {vtep} is not a unicast MAC"
        ));
    }
    if !cluster.contains(cidr.address()) || cidr.prefix_len() < cluster.prefix_len() {
        return Some(format!("Node {n}: spec.podCIDR: {cidr} is not inside the cluster CIDR {cluster}"));
    }
    if overlaps(cidr, me.pod_cidr.network()) {
        return Some(format!(
            "Node {n}: spec.podCIDR: {cidr} overlaps this node's ({}) podCIDR {}",
            me.name, me.pod_cidr
        ));
    }
    if let Some(o) = taken.overlapping(cidr) {
        return Some(format!("Node {n}: spec.podCIDR: {cidr} overlaps Node {}'s podCIDR {}", o.name, o.pod_cidr));
    }
    if let Some(o) = taken.with_address(v.node_ip) {
        return Some(format!("Node {n}: {}: {} is also Node {}'s address", ip_field(), v.node_ip, o.name));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, NodeFacts};
    use crate::config::NodeFile;
    use crate::state::ClusterState;
    use core::net::Ipv4Addr;
    use dataplane::wire::MacAddr;
    use std::fmt::Write as _;

    /// A Node as the API shows it: `created` is its creationTimestamp, if any.
    fn node_yaml(name: &str, ip: &str, cidr: &str, created: Option<&str>) -> String {
        let mut s = format!(
            "---\nkind: Node\napiVersion: v1\nmetadata:\n  name: {name}\n  annotations: {{flannel.alpha.coreos.com/public-ip: \"{ip}\"}}\n"
        );
        if let Some(t) = created {
            let _ = writeln!(s, "  creationTimestamp: \"{t}\"");
        }
        let _ = writeln!(s, "spec: {{podCIDR: \"{cidr}\"}}");
        s
    }

    fn nodes(yaml: &str) -> BTreeMap<String, Node> {
        ClusterState::parse(yaml)
            .expect("state")
            .nodes
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect()
    }

    fn me() -> NodeView {
        NodeView {
            name: "node-a".into(),
            pod_cidr: "10.244.0.0/24".parse().expect("cidr"),
            node_ip: Ipv4Addr::new(192, 168, 77, 1),
            vtep_mac: None,
            vni: None,
        }
    }

    fn cluster() -> Ipv4Cidr {
        "10.244.0.0/16".parse().expect("cidr")
    }

    fn names(s: &Selection) -> Vec<&str> {
        s.remotes.iter().map(|r| r.name.as_str()).collect()
    }

    const A: &str = "192.168.77.1";

    /// The incident: a Node whose podCIDR overlaps node-b's appears; node-b, already in the
    /// tables, keeps its range, the newcomer is named with the field, and the rest still builds.
    #[test]
    fn a_newcomer_overlapping_a_node_in_the_tables_is_left_out_by_name() {
        let state = format!(
            "{}{}{}{}",
            node_yaml("node-a", A, "10.244.0.0/24", None),
            node_yaml("node-b", "192.168.77.2", "10.244.1.0/24", Some("2024-05-01T00:00:00Z")),
            // Older than node-b, and first by name: the tables in use still decide.
            node_yaml("node-0bad", "192.168.77.9", "10.244.1.0/25", Some("2020-01-01T00:00:00Z")),
            node_yaml("node-c", "192.168.77.3", "10.244.2.0/24", None),
        );
        let all = nodes(&state);
        let first = select(
            &me(),
            cluster(),
            &nodes(&format!(
                "{}{}",
                node_yaml("node-a", A, "10.244.0.0/24", None),
                node_yaml("node-b", "192.168.77.2", "10.244.1.0/24", Some("2024-05-01T00:00:00Z"))
            )),
            &[],
        );
        assert_eq!(names(&first), ["node-b"]);
        assert!(first.problems.is_empty(), "{:?}", first.problems);
        let s = select(&me(), cluster(), &all, &first.remotes);
        assert_eq!(names(&s), ["node-b", "node-c"]);
        assert_eq!(s.problems.len(), 1, "{:?}", s.problems);
        let p = &s.problems[0];
        assert_eq!((p.kind.as_str(), p.name.as_str()), ("Node", "node-0bad"));
        assert_eq!(
            p.message,
            "Node node-0bad: spec.podCIDR: 10.244.1.0/25 overlaps Node node-b's podCIDR 10.244.1.0/24; left out of the tables (no route to its pods)"
        );
        // What was left out no longer stops the tables: they compile, node-c included; with
        // every Node, as before, they did not.
        let facts = facts(s.remotes.clone());
        assert!(compile(&facts, Default::default(), &[], 2).is_ok());
        let every: Vec<NodeView> =
            all.values().filter_map(|n| NodeView::from_node(n).ok()).filter(|v| v.name != "node-a").collect();
        let e = compile(&self::facts(every), Default::default(), &[], 2).expect_err("the overlap").to_string();
        assert!(e.contains("overlaps"), "{e}");
    }

    /// Without a last good state (a restart), the older Node wins, then name order; the local
    /// node's own range always wins, however old the other Node.
    #[test]
    fn without_a_last_good_state_the_older_node_wins_and_the_local_node_always() {
        let state = format!(
            "{}{}{}{}",
            node_yaml("node-a", A, "10.244.0.0/24", Some("2024-01-01T00:00:00Z")),
            node_yaml("node-b", "192.168.77.2", "10.244.1.0/24", Some("2023-01-01T00:00:00Z")),
            node_yaml("node-aa", "192.168.77.3", "10.244.1.0/24", Some("2024-06-01T00:00:00Z")),
            node_yaml("node-old", "192.168.77.4", "10.244.0.128/25", Some("2019-01-01T00:00:00Z")),
        );
        let s = select(&me(), cluster(), &nodes(&state), &[]);
        assert_eq!(names(&s), ["node-b"]);
        let bad: Vec<(&str, &str)> = s.problems.iter().map(|p| (p.name.as_str(), p.message.as_str())).collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].0 == "node-old" && bad[0].1.contains("overlaps this node's (node-a) podCIDR"), "{bad:?}");
        assert!(bad[1].0 == "node-aa" && bad[1].1.contains("overlaps Node node-b's"), "{bad:?}");
        // Same age (none): name order.
        let state = format!(
            "{}{}",
            node_yaml("node-y", "192.168.77.2", "10.244.1.0/24", None),
            node_yaml("node-x", "192.168.77.3", "10.244.1.0/24", None),
        );
        assert_eq!(names(&select(&me(), cluster(), &nodes(&state), &[])), ["node-x"]);
    }

    /// A Node that stops reading or starts conflicting keeps its last good version; one that
    /// never read is left out. Both are named with the field.
    #[test]
    fn a_node_that_goes_bad_keeps_its_last_good_version() {
        let good = format!(
            "{}{}",
            node_yaml("node-b", "192.168.77.2", "10.244.1.0/24", None),
            node_yaml("node-c", "192.168.77.3", "10.244.2.0/24", None),
        );
        let last = select(&me(), cluster(), &nodes(&good), &[]).remotes;
        assert_eq!(last.len(), 2);
        let broken = format!(
            "{}{}{}{}",
            node_yaml("node-b", "192.168.77.2", "10.244.1.0/99", None),
            // node-c moves onto node-d's range: node-d is new, node-c's change loses to nothing
            // in the tables, so it takes it, and node-d is the one left out.
            node_yaml("node-c", "192.168.77.3", "10.244.3.0/24", None),
            node_yaml("node-d", "192.168.77.4", "10.244.3.0/24", None),
            "---\nkind: Node\napiVersion: v1\nmetadata: {name: node-e}\nspec: {}\n",
        );
        let s = select(&me(), cluster(), &nodes(&broken), &last);
        let by_name = |n: &str| s.remotes.iter().find(|r| r.name == n).map(|r| r.pod_cidr.to_string());
        assert_eq!(by_name("node-b").as_deref(), Some("10.244.1.0/24"), "last good");
        assert_eq!(by_name("node-c").as_deref(), Some("10.244.3.0/24"));
        assert_eq!(by_name("node-d"), None);
        assert_eq!(by_name("node-e"), None);
        let msg = |n: &str| s.problems.iter().find(|p| p.name == n).map(|p| p.message.clone()).unwrap_or_default();
        assert_eq!(
            msg("node-b"),
            "Node node-b: spec.podCIDR: \"10.244.1.0/99\" is not an IPv4 CIDR; its last good version stays (podCIDR 10.244.1.0/24 at 192.168.77.2)"
        );
        assert!(
            msg("node-d").starts_with("Node node-d: spec.podCIDR: 10.244.3.0/24 overlaps Node node-c's"),
            "{}",
            msg("node-d")
        );
        assert!(
            msg("node-e").starts_with("Node node-e: spec.podCIDR: missing")
                && msg("node-e").ends_with("left out of the tables (no route to its pods)")
        );
        // A changed Node whose new range conflicts keeps its old one.
        let moved = format!(
            "{}{}",
            node_yaml("node-b", "192.168.77.2", "10.244.2.128/25", None),
            node_yaml("node-c", "192.168.77.3", "10.244.2.0/24", None),
        );
        let s = select(&me(), cluster(), &nodes(&moved), &last);
        assert_eq!(
            s.remotes.iter().map(|r| r.pod_cidr.to_string()).collect::<Vec<_>>(),
            ["10.244.2.0/24", "10.244.1.0/24"]
        );
        assert!(
            s.problems[0].message.contains("overlaps Node node-c's")
                && s.problems[0].message.contains("last good version stays")
        );
    }

    /// Addresses, VTEP MACs and ranges outside the cluster: each refusal of the tables builder
    /// is a named skip here, and this node's own Node is never a remote.
    #[test]
    fn every_refusal_of_the_tables_builder_is_a_named_skip() {
        let mcast = "---\nkind: Node\napiVersion: v1\nmetadata:\n  name: node-m\n  annotations: {flannel.alpha.coreos.com/public-ip: \"192.168.77.7\", flannel.alpha.coreos.com/backend-data: '{\"VtepMAC\":\"01:00:5e:00:00:01\"}'}\nspec: {podCIDR: 10.244.7.0/24}\n";
        let state = format!(
            "{}{}{}{}{}{}",
            node_yaml("node-a", A, "10.244.9.0/24", None),
            node_yaml("node-b", "192.168.77.2", "10.244.1.0/24", None),
            node_yaml("node-same-ip", "192.168.77.2", "10.244.4.0/24", None),
            node_yaml("node-my-ip", A, "10.244.5.0/24", None),
            node_yaml("node-out", "192.168.77.6", "10.9.0.0/24", None),
            mcast,
        );
        let s = select(&me(), cluster(), &nodes(&state), &[]);
        assert_eq!(names(&s), ["node-b"]);
        let msg = |n: &str| s.problems.iter().find(|p| p.name == n).map(|p| p.message.clone()).unwrap_or_default();
        assert!(
            msg("node-a").starts_with("Node node-a: spec.podCIDR or address: changed to 10.244.9.0/24"),
            "{}",
            msg("node-a")
        );
        assert!(msg("node-a").ends_with("this node keeps its own until vxnat restarts"));
        assert!(msg("node-same-ip").starts_with("Node node-same-ip: metadata.annotations[flannel.alpha.coreos.com/public-ip]: 192.168.77.2 is also Node node-b's address"));
        assert!(msg("node-my-ip").contains("is this node's (node-a) own address"), "{}", msg("node-my-ip"));
        assert!(msg("node-out").contains("spec.podCIDR: 10.9.0.0/24 is not inside the cluster CIDR 10.244.0.0/16"));
        assert!(msg("node-m").contains("VtepMAC 01:00:5e:00:00:01 is not a unicast MAC"), "{}", msg("node-m"));
        assert_eq!(s.problems.len(), 5);
    }

    /// Whatever the Nodes, the remotes chosen always compile: 500 random clusters of 12 Nodes
    /// drawn from few ranges and addresses, so most collide.
    #[test]
    fn the_remotes_chosen_always_compile() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut last: Vec<NodeView> = Vec::new();
        for round in 0..500 {
            let mut state = String::new();
            for i in 0..12 {
                let ip = format!("192.168.77.{}", next(8) + 1);
                let cidr = match next(6) {
                    0 => format!("10.244.{}.0/24", next(6)),
                    1 => format!("10.244.{}.0/23", next(6)),
                    2 => format!("10.244.{}.128/25", next(6)),
                    3 => format!("10.244.{}.{}/26", next(6), next(4) * 64),
                    4 => format!("10.244.{}.0/22", next(6)),
                    _ => "10.245.0.0/24".to_string(),
                };
                state.push_str(&node_yaml(&format!("n{i}"), &ip, &cidr, None));
            }
            let s = select(&me(), cluster(), &nodes(&state), &last);
            let r = compile(&facts(s.remotes.clone()), Default::default(), &[], round);
            assert!(r.is_ok(), "round {round}: {:?}\n{state}", r.err());
            // Every Node is routed or named (or both: held at its last good version), once.
            let mut seen: Vec<&str> = s.remotes.iter().map(|r| r.name.as_str()).collect();
            let routed = seen.len();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), routed, "a Node routed twice");
            seen.extend(s.problems.iter().map(|p| p.name.as_str()));
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 12, "every Node is routed or named");
            last = s.remotes;
        }
    }

    fn facts(remotes: Vec<NodeView>) -> NodeFacts {
        NodeFacts {
            file: NodeFile::parse("node = \"node-a\"\nuplink = \"none\"\n", std::path::Path::new("n.toml"))
                .expect("config"),
            nodeport_ips: Vec::new(),
            me: me(),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplink_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            uplink_mtu: 1500,
            cluster: cluster(),
            host: None,
            remotes: remotes.into_iter().map(|v| (v, MacAddr([2, 0, 0, 0, 0, 3]))).collect(),
        }
    }
}
