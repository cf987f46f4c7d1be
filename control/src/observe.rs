//! `vxnat ctl flows`, `trace` and `capture`: what the worker collected, made readable.
//!
//! Flows are a snapshot of the worker's connection tracking and its SNAT tuples held after
//! close. A trace is reconstructed from what the pipeline saw at each point for a packet (as
//! received, after decapsulation, before encapsulation, as sent) and its verdict: the steps
//! shown are the differences between those, so a rewrite is reported exactly as it happened.
//! Packets are read and printed by the dataplane's `wire` (its frame walk and its
//! `PrettyPrinter`), the one decoder.

use dataplane::filter::{Filter, Tuple};
use dataplane::observe::TraceRecord;
use dataplane::pipeline::{Disposition, WorkerState};
use dataplane::tables::PortId;
use dataplane::wire::{frame, IpProtocol, PrettyPrinter};
use serde::{Deserialize, Serialize};

/// One tracked connection, as `conntrack -L` / `ipvsadm -lnc` showed them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowRow {
    pub proto: String,
    /// `src:sport -> dst:dport` as the client sent it.
    pub orig: String,
    /// As the endpoint answers.
    pub reply: String,
    /// `DNAT to ip:port`, plus `, SNAT to ip:port` when the source was translated.
    pub nat: String,
    pub state: String,
    pub expires_in_s: f64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// A SNAT tuple kept out of use after its flow closed (the backend may hold it in TIME_WAIT).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldRow {
    pub proto: String,
    pub snat: String,
    pub backend: String,
    pub hold_left_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FlowsReport {
    pub flows: Vec<FlowRow>,
    pub held: Vec<HeldRow>,
    /// Flows in the table (the report is capped).
    pub total: usize,
}

fn proto_name(p: u8) -> String {
    match IpProtocol::from(p) {
        IpProtocol::Tcp => "tcp".into(),
        IpProtocol::Udp => "udp".into(),
        IpProtocol::Icmp => "icmp".into(),
        IpProtocol::Unknown(n) => n.to_string(),
    }
}

/// The flows (both tuples tried against `filter`) and held SNAT tuples of a worker, at most
/// `limit` of each.
pub fn flows_report(state: &WorkerState, now: u64, filter: &Filter, limit: usize) -> FlowsReport {
    let tuple = |k: &dataplane::conntrack::FlowKey| Tuple {
        proto: k.proto,
        src: k.src,
        dst: k.dst,
        sport: k.sport,
        dport: k.dport,
    };
    let mut r = FlowsReport { total: state.flows.len(), ..FlowsReport::default() };
    for f in state.flows.iter() {
        if r.flows.len() >= limit {
            break;
        }
        if !filter.matches(&tuple(&f.orig)) && !filter.matches(&tuple(&f.reply)) {
            continue;
        }
        let mut nat = format!("DNAT to {}:{}", f.reply.src, f.reply.sport);
        if f.reply.dst != f.orig.src || f.reply.dport != f.orig.sport {
            nat.push_str(&format!(", SNAT to {}:{}", f.reply.dst, f.reply.dport));
        }
        r.flows.push(FlowRow {
            proto: proto_name(f.orig.proto),
            orig: format!("{}:{} -> {}:{}", f.orig.src, f.orig.sport, f.orig.dst, f.orig.dport),
            reply: format!("{}:{} -> {}:{}", f.reply.src, f.reply.sport, f.reply.dst, f.reply.dport),
            nat,
            state: f.state.name().to_string(),
            expires_in_s: f.expires_at.saturating_sub(now) as f64 / 1e9,
            packets: f.packets,
            bytes: f.bytes,
        });
    }
    for (d, port, left) in state.snat.held_tuples(now, limit) {
        let t = Tuple { proto: d.proto, src: d.snat_ip, dst: d.backend_ip, sport: port, dport: d.backend_port };
        if filter.matches(&t) {
            r.held.push(HeldRow {
                proto: proto_name(d.proto),
                snat: format!("{}:{port}", d.snat_ip),
                backend: format!("{}:{}", d.backend_ip, d.backend_port),
                hold_left_s: left as f64 / 1e9,
            });
        }
    }
    r
}

