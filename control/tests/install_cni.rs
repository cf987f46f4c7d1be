//! scripts/install-cni.sh against a temporary root: it installs the real vxnat-cni and the
//! conflist with their modes, reports a second run as unchanged without touching the files,
//! replaces a changed file by rename (never in place, no temporary file left behind), names a
//! missing source, and does all that when run exactly as the DaemonSet's init containers run it.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

const PLUGIN: &str = env!("CARGO_BIN_EXE_vxnat-cni");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn conflist() -> PathBuf {
    repo().join("configs/10-vxnat.conflist")
}

/// A unique temporary directory, removed when dropped.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new(tag: &str) -> TempRoot {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
        let dir = std::env::temp_dir().join(format!("vxnat-install-cni-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).expect("temp dir");
        TempRoot(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel.trim_start_matches('/'))
    }

    fn bin(&self) -> PathBuf {
        self.path("opt/cni/bin/vxnat-cni")
    }

    fn conf(&self) -> PathBuf {
        self.path("etc/cni/net.d/10-vxnat.conflist")
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `bash scripts/install-cni.sh ARGS` with only `env` of the script's variables set.
fn install(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/install-cni.sh")).args(args);
    for var in [
        "CNI_ROOT",
        "CNI_BIN_DIR",
        "CNI_CONF_DIR",
        "CNI_CONF_NAME",
        "VXNAT_CNI_PLUGIN",
        "VXNAT_CNI_CONFLIST",
        "VXNAT_NODE_CONFIG",
        "POD_CIDR",
        "NODE_NAME",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "VXNAT_API_URL",
        "VXNAT_SA_DIR",
    ] {
        cmd.env_remove(var);
    }
    // The fake API server is local: no proxy.
    cmd.env("NO_PROXY", "*").env("no_proxy", "*");
    cmd.envs(env.iter().copied());
    cmd.output().expect("bash runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "install-cni.sh failed: {}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "install-cni.sh should fail: {}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stderr)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).expect("metadata").ino()
}

/// The names in a directory: what the runtime would see there.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&read(p)).unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()))
}

#[test]
fn installs_both_files_then_reports_unchanged_and_leaves_them_alone() {
    let r = TempRoot::new("twice");
    let root = r.0.to_str().expect("UTF-8");
    let conf = conflist();
    let args = ["--root", root, "--plugin", PLUGIN, "--conflist", conf.to_str().expect("UTF-8")];
    let first = ok(&install(&args, &[]));
    assert!(first.contains(&format!("installed {}", r.bin().display())), "{first}");
    assert!(first.contains(&format!("installed {}", r.conf().display())), "{first}");
    assert_eq!(read(&r.bin()), read(Path::new(PLUGIN)));
    assert_eq!(read(&r.conf()), read(&conflist()), "no --node-config, no --pod-cidr: installed as written");
    assert_eq!((mode(&r.bin()), mode(&r.conf())), (0o755, 0o644));
    assert_eq!(names(&r.path("opt/cni/bin")), ["vxnat-cni"]);
    assert_eq!(names(&r.path("etc/cni/net.d")), ["10-vxnat.conflist"]);
    // The installed plugin is whole and runs: the runtime's VERSION call.
    // (vxnat-cni does not read stdin for VERSION.)
    let version = Command::new(r.bin())
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("the installed plugin runs");
    assert!(text(&version.stdout).contains("\"supportedVersions\""), "{}", text(&version.stdout));

    let before = (inode(&r.bin()), inode(&r.conf()));
    let again = ok(&install(&args, &[]));
    assert!(again.contains(&format!("{} unchanged", r.bin().display())), "{again}");
    assert!(again.contains(&format!("{} unchanged", r.conf().display())), "{again}");
    assert!(!again.contains("installed"), "{again}");
    assert_eq!(read(&r.bin()), read(Path::new(PLUGIN)));
    assert_eq!(read(&r.conf()), read(&conflist()));
    assert_eq!((inode(&r.bin()), inode(&r.conf())), before, "an unchanged file is not rewritten");
    assert_eq!(names(&r.path("opt/cni/bin")), ["vxnat-cni"]);
    assert_eq!(names(&r.path("etc/cni/net.d")), ["10-vxnat.conflist"]);
}

#[test]
fn a_changed_source_replaces_the_target_by_rename() {
    let r = TempRoot::new("changed");
    let root = r.0.to_str().expect("UTF-8");
    let src = r.path("src/10-vxnat.conflist");
    std::fs::create_dir(r.path("src")).expect("src dir");
    std::fs::copy(conflist(), &src).expect("copy");
    // The first plugin is `sleep`, so it can be kept running while it is replaced.
    let sleep = r.path("src/sleep");
    std::fs::copy("/bin/sleep", &sleep).expect("/bin/sleep");
    let args = |plugin: &Path| {
        let v =
            ["--root", root, "--plugin", plugin.to_str().expect("UTF-8"), "--conflist", src.to_str().expect("UTF-8")];
        v.map(str::to_string)
    };
    let run = |plugin: &Path| {
        let a = args(plugin);
        install(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    ok(&run(&sleep));
    let old = read(&r.conf());
    let (old_conf, old_bin) = (inode(&r.conf()), inode(&r.bin()));
    let mut reader = std::fs::File::open(r.conf()).expect("a reader of the old conflist");
    let mut running = Command::new(r.bin()).arg("30").spawn().expect("the installed plugin runs");

    // A new conflist and a new plugin, while the old plugin is executing.
    let changed = text(&old).replace("10.96.0.10", "10.96.0.53");
    assert_ne!(changed.as_bytes(), old.as_slice());
    std::fs::write(&src, &changed).expect("new source");
    let out = run(Path::new(PLUGIN));
    let _ = running.kill();
    let _ = running.wait();
    let stdout = ok(&out);
    assert!(stdout.contains(&format!("installed {}", r.conf().display())), "{stdout}");
    assert!(stdout.contains(&format!("installed {}", r.bin().display())), "a busy plugin is replaced: {stdout}");
    assert_eq!(read(&r.conf()), changed.as_bytes());
    assert_eq!(read(&r.bin()), read(Path::new(PLUGIN)));
    // Renamed over, not written in place: new inodes, and whoever had the old file open still
    // reads the old contents whole. No temporary file is left in either directory.
    assert_ne!(inode(&r.conf()), old_conf);
    assert_ne!(inode(&r.bin()), old_bin);
    let mut seen = Vec::new();
    reader.read_to_end(&mut seen).expect("read");
    assert_eq!(seen, old);
    assert_eq!(names(&r.path("opt/cni/bin")), ["vxnat-cni"]);
    assert_eq!(names(&r.path("etc/cni/net.d")), ["10-vxnat.conflist"]);

    // A wrong mode alone is repaired too.
    std::fs::set_permissions(r.bin(), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let stdout = ok(&run(Path::new(PLUGIN)));
    assert!(stdout.contains(&format!("installed {}", r.bin().display())), "{stdout}");
    assert!(stdout.contains(&format!("{} unchanged", r.conf().display())), "{stdout}");
    assert_eq!(mode(&r.bin()), 0o755);
    assert_eq!(names(&r.path("opt/cni/bin")), ["vxnat-cni"]);
}

#[test]
fn a_missing_source_fails_naming_it() {
    let r = TempRoot::new("missing");
    let root = r.0.to_str().expect("UTF-8");
    let gone = r.path("no/vxnat-cni");
    let gone = gone.to_str().expect("UTF-8");
    let conf = conflist();
    let conf = conf.to_str().expect("UTF-8");
    let err = failed(&install(&["--root", root, "--plugin", gone, "--conflist", conf], &[]));
    assert!(err.contains(&format!("plugin {gone}: no such file")), "{err}");
    assert!(!r.path("etc").exists() && !r.path("opt").exists(), "nothing is installed when the plugin is missing");

    let err = failed(&install(&["--root", root, "--conflist", &format!("{root}/none.conflist"), "conflist"], &[]));
    assert!(err.contains(&format!("conflist {root}/none.conflist: no such file")), "{err}");
    // Environment variables instead of flags, as in flannel's install scripts.
    let env = [("CNI_ROOT", root), ("VXNAT_CNI_PLUGIN", gone)];
    let err = failed(&install(&["plugin"], &env));
    assert!(err.contains(gone), "{err}");
    let err = failed(&install(&["--root", &format!("{root}/nowhere"), "--plugin", PLUGIN, "plugin"], &[]));
    assert!(err.contains(&format!("root {root}/nowhere: no such directory")), "{err}");
    let node = format!("{root}/node.toml");
    let err = failed(&install(&["--root", root, "--conflist", conf, "--node-config", &node, "conflist"], &[]));
    assert!(err.contains(&format!("node config {node}: no such file")), "{err}");
    assert!(!r.path("etc/cni/net.d/10-vxnat.conflist").exists());
    assert_eq!(install(&["--bogus"], &[]).status.code(), Some(2));
}

#[test]
fn the_conflist_gets_the_node_configs_socket_and_the_pod_cidr() {
    let r = TempRoot::new("render");
    let root = r.0.to_str().expect("UTF-8");
    let node = r.path("node.toml");
    // Only the top-level `socket` counts, not a key of the same name in a table.
    std::fs::write(&node, "uplink = \"eth0\"\nsocket = \"/run/vxnat/other.sock\"  # ctl\n[extra]\nsocket = \"x\"\n")
        .expect("node.toml");
    let conf = conflist();
    let base = ["--root", root, "--conflist", conf.to_str().expect("UTF-8"), "conflist"];
    let with = |more: &[&str]| install(&[&base[..], more].concat(), &[]);
    ok(&with(&["--node-config", node.to_str().expect("UTF-8"), "--pod-cidr", "10.244.5.0/24"]));
    let got = json(&r.conf());
    let mut expected = json(&conf);
    expected["plugins"][0]["socket"] = "/run/vxnat/other.sock".into();
    expected["plugins"][0]["ipam"]["ranges"][0][0]["subnet"] = "10.244.5.0/24".into();
    assert_eq!(got, expected, "only the socket and the subnet change");
    let mut entry = got["plugins"][0].clone();
    entry["cniVersion"] = got["cniVersion"].clone();
    entry["name"] = got["name"].clone();
    let parsed = vxnat_control::cni::parse_conf(&entry.to_string()).expect("vxnat-cni reads it");
    assert_eq!(parsed.socket, Path::new("/run/vxnat/other.sock"));

    // No `socket` in node.toml: vxnat's default, which is the shipped conflist's.
    std::fs::write(&node, "uplink = \"eth0\"\n").expect("node.toml");
    let out = ok(&with(&["--node-config", node.to_str().expect("UTF-8")]));
    assert!(out.contains("installed"), "{out}");
    assert_eq!(json(&r.conf()), json(&conf));

    let err = failed(&with(&["--pod-cidr", "10.244.5.0"]));
    assert!(err.contains("pod CIDR 10.244.5.0: not an IPv4 CIDR"), "{err}");
    std::fs::write(&node, "socket = \"run/relative.sock\"\n").expect("node.toml");
    let err = failed(&with(&["--node-config", node.to_str().expect("UTF-8")]));
    assert!(err.contains("run/relative.sock"), "{err}");
    assert_eq!(json(&r.conf()), json(&conf), "a failed run leaves the installed file as it was");
    assert_eq!(names(&r.path("etc/cni/net.d")), ["10-vxnat.conflist"]);

    // What would keep the runtime from using vxnat is said, not removed: flannel's conflist
    // sorting first, chained plugins missing from the bin dir.
    std::fs::write(r.path("etc/cni/net.d/10-flannel.conflist"), "{}").expect("flannel's");
    let out = with(&[]);
    ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("10-flannel.conflist sorts before 10-vxnat.conflist"), "{err}");
    assert!(err.contains("opt/cni/bin/host-local: missing") && err.contains("opt/cni/bin/portmap: missing"), "{err}");
    assert_eq!(names(&r.path("etc/cni/net.d")), ["10-flannel.conflist", "10-vxnat.conflist"]);
}

/// A stand-in for the API server: answers every GET with `body`, records each request's head.
fn fake_api(body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            log.lock().expect("log").push(text(&head));
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (url, seen)
}

/// The ConfigMap and the DaemonSet of configs/vxnat-daemonset.yaml.
fn manifest() -> (ConfigMap, DaemonSet) {
    let yaml = std::fs::read_to_string(repo().join("configs/vxnat-daemonset.yaml")).expect("manifest");
    let (mut cm, mut ds) = (None, None);
    for de in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let v = serde_yaml_ng::Value::deserialize(de).expect("YAML");
        match v["kind"].as_str() {
            Some("ConfigMap") => cm = Some(serde_yaml_ng::from_value(v).expect("ConfigMap")),
            Some("DaemonSet") => ds = Some(serde_yaml_ng::from_value(v).expect("DaemonSet")),
            _ => {}
        }
    }
    (cm.expect("ConfigMap"), ds.expect("DaemonSet"))
}

/// Runs the DaemonSet's init containers' commands on the host as `r`: the ConfigMap's files
/// where they mount it, the hostPath directories under `r`, the image's plugin replaced by the
/// one built here, the API server by `api`.
fn run_init_containers(r: &TempRoot, api: &str) -> Vec<String> {
    let (cm, ds) = manifest();
    let data = cm.data.expect("data");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    std::fs::create_dir_all(r.path("sa")).expect("sa");
    std::fs::write(r.path("sa/token"), "token-of-vxnat").expect("token");
    let mut logs = Vec::new();
    for c in pod.init_containers.iter().flatten() {
        // The ConfigMap's files at a path of their own, the command's paths rewritten to it.
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = pod.volumes.iter().flatten().find(|v| v.name == m.name).expect("volume");
            if let Some(map) = &v.config_map {
                assert_eq!(map.name, cm.metadata.name.clone().expect("name"));
                let dir = r.path(&format!("configmap{}", m.mount_path));
                std::fs::create_dir_all(&dir).expect("mount dir");
                for (k, text) in &data {
                    std::fs::write(dir.join(k), text).expect("key file");
                }
                mounts.push((m.mount_path.clone(), dir));
            }
        }
        let cmd = c.command.clone().expect("command");
        assert_eq!(Path::new(&cmd[0]).file_name().and_then(|n| n.to_str()), Some("install-cni.sh"));
        let mut args: Vec<String> = cmd[1..]
            .iter()
            .map(|a| match mounts.iter().find(|(at, _)| a.starts_with(&format!("{at}/"))) {
                Some((at, dir)) => format!("{}{}", dir.display(), &a[at.len()..]),
                None => a.clone(),
            })
            .collect();
        args.extend(["--root".into(), r.0.display().to_string(), "--plugin".into(), PLUGIN.into()]);
        let mut env = vec![("VXNAT_API_URL", api.to_string()), ("VXNAT_SA_DIR", r.path("sa").display().to_string())];
        for e in c.env.iter().flatten() {
            let from_node_name =
                e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.as_str())
                    == Some("spec.nodeName");
            if e.name == "NODE_NAME" && from_node_name {
                env.push(("NODE_NAME", "node-7".into()));
            }
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = install(&args.iter().map(String::as_str).collect::<Vec<_>>(), &env);
        logs.push(ok(&out));
    }
    logs
}

#[test]
fn the_daemonsets_init_containers_install_a_working_configuration() {
    let r = TempRoot::new("daemonset");
    let (api, seen) = fake_api(r#"{"kind":"Node","spec":{"podCIDR":"10.244.7.0/24","podCIDRs":["10.244.7.0/24"]}}"#);
    let logs = run_init_containers(&r, &api);
    assert_eq!(logs.len(), 2, "two init containers");
    assert!(logs[0].contains("installed") && logs[0].contains("opt/cni/bin/vxnat-cni"), "{}", logs[0]);
    assert!(logs[1].contains("installed") && logs[1].contains("etc/cni/net.d/10-vxnat.conflist"), "{}", logs[1]);
    assert_eq!(read(&r.bin()), read(Path::new(PLUGIN)));
    // This node's pod CIDR, read from its Node with the service account's token.
    let requests = seen.lock().expect("log").clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].starts_with("GET /api/v1/nodes/node-7 "), "{}", requests[0]);
    assert!(requests[0].contains("Authorization: Bearer token-of-vxnat\r\n"), "{}", requests[0]);
    let got = json(&r.conf());
    assert_eq!(got["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.7.0/24");
    let (cm, _) = manifest();
    let toml = cm.data.expect("data")["node.toml"].clone();
    let node = vxnat_control::config::NodeFile::parse(&format!("node = \"node-7\"\n{toml}"), Path::new("node.toml"))
        .expect("node.toml");
    assert_eq!(got["plugins"][0]["socket"].as_str().map(PathBuf::from), Some(node.socket));
    // A restarted pod runs them again: nothing changes.
    let again = run_init_containers(&r, &api);
    assert!(again.iter().all(|l| l.contains("unchanged") && !l.contains("installed")), "{again:?}");
    assert_eq!(names(&r.path("opt/cni/bin")), ["vxnat-cni"]);
    assert_eq!(names(&r.path("etc/cni/net.d")), ["10-vxnat.conflist"]);
}

#[test]
fn a_node_without_a_pod_cidr_fails_until_it_has_one() {
    let r = TempRoot::new("nocidr");
    let (api, _) = fake_api(r#"{"kind":"Node","spec":{}}"#);
    std::fs::create_dir(r.path("sa")).expect("sa");
    std::fs::write(r.path("sa/token"), "t").expect("token");
    let sa = r.path("sa");
    let env = [("NODE_NAME", "node-3"), ("VXNAT_API_URL", api.as_str()), ("VXNAT_SA_DIR", sa.to_str().expect("UTF-8"))];
    let conf = conflist();
    let args = ["--root", r.0.to_str().expect("UTF-8"), "--conflist", conf.to_str().expect("UTF-8")];
    let err = failed(&install(&[&args[..], &["--pod-cidr", "node", "conflist"]].concat(), &env));
    assert!(err.contains("Node node-3 has no spec.podCIDR yet"), "{err}");
    assert!(!r.conf().exists(), "no conflist with a wrong subnet");
    let err = failed(&install(&[&args[..], &["--pod-cidr", "node", "conflist"]].concat(), &env[1..]));
    assert!(err.contains("NODE_NAME is not set"), "{err}");
}
