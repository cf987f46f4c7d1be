//! The `vxnat` daemon end to end, in network namespaces: two nodes (vxnat in each, started
//! with `vxnat run`) joined by a veth underlay, two pods per node attached with `vxnat ctl
//! attach` (MAC learned from the veth peer), pods keeping their default offloads. The state
//! file is `configs/demo-cluster.yaml`, the one the demo uses.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vxnat_tests::netns::{require_root, send_raw, udp_datagrams, Netns};

#[test]
fn two_vxnat_nodes_carry_pod_and_node_traffic() {
    if !require_root("two_vxnat_nodes_carry_pod_and_node_traffic") {
        return;
    }
    let c = cluster();
    let (a1, a2, b1, b2) = (&c.pods[0], &c.pods[1], &c.pods[2], &c.pods[3]);
    assert!(ping(&a1.ns, b1.ip), "a1 -> b1");
    assert!(ping(&a1.ns, a2.ip), "a1 -> a2 (same node)");
    assert!(ping(&b2.ns, a2.ip), "b2 -> a2");
    // The node's own stack reaches local and remote pods through the host port.
    assert!(ping(&c.nodes[0].ns, a1.ip), "node A -> a1 via host port");
    assert!(ping(&c.nodes[0].ns, b1.ip), "node A -> b1 via host port and VXLAN");
    tcp(a1, b1, 64 << 20, 7000);
    tcp(b2, a2, 8 << 20, 7100);
    tcp(a2, a1, 8 << 20, 7200);
    assert!(udp(a2, b2, 7300) >= 98, "UDP a2 -> b2");
    std::thread::sleep(Duration::from_millis(300));
    // The ctl socket is the operator's only: mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&c.nodes[0].socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ctl socket mode {mode:o}");
    // Detach: the pod port is gone from `ports`, its XDP program removed, its traffic stops;
    // the other pods are unaffected.
    c.nodes[0].ctl(&["detach", "--ifname", "vxa2"]).expect("detach");
    let ports = c.nodes[0].ctl(&["ports"]).expect("ports");
    assert!(!ports.contains("vxa2") && ports.contains("vxa1"), "{ports}");
    let link = String::from_utf8_lossy(&c.nodes[0].ns.ip(&["link", "show", "vxa2"]).stdout).to_string();
    assert!(!link.contains("xdp"), "XDP left on a detached port: {link}");
    assert!(!ping(&a2.ns, b1.ip), "a detached pod still reaches the cluster");
    assert!(ping(&a1.ns, b1.ip), "a1 -> b1 after detaching a2");
    assert!(c.nodes[0].ctl(&["detach", "--ifname", "vxa2"]).unwrap_err().contains("not attached"));
    for n in &c.nodes {
        let s = n.stats_json();
        assert_eq!(s["worker"]["umem_balanced"], true, "{}: UMEM chunks unaccounted: {}", n.name, s["worker"]);
        let unexpected = unexpected_drops(&s);
        assert!(unexpected.is_empty(), "{}: unexpected drops {unexpected:?}: {}", n.name, s["worker"]["ports"]);
        let text = n.ctl(&["stats"]).expect("stats");
        assert!(text.contains("all accounted for"), "{text}");
    }
}

/// `pod_tx = "packet-gro"`: frames toward pods are merged by software GRO and leave through a
/// packet socket with virtio-net headers, as aggregated frames the pods' kernels take whole.
/// Real TCP stacks judge them: data across nodes and on one node, both directions, hashed;
/// UDP and ping unaffected; the merging happened (segments per aggregated frame > 2) and every
/// UMEM chunk is accounted for (the packet socket path returns chunks at once).
#[test]
fn aggregated_frames_to_pods_carry_tcp_intact() {
    if !require_root("aggregated_frames_to_pods_carry_tcp_intact") {
        return;
    }
    let c = cluster_with_config("", "pod_tx = \"packet-gro\"\n");
    let (a1, a2, b1, b2) = (&c.pods[0], &c.pods[1], &c.pods[2], &c.pods[3]);
    assert!(ping(&a1.ns, b1.ip), "a1 -> b1");
    tcp(a1, b1, 64 << 20, 7000);
    tcp(b2, a2, 16 << 20, 7100);
    tcp(a2, a1, 16 << 20, 7200);
    assert!(udp(a2, b2, 7300) >= 98, "UDP a2 -> b2");
    std::thread::sleep(Duration::from_millis(300));
    for n in &c.nodes {
        let s = n.stats_json();
        let (frames, segs) =
            (s["worker"]["gro_frames"].as_u64().unwrap_or(0), s["worker"]["gro_segments"].as_u64().unwrap_or(0));
        eprintln!("{}: {segs} segments to pods in {frames} aggregated frames", n.name);
        assert!(frames > 0 && segs > 2 * frames, "{}: merged: {frames} frames, {segs} segments", n.name);
        assert_eq!(s["worker"]["umem_balanced"], true, "{}: {}", n.name, s["worker"]);
        let unexpected = unexpected_drops(&s);
        assert!(unexpected.is_empty(), "{}: unexpected drops {unexpected:?}", n.name);
        assert!(n.ctl(&["stats"]).expect("stats").contains("aggregated frames"));
    }
}

#[test]
fn restarts_leave_the_datapath_for_the_successor_and_cleanup_removes_it() {
    if !require_root("restarts_leave_the_datapath_for_the_successor_and_cleanup_removes_it") {
        return;
    }
    let mut c = cluster();
    let (a1_ns, b1_ip) = (c.pods[0].ns.name.clone(), c.pods[2].ip);
    let a1 = || Netns { name: a1_ns.clone() };
    let check = |c: &Cluster| {
        let p = a1();
        let ok = ping(&p, b1_ip);
        std::mem::forget(p);
        assert!(
            ok,
            "a1 -> b1 after restart; node A log: {}",
            std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default()
        );
    };
    check(&c);
    let link = |c: &Cluster, ifname: &str| {
        String::from_utf8_lossy(&c.nodes[0].ns.ip(&["link", "show", ifname]).stdout).to_string()
    };
    // SIGTERM (a restart, an upgrade) leaves the datapath for the successor: programs, host
    // port, nftables table and flow file stay; only the socket goes.
    c.nodes[0].stop();
    assert!(link(&c, "ul").contains("xdp"), "uplink program removed on SIGTERM: {}", link(&c, "ul"));
    assert!(link(&c, "vxa1").contains("xdp"), "pod program removed on SIGTERM: {}", link(&c, "vxa1"));
    assert!(c.nodes[0].ns.exec(&["ip", "link", "show", "vxnat0"]).status.success(), "host port removed on SIGTERM");
    assert!(c.nodes[0].ns.exec(&["nft", "list", "table", "ip", "vxnat"]).status.success(), "nftables table removed");
    assert!(!c.nodes[0].socket.exists(), "ctl socket left behind");
    let mut flows = c.nodes[0].socket.clone().into_os_string();
    flows.push(".flows");
    assert!(std::path::Path::new(&flows).exists(), "no flow file for the successor");
    c.nodes[0].start();
    let ports = c.nodes[0].ctl(&["ports"]).expect("ports");
    assert!(ports.contains("vxa1") && ports.contains("vxa2"), "pods not re-attached after restart: {ports}");
    check(&c);
    c.nodes[0].kill9();
    c.nodes[0].start();
    check(&c);
    // `vxnat cleanup` (an uninstall) is refused while vxnat runs, and afterwards removes it all.
    let (ns_name, config) = (c.nodes[0].ns.name.clone(), c.nodes[0].config.clone());
    let cleanup = move || {
        Command::new("ip")
            .args(["netns", "exec", &ns_name, BIN, "cleanup", "--config"])
            .arg(&config)
            .output()
            .expect("vxnat cleanup")
    };
    let refused = cleanup();
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("locked"),
        "cleanup while running: {refused:?}"
    );
    c.nodes[0].stop();
    assert!(cleanup().status.success());
    assert!(!link(&c, "ul").contains("xdp") && !link(&c, "vxa1").contains("xdp"), "XDP left after cleanup");
    assert!(!c.nodes[0].ns.exec(&["ip", "link", "show", "vxnat0"]).status.success(), "host port left after cleanup");
    assert!(!c.nodes[0].ns.exec(&["nft", "list", "table", "ip", "vxnat"]).status.success(), "nftables table left");
    assert!(!std::path::Path::new(&flows).exists(), "flow file left after cleanup");
}