pub fn render_flows(r: &FlowsReport) -> String {
    let mut out = format!("{} flows tracked, {} shown\n", r.total, r.flows.len());
    for f in &r.flows {
        out.push_str(&format!(
            "{:<4} {:<44} reply {:<44} {:<12} {:>9.1}s  {}  packets {}/{} bytes {}/{}\n",
            f.proto,
            f.orig,
            f.reply,
            f.state,
            f.expires_in_s,
            f.nat,
            f.packets[0],
            f.packets[1],
            f.bytes[0],
            f.bytes[1]
        ));
    }
    out.push_str(&format!(
        "{} SNAT tuples held after close (kept out of use for the backend's TIME_WAIT)\n",
        r.held.len()
    ));
    for h in &r.held {
        out.push_str(&format!("{:<4} {} -> {}  held {:.1}s more\n", h.proto, h.snat, h.backend, h.hold_left_s));
    }
    out
}

/// A frame in one line: `TCP 10.0.0.1:1 > 10.0.0.2:80 [S] 74 B`; VXLAN shows both headers
/// (the dataplane's [`PrettyPrinter`]).
pub fn summary(frame: &[u8]) -> String {
    PrettyPrinter::new(frame).to_string()
}

fn inner_tuple(frame: &[u8]) -> Option<Tuple> {
    let (t, n) = dataplane::filter::tuples_of(frame);
    (n > 0).then(|| t[n - 1])
}

/// The TTL of the innermost IPv4 packet (the inner one of VXLAN).
fn ttl_of(f: &[u8]) -> Option<u8> {
    frame::innermost_ipv4(f).map(|ip| ip.ttl())
}

/// One trace, explained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceReport {
    pub wall_ns: u64,
    pub steps: Vec<String>,
    pub verdict: String,
}

pub fn explain(r: &TraceRecord, port_name: &dyn Fn(PortId) -> String) -> TraceReport {
    let mut steps = vec![format!("in  {}: {}", port_name(r.ingress), summary(&r.input))];
    let mut inner = r.input.as_slice();
    if let Some(d) = &r.post_decap {
        steps.push(format!("decap: VXLAN removed -> {}", summary(d)));
        inner = d;
    }
    let out_inner: Option<&[u8]> = match (&r.pre_encap, r.outputs.first()) {
        (Some(p), _) => Some(p),
        (None, Some((_, o))) => Some(o),
        _ => None,
    };
    if let (Some(a), Some(b)) = (inner_tuple(inner), out_inner.and_then(inner_tuple)) {
        if (a.dst, a.dport) != (b.dst, b.dport) {
            steps.push(format!("service NAT: destination {}:{} -> {}:{}", a.dst, a.dport, b.dst, b.dport));
        }
        if (a.src, a.sport) != (b.src, b.sport) {
            steps.push(format!("service NAT: source {}:{} -> {}:{}", a.src, a.sport, b.src, b.sport));
        }
    }
    if let (Some(a), Some(b)) = (ttl_of(inner), out_inner.and_then(ttl_of)) {
        if a != b {
            steps.push(format!("route: TTL {a} -> {b}"));
        }
    }
    if r.pre_encap.is_some() {
        if let Some((_, o)) = r.outputs.first() {
            steps.push(format!("encap: {}", summary(o).split(" | ").next().unwrap_or("")));
        }
    }
    let verdict = match r.verdict {
        Disposition::Drop(reason) => format!("DROP {}: {}", reason.name(), reason.help()),
        Disposition::Spilled => format!(
            "too large for its egress: became {} packets, out {}",
            r.output_count,
            r.outputs.first().map(|(p, _)| port_name(*p)).unwrap_or_default()
        ),
        _ => match r.outputs.first() {
            Some((p, o)) => format!("out {}: {}", port_name(*p), summary(o)),
            None => "forwarded".into(),
        },
    };
    TraceReport { wall_ns: r.wall_ns, steps, verdict }
}

pub fn render_traces(ts: &[TraceReport]) -> String {
    let mut out = String::new();
    for (i, t) in ts.iter().enumerate() {
        out.push_str(&format!("trace {}:\n", i + 1));
        for s in &t.steps {
            out.push_str(&format!("  {s}\n"));
        }
        out.push_str(&format!("  => {}\n", t.verdict));
    }
    if ts.is_empty() {
        out.push_str("no matching packet seen\n");
    }
    out
}

