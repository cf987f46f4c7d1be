//! The ctl API: a unix socket (mode 0600), one JSON request line in, one JSON response line
//! out. `vxnat ctl` is its client.

use crate::daemon::Node;
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
}

pub fn arp_conflicts(n: &Node) -> Vec<Value> {
    n.arp
        .iter()
        .flat_map(|a| {
            a.claims.conflicts().map(|c| {
                json!({
                    "ifname": a.claims.ifname,
                    "ip": c.ip.to_string(),
                    "macs": c.macs.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                    "count": c.count,
                })
            })
        })
        .collect()
}

/// The port a name means: its number, an interface name, or `uplink` / `host`.
fn port_by_name(n: &Node, name: &str) -> Result<u16, String> {
    if let Ok(p) = name.parse::<u16>() {
        return Ok(p);
    }
    if name == "uplink" || name == n.facts.file.uplink {
        return Ok(0);
    }
    if name == "host" || n.facts.host.as_ref().is_some_and(|h| h.0 == name) {
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
            let (tx, rx) = crossbeam_channel::bounded(1);
            commands.send(crate::daemon::Command::Flows(f, tx)).map_err(|_| "worker stopped".to_string())?;
            let r = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "worker did not answer".to_string())?;
            return Ok(json!(r));
        }
        Request::Trace { filter: f, count, timeout_ms } => {
            let f = filter(&f)?;
            let (commands, names) = {
                let n = lock()?;
                (n.commands(), n.port_names())
            };
            let o = crate::daemon::observe(
                &commands,
                dataplane::observe::Observe::trace(f, count.max(1)),
                Duration::from_millis(timeout_ms),
            )?;
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
            let o = crate::daemon::observe(
                &commands,
                dataplane::observe::Observe::capture(pts, f, count.max(1)),
                Duration::from_millis(timeout_ms),
            )?;
            let packets: Vec<Value> = o
                .captured
                .iter()
                .map(|c| json!({"wall_ns": c.wall_ns, "point": c.point.to_string(), "data": crate::observe::hex(&c.data)}))
                .collect();
            return Ok(json!({ "packets": packets }));
        }
        _ => {}
    }
    let mut n = lock()?;
    match req {
        Request::Flows { .. } | Request::Trace { .. } | Request::Capture { .. } => Err("handled above".into()),
        Request::Attach { ifname, ip, mac } => {
            let mac = match mac {
                Some(m) => Some(m.parse().map_err(|_| format!("mac: {m:?} is not a MAC address"))?),
                None => None,
            };
            let pod = n.attach(&ifname, ip, mac)?;
            Ok(json!(pod))
        }
        Request::Detach { ifname } => Ok(json!(n.detach(&ifname)?)),
        Request::Ports => {
            let mut ports = vec![json!({"port": 0, "kind": "uplink", "ifname": n.facts.file.uplink})];
            if let Some((vx, _, stack, _)) = &n.facts.host {
                ports.push(json!({"port": 1, "kind": "host", "ifname": vx, "stack_ifname": stack}));
            }
            for p in &n.pods {
                ports.push(json!({"port": p.port, "kind": "pod", "ifname": p.ifname, "ip": p.ip, "mac": p.mac}));
            }
            let remotes: Vec<Value> = n
                .facts
                .remotes
                .iter()
                .map(|(r, hop)| {
                    json!({
                        "node": r.name,
                        "node_ip": r.node_ip,
                        "pod_cidr": r.pod_cidr.to_string(),
                        "vtep_mac": r.vtep_mac.map(|m| m.to_string()),
                        "next_hop_mac": if *hop == dataplane::wire::MacAddr::ZERO { None } else { Some(hop.to_string()) },
                    })
                })
                .collect();
            Ok(json!({
                "node": n.facts.file.node,
                "pod_cidr": n.facts.me.pod_cidr.to_string(),
                "gateway": n.facts.me.pod_cidr.first_host().to_string(),
                "pod_mtu": n.facts.uplink_mtu.saturating_sub(50),
                "uplink_mac": n.facts.uplink_mac.to_string(),
                "ports": ports,
                "pods": n.pods.len(),
                "max_pods": n.facts.file.max_pods,
                "remotes": remotes,
            }))
        }
        Request::Stats => {
            let s = n.stats()?;
            let names: Vec<Value> =
                s.ports.iter().map(|p| json!({"port": p.port, "name": n.port_name(p.port)})).collect();
            Ok(json!({
                "node": n.facts.file.node,
                "uptime_s": n.started.elapsed().as_secs(),
                "names": names,
                "worker": s,
                "arp_conflicts": arp_conflicts(&n),
            }))
        }
    }
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

