//! Pods on two nodes talk over VXLAN through vxnat's AF_XDP datapath:
//! - vxnat node <-> vxnat node;
//! - vxnat node <-> a kernel VXLAN device configured the way flannel configures flannel.1
//!   (VNI 1, port 8472, nolearning, neighbour + FDB entries, onlink route, cni0 bridge):
//!   wire compatibility judged by the kernel's own VXLAN and TCP stacks.
//!
//! Underlay: a veth pair between the node namespaces, MTU 1500; pod MTU 1450 (flannel's).

use dataplane::pipeline::DropReason;
use dataplane::tables::{NodeConfig, PortId, Tables, TablesBuilder};
use dataplane::wire::MacAddr;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vxnat_tests::netns::{require_root, tcp_transfer, udp_datagrams, Netns};
use vxnat_tests::worker::run_worker;
use xsk::bpf::Mode;
use xsk::worker::{Worker, WorkerConfig};

const UPLINK: PortId = PortId(0);
const POD: PortId = PortId(2);
const VTEP_A: &str = "0e:a1:00:00:00:0a";
const VTEP_B: &str = "0e:a1:00:00:00:0b";

fn mac(s: &str) -> MacAddr {
    s.parse().expect("MAC")
}

struct Node {
    ns: Netns,
    pod: Netns,
    underlay_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    /// This node's pod CIDR, `10.244.N.0/24`.
    n: u8,
}

/// Two node namespaces joined by a veth underlay (`ul` in each), a pod namespace per node.
fn underlay() -> (Node, Node) {
    let a = Node {
        ns: Netns::new("nodea"),
        pod: Netns::new("poda"),
        underlay_ip: Ipv4Addr::new(192, 168, 77, 1),
        pod_ip: Ipv4Addr::new(10, 244, 0, 2),
        n: 0,
    };
    let b = Node {
        ns: Netns::new("nodeb"),
        pod: Netns::new("podb"),
        underlay_ip: Ipv4Addr::new(192, 168, 77, 2),
        pod_ip: Ipv4Addr::new(10, 244, 1, 2),
        n: 1,
    };
    a.ns.ip(&["link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns", &b.ns.name]);
    for n in [&a, &b] {
        n.ns.ip(&["addr", "add", &format!("{}/24", n.underlay_ip), "dev", "ul"]);
        n.ns.ip(&["link", "set", "ul", "up"]);
    }
    (a, b)
}

/// A pod behind vxnat: a routed /32 endpoint on veth `vxpod`, MTU 1450.
fn vxnat_pod(n: &Node) {
    vxnat_pod_mtu(n, 1450);
}

/// A pod behind vxnat with its veth at `mtu` (9000: a jumbo pod behind a 1500-byte underlay).
fn vxnat_pod_mtu(n: &Node, mtu: u32) {
    let mtu = mtu.to_string();
    n.ns.ip(&["link", "add", "vxpod", "type", "veth", "peer", "name", "eth0", "netns", &n.pod.name]);
    n.ns.ip(&["link", "set", "vxpod", "mtu", &mtu, "up"]);
    let gw = format!("10.244.{}.1", n.n);
    n.pod.ip(&["addr", "add", &format!("{}/32", n.pod_ip), "dev", "eth0"]);
    n.pod.ip(&["link", "set", "eth0", "mtu", &mtu, "up"]);
    n.pod.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"]);
    n.pod.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"]);
}

