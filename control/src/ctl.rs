//! The ctl API: a unix socket (mode 0600), one JSON request line in, one JSON response line
//! out. `vxnat ctl` is its client.

use crate::node::Node;
use core::net::Ipv4Addr;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Attach {
        ifname: String,
        ip: Ipv4Addr,
        mac: Option<String>,
    },
    Detach {
        ifname: String,
    },
    Ports,
    Stats,
    Flows {
        #[serde(default)]
        filter: String,
    },
    Trace {
        #[serde(default)]
        filter: String,
        count: usize,
        timeout_ms: u64,
    },
    Capture {
        /// `PORT[:rx|:tx]` (a port's interface name, `uplink`, `host`, or its number),
        /// `pre-encap`, `post-decap`.
        at: Vec<String>,
        #[serde(default)]
        filter: String,
        count: usize,
        timeout_ms: u64,
    },
    /// A successor `vxnat run` (`pid`) asks this one to stop forwarding and release its
    /// sockets, flows and lock to it (`crate::run`, planned restarts). Answered once released.
    Handover {
        pid: u32,
    },
    /// Test-only (feature `fault-injection`, see `crate::fault`).
    #[cfg(feature = "fault-injection")]
    Fault {
        what: crate::fault::Fault,
        #[serde(default)]
        ms: u64,
    },
}

/// One port in `ports`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortInfo {
    pub port: u16,
    /// `uplink`, `host` or `pod`.
    pub kind: String,
    pub ifname: String,
    /// The host port's node-stack end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_ifname: Option<String>,
    /// A pod's address and MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Another node as this one reaches it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteInfo {
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub vtep_mac: Option<String>,
    /// The underlay next hop's MAC; `None` while unresolved.
    pub next_hop_mac: Option<String>,
}

/// The answer to `ports`: this node, its ports and the other nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortsReply {
    pub node: String,
    pub pod_cidr: String,
    pub gateway: Ipv4Addr,
    pub pod_mtu: u16,
    pub uplink_mac: String,
    pub ports: Vec<PortInfo>,
    /// Pods attached, and the most this node attaches.
    pub pods: usize,
    pub max_pods: u32,
    pub remotes: Vec<RemoteInfo>,
}

/// A port's number and its name in reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortName {
    pub port: u16,
    pub name: String,
}

/// Two MACs (or more) claiming one address on the uplink (incident 3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArpConflict {
    pub ifname: String,
    pub ip: String,
    pub macs: Vec<String>,
    pub count: u64,
}

/// The answer to `stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReply {
    pub node: String,
    pub uptime_s: u64,
    pub names: Vec<PortName>,
    pub worker: crate::stats::WorkerStats,
    pub arp_conflicts: Vec<ArpConflict>,
    /// ARP claims not checked for conflicts for want of room (`arpwatch`: made-up senders).
    #[serde(default)]
    pub arp_untracked: u64,
    /// The cluster source and how often it died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::source::SourceReport>,
    /// Nodes and Services left out of the tables or held at their last good version.
    #[serde(default)]
    pub skipped: crate::skips::SkipReport,
    /// Pod ports detached because their interface vanished without a detach.
    #[serde(default)]
    pub pods_vanished: u64,
}

pub fn arp_conflicts(n: &Node) -> Vec<ArpConflict> {
    n.arp
        .iter()
        .flat_map(|a| {
            a.claims.conflicts().map(|c| ArpConflict {
                ifname: a.claims.ifname.clone(),
                ip: c.ip.to_string(),
                macs: c.macs.iter().map(|m| m.to_string()).collect(),
                count: c.count,
            })
        })
        .collect()
}

