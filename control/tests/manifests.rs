//! The shipped manifests and example files load as what they claim to be.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use std::os::unix::fs::PermissionsExt;
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
    let ds_spec = ds.expect("ds").spec.expect("spec");
    // A rollout starts the new pod beside the old one, which hands over to it (issue 17).
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let rolling = ds_spec.update_strategy.as_ref().and_then(|u| u.rolling_update.as_ref()).expect("rollingUpdate");
    assert_eq!(
        (&rolling.max_surge, &rolling.max_unavailable),
        (&Some(IntOrString::Int(1)), &Some(IntOrString::Int(0)))
    );
    let spec = ds_spec.template.spec.expect("pod spec");
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.service_account_name.as_deref(), Some("vxnat"));
    assert!(spec.containers[0].env.iter().flatten().any(|e| e.name == "NODE_NAME"));
    // Liveness asks kube-proxy's proxier health server (`proxy_health`, on every address:
    // asked on loopback) for /livez; readiness asks vxnat's health address for /readyz
    // (node.toml's, or their defaults).
    let health: std::net::SocketAddr = f.health.parse().expect("health address");
    let proxy: std::net::SocketAddr = f.proxy_health.parse().expect("proxy_health address");
    let proxy =
        if proxy.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port())) } else { proxy };
    for (probe, path, health) in [
        (&spec.containers[0].liveness_probe, "/livez", proxy),
        (&spec.containers[0].readiness_probe, "/readyz", health),
    ] {
        let get =
            probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("no httpGet probe of {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(health.ip().to_string().as_str()), "{path}: host");
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            other => panic!("{path}: port {other:?} is not a number"),
        };
        assert_eq!(port, i32::from(health.port()), "{path}: port");
    }
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

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ConfigMap and the DaemonSet of configs/vxnat-daemonset.yaml.
fn config_map_and_daemonset() -> (ConfigMap, DaemonSet) {
    let text = std::fs::read_to_string(configs().join("vxnat-daemonset.yaml")).expect("manifest");
    let (mut config, mut ds) = (None, None);
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = serde_yaml_ng::Value::deserialize(de).expect("YAML");
        match v["kind"].as_str() {
            Some("ConfigMap") => config = Some(serde_yaml_ng::from_value(v).expect("ConfigMap")),
            Some("DaemonSet") => ds = Some(serde_yaml_ng::from_value(v).expect("DaemonSet")),
            _ => {}
        }
    }
    (config.expect("a ConfigMap"), ds.expect("a DaemonSet"))
}

/// The volume a container mounts at `mount_path`, with the mount's readOnly.
fn volume_at<'a>(pod: &'a PodSpec, c: &Container, mount_path: &str) -> (&'a Volume, bool) {
    let m = c.volume_mounts.iter().flatten().find(|m| m.mount_path.trim_end_matches('/') == mount_path);
    let m = m.unwrap_or_else(|| panic!("{}: nothing mounted at {mount_path}", c.name));
    let v = pod.volumes.iter().flatten().find(|v| v.name == m.name);
    (v.unwrap_or_else(|| panic!("{}: no volume {}", c.name, m.name)), m.read_only == Some(true))
}

fn host_path(v: &Volume) -> &str {
    &v.host_path.as_ref().unwrap_or_else(|| panic!("volume {} is not a hostPath", v.name)).path
}

/// The value following `flag` in a container's command.
fn flag<'a>(c: &'a Container, flag: &str) -> &'a str {
    let cmd = c.command.as_deref().unwrap_or_default();
    let i = cmd.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{}: no {flag} in {cmd:?}", c.name));
    cmd.get(i + 1).unwrap_or_else(|| panic!("{}: {flag} without a value", c.name))
}

