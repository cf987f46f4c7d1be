//! Real kernels judge what vxnat emits over AF_XDP: two pods (network namespaces with their
//! own kernel TCP/UDP stacks, default offloads, so their TCP/UDP checksums arrive as
//! CHECKSUM_PARTIAL) on one node, talking through vxnat's pipeline. vxnat answers their ARP
//! for the gateway, routes between them, completes their checksums; afterwards every UMEM
//! chunk is accounted for.

use dataplane::pipeline::DropReason;
use dataplane::tables::{PortId, Tables};
use dataplane::wire::MacAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vxnat_tests::netns::{require_root, tcp_transfer, udp_datagrams};
use vxnat_tests::pods::{TwoPods, P1, P2, POD1, POD2};
use vxnat_tests::worker::run_worker;
use xsk::bpf::{AttachMode, Mode};
use xsk::worker::{Worker, WorkerConfig};

type Setup = TwoPods;

fn setup() -> Setup {
    TwoPods::new("")
}

fn tables(s: &Setup) -> Tables {
    s.tables(MacAddr([2, 0, 0, 0, 0x99, 1]))
}

struct Report {
    balanced: bool,
    account: String,
    completed: u64,
    drops: Vec<(PortId, DropReason, u64)>,
    redirected: u64,
}

/// Runs a worker in the node namespace until `stop`; then drains and reports.
fn run(s: &Setup, tables: Tables, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Report> {
    let make = || {
        let mut w =
            Worker::new(0, WorkerConfig { attach: AttachMode::Native, ..WorkerConfig::default() }).expect("worker");
        w.add_port(P1, "vxp1", Mode::All, [0; 4], 8472).expect("bind vxp1");
        w.add_port(P2, "vxp2", Mode::All, [0; 4], 8472).expect("bind vxp2");
        w
    };
    run_worker(&s.node, tables, stop, make, |w| {
        let a = w.account();
        let mut drops = Vec::new();
        for (port, c) in w.counters().iter() {
            for (r, n) in c.nonzero_drops() {
                drops.push((port, r, n));
            }
        }
        let completed = w.counters().iter().map(|(_, c)| c.events.partial_checksums_completed).sum();
        let redirected = [P1, P2].iter().map(|p| w.xdp_exits(*p).and_then(Result::ok).map(|e| e[0]).unwrap_or(0)).sum();
        Report { balanced: a.balanced(), account: format!("{a:?}"), completed, drops, redirected }
    })
}

#[test]
fn pods_on_one_node_talk_through_vxnat_over_af_xdp() {
    if !require_root("pods_on_one_node_talk_through_vxnat_over_af_xdp") {
        return;
    }
    let s = setup();
    let t = tables(&s);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = run(&s, t, stop.clone());

    // Ping across (ARP for the gateway answered by vxnat, ICMP routed pod to pod).
    let ping = s.pod1.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.244.0.3"]);
    let ping_ok = ping.status.success();

    // 8 MiB of TCP, hashed at both ends; 200 UDP datagrams (the kernel drops bad checksums).
    let tcp = tcp_transfer(&s.pod1, &s.pod2, POD2, 5201, 8 << 20);
    let udp_got = udp_datagrams(&s.pod1, POD1, &s.pod2, POD2, 5300, 200, 1000);

    stop.store(true, Ordering::Relaxed);
    let r = worker.join().expect("worker thread");
    assert!(ping_ok, "ping pod1 -> pod2 failed: {}", String::from_utf8_lossy(&ping.stdout));
    tcp.expect("TCP stream");
    assert!(udp_got >= 195, "only {udp_got}/200 UDP datagrams arrived intact");
    assert!(r.completed > 0, "no CHECKSUM_PARTIAL completed: the pods' offload path was not exercised");
    assert!(r.redirected > 1000, "XDP redirected only {} frames", r.redirected);
    assert!(r.balanced, "UMEM chunks leaked: {}", r.account);
    let unexpected: Vec<_> = r.drops.iter().filter(|(_, d, _)| !matches!(d, DropReason::Ipv6Unsupported)).collect();
    assert!(unexpected.is_empty(), "unexpected drops: {unexpected:?}");
}
