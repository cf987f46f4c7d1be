//! Issue 17's soak (not in CI: `#[ignore]`): mixed traffic for `VXNAT_SOAK_MINUTES` (default
//! 30) through a two-node cluster while node A restarts every `VXNAT_SOAK_RESTART_S` (default
//! 180) seconds, in turn by takeover, SIGTERM + start and kill -9 + start, and the Service's
//! endpoints churn every 20 s. Run it as root:
//!
//! ```text
//! VXNAT_SOAK_MINUTES=30 cargo test --release -p vxnat-control --test soak -- --ignored --nocapture
//! ```
//!
//! Traffic, all real kernel TCP/UDP in namespaces, bounded by the deadline:
//! - short connections pod a1 -> ClusterIP (client-first, answered and closed by the endpoint);
//! - short connections from outside the cluster -> node A's NodePort (SNAT'd);
//! - paced streams pod a2 -> ClusterIP, one after the other, each checked by count and hash;
//! - a 200 Hz UDP probe a1 -> b2 through both nodes.
//!
//! Judged at the end, once traffic has stopped and closed flows have expired: node B (never
//! restarted, it sees all the churn) ends with the flows, RSS (within 8 MiB) and open fds it
//! had after the warm-up and every UMEM chunk accounted for; node A's last process holds as many fds as a
//! freshly started one; every stream arrived intact; no short connection failed outside the
//! restarts' gaps (each failure is printed with when it happened).

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vxnat_tests::netns::{fnv1a, payload, require_root, Netns, FNV_OFFSET};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 95);
const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