#[test]
fn init_containers_install_the_cni_plugin_and_conflist_into_the_hosts_cni_dirs() {
    let (config, ds) = config_map_and_daemonset();
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let data = config.data.expect("data");
    let main = &pod.containers[0];
    let inits = pod.init_containers.as_deref().unwrap_or_default();
    // As kube-flannel.yml: the plugin first, then the configuration list that names it.
    assert_eq!(inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["install-cni-plugin", "install-cni"]);
    let script = repo().join("scripts/install-cni.sh");
    let mode = std::fs::metadata(&script).expect("scripts/install-cni.sh exists").permissions().mode();
    assert!(mode & 0o111 != 0, "scripts/install-cni.sh is executable (the init containers exec it)");
    let in_image = containerfile_copies().get("scripts/install-cni.sh").cloned().expect("the image has the script");
    for (c, what) in inits.iter().zip(["plugin", "conflist"]) {
        assert_eq!(c.image, main.image, "{}: the vxnat image", c.name);
        let cmd = c.command.as_deref().unwrap_or_default();
        assert_eq!(cmd.first(), Some(&in_image), "{}: runs scripts/install-cni.sh as the image has it", c.name);
        assert_eq!(cmd.last().map(String::as_str), Some(what), "{}: installs the {what}", c.name);
        assert!(c.security_context.is_none(), "{}: copying files needs no privileges", c.name);
    }
    // The script's default target directories, mounted from the same host paths (writable).
    for (c, dir) in [(&inits[0], "/opt/cni/bin"), (&inits[1], "/etc/cni/net.d")] {
        let (v, read_only) = volume_at(&pod, c, dir);
        assert_eq!(host_path(v), dir, "{}", c.name);
        assert!(!read_only, "{}: {dir} is written", c.name);
        assert!(!c.command.iter().flatten().any(|a| a == "--bin-dir" || a == "--conf-dir" || a == "--root"));
    }
    // The conflist and node.toml come from the ConfigMap, as files of its mount.
    let conf = &inits[1];
    for (arg, key) in [("--conflist", "10-vxnat.conflist"), ("--node-config", "node.toml")] {
        let path = Path::new(flag(conf, arg));
        let (v, _) = volume_at(&pod, conf, path.parent().expect("a directory").to_str().expect("UTF-8"));
        assert_eq!(v.config_map.as_ref().map(|c| c.name.as_str()), Some("vxnat-config"), "{arg}");
        assert_eq!(path.file_name().and_then(|n| n.to_str()), Some(key), "{arg}");
        assert!(data.contains_key(key), "the ConfigMap has {key}");
    }
    // Each node's own pod CIDR, read from its Node: the init container knows its node's name.
    assert_eq!(flag(conf, "--pod-cidr"), "node");
    let node_name = conf.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field = node_name.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));
    // Both containers that talk to the API server can be pointed at its real address (without
    // kube-proxy its ClusterIP answers only once vxnat runs).
    for c in [conf, main] {
        let endpoint = c
            .env_from
            .iter()
            .flatten()
            .filter_map(|e| e.config_map_ref.as_ref())
            .find(|r| r.name == "kubernetes-services-endpoint" && r.optional == Some(true));
        assert!(endpoint.is_some(), "{}: envFrom the optional kubernetes-services-endpoint ConfigMap", c.name);
    }
    // The ConfigMap's conflist is configs/10-vxnat.conflist.
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(configs().join("10-vxnat.conflist")).expect("conflist"))
            .expect("JSON");
    let in_map: serde_json::Value = serde_json::from_str(&data["10-vxnat.conflist"]).expect("the ConfigMap's JSON");
    assert_eq!(in_map, shipped, "the ConfigMap's 10-vxnat.conflist and configs/10-vxnat.conflist differ");
    // vxnat's ctl socket: the conflist names node.toml's (the script also sets it), and the
    // daemon's container has it on a hostPath mounted at the same path, so the plugin, which
    // the runtime runs on the host, finds it there.
    let node = NodeFile::parse(&format!("node = \"node-1\"\n{}", data["node.toml"]), Path::new("node.toml"))
        .expect("node.toml");
    assert_eq!(shipped["plugins"][0]["socket"].as_str().map(PathBuf::from), Some(node.socket.clone()));
    let dir = node.socket.parent().expect("socket dir").to_str().expect("UTF-8");
    let (v, _) = volume_at(&pod, main, dir);
    assert_eq!(host_path(v), dir, "the socket's directory is the host's {dir}");
}

