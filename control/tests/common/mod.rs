//! The end-to-end harness shared by the daemon tests: nodes running `vxnat run` in network
//! namespaces on a bridged underlay, pods as veths with /32 addresses, the ctl client, and the
//! CNI plugin called as a runtime calls it. Each test binary uses a different part of it.
#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vxnat_tests::netns::{tcp_transfer, udp_datagrams, Netns};

pub const BIN: &str = env!("CARGO_BIN_EXE_vxnat");

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

pub struct NodeNs {
    pub ns: Netns,
    pub name: &'static str,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub daemon: Option<Child>,
}

impl NodeNs {
    /// `vxnat run` in the node's namespace, logging to `log`.
    fn spawn_run(&self, log: &std::path::Path) -> Child {
        let log = std::fs::File::create(log).expect("log file");
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name, BIN, "run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vxnat")
    }

    pub fn start(&mut self) {
        self.daemon = Some(self.spawn_run(&self.log));
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if self.ctl(&["ports"]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("vxnat on {} did not come up: {}", self.name, std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    /// A planned restart with overlap (a DaemonSet rolling out with maxSurge): a second
    /// `vxnat run` starts while this one runs, prepares, and takes over; the predecessor, idle
    /// once it has handed over, then gets its SIGTERM and must exit 0. The successor logs to
    /// `<log>.next` (then the node's log). Returns once the successor is up.
    pub fn take_over(&mut self) {
        // Killed if this panics: an idle predecessor would wait for its SIGTERM forever.
        struct Reap(Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut old = Reap(self.daemon.take().expect("vxnat is running"));
        let mut next = self.log.clone().into_os_string();
        next.push(".next");
        let next = PathBuf::from(next);
        self.daemon = Some(self.spawn_run(&next));
        let until = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&next).unwrap_or_default().contains(" up: ") {
            assert!(
                Instant::now() < until,
                "the successor on {} did not come up: {}",
                self.name,
                std::fs::read_to_string(&next).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").arg("-TERM").arg(old.0.id().to_string()).status();
        let status = old.0.wait().expect("predecessor");
        assert!(
            status.success(),
            "the predecessor on {} exited {status}: {}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        let _ = std::fs::rename(&next, &self.log);
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // `ip netns exec` execs vxnat, so the child pid is vxnat's.
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("vxnat on {} did not stop on SIGTERM", self.name);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        ctl_at(&self.socket, args)
    }

    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ctl(&["--json", "stats"]).expect("stats")).expect("stats JSON")
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.socket);
        let mut pods = self.socket.clone().into_os_string();
        pods.push(".pods.json");
        let _ = std::fs::remove_file(PathBuf::from(pods));
    }
}

pub struct Cluster {
    // Pods first: dropped before the nodes.
    pub pods: Vec<Pod>,
    pub nodes: Vec<NodeNs>,
    pub client: Netns,
    pub _switch: Netns,
    pub _dir: TempDir,
}

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn cluster() -> Cluster {
    cluster_with("")
}

/// The demo cluster, with `extra` YAML documents (Services, EndpointSlices) appended to its state.
pub fn cluster_with(extra: &str) -> Cluster {
    cluster_with_config(extra, "")
}

/// Also with `toml` lines appended to each node's configuration.
pub fn cluster_with_config(extra: &str, toml: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("vxnat-e2e-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/demo-cluster.yaml");
    let state = dir.join("cluster.yaml");
    let mut text = std::fs::read_to_string(&demo).expect("demo state");
    if !extra.is_empty() {
        text.push_str("\n---\n");
        text.push_str(extra);
    }
    std::fs::write(&state, text).expect("state file");
    // The underlay: a switch (bridge) joining node A, node B and a client outside the cluster.
    let switch = Netns::new("switch");
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let a = Netns::new("nodea");
    let b = Netns::new("nodeb");
    let client = Netns::new("client");
    for (ns, port, ifname) in [(&a, "pa", "ul"), (&b, "pb", "ul"), (&client, "pc", "eth0")] {
        switch.ip(&["link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &ns.name]);
        switch.ip(&["link", "set", port, "master", "br0", "up"]);
    }
    client.ip(&["addr", "add", "192.168.77.100/24", "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    let mut nodes = Vec::new();
    for (ns, name, ip) in [(a, "node-a", "192.168.77.1/24"), (b, "node-b", "192.168.77.2/24")] {
        ns.ip(&["addr", "add", ip, "dev", "ul"]);
        ns.ip(&["link", "set", "ul", "up"]);
        let socket = dir.join(format!("{name}.sock"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node = \"{name}\"\nuplink = \"ul\"\nstate = \"{}\"\nsocket = \"{}\"\n{toml}",
                state.display(),
                socket.display()
            ),
        )
        .expect("config");
        nodes.push(NodeNs { ns, name, config, socket, log: dir.join(format!("{name}.log")), daemon: None });
    }
    let mut pods = Vec::new();
    for (node, n, last, host_if) in [(0, 0u8, 2u8, "vxa1"), (0, 0, 3, "vxa2"), (1, 1, 2, "vxb1"), (1, 1, 3, "vxb2")] {
        pods.push(make_pod(&nodes[node].ns, host_if, Ipv4Addr::new(10, 244, n, last)));
    }
    for n in &mut nodes {
        n.start();
    }
    for (i, p) in pods.iter().enumerate() {
        nodes[i / 2].ctl(&["attach", "--ifname", &p.host_if, "--ip", &p.ip.to_string()]).expect("attach pod");
    }
    Cluster { pods, nodes, client, _switch: switch, _dir: TempDir(dir) }
}

/// A pod as the demo sets one up: a namespace, a veth whose host end `host_if` is in `node`
/// (MTU 1450), the address as a /32 with the node's gateway (`.1` of its /24) on link and the
/// default route via it. Not attached yet.
pub fn make_pod(node: &Netns, host_if: &str, ip: Ipv4Addr) -> Pod {
    let ns = Netns::new(host_if);
    node.ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
    node.ip(&["link", "set", host_if, "mtu", "1450", "up"]);
    let o = ip.octets();
    let gw = format!("{}.{}.{}.1", o[0], o[1], o[2]);
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
    ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"]);
    ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"]);
    Pod { ns, ip, host_if: host_if.to_string() }
}

/// What a process holds: resident memory (KiB), open fds, and of those the BPF programs and
/// maps and the sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    pub rss_kib: u64,
    pub fds: usize,
    pub bpf_progs: usize,
    pub bpf_maps: usize,
    pub sockets: usize,
}

pub fn holdings(pid: u32) -> Holdings {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut h = Holdings { rss_kib, fds: 0, bpf_progs: 0, bpf_maps: 0, sockets: 0 };
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        h.fds += 1;
        let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
        if target.contains("bpf-prog") {
            h.bpf_progs += 1;
        } else if target.contains("bpf-map") {
            h.bpf_maps += 1;
        } else if target.starts_with("socket:") {
            h.sockets += 1;
        }
    }
    h
}

impl NodeNs {
    /// The vxnat process's pid (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map(Child::id).expect("vxnat is running")
    }
}

/// Runs `vxnat ctl --socket SOCKET ARGS...`: its stdout, or its stderr if it failed.
pub fn ctl_at(socket: &std::path::Path, args: &[impl AsRef<std::ffi::OsStr>]) -> Result<String, String> {
    let out =
        Command::new(BIN).arg("ctl").arg("--socket").arg(socket).args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        % 1_000_000
}

pub fn ping(from: &Netns, to: Ipv4Addr) -> bool {
    from.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &to.to_string()]).status.success()
}

pub fn tcp(from: &Pod, to: &Pod, len: usize, port: u16) {
    tcp_transfer(&from.ns, &to.ns, to.ip, port, len).unwrap_or_else(|e| panic!("TCP {} -> {}: {e}", from.ip, to.ip));
}

pub fn udp(from: &Pod, to: &Pod, port: u16) -> usize {
    udp_datagrams(&from.ns, from.ip, &to.ns, to.ip, port, 100, 1000)
}

pub fn drops(stats: &serde_json::Value) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for p in stats["worker"]["ports"].as_array().into_iter().flatten() {
        for d in p["drops"].as_array().into_iter().flatten() {
            v.push((d[0].as_str().unwrap_or("").to_string(), d[1].as_u64().unwrap_or(0)));
        }
    }
    v
}