#[test]
fn hostile_frames_are_named_in_ctl_stats() {
    if !require_root("hostile_frames_are_named_in_ctl_stats") {
        return;
    }
    let c = cluster();
    let a1 = &c.pods[0];
    let pod_mac = a1.ns.mac("eth0");
    let port_mac = c.nodes[0].ns.mac(&a1.host_if);
    use dataplane::testkit::{eth, ipv4, L4};
    let good = ipv4(a1.ip, c.pods[2].ip, &L4::Udp { sport: 1, dport: 2, payload: b"x" });
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x43;
    let frames = vec![
        eth(port_mac, pod_mac, 0x0800, &good[..12]), // ipv4_truncated
        eth(port_mac, pod_mac, 0x0800, &bad_ihl),    // ipv4_bad_length
        eth(
            port_mac,
            pod_mac,
            0x0800,
            &ipv4(Ipv4Addr::new(10, 244, 0, 66), c.pods[2].ip, &L4::Udp { sport: 1, dport: 2, payload: b"x" }),
        ), // pod_spoofed_ip
        eth(port_mac, dataplane::wire::MacAddr([2, 9, 9, 9, 9, 9]), 0x0800, &good), // pod_spoofed_mac
    ];
    a1.ns.spawn(move || send_raw("eth0", &frames)).join().expect("raw send");
    // On the uplink: VXLAN from an address that is not a node, and with the wrong VNI.
    let b = &c.nodes[1].ns;
    b.ip(&["addr", "add", "192.168.77.9/24", "dev", "ul"]);
    b.spawn(|| {
        let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        vx.extend_from_slice(&[0u8; 60]);
        let stranger = UdpSocket::bind((Ipv4Addr::new(192, 168, 77, 9), 0)).expect("bind");
        stranger.send_to(&vx, (Ipv4Addr::new(192, 168, 77, 1), 8472)).expect("send");
        let mut wrong_vni = vx.clone();
        wrong_vni[6] = 2;
        let node_b = UdpSocket::bind((Ipv4Addr::new(192, 168, 77, 2), 0)).expect("bind");
        node_b.send_to(&wrong_vni, (Ipv4Addr::new(192, 168, 77, 1), 8472)).expect("send");
    })
    .join()
    .expect("uplink senders");
    std::thread::sleep(Duration::from_millis(500));
    let text = c.nodes[0].ctl(&["stats"]).expect("stats");
    for name in [
        "ipv4_truncated",
        "ipv4_bad_length",
        "pod_spoofed_ip",
        "pod_spoofed_mac",
        "vxlan_unknown_vtep",
        "vxlan_wrong_vni",
    ] {
        assert!(text.contains(name), "ctl stats does not name {name}:\n{text}");
    }
    assert!(text.contains("VXLAN from an address that is not a known node"), "help lines missing:\n{text}");
}

#[test]
fn underlay_changes_are_followed() {
    if !require_root("underlay_changes_are_followed") {
        return;
    }
    let c = cluster();
    let (a1, b1) = (&c.pods[0], &c.pods[2]);
    assert!(ping(&a1.ns, b1.ip), "a1 -> b1 before the change");
    let ports = |n: usize| -> serde_json::Value {
        serde_json::from_str(&c.nodes[n].ctl(&["ports"]).expect("ports")).expect("json")
    };
    // Node B's underlay NIC gets a new MAC; node A's kernel learns it (a neighbour update, as a
    // gratuitous ARP would cause). Both vxnats must follow within the refresh triggered by the
    // kernel's change notifications, well before the 10 s periodic refresh.
    let new_mac = "02:77:00:00:00:02";
    let start = Instant::now();
    c.nodes[1].ns.ip(&["link", "set", "ul", "address", new_mac]);
    c.nodes[0].ns.ip(&["neigh", "replace", "192.168.77.2", "lladdr", new_mac, "dev", "ul", "nud", "reachable"]);
    let mut followed = false;
    while start.elapsed() < Duration::from_secs(4) {
        let a = ports(0);
        let b = ports(1);
        if a["remotes"][0]["next_hop_mac"] == new_mac && b["uplink_mac"] == new_mac {
            followed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(followed, "not followed within 4 s: node A {} / node B {}", ports(0)["remotes"], ports(1)["uplink_mac"]);
    assert!(ping(&a1.ns, b1.ip), "a1 -> b1 after the change");
}

const SERVICES: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    clusterIP: 10.96.0.50
    ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-x1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
- apiVersion: v1
  kind: Service
  metadata: {name: dns, namespace: default}
  spec:
    clusterIP: 10.96.0.53
    ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: dns-x1, namespace: default, labels: {kubernetes.io/service-name: dns}}
  addressType: IPv4
  ports: [{name: dns, port: 5353, protocol: UDP}]
  endpoints:
  - {addresses: [10.244.1.3], conditions: {ready: true}, nodeName: node-b}
- apiVersion: v1
  kind: Service
  metadata: {name: empty, namespace: default}
  spec:
    clusterIP: 10.96.0.60
    ports: [{name: http, port: 80, protocol: TCP}]
- apiVersion: v1
  kind: Service
  metadata: {name: sticky, namespace: default}
  spec:
    clusterIP: 10.96.0.51
    sessionAffinity: ClientIP
    sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
    ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: sticky-x1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;

fn fetch(from: &Netns, vip: Ipv4Addr, n: usize) -> Vec<Result<String, String>> {
    fetch_port(from, vip, 80, n)
}

#[test]
fn cluster_ip_services_reach_endpoints_on_both_nodes() {
    if !require_root("cluster_ip_services_reach_endpoints_on_both_nodes") {
        return;
    }
    let c = cluster_with(SERVICES);
    let (a1, a2, b1, b2) = (&c.pods[0], &c.pods[1], &c.pods[2], &c.pods[3]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sa = who_server(a2, "a2", false, stop.clone());
    let sb = who_server(b1, "b1", false, stop.clone());
    let b2_ip = b2.ip;
    let dns = b2.ns.spawn(move || {
        let u = UdpSocket::bind((b2_ip, 5353)).expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(4))).expect("timeout");
        let mut buf = [0u8; 512];
        let mut answered = 0;
        while let Ok((k, peer)) = u.recv_from(&mut buf) {
            let mut a = b"answer:".to_vec();
            a.extend_from_slice(&buf[..k]);
            let _ = u.send_to(&a, peer);
            answered += 1;
        }
        answered
    });
    std::thread::sleep(Duration::from_millis(300));
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let got = fetch(&a1.ns, vip, 40);
    let sticky = fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 51), 20);
    let from_node = fetch(&c.nodes[0].ns, vip, 6);
    let refused = fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 60), 1);
    let a1_ip = a1.ip;
    let udp = a1
        .ns
        .spawn(move || {
            let u = UdpSocket::bind((a1_ip, 0)).expect("bind");
            u.connect((Ipv4Addr::new(10, 96, 0, 53), 53)).expect("connect"); // replies must come from the Service address
            u.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            u.send(b"ping").expect("send");
            let mut buf = [0u8; 512];
            u.recv(&mut buf).map(|k| String::from_utf8_lossy(&buf[..k]).to_string()).map_err(|e| e.to_string())
        })
        .join()
        .expect("udp client");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = (sa.join(), sb.join());
    let _ = dns.join();
    let ok: Vec<&String> = got.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 40, "every connection to the ClusterIP served: {got:?}");
    assert!(ok.iter().any(|s| *s == "a2") && ok.iter().any(|s| *s == "b1"), "both endpoints used: {ok:?} ");
    assert!(from_node.iter().all(|r| r.is_ok()), "the node reaches the ClusterIP through the host port: {from_node:?}");
    let outcomes = sticky;
    let sticky: std::collections::BTreeSet<&str> = outcomes.iter().map(|r| r.as_deref().unwrap_or("failed")).collect();
    assert_eq!(
        sticky.len(),
        1,
        "ClientIP affinity: every connection of the client on one endpoint: {outcomes:?}\nnode A: {}",
        c.nodes[0].ctl(&["stats"]).unwrap_or_default()
    );
    assert!(!sticky.contains("failed"), "{outcomes:?}");
    assert_eq!(
        refused[0].as_ref().err().map(String::as_str),
        Some("connection refused"),
        "no endpoint: refused at once (ICMP port unreachable, as kube-proxy rejects)"
    );
    assert_eq!(udp.as_deref(), Ok("answer:ping"), "UDP Service answer from the Service address");
    let stats = c.nodes[0].ctl(&["stats"]).expect("stats");
    assert!(stats.contains("service_no_endpoint") && stats.contains("service_flows"), "{stats}");
}

const NODE_PORTS: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: np, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.70
    externalTrafficPolicy: Cluster
    ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: np-x1, namespace: default, labels: {kubernetes.io/service-name: np}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
- apiVersion: v1
  kind: Service
  metadata: {name: nplocal, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.71
    externalTrafficPolicy: Local
    ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30081}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: nplocal-x1, namespace: default, labels: {kubernetes.io/service-name: nplocal}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;

fn fetch_port(from: &Netns, ip: Ipv4Addr, port: u16, n: usize) -> Vec<Result<String, String>> {
    fetch_port_timeout(from, ip, port, n, Duration::from_secs(3))
}

fn fetch_port_timeout(
    from: &Netns,
    ip: Ipv4Addr,
    port: u16,
    n: usize,
    timeout: Duration,
) -> Vec<Result<String, String>> {
    let ns = Netns { name: from.name.clone() };
    let h = ns.spawn(move || {
        (0..n)
            .map(|_| {
                let mut c =
                    TcpStream::connect_timeout(&(ip, port).into(), timeout).map_err(|e| e.kind().to_string())?;
                c.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                let mut s = String::new();
                c.read_to_string(&mut s).map_err(|e| e.to_string())?;
                Ok(s)
            })
            .collect()
    });
    std::mem::forget(ns);
    h.join().expect("client")
}