fn ports(n: &Node) -> PortsReply {
    let mut ports = vec![PortInfo {
        port: 0,
        kind: "uplink".into(),
        ifname: n.facts.file.uplink.clone(),
        stack_ifname: None,
        ip: None,
        mac: None,
    }];
    if let Some(h) = &n.facts.host {
        ports.push(PortInfo {
            port: 1,
            kind: "host".into(),
            ifname: h.ifname.clone(),
            stack_ifname: Some(h.stack_ifname.clone()),
            ip: None,
            mac: None,
        });
    }
    for p in &n.pods {
        ports.push(PortInfo {
            port: p.port,
            kind: "pod".into(),
            ifname: p.ifname.clone(),
            stack_ifname: None,
            ip: Some(p.ip),
            mac: Some(p.mac.clone()),
        });
    }
    let remotes = n
        .facts
        .remotes
        .iter()
        .map(|(r, hop)| RemoteInfo {
            node: r.name.clone(),
            node_ip: r.node_ip,
            pod_cidr: r.pod_cidr.to_string(),
            vtep_mac: r.vtep_mac.map(|m| m.to_string()),
            next_hop_mac: if *hop == dataplane::wire::MacAddr::ZERO { None } else { Some(hop.to_string()) },
        })
        .collect();
    PortsReply {
        node: n.facts.file.node.clone(),
        pod_cidr: n.facts.me.pod_cidr.to_string(),
        gateway: n.facts.me.pod_cidr.first_host(),
        pod_mtu: n.facts.uplink_mtu.saturating_sub(50),
        uplink_mac: n.facts.uplink_mac.to_string(),
        ports,
        pods: n.pods.len(),
        max_pods: n.facts.file.max_pods,
        remotes,
    }
}

/// The port a name means: its number, an interface name, or `uplink` / `host`.
fn port_by_name(n: &Node, name: &str) -> Result<u16, String> {
    if let Ok(p) = name.parse::<u16>() {
        return Ok(p);
    }
    if name == "uplink" || name == n.facts.file.uplink {
        return Ok(0);
    }
    if name == "host" || n.facts.host.as_ref().is_some_and(|h| h.ifname == name) {
        return Ok(1);
    }
    n.pods.iter().find(|p| p.ifname == name).map(|p| p.port).ok_or(format!(
        "at: {name:?} is not a port (use a port number, uplink, host, a pod's interface name, pre-encap or post-decap)"
    ))
}

fn points(n: &Node, at: &[String]) -> Result<Vec<dataplane::observe::Point>, String> {
    use dataplane::observe::Point;
    use dataplane::tables::PortId;
    let mut v = Vec::new();
    for a in at {
        match a.as_str() {
            "pre-encap" => v.push(Point::PreEncap),
            "post-decap" => v.push(Point::PostDecap),
            _ => {
                let (name, dir) = match a.rsplit_once(':') {
                    Some((n, d @ ("rx" | "tx"))) => (n, Some(d)),
                    _ => (a.as_str(), None),
                };
                let p = PortId(port_by_name(n, name)?);
                if dir != Some("tx") {
                    v.push(Point::Rx(p));
                }
                if dir != Some("rx") {
                    v.push(Point::Tx(p));
                }
            }
        }
    }
    if v.is_empty() {
        return Err("at: name at least one capture point".into());
    }
    Ok(v)
}

fn filter(text: &str) -> Result<dataplane::filter::Filter, String> {
    dataplane::filter::Filter::parse(text).map_err(|e| format!("filter: {e}"))
}

