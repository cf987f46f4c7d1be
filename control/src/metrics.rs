//! Prometheus metrics over HTTP (`GET /metrics`, text format 0.0.4) on `metrics` in the node
//! configuration (localhost by default). Names follow Prometheus conventions: a `vxnat_`
//! prefix, `_total` on counters, base units (`_bytes`, `_seconds`).
//!
//! The same server answers the probes, `GET /healthz` and `GET /readyz` (200 or 503 with the
//! reason, from `crate::health`, without the node lock), on the metrics address and on the
//! `health` address, which serves only them: a probe there never waits behind a scrape.

use crate::health::Health;
use crate::node::Node;
use crate::stats::{WorkerStats, SWAP_BUCKETS_S};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out {
    text: String,
    declared: Vec<&'static str>,
}

impl Out {
    fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        if !self.declared.contains(&name) {
            let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
            self.declared.push(name);
        }
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        if l.is_empty() {
            let _ = writeln!(self.text, "{name} {v}");
        } else {
            let _ = writeln!(self.text, "{name}{{{}}} {v}", l.join(","));
        }
    }
}

/// The metrics text for a worker's stats, port names by number, and the uplink's ARP conflicts
/// (ip, count).
pub fn render(s: &WorkerStats, names: &BTreeMap<u16, String>, arp: &[(String, u64)]) -> String {
    let mut o = Out { text: String::new(), declared: Vec::new() };
    for p in &s.ports {
        let port = p.port.to_string();
        let name = names.get(&p.port).cloned().unwrap_or_else(|| format!("port {}", p.port));
        o.family("vxnat_port_packets_total", "counter", "Packets per port and direction.");
        o.family("vxnat_port_bytes_total", "counter", "Bytes per port and direction.");
        for (dir, pk, by) in [("rx", p.rx_packets, p.rx_bytes), ("tx", p.tx_packets, p.tx_bytes)] {
            o.sample("vxnat_port_packets_total", &[("port", &port), ("name", &name), ("direction", dir)], pk);
            o.sample("vxnat_port_bytes_total", &[("port", &port), ("name", &name), ("direction", dir)], by);
        }
    }
    o.family("vxnat_drops_total", "counter", "Packets dropped, per port and named reason (vxnat drops explains each).");
    for p in &s.ports {
        let port = p.port.to_string();
        for (reason, n, _) in &p.drops {
            o.sample("vxnat_drops_total", &[("port", &port), ("reason", reason)], n);
        }
    }
    o.family("vxnat_events_total", "counter", "Pipeline events per port (encapsulated, segmented, ICMP sent, ...).");
    for p in &s.ports {
        let port = p.port.to_string();
        for (event, n) in &p.events {
            o.sample("vxnat_events_total", &[("port", &port), ("event", event)], n);
        }
    }
    o.family("vxnat_flows", "gauge", "Connections tracked.");
    o.sample("vxnat_flows", &[], s.flows);
    o.family("vxnat_flows_capacity", "gauge", "Connections the table can track.");
    o.sample("vxnat_flows_capacity", &[], s.flows_max);
    o.family("vxnat_snat_tuples", "gauge", "SNAT tuples in use, and held after close for the backend's TIME_WAIT.");
    o.sample("vxnat_snat_tuples", &[("state", "in_use")], s.snat_in_use);
    o.sample("vxnat_snat_tuples", &[("state", "held")], s.snat_held);
    o.family(
        "vxnat_snat_flows_ended_total",
        "counter",
        "SNAT'd flows ended, by cause (only backend_closed_first and idle hold the tuple).",
    );
    for (cause, n) in &s.snat_ended {
        o.sample("vxnat_snat_flows_ended_total", &[("cause", cause)], n);
    }
    o.family(
        "vxnat_snat_reused_with_offsets_total",
        "counter",
        "SNAT tuples reused from a backend's TIME_WAIT, with sequence and timestamp offsets.",
    );
    o.sample("vxnat_snat_reused_with_offsets_total", &[], s.snat_reused_with_offsets);
    o.family(
        "vxnat_snat_exhausted_total",
        "counter",
        "Connections refused because no SNAT tuple toward the backend was free.",
    );
    for (backend, n) in &s.snat_exhausted {
        o.sample("vxnat_snat_exhausted_total", &[("backend", backend)], n);
    }
    o.family("vxnat_backend_syns_total", "counter", "TCP handshakes per Service endpoint, by outcome.");
    for b in &s.backends {
        for (outcome, n) in [
            ("sent", b.syns),
            ("retransmitted", b.syn_retransmits),
            ("answered", b.syn_answered),
            ("unanswered", b.syn_unanswered),
            ("bare_ack", b.bare_ack_to_syn),
        ] {
            o.sample("vxnat_backend_syns_total", &[("backend", &b.endpoint), ("outcome", outcome)], n);
        }
    }
    o.family(
        "vxnat_arp_conflicts_total",
        "counter",
        "ARP claims on the uplink that disagreed with another MAC for the same address.",
    );
    for (ip, n) in arp {
        o.sample("vxnat_arp_conflicts_total", &[("ip", ip)], n);
    }
    o.family("vxnat_tables_generation", "gauge", "Generation of the tables the worker uses.");
    o.sample("vxnat_tables_generation", &[], s.tables_generation);
    o.family(
        "vxnat_table_swap_seconds",
        "histogram",
        "Time from noticing a change to the worker using the tables that carry it.",
    );
    let h = &s.table_swaps;
    for (i, le) in SWAP_BUCKETS_S.iter().enumerate() {
        o.sample("vxnat_table_swap_seconds_bucket", &[("le", &le.to_string())], h.buckets.get(i).copied().unwrap_or(0));
    }
    o.sample("vxnat_table_swap_seconds_bucket", &[("le", "+Inf")], h.count);
    o.sample("vxnat_table_swap_seconds_sum", &[], h.sum_s);
    o.sample("vxnat_table_swap_seconds_count", &[], h.count);
    o.family("vxnat_umem_chunks", "gauge", "UMEM chunks by where they are.");
    o.sample("vxnat_umem_chunks", &[("state", "free")], s.umem_free);
    o.sample("vxnat_umem_chunks", &[("state", "fill_ring")], s.umem_in_fill);
    o.sample("vxnat_umem_chunks", &[("state", "tx_ring")], s.umem_in_tx);
    o.family("vxnat_tx_packets_total", "counter", "Packets transmitted on all ports.");
    o.sample("vxnat_tx_packets_total", &[], s.tx_packets);
    o.text
}