/// Containerfile instructions, continuation lines joined and comments dropped, by stage.
fn containerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo().join("Containerfile")).expect("Containerfile");
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut line = String::new();
    for raw in text.lines() {
        if raw.trim_start().starts_with('#') {
            continue;
        }
        match raw.trim_end().strip_suffix('\\') {
            Some(part) => line.push_str(part),
            None => {
                line.push_str(raw);
                let trimmed = line.split_whitespace().collect::<Vec<_>>().join(" ");
                line.clear();
                let Some((op, args)) = trimmed.split_once(' ') else { continue };
                let op = op.to_ascii_uppercase();
                if op == "FROM" {
                    stages.push(Vec::new());
                }
                stages.last_mut().expect("FROM first").push((op, args.to_string()));
            }
        }
    }
    stages
}

/// The repository files the Containerfile copies from the build context, with their destination.
fn containerfile_copies() -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for (op, args) in containerfile_stages().into_iter().flatten() {
        let words: Vec<&str> = args.split(' ').collect();
        if op == "COPY" && !words[0].starts_with("--from") && words.len() == 2 {
            out.insert(words[0].to_string(), words[1].to_string());
        }
    }
    out
}

fn apt_installs(stage: &[(String, String)]) -> Vec<String> {
    let run = stage.iter().find(|(op, a)| op == "RUN" && a.contains("apt-get install")).expect("an apt-get install");
    let after = run.1.split("apt-get install").nth(1).expect("packages");
    let list = after.split("&&").next().unwrap_or_default();
    list.split_whitespace().filter(|w| !w.starts_with('-')).map(str::to_string).collect()
}