/// Drops a forwarding test must not see: everything but IPv6 (vxnat routes IPv4 only) and
/// congestion loss. Congestion loss is real loss, named and counted, not a forwarding error:
/// the suite runs many clusters on two cores, and while the worker is descheduled a bulk TCP
/// sender keeps filling its veth's XDP ring, so the kernel drops what finds the fill ring
/// empty (`xsk_rx_dropped`, as a NIC drops on a full rx ring; only where the kernel reports
/// the empty fill ring), and an egress that cannot send as fast as frames arrive for it
/// drops at its share of the transmit chunks (`tx_backlog`). TCP retransmits both. Each is
/// tolerated up to 1% of its port's frames (CI saw 3 of 48,754 and 200 of 48,533).
pub fn unexpected_drops(stats: &serde_json::Value) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for p in stats["worker"]["ports"].as_array().into_iter().flatten() {
        let (rx, tx) = (p["rx_packets"].as_u64().unwrap_or(0), p["tx_packets"].as_u64().unwrap_or(0));
        let fill_empty = p["kernel_fill_empty"].as_u64().unwrap_or(0);
        for d in p["drops"].as_array().into_iter().flatten() {
            let (reason, n) = (d[0].as_str().unwrap_or(""), d[1].as_u64().unwrap_or(0));
            let congestion = match reason {
                "xsk_rx_dropped" => fill_empty > 0 && n * 100 <= rx,
                "tx_backlog" => n * 100 <= tx,
                _ => false,
            };
            if reason != "ipv6_unsupported" && !congestion {
                v.push((reason.to_string(), n));
            }
        }
    }
    v
}

