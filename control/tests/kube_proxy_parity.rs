//! Issue 18, what kube-proxy users rely on, with real kernels: the demo cluster (two vxnat
//! nodes in network namespaces, two pods each; see `common`).
//!
//! - Endpoint removal moves flows as kube-proxy moves them. A UDP Service and a TCP Service,
//!   both with endpoints on pod a2 and pod b1.
//!   - UDP (the CoreDNS-rollout outage class, kubernetes#125467, #126130, #48370): a client in
//!     pod a1 keeps one socket, one source port, and queries the UDP Service every ~5-10 ms.
//!     The endpoint answering it is removed from the EndpointSlice (the state file rewritten).
//!     Every query after the change reaches the other endpoint within a second, and keeps
//!     reaching it; node A counts the moved flow (`udp_flows_moved`). kube-proxy does the same
//!     by deleting the removed endpoint's conntrack entries; vxnat by checking a flow's
//!     endpoint again on its next packet after the Service table changed.
//!   - TCP: a connection established to the endpoint that is removed from the TCP Service's
//!     slice goes on (kube-proxy keeps it until it ends), and what it still sends is counted
//!     (`to_gone_endpoint`).
//! - UDP from outside to a NodePort without endpoints is refused (ICMP port unreachable), as
//!   kube-proxy's reject rule refuses it.
//! - A UDP datagram larger than the pods' MTU, to a ClusterIP and back, arrives whole: the
//!   kernels fragment it, vxnat translates every fragment (netfilter reassembles first).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vxnat_tests::netns::require_root;

const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 54);