fn handle(node: &Mutex<Node>, req: Request) -> Result<Value, String> {
    let lock = || node.lock().map_err(|_| "node state poisoned".to_string());
    // Long requests take what they need from the node and let go of it while they wait.
    match req {
        Request::Flows { filter: f } => {
            let f = filter(&f)?;
            let commands = lock()?.commands();
            let r = xsk::host::ask(&commands, Duration::from_secs(10), move |w, v| {
                crate::observe::flows_report(w.state(), v.now, &f, 100_000)
            })?;
            return Ok(json!(r));
        }
        Request::Trace { filter: f, count, timeout_ms } => {
            let f = filter(&f)?;
            let (commands, names) = {
                let n = lock()?;
                (n.commands(), n.port_names())
            };
            let o = crate::node::observe(
                &commands,
                dataplane::observe::Observe::trace(f, count.max(1)),
                Duration::from_millis(timeout_ms),
            )
            .map_err(|e| e.to_string())?;
            let name = |p: dataplane::tables::PortId| names.get(&p.0).cloned().unwrap_or(format!("port {}", p.0));
            let reports: Vec<crate::observe::TraceReport> =
                o.traces.iter().map(|t| crate::observe::explain(t, &name)).collect();
            return Ok(json!({ "traces": reports }));
        }
        Request::Capture { at, filter: f, count, timeout_ms } => {
            let f = filter(&f)?;
            let (commands, pts) = {
                let n = lock()?;
                (n.commands(), points(&n, &at)?)
            };
            let o = crate::node::observe(
                &commands,
                dataplane::observe::Observe::capture(pts, f, count.max(1)),
                Duration::from_millis(timeout_ms),
            )
            .map_err(|e| e.to_string())?;
            let packets: Vec<Value> = o
                .captured
                .iter()
                .map(|c| json!({"wall_ns": c.wall_ns, "point": c.point.to_string(), "data": crate::observe::hex(&c.data)}))
                .collect();
            return Ok(json!({ "packets": packets }));
        }
        #[cfg(feature = "fault-injection")]
        Request::Fault { what, ms } => return crate::fault::inject(node, what, ms),
        _ => {}
    }
    let mut n = lock()?;
    match req {
        Request::Flows { .. } | Request::Trace { .. } | Request::Capture { .. } | Request::Handover { .. } => {
            Err("handled above".into())
        }
        #[cfg(feature = "fault-injection")]
        Request::Fault { .. } => Err("handled above".into()),
        Request::Attach { ifname, ip, mac } => {
            let mac = match mac {
                Some(m) => Some(m.parse().map_err(|_| format!("mac: {m:?} is not a MAC address"))?),
                None => None,
            };
            let pod = n.attach(&ifname, ip, mac).map_err(|e| e.to_string())?;
            Ok(json!(pod))
        }
        Request::Detach { ifname } => Ok(json!(n.detach(&ifname).map_err(|e| e.to_string())?)),
        Request::Ports => to_value(ports(&n)),
        Request::Stats => {
            let worker = n.stats().map_err(|e| e.to_string())?;
            let names = worker.ports.iter().map(|p| PortName { port: p.port, name: n.port_name(p.port) }).collect();
            to_value(StatsReply {
                node: n.facts.file.node.clone(),
                uptime_s: n.started.elapsed().as_secs(),
                names,
                worker,
                arp_conflicts: arp_conflicts(&n),
                arp_untracked: n.arp.as_ref().map_or(0, |a| a.claims.untracked),
                source: n.source.as_ref().map(|s| s.report()),
                skipped: n.cluster.skips.report(),
                pods_vanished: n.vanished,
            })
        }
    }
}

fn to_value(v: impl Serialize) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("encoding the answer: {e}"))
}