fn serve_one(conn: UnixStream, node: &Mutex<Node>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    let resp = match reader.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
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
pub fn render_stats(v: &Value) -> String {
    let mut out = String::new();
    let w = &v["worker"];
    out.push_str(&format!(
        "node {}  up {}s  tables generation {}\n",
        v["node"].as_str().unwrap_or("?"),
        v["uptime_s"],
        w["tables_generation"]
    ));
    let name_of = |port: &Value| -> String {
        v["names"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["port"] == *port)
            .and_then(|n| n["name"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    out.push_str(&format!(
        "{:<4} {:<32} {:>12} {:>14} {:>12} {:>14}\n",
        "port", "name", "rx packets", "rx bytes", "tx packets", "tx bytes"
    ));
    for p in w["ports"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<4} {:<32} {:>12} {:>14} {:>12} {:>14}\n",
            p["port"],
            name_of(&p["port"]),
            p["rx_packets"],
            p["rx_bytes"],
            p["tx_packets"],
            p["tx_bytes"]
        ));
        for e in p["events"].as_array().into_iter().flatten() {
            out.push_str(&format!("       {:<38} {:>10}\n", e[0].as_str().unwrap_or(""), e[1]));
        }
        for x in p["xdp"].as_array().into_iter().flatten() {
            out.push_str(&format!("       xdp {:<34} {:>10}\n", x[0].as_str().unwrap_or(""), x[1]));
        }
        if p["fill_starved"].as_u64().unwrap_or(0) > 0 {
            out.push_str(&format!(
                "       fill starved {} times (below its guaranteed {} chunks with no free chunk)\n",
                p["fill_starved"], p["fill_min"]
            ));
        }
    }
    let drops: Vec<&Value> = w["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["drops"].as_array().is_some_and(|d| !d.is_empty()))
        .collect();
    out.push_str(if drops.is_empty() { "drops: none\n" } else { "drops:\n" });
    for p in drops {
        for d in p["drops"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<32} {:<26} {:>10}  {}\n",
                name_of(&p["port"]),
                d[0].as_str().unwrap_or(""),
                d[1],
                d[2].as_str().unwrap_or("")
            ));
        }
    }
    out.push_str(&format!(
        "flows: {} of {}; SNAT tuples: {} in use, {} held after close\n",
        w["flows"], w["flows_max"], w["snat_in_use"], w["snat_held"]
    ));
    for e in w["snat_exhausted"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  snat ports exhausted toward {}: {} connections refused (every tuple in use or held for the backend's TIME_WAIT)\n",
            e[0].as_str().unwrap_or("?"),
            e[1]
        ));
    }
    for b in w["backends"].as_array().into_iter().flatten() {
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        let mut said = Vec::new();
        if n("syn_unanswered") > 0 {
            said.push(format!("{} SYNs never answered", n("syn_unanswered")));
        }
        if n("syn_retransmits") > 0 {
            said.push(format!("{} SYNs retransmitted by clients waiting for an answer", n("syn_retransmits")));
        }
        if n("bare_ack_to_syn") > 0 {
            said.push(format!(
                "{} SYNs answered by a bare ACK instead of SYN-ACK (it still holds the 5-tuple in TIME_WAIT: a NAT in front reused a port too soon)",
                n("bare_ack_to_syn")
            ));
        }
        if !said.is_empty() {
            out.push_str(&format!(
                "backend {}: {} (of {} new connections, {} answered)\n",
                b["endpoint"].as_str().unwrap_or("?"),
                said.join("; "),
                n("syns"),
                n("syn_answered")
            ));
        }
    }
    for c in v["arp_conflicts"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "ARP conflict on {}: {} is claimed by {} ({} times; another host answers ARP for this address)\n",
            c["ifname"].as_str().unwrap_or("?"),
            c["ip"].as_str().unwrap_or("?"),
            c["macs"].as_array().into_iter().flatten().filter_map(|m| m.as_str()).collect::<Vec<_>>().join(" and "),
            c["count"]
        ));
    }
    out.push_str(&format!(
        "tx: {} packets, {} bytes\numem: {} chunks: {} free, {} in fill rings, {} in tx rings ({}); fill starved {} times; {} reclaimed from detached ports\n",
        w["tx_packets"],
        w["tx_bytes"],
        w["umem_total"],
        w["umem_free"],
        w["umem_in_fill"],
        w["umem_in_tx"],
        if w["umem_balanced"].as_bool() == Some(true) { "all accounted for" } else { "NOT all accounted for" },
        w["fill_starved"],
        w["umem_reclaimed"]
    ));
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
