//! Issue 17, hitless restart: established connections through node A carry on, byte for
//! byte, across a SIGTERM + start and a kill -9 + start of node A's vxnat, while it carries:
//! - a client-first stream, pod a1 -> ClusterIP (DNAT on node A, endpoint on node B);
//! - a server-push stream, pod a1 -> ClusterIP (the endpoint sends, the client only ACKs);
//! - a client-first stream from outside the cluster through node A's NodePort, SNAT'd to node
//!   A (Cluster policy, endpoint on node B).
//!
//! Real kernel TCP judges: every stream ends with the bytes and hash the other side sent,
//! without a reset. A tuple held for the endpoint's TIME_WAIT before the restarts is still
//! held after them and not handed out again (a new process without the flows would give it
//! to the next connection first: same allocator seed, same order). The forwarding gap of each
//! restart is measured with a 1 kHz UDP probe through node A and printed; the takeover must
//! hand every socket over (not close and bind them), and kill -9 + start stay within 1 s.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vxnat_tests::netns::{fnv1a, payload, require_root, tcp_fetch_from, Netns, FNV_OFFSET};

const STREAMS: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: stream, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.90
    externalTrafficPolicy: Cluster
    ports:
    - {name: up, port: 80, targetPort: 9000, protocol: TCP, nodePort: 30095}
    - {name: down, port: 81, targetPort: 9001, protocol: TCP, nodePort: 30096}
    - {name: who, port: 82, targetPort: 9002, protocol: TCP, nodePort: 30097}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: stream-b1, namespace: default, labels: {kubernetes.io/service-name: stream}}
  addressType: IPv4
  ports:
  - {name: up, port: 9000, protocol: TCP}
  - {name: down, port: 9001, protocol: TCP}
  - {name: who, port: 9002, protocol: TCP}
  endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"#;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const CHUNK: usize = 8 << 10;
/// One chunk every 10 ms for this long: 800 KiB/s per stream.
const STREAM_FOR: Duration = Duration::from_secs(9);
const PROBE_PORT: u16 = 9100;

/// The endpoint (pod b1): 9000 reads a stream to its end and answers "bytes hash"; 9001
/// pushes `len` bytes of `payload(seed)` paced, then closes; 9002 answers the peer's address
/// and closes first (the endpoint holds the tuple in TIME_WAIT).
fn endpoint(pod: &Pod, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ip = pod.ip;
    pod.ns.spawn(move || {
        let listeners: Vec<TcpListener> =
            [9000, 9001, 9002].iter().map(|p| TcpListener::bind((ip, *p)).expect("listen")).collect();
        for l in &listeners {
            l.set_nonblocking(true).expect("nonblocking");
        }
        let mut served = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            for (i, l) in listeners.iter().enumerate() {
                let Ok((mut c, peer)) = l.accept() else { continue };
                idle = false;
                let _ = c.set_nonblocking(false);
                served.push(std::thread::spawn(move || match i {
                    0 => {
                        let (mut n, mut h, mut buf) = (0usize, FNV_OFFSET, vec![0u8; 64 << 10]);
                        loop {
                            match c.read(&mut buf) {
                                Ok(0) => break,
                                Ok(k) => {
                                    n += k;
                                    h = fnv1a(&buf[..k], h);
                                }
                                Err(_) => return,
                            }
                        }
                        let _ = c.write_all(format!("{n} {h:x}").as_bytes());
                    }
                    1 => {
                        let data = payload(9001, stream_len());
                        for chunk in data.chunks(CHUNK) {
                            if c.write_all(chunk).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    _ => {
                        let _ = c.write_all(peer.to_string().as_bytes());
                    }
                }));
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for t in served {
            let _ = t.join();
        }
    })
}

fn stream_len() -> usize {
    (STREAM_FOR.as_millis() as usize / 10) * CHUNK
}

/// Client-first: sends the paced stream to `to` from `from`'s namespace, then half-closes
/// and checks the endpoint's count and hash against its own.
fn send_stream(from: &Netns, to: SocketAddrV4, seed: u64) -> std::thread::JoinHandle<Result<(), String>> {
    from.spawn(move || {
        let mut c =
            TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
        let data = payload(seed, stream_len());
        for chunk in data.chunks(CHUNK) {
            c.write_all(chunk).map_err(|e| format!("send: {e}"))?;
            std::thread::sleep(Duration::from_millis(10));
        }
        c.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
        let mut answer = String::new();
        c.set_read_timeout(Some(Duration::from_secs(20))).ok();
        c.read_to_string(&mut answer).map_err(|e| format!("answer: {e}"))?;
        let want = format!("{} {:x}", data.len(), fnv1a(&data, FNV_OFFSET));
        if answer == want {
            Ok(())
        } else {
            Err(format!("endpoint got {answer:?}, sent {want:?}"))
        }
    })
}

/// Server-push: reads the endpoint's stream to its end and checks it byte for byte.
fn receive_stream(from: &Netns, to: SocketAddrV4) -> std::thread::JoinHandle<Result<(), String>> {
    from.spawn(move || {
        let mut c =
            TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut got = Vec::new();
        c.read_to_end(&mut got).map_err(|e| format!("after {} bytes: {e}", got.len()))?;
        let want = payload(9001, stream_len());
        if got == want {
            Ok(())
        } else {
            Err(format!("received {} bytes, {} sent; content differs", got.len(), want.len()))
        }
    })
}

/// The SNAT source port the endpoint saw for a new NodePort connection from the client.
fn who(client: &Netns, sport: u16) -> u16 {
    let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 100), sport);
    let dst = SocketAddrV4::new(NODE_A, 30097);
    let peer = client.spawn(move || tcp_fetch_from(src, dst)).join().expect("who").expect("NodePort connection");
    peer.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("peer {peer:?}"))
}