/// Binds the socket (0600) and serves requests on a thread until `stop`.
pub fn serve(
    path: &Path,
    node: Arc<Mutex<Node>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("socket: {}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("socket: {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("socket: chmod: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("socket: {e}"))?;
    std::thread::Builder::new()
        .name("vxnat-ctl".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        // A thread per connection: a capture waiting for packets does not hold
                        // up `stats`.
                        let node = node.clone();
                        let _ = std::thread::Builder::new()
                            .name("vxnat-ctl-conn".into())
                            .spawn(move || serve_one(conn, &node));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
        .map_err(|e| format!("ctl thread: {e}"))
}

/// A successor's handover (`Request::Handover`): the running node stops its worker, which
/// hands its datapath over, releases its lock and answers with the descriptors
/// (`xsk::handoff`), sent with the reply line.
fn handover(node: &Mutex<Node>, pid: u32) -> Result<Vec<std::os::fd::OwnedFd>, String> {
    let ask = node
        .lock()
        .map_err(|_| "node state poisoned".to_string())?
        .handover
        .clone()
        .ok_or("not handing over: this vxnat is not running yet")?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    ask.send((pid, tx)).map_err(|_| "not handing over: this vxnat is stopping".to_string())?;
    rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "no release within 10 s".to_string())?
}

fn serve_one(conn: UnixStream, node: &Mutex<Node>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    let resp = match reader.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Handover { pid }) => match handover(node, pid) {
                Ok(fds) => {
                    let line = json!({"ok": true, "result": {"released": true, "descriptors": fds.len()}});
                    if let Err(e) = xsk::handoff::send_with_fds(&conn, format!("{line}\n").as_bytes(), &fds) {
                        tracing::warn!("handing over to pid {pid}: sending the descriptors: {e}");
                    }
                    return;
                }
                Err(e) => json!({"ok": false, "error": e}),
            },
            Ok(req) => match handle(node, req) {
                Ok(v) => json!({"ok": true, "result": v}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => json!({"ok": false, "error": format!("request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("request: {e}")}),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{resp}");
}

/// Sends one request and decodes its `result` as `T` (the reply types above).
pub fn request_as<T: serde::de::DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, String> {
    serde_json::from_value(request(socket, req)?).map_err(|e| format!("bad answer: {e}"))
}

/// Sends a handover request; returns the `result` and the descriptors that came with it.
pub fn request_handover(socket: &Path, pid: u32) -> Result<(Value, Vec<std::os::fd::OwnedFd>), String> {
    let at = |e: std::io::Error| format!("{}: {e}", socket.display());
    let mut conn = UnixStream::connect(socket).map_err(|e| format!("{}: {e} (is vxnat running?)", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(20))).map_err(at)?;
    let line = serde_json::to_string(&Request::Handover { pid }).map_err(|e| e.to_string())?;
    writeln!(conn, "{line}").map_err(at)?;
    let count = |line: &[u8]| {
        serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.pointer("/result/descriptors").and_then(Value::as_u64))
            .unwrap_or(0) as usize
    };
    let (line, fds) = xsk::handoff::recv_with_fds(&conn, count).map_err(at)?;
    let v: Value = serde_json::from_slice(&line).map_err(|e| format!("bad response: {e}"))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok((v.get("result").cloned().unwrap_or(Value::Null), fds))
    } else {
        Err(v.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_string())
    }
}

/// Sends one request; returns the `result` or the server's error.
pub fn request(socket: &Path, req: &Request) -> Result<Value, String> {
    let mut conn = UnixStream::connect(socket).map_err(|e| format!("{}: {e} (is vxnat running?)", socket.display()))?;
    let wait = match req {
        Request::Trace { timeout_ms, .. } | Request::Capture { timeout_ms, .. } => timeout_ms / 1000 + 20,
        _ => 20,
    };
    conn.set_read_timeout(Some(Duration::from_secs(wait))).map_err(|e| e.to_string())?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(conn, "{line}").map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut resp = String::new();
    BufReader::new(&conn).read_line(&mut resp).map_err(|e| format!("{}: {e}", socket.display()))?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| format!("bad response: {e}"))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(v.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_string())
    }
}

/// Human-readable `vxnat ctl stats`.
pub fn render_stats(v: &StatsReply) -> String {
    let mut out = String::new();
    let w = &v.worker;
    out.push_str(&format!("node {}  up {}s  tables generation {}\n", v.node, v.uptime_s, w.tables_generation));
    let name_of =
        |port: u16| -> String { v.names.iter().find(|n| n.port == port).map_or("?".to_string(), |n| n.name.clone()) };
    out.push_str(&format!(
        "{:<4} {:<32} {:>12} {:>14} {:>12} {:>14}\n",
        "port", "name", "rx packets", "rx bytes", "tx packets", "tx bytes"
    ));
    for p in &w.ports {
        out.push_str(&format!(
            "{:<4} {:<32} {:>12} {:>14} {:>12} {:>14}\n",
            p.port,
            name_of(p.port),
            p.rx_packets,
            p.rx_bytes,
            p.tx_packets,
            p.tx_bytes
        ));
        for (name, n) in &p.events {
            out.push_str(&format!("       {name:<38} {n:>10}\n"));
        }
        for (name, n) in &p.xdp {
            out.push_str(&format!("       xdp {name:<34} {n:>10}\n"));
        }
        if p.fill_starved > 0 {
            out.push_str(&format!(
                "       fill starved {} times (below its guaranteed {} chunks with no free chunk)\n",
                p.fill_starved, p.fill_min
            ));
        }
    }
    let with_drops: Vec<_> = w.ports.iter().filter(|p| !p.drops.is_empty()).collect();
    out.push_str(if with_drops.is_empty() { "drops: none\n" } else { "drops:\n" });
    for p in with_drops {
        for (reason, n, help) in &p.drops {
            out.push_str(&format!("  {:<32} {reason:<26} {n:>10}  {help}\n", name_of(p.port)));
        }
    }
    out.push_str(&format!(
        "flows: {} of {}; SNAT tuples: {} in use, {} held for a backend's TIME_WAIT, {} reused from one with offsets\n",
        w.flows, w.flows_max, w.snat_in_use, w.snat_held, w.snat_reused_with_offsets
    ));
    let ended: Vec<String> = w.snat_ended.iter().filter(|(_, n)| *n > 0).map(|(c, n)| format!("{c} {n}")).collect();
    if !ended.is_empty() {
        out.push_str(&format!("  SNAT'd flows ended: {}\n", ended.join(", ")));
    }
    for (backend, n) in &w.snat_exhausted {
        out.push_str(&format!(
            "  snat ports exhausted toward {backend}: {n} connections refused (every tuple in use, or held for the backend's TIME_WAIT without a mark to reuse it by)\n"
        ));
    }
    for b in &w.backends {
        let mut said = Vec::new();
        if b.syn_unanswered > 0 {
            said.push(format!("{} SYNs never answered", b.syn_unanswered));
        }
        if b.syn_retransmits > 0 {
            said.push(format!("{} SYNs retransmitted by clients waiting for an answer", b.syn_retransmits));
        }
        if b.bare_ack_to_syn > 0 {
            said.push(format!(
                "{} SYNs answered by a bare ACK instead of SYN-ACK (it still holds the 5-tuple in TIME_WAIT: a NAT in front reused a port too soon)",
                b.bare_ack_to_syn
            ));
        }
        if !said.is_empty() {
            out.push_str(&format!(
                "backend {}: {} (of {} new connections, {} answered)\n",
                b.endpoint,
                said.join("; "),
                b.syns,
                b.syn_answered
            ));
        }
    }
    if v.arp_untracked > 0 {
        out.push_str(&format!(
            "ARP: {} claims not checked for conflicts (too many addresses claimed at once)\n",
            v.arp_untracked
        ));
    }
    for c in &v.arp_conflicts {
        out.push_str(&format!(
            "ARP conflict on {}: {} is claimed by {} ({} times; another host answers ARP for this address)\n",
            c.ifname,
            c.ip,
            c.macs.join(" and "),
            c.count
        ));
    }
    if let Some(s) = v.source.as_ref().filter(|s| !s.up || s.failures > 0) {
        out.push_str(&format!(
            "cluster source {}: {}; died {} times (last: {})\n",
            s.name,
            if s.up { "up (restarted)" } else { "DOWN, waiting to restart" },
            s.failures,
            s.last_failure.as_deref().unwrap_or("?")
        ));
    }
    for p in &v.skipped.current {
        out.push_str(&format!("skipped {} {}: {}\n", p.kind, p.name, p.message));
    }
    let total: Vec<String> = v.skipped.total.iter().filter(|(_, n)| *n > 0).map(|(k, n)| format!("{k} {n}")).collect();
    if !total.is_empty() || v.pods_vanished > 0 {
        out.push_str(&format!(
            "objects skipped since start: {}; pod ports detached because their interface vanished: {}\n",
            if total.is_empty() { "none".to_string() } else { total.join(", ") },
            v.pods_vanished
        ));
    }
    out.push_str(&format!(
        "tx: {} packets, {} bytes\numem: {} chunks: {} free, {} in fill rings, {} in tx rings ({}); fill starved {} times; {} reclaimed from detached ports\n",
        w.tx_packets,
        w.tx_bytes,
        w.umem_total,
        w.umem_free,
        w.umem_in_fill,
        w.umem_in_tx,
        if w.umem_balanced { "all accounted for" } else { "NOT all accounted for" },
        w.fill_starved,
        w.umem_reclaimed
    ));
    if w.gro_frames > 0 {
        out.push_str(&format!(
            "gro: {} segments to pods went as {} aggregated frames ({:.1} per frame)\n",
            w.gro_segments,
            w.gro_frames,
            w.gro_segments as f64 / w.gro_frames as f64
        ));
    }
    if w.programs_not_replaced > 0 {
        out.push_str(&format!(
            "takeover: {} ports kept the previous process's XDP program (it could not be replaced; it still redirects to them)\n",
            w.programs_not_replaced
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Attach { ifname: "vxp1".into(), ip: Ipv4Addr::new(10, 244, 0, 2), mac: None };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"attach","ifname":"vxp1","ip":"10.244.0.2","mac":null}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"stats"}"#).unwrap(), Request::Stats);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