pub const CNI_BIN: &str = env!("CARGO_BIN_EXE_vxnat-cni");

/// Runs a CNI plugin in `node`'s namespace (where the runtime would run it) with the spec's
/// environment and `conf` on stdin; returns the exit code and the JSON it printed.
pub fn cni_call(
    node: &NodeNs,
    plugin: &str,
    cmd: &str,
    container: &str,
    netns: &str,
    conf: &str,
) -> (i32, serde_json::Value) {
    let dir = PathBuf::from(CNI_BIN).parent().expect("bin dir").to_path_buf();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.ns.name, plugin])
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=cni-test")
        .env("CNI_PATH", format!("/usr/lib/cni:{}", dir.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin");
    child.stdin.take().expect("stdin").write_all(conf.as_bytes()).expect("write conf");
    let out = child.wait_with_output().expect("plugin output");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

pub fn cni_conf(name: &str, socket: &std::path::Path, data_dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "vxnat-cni",
        "socket": socket,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.0.0/24", "rangeStart": "10.244.0.10", "rangeEnd": "10.244.0.50"}]],
            "dataDir": data_dir,
        },
        "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
    })
}

/// An event counted on any of the node's ports (`stats_json`).
pub fn event(stats: &serde_json::Value, name: &str) -> u64 {
    let mut n = 0;
    for p in stats["worker"]["ports"].as_array().into_iter().flatten() {
        for e in p["events"].as_array().into_iter().flatten() {
            if e[0].as_str() == Some(name) {
                n += e[1].as_u64().unwrap_or(0);
            }
        }
    }
    n
}

/// A TCP server in `pod` that answers each connection with `name` (and, with `report_peer`,
/// " <peer address it saw>") and closes first, until `stop`.
pub fn who_server(
    pod: &Pod,
    name: &'static str,
    report_peer: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let ip = pod.ip;
    pod.ns.spawn(move || {
        let l = std::net::TcpListener::bind((ip, 8080)).expect("listen");
        l.set_nonblocking(true).expect("nonblocking");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, peer)) => {
                    let _ = c.set_nonblocking(false);
                    let text = if report_peer { format!("{name} {}", peer.ip()) } else { name.to_string() };
                    let _ = std::io::Write::write_all(&mut c, text.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// Polls `f` every 20 ms for up to `limit`; true once it holds.
pub fn within(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f()
}