fn stats(n: &NodeNs) -> serde_json::Value {
    n.stats_json()
}

/// Longest time without a probe arriving within `window` (arrival times since `t0`).
fn gap_in(arrivals: &[Duration], window: (Duration, Duration)) -> Duration {
    let inside: Vec<Duration> = arrivals.iter().copied().filter(|t| *t >= window.0 && *t <= window.1).collect();
    inside.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(window.1 - window.0)
}

#[test]
fn established_connections_survive_sigterm_and_kill9_restarts() {
    if !require_root("established_connections_survive_sigterm_and_kill9_restarts") {
        return;
    }
    let mut c = cluster_with(STREAMS);
    let stop = Arc::new(AtomicBool::new(false));
    let server = endpoint(&c.pods[2], stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // A tuple the endpoint holds in TIME_WAIT: node A holds it too.
    let held = who(&c.client, 41000);
    std::thread::sleep(Duration::from_millis(300));
    assert!(stats(&c.nodes[0])["worker"]["snat_held"].as_u64().unwrap_or(0) >= 1, "not held before the restart");
    // The probe: a2 -> b2, 1 kHz, through node A's pod port and uplink.
    let t0 = Instant::now();
    let (a2_ip, b2_ip) = (c.pods[1].ip, c.pods[3].ip);
    let probe_stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let stop = probe_stop.clone();
        c.pods[3].ns.spawn(move || {
            let s = UdpSocket::bind((b2_ip, PROBE_PORT)).expect("probe bind");
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
            let mut arrivals = Vec::new();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    arrivals.push(t0.elapsed());
                }
            }
            arrivals
        })
    };
    let tx = {
        let stop = probe_stop.clone();
        c.pods[1].ns.spawn(move || {
            let s = UdpSocket::bind((a2_ip, 0)).expect("probe socket");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = s.send_to(&n.to_be_bytes(), (b2_ip, PROBE_PORT));
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        })
    };
    let up = send_stream(&c.pods[0].ns, SocketAddrV4::new(VIP, 80), 1);
    let down = receive_stream(&c.pods[0].ns, SocketAddrV4::new(VIP, 81));
    let outside = send_stream(&c.client, SocketAddrV4::new(NODE_A, 30095), 2);
    std::thread::sleep(Duration::from_millis(1500));
    let handover_at = t0.elapsed();
    c.nodes[0].take_over();
    let after_handover = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(2000));
    let sigterm_at = t0.elapsed();
    c.nodes[0].stop();
    c.nodes[0].start();
    let after_sigterm = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(2000));
    let kill_at = t0.elapsed();
    c.nodes[0].kill9();
    c.nodes[0].start();
    let after_kill = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    let results =
        [("pod -> ClusterIP", up.join()), ("ClusterIP pushes", down.join()), ("NodePort, SNAT", outside.join())];
    probe_stop.store(true, Ordering::Relaxed);
    let sent = tx.join().expect("probe sender");
    let arrivals = rx.join().expect("probe receiver");
    let second = Duration::from_secs(1);
    let gap = |at: Duration| gap_in(&arrivals, (at.saturating_sub(second / 2), at + 2 * second));
    let (gap_handover, gap_term, gap_kill) = (gap(handover_at), gap(sigterm_at), gap(kill_at));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "forwarding gap: takeover {:.0} ms, SIGTERM + start {:.0} ms, kill -9 + start {:.0} ms; probes {} of {sent} arrived",
        ms(gap_handover),
        ms(gap_term),
        ms(gap_kill),
        arrivals.len()
    );
    // The takeover hands the sockets over (nothing unbound, the gap is tens of ms in a release
    // build); the bounds here catch a fall back to closing and binding them (225+ ms).
    assert!(
        after_handover.contains("took over 4 sockets"),
        "the successor took the uplink, host port and both pods' sockets over:\n{after_handover}"
    );
    assert!(gap_handover <= Duration::from_millis(200), "takeover gap {:.0} ms", ms(gap_handover));
    assert!(gap_kill <= second, "kill -9 + start gap {:.0} ms (the issue's bound: 1 s)", ms(gap_kill));
    for (name, r) in &results {
        let r = r.as_ref().map_err(|_| "panicked".to_string()).and_then(|r| r.clone());
        assert!(
            r.is_ok(),
            "{name}: {r:?}\nnode A log after the takeover:\n{after_handover}\nafter SIGTERM + start:\n{after_sigterm}\nafter kill -9 + start:\n{after_kill}"
        );
    }
    for (when, log) in [("takeover", &after_handover), ("SIGTERM", &after_sigterm), ("kill -9", &after_kill)] {
        let carried = log
            .split("carried over ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        assert!(
            carried >= 4,
            "after {when}: {carried} flows carried over (3 streams and the held tuple's flow)\n{log}"
        );
    }
    // The held tuple is still held, and the next connections are given other tuples.
    let s = stats(&c.nodes[0]);
    assert!(s["worker"]["snat_held"].as_u64().unwrap_or(0) >= 1, "hold lost across the restarts: {}", s["worker"]);
    for sport in 41001..41004 {
        let p = who(&c.client, sport);
        assert_ne!(p, held, "the tuple the endpoint holds in TIME_WAIT was handed out again");
    }
    let s = stats(&c.nodes[0]);
    let bare: u64 = s["worker"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["events"].as_array())
        .flatten()
        .filter(|e| e[0] == "bare_ack_to_syn")
        .filter_map(|e| e[1].as_u64())
        .sum();
    assert_eq!(bare, 0, "a SYN answered by a bare ACK after the restarts");
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}
