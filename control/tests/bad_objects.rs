//! One bad object never blocks the rest (issue 17), on real nodes in network namespaces (the
//! demo cluster of `common`, followed through its state file):
//! - a conflicting Node (its podCIDR overlaps node-b's) and an invalid one appear next to a new
//!   Service: the Service answers within 1 s, both Nodes are named (kind, name, field) in the
//!   log, `ctl stats` and the metrics, and counted, and traffic already flowing is untouched;
//! - a pod's veth deleted without a detach is detached by itself within 1 s, and a new CNI ADD
//!   succeeds and its pod gets traffic, as does a pod given the vanished one's address.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vxnat_tests::netns::{require_root, Netns};

/// One Service through both nodes: 10.96.0.50:80 to a2 (node A) and b1 (node B), port 8080.
const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.50, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;

/// The incident: a Node whose podCIDR overlaps node-b's, an invalid one, and a new Service
/// (10.96.0.81, backed by b2 on node B: reaching it from node A needs node B's route intact).
const INCIDENT: &str = r#"
---
apiVersion: v1
kind: Node
metadata:
  name: node-x
  annotations: {flannel.alpha.coreos.com/public-ip: 192.168.77.9}
spec: {podCIDR: 10.244.1.0/25}
---
apiVersion: v1
kind: Node
metadata: {name: node-y}
spec: {podCIDR: 10.244.7.0/99}
status: {addresses: [{type: InternalIP, address: 192.168.77.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: added, namespace: default}
spec: {clusterIP: 10.96.0.81, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: added-x1, namespace: default, labels: {kubernetes.io/service-name: added}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.3], conditions: {ready: true}, nodeName: node-b}
"#;

/// A TCP server on `ip`:8080 in `ns` answering each connection with `name`, until `stop`.
fn who_server(ns: &Netns, ip: Ipv4Addr, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    ns.spawn(move || {
        let l = TcpListener::bind((ip, 8080)).expect("listen");
        l.set_nonblocking(true).expect("nonblocking");
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.write_all(name.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// One connection from `ns` to `ip:port`: what the server said.
fn fetch(ns: &Netns, ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<String, String> {
    let ns = Netns { name: ns.name.clone() };
    let h = ns.spawn(move || {
        let mut c = TcpStream::connect_timeout(&(ip, port).into(), timeout).map_err(|e| e.kind().to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
        let mut s = String::new();
        c.read_to_string(&mut s).map_err(|e| e.to_string())?;
        Ok(s)
    });
    // Not ours to delete: the namespace belongs to the cluster.
    std::mem::forget(ns);
    h.join().expect("client")
}

/// `GET /metrics` from inside the node's namespace (the default metrics address).
fn metrics(n: &NodeNs) -> String {
    n.ns.spawn(|| {
        let Ok(mut c) = TcpStream::connect_timeout(&"127.0.0.1:9478".parse().expect("addr"), Duration::from_secs(2))
        else {
            return String::new();
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        s
    })
    .join()
    .expect("GET /metrics")
}

fn log(n: &NodeNs) -> String {
    std::fs::read_to_string(&n.log).unwrap_or_default()
}

fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    if h == 0 {
        h = 0xcbf2_9ce4_8422_2325;
    }
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[test]
fn a_conflicting_node_next_to_a_new_service_blocks_nothing() {
    if !require_root("a_conflicting_node_next_to_a_new_service_blocks_nothing") {
        return;
    }
    let c = cluster_with(WEB);
    let state = c._dir.0.join("cluster.yaml");
    let base = std::fs::read_to_string(&state).expect("state");
    let (a1, a2, b1, b2) = (&c.pods[0], &c.pods[1], &c.pods[2], &c.pods[3]);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        who_server(&a2.ns, a2.ip, "a2", stop.clone()),
        who_server(&b1.ns, b1.ip, "b1", stop.clone()),
        who_server(&b2.ns, b2.ip, "b2", stop.clone()),
    ];
    // Traffic already flowing across the tunnel to node B: a paced pod-to-pod stream (~1.5 s),
    // hashed at both ends.
    const LEN: usize = 8 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 4093) as u8).collect();
    let want = fnv1a(&data, 0);
    let b1_ip = b1.ip;
    let sink = b1.ns.spawn(move || {
        let l = TcpListener::bind((b1_ip, 9000)).expect("listen");
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let (mut n, mut h) = (0usize, 0u64);
        while let Ok(k @ 1..) = s.read(&mut buf) {
            h = fnv1a(&buf[..k], h);
            n += k;
        }
        (n, h)
    });
    std::thread::sleep(Duration::from_millis(200));
    let source = a1.ns.spawn(move || {
        let mut s =
            TcpStream::connect_timeout(&(b1_ip, 9000).into(), Duration::from_secs(3)).map_err(|e| e.to_string())?;
        for chunk in data.chunks(64 << 10) {
            s.write_all(chunk).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(12));
        }
        Ok::<(), String>(())
    });
    std::thread::sleep(Duration::from_millis(300));
    // The bad Nodes and the new Service appear together.
    let t0 = Instant::now();
    std::fs::write(&state, format!("{base}{INCIDENT}")).expect("write state");
    let mut answered = None;
    while t0.elapsed() < Duration::from_secs(3) {
        if fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 81), 80, Duration::from_millis(200)).as_deref() == Ok("b2") {
            answered = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let answered = answered.unwrap_or_else(|| panic!("the new Service never answered:\n{}", log(&c.nodes[0])));
    println!("new Service next to the conflicting Node: answered after {answered:?}");
    assert!(answered < Duration::from_secs(1), "the new Service answered after {answered:?}");
    // From node B too, whose own range the newcomer overlaps.
    assert_eq!(fetch(&b1.ns, Ipv4Addr::new(10, 96, 0, 81), 80, Duration::from_secs(2)).as_deref(), Ok("b2"));
    // Traffic that was flowing is untouched; the Service that was there still reaches both nodes.
    assert_eq!(source.join().expect("stream source"), Ok(()));
    assert_eq!(sink.join().expect("stream sink"), (LEN, want), "the stream to node B lost nothing");
    let mut seen: Vec<String> =
        (0..12).filter_map(|_| fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 50), 80, Duration::from_secs(2)).ok()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["a2", "b1"], "the existing Service reaches both endpoints");
    assert!(ping(&a1.ns, b1.ip) && ping(&b2.ns, a1.ip), "pod to pod both ways");
    // Node A still routes node-b's whole range to node-b, and not to the newcomer.
    let ports: serde_json::Value =
        serde_json::from_str(&c.nodes[0].ctl(&["--json", "ports"]).expect("ports")).expect("ports JSON");
    let remotes: Vec<(String, String)> = ports["remotes"]
        .as_array()
        .expect("remotes")
        .iter()
        .map(|r| (r["node"].as_str().unwrap_or("").into(), r["pod_cidr"].as_str().unwrap_or("").into()))
        .collect();
    assert_eq!(remotes, [("node-b".to_string(), "10.244.1.0/24".to_string())]);
    // Named (kind, name, field) and counted: the log, ctl stats (JSON and text), the metrics.
    for (n, overlap) in [
        (&c.nodes[0], "overlaps Node node-b's podCIDR 10.244.1.0/24"),
        (&c.nodes[1], "overlaps this node's (node-b) podCIDR"),
    ] {
        let s = n.stats_json();
        let current = s["skipped"]["current"].as_array().cloned().unwrap_or_default();
        let msg = |name: &str| {
            current
                .iter()
                .find(|p| p["kind"] == "Node" && p["name"] == name)
                .and_then(|p| p["message"].as_str())
                .unwrap_or_else(|| panic!("{}: Node {name} not reported: {}", n.name, s["skipped"]))
                .to_string()
        };
        let x = msg("node-x");
        assert!(x.starts_with("Node node-x: spec.podCIDR: 10.244.1.0/25 ") && x.contains(overlap), "{}: {x}", n.name);
        let y = msg("node-y");
        assert!(y.starts_with("Node node-y: spec.podCIDR: \"10.244.7.0/99\" is not an IPv4 CIDR"), "{}: {y}", n.name);
        assert_eq!(current.len(), 2, "{}: {current:?}", n.name);
        assert_eq!(s["skipped"]["total"], serde_json::json!([["Node", 2], ["Service", 0]]), "{}", n.name);
        let text = n.ctl(&["stats"]).expect("stats");
        assert!(text.contains("skipped Node node-x: Node node-x: spec.podCIDR") && text.contains("Node 2"), "{text}");
        let l = log(n);
        assert!(
            l.contains("skipped: Node node-x: spec.podCIDR: 10.244.1.0/25") && l.contains("skipped: Node node-y"),
            "{l}"
        );
        let m = metrics(n);
        assert!(m.contains("vxnat_skipped_objects{kind=\"Node\"} 2"), "{m}");
        assert!(m.contains("vxnat_objects_skipped_total{kind=\"Node\"} 2"), "{m}");
    }
    // Fixed in the state: no longer skipped, and node-y is routed.
    std::fs::write(
        &state,
        format!(
            "{base}{}",
            INCIDENT.replace("10.244.7.0/99", "10.244.7.0/24").replace("10.244.1.0/25", "10.244.8.0/24")
        ),
    )
    .expect("write state");
    let t = Instant::now();
    while c.nodes[0].stats_json()["skipped"]["current"].as_array().is_some_and(|v| !v.is_empty()) {
        assert!(t.elapsed() < Duration::from_secs(3), "still skipped: {}", c.nodes[0].stats_json()["skipped"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(log(&c.nodes[0]).contains("Node node-x: no longer skipped"));
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
}

#[test]
fn a_vanished_pod_veth_is_detached_and_cni_add_still_works() {
    if !require_root("a_vanished_pod_veth_is_detached_and_cni_add_still_works") {
        return;
    }
    let c = cluster_with(WEB);
    let (a1, a2, b1) = (&c.pods[0], &c.pods[1], &c.pods[2]);
    let a = &c.nodes[0];
    let stop = Arc::new(AtomicBool::new(false));
    let sb = who_server(&b1.ns, b1.ip, "b1", stop.clone());
    assert!(a.ctl(&["ports"]).expect("ports").contains(&a2.host_if));
    // The veth goes without a detach (as when a runtime removes the sandbox without CNI DEL).
    let t0 = Instant::now();
    a.ns.ip(&["link", "del", &a2.host_if]);
    let mut gone = None;
    while t0.elapsed() < Duration::from_secs(3) {
        if !a.ctl(&["ports"]).expect("ports").contains(&a2.host_if) {
            gone = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let gone =
        gone.unwrap_or_else(|| panic!("{} still attached 3 s after its veth was deleted:\n{}", a2.host_if, log(a)));
    println!("veth deleted to port detached: {gone:?}");
    assert!(gone < Duration::from_secs(1), "detached after {gone:?}");
    let l = log(a);
    assert!(l.contains(&format!("pod {} on {}: its interface vanished without a detach", a2.ip, a2.host_if)), "{l}");
    assert_eq!(a.stats_json()["pods_vanished"], 1);
    assert!(metrics(a).contains("vxnat_pods_vanished_total 1"));
    // The pods file no longer lists it, so a restart would not try it.
    let mut pods_file = a.socket.clone().into_os_string();
    pods_file.push(".pods.json");
    let pods = std::fs::read_to_string(&pods_file).expect("pods file");
    assert!(!pods.contains(&a2.host_if) && pods.contains(&a1.host_if), "{pods}");
    // A new pod through the CNI plugin, as a runtime adds one: it succeeds and gets traffic.
    let data = c._dir.0.join("ipam");
    let conf = cni_conf(&format!("vxnat-e2e-{}", rand_suffix()), &a.socket, &data);
    let pod = Netns::new("cnipod");
    let netns = format!("/var/run/netns/{}", pod.name);
    let (code, r) = cni_call(a, CNI_BIN, "ADD", "bad-objects-1", &netns, &conf.to_string());
    assert_eq!(code, 0, "CNI ADD after a vanished veth: {r}");
    let ip: Ipv4Addr = r["ips"][0]["address"]
        .as_str()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .expect("address");
    assert!(ping(&b1.ns, ip), "pod on node B -> the new pod");
    assert_eq!(fetch(&pod, b1.ip, 8080, Duration::from_secs(2)).as_deref(), Ok("b1"), "the new pod -> a pod on node B");
    // The vanished pod's address is free again: a new veth attached with it gets traffic.
    let again = make_pod(&a.ns, "vxa9", a2.ip);
    a.ctl(&["attach", "--ifname", "vxa9", "--ip", &a2.ip.to_string()]).expect("attach with the vanished pod's address");
    assert!(ping(&b1.ns, again.ip), "pod on node B -> the vanished pod's address, now vxa9");
    assert!(ping(&a1.ns, b1.ip), "the other pods are untouched");
    let (code, out) = cni_call(a, CNI_BIN, "DEL", "bad-objects-1", &netns, &conf.to_string());
    assert_eq!(code, 0, "DEL: {out}");
    assert_eq!(a.stats_json()["pods_vanished"], 1, "a detach through DEL is no vanishing");
    stop.store(true, Ordering::Relaxed);
    let _ = sb.join();
}