#[test]
fn node_ports_from_a_client_outside_the_cluster() {
    if !require_root("node_ports_from_a_client_outside_the_cluster") {
        return;
    }
    let c = cluster_with(NODE_PORTS);
    let (a2, b1) = (&c.pods[1], &c.pods[2]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sa = who_server(a2, "a2", true, stop.clone());
    let sb = who_server(b1, "b1", true, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let node_a = Ipv4Addr::new(192, 168, 77, 1);
    let node_b = Ipv4Addr::new(192, 168, 77, 2);
    let cluster =
        fetch_port(&c.client, node_a, 30080, if std::env::var_os("VXNAT_E2E_QUICK").is_some() { 2 } else { 30 });
    // The node itself (kubelet, hostNetwork pods) uses its NodePort too.
    let from_node = fetch_port(&c.nodes[0].ns, node_a, 30080, 12);
    let local_a = fetch_port(&c.client, node_a, 30081, 10);
    let local_b = fetch_port(&c.client, node_b, 30081, 10);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = (sa.join(), sb.join());
    let ok: Vec<&String> = cluster.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        ok.len(),
        30,
        "every NodePort connection served: {cluster:?}\n{}",
        c.nodes[0].ctl(&["stats"]).unwrap_or_default()
    );
    assert!(
        ok.iter().any(|s| s.starts_with("a2")) && ok.iter().any(|s| s.starts_with("b1")),
        "Cluster policy spreads over both nodes: {ok:?}"
    );
    assert!(ok.iter().all(|s| s.ends_with(" 10.244.0.1")), "Cluster policy: endpoints see node A's address: {ok:?}");
    let from_node_ok: Vec<&String> = from_node.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(from_node_ok.len(), 12, "NodePort from the node itself: {from_node:?}");
    assert!(
        from_node_ok.iter().any(|s| s.starts_with("b1")),
        "from the node, also to the remote endpoint: {from_node_ok:?}"
    );
    for (r, want) in [(&local_a, "a2 192.168.77.100"), (&local_b, "b1 192.168.77.100")] {
        assert!(
            r.iter().all(|x| x.as_deref() == Ok(want)),
            "Local policy: the local endpoint, which sees the client: {r:?}"
        );
    }
}

const ONE_BACKEND: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: lb, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.80
    externalTrafficPolicy: Cluster
    ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30090}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: lb-x1, namespace: default, labels: {kubernetes.io/service-name: lb}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
"#;

