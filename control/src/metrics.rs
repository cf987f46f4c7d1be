//! Prometheus metrics over HTTP (`GET /metrics`, text format 0.0.4) on `metrics` in the node
//! configuration (localhost by default). Names follow Prometheus conventions: a `vxnat_`
//! prefix, `_total` on counters, base units (`_bytes`, `_seconds`).
//!
//! The same server answers the probes, `GET /healthz` and `GET /readyz` (200 or 503 with the
//! reason, from `crate::health`, without the node lock), on the metrics address and on the
//! `health` address, which serves only them: a probe there never waits behind a scrape.
//! kube-proxy's health servers (healthCheckNodePort, `:10256`) are `crate::healthcheck`'s; their
//! state shows here (`vxnat_proxy_healthy`, `vxnat_healthcheck_*`).

use crate::health::Health;
use crate::node::Node;
use crate::stats::{BackendStats, WorkerStats, SWAP_BUCKETS_S};
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

/// Label values that name objects the network or the cluster brings and takes away (endpoints,
/// addresses) get at most this many series per family: the largest by count, in their usual
/// order, and the rest summed as `other`. So the series count stays bounded however many
/// endpoints churn or addresses a spoofer claims. (Per-endpoint counters also leave the worker
/// with their endpoint: `dataplane::pipeline::BackendTable`.)
pub const MAX_BACKEND_SERIES: usize = 256;
/// Backends with SNAT refusals kept as series (see `MAX_BACKEND_SERIES`).
pub const MAX_EXHAUSTED_SERIES: usize = 64;
/// Addresses with ARP conflicts kept as series (see `MAX_BACKEND_SERIES`).
pub const MAX_ARP_SERIES: usize = 64;
/// The label value the rest are summed under.
pub const OTHER: &str = "other";

/// `items` split into those kept as series (at most `max - 1` when there are more than `max`,
/// leaving one for `other`; the largest `weight`, ties by position; in their original order)
/// and the rest.
fn bounded<T>(items: &[T], max: usize, weight: impl Fn(&T) -> u64) -> (Vec<&T>, Vec<&T>) {
    if items.len() <= max {
        return (items.iter().collect(), Vec::new());
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(weight(&items[i])), i));
    let mut keep = vec![false; items.len()];
    for &i in &order[..max.saturating_sub(1)] {
        keep[i] = true;
    }
    let (mut kept, mut rest) = (Vec::new(), Vec::new());
    for (i, item) in items.iter().enumerate() {
        if keep[i] {
            kept.push(item);
        } else {
            rest.push(item);
        }
    }
    (kept, rest)
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
    o.family(
        "vxnat_flows_unassured",
        "gauge",
        "Connections not yet assured (handshake incomplete, UDP unanswered): what a full table may evict (upper bound).",
    );
    o.sample("vxnat_flows_unassured", &[], s.flows_unassured);
    o.family("vxnat_affinity_clients", "gauge", "ClientIP-affinity clients remembered.");
    o.sample("vxnat_affinity_clients", &[], s.affinity);
    o.family("vxnat_affinity_capacity", "gauge", "ClientIP-affinity clients the table can remember.");
    o.sample("vxnat_affinity_capacity", &[], s.affinity_max);
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
    let (kept, rest) = bounded(&s.snat_exhausted, MAX_EXHAUSTED_SERIES, |(_, n)| *n);
    for (backend, n) in kept {
        o.sample("vxnat_snat_exhausted_total", &[("backend", backend)], n);
    }
    if !rest.is_empty() {
        o.sample("vxnat_snat_exhausted_total", &[("backend", OTHER)], rest.iter().map(|(_, n)| n).sum::<u64>());
    }
    o.family(
        "vxnat_backend_syns_total",
        "counter",
        "TCP handshakes per Service endpoint (current endpoints, the busiest, the rest as backend=\"other\"), by outcome.",
    );
    let outcomes = |b: &BackendStats| {
        [
            ("sent", b.syns),
            ("retransmitted", b.syn_retransmits),
            ("answered", b.syn_answered),
            ("unanswered", b.syn_unanswered),
            ("bare_ack", b.bare_ack_to_syn),
        ]
    };
    let (kept, rest) = bounded(&s.backends, MAX_BACKEND_SERIES, |b| b.syns + b.syn_unanswered);
    for b in kept {
        for (outcome, n) in outcomes(b) {
            o.sample("vxnat_backend_syns_total", &[("backend", &b.endpoint), ("outcome", outcome)], n);
        }
    }
    if !rest.is_empty() {
        let mut sum = [0u64; 5];
        for b in rest {
            for (i, (_, n)) in outcomes(b).into_iter().enumerate() {
                sum[i] += n;
            }
        }
        for (i, (outcome, _)) in outcomes(&BackendStats::default()).into_iter().enumerate() {
            o.sample("vxnat_backend_syns_total", &[("backend", OTHER), ("outcome", outcome)], sum[i]);
        }
    }
    o.family(
        "vxnat_arp_conflicts_total",
        "counter",
        "ARP claims on the uplink that disagreed with another MAC for the same address.",
    );
    let (kept, rest) = bounded(arp, MAX_ARP_SERIES, |(_, n)| *n);
    for (ip, n) in kept {
        o.sample("vxnat_arp_conflicts_total", &[("ip", ip)], n);
    }
    if !rest.is_empty() {
        o.sample("vxnat_arp_conflicts_total", &[("ip", OTHER)], rest.iter().map(|(_, n)| n).sum::<u64>());
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
    o.family(
        "vxnat_proxy_healthy",
        "gauge",
        "kube-proxy's /healthz without the node's eligibility: the worker passes and no cluster change waits too long to reach it.",
    );
    o.sample("vxnat_proxy_healthy", &[], u8::from(h.proxy().healthy));
    o.family("vxnat_healthcheck_servers", "gauge", "healthCheckNodePort servers open (one per Service).");
    o.sample("vxnat_healthcheck_servers", &[], h.checks.open.load(Ordering::Relaxed));
    o.family(
        "vxnat_healthcheck_bind_failures_total",
        "counter",
        "Health check ports (a Service's healthCheckNodePort, or proxy_health) that could not be bound, once per episode.",
    );
    o.sample("vxnat_healthcheck_bind_failures_total", &[], h.checks.bind_failures.load(Ordering::Relaxed));
    o.text
}