/// A pcap file (microsecond timestamps, Ethernet link type) of `(wall_ns, frame)`.
pub fn pcap(packets: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&262_144u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    for (ns, data) in packets {
        b.extend_from_slice(&((ns / 1_000_000_000) as u32).to_le_bytes());
        b.extend_from_slice(&(((ns % 1_000_000_000) / 1000) as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
    }
    b
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd hex length".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::observe::Observe;
    use dataplane::pipeline::{process_frame, FrameBuf};
    use dataplane::testkit::{self, L4, POD1, POD1_IP, SERVICE_VIP};

    #[test]
    fn a_trace_names_the_nat_route_encap_and_verdict() {
        let tables = testkit::tables_with_service();
        let mut state = WorkerState::new(0);
        state.observe = Some(Box::new(Observe::trace(Filter::parse("tcp and port 80").expect("filter"), 4)));
        let frame = testkit::from_pod1(&testkit::ipv4(
            POD1_IP,
            SERVICE_VIP,
            &L4::Tcp { sport: 40000, dport: 80, seq: 1, ack: 0, flags: 0x002, payload: &[] },
        ));
        let mut buf = vec![0u8; 256 + frame.len()];
        buf[256..].copy_from_slice(&frame);
        let mut f = FrameBuf::new(&mut buf, 256, frame.len()).expect("fits");
        process_frame(&tables, &mut state, 0, POD1, &mut f);
        let o = state.observe.take().expect("observer");
        assert_eq!(o.traces.len(), 1);
        let t = explain(&o.traces[0], &|p| format!("port{}", p.0));
        let text = render_traces(std::slice::from_ref(&t));
        assert!(text.contains("in  port2: TCP 10.244.0.2:40000 > 10.96.0.10:80 [S]"), "{text}");
        assert!(text.contains("service NAT: destination 10.96.0.10:80 -> 10.244.1.5:8080"), "{text}");
        assert!(text.contains("route: TTL 64 -> 63"), "{text}");
        assert!(text.contains("encap: VXLAN 192.168.50.1:"), "{text}");
        assert!(t.verdict.starts_with("out port0: VXLAN"), "{text}");
    }

    #[test]
    fn a_dropped_packet_is_traced_with_its_reason_and_flows_are_listed() {
        let tables = testkit::tables_with_service();
        let mut state = WorkerState::new(0);
        state.observe = Some(Box::new(Observe::trace(Filter::default(), 4)));
        let bad = testkit::from_pod1(&testkit::ipv4(
            [10, 244, 0, 77].into(),
            SERVICE_VIP,
            &L4::Udp { sport: 1, dport: 2, payload: b"spoofed" },
        ));
        let good = testkit::from_pod1(&testkit::ipv4(
            POD1_IP,
            SERVICE_VIP,
            &L4::Tcp { sport: 40000, dport: 80, seq: 1, ack: 0, flags: 0x002, payload: &[] },
        ));
        for frame in [bad, good] {
            let mut buf = vec![0u8; 256 + frame.len()];
            buf[256..].copy_from_slice(&frame);
            let mut f = FrameBuf::new(&mut buf, 256, frame.len()).expect("fits");
            process_frame(&tables, &mut state, 0, POD1, &mut f);
        }
        let o = state.observe.take().expect("observer");
        let t = explain(&o.traces[0], &|p| format!("port{}", p.0));
        assert!(t.verdict.starts_with("DROP pod_spoofed_ip: source IP is not the IP of the pod"), "{t:?}");
        let r = flows_report(&state, 0, &Filter::parse("host 10.244.1.5").expect("filter"), 100);
        assert_eq!(r.flows.len(), 1);
        assert_eq!(r.flows[0].nat, "DNAT to 10.244.1.5:8080");
        assert_eq!(r.flows[0].state, "SYN_SENT");
        assert!(flows_report(&state, 0, &Filter::parse("udp").expect("filter"), 100).flows.is_empty());
    }

    #[test]
    fn pcap_layout_and_hex_round_trip() {
        let p = pcap(&[(1_700_000_000_123_456_789, vec![1, 2, 3])]);
        assert_eq!(&p[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(p.len(), 24 + 16 + 3);
        assert_eq!(u32::from_le_bytes([p[24], p[25], p[26], p[27]]), 1_700_000_000);
        assert_eq!(u32::from_le_bytes([p[28], p[29], p[30], p[31]]), 123_456);
        assert_eq!(unhex(&hex(&[0, 255, 16])).expect("hex"), vec![0, 255, 16]);
    }
}
