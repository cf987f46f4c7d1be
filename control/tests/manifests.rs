//! The shipped manifests and example files load as what they claim to be.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use vxnat_control::config::NodeFile;
use vxnat_control::state::ClusterState;

fn configs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

#[test]
fn the_daemonset_manifest_is_valid_and_grants_what_the_source_uses() {
    let text = std::fs::read_to_string(configs().join("vxnat-daemonset.yaml")).expect("manifest");
    let mut kinds = Vec::new();
    let mut role = None;
    let mut config = None;
    let mut ds = None;
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = serde_yaml_ng::Value::deserialize(de).expect("YAML");
        let kind = v["kind"].as_str().expect("kind").to_string();
        match kind.as_str() {
            "ServiceAccount" => drop(serde_yaml_ng::from_value::<ServiceAccount>(v).expect("ServiceAccount")),
            "ClusterRole" => role = Some(serde_yaml_ng::from_value::<ClusterRole>(v).expect("ClusterRole")),
            "ClusterRoleBinding" => drop(serde_yaml_ng::from_value::<ClusterRoleBinding>(v).expect("binding")),
            "ConfigMap" => config = Some(serde_yaml_ng::from_value::<ConfigMap>(v).expect("ConfigMap")),
            "DaemonSet" => ds = Some(serde_yaml_ng::from_value::<DaemonSet>(v).expect("DaemonSet")),
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]);
    // RBAC: list+watch of the three kinds the source follows, patch of Nodes (annotations).
    let rules = role.expect("role").rules.unwrap_or_default();
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for (g, r) in [("", "nodes"), ("", "services"), ("discovery.k8s.io", "endpointslices")] {
        assert!(allows(g, r, "list") && allows(g, r, "watch"), "{g}/{r}");
    }
    assert!(allows("", "nodes", "patch"));
    // The node configuration in the ConfigMap parses (node from NODE_NAME, so given here).
    let toml = config.expect("config").data.expect("data")["node.toml"].clone();
    let f = NodeFile::parse(&format!("node = \"node-1\"\n{toml}"), Path::new("node.toml")).expect("node.toml");
    assert_eq!(f.state, None, "the DaemonSet uses the Kubernetes API");
    // The DaemonSet passes NODE_NAME and runs on the host network.
    let spec = ds.expect("ds").spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.service_account_name.as_deref(), Some("vxnat"));
    assert!(spec.containers[0].env.iter().flatten().any(|e| e.name == "NODE_NAME"));
}

#[test]
fn example_state_files_load() {
    for name in ["demo-cluster.yaml", "state-example.yaml"] {
        let s = ClusterState::load(&configs().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!s.nodes.is_empty() && !s.services.is_empty(), "{name}");
        let (t, problems) =
            vxnat_control::services::compile(&s, &s.nodes[0].metadata.name.clone().unwrap_or_default(), 16381);
        assert!(problems.is_empty(), "{name}: {problems:?}");
        assert!(t.port_count() > 0);
    }
}

#[test]
fn the_example_conflist_chains_vxnat_then_portmap() {
    let text = std::fs::read_to_string(configs().join("10-vxnat.conflist")).expect("conflist");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["cniVersion"], "1.0.0");
    let plugins = v["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.iter().map(|p| p["type"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["vxnat-cni", "portmap"]);
    // The runtime hands each plugin its entry with the list's name and version.
    let mut first = plugins[0].clone();
    first["cniVersion"] = v["cniVersion"].clone();
    first["name"] = v["name"].clone();
    let conf = vxnat_control::cni::parse_conf(&first.to_string()).expect("vxnat's entry is a valid network config");
    assert_eq!(conf.ipam_type, "host-local");
}

#[test]
fn the_demo_node_configurations_load() {
    for n in ["node-a.toml", "node-b.toml"] {
        let f = NodeFile::load(&configs().join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(f.uplink, "eth0", "{n}: the first `uplink` key is the NIC (scripts/demo.sh rewrites only that one)");
        f.checksum.policies().expect("checksum policies");
    }
}