/// The cluster objects left out of the tables (by kind only: the label set stays bounded however
/// many go bad; `vxnat ctl stats` names them) and the pod ports detached because their
/// interface vanished.
pub fn render_objects(skips: &crate::skips::Skips, vanished: u64) -> String {
    let mut o = Out { text: String::new(), declared: Vec::new() };
    use crate::skips::KINDS;
    o.family(
        "vxnat_skipped_objects",
        "gauge",
        "Nodes and Services now left out of the tables or held at their last good version (ctl stats names them).",
    );
    for kind in KINDS {
        o.sample("vxnat_skipped_objects", &[("kind", kind)], skips.count(kind));
    }
    o.family("vxnat_objects_skipped_total", "counter", "Problems with Nodes and Services that appeared since start.");
    let total = skips.report().total;
    for kind in KINDS {
        let n = total.iter().find(|(k, _)| k == kind).map_or(0, |(_, n)| *n);
        o.sample("vxnat_objects_skipped_total", &[("kind", kind)], n);
    }
    o.family(
        "vxnat_pods_vanished_total",
        "counter",
        "Pod ports detached because their interface vanished without a detach.",
    );
    o.sample("vxnat_pods_vanished_total", &[], vanished);
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
                        let objects = render_objects(&n.cluster.skips, n.vanished);
                        n.stats().ok().map(|s| (s, n.port_names(), arp, objects))
                    });
                    match stats {
                        Some((s, names, arp, objects)) => {
                            ("200 OK", render(&s, &names, &arp) + &render_health(&health) + &objects)
                        }
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

#[cfg(test)]
mod label_bounds {
    use super::*;

    fn series(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
    }

    fn stats(backends: std::ops::Range<u32>) -> WorkerStats {
        WorkerStats {
            backends: backends
                .clone()
                .map(|i| BackendStats {
                    endpoint: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255),
                    syns: u64::from(i % 7),
                    ..BackendStats::default()
                })
                .collect(),
            snat_exhausted: backends.map(|i| (format!("10.0.{}.{}:80/tcp", i >> 8, i & 255), 1)).collect(),
            ..WorkerStats::default()
        }
    }

    /// Endpoints churn (every scrape a different set, growing) and a spoofer claims addresses:
    /// the series count stays flat once past the bounds, and nothing counted is lost (the rest
    /// is under `other`).
    #[test]
    fn series_stay_bounded_under_churn() {
        let names = BTreeMap::new();
        let arp = |n: u32| -> Vec<(String, u64)> { (0..n).map(|i| (format!("192.0.2.{i}"), 2)).collect() };
        let small = series(&render(&stats(0..10), &names, &arp(3)));
        let churned = series(&render(&stats(1000..1010), &names, &arp(3)));
        assert_eq!(small, churned, "a new set of endpoints, as many series");
        let big = render(&stats(0..5000), &names, &arp(5000));
        let bigger = render(&stats(100_000..120_000), &names, &arp(60_000));
        assert_eq!(series(&big), series(&bigger), "flat past the bounds");
        let per_family =
            |text: &str, family: &str| text.lines().filter(|l| l.starts_with(&format!("{family}{{"))).count();
        assert_eq!(per_family(&bigger, "vxnat_backend_syns_total"), MAX_BACKEND_SERIES * 5);
        assert_eq!(per_family(&bigger, "vxnat_snat_exhausted_total"), MAX_EXHAUSTED_SERIES);
        assert_eq!(per_family(&bigger, "vxnat_arp_conflicts_total"), MAX_ARP_SERIES);
        // Nothing is lost: the kept series and `other` add up to the whole.
        let sum = |text: &str, prefix: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(sum(&bigger, "vxnat_snat_exhausted_total{"), 20_000.0);
        assert_eq!(sum(&bigger, "vxnat_arp_conflicts_total{"), 120_000.0);
        let sent: u64 = (100_000..120_000u32).map(|i| u64::from(i % 7)).sum();
        let sent_text: f64 = bigger
            .lines()
            .filter(|l| l.starts_with("vxnat_backend_syns_total{") && l.contains("outcome=\"sent\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert_eq!(sent_text, sent as f64);
        // The busiest are the ones named.
        assert!(bigger.contains("backend=\"other\""));
        assert!(!bigger.lines().any(|l| l.starts_with("vxnat_backend_syns_total{")
            && l.contains("outcome=\"sent\"")
            && l.ends_with(" 0")
            && !l.contains("other")));
    }
}