/// The Service, its endpoints chosen by `ready` (b1 always, a2 and b2 toggled by churn).
fn state(a2: bool, b2: bool) -> String {
    let mut eps = String::from("  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}\n");
    for (on, ip, node) in [(a2, "10.244.0.3", "node-a"), (b2, "10.244.1.3", "node-b")] {
        eps.push_str(&format!("  - {{addresses: [{ip}], conditions: {{ready: {on}}}, nodeName: {node}}}\n"));
    }
    format!(
        r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: soak, namespace: default}}
  spec:
    type: NodePort
    clusterIP: 10.96.0.95
    externalTrafficPolicy: Cluster
    ports:
    - {{name: who, port: 80, targetPort: 9000, protocol: TCP, nodePort: 30098}}
    - {{name: sink, port: 81, targetPort: 9001, protocol: TCP}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {{name: soak-x1, namespace: default, labels: {{kubernetes.io/service-name: soak}}}}
  addressType: IPv4
  ports:
  - {{name: who, port: 9000, protocol: TCP}}
  - {{name: sink, port: 9001, protocol: TCP}}
  endpoints:
{eps}"#
    )
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An endpoint: 9000 reads a request line and answers its name, then closes; 9001 reads a
/// stream to its end and answers "bytes hash".
fn endpoint(pod: &Pod, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ip = pod.ip;
    pod.ns.spawn(move || {
        let ls: Vec<TcpListener> = [9000, 9001].iter().map(|p| TcpListener::bind((ip, *p)).expect("listen")).collect();
        for l in &ls {
            l.set_nonblocking(true).expect("nonblocking");
        }
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            for (i, l) in ls.iter().enumerate() {
                let Ok((mut c, _)) = l.accept() else { continue };
                idle = false;
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                std::thread::spawn(move || {
                    if i == 0 {
                        let mut b = [0u8; 16];
                        let _ = c.read(&mut b);
                        let _ = c.write_all(name.as_bytes());
                        return;
                    }
                    let (mut n, mut h, mut buf) = (0usize, FNV_OFFSET, vec![0u8; 64 << 10]);
                    while let Ok(k) = c.read(&mut buf) {
                        if k == 0 {
                            let _ = c.write_all(format!("{n} {h:x}").as_bytes());
                            return;
                        }
                        n += k;
                        h = fnv1a(&buf[..k], h);
                    }
                });
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
}

/// Short client-first connections to `to` until `stop`, one every `every`: successes, and the
/// failures with when they happened (seconds since `t0`).
fn short_connections(
    name: &'static str,
    from: &Netns,
    to: SocketAddrV4,
    every: Duration,
    t0: Instant,
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<(f64, String)>>>,
) -> std::thread::JoinHandle<u64> {
    from.spawn(move || {
        let mut ok = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = (|| {
                let mut c =
                    TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).map_err(|e| e.to_string())?;
                c.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
                c.write_all(b"GET\n").map_err(|e| e.to_string())?;
                let mut s = String::new();
                c.read_to_string(&mut s).map_err(|e| e.to_string())?;
                if s.is_empty() {
                    return Err("empty answer".to_string());
                }
                Ok(())
            })();
            match r {
                Ok(()) => ok += 1,
                Err(e) => failures.lock().expect("failures").push((t0.elapsed().as_secs_f64(), format!("{name}: {e}"))),
            }
            std::thread::sleep(every);
        }
        ok
    })
}

/// Paced streams of 60 s each to `to` until `stop`: (intact, damaged with why).
fn streams(from: &Netns, to: SocketAddrV4, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    from.spawn(move || {
        let (mut intact, mut damaged, mut seed) = (0, Vec::new(), 1u64);
        while !stop.load(Ordering::Relaxed) {
            seed += 1;
            let data = payload(seed, 6000 * 1024);
            let r = (|| {
                let mut c =
                    TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).map_err(|e| e.to_string())?;
                for chunk in data.chunks(1024) {
                    c.write_all(chunk).map_err(|e| format!("send: {e}"))?;
                    std::thread::sleep(Duration::from_millis(10));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                c.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
                let mut answer = String::new();
                c.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
                c.read_to_string(&mut answer).map_err(|e| format!("answer: {e}"))?;
                Ok::<_, String>(answer)
            })();
            match r {
                // Cut short by the deadline: the endpoint's count tells how much, the hash is
                // checked over what was sent.
                Ok(answer) => {
                    let n: usize = answer.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let want = format!("{n} {:x}", fnv1a(&data[..n.min(data.len())], FNV_OFFSET));
                    if answer == want && n > 0 {
                        intact += 1;
                    } else {
                        damaged.push(format!("stream {seed}: endpoint got {answer:?}, want {want:?}"));
                    }
                }
                Err(e) => damaged.push(format!("stream {seed}: {e}")),
            }
        }
        (intact, damaged)
    })
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    flows: u64,
    umem_free: u64,
    balanced: bool,
    holdings: Holdings,
}

fn snapshot(n: &NodeNs) -> Snapshot {
    let s = n.stats_json();
    Snapshot {
        flows: s["worker"]["flows"].as_u64().unwrap_or(u64::MAX),
        umem_free: s["worker"]["umem_free"].as_u64().unwrap_or(0),
        balanced: s["worker"]["umem_balanced"] == true,
        holdings: holdings(n.pid()),
    }
}

#[test]
#[ignore = "a 30-minute soak: run it by hand (module docs)"]
fn soak_mixed_traffic_restarts_and_churn() {
    if !require_root("soak_mixed_traffic_restarts_and_churn") {
        return;
    }
    let minutes = env_u64("VXNAT_SOAK_MINUTES", 30);
    let restart_every = Duration::from_secs(env_u64("VXNAT_SOAK_RESTART_S", 180));
    let mut c = cluster_with(&state(true, true));
    let state_path = c._dir.0.join("cluster.yaml");
    let base = std::fs::read_to_string(&state_path).expect("state");
    let base = base[..base.rfind("apiVersion: v1\nkind: List").unwrap_or(base.len())].to_string();
    let stop_servers = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = [(1, "a2"), (2, "b1"), (3, "b2")]
        .into_iter()
        .map(|(i, name)| endpoint(&c.pods[i], name, stop_servers.clone()))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let fresh_fds_a = holdings(c.nodes[0].pid()).fds;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let who = SocketAddrV4::new(VIP, 80);
    let pod_short = short_connections(
        "pod -> ClusterIP",
        &c.pods[0].ns,
        who,
        Duration::from_millis(20),
        t0,
        stop.clone(),
        failures.clone(),
    );
    let np = SocketAddrV4::new(NODE_A, 30098);
    let outside_short = short_connections(
        "outside -> NodePort",
        &c.client,
        np,
        Duration::from_millis(20),
        t0,
        stop.clone(),
        failures.clone(),
    );
    let stream = streams(&c.pods[1].ns, SocketAddrV4::new(VIP, 81), stop.clone());
    let probes = Arc::new(AtomicU64::new(0));
    let (a1_ip, b2_ip) = (c.pods[0].ip, c.pods[3].ip);
    let probe_rx = {
        let (stop, got) = (stop.clone(), probes.clone());
        c.pods[3].ns.spawn(move || {
            let s = UdpSocket::bind((b2_ip, 9100)).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(100))).ok();
            let mut b = [0u8; 8];
            while !stop.load(Ordering::Relaxed) {
                if s.recv(&mut b).is_ok() {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let probe_tx = {
        let stop = stop.clone();
        c.pods[0].ns.spawn(move || {
            let s = UdpSocket::bind((a1_ip, 0)).expect("socket");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = s.send_to(&n.to_be_bytes(), (b2_ip, 9100));
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    // Warm-up, then node B's baseline.
    std::thread::sleep(Duration::from_secs(20));
    let b_start = snapshot(&c.nodes[1]);
    let deadline = t0 + Duration::from_secs(minutes * 60);
    let (mut next_restart, mut next_churn, mut restarts, mut churns) =
        (Instant::now() + restart_every, Instant::now() + Duration::from_secs(20), 0usize, 0usize);
    let mut restart_log = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() >= next_churn {
            churns += 1;
            std::fs::write(&state_path, format!("{base}{}", state(churns % 2 == 0, churns % 3 != 0))).expect("state");
            next_churn += Duration::from_secs(20);
        }
        if Instant::now() >= next_restart {
            let at = t0.elapsed().as_secs_f64();
            let how = ["takeover", "SIGTERM + start", "kill -9 + start"][restarts % 3];
            match restarts % 3 {
                0 => c.nodes[0].take_over(),
                1 => {
                    c.nodes[0].stop();
                    c.nodes[0].start();
                }
                _ => {
                    c.nodes[0].kill9();
                    c.nodes[0].start();
                }
            }
            restarts += 1;
            restart_log.push((at, how));
            next_restart += restart_every;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (pod_ok, outside_ok) = (pod_short.join().expect("pod clients"), outside_short.join().expect("outside clients"));
    let (intact, damaged) = stream.join().expect("streams");
    let sent = probe_tx.join().expect("probe sender");
    let _ = probe_rx.join();
    stop_servers.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    // Closed flows leave conntrack after TIME_WAIT's 120 s.
    let settle = Instant::now() + Duration::from_secs(200);
    let mut b_end = snapshot(&c.nodes[1]);
    while b_end.flows > b_start.flows && Instant::now() < settle {
        std::thread::sleep(Duration::from_secs(5));
        b_end = snapshot(&c.nodes[1]);
    }
    let a_end = snapshot(&c.nodes[0]);
    for n in &c.nodes {
        eprintln!("{}:\n{}", n.name, n.ctl(&["stats"]).unwrap_or_default());
    }
    let failures = failures.lock().expect("failures").clone();
    eprintln!(
        "soak: {minutes} min, {restarts} restarts of node A ({restart_log:?}), {churns} endpoint changes\n\
         short connections: {pod_ok} pod -> ClusterIP, {outside_ok} outside -> NodePort, {} failed: {:?}\n\
         streams: {intact} intact, {} damaged: {damaged:?}\n\
         UDP probe: {} of {sent} arrived\n\
         node B: start {b_start:?}\n        end   {b_end:?}\n\
         node A: fresh process fds {fresh_fds_a}, last process at the end {a_end:?}",
        failures.len(),
        failures,
        damaged.len(),
        probes.load(Ordering::Relaxed),
    );
    let outside_gaps: Vec<_> =
        failures.iter().filter(|(t, _)| !restart_log.iter().any(|(at, _)| *t >= *at && *t <= at + 10.0)).collect();
    assert!(outside_gaps.is_empty(), "short connections failed away from any restart: {outside_gaps:?}");
    assert!(damaged.is_empty(), "damaged streams: {damaged:?}");
    assert!(intact > 0, "no stream completed");
    assert!(b_end.flows <= b_start.flows, "node B's flows grew: {} -> {}", b_start.flows, b_end.flows);
    // Free chunks move with the adaptive fill targets; a leak shows as unaccounted chunks.
    eprintln!("node B: free UMEM chunks {} -> {} (they follow the fill targets)", b_start.umem_free, b_end.umem_free);
    assert!(b_start.balanced && b_end.balanced, "node B's UMEM: {b_start:?} -> {b_end:?}");
    assert_eq!(b_end.holdings.fds, b_start.holdings.fds, "node B's fds");
    assert!(b_end.holdings.rss_kib <= b_start.holdings.rss_kib + 8 * 1024, "node B's RSS: {b_start:?} -> {b_end:?}");
    assert_eq!(a_end.holdings.fds, fresh_fds_a, "node A's last process holds more fds than a fresh one");
    assert!(a_end.balanced, "node A's UMEM");
}
