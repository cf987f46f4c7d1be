//! What `vxnat ctl stats` and the metrics report about the worker: a typed snapshot taken on
//! the worker thread between two polls (`snapshot`), serialised for the ctl protocol. Counter
//! names come from the registries (`DropReason`, `counter_set!`), never from lists here.

use serde::{Deserialize, Serialize};
use xsk::bpf::EXIT_NAMES;
use xsk::host::HostView;
use xsk::worker::Worker;

/// What `vxnat ctl stats` shows from the worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStats {
    pub ports: Vec<PortStats>,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub fill_starved: u64,
    /// Chunks taken back from the rings of detached ports.
    #[serde(default)]
    pub umem_reclaimed: u64,
    pub bad_descriptors: u64,
    pub umem_total: u32,
    pub umem_free: u32,
    pub umem_in_fill: u32,
    pub umem_in_tx: u32,
    pub umem_balanced: bool,
    pub tables_generation: u64,
    pub flows: usize,
    pub flows_max: usize,
    /// Flows on the early-drop list: unassured ones (an upper bound; issue 17).
    #[serde(default)]
    pub flows_unassured: usize,
    /// ClientIP-affinity clients remembered, and how many the table can hold.
    #[serde(default)]
    pub affinity: usize,
    #[serde(default)]
    pub affinity_max: usize,
    pub snat_in_use: u64,
    pub snat_held: u64,
    /// SNAT'd flows ended, by cause (`dataplane::nat::snat::End::NAMES`): only
    /// `backend_closed_first` (and `idle`) hold their tuple.
    #[serde(default)]
    pub snat_ended: Vec<(String, u64)>,
    /// Tuples reused from a backend's TIME_WAIT with sequence/timestamp offsets.
    #[serde(default)]
    pub snat_reused_with_offsets: u64,
    /// (backend ip:port, refusals): `snat ports exhausted` per backend.
    pub snat_exhausted: Vec<(String, u64)>,
    /// Handshake outcomes per Service endpoint.
    pub backends: Vec<BackendStats>,
    pub multi_buffer_frames: u64,
    /// Aggregated frames sent to pods (software GRO, `pod_tx = "packet-gro"`) and the
    /// segments inside them.
    #[serde(default)]
    pub gro_frames: u64,
    #[serde(default)]
    pub gro_segments: u64,
    /// Ports taken over from a predecessor whose XDP program could not be replaced.
    #[serde(default)]
    pub programs_not_replaced: u64,
    #[serde(default)]
    pub table_swaps: SwapHistogram,
}

/// Time from noticing a change to the worker using the tables that carry it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwapHistogram {
    /// Cumulative counts for the upper bounds in `SWAP_BUCKETS_S`.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

pub use xsk::host::SWAP_BUCKETS_S;