/// Consistency only: this proves the Containerfile copies files that exist and binaries that
/// control/Cargo.toml defines, not that the image builds (no container engine runs the tests).
#[test]
fn the_containerfile_builds_and_ships_what_the_daemonset_runs() {
    let stages = containerfile_stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = (&stages[0], &stages[1]);
    let from = |s: &[(String, String)]| s[0].1.clone();
    assert!(from(build).contains("rust:") && from(build).contains("bookworm"), "{}", from(build));
    let build_name = from(build).rsplit_once(" AS ").map(|(_, n)| n.to_string()).expect("FROM ... AS name");
    assert!(from(runtime).ends_with("debian:bookworm-slim"), "{}", from(runtime));
    // The build stage installs scripts/debian-packages.txt's build section (its first group).
    let listed = std::fs::read_to_string(repo().join("scripts/debian-packages.txt")).expect("package list");
    let build_section: Vec<&str> = listed
        .lines()
        .skip_while(|l| l.trim_start().starts_with('#'))
        .take_while(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(build_section.contains(&"clang"), "{build_section:?}");
    let installed = apt_installs(build);
    for p in &build_section {
        assert!(installed.iter().any(|i| i == p), "the build stage installs {p} (scripts/debian-packages.txt)");
    }
    // It builds control/Cargo.toml's package, locked, release, every [[bin]] of it.
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("control/Cargo.toml")).expect("Cargo.toml")).expect("TOML");
    let package = manifest["package"]["name"].as_str().expect("package name");
    let bins: Vec<&str> =
        manifest["bin"].as_array().expect("[[bin]]").iter().map(|b| b["name"].as_str().expect("name")).collect();
    let workdir = build.iter().rev().find(|(op, _)| op == "WORKDIR").map(|(_, a)| a.clone()).expect("WORKDIR");
    let cargo =
        build.iter().find(|(op, a)| op == "RUN" && a.contains("cargo ")).map(|(_, a)| a.clone()).expect("cargo");
    for bin in &bins {
        let built = cargo.split("&&").any(|c| {
            c.contains(&format!("-p {package}"))
                && c.contains("--release")
                && c.contains("--locked")
                && c.contains(&format!("--bin {bin}"))
        });
        assert!(built, "the build stage builds {bin} of {package}: {cargo}");
    }
    // The runtime stage copies exactly those binaries from the build stage.
    let from_build: Vec<&(String, String)> =
        runtime.iter().filter(|(op, a)| op == "COPY" && a.starts_with(&format!("--from={build_name} "))).collect();
    assert_eq!(from_build.len(), 1, "{from_build:?}");
    let words: Vec<&str> = from_build[0].1.split(' ').skip(1).collect();
    let (dest, sources) = words.split_last().expect("COPY sources dest");
    let expected: Vec<String> = bins.iter().map(|b| format!("{workdir}/target/release/{b}")).collect();
    assert_eq!(sources, expected.iter().map(String::as_str).collect::<Vec<_>>().as_slice());
    let (_, ds) = config_map_and_daemonset();
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let main_cmd = pod.containers[0].command.as_deref().unwrap_or_default();
    assert_eq!(main_cmd.first().map(String::as_str), Some(format!("{dest}vxnat").as_str()), "the DaemonSet runs it");
    // Files copied from the context exist here and are not left out of it by .dockerignore.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let ignored: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(ignored.contains(&"**/target"), "the build context leaves target/ out: {ignored:?}");
    let copies = containerfile_copies();
    assert!(copies.contains_key(".") || copies.len() >= 2, "{copies:?}");
    for src in copies.keys().filter(|s| s.as_str() != ".") {
        assert!(repo().join(src).is_file(), "COPY {src}: no such file in the repository");
        let first = src.split('/').next().unwrap_or_default();
        assert!(!ignored.iter().any(|i| *i == first || *i == src), "COPY {src}: excluded by .dockerignore");
    }
    // install-cni.sh's defaults are where the image puts the plugin and the conflist.
    let script = std::fs::read_to_string(repo().join("scripts/install-cni.sh")).expect("script");
    let default = |var: &str| {
        let line = script.lines().find(|l| l.starts_with(&format!("{var}="))).expect("default");
        line.split(":-").nth(1).and_then(|v| v.strip_suffix('}')).expect("${VAR:-default}").to_string()
    };
    assert_eq!(default("plugin_src"), format!("{dest}vxnat-cni"));
    assert_eq!(Some(&default("conflist_src")), copies.get("configs/10-vxnat.conflist"));
    // The runtime stage installs the package of every shared library the daemon links (as built
    // for these tests: the same crates and link flags), beyond the base image's libc6 and
    // libgcc-s1, and the tools it and the script run.
    let runtime_pkgs = apt_installs(runtime);
    for p in linked_packages(env!("CARGO_BIN_EXE_vxnat")) {
        if !["libc6", "libgcc-s1"].contains(&p.as_str()) {
            assert!(runtime_pkgs.contains(&p), "vxnat links a library of {p}; the runtime stage lacks it");
        }
    }
    for p in ["iproute2", "nftables", "curl", "ca-certificates"] {
        assert!(runtime_pkgs.iter().any(|r| r == p), "the runtime stage installs {p}");
    }
    assert!(!runtime.iter().any(|(op, a)| op == "RUN" && a.contains("cargo")), "nothing is built at run time");
}

/// The Debian packages owning the shared libraries `bin` loads (ldd, dpkg -S).
fn linked_packages(bin: &str) -> Vec<String> {
    let out = std::process::Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut pkgs = Vec::new();
    for path in text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))) {
        let owner = [path.to_string(), format!("/usr{path}")].into_iter().find_map(|p| {
            let o = std::process::Command::new("dpkg").args(["-S", &p]).output().ok()?;
            o.status.success().then(|| String::from_utf8_lossy(&o.stdout).to_string())
        });
        let owner = owner.unwrap_or_else(|| panic!("no Debian package owns {path}"));
        let pkg = owner.split(':').next().unwrap_or_default().to_string();
        if !pkgs.contains(&pkg) {
            pkgs.push(pkg);
        }
    }
    assert!(pkgs.iter().any(|p| p == "libc6"), "ldd {bin}: {text}");
    pkgs
}