/// The two Services; `udp_eps`/`tcp_eps` are the endpoint lines of their slices.
fn services(udp_eps: &[&str], tcp_eps: &[&str]) -> String {
    let line = |ip: &&str| {
        let node = if ip.starts_with("10.244.0.") { "node-a" } else { "node-b" };
        format!("  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {node}}}\n")
    };
    let (u, t): (String, String) = (udp_eps.iter().map(line).collect(), tcp_eps.iter().map(line).collect());
    format!(
        r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: dns, namespace: default}}
  spec: {{clusterIP: {DNS_VIP}, ports: [{{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {{name: dns-x1, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}
  addressType: IPv4
  ports: [{{name: dns, port: 5353, protocol: UDP}}]
  endpoints:
{u}- apiVersion: v1
  kind: Service
  metadata: {{name: web, namespace: default}}
  spec: {{clusterIP: {WEB_VIP}, ports: [{{name: echo, port: 80, targetPort: 8080, protocol: TCP}}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {{name: web-x1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
  addressType: IPv4
  ports: [{{name: echo, port: 8080, protocol: TCP}}]
  endpoints:
{t}"#
    )
}

/// A UDP server in `pod` on 5353 answering every datagram with `name`, until `stop`.
fn udp_server(pod: &Pod, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ip = pod.ip;
    pod.ns.spawn(move || {
        let s = UdpSocket::bind((ip, 5353)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(name.as_bytes(), from);
            }
        }
    })
}

/// A TCP server in `pod` on 8080 echoing each connection's bytes, prefixed once with `name`.
fn echo_server(pod: &Pod, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ip = pod.ip;
    pod.ns.spawn(move || {
        let l = TcpListener::bind((ip, 8080)).expect("listen");
        l.set_nonblocking(true).expect("nonblocking");
        let mut conns = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok((c, _)) = l.accept() {
                conns.push(std::thread::spawn(move || {
                    let mut c = c;
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = c.write_all(name.as_bytes());
                    let mut buf = [0u8; 256];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(conns);
    })
}

#[test]
fn a_removed_udp_endpoints_client_moves_within_a_second_and_tcp_to_it_goes_on() {
    if !require_root("a_removed_udp_endpoints_client_moves_within_a_second_and_tcp_to_it_goes_on") {
        return;
    }
    let both = ["10.244.0.3", "10.244.1.2"];
    let c = cluster_with(&services(&both, &both));
    let state = c._dir.0.join("cluster.yaml");
    let base = std::fs::read_to_string(&state).expect("state");
    let base = &base[..base.rfind("apiVersion: v1\nkind: List").expect("our services")];
    let (a1, a2, b1) = (&c.pods[0], &c.pods[1], &c.pods[2]);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        udp_server(a2, "a2", stop.clone()),
        udp_server(b1, "b1", stop.clone()),
        echo_server(a2, "a2", stop.clone()),
        echo_server(b1, "b1", stop.clone()),
    ];
    std::thread::sleep(Duration::from_millis(300));

    // TCP: a connection through the web Service, established before the change.
    let tcp = a1.ns.spawn(|| -> Result<(String, String), String> {
        let mut s =
            TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
        let mut who = [0u8; 2];
        s.read_exact(&mut who).map_err(|e| format!("who: {e}"))?;
        let who = String::from_utf8_lossy(&who).to_string();
        // Wait for the change (the test removes this endpoint meanwhile), then talk on.
        std::thread::sleep(Duration::from_millis(2500));
        let mut echoed = Vec::new();
        for i in 0..10u8 {
            s.write_all(&[b'0' + i; 16]).map_err(|e| format!("write {i}: {e}"))?;
            let mut buf = [0u8; 16];
            s.read_exact(&mut buf).map_err(|e| format!("echo {i}: {e}"))?;
            echoed.extend_from_slice(&buf);
        }
        Ok((who, String::from_utf8_lossy(&echoed).to_string()))
    });

    // UDP: one socket, one source port, a query every 5 ms or so; (time, answerer) per answer.
    let querying = Arc::new(AtomicBool::new(true));
    let q = querying.clone();
    let client = a1.ns.spawn(move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect((DNS_VIP, 53)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(10))).expect("timeout");
        let t0 = Instant::now();
        let (mut answers, mut sent) = (Vec::new(), 0u32);
        let mut buf = [0u8; 16];
        while q.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(20) {
            let _ = s.send(b"q");
            sent += 1;
            std::thread::sleep(Duration::from_millis(5));
            if let Ok(n) = s.recv(&mut buf) {
                answers.push((t0.elapsed(), String::from_utf8_lossy(&buf[..n]).to_string()));
            }
        }
        (t0, sent, answers)
    });
    std::thread::sleep(Duration::from_millis(700));
    let before = c.nodes[0].stats_json();
    // Which endpoint answers the client now, and the TCP connection's: remove both from the
    // slices (the one serving the client, in each Service).
    let who_udp = {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            // Peek at the client's progress by asking node A's flows (no shared state with the
            // client thread): the dns flow's endpoint.
            let flows = c.nodes[0].ctl(&["flows"]).unwrap_or_default();
            if let Some(l) = flows.lines().find(|l| l.contains(&format!("{DNS_VIP}:53"))) {
                break if l.contains("10.244.0.3") { "10.244.0.3" } else { "10.244.1.2" };
            }
            assert!(Instant::now() < deadline, "no dns flow on node A: {flows}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let who_tcp = {
        let flows = c.nodes[0].ctl(&["flows"]).unwrap_or_default();
        let l = flows.lines().find(|l| l.contains(&format!("{WEB_VIP}:80"))).unwrap_or_default().to_string();
        if l.contains("10.244.0.3") {
            "10.244.0.3"
        } else {
            "10.244.1.2"
        }
    };
    let keep = |gone: &str| both.iter().copied().filter(|e| *e != gone).collect::<Vec<_>>();
    let changed_at = Instant::now();
    std::fs::write(&state, format!("{base}{}", services(&keep(who_udp), &keep(who_tcp)))).expect("write state");
    std::thread::sleep(Duration::from_millis(3000));
    querying.store(false, Ordering::Relaxed);
    let (t0, sent, answers) = client.join().expect("client");
    let tcp = tcp.join().expect("tcp client");
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    let after = c.nodes[0].stats_json();
    eprintln!("node A drops {:?}; node B drops {:?}", drops(&after), drops(&c.nodes[1].stats_json()));

    let gone_name = if who_udp == "10.244.0.3" { "a2" } else { "b1" };
    let change = changed_at.duration_since(t0);
    let last_gone = answers.iter().filter(|(_, w)| w == gone_name).map(|(t, _)| *t).max();
    let first_other = answers.iter().filter(|(t, w)| *t > change && w != gone_name).map(|(t, _)| *t).min();
    let after_change: Vec<&String> = answers.iter().filter(|(t, _)| *t > change).map(|(_, w)| w).collect();
    let moved = event(&after, "udp_flows_moved") - event(&before, "udp_flows_moved");
    let to_gone = event(&after, "to_gone_endpoint") - event(&before, "to_gone_endpoint");
    eprintln!(
        "endpoint_removal: {sent} queries, {} answers; removed {who_udp} ({gone_name}) at {:.3} s; its last answer at \
         {:?}; the other's first after the change at {:?}; udp_flows_moved {moved}; tcp via {who_tcp}: {tcp:?}; \
         to_gone_endpoint {to_gone}",
        answers.len(),
        change.as_secs_f64(),
        last_gone.map(|t| t.as_secs_f64()),
        first_other.map(|t| (t - change).as_secs_f64()),
    );
    // The client moved, within a second of the change, and stayed moved.
    let first_other = first_other.expect("the other endpoint answered after the change");
    assert!(first_other - change < Duration::from_secs(1), "moved {:?} after the change", first_other - change);
    let late = answers.iter().filter(|(t, w)| *t > first_other && w == gone_name).count();
    assert_eq!(late, 0, "answers from the removed endpoint after the move: {after_change:?}");
    assert!(answers.iter().filter(|(t, _)| *t > first_other).count() > 100, "the client kept being answered");
    assert!(moved >= 1, "the move was counted");
    // TCP: the connection to the removed endpoint went on, every byte echoed, and counted.
    let tcp_name = if who_tcp == "10.244.0.3" { "a2" } else { "b1" };
    let (who, echoed) = tcp.expect("the TCP connection to the removed endpoint goes on");
    assert_eq!(who, tcp_name);
    assert_eq!(echoed, (0..10u8).map(|i| String::from_utf8(vec![b'0' + i; 16]).unwrap()).collect::<String>());
    assert!(to_gone >= 10, "its segments to the gone endpoint were counted: {to_gone}");
}

/// UDP from outside the cluster to a NodePort whose Service has no endpoint is rejected as
/// kube-proxy rejects it: the client's connected socket gets "connection refused" (ICMP port
/// unreachable, sent straight back by the uplink), rather than waiting on silence.
#[test]
fn udp_from_outside_to_a_node_port_without_endpoints_is_refused() {
    if !require_root("udp_from_outside_to_a_node_port_without_endpoints_is_refused") {
        return;
    }
    const EMPTY: &str = r#"apiVersion: v1
kind: Service
metadata: {name: empty-udp, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.55
  ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30553}]
"#;
    let c = cluster_with(EMPTY);
    let before = c.nodes[0].stats_json();
    let got = c.client.spawn(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect((Ipv4Addr::new(192, 168, 77, 1), 30553)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let t0 = Instant::now();
        s.send(b"q").expect("send");
        let mut buf = [0u8; 16];
        (s.recv(&mut buf).map_err(|e| e.kind()), t0.elapsed())
    });
    let (got, took) = got.join().expect("client");
    let count = |st: &serde_json::Value| {
        drops(st).iter().filter(|(n, _)| n == "service_no_endpoint").map(|(_, k)| *k).sum::<u64>()
    };
    let refused = count(&c.nodes[0].stats_json()) - count(&before);
    eprintln!("udp_reject: {got:?} after {took:?}; service_no_endpoint +{refused}");
    assert_eq!(got, Err(std::io::ErrorKind::ConnectionRefused), "refused, not silence");
    assert!(took < Duration::from_secs(1));
    assert_eq!(refused, 1, "counted once");
}

/// A 4,000-byte UDP datagram from pod a1 to a ClusterIP whose endpoint is pod b1 on the other
/// node (the pods' MTU is 1,450: the kernels send three fragments each way), echoed back
/// whole: the endpoint receives the datagram reassembled, addressed to it, and the client gets
/// the echo from the ClusterIP, byte for byte.
#[test]
fn a_fragmented_udp_datagram_through_a_cluster_ip_arrives_whole_both_ways() {
    if !require_root("a_fragmented_udp_datagram_through_a_cluster_ip_arrives_whole_both_ways") {
        return;
    }
    let c = cluster_with(&services(&["10.244.1.2"], &["10.244.1.2"]));
    let (a1, b1) = (&c.pods[0], &c.pods[2]);
    let b1_ip = b1.ip;
    let server = b1.ns.spawn(move || {
        let s = UdpSocket::bind((b1_ip, 5353)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        for _ in 0..3 {
            let Ok((n, from)) = s.recv_from(&mut buf) else { break };
            got.push(n);
            let _ = s.send_to(&buf[..n], from);
        }
        got
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = c.nodes[0].stats_json();
    let client = a1.ns.spawn(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect((DNS_VIP, 53)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut results = Vec::new();
        for round in 0..3u8 {
            let msg: Vec<u8> = (0..4000u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(round)).collect();
            let _ = s.send(&msg);
            let mut buf = vec![0u8; 65536];
            results.push(match s.recv(&mut buf) {
                Ok(n) => Ok(buf[..n] == msg[..]),
                Err(e) => Err(e.to_string()),
            });
        }
        results
    });
    let results = client.join().expect("client");
    let got = server.join().expect("server");
    let after = c.nodes[0].stats_json();
    let translated = event(&after, "fragments_translated") - event(&before, "fragments_translated");
    eprintln!("fragments: echoes {results:?}; endpoint got {got:?}; node A fragments_translated +{translated}");
    assert_eq!(got, vec![4000, 4000, 4000], "the endpoint received every datagram whole");
    assert_eq!(results, vec![Ok(true), Ok(true), Ok(true)], "every echo came back whole and unchanged");
    assert!(translated >= 12, "two later fragments each way, three times: {translated}");
}

/// Path MTU discovery through a NodePort: a client beyond a router whose link toward it has an
/// MTU of 1,200 (the client's own end 1,500, so its SYN announces an MSS the path cannot
/// carry) downloads 2 MiB from an endpoint on node B through node A's NodePort. The endpoint's
/// 1,450-byte segments reach the router, which answers node A with fragmentation needed; the
/// uplink's XDP program hands the error to vxnat (it is about a packet a frontend sent),
/// which translates it for the endpoint; the endpoint's kernel lowers its path MTU and the
/// download completes. Without that, the path is a black hole: the download stalls.
#[test]
fn path_mtu_discovery_works_through_a_node_port_for_a_client_behind_a_narrow_link() {
    if !require_root("path_mtu_discovery_works_through_a_node_port_for_a_client_behind_a_narrow_link") {
        return;
    }
    use vxnat_tests::netns::{fnv1a, payload, Netns};
    const NODE_PORT: &str = r#"apiVersion: v1
kind: Service
metadata: {name: big, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.56
  externalTrafficPolicy: Cluster
  ports: [{name: data, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30600}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: big-x1, namespace: default, labels: {kubernetes.io/service-name: big}}
addressType: IPv4
ports: [{name: data, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;
    let c = cluster_with(NODE_PORT);
    // The router: on the switch as .254; toward the far client, MTU 1,200 on its side.
    let router = Netns::new("router");
    let far = Netns::new("far");
    c._switch.ip(&["link", "add", "pr", "type", "veth", "peer", "name", "up0", "netns", &router.name]);
    c._switch.ip(&["link", "set", "pr", "master", "br0", "up"]);
    router.ip(&["addr", "add", "192.168.77.254/24", "dev", "up0"]);
    router.ip(&["link", "set", "up0", "up"]);
    router.ip(&["link", "add", "dn0", "type", "veth", "peer", "name", "eth0", "netns", &far.name]);
    router.ip(&["addr", "add", "192.168.78.1/24", "dev", "dn0"]);
    router.ip(&["link", "set", "dn0", "mtu", "1200", "up"]);
    router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    far.ip(&["addr", "add", "192.168.78.2/24", "dev", "eth0"]);
    far.ip(&["link", "set", "eth0", "up"]);
    far.ip(&["route", "add", "default", "via", "192.168.78.1"]);

    const LEN: usize = 2 << 20;
    let data = payload(11, LEN);
    let want = fnv1a(&data, 0);
    let b1_ip = c.pods[2].ip;
    let server = c.pods[2].ns.spawn(move || {
        let l = TcpListener::bind((b1_ip, 8080)).expect("listen");
        l.set_nonblocking(true).expect("nonblocking");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(15)));
                return s.write_all(&data).map_err(|e| e.to_string());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err("no connection".into())
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = c.nodes[0].stats_json();
    let client = far.spawn(|| {
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(&(Ipv4Addr::new(192, 168, 77, 1), 30600).into(), Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let (mut n, mut h) = (0usize, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    h = fnv1a(&buf[..k], h);
                    n += k;
                }
                Err(e) => return Err(format!("after {n} bytes: {e}")),
            }
        }
        Ok((n, h, t0.elapsed()))
    });
    let got = client.join().expect("client");
    let sent = server.join().expect("server");
    let after = c.nodes[0].stats_json();
    let pmtu = c.pods[2].ns.ip(&["route", "get", "10.244.0.1"]);
    let pmtu = String::from_utf8_lossy(&pmtu.stdout).replace('\n', " ");
    let count = |st: &serde_json::Value| {
        drops(st).iter().filter(|(n, _)| n == "uplink_not_vxlan").map(|(_, k)| *k).sum::<u64>()
    };
    eprintln!(
        "pmtu: download {got:?}; server {sent:?}; endpoint's route to node A's gateway: {pmtu}; node A uplink_not_vxlan +{}",
        count(&after) - count(&before)
    );
    let (n, h, took) = got.expect("the download completes");
    assert_eq!((n, h), (LEN, want), "every byte, in order");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(pmtu.contains("mtu 1200"), "the endpoint learned the path MTU: {pmtu}");
    drop((router, far));
}

/// Load balancer IPs and external IPs end to end, with `loadBalancerSourceRanges` and the
/// external-IP guard: a client outside (its routes send the two addresses to node A, as a
/// load balancer or router would) reaches the Service's endpoint on node B through the load
/// balancer IP from an address in the source ranges, not from one outside them (dropped,
/// counted as `lb_source_range`), and through the external IP from either (the ranges are for
/// load balancer IPs, as kube-proxy applies them). Node A itself reaches both (its own
/// traffic to them is captured, as kube-proxy captures it). An external IP that is node B's
/// own address is not installed (node A's traffic to node B's port 80 goes to node B), and
/// node A says why.
#[test]
fn load_balancer_and_external_ips_with_source_ranges_and_the_external_ip_guard() {
    if !require_root("load_balancer_and_external_ips_with_source_ranges_and_the_external_ip_guard") {
        return;
    }
    use std::net::SocketAddrV4;
    use vxnat_tests::netns::tcp_fetch_from;
    const LB_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: front, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.57
  externalTrafficPolicy: Cluster
  externalIPs: [192.168.77.51, 192.168.77.2]
  loadBalancerSourceRanges: [192.168.77.100/32]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30601}]
status:
  loadBalancer:
    ingress: [{ip: 192.168.77.50}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: front-x1, namespace: default, labels: {kubernetes.io/service-name: front}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;
    let c = cluster_with(LB_SERVICE);
    let stop = Arc::new(AtomicBool::new(false));
    let server = who_server(&c.pods[2], "b1", true, stop.clone());
    c.client.ip(&["addr", "add", "192.168.77.101/24", "dev", "eth0"]);
    for vip in ["192.168.77.50/32", "192.168.77.51/32"] {
        c.client.ip(&["route", "add", vip, "via", "192.168.77.1"]);
    }
    // A refused SYN is dropped without an answer: give up after 1 retransmission (~3 s).
    c.client.exec(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    std::thread::sleep(Duration::from_millis(200));
    let before = c.nodes[0].stats_json();
    let fetch = |src: [u8; 4], dst: [u8; 4]| {
        let (src, dst) = (SocketAddrV4::new(src.into(), 0), SocketAddrV4::new(dst.into(), 80));
        c.client.spawn(move || tcp_fetch_from(src, dst)).join().expect("client")
    };
    let lb_in = fetch([192, 168, 77, 100], [192, 168, 77, 50]);
    let lb_out = fetch([192, 168, 77, 101], [192, 168, 77, 50]);
    let ext_out = fetch([192, 168, 77, 101], [192, 168, 77, 51]);
    // From node A itself: both captured (to the ClusterIP); node B's address is not.
    let local = |dst: [u8; 4]| {
        let dst = SocketAddrV4::new(dst.into(), 80);
        c.nodes[0]
            .ns
            .spawn(move || tcp_fetch_from(SocketAddrV4::new([192, 168, 77, 1].into(), 0), dst))
            .join()
            .expect("node A client")
    };
    let (node_lb, node_ext, node_b) = (local([192, 168, 77, 50]), local([192, 168, 77, 51]), local([192, 168, 77, 2]));
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    let after = c.nodes[0].stats_json();
    let count =
        |st: &serde_json::Value| drops(st).iter().filter(|(n, _)| n == "lb_source_range").map(|(_, k)| *k).sum::<u64>();
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    let guard = log.lines().find(|l| l.contains("spec.externalIPs: 192.168.77.2")).unwrap_or_default().to_string();
    eprintln!(
        "lb: in range {lb_in:?}; out of range {lb_out:?}; external IP {ext_out:?}; lb_source_range +{}; guard: {guard}",
        count(&after) - count(&before)
    );
    // The endpoint saw node A's pod-network address (Cluster policy: SNAT).
    assert_eq!(lb_in.as_deref(), Ok("b1 10.244.0.1"), "load balancer IP, in range");
    assert!(lb_out.is_err(), "load balancer IP, out of range: {lb_out:?}");
    assert!(count(&after) - count(&before) >= 1, "the refused SYNs were counted");
    assert_eq!(ext_out.as_deref(), Ok("b1 10.244.0.1"), "external IP: the ranges do not apply");
    assert!(guard.contains("Node node-b's address; not installed"), "node A names the refused external IP: {guard}");
    eprintln!("lb: from node A: load balancer IP {node_lb:?}, external IP {node_ext:?}, node B's address {node_b:?}");
    assert_eq!(node_lb.as_deref(), Ok("b1 10.244.0.1"), "node A to the load balancer IP");
    assert_eq!(node_ext.as_deref(), Ok("b1 10.244.0.1"), "node A to the external IP");
    assert!(node_b.is_err(), "node B's own address is not captured: {node_b:?}");
}

/// `nodeport_addresses` and `nodeport_localhost`: node A has a second address on its uplink
/// (192.168.77.11) and is configured with `["primary", "192.168.77.0/24"]` and localhost
/// NodePorts. A client outside reaches the NodePort on both addresses (the XDP program
/// redirects NodePort traffic to each), and a client on node A itself on both and on
/// 127.0.0.1. The endpoint is on node B.
#[test]
fn node_ports_answer_on_every_configured_address_and_on_localhost_when_asked() {
    if !require_root("node_ports_answer_on_every_configured_address_and_on_localhost_when_asked") {
        return;
    }
    const NODE_PORT: &str = r#"apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.58
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30602}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-x1, namespace: default, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;
    let mut c = cluster_with_config(
        NODE_PORT,
        "nodeport_addresses = [\"primary\", \"192.168.77.0/24\"]\nnodeport_localhost = true\n",
    );
    // The second address, then a restart: NodePort addresses are read at start.
    c.nodes[0].ns.ip(&["addr", "add", "192.168.77.11/24", "dev", "ul"]);
    c.nodes[0].stop();
    c.nodes[0].start();
    let stop = Arc::new(AtomicBool::new(false));
    let server = who_server(&c.pods[2], "b1", false, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let fetch = |ns: &vxnat_tests::netns::Netns, ip: [u8; 4]| {
        let ip = Ipv4Addr::from(ip);
        ns.spawn(move || -> Result<String, String> {
            let mut s =
                TcpStream::connect_timeout(&(ip, 30602).into(), Duration::from_secs(2)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok(out)
        })
        .join()
        .expect("client")
    };
    let results = [
        ("outside -> primary", fetch(&c.client, [192, 168, 77, 1])),
        ("outside -> second address", fetch(&c.client, [192, 168, 77, 11])),
        ("node A -> primary", fetch(&c.nodes[0].ns, [192, 168, 77, 1])),
        ("node A -> second address", fetch(&c.nodes[0].ns, [192, 168, 77, 11])),
        ("node A -> 127.0.0.1", fetch(&c.nodes[0].ns, [127, 0, 0, 1])),
    ];
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    eprintln!("nodeport_addresses: {results:?}");
    for (what, r) in &results {
        assert_eq!(r.as_deref(), Ok("b1"), "{what}");
    }
}