/// The supervision metrics: the worker's heartbeat and the cluster source.
pub fn render_health(h: &Health) -> String {
    let mut o = Out { text: String::new(), declared: Vec::new() };
    o.family("vxnat_worker_heartbeat_age_seconds", "gauge", "Time since the worker last started a pass.");
    o.sample("vxnat_worker_heartbeat_age_seconds", &[], h.heartbeat_age().as_secs_f64());
    o.family("vxnat_source_up", "gauge", "Whether the cluster source's thread runs (0 while waiting to restart it).");
    o.sample("vxnat_source_up", &[], u8::from(h.source().up()));
    o.family("vxnat_source_failures_total", "counter", "Times the cluster source's thread died (each is restarted).");
    o.sample("vxnat_source_failures_total", &[], h.source().failures());
    o.text
}

/// Serves `GET /healthz` and `GET /readyz` on `addr` until `stop`, and `GET /metrics` too when
/// given the `node` (the metrics address).
pub fn serve(
    addr: &str,
    node: Option<Arc<Mutex<Node>>>,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let what = if node.is_some() { "metrics" } else { "health" };
    let l = TcpListener::bind(addr).map_err(|e| format!("{what}: {addr}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| format!("{what}: {e}"))?;
    std::thread::Builder::new()
        .name(format!("vxnat-{what}"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                // A client that never sends its request line holds this one thread: not for long
                // on the probes' listener.
                let wait = if node.is_some() { Duration::from_secs(5) } else { Duration::from_secs(1) };
                let _ = c.set_read_timeout(Some(wait));
                let mut line = String::new();
                let _ = BufReader::new(&c).read_line(&mut line);
                let probe = |r: Result<String, String>| match r {
                    Ok(ok) => ("200 OK", ok + "\n"),
                    Err(why) => ("503 Service Unavailable", why + "\n"),
                };
                let path = line.split_whitespace().nth(1).and_then(|p| p.split('?').next()).unwrap_or("");
                let (status, body) = if !line.starts_with("GET ") {
                    ("405 Method Not Allowed", "GET only\n".to_string())
                } else if path == "/healthz" {
                    probe(health.live())
                } else if path == "/readyz" {
                    probe(health.ready())
                } else if let Some(node) = node.as_ref().filter(|_| path == "/metrics") {
                    let stats = node.lock().ok().and_then(|n| {
                        let arp: Vec<(String, u64)> = n
                            .arp
                            .iter()
                            .flat_map(|a| a.claims.conflicts().map(|c| (c.ip.to_string(), c.count)))
                            .collect();
                        n.stats().ok().map(|s| (s, n.port_names(), arp))
                    });
                    match stats {
                        Some((s, names, arp)) => ("200 OK", render(&s, &names, &arp) + &render_health(&health)),
                        None => ("503 Service Unavailable", "the worker did not answer\n".to_string()),
                    }
                } else if node.is_some() {
                    ("404 Not Found", "try /metrics, /healthz or /readyz\n".to_string())
                } else {
                    ("404 Not Found", "try /healthz or /readyz\n".to_string())
                };
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))
}