/// Incident 2 (shared/docs/incidents.md): a load balancer's short connections through a
/// NodePort with externalTrafficPolicy Cluster; the backend closes first, so it holds each
/// 5-tuple in TIME_WAIT; the SNAT range is tiny (8 ports for 20 connections) so tuples must
/// be reused while the backend holds them. vxnat reuses them with sequence/timestamp offsets
/// (real kernel: the backend's `tcp_timewait_state_process` judges each SYN): every
/// connection is served, no SYN reaching the backend is answered by a bare ACK.
#[test]
fn incident_2_snat_reuses_tuples_the_backend_holds_in_time_wait_without_a_bare_ack() {
    if !require_root("incident_2_snat_reuses_tuples_the_backend_holds_in_time_wait_without_a_bare_ack") {
        return;
    }
    let c = cluster_with_config(ONE_BACKEND, "[nat]\nsnat_ports = \"20000-20007\"\nsnat_hold_s = 120\n");
    let a2 = &c.pods[1];
    let pcap = c._dir.0.join("backend.pcap");
    let mut dump = Command::new("ip")
        .args(["netns", "exec", &a2.ns.name, "tcpdump", "-i", "eth0", "-nn", "-U", "-w"])
        .arg(&pcap)
        .args(["tcp", "port", "8080"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    // The backend writes and closes first: it keeps every connection's tuple in TIME_WAIT.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = who_server(a2, "a2", true, stop.clone());
    std::thread::sleep(Duration::from_millis(800));
    let results = fetch_port(&c.client, Ipv4Addr::new(192, 168, 77, 1), 30090, 20);
    // Then 20 more with a backend that does not use TCP timestamps: the first 8 reuse tuples
    // whose marks carry a TSval, the rest tuples marked without one (sequence offsets alone).
    let ts_off = a2.ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_timestamps=0"]);
    assert!(ts_off.status.success(), "{ts_off:?}");
    let results_no_ts = fetch_port(&c.client, Ipv4Addr::new(192, 168, 77, 1), 30090, 20);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    let _ = Command::new("kill").arg("-INT").arg(dump.id().to_string()).status();
    let _ = dump.wait();
    let count = |filter: &str| -> usize {
        let out = Command::new("tcpdump").args(["-nn", "-r"]).arg(&pcap).arg(filter).output().expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let syns = count("tcp[13] == 2");
    let synacks = count("tcp[13] == 18");
    let served = results.iter().filter(|r| r.is_ok()).count();
    let refused = results.iter().filter(|r| r.as_ref().err().map(String::as_str) == Some("connection refused")).count();
    let stats = c.nodes[0].ctl(&["stats"]).expect("stats");
    // The same load against the kernel path as kube-proxy's nftables mode configures it.
    let k = kernel_incident_2(&c._dir.0);
    eprintln!(
        "incident 2, 20 short connections, 8 SNAT ports, backend closing first:\n\
         | path | served | refused (RST, visible) | timed out (silent drop) | SYNs at backend | SYN|ACKs | SYNs not answered by SYN|ACK (tuple in TIME_WAIT) |\n\
         |---|---|---|---|---|---|---|\n\
         | vxnat | {served} | {refused} | {} | {syns} | {synacks} | {} |\n\
         | nftables masquerade | {} | {} | {} | {} | {} | {} |",
        20 - served - refused,
        syns.saturating_sub(synacks),
        k.served,
        k.refused,
        k.timed_out,
        k.syns,
        k.synacks,
        k.syns.saturating_sub(k.synacks)
    );
    assert!(k.served > 0, "the kernel path served nothing: the comparison is not meaningful");
    assert!(
        syns > 0 && syns == synacks,
        "every SYN at the backend answered by SYN|ACK (no bare ACK), timestamps on and off: {syns} SYNs, {synacks} SYN|ACKs"
    );
    assert_eq!(served, 20, "every connection served, 12 of them on tuples reused with offsets: {results:?}");
    assert_eq!(refused, 0, "{results:?}");
    assert!(results_no_ts.iter().all(Result::is_ok), "a backend without timestamps: {results_no_ts:?}");
    let json = c.nodes[0].stats_json();
    assert_eq!(
        json["worker"]["snat_reused_with_offsets"], 32,
        "12, then 20 with the backend's timestamps off: {stats}"
    );
    assert!(!stats.contains("snat ports exhausted"), "{stats}");
    assert!(!stats.contains("bare_ack_to_syn"), "{stats}");
}

/// A tuple reused from the backend's TIME_WAIT carries a whole connection: one SNAT port, a
/// first connection the backend closes first (it holds the tuple), then a second one on the
/// same tuple (sequence/timestamp offsets) that moves 2 MB each way over links that lose 3 % of
/// segments (dropped by nftables as each side receives them), so SACK blocks flow both ways through the
/// translation, and closes cleanly. Real kernel TCP stacks judge every segment.
#[test]
fn a_reused_tuple_carries_a_lossy_sack_transfer_both_ways_and_closes_cleanly() {
    if !require_root("a_reused_tuple_carries_a_lossy_sack_transfer_both_ways_and_closes_cleanly") {
        return;
    }
    let c = cluster_with_config(ONE_BACKEND, "[nat]\nsnat_ports = \"20000-20000\"\n");
    let a2 = &c.pods[1];
    const LEN: usize = 2 << 20;
    let (ip, stop) = (a2.ip, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let stop2 = stop.clone();
    // The backend: reads LEN bytes, answers with LEN bytes of its own and the hash of what it
    // read, then closes first (it holds the tuple in TIME_WAIT).
    let server = a2.ns.spawn(move || {
        let l = TcpListener::bind((ip, 8080)).expect("listen");
        l.set_nonblocking(true).expect("nonblocking");
        let mut served = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((mut conn, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            conn.set_nonblocking(false).expect("blocking");
            conn.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            let want = if served == 0 { 1 } else { LEN };
            let mut got = vec![0u8; want];
            if conn.read_exact(&mut got).is_err() {
                continue;
            }
            let h = vxnat_tests::netns::fnv1a(&got, 0);
            let mut answer = if served == 0 { vec![7u8] } else { vxnat_tests::netns::payload(2, LEN) };
            answer.extend_from_slice(&h.to_be_bytes());
            let _ = conn.write_all(&answer);
            served += 1;
        }
        served
    });
    std::thread::sleep(Duration::from_millis(500));
    let node = Ipv4Addr::new(192, 168, 77, 1);
    let ns = Netns { name: c.client.name.clone() };
    let client = ns.spawn(move || {
        let mut out = Vec::new();
        for (i, len) in [(0u64, 1usize), (1, LEN)] {
            let r = (|| -> Result<bool, String> {
                let mut s = TcpStream::connect_timeout(&(node, 30090).into(), Duration::from_secs(5))
                    .map_err(|e| format!("connect {i}: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
                let data = vxnat_tests::netns::payload(1 + i, len);
                s.write_all(&data).map_err(|e| format!("write {i}: {e}"))?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).map_err(|e| format!("read {i}: {e}"))?;
                let expect_len = if i == 0 { 1 } else { LEN };
                if back.len() != expect_len + 8 {
                    return Err(format!("connection {i}: {} bytes back, want {}", back.len(), expect_len + 8));
                }
                let their_hash = u64::from_be_bytes(back[expect_len..].try_into().expect("8 bytes"));
                let ours = i == 0 || back[..LEN] == vxnat_tests::netns::payload(2, LEN)[..];
                Ok(their_hash == vxnat_tests::netns::fnv1a(&data, 0) && ours)
            })();
            out.push(r);
            if i == 0 {
                // Lossy links for the second connection only: the first must close cleanly
                // for its tuple to be held with a mark.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        out
    });
    // Start the loss once the first connection is over (the client sleeps 300 ms after it).
    std::thread::sleep(Duration::from_millis(150));
    // (No sch_netem on this kernel: nftables drops 3 % of the TCP segments each side
    // receives, before its stack sees them, which is loss as TCP knows it.)
    for n in [&a2.ns, &c.client] {
        for cmd in [
            &["nft", "add", "table", "ip", "loss"][..],
            &["nft", "add", "chain", "ip", "loss", "in", "{ type filter hook prerouting priority -300; }"],
            &[
                "nft", "add", "rule", "ip", "loss", "in", "ip", "protocol", "tcp", "numgen", "random", "mod", "100",
                "<", "3", "drop",
            ],
        ] {
            let o = n.exec(cmd);
            assert!(o.status.success(), "{cmd:?} in {}: {o:?}", n.name);
        }
    }
    let results = client.join().expect("client");
    std::mem::forget(ns);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = server.join().expect("server");
    let json = c.nodes[0].stats_json();
    let stats = c.nodes[0].ctl(&["stats"]).expect("stats");
    eprintln!(
        "reused tuple transfer: {results:?}; served {served}; {}",
        stats.lines().find(|l| l.contains("SNAT tuples")).unwrap_or("")
    );
    // Each side recovered lost segments with SACK (its own stack's count, per namespace).
    let sack = |n: &Netns| -> u64 {
        let o = n.exec(&["cat", "/proc/net/netstat"]);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let (names, values) = (rows[0].split_whitespace(), rows[1].split_whitespace());
        names.zip(values).find(|(k, _)| *k == "TCPSackRecovery").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
    };
    let (sack_backend, sack_client) = (sack(&a2.ns), sack(&c.client));
    eprintln!("SACK recoveries: backend {sack_backend}, client {sack_client}");
    assert!(sack_backend > 0 && sack_client > 0, "SACK was exercised both ways");
    assert_eq!(results, vec![Ok(true), Ok(true)], "both connections intact: data and hashes both ways");
    assert_eq!(served, 2);
    assert_eq!(json["worker"]["snat_reused_with_offsets"], 1, "the second connection reused the tuple: {stats}");
    assert!(!stats.contains("bare_ack_to_syn") && !stats.contains("snat ports exhausted"), "{stats}");
}

/// A reused tuple accepts a client whose timestamps are behind the previous client's and one
/// whose ISN is behind, as real kernel TCP stacks judge them. One SNAT port and a backend
/// that closes first: every connection after the first lands on the tuple the backend holds
/// in TIME_WAIT. Captures on both sides give each SYN as the client sent it and what the
/// backend last saw of the previous connection (its `rcv_nxt` and `ts_recent`). Linux hashes
/// each connection's ISN over the 4-tuple and the client's port changes, so a raw ISN is
/// behind with probability 1/2; the timestamp clock's offset is hashed too (over the address
/// pair on older kernels, where the raw clock is behind from the third connection on, since
/// the backend saw it jump 1000 ahead on each reuse; over the 4-tuple on newer ones, behind
/// with probability 1/2). A second round with the client's timestamps off leaves the ISN the
/// only thing the backend judges. Each kind is missing with probability 2^-15 at most. Every
/// SYN at the backend must be answered by SYN|ACK, never the bare ACK that refuses it
/// (without the TSval offset the first round fails, without the sequence offset the second).
#[test]
fn reused_tuples_accept_clients_whose_isn_or_timestamps_are_behind() {
    if !require_root("reused_tuples_accept_clients_whose_isn_or_timestamps_are_behind") {
        return;
    }
    let c = cluster_with_config(ONE_BACKEND, "[nat]\nsnat_ports = \"20000-20000\"\n");
    let a2 = &c.pods[1];
    let capture = |ns: &Netns, file: &str, port: &str| {
        let pcap = c._dir.0.join(file);
        let dump = Command::new("ip")
            .args(["netns", "exec", &ns.name, "tcpdump", "-i", "eth0", "-nn", "--immediate-mode", "-U", "-w"])
            .arg(&pcap)
            .args(["tcp", "port", port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        (dump, pcap)
    };
    let (mut dump_b, pcap_b) = capture(&a2.ns, "backend.pcap", "8080");
    let (mut dump_c, pcap_c) = capture(&c.client, "client.pcap", "30090");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = who_server(a2, "a2", false, stop.clone());
    // tcpdump creates its file once it captures (and, in immediate mode, writes each packet
    // as it comes rather than when a buffer fills or times out).
    let t0 = Instant::now();
    while !(pcap_b.exists() && pcap_c.exists()) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    const N: usize = 16;
    let node = Ipv4Addr::new(192, 168, 77, 1);
    // Connections vxnat refused (`snat_ports_exhausted`: its RST) are retried after 20 ms, up
    // to 50 times, and counted. Such a SYN never reaches the backend, so it changes nothing the
    // test judges there; in 2 of 3 whole-workspace runs (never in a run of this binary alone)
    // some SYNs found the only tuple not yet reusable for a few to tens of ms after the
    // previous connection had closed at the client. Cause not found yet; a failure prints
    // vxnat's flows and both captures.
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fetch = |n: usize| -> Vec<Result<String, String>> {
        let ns = Netns { name: c.client.name.clone() };
        let refused = refused.clone();
        let h = ns.spawn(move || {
            (0..n)
                .map(|_| {
                    let mut attempt = 0;
                    let mut s = loop {
                        match TcpStream::connect_timeout(&(node, 30090).into(), Duration::from_secs(3)) {
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && attempt < 50 => {
                                attempt += 1;
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            r => break r.map_err(|e| e.kind().to_string())?,
                        }
                    };
                    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                    // Closing waits for the backend's ACK of our FIN (LAST_ACK to CLOSED): vxnat
                    // has seen the flow close and holds the tuple before the next SYN. (Without
                    // it that SYN can overtake the ACK and find the only tuple still in use.)
                    socket2::SockRef::from(&s).set_linger(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                    let mut text = String::new();
                    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
                    Ok(text)
                })
                .collect()
        });
        std::mem::forget(ns);
        h.join().expect("client")
    };
    let with_ts = fetch(N);
    let ts_off = c.client.exec(&["sysctl", "-qw", "net.ipv4.tcp_timestamps=0"]);
    assert!(ts_off.status.success(), "{ts_off:?}");
    let without_ts = fetch(N);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    for d in [&mut dump_b, &mut dump_c] {
        let _ = Command::new("kill").arg("-INT").arg(d.id().to_string()).status();
        let _ = d.wait();
    }
    let stats = c.nodes[0].ctl(&["stats"]).expect("stats");
    let json = c.nodes[0].stats_json();
    assert!(
        with_ts.iter().chain(&without_ts).all(|r| r.as_deref() == Ok("a2")),
        "every connection served: {with_ts:?} {without_ts:?}\n{stats}\nflows:\n{}\nbackend capture:\n{}",
        c.nodes[0].ctl(&["flows"]).unwrap_or_default(),
        String::from_utf8_lossy(
            &Command::new("tcpdump").args(["-nn", "-r"]).arg(&pcap_b).output().map(|o| o.stdout).unwrap_or_default()
        ),
    );
    eprintln!(
        "client capture:\n{}",
        String::from_utf8_lossy(
            &Command::new("tcpdump").args(["-nn", "-r"]).arg(&pcap_c).output().map(|o| o.stdout).unwrap_or_default()
        )
    );
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("connections refused by vxnat and retried: {refused}");
    // The client's SYNs as it sent them (a retransmission repeats port and ISN), those of
    // connections that were answered (a refused one's SYN never reached the backend).
    let segments = tcpdump_segments(&pcap_c);
    let answered: std::collections::HashSet<(String, u32)> = segments
        .iter()
        .filter(|s| s.flags.contains('S') && s.flags.contains('.'))
        .filter_map(|s| Some((s.dst.clone(), s.ack?.wrapping_sub(1))))
        .collect();
    let mut raw: Vec<(u32, Option<u32>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in segments.into_iter().filter(|s| s.flags.contains('S') && !s.flags.contains('.')) {
        let isn = s.seq.expect("SYN seq").0;
        if answered.contains(&(s.src.clone(), isn)) && seen.insert((s.src, isn)) {
            raw.push((isn, s.tsval));
        }
    }
    // At the backend, one tuple: each connection runs from its SYN to the next one, and
    // what the client side sent in it is what the backend judges the next SYN against.
    struct Conn {
        isn: u32,
        tsval: Option<u32>,
        end: u32,
        last_ts: Option<u32>,
    }
    let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
    let mut conns: Vec<Conn> = Vec::new();
    // Each SYN (retransmissions too) and what the backend answered it with first: a bare ACK
    // makes the client reset the tuple out of TIME_WAIT and retransmit, so the connection
    // is served all the same, a few milliseconds late.
    let (mut syns, mut not_syn_acked, mut waiting) = (0, Vec::new(), None::<u32>);
    for s in tcpdump_segments(&pcap_b) {
        if !s.dst.ends_with(".8080") {
            if let Some(isn) = waiting.take() {
                if !(s.flags.contains('S') && s.ack == Some(isn.wrapping_add(1))) {
                    not_syn_acked.push((conns.len() - 1, s.flags));
                }
            }
            continue;
        }
        if s.flags.contains('S') {
            let isn = s.seq.expect("SYN seq").0;
            if conns.last().is_none_or(|c| c.isn != isn) {
                conns.push(Conn { isn, tsval: s.tsval, end: isn.wrapping_add(1), last_ts: s.tsval });
            }
            syns += 1;
            waiting = Some(isn);
            continue;
        }
        let Some(conn) = conns.last_mut() else { continue };
        if let Some((_, past)) = s.seq {
            let end = past.wrapping_add(u32::from(s.flags.contains('F')));
            if after(end, conn.end) {
                conn.end = end;
            }
        }
        if let Some(ts) = s.tsval.filter(|&ts| conn.last_ts.is_none_or(|l| after(ts, l))) {
            conn.last_ts = Some(ts);
        }
    }
    assert_eq!(raw.len(), 2 * N, "client SYNs in the capture");
    assert_eq!(conns.len(), 2 * N, "SYNs at the backend");
    assert!(
        not_syn_acked.is_empty() && waiting.is_none() && syns == 2 * N,
        "every SYN at the backend answered by SYN|ACK: {syns} SYNs; (connection, answer) otherwise: \
         {not_syn_acked:?}\n{stats}"
    );
    let (mut ts_behind, mut isn_behind, mut isn_behind_no_ts) = (0, 0, 0);
    for k in 1..conns.len() {
        let (prev, now, (isn, tsval)) = (&conns[k - 1], &conns[k], raw[k]);
        // What the backend got is past what it last saw, whatever the client sent.
        assert!(after(now.isn, prev.end), "connection {k}: translated ISN {} not after {}", now.isn, prev.end);
        if let (Some(t), Some(l)) = (now.tsval, prev.last_ts) {
            assert!(after(t, l), "connection {k}: translated TSval {t} not after {l}");
        }
        if let (Some(t), Some(l)) = (tsval, prev.last_ts) {
            ts_behind += usize::from(!after(t, l));
        }
        if !after(isn, prev.end) {
            isn_behind += 1;
            isn_behind_no_ts += usize::from(tsval.is_none());
        }
    }
    eprintln!(
        "{} reused SYNs as the client sent them, against what the backend last saw on the tuple: \
         TSval behind {ts_behind} (of {} with timestamps), ISN behind {isn_behind} \
         ({isn_behind_no_ts} of {N} without timestamps); all answered by SYN|ACK",
        conns.len() - 1,
        N - 1
    );
    assert!(ts_behind > 0, "no client TSval was behind: the test shows nothing about timestamps");
    assert!(isn_behind_no_ts > 0, "no client ISN was behind (without timestamps): the test shows nothing about ISNs");
    assert_eq!(json["worker"]["snat_reused_with_offsets"], 2 * N - 1, "every connection after the first: {stats}");
    assert!(!stats.contains("bare_ack_to_syn"), "{stats}");
}

/// One TCP segment as `tcpdump -nn -S -r` prints it (absolute sequence numbers).
struct Segment {
    src: String,
    dst: String,
    /// As printed: "S" (SYN), "S." (SYN|ACK), "FP.", ...
    flags: String,
    /// The first sequence number and the one after the payload (SYN and FIN not counted),
    /// when printed: not for a bare ACK.
    seq: Option<(u32, u32)>,
    ack: Option<u32>,
    tsval: Option<u32>,
}

fn tcpdump_segments(pcap: &std::path::Path) -> Vec<Segment> {
    let out = Command::new("tcpdump").args(["-nn", "-S", "-r"]).arg(pcap).output().expect("tcpdump -r");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || f[1] != "IP" {
                return None;
            }
            let field = |key: &str| l.find(key).map(|i| l[i + key.len()..].split([',', ']']).next().unwrap_or(""));
            let num = |s: &str| s.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse::<u32>().ok());
            let seq = field(", seq ").map(|s| {
                let (a, b) = s.split_once(':').unwrap_or((s, s));
                (a.parse::<u32>().expect("seq"), b.parse::<u32>().expect("seq"))
            });
            Some(Segment {
                src: f[2].to_string(),
                dst: f[4].trim_end_matches(':').to_string(),
                flags: field("Flags [")?.to_string(),
                seq,
                ack: field(", ack ").and_then(num),
                tsval: field("TS val ").and_then(num),
            })
        })
        .collect()
}

struct KernelOutcome {
    served: usize,
    refused: usize,
    timed_out: usize,
    syns: usize,
    synacks: usize,
}

/// Incident 2's load against the kernel path: a node forwarding with nftables NodePort DNAT and
/// masquerade (kube-proxy's nftables mode: mark, DNAT, `masquerade fully-random`, here limited to
/// the same 8 ports), the same backend behaviour and client, a capture at the backend.
fn kernel_incident_2(dir: &std::path::Path) -> KernelOutcome {
    let switch = Netns::new("kswitch");
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let node = Netns::new("knode");
    let client = Netns::new("kclient");
    let backend = Netns::new("kbackend");
    for (ns, port, ifname) in [(&node, "pa", "ul"), (&client, "pc", "eth0")] {
        switch.ip(&["link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &ns.name]);
        switch.ip(&["link", "set", port, "master", "br0", "up"]);
    }
    node.ip(&["addr", "add", "192.168.77.1/24", "dev", "ul"]);
    node.ip(&["link", "set", "ul", "up"]);
    client.ip(&["addr", "add", "192.168.77.100/24", "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    node.ip(&["link", "add", "vethpod", "type", "veth", "peer", "name", "eth0", "netns", &backend.name]);
    node.ip(&["addr", "add", "10.244.0.1/24", "dev", "vethpod"]);
    node.ip(&["link", "set", "vethpod", "up"]);
    backend.ip(&["addr", "add", "10.244.0.3/24", "dev", "eth0"]);
    backend.ip(&["link", "set", "eth0", "up"]);
    backend.ip(&["route", "add", "default", "via", "10.244.0.1"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let rules = dir.join("kube-proxy.nft");
    std::fs::write(
        &rules,
        "table ip kube-proxy {\n\
           chain nat-prerouting {\n type nat hook prerouting priority dstnat; policy accept;\n\
             ip daddr 192.168.77.1 tcp dport 30090 meta mark set mark | 0x4000 dnat to 10.244.0.3:8080\n }\n\
           chain nat-postrouting {\n type nat hook postrouting priority srcnat; policy accept;\n\
             meta mark & 0x4000 == 0x4000 meta l4proto tcp masquerade to :20000-20007 fully-random\n }\n\
         }\n",
    )
    .expect("rules");
    let out = node.exec(&["nft", "-f", &rules.display().to_string()]);
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    let pcap = dir.join("kernel-backend.pcap");
    let mut dump = Command::new("ip")
        .args(["netns", "exec", &backend.name, "tcpdump", "-i", "eth0", "-nn", "-U", "-w"])
        .arg(&pcap)
        .args(["tcp", "port", "8080"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pod =
        Pod { ns: Netns { name: backend.name.clone() }, ip: Ipv4Addr::new(10, 244, 0, 3), host_if: "vethpod".into() };
    let server = who_server(&pod, "kernel", true, stop.clone());
    std::mem::forget(pod.ns);
    std::thread::sleep(Duration::from_millis(800));
    let results = fetch_port_timeout(&client, Ipv4Addr::new(192, 168, 77, 1), 30090, 20, Duration::from_millis(2500));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    let _ = Command::new("kill").arg("-INT").arg(dump.id().to_string()).status();
    let _ = dump.wait();
    let count = |filter: &str| -> usize {
        let out = Command::new("tcpdump").args(["-nn", "-r"]).arg(&pcap).arg(filter).output().expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    KernelOutcome {
        served: results.iter().filter(|r| r.is_ok()).count(),
        refused: results.iter().filter(|r| r.as_ref().err().map(String::as_str) == Some("connection refused")).count(),
        timed_out: results.iter().filter(|r| r.as_ref().err().is_some_and(|e| e.contains("timed out"))).count(),
        syns: count("tcp[13] == 2"),
        synacks: count("tcp[13] == 18"),
    }
}

/// Pod traffic leaving the cluster network is masqueraded to the node's address (flannel's
/// ip-masq), and the rules go away with vxnat.
#[test]
fn pods_reach_outside_the_cluster_masqueraded() {
    if !require_root("pods_reach_outside_the_cluster_masqueraded") {
        return;
    }
    let mut c = cluster();
    c.nodes[0].ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let server = c.client.spawn(|| {
        let l = TcpListener::bind((Ipv4Addr::new(192, 168, 77, 100), 9000)).expect("listen");
        let (mut conn, peer) = l.accept().expect("accept");
        let _ = conn.write_all(peer.ip().to_string().as_bytes());
    });
    std::thread::sleep(Duration::from_millis(200));
    let got = fetch_port(&c.pods[0].ns, Ipv4Addr::new(192, 168, 77, 100), 9000, 1);
    let _ = server.join();
    assert_eq!(got[0].as_deref(), Ok("192.168.77.1"), "the outside sees node A's address");
    let rules =
        String::from_utf8_lossy(&c.nodes[0].ns.exec(&["nft", "list", "table", "ip", "vxnat"]).stdout).to_string();
    assert!(rules.contains("masquerade"), "{rules}");
    // A stop leaves the rules for the next vxnat (the node's pods keep reaching out across a
    // restart); `vxnat cleanup` removes them.
    c.nodes[0].stop();
    assert!(c.nodes[0].ns.exec(&["nft", "list", "table", "ip", "vxnat"]).status.success(), "rules removed on stop");
    let cleanup = Command::new("ip")
        .args(["netns", "exec", &c.nodes[0].ns.name, BIN, "cleanup", "--config"])
        .arg(&c.nodes[0].config)
        .output()
        .expect("vxnat cleanup");
    assert!(cleanup.status.success(), "{cleanup:?}");
    assert!(
        !c.nodes[0].ns.exec(&["nft", "list", "table", "ip", "vxnat"]).status.success(),
        "masquerade rules left behind by cleanup"
    );
}

/// A ClusterIP Service with one TCP port (name, port, targetPort) and one ready endpoint on
/// node B, as YAML documents for the state file.
fn one_service(
    name: &str,
    cluster_ip: &str,
    (port_name, port, target): (&str, u16, u16),
    endpoint: Ipv4Addr,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: {cluster_ip}, ports: [{{name: {port_name}, port: {port}, targetPort: {target}, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-x1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: {port_name}, port: {target}, protocol: TCP}}]\n\
         endpoints:\n- {{addresses: [{endpoint}], conditions: {{ready: true}}, nodeName: node-b}}\n"
    )
}

/// The state file source, live: a Service added to the file answers within a second while a
/// TCP stream through another Service runs on, intact; an endpoint removed from a slice stops
/// getting new connections; a broken file is reported (object and field named) and the last
/// good state keeps serving.
#[test]
fn state_file_changes_apply_live_without_disturbing_flows() {
    if !require_root("state_file_changes_apply_live_without_disturbing_flows") {
        return;
    }
    use vxnat_tests::netns::{fnv1a, payload};
    let stream = one_service("stream", "10.96.0.80", ("data", 9000, 9000), Ipv4Addr::new(10, 244, 1, 2));
    const ADDED: &str = r#"
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
- {addresses: [10.244.0.3], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.1.3], conditions: {ready: true}, nodeName: node-b}
"#;
    let c = cluster_with(&stream);
    let state = c._dir.0.join("cluster.yaml");
    let base = std::fs::read_to_string(&state).expect("state");
    let (a1, a2, b1, b2) = (&c.pods[0], &c.pods[1], &c.pods[2], &c.pods[3]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sa = who_server(a2, "a2", false, stop.clone());
    let sb = who_server(b2, "b2", false, stop.clone());
    // The stream: ~3 s of paced writes through the first Service, hashed on both ends.
    const LEN: usize = 24 << 20;
    let data = payload(7, LEN);
    let want = fnv1a(&data, 0);
    let b1_ip = b1.ip;
    let sink = b1.ns.spawn(move || {
        let l = TcpListener::bind((b1_ip, 9000)).expect("listen");
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let (mut n, mut h) = (0usize, 0u64);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    h = fnv1a(&buf[..k], h);
                    n += k;
                }
            }
        }
        (n, h)
    });
    std::thread::sleep(Duration::from_millis(200));
    let source = a1.ns.spawn(move || {
        let mut s = TcpStream::connect_timeout(&(Ipv4Addr::new(10, 96, 0, 80), 9000).into(), Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        for chunk in data.chunks(64 << 10) {
            s.write_all(chunk).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(8));
        }
        Ok::<(), String>(())
    });
    std::thread::sleep(Duration::from_millis(500));
    // 1. A second Service appears in the file while the stream runs.
    let generation = |n: &NodeNs| n.stats_json()["worker"]["tables_generation"].as_u64().unwrap_or(0);
    let before = generation(&c.nodes[0]);
    let t0 = Instant::now();
    std::fs::write(&state, format!("{base}{ADDED}")).expect("write state");
    let mut answered = None;
    while t0.elapsed() < Duration::from_secs(3) {
        if fetch_port_timeout(&a1.ns, Ipv4Addr::new(10, 96, 0, 81), 80, 1, Duration::from_millis(200))[0].is_ok() {
            answered = Some(t0.elapsed());
            break;
        }
    }
    let answered = answered.expect("the added Service answers");
    assert!(answered < Duration::from_secs(1), "the added Service answered after {answered:?}");
    assert!(generation(&c.nodes[0]) > before, "a new tables generation is live");
    let sent = source.join().expect("stream source");
    let (n, h) = sink.join().expect("stream sink");
    assert_eq!(sent, Ok(()));
    assert_eq!((n, h), (LEN, want), "the stream through the unchanged Service lost nothing");
    // 2. An endpoint removed from the slice gets no new connections.
    std::fs::write(
        &state,
        format!(
            "{base}{}",
            ADDED.replace("- {addresses: [10.244.1.3], conditions: {ready: true}, nodeName: node-b}\n", "")
        ),
    )
    .expect("write state");
    std::thread::sleep(Duration::from_millis(600));
    let got = fetch_port(&a1.ns, Ipv4Addr::new(10, 96, 0, 81), 80, 20);
    assert!(got.iter().all(|r| r.as_deref() == Ok("a2")), "only the remaining endpoint: {got:?}");
    // 3. A broken file: reported by object and field, the last good state still serves.
    std::fs::write(
        &state,
        format!("{base}{ADDED}").replace(
            "clusterIP: 10.96.0.81, ports: [{name: http, port: 80,",
            "clusterIP: 10.96.0.81, ports: [{name: http, port: eighty,",
        ),
    )
    .expect("write state");
    std::thread::sleep(Duration::from_millis(600));
    let got = fetch_port(&a1.ns, Ipv4Addr::new(10, 96, 0, 81), 80, 10);
    assert!(got.iter().all(|r| r.as_deref() == Ok("a2")), "the last good state serves: {got:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = (sa.join(), sb.join());
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    let line = log.lines().find(|l| l.contains("still serving the last good state")).unwrap_or_default();
    assert!(
        line.contains("Service default/added") && line.contains("spec.ports"),
        "error names object and field: {log}"
    );
}

// ---- Observability (issue 7): flows, trace, capture, metrics, and one scenario per incident,
// each named by `vxnat ctl stats`.

/// Runs `vxnat ctl` with `args` on a thread (for a capture or trace waiting for traffic).
fn ctl_bg(n: &NodeNs, args: &[&str]) -> std::thread::JoinHandle<Result<String, String>> {
    let socket = n.socket.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || ctl_at(&socket, &args))
}

/// `GET /metrics` from inside a node's namespace.
fn scrape(n: &NodeNs) -> String {
    let ns = Netns { name: n.ns.name.clone() };
    let h = ns.spawn(|| {
        let mut c = TcpStream::connect_timeout(&"127.0.0.1:9478".parse().expect("addr"), Duration::from_secs(3))
            .expect("connect");
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        s
    });
    std::mem::forget(ns);
    h.join().expect("scrape")
}

#[test]
fn flows_trace_capture_and_metrics_explain_service_traffic() {
    if !require_root("flows_trace_capture_and_metrics_explain_service_traffic") {
        return;
    }
    let c = cluster_with(SERVICES);
    let (a1, b1) = (&c.pods[0], &c.pods[2]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sb = who_server(b1, "b1", false, stop.clone());
    let sa = who_server(&c.pods[1], "a2", false, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let dir = c._dir.0.clone();
    let pcap = dir.join("svc.pcap");
    let cap = ctl_bg(
        &c.nodes[0],
        &[
            "capture",
            "--at",
            "vxa1",
            "--filter",
            "tcp and port 80",
            "--count",
            "6",
            "--timeout",
            "8",
            "-w",
            pcap.to_str().expect("path"),
        ],
    );
    std::thread::sleep(Duration::from_millis(400));
    let got = fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 50), 6);
    assert!(got.iter().all(|r| r.is_ok()), "{got:?}");
    let cap = cap
        .join()
        .expect("capture")
        .unwrap_or_else(|e| panic!("capture: {e}\n{}", std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default()));
    // Just before encapsulation: the DNAT'd packets toward node B's endpoint.
    let pre = dir.join("pre.pcap");
    let cap2 = ctl_bg(
        &c.nodes[0],
        &[
            "capture",
            "--at",
            "pre-encap",
            "--filter",
            "tcp",
            "--count",
            "3",
            "--timeout",
            "8",
            "-w",
            pre.to_str().expect("path"),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let _ = fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 50), 12);
    assert!(cap2.join().expect("capture").expect("capture ok").contains("3 packets written"));
    // One capture or trace at a time: a second one is refused while the first runs.
    let busy =
        ctl_bg(&c.nodes[0], &["capture", "--at", "uplink", "--count", "1000", "--timeout", "3", "-w", "/dev/null"]);
    std::thread::sleep(Duration::from_millis(300));
    let refused = c.nodes[0].ctl(&["trace", "--count", "1", "--timeout", "1"]);
    assert!(refused.as_ref().is_err_and(|e| e.contains("already running")), "{refused:?}");
    let _ = busy.join();
    let trace = ctl_bg(
        &c.nodes[0],
        &["trace", "--filter", "tcp and dst port 80 and src host 10.244.0.2", "--count", "1", "--timeout", "8"],
    );
    std::thread::sleep(Duration::from_millis(400));
    assert!(fetch(&a1.ns, Ipv4Addr::new(10, 96, 0, 50), 1)[0].is_ok());
    let trace = trace.join().expect("trace").expect("trace ok");
    let flows = c.nodes[0].ctl(&["flows", "--filter", "port 80"]).expect("flows");
    let metrics = scrape(&c.nodes[0]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = (sa.join(), sb.join());
    // The capture opens in tshark, with the pod's packets to the ClusterIP.
    assert!(cap.contains("6 packets written"), "{cap}");
    let ts = Command::new("tshark")
        .args(["-r"])
        .arg(&pcap)
        .args(["-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport"])
        .output()
        .expect("tshark");
    let text = String::from_utf8_lossy(&ts.stdout).to_string();
    assert!(ts.status.success(), "tshark: {}", String::from_utf8_lossy(&ts.stderr));
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(text.lines().any(|l| l.starts_with("10.244.0.2\t10.96.0.50\t80")), "as the pod sent it: {text}");
    let ts = Command::new("tshark")
        .args(["-r"])
        .arg(&pre)
        .args(["-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport"])
        .output()
        .expect("tshark");
    let pre_text = String::from_utf8_lossy(&ts.stdout).to_string();
    assert!(
        pre_text.lines().count() == 3 && pre_text.lines().all(|l| l == "10.244.0.2\t10.244.1.2\t8080"),
        "after DNAT, before encapsulation: {pre_text}"
    );
    // The trace names the stages.
    assert!(trace.contains("in  pod vxa1 10.244.0.2: TCP 10.244.0.2:"), "{trace}");
    assert!(trace.contains("service NAT: destination 10.96.0.50:80 -> 10.244."), "{trace}");
    assert!(trace.contains("=> out "), "{trace}");
    // Flows: the connections with their NAT mapping.
    assert!(flows.contains("-> 10.96.0.50:80") && flows.contains("DNAT to 10.244."), "{flows}");
    // Metrics parse as the Prometheus text format and carry what was asked.
    let body = metrics.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let mut names = std::collections::BTreeSet::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "value in {line:?}");
        let name = series.split('{').next().unwrap_or("");
        assert!(name.starts_with("vxnat_") && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{line}");
        names.insert(name.to_string());
    }
    for want in [
        "vxnat_port_packets_total",
        "vxnat_port_bytes_total",
        "vxnat_flows",
        "vxnat_snat_tuples",
        "vxnat_table_swap_seconds_count",
        "vxnat_backend_syns_total",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    assert!(body.contains("direction=\"tx\""), "{body}");
}

/// A node's VtepMAC in the demo state (its flannel annotation, else the derived one).
fn vtep_of(node: &str) -> dataplane::wire::MacAddr {
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/demo-cluster.yaml");
    let state = vxnat_control::state::ClusterState::load(&demo).expect("demo state");
    let n = state.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(node)).expect("node");
    let v = vxnat_control::state::NodeView::from_node(n).expect("node view");
    v.vtep_mac.unwrap_or_else(|| vxnat_control::state::derived_vtep_mac(node))
}

#[test]
fn incident_1_a_corrupted_outer_checksum_is_named() {
    if !require_root("incident_1_a_corrupted_outer_checksum_is_named") {
        return;
    }
    let c = cluster();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let inner = dataplane::testkit::ipv4(
        Ipv4Addr::new(10, 244, 1, 2),
        Ipv4Addr::new(10, 244, 0, 2),
        &dataplane::testkit::L4::Udp { sport: 9, dport: 9, payload: b"checksum left to an offload" },
    );
    let v = dataplane::testkit::Vxlan {
        outer_src_mac: b.ns.mac("ul"),
        outer_dst_mac: a.ns.mac("ul"),
        src_ip: Ipv4Addr::new(192, 168, 77, 2),
        dst_ip: Ipv4Addr::new(192, 168, 77, 1),
        ident: 7,
        sport: 40000,
        dport: 8472,
        vni: 1,
        flags: 0x08,
        inner_src_mac: vtep_of("node-b"),
        inner_dst_mac: vtep_of("node-a"),
        udp_checksum: true,
    };
    let mut frame = dataplane::testkit::vxlan_frame(&v, &inner);
    frame[40] ^= 0xff; // the outer checksum no longer matches
    let bns = Netns { name: b.ns.name.clone() };
    bns.spawn(move || send_raw("ul", &[frame])).join().expect("inject");
    std::mem::forget(bns);
    std::thread::sleep(Duration::from_millis(300));
    let stats = a.ctl(&["stats"]).expect("stats");
    assert!(
        stats.contains("vxlan_bad_outer_checksum") && stats.contains("incident 1: a broken checksum offload upstream"),
        "{stats}"
    );
}

#[test]
fn incident_3_another_host_answering_arp_for_a_node_is_named() {
    if !require_root("incident_3_another_host_answering_arp_for_a_node_is_named") {
        return;
    }
    let c = cluster();
    // A rogue machine on the underlay claims node B's address (kube-ipvs0 did this).
    let rogue = Netns::new("rogue");
    c._switch.ip(&["link", "add", "pr", "type", "veth", "peer", "name", "eth0", "netns", &rogue.name]);
    c._switch.ip(&["link", "set", "pr", "master", "br0", "up"]);
    rogue.ip(&["addr", "add", "192.168.77.2/24", "dev", "eth0"]);
    rogue.ip(&["link", "set", "eth0", "up"]);
    let rogue_mac = rogue.mac("eth0");
    std::thread::sleep(Duration::from_millis(300));
    let a = &c.nodes[0];
    a.ns.ip(&["neigh", "flush", "dev", "ul"]);
    a.ns.exec(&["ping", "-c", "2", "-W", "1", "192.168.77.2"]);
    std::thread::sleep(Duration::from_millis(500));
    let stats = a.ctl(&["stats"]).expect("stats");
    let line =
        stats.lines().find(|l| l.starts_with("ARP conflict on ul: 192.168.77.2 is claimed by")).unwrap_or_default();
    assert!(line.contains(&c.nodes[1].ns.mac("ul").to_string()) && line.contains(&rogue_mac.to_string()), "{stats}");
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(log.contains("ARP conflict on ul: 192.168.77.2"), "{log}");
}

#[test]
fn incident_4_syns_a_backend_never_answers_are_named_per_backend() {
    if !require_root("incident_4_syns_a_backend_never_answers_are_named_per_backend") {
        return;
    }
    let one = one_service("silent", "10.96.0.90", ("http", 80, 8080), Ipv4Addr::new(10, 244, 1, 2));
    let c = cluster_with_config(&one, "[nat]\nmax_flows = 1024\n[conntrack]\ntcp_syn_sent = 2\n");
    let (a1, b1) = (&c.pods[0], &c.pods[2]);
    // The backend drops every SYN (as a full accept queue, a firewall or tw_recycle did).
    let nft = Command::new("ip")
        .args(["netns", "exec", &b1.ns.name, "nft", "add table inet vxt; add chain inet vxt in { type filter hook input priority 0 ; } ; add rule inet vxt in tcp flags syn drop"])
        .output()
        .expect("nft");
    assert!(nft.status.success(), "nft: {}", String::from_utf8_lossy(&nft.stderr));
    let got = fetch_port_timeout(&a1.ns, Ipv4Addr::new(10, 96, 0, 90), 80, 1, Duration::from_millis(3500));
    assert!(got[0].is_err(), "the backend must not answer: {got:?}");
    // Past the 2 s SYN_SENT timeout (counted from the last retransmission), and the idle sweep.
    let until = Instant::now() + Duration::from_secs(10);
    let mut stats = String::new();
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        stats = c.nodes[0].ctl(&["stats"]).expect("stats");
        if stats.contains("SYNs never answered") {
            break;
        }
    }
    let line = stats.lines().find(|l| l.starts_with("backend 10.244.1.2:8080:")).unwrap_or_default();
    assert!(
        line.contains("SYNs never answered") && line.contains("SYNs retransmitted by clients waiting for an answer"),
        "{stats}"
    );
}

#[test]
fn incident_5_an_oversized_frame_with_segmentation_off_is_named() {
    if !require_root("incident_5_an_oversized_frame_with_segmentation_off_is_named") {
        return;
    }
    let c = cluster_with_config("", "segmentation = false\n");
    let a1 = &c.pods[0];
    // A jumbo pod (its frames go through vxnat as multi-buffer chains).
    c.nodes[0].ns.ip(&["link", "set", "vxa1", "mtu", "9000"]);
    a1.ns.ip(&["link", "set", "eth0", "mtu", "9000"]);
    let got = udp_datagrams(&a1.ns, a1.ip, &c.pods[2].ns, c.pods[2].ip, 7100, 3, 4000);
    assert_eq!(got, 0, "nothing oversized gets through with segmentation off");
    let stats = c.nodes[0].ctl(&["stats"]).expect("stats");
    assert!(stats.contains("segmentation_disabled") && stats.contains("(incident 5)"), "{stats}");
}

/// Incident 2 from the backend's side: a NAT device in front of the node reuses a client port
/// while the backend still holds the old connection in TIME_WAIT; the new SYN (with a lower
/// sequence number) is answered by a bare ACK and the handshake dies. vxnat names it, per
/// backend.
#[test]
fn incident_2_a_syn_answered_by_a_bare_ack_is_named() {
    if !require_root("incident_2_a_syn_answered_by_a_bare_ack_is_named") {
        return;
    }
    use std::net::SocketAddrV4;
    let c = cluster_with(NODE_PORTS);
    let b1 = &c.pods[2];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sb = who_server(b1, "b1", true, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // externalTrafficPolicy Local on node B: the client address reaches the backend as is.
    let (client, node_b) = (
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 100), 45000),
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 2), 30081),
    );
    // vxnat's own capture records the first SYN, for its initial sequence number.
    let pcap = c._dir.0.join("first-syn.pcap");
    let cap = ctl_bg(
        &c.nodes[1],
        &[
            "capture",
            "--at",
            "uplink:rx",
            "--filter",
            "tcp and port 45000",
            "--count",
            "1",
            "--timeout",
            "5",
            "-w",
            pcap.to_str().expect("path"),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let first = c.client.spawn(move || vxnat_tests::netns::tcp_fetch_from(client, node_b)).join().expect("client");
    cap.join().expect("capture").expect("capture ok");
    let bytes = std::fs::read(&pcap).expect("pcap");
    // pcap header 24 + record header 16 + Ethernet 14 + IPv4 20, then TCP: seq at offset 4.
    let at = 24 + 16 + 14 + 20 + 4;
    let isn = u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    assert_eq!(first.as_deref(), Ok("b1 192.168.77.100"), "the first connection, client address preserved");
    std::thread::sleep(Duration::from_millis(200));
    // The same 5-tuple again at once, as a NAT reusing the port would send it: a SYN whose
    // sequence number is not after what the backend's TIME_WAIT socket expects (the old ISN).
    let syn = dataplane::testkit::eth(
        c.nodes[1].ns.mac("ul"),
        c.client.mac("eth0"),
        0x0800,
        &dataplane::testkit::ipv4(
            *client.ip(),
            *node_b.ip(),
            &dataplane::testkit::L4::Tcp { sport: 45000, dport: 30081, seq: isn, ack: 0, flags: 0x002, payload: &[] },
        ),
    );
    // What happens to it, for the failure message.
    let trace =
        ctl_bg(&c.nodes[1], &["trace", "--filter", "port 45000 or port 8080", "--count", "4", "--timeout", "2"]);
    std::thread::sleep(Duration::from_millis(300));
    let cns = Netns { name: c.client.name.clone() };
    cns.spawn(move || send_raw("eth0", &[syn])).join().expect("inject");
    std::mem::forget(cns);
    let trace = trace.join().expect("trace").unwrap_or_else(|e| e);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sb.join();
    let stats = c.nodes[1].ctl(&["stats"]).expect("stats");
    let line = stats.lines().find(|l| l.starts_with("backend 10.244.1.2:8080:")).unwrap_or_default();
    assert!(
        line.contains("1 SYNs answered by a bare ACK instead of SYN-ACK (it still holds the 5-tuple in TIME_WAIT"),
        "{stats}\n{trace}"
    );
}

// ---- The CNI plugin (issue 8), called the way a container runtime calls it.

#[test]
fn the_cni_plugin_works_as_a_runtime_calls_it() {
    if !require_root("the_cni_plugin_works_as_a_runtime_calls_it") {
        return;
    }
    let mut c = cluster_with(SERVICES);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sb = who_server(&c.pods[2], "b1", false, stop.clone());
    let sa = who_server(&c.pods[1], "a2", false, stop.clone());
    let data = c._dir.0.join("ipam");
    let name = format!("vxnat-e2e-{}", rand_suffix());
    let conf = cni_conf(&name, &c.nodes[0].socket, &data);
    let pod = Netns::new("cnipod");
    let netns = format!("/var/run/netns/{}", pod.name);
    // ADD: the Result in the spec's shape.
    let (code, r) = cni_call(&c.nodes[0], CNI_BIN, "ADD", "c1", &netns, &conf.to_string());
    assert_eq!(code, 0, "ADD: {r}");
    assert_eq!(r["cniVersion"], "1.0.0");
    let ifs = r["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifs.len(), 2, "{r}");
    let host = ifs[0]["name"].as_str().expect("host name").to_string();
    assert!(host.starts_with("vx") && ifs[0]["mac"].as_str().is_some_and(|m| m.len() == 17), "{r}");
    assert_eq!((ifs[1]["name"].as_str(), ifs[1]["sandbox"].as_str()), (Some("eth0"), Some(netns.as_str())), "{r}");
    assert_eq!(r["ips"][0]["address"], "10.244.0.10/24", "{r}");
    assert_eq!(r["ips"][0]["gateway"], "10.244.0.1");
    assert_eq!(r["ips"][0]["interface"], 1, "the index of the pod's interface");
    assert!(r["routes"].as_array().expect("routes").iter().any(|x| x["dst"] == "0.0.0.0/0" && x["gw"] == "10.244.0.1"));
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
    assert_eq!(pod.exec(&["cat", "/sys/class/net/eth0/mtu"]).stdout, b"1450\n", "pod MTU = uplink MTU - 50");
    // The pod reaches a pod on the other node and a Service.
    assert!(ping(&pod, Ipv4Addr::new(10, 244, 1, 2)), "pod -> pod on node B");
    let got = fetch(&pod, Ipv4Addr::new(10, 96, 0, 50), 4);
    assert!(got.iter().all(|x| x.is_ok()), "pod -> ClusterIP: {got:?}");
    // Chaining: portmap follows vxnat with vxnat's Result as prevResult.
    let mut pm = serde_json::json!({
        "cniVersion": "1.0.0", "name": name, "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]},
        "prevResult": r,
    });
    let (code, out) = cni_call(&c.nodes[0], "/usr/lib/cni/portmap", "ADD", "c1", &netns, &pm.to_string());
    assert_eq!(code, 0, "portmap after vxnat: {out}");
    pm["prevResult"] = out;
    let (code, out) = cni_call(&c.nodes[0], "/usr/lib/cni/portmap", "DEL", "c1", &netns, &pm.to_string());
    assert_eq!(code, 0, "portmap DEL: {out}");
    // CHECK what ADD set up.
    let mut checked = conf.clone();
    checked["prevResult"] = r.clone();
    let (code, out) = cni_call(&c.nodes[0], CNI_BIN, "CHECK", "c1", &netns, &checked.to_string());
    assert_eq!(code, 0, "CHECK: {out}");
    // A vxnat restart keeps the pod attached and reachable, without the runtime.
    c.nodes[0].stop();
    c.nodes[0].start();
    let mut reached = false;
    for _ in 0..20 {
        if ping(&pod, Ipv4Addr::new(10, 244, 1, 2)) {
            reached = true;
            break;
        }
    }
    assert!(reached, "the pod is reachable after a vxnat restart");
    // DEL: the address goes back to host-local, the port away; DEL again is fine.
    let lease = data.join(&name).join("10.244.0.10");
    assert!(lease.exists(), "host-local holds the address");
    let (code, out) = cni_call(&c.nodes[0], CNI_BIN, "DEL", "c1", &netns, &conf.to_string());
    assert_eq!(code, 0, "DEL: {out}");
    assert!(!lease.exists(), "DEL released the address in host-local's store");
    assert!(!c.nodes[0].ctl(&["ports"]).expect("ports").contains(&host), "the port is gone");
    let (code, out) = cni_call(&c.nodes[0], CNI_BIN, "DEL", "c1", &netns, &conf.to_string());
    assert_eq!(code, 0, "a second DEL: {out}");
    // CHECK fails once the veth is deleted by hand.
    let (code, r2) = cni_call(&c.nodes[0], CNI_BIN, "ADD", "c2", &netns, &conf.to_string());
    assert_eq!(code, 0, "{r2}");
    let host2 = r2["interfaces"][0]["name"].as_str().expect("name").to_string();
    c.nodes[0].ns.ip(&["link", "del", &host2]);
    let mut checked = conf.clone();
    checked["prevResult"] = r2;
    let (code, e) = cni_call(&c.nodes[0], CNI_BIN, "CHECK", "c2", &netns, &checked.to_string());
    assert_ne!(code, 0);
    assert!(e["msg"].as_str().is_some_and(|m| m.contains("does not exist")), "{e}");
    let _ = cni_call(&c.nodes[0], CNI_BIN, "DEL", "c2", &netns, &conf.to_string());
    // Errors with the spec's codes.
    let (code, e) = cni_call(&c.nodes[0], CNI_BIN, "ADD", "c3", &netns, "{ this is not json");
    assert_eq!((code, e["code"].as_u64()), (1, Some(6)), "{e}");
    let mut bad = conf.clone();
    bad.as_object_mut().expect("object").remove("ipam");
    let (_, e) = cni_call(&c.nodes[0], CNI_BIN, "ADD", "c3", &netns, &bad.to_string());
    assert_eq!(e["code"].as_u64(), Some(7), "invalid network config: {e}");
    assert!(e["msg"].as_str().is_some_and(|m| m.starts_with("ipam.type")), "{e}");
    let stopped = cni_conf(&name, std::path::Path::new("/run/vxnat/no-such.sock"), &data);
    let (_, e) = cni_call(&c.nodes[0], CNI_BIN, "ADD", "c3", &netns, &stopped.to_string());
    assert_eq!(e["code"].as_u64(), Some(11), "vxnat not running: try again later: {e}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = (sa.join(), sb.join());
}