/// A node as flannel's vxlan backend sets it up: flannel.1 (VNI 1, port 8472, nolearning,
/// VtepMAC, 10.244.N.0/32, MTU 1450), cni0 bridge with the pod gateway, the pod on cni0, and
/// for the peer: route via its .0 onlink, permanent neighbour, FDB entry to its node IP.
fn flannel_node(n: &Node, peer: &Node, vtep: &str, peer_vtep: &str) {
    let ns = &n.ns;
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &n.underlay_ip.to_string(),
        "dev",
        "ul",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ns.ip(&["link", "set", "flannel.1", "address", vtep, "mtu", "1450", "up"]);
    ns.ip(&["addr", "add", &format!("10.244.{}.0/32", n.n), "dev", "flannel.1"]);
    let peer_net = format!("10.244.{}.0", peer.n);
    ns.ip(&["route", "add", &format!("{peer_net}/24"), "via", &peer_net, "dev", "flannel.1", "onlink"]);
    ns.ip(&["neigh", "add", &peer_net, "lladdr", peer_vtep, "dev", "flannel.1", "nud", "permanent"]);
    ns.exec(&["bridge", "fdb", "append", peer_vtep, "dev", "flannel.1", "dst", &peer.underlay_ip.to_string()]);
    ns.ip(&["link", "add", "cni0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("10.244.{}.1/24", n.n), "dev", "cni0"]);
    ns.ip(&["link", "set", "cni0", "mtu", "1450", "up"]);
    ns.ip(&["link", "add", "vethpod", "type", "veth", "peer", "name", "eth0", "netns", &n.pod.name]);
    ns.ip(&["link", "set", "vethpod", "master", "cni0", "mtu", "1450", "up"]);
    n.pod.ip(&["addr", "add", &format!("{}/24", n.pod_ip), "dev", "eth0"]);
    n.pod.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
    n.pod.ip(&["route", "add", "default", "via", &format!("10.244.{}.1", n.n)]);
}

fn vxnat_tables(n: &Node, vtep: &str, peer: &Node, peer_vtep: &str) -> Tables {
    vxnat_tables_outer(n, vtep, peer, peer_vtep, false)
}

fn vxnat_tables_outer(n: &Node, vtep: &str, peer: &Node, peer_vtep: &str, outer_udp_checksum: bool) -> Tables {
    let node = NodeConfig {
        node_ip: n.underlay_ip,
        uplink_mac: n.ns.mac("ul"),
        vtep_mac: mac(vtep),
        pod_cidr: format!("10.244.{}.0/24", n.n).parse().expect("cidr"),
        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
        vni: 1,
        vxlan_port: 8472,
        underlay_mtu: 1500,
        outer_udp_checksum,
        segmentation: true,
    };
    TablesBuilder::new(node)
        .uplink(UPLINK)
        .and_then(|b| b.pod(POD, n.ns.mac("vxpod"), n.pod_ip, n.pod.mac("eth0")))
        .and_then(|b| {
            b.remote(
                "peer",
                peer.underlay_ip,
                mac(peer_vtep),
                format!("10.244.{}.0/24", peer.n).parse().expect("cidr"),
                peer.ns.mac("ul"),
            )
        })
        .and_then(|b| b.build())
        .expect("valid tables")
}

struct Report {
    balanced: bool,
    account: String,
    encapsulated: u64,
    decapsulated: u64,
    drops: Vec<(PortId, DropReason, u64)>,
    segmented: u64,
    segments_sent: u64,
    frag_needed_sent: u64,
    multi_buffer_frames: u64,
}

fn run_vxnat(n: &Node, tables: Tables, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Report> {
    run_vxnat_with(n, tables, stop, WorkerConfig::default())
}

fn run_vxnat_with(
    n: &Node,
    tables: Tables,
    stop: Arc<AtomicBool>,
    cfg: WorkerConfig,
) -> std::thread::JoinHandle<Report> {
    let ip = n.underlay_ip.octets();
    let make = move || {
        let mut w = Worker::new(0, cfg).expect("worker");
        w.add_port(UPLINK, "ul", Mode::Uplink, ip, 8472).expect("bind uplink");
        w.add_port(POD, "vxpod", Mode::All, ip, 8472).expect("bind pod port");
        w
    };
    run_worker(&n.ns, tables, stop, make, |w| {
        let a = w.account();
        let mut drops = Vec::new();
        let (mut encapsulated, mut decapsulated, mut segmented, mut segments_sent, mut frag_needed_sent) =
            (0, 0, 0, 0, 0);
        for (port, c) in w.counters().iter() {
            encapsulated += c.events.encapsulated;
            decapsulated += c.events.decapsulated;
            segmented += c.events.segmented;
            segments_sent += c.events.segments_sent;
            frag_needed_sent += c.events.icmp_frag_needed_sent;
            drops.extend(c.nonzero_drops().map(|(r, k)| (port, r, k)));
        }
        Report {
            balanced: a.balanced(),
            account: format!("{a:?}"),
            encapsulated,
            decapsulated,
            drops,
            segmented,
            segments_sent,
            frag_needed_sent,
            multi_buffer_frames: w.io.multi_buffer_frames,
        }
    })
}

/// Ping, a TCP stream of `len` bytes from `from`'s pod to `to`'s pod (hash checked), and 100
/// UDP datagrams; returns a description of the first failure.
fn traffic(from: &Node, to: &Node, len: usize, port: u16) -> Result<(), String> {
    let dst = to.pod_ip.to_string();
    let ping = from.pod.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &dst]);
    if !ping.status.success() {
        return Err(format!("ping {} -> {dst} failed: {}", from.pod_ip, String::from_utf8_lossy(&ping.stdout)));
    }
    tcp_transfer(&from.pod, &to.pod, to.pod_ip, port, len)?;
    let got = udp_datagrams(&from.pod, from.pod_ip, &to.pod, to.pod_ip, port + 1, 100, 1200);
    if got < 98 {
        return Err(format!("UDP {} -> {dst}: {got}/100 intact", from.pod_ip));
    }
    Ok(())
}

fn check(r: &Report, who: &str) {
    assert!(r.balanced, "{who}: UMEM chunks leaked: {}", r.account);
    assert!(r.encapsulated > 1000 && r.decapsulated > 1000, "{who}: encap {} decap {}", r.encapsulated, r.decapsulated);
    let unexpected: Vec<_> = r.drops.iter().filter(|(_, d, _)| !matches!(d, DropReason::Ipv6Unsupported)).collect();
    assert!(unexpected.is_empty(), "{who}: unexpected drops: {unexpected:?}");
}

#[test]
fn pods_on_two_vxnat_nodes_talk_over_vxlan() {
    if !require_root("pods_on_two_vxnat_nodes_talk_over_vxlan") {
        return;
    }
    let (a, b) = underlay();
    vxnat_pod(&a);
    vxnat_pod(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let wa = run_vxnat(&a, vxnat_tables(&a, VTEP_A, &b, VTEP_B), stop.clone());
    let wb = run_vxnat(&b, vxnat_tables(&b, VTEP_B, &a, VTEP_A), stop.clone());
    let ab = traffic(&a, &b, 64 << 20, 6000);
    let ba = traffic(&b, &a, 8 << 20, 6100);
    stop.store(true, Ordering::Relaxed);
    let (ra, rb) = (wa.join().expect("worker a"), wb.join().expect("worker b"));
    ab.expect("pod A -> pod B");
    ba.expect("pod B -> pod A");
    check(&ra, "node A");
    check(&rb, "node B");
}

#[test]
fn vxnat_node_interoperates_with_a_flannel_kernel_node() {
    if !require_root("vxnat_node_interoperates_with_a_flannel_kernel_node") {
        return;
    }
    let (a, b) = underlay();
    vxnat_pod(&a);
    flannel_node(&b, &a, VTEP_B, VTEP_A);
    let stop = Arc::new(AtomicBool::new(false));
    let wa = run_vxnat(&a, vxnat_tables(&a, VTEP_A, &b, VTEP_B), stop.clone());
    let ab = traffic(&a, &b, 16 << 20, 6200);
    let ba = traffic(&b, &a, 16 << 20, 6300);
    // The kernel side's own counters: nothing dropped by its VXLAN device or UDP layer.
    let stats = b.ns.ip(&["-s", "link", "show", "flannel.1"]);
    let snmp = b.ns.exec(&["cat", "/proc/net/snmp"]);
    stop.store(true, Ordering::Relaxed);
    let ra = wa.join().expect("worker a");
    if ab.is_err() || ba.is_err() {
        eprintln!("vxnat node A: drops {:?} encap {} decap {}", ra.drops, ra.encapsulated, ra.decapsulated);
        eprintln!("flannel node B flannel.1:\n{}", String::from_utf8_lossy(&stats.stdout));
        let ns = b.ns.exec(&["nstat", "-az"]);
        eprintln!(
            "flannel node B nstat:\n{}",
            String::from_utf8_lossy(&ns.stdout).lines().filter(|l| !l.contains(" 0 ")).collect::<Vec<_>>().join("\n")
        );
    }
    ab.expect("vxnat pod -> flannel pod");
    ba.expect("flannel pod -> vxnat pod");
    check(&ra, "vxnat node");
    let snmp = String::from_utf8_lossy(&snmp.stdout).to_string();
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    if let [names, values] = udp[..] {
        let idx = names.split_whitespace().position(|n| n == "InCsumErrors").expect("InCsumErrors column");
        let v: u64 = values.split_whitespace().nth(idx).and_then(|s| s.parse().ok()).expect("value");
        assert_eq!(v, 0, "the flannel node counted UDP checksum errors");
    }
}

/// A jumbo pod (MTU 9000) on each node, a 1500-byte underlay between: the pods' kernels send
/// 9000-byte frames, which reach vxnat as multi-buffer AF_XDP chains and leave as segments that
/// fit the tunnel; TCP completes both ways with every byte intact. UDP with DF set is answered
/// with ICMP fragmentation needed, and the sender's kernel lowers its path MTU.
#[test]
fn jumbo_pods_talk_through_a_1500_byte_underlay() {
    if !require_root("jumbo_pods_talk_through_a_1500_byte_underlay") {
        return;
    }
    let (a, b) = underlay();
    vxnat_pod_mtu(&a, 9000);
    vxnat_pod_mtu(&b, 9000);
    let stop = Arc::new(AtomicBool::new(false));
    let wa = run_vxnat(&a, vxnat_tables(&a, VTEP_A, &b, VTEP_B), stop.clone());
    let wb = run_vxnat(&b, vxnat_tables(&b, VTEP_B, &a, VTEP_A), stop.clone());
    let ab = tcp_transfer(&a.pod, &b.pod, b.pod_ip, 6400, 16 << 20);
    let ba = tcp_transfer(&b.pod, &a.pod, a.pod_ip, 6401, 8 << 20);
    // UDP, DF set (IP_PMTUDISC_DO), 8000 bytes: fits the pod's MTU, not the tunnel.
    let dst = b.pod_ip;
    let pmtu = a.pod.spawn(move || vxnat_tests::netns::udp_df_probe(dst, 7000, 8000)).join().expect("udp");
    stop.store(true, Ordering::Relaxed);
    let (ra, rb) = (wa.join().expect("worker a"), wb.join().expect("worker b"));
    ab.expect("jumbo pod A -> jumbo pod B");
    ba.expect("jumbo pod B -> jumbo pod A");
    assert!(ra.balanced && rb.balanced, "UMEM: {} / {}", ra.account, rb.account);
    assert!(ra.multi_buffer_frames > 100, "9000-byte frames arrived as chains: {}", ra.multi_buffer_frames);
    assert!(
        ra.segmented > 100 && ra.segments_sent > 6 * ra.segmented - ra.segmented,
        "segmented {} into {}",
        ra.segmented,
        ra.segments_sent
    );
    assert!(rb.segmented > 10, "B segmented too: {}", rb.segmented);
    assert_eq!(pmtu.0, Ok(8000), "the first DF datagram leaves the pod");
    assert_eq!(pmtu.1, Err(Some(libc::EMSGSIZE)), "path MTU lowered by vxnat's ICMP");
    assert_eq!(pmtu.2, 1450, "the pod's path MTU toward the remote pod");
    assert!(ra.frag_needed_sent >= 1);
    let unexpected: Vec<_> =
        ra.drops.iter().chain(&rb.drops).filter(|(_, d, _)| !matches!(d, DropReason::Ipv6Unsupported)).collect();
    assert!(unexpected.is_empty(), "unexpected drops: {unexpected:?}");
}

/// Incident 5: aggregated frames on the uplink. Node A's underlay does GRO (as a NIC doing LRO
/// would; a kernel VXLAN socket on 8472 lets GRO aggregate the tunnelled TCP), and vxnat's
/// program runs in generic mode, after GRO, so frames of tens of KiB carrying many inner TCP
/// segments reach vxnat. They used to be dropped; now they reach pod A (MTU 1450) as valid
/// segments, and its kernel TCP gets the whole stream from a flannel node's pod.
#[test]
fn aggregated_frames_from_the_uplink_reach_the_pod_as_segments() {
    if !require_root("aggregated_frames_from_the_uplink_reach_the_pod_as_segments") {
        return;
    }
    let (a, b) = underlay();
    vxnat_pod(&a);
    flannel_node(&b, &a, VTEP_B, VTEP_A);
    a.ns.exec(&["ethtool", "-K", "ul", "gro", "on"]);
    a.ns.ip(&["link", "add", "vxgro", "type", "vxlan", "id", "99", "dstport", "8472", "dev", "ul", "nolearning"]);
    a.ns.ip(&["link", "set", "vxgro", "up"]);
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = WorkerConfig { attach: xsk::bpf::AttachMode::Generic, ..WorkerConfig::default() };
    let wa = run_vxnat_with(&a, vxnat_tables(&a, VTEP_A, &b, VTEP_B), stop.clone(), cfg);
    let ba = tcp_transfer(&b.pod, &a.pod, a.pod_ip, 6500, 32 << 20);
    stop.store(true, Ordering::Relaxed);
    let ra = wa.join().expect("worker a");
    eprintln!(
        "node A: multi-buffer frames {}, segmented {} into {}, drops {:?}",
        ra.multi_buffer_frames, ra.segmented, ra.segments_sent, ra.drops
    );
    ba.expect("flannel pod -> vxnat pod, through aggregated frames");
    assert!(ra.balanced, "UMEM: {}", ra.account);
    assert!(ra.segmented > 10, "aggregated frames reached vxnat and were segmented: {}", ra.segmented);
    let unexpected: Vec<_> = ra.drops.iter().filter(|(_, d, _)| !matches!(d, DropReason::Ipv6Unsupported)).collect();
    assert!(unexpected.is_empty(), "unexpected drops: {unexpected:?}");
}

/// The kernel's checksum error counters in a namespace (TCP and UDP `InCsumErrors`).
fn csum_errors(ns: &Netns) -> (u64, u64) {
    let snmp = String::from_utf8_lossy(&ns.exec(&["cat", "/proc/net/snmp"]).stdout).to_string();
    let get = |proto: &str| {
        let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with(proto)).collect();
        let idx = lines[0].split_whitespace().position(|n| n == "InCsumErrors").expect("column");
        lines[1].split_whitespace().nth(idx).and_then(|v| v.parse().ok()).expect("value")
    };
    (get("Tcp:"), get("Udp:"))
}

/// Incident 1: checksums left to an offload nobody performed. Both nodes compute the outer
/// VXLAN UDP checksum and verify the ones they receive; pods keep their default offloads
/// (their checksums arrive pseudo-header-only and vxnat completes them). Traffic flows both
/// ways, the pods' kernels count no checksum error, and a frame whose outer checksum was
/// corrupted on the way is dropped under its own name.
#[test]
fn corrupted_outer_checksums_are_named_drops_and_pods_get_valid_checksums() {
    if !require_root("corrupted_outer_checksums_are_named_drops_and_pods_get_valid_checksums") {
        return;
    }
    let (a, b) = underlay();
    vxnat_pod(&a);
    vxnat_pod(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let wa = run_vxnat(&a, vxnat_tables_outer(&a, VTEP_A, &b, VTEP_B, true), stop.clone());
    let wb = run_vxnat(&b, vxnat_tables_outer(&b, VTEP_B, &a, VTEP_A, true), stop.clone());
    let ab = traffic(&a, &b, 8 << 20, 6600);
    let ba = traffic(&b, &a, 8 << 20, 6700);
    // A VXLAN frame from node B to node A whose outer UDP checksum no longer matches.
    let inner = dataplane::testkit::ipv4(
        b.pod_ip,
        a.pod_ip,
        &dataplane::testkit::L4::Udp { sport: 9, dport: 9, payload: b"corrupted on the wire" },
    );
    let v = dataplane::testkit::Vxlan {
        outer_src_mac: b.ns.mac("ul"),
        outer_dst_mac: a.ns.mac("ul"),
        src_ip: b.underlay_ip,
        dst_ip: a.underlay_ip,
        ident: 1,
        sport: 40000,
        dport: 8472,
        vni: 1,
        flags: 0x08,
        inner_src_mac: mac(VTEP_B),
        inner_dst_mac: mac(VTEP_A),
        udp_checksum: true,
    };
    let mut frame = dataplane::testkit::vxlan_frame(&v, &inner);
    frame[40] ^= 0x5a;
    let bns = Netns { name: b.ns.name.clone() };
    bns.spawn(move || vxnat_tests::netns::send_raw("ul", &[frame])).join().expect("inject");
    std::mem::forget(bns);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let errors = (csum_errors(&a.pod), csum_errors(&b.pod));
    stop.store(true, Ordering::Relaxed);
    let (ra, rb) = (wa.join().expect("worker a"), wb.join().expect("worker b"));
    ab.expect("pod A -> pod B, outer checksums computed and verified");
    ba.expect("pod B -> pod A");
    assert_eq!(errors, ((0, 0), (0, 0)), "the pods' kernels found no bad checksum");
    let bad: u64 = ra.drops.iter().filter(|(_, d, _)| *d == DropReason::VxlanBadOuterChecksum).map(|x| x.2).sum();
    assert_eq!(bad, 1, "the corrupted frame is dropped by name: {:?}", ra.drops);
    let others: Vec<_> = ra
        .drops
        .iter()
        .chain(&rb.drops)
        .filter(|(_, d, _)| !matches!(d, DropReason::Ipv6Unsupported | DropReason::VxlanBadOuterChecksum))
        .collect();
    assert!(others.is_empty(), "unexpected drops: {others:?}");
}
