//! Issue 17, tunnel anti-spoofing, with real kernels: the demo cluster (two vxnat nodes in
//! network namespaces on a bridged underlay, two pods each; see `common`).
//!
//! The report: a pod on node A sent a hand-built VXLAN frame (UDP to node B's underlay
//! address, port 8472) whose inner source was 10.244.5.5 (no node's), then 10.244.1.9 (node
//! B's own range); node A's stack masqueraded it, so it arrived from node A's address, a known
//! VTEP, and node B delivered both to pod B. Now:
//! - node A refuses the pod's UDP to a node's VXLAN port (`pod_to_vxlan_port`);
//! - node B checks the inner source of what it decapsulates against the sending node's pod
//!   CIDR (`tunnel_inner_source_spoofed`). Shown by sending the same frames from node A's own
//!   stack, which does not pass through vxnat A (as a flannel node's pod would get them there).

mod common;

use common::*;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vxnat_tests::netns::{require_root, Netns};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const LISTEN_PORT: u16 = 7400;

/// A node's VtepMAC in the demo state (its flannel annotation, else the derived one).
fn vtep_of(node: &str) -> dataplane::wire::MacAddr {
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/demo-cluster.yaml");
    let state = vxnat_control::state::ClusterState::load(&demo).expect("demo state");
    let n = state.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(node)).expect("node");
    let v = vxnat_control::state::NodeView::from_node(n).expect("node view");
    v.vtep_mac.unwrap_or_else(|| vxnat_control::state::derived_vtep_mac(node))
}

/// The UDP payload of a VXLAN frame from node A to node B (VNI 1): the VXLAN header and an
/// inner Ethernet frame carrying UDP from `src` to `dst`:LISTEN_PORT, checksums valid.
fn vxlan_payload(src: Ipv4Addr, dst: Ipv4Addr, text: &[u8]) -> Vec<u8> {
    use dataplane::testkit::{eth, ipv4, L4};
    let inner = ipv4(src, dst, &L4::Udp { sport: 7401, dport: LISTEN_PORT, payload: text });
    let mut v = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    v.extend_from_slice(&eth(vtep_of("node-b"), vtep_of("node-a"), 0x0800, &inner));
    v
}

/// Sends `datagrams` (destination, payload) from `ns`, from a socket bound to `from`.
fn send_from(ns: &Netns, from: Ipv4Addr, datagrams: Vec<((Ipv4Addr, u16), Vec<u8>)>) {
    ns.spawn(move || {
        let u = UdpSocket::bind((from, 0)).expect("bind sender");
        for (to, d) in datagrams {
            u.send_to(&d, to).expect("send");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .expect("sender");
}

/// Sum of a drop reason over a node's ports.
fn dropped(node: &NodeNs, reason: &str) -> u64 {
    drops(&node.stats_json()).into_iter().filter(|(r, _)| r == reason).map(|(_, n)| n).sum()
}

#[test]
fn spoofed_inner_sources_never_reach_a_pod() {
    if !require_root("spoofed_inner_sources_never_reach_a_pod") {
        return;
    }
    let c = cluster();
    let (a1, b1) = (&c.pods[0], &c.pods[2]);
    let (node_a, node_b) = (&c.nodes[0], &c.nodes[1]);
    // A real node forwards (the report's frames were masqueraded by node A's stack); a fresh
    // namespace does not.
    let fwd = node_a.ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(fwd.status.success(), "ip_forward on node A: {}", String::from_utf8_lossy(&fwd.stderr));
    assert!(ping(&a1.ns, b1.ip), "a1 -> b1 (warms up the underlay neighbours)");

    // Pod b1 listens; everything it receives is kept, with its source.
    let b1_ip = b1.ip;
    let listener = b1.ns.spawn(move || {
        let u = UdpSocket::bind((b1_ip, LISTEN_PORT)).expect("bind listener");
        u.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let (mut got, mut buf) = (Vec::new(), [0u8; 2048]);
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            if let Ok((n, from)) = u.recv_from(&mut buf) {
                got.push((from.ip().to_string(), String::from_utf8_lossy(&buf[..n]).to_string()));
            }
        }
        got
    });
    std::thread::sleep(Duration::from_millis(300));

    let spoofs = [(Ipv4Addr::new(10, 244, 5, 5), "spoof-no-node"), (Ipv4Addr::new(10, 244, 1, 9), "spoof-own-range")];
    // 1. Legitimate traffic from pod a1 to pod b1.
    send_from(&a1.ns, a1.ip, vec![((b1.ip, LISTEN_PORT), b"legit-pod".to_vec())]);
    // 2. The report's scenario: pod a1 sends hand-built VXLAN to node B's underlay address.
    let from_pod = spoofs
        .iter()
        .map(|(src, text)| ((NODE_B, 8472), vxlan_payload(*src, b1.ip, format!("{text}-from-pod").as_bytes())))
        .collect();
    send_from(&a1.ns, a1.ip, from_pod);
    // 3. The same frames from node A's own stack (outer source node A, not through vxnat A),
    //    and, as a control that such a frame is delivered at all, one with a source of node
    //    A's: pod a1's.
    let mut from_node: Vec<_> = spoofs
        .iter()
        .map(|(src, text)| ((NODE_B, 8472), vxlan_payload(*src, b1.ip, format!("{text}-from-node").as_bytes())))
        .collect();
    from_node.push(((NODE_B, 8472), vxlan_payload(a1.ip, b1.ip, b"legit-vxlan-from-node")));
    send_from(&node_a.ns, NODE_A, from_node);

    let got = listener.join().expect("listener");
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    assert!(texts.contains(&"legit-pod"), "pod a1 -> pod b1 did not arrive: {got:?}");
    assert!(texts.contains(&"legit-vxlan-from-node"), "the control frame from node A was not delivered: {got:?}");
    let spoofed: Vec<_> = got.iter().filter(|(_, t)| t.starts_with("spoof")).collect();
    assert!(spoofed.is_empty(), "pod b1 received spoofed packets: {spoofed:?}");

    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dropped(node_a, "pod_to_vxlan_port"), 2, "node A: {}", node_a.ctl(&["stats"]).unwrap_or_default());
    assert_eq!(
        dropped(node_b, "tunnel_inner_source_spoofed"),
        2,
        "node B: {}",
        node_b.ctl(&["stats"]).unwrap_or_default()
    );
    // The pod's frames never left node A, so node B saw only the node's.
    assert_eq!(dropped(node_b, "pod_to_vxlan_port"), 0);
    let text = node_b.ctl(&["stats"]).expect("stats");
    assert!(
        text.contains("tunnel_inner_source_spoofed") && text.contains("not in the sending node's pod CIDR"),
        "{text}"
    );
    let text = node_a.ctl(&["stats"]).expect("stats");
    assert!(text.contains("pod_to_vxlan_port") && text.contains("must not inject VXLAN"), "{text}");
}