impl From<&xsk::host::SwapHistogram> for SwapHistogram {
    fn from(h: &xsk::host::SwapHistogram) -> Self {
        SwapHistogram { buckets: h.buckets.clone(), count: h.count, sum_s: h.sum_s }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackendStats {
    pub endpoint: String,
    pub syns: u64,
    pub syn_retransmits: u64,
    pub syn_answered: u64,
    pub syn_unanswered: u64,
    pub bare_ack_to_syn: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortStats {
    pub port: u16,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// (reason, count, help), non-zero only.
    pub drops: Vec<(String, u64, String)>,
    pub events: Vec<(String, u64)>,
    /// XDP program exits, (name, count).
    pub xdp: Vec<(String, u64)>,
    /// Chunks in the port's fill ring, what it is topped up to, its guaranteed minimum.
    #[serde(default)]
    pub fill_in_ring: u32,
    #[serde(default)]
    pub fill_target: u32,
    #[serde(default)]
    pub fill_min: u32,
    /// Times the port was below its minimum with no free chunk (UMEM exhausted).
    #[serde(default)]
    pub fill_starved: u64,
    /// Frames the kernel could not deliver for want of a fill-ring chunk.
    #[serde(default)]
    pub kernel_fill_empty: u64,
}

/// The worker's stats as `ctl stats` and the metrics show them (run on the worker thread).
pub fn snapshot(w: &Worker, v: &HostView) -> WorkerStats {
    let (generation, now) = (v.generation, v.now);
    let snat = w.state().snat.stats(now);
    let a = w.account();
    let mut ports = Vec::new();
    for (port, c) in w.counters().iter() {
        let events: Vec<(String, u64)> = c.events.nonzero().map(|(k, n)| (k.to_string(), n)).collect();
        let xdp = match w.xdp_exits(port) {
            Some(Ok(x)) => EXIT_NAMES.iter().zip(x).filter(|(_, n)| *n > 0).map(|(k, n)| (k.to_string(), n)).collect(),
            _ => Vec::new(),
        };
        let mut drops: Vec<(String, u64, String)> =
            c.nonzero_drops().map(|(r, n)| (r.name().to_string(), n, r.help().to_string())).collect();
        let report = w.port_report(port);
        // What the kernel dropped after the XDP redirect, before vxnat saw it.
        if let Some(k) = report.and_then(|r| r.socket) {
            if k.rx_ring_full > 0 {
                drops.push((
                    "xsk_rx_ring_full".into(),
                    k.rx_ring_full,
                    "kernel dropped frames: vxnat's rx ring was full (the worker fell behind)".into(),
                ));
            }
            let other = k.rx_dropped.saturating_sub(k.rx_ring_full);
            if other > 0 {
                drops.push((
                    "xsk_rx_dropped".into(),
                    other,
                    "kernel dropped frames on the way into the socket (no free UMEM frame in the fill ring)".into(),
                ));
            }
            if k.rx_invalid_descs + k.tx_invalid_descs > 0 {
                drops.push((
                    "xsk_invalid_descs".into(),
                    k.rx_invalid_descs + k.tx_invalid_descs,
                    "kernel rejected descriptors (a vxnat bug)".into(),
                ));
            }
        }
        let fill = report.map(|r| r.fill);
        let starved = fill.map_or(0, |f| f.starved);
        if c.rx_packets > 0 || c.tx_packets > 0 || !xdp.is_empty() || c.total_drops() > 0 || starved > 0 {
            ports.push(PortStats {
                port: port.0,
                rx_packets: c.rx_packets,
                rx_bytes: c.rx_bytes,
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
                drops,
                events,
                xdp,
                fill_in_ring: fill.map_or(0, |f| f.in_fill),
                fill_target: fill.map_or(0, |f| f.target),
                fill_min: fill.map_or(0, |f| f.limits.min),
                fill_starved: starved,
                kernel_fill_empty: report.and_then(|r| r.socket).map_or(0, |k| k.rx_fill_ring_empty),
            });
        }
    }
    WorkerStats {
        ports,
        tx_packets: w.io.tx_packets,
        tx_bytes: w.io.tx_bytes,
        fill_starved: w.io.fill_starved,
        umem_reclaimed: w.io.reclaimed_at_detach,
        bad_descriptors: w.io.bad_descriptors,
        umem_total: a.total,
        umem_free: a.free,
        umem_in_fill: a.in_fill,
        umem_in_tx: a.in_tx,
        umem_balanced: a.balanced(),
        tables_generation: generation,
        flows: w.state().flows.len(),
        flows_max: w.state().flows.capacity(),
        flows_unassured: w.state().flows.unassured_len(),
        affinity: w.state().affinity.len(),
        affinity_max: w.state().affinity.capacity(),
        snat_in_use: snat.in_use,
        snat_held: snat.held,
        snat_ended: dataplane::nat::snat::End::NAMES
            .iter()
            .zip(snat.ended)
            .map(|(name, n)| ((*name).to_string(), n))
            .collect(),
        snat_reused_with_offsets: snat.reused_with_offsets,
        snat_exhausted: w
            .state()
            .snat
            .exhausted_by_destination()
            .into_iter()
            .map(|(d, n)| {
                (format!("{}:{}/{}", d.backend_ip, d.backend_port, if d.proto == 6 { "tcp" } else { "udp" }), n)
            })
            .collect(),
        backends: {
            let mut b: Vec<BackendStats> = w
                .state()
                .backends
                .iter()
                .map(|((ip, port), c)| BackendStats {
                    endpoint: format!("{ip}:{port}"),
                    syns: c.syns,
                    syn_retransmits: c.syn_retransmits,
                    syn_answered: c.syn_answered,
                    syn_unanswered: c.syn_unanswered,
                    bare_ack_to_syn: c.bare_ack_to_syn,
                })
                .collect();
            b.sort_by(|x, y| x.endpoint.cmp(&y.endpoint));
            b
        },
        multi_buffer_frames: w.io.multi_buffer_frames,
        gro_frames: w.io.gro_frames,
        gro_segments: w.io.gro_segments,
        programs_not_replaced: w.io.programs_not_replaced,
        table_swaps: SwapHistogram::from(&v.swaps),
    }
}
