//! `vxnat run`: one node's dataplane. The control thread owns the facts (config, cluster
//! state, interfaces, attached pods) and compiles them into `Tables`; one worker thread,
//! pinned to its core, owns the UMEM and every AF_XDP port and polls them. They talk over a
//! channel: commands (attach, detach, new tables, stats) are applied between polls, and a new
//! `Arc<Tables>` is swapped in whole.

use crate::config::NodeFile;
use crate::model::{Model, Update};
use crate::netinfo;
use crate::services::Compiler;
use crate::state::{derived_vtep_mac, ClusterState, NodeView};
use core::net::Ipv4Addr;
use crossbeam_channel::{bounded, Receiver, Sender};
use dataplane::nat::service::ServiceTable;
use dataplane::pipeline::DropReason;
use dataplane::tables::{NodeConfig, PortId, Tables, TablesBuilder};
use dataplane::wire::{Ipv4Cidr, MacAddr};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xsk::bpf::{AttachMode, Mode, XdpProgram, EXIT_NAMES};
use xsk::worker::{Worker, WorkerConfig};

pub const UPLINK: PortId = PortId(0);
pub const HOST: PortId = PortId(1);
const FIRST_POD: u16 = 2;

/// A pod attached to a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub port: u16,
}

/// Everything the tables are compiled from, apart from the pods.
#[derive(Debug)]
pub struct Facts {
    pub file: NodeFile,
    pub me: NodeView,
    pub vtep_mac: MacAddr,
    pub uplink_mac: MacAddr,
    pub uplink_mtu: u16,
    pub cluster: Ipv4Cidr,
    /// (vxnat end, node-stack end) names and MACs.
    pub host: Option<(String, MacAddr, String, MacAddr)>,
    /// Other nodes and the resolved MAC of the underlay next hop toward each.
    pub remotes: Vec<(NodeView, MacAddr)>,
    /// The cluster as the source reported it.
    pub model: Model,
    /// Per-Service compiled forms, and the Service table they make.
    pub compiler: Compiler,
    pub services: Arc<ServiceTable>,
    /// NodePorts as the node-local nftables rules were last written.
    pub node_ports: Vec<(&'static str, u16, Ipv4Addr, u16)>,
    /// Problems last reported (so each is logged once, when it appears).
    problems: Vec<String>,
}

impl Facts {
    /// Compiles the tables for this node with `pods` attached.
    pub fn tables(&self, pods: &[Pod], generation: u64) -> Result<Tables, String> {
        let node = NodeConfig {
            node_ip: self.me.node_ip,
            uplink_mac: self.uplink_mac,
            vtep_mac: self.vtep_mac,
            pod_cidr: self.me.pod_cidr,
            cluster_cidr: self.cluster,
            vni: self.file.vxlan.vni,
            vxlan_port: self.file.vxlan.port,
            underlay_mtu: self.uplink_mtu,
            outer_udp_checksum: self.file.checksum.outer_compute()?,
            segmentation: self.file.segmentation,
        };
        let (pods_policy, host_policy, uplink_policy) = self.file.checksum.policies()?;
        let mut b = TablesBuilder::new(node)
            .uplink(UPLINK)
            .and_then(|b| b.checksum_policy(UPLINK, uplink_policy))
            .map_err(|e| e.to_string())?
            .generation(generation);
        if let Some((_, mac, _, stack_mac)) = &self.host {
            b = b
                .host(HOST, *mac, *stack_mac)
                .and_then(|b| b.checksum_policy(HOST, host_policy))
                .map_err(|e| e.to_string())?;
        }
        for p in pods {
            let port_mac = netinfo::mac(&p.ifname)?;
            let mac: MacAddr = p.mac.parse().map_err(|_| format!("pod {}: mac {:?}", p.ip, p.mac))?;
            b = b
                .pod(PortId(p.port), port_mac, p.ip, mac)
                .and_then(|b| b.checksum_policy(PortId(p.port), pods_policy))
                .map_err(|e| e.to_string())?;
        }
        for (r, next_hop) in &self.remotes {
            let vtep = r.vtep_mac.unwrap_or_else(|| derived_vtep_mac(&r.name));
            b = b.remote(&r.name, r.node_ip, vtep, r.pod_cidr, *next_hop).map_err(|e| e.to_string())?;
        }
        b.services(self.services.clone()).build().map_err(|e| e.to_string())
    }

    /// Logs the problems not reported last time.
    fn report(&mut self, problems: Vec<String>) {
        for p in problems.iter().filter(|p| !self.problems.contains(p)) {
            eprintln!("vxnat: skipped: {p}");
        }
        self.problems = problems;
    }

    /// Compiles the Services `dirty` names (all of them when `None`) and assembles the table.
    fn compile_services(&mut self, dirty: Option<&std::collections::BTreeSet<crate::model::Key>>) {
        match dirty {
            None => self.compiler.compile_all(&self.model),
            Some(d) => self.compiler.compile_changed(&self.model, d),
        };
        let (table, conflicts) = self.compiler.table();
        let mut problems = self.compiler.problems();
        problems.extend(conflicts);
        self.report(problems);
        self.services = Arc::new(table);
    }

    /// Applies the other Nodes of the model: new ones get their underlay next hop resolved,
    /// known ones keep theirs. This node's own Node cannot change live (its pod CIDR and
    /// address are wired into the host port and the XDP program): a change is reported.
    fn update_remotes(&mut self) {
        let mut remotes = Vec::new();
        for n in self.model.nodes.values() {
            let v = match NodeView::from_node(n) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("vxnat: skipped: {e}");
                    continue;
                }
            };
            if v.name == self.me.name {
                if v.pod_cidr != self.me.pod_cidr || v.node_ip != self.me.node_ip {
                    eprintln!("vxnat: Node {}: podCIDR or address changed; restart vxnat to apply it", v.name);
                }
                continue;
            }
            let hop = self
                .remotes
                .iter()
                .find(|(r, _)| r.node_ip == v.node_ip)
                .map(|(_, h)| *h)
                .or_else(|| netinfo::next_hop_mac(v.node_ip).ok().flatten())
                .unwrap_or(MacAddr::ZERO);
            remotes.push((v, hop));
        }
        self.remotes = remotes;
    }
}

/// Gathers the facts for `file`'s node from the cluster `model`: its Node object, the other
/// nodes, the uplink; compiles every Service.
pub fn gather(file: &NodeFile, model: Model) -> Result<Facts, String> {
    let source = file.state.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "Kubernetes API".into());
    let me = model
        .nodes
        .get(&file.node)
        .ok_or(format!("{source}: no Node named {:?} (node in the config)", file.node))
        .and_then(NodeView::from_node)?;
    if let Some(vni) = me.vni.filter(|v| *v != file.vxlan.vni) {
        return Err(format!("Node {}: backend-data VNI {vni} differs from vxlan.vni {}", me.name, file.vxlan.vni));
    }
    let vtep_mac = me.vtep_mac.unwrap_or_else(|| derived_vtep_mac(&me.name));
    let cluster: Ipv4Cidr = file.cluster_cidr.parse().map_err(|_| "cluster_cidr: not a CIDR".to_string())?;
    let uplink_mac = netinfo::mac(&file.uplink)?;
    let uplink_mtu = netinfo::mtu(&file.uplink)?;
    let mut facts = Facts {
        file: file.clone(),
        compiler: Compiler::new(&me.name, file.maglev_table_size),
        me,
        vtep_mac,
        uplink_mac,
        uplink_mtu,
        cluster,
        host: None,
        remotes: Vec::new(),
        model,
        services: Arc::default(),
        node_ports: Vec::new(),
        problems: Vec::new(),
    };
    facts.update_remotes();
    facts.compile_services(None);
    facts.node_ports = crate::services::node_port_redirects(facts.model.services.values());
    Ok(facts)
}

/// The first complete cluster state: the file, or the Kubernetes API's first list of every
/// kind (waited for up to `timeout`).
fn initial_model(
    file: &NodeFile,
    updates: &crossbeam_channel::Receiver<Update>,
    timeout: Duration,
) -> Result<Model, String> {
    if let Some(path) = &file.state {
        return Ok(Model::from_state(ClusterState::load(path)?));
    }
    let mut model = Model::default();
    let mut listed = Vec::new();
    let deadline = Instant::now() + timeout;
    while listed.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = updates.recv_timeout(left).map_err(|_| {
            format!("Kubernetes API: no complete list of Nodes, Services and EndpointSlices within {timeout:?}")
        })?;
        if let Update::Relisted(k, _) = &u {
            if !listed.contains(k) {
                listed.push(*k);
            }
        }
        model.apply(u);
    }
    Ok(model)
}

/// Commands from the control thread to the worker.
#[derive(Debug)]
pub enum Command {
    Attach {
        port: PortId,
        ifname: String,
        tables: Arc<Tables>,
        reply: Sender<Result<(), String>>,
    },
    Detach {
        port: PortId,
        tables: Arc<Tables>,
        reply: Sender<Result<(), String>>,
    },
    /// New tables, and when the change they carry was noticed (for the swap latency).
    Tables(Arc<Tables>, Instant),
    Stats(Sender<WorkerStats>),
    /// Installs an observer; false if one is already running (one capture or trace at a time).
    StartObserve(Box<dataplane::observe::Observe>, Sender<bool>),
    /// Removes the observer and hands it back with what it collected.
    StopObserve(Sender<Option<Box<dataplane::observe::Observe>>>),
    /// Whether the current observer has collected everything it asked for.
    ObserveDone(Sender<bool>),
    /// The flow table and held SNAT tuples matching a filter.
    Flows(dataplane::filter::Filter, Sender<crate::observe::FlowsReport>),
}

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
    pub snat_in_use: u64,
    pub snat_held: u64,
    /// (backend ip:port, refusals): `snat ports exhausted` per backend.
    pub snat_exhausted: Vec<(String, u64)>,
    /// Handshake outcomes per Service endpoint.
    pub backends: Vec<BackendStats>,
    pub multi_buffer_frames: u64,
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

pub const SWAP_BUCKETS_S: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

impl SwapHistogram {
    fn observe(&mut self, d: Duration) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; SWAP_BUCKETS_S.len()];
        }
        let s = d.as_secs_f64();
        for (b, &le) in self.buckets.iter_mut().zip(SWAP_BUCKETS_S.iter()) {
            if s <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum_s += s;
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

fn worker_stats(w: &Worker, generation: u64, now: u64) -> WorkerStats {
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
        snat_in_use: snat.in_use,
        snat_held: snat.held,
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
        table_swaps: SwapHistogram::default(),
    }
}

/// The worker thread's body: bind the uplink and host port, then poll until `stop`.
#[allow(clippy::too_many_arguments)]
fn worker_main(
    cfg: WorkerConfig,
    core: Option<usize>,
    uplink: String,
    host: Option<String>,
    node_ip: [u8; 4],
    vxlan_port: u16,
    mut tables: Arc<Tables>,
    commands: Receiver<Command>,
    stop: Arc<AtomicBool>,
    busy_poll: bool,
    ready: Sender<Result<(), String>>,
) {
    if let Some(c) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    let mut w = match Worker::new(0, cfg) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    if let Err(e) = w.add_port(UPLINK, &uplink, Mode::Uplink, node_ip, vxlan_port) {
        let _ = ready.send(Err(format!("uplink {uplink}: {e}")));
        return;
    }
    if let Some(h) = &host {
        if let Err(e) = w.add_host_port(HOST, h, node_ip, vxlan_port) {
            let _ = ready.send(Err(format!("host port {h}: {e}")));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    let start = Instant::now();
    let mut idle = 0u32;
    let mut swaps = SwapHistogram::default();
    // The uplink's XDP program redirects exactly the Service frontends of the current tables.
    let mut frontends_of = u64::MAX;
    while !stop.load(Ordering::Relaxed) {
        if tables.generation != frontends_of {
            let list = tables.services().uplink_frontends(std::net::Ipv4Addr::from(node_ip));
            if let Err(e) = w.set_frontends(UPLINK, &list) {
                eprintln!("vxnat: updating the uplink's Service frontends: {e}");
            }
            frontends_of = tables.generation;
        }
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                Command::Attach { port, ifname, tables: t, reply } => {
                    let r = w.add_port(port, &ifname, Mode::All, node_ip, vxlan_port);
                    if r.is_ok() {
                        tables = t;
                    }
                    let _ = reply.send(r);
                }
                Command::Detach { port, tables: t, reply } => {
                    tables = t;
                    let r = if w.remove_port(port) { Ok(()) } else { Err(format!("port {} not bound", port.0)) };
                    let _ = reply.send(r);
                }
                Command::Tables(t, noticed) => {
                    tables = t;
                    swaps.observe(noticed.elapsed());
                }
                Command::Stats(reply) => {
                    let mut s = worker_stats(&w, tables.generation, start.elapsed().as_nanos() as u64);
                    s.table_swaps = swaps.clone();
                    let _ = reply.send(s);
                }
                Command::StartObserve(o, reply) => {
                    let slot = &mut w.state_mut().observe;
                    let free = slot.is_none();
                    if free {
                        *slot = Some(o);
                    }
                    let _ = reply.send(free);
                }
                Command::StopObserve(reply) => {
                    let _ = reply.send(w.state_mut().observe.take());
                }
                Command::ObserveDone(reply) => {
                    let _ = reply.send(w.state().observe.as_ref().is_none_or(|o| o.done()));
                }
                Command::Flows(filter, reply) => {
                    let now = start.elapsed().as_nanos() as u64;
                    let _ = reply.send(crate::observe::flows_report(w.state(), now, &filter, 100_000));
                }
            }
        }
        if w.poll(&tables, start.elapsed().as_nanos() as u64) > 0 {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            // Adaptive: spin while traffic flows, sleep on the ring fds once idle.
            if !busy_poll && idle > 256 {
                w.wait(5);
            }
        }
    }
}

/// Removes what a killed vxnat may have left: XDP programs on the uplink and on the pods it
/// had attached, the host port veth, the ctl socket.
pub fn cleanup_leftovers(file: &NodeFile, pods: &[Pod]) {
    for ifname in std::iter::once(&file.uplink).chain(pods.iter().map(|p| &p.ifname)) {
        if let Ok(i) = netinfo::ifindex(ifname) {
            XdpProgram::detach_any(i);
        }
    }
    netinfo::delete_link(&file.host.ifname);
    netinfo::remove_masquerade();
    let _ = std::fs::remove_file(&file.socket);
}

pub fn pods_file(file: &NodeFile) -> std::path::PathBuf {
    let mut p = file.socket.clone().into_os_string();
    p.push(".pods.json");
    p.into()
}

fn save_pods(file: &NodeFile, pods: &[Pod]) {
    if let Ok(s) = serde_json::to_string_pretty(pods) {
        let _ = std::fs::write(pods_file(file), s);
    }
}

fn load_pods(file: &NodeFile) -> Vec<Pod> {
    std::fs::read_to_string(pods_file(file)).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// How an attach refused because the node holds `max_pods` pods begins (the CNI plugin maps
/// it to its own error).
pub const NODE_FULL: &str = "node full";

/// The running node: what the ctl server works on.
#[derive(Debug)]
pub struct Node {
    /// ARP claims on the uplink (incident 3), when the packet socket could be opened.
    pub arp: Option<crate::arpwatch::ArpWatch>,
    pub facts: Facts,
    pub pods: Vec<Pod>,
    generation: u64,
    commands: Sender<Command>,
    pub started: Instant,
}

impl Node {
    fn next_port(&self) -> u16 {
        (FIRST_POD..).find(|p| !self.pods.iter().any(|q| q.port == *p)).unwrap_or(FIRST_POD)
    }

    fn compile(&mut self, pods: &[Pod]) -> Result<Arc<Tables>, String> {
        self.generation += 1;
        Ok(Arc::new(self.facts.tables(pods, self.generation)?))
    }

    pub fn attach(&mut self, ifname: &str, ip: Ipv4Addr, mac: Option<MacAddr>) -> Result<Pod, String> {
        let max = self.facts.file.max_pods as usize;
        if self.pods.len() >= max {
            return Err(format!("{NODE_FULL}: {max} pods attached, max_pods is {max}; {ifname} ({ip}) not attached"));
        }
        if !netinfo::exists(ifname) {
            return Err(format!("ifname: {ifname} does not exist"));
        }
        if self.pods.iter().any(|p| p.ifname == ifname) {
            return Err(format!("ifname: {ifname} is already attached"));
        }
        let mac = match mac {
            Some(m) => m,
            None => netinfo::veth_peer_mac(ifname)?,
        };
        let pod = Pod { ifname: ifname.to_string(), ip, mac: mac.to_string(), port: self.next_port() };
        let mut pods = self.pods.clone();
        pods.push(pod.clone());
        let tables = self.compile(&pods)?;
        let (tx, rx) = bounded(1);
        self.commands
            .send(Command::Attach { port: PortId(pod.port), ifname: ifname.to_string(), tables, reply: tx })
            .map_err(|_| "worker stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "worker did not answer".to_string())??;
        self.pods = pods;
        save_pods(&self.facts.file, &self.pods);
        Ok(pod)
    }

    pub fn detach(&mut self, ifname: &str) -> Result<Pod, String> {
        let pod = self
            .pods
            .iter()
            .find(|p| p.ifname == ifname)
            .cloned()
            .ok_or(format!("ifname: {ifname} is not attached"))?;
        let pods: Vec<Pod> = self.pods.iter().filter(|p| p.ifname != ifname).cloned().collect();
        let tables = self.compile(&pods)?;
        let (tx, rx) = bounded(1);
        self.commands
            .send(Command::Detach { port: PortId(pod.port), tables, reply: tx })
            .map_err(|_| "worker stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "worker did not answer".to_string())??;
        self.pods = pods;
        save_pods(&self.facts.file, &self.pods);
        Ok(pod)
    }

    /// The channel to the worker (for long requests that must not hold the node lock).
    pub fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    pub fn stats(&self) -> Result<WorkerStats, String> {
        let (tx, rx) = bounded(1);
        self.commands.send(Command::Stats(tx)).map_err(|_| "worker stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "worker did not answer".to_string())
    }

    /// Re-reads the uplink's MAC and MTU and re-resolves the underlay next hops; publishes new
    /// tables if anything changed.
    pub fn refresh_underlay(&mut self) {
        let mut changed = false;
        let uplink = &self.facts.file.uplink;
        if let (Ok(mac), Ok(mtu)) = (netinfo::mac(uplink), netinfo::mtu(uplink)) {
            if (mac, mtu) != (self.facts.uplink_mac, self.facts.uplink_mtu) {
                self.facts.uplink_mac = mac;
                self.facts.uplink_mtu = mtu;
                changed = true;
            }
        }
        for (r, hop) in &mut self.facts.remotes {
            if let Ok(Some(m)) = netinfo::next_hop_mac(r.node_ip) {
                if m != *hop {
                    *hop = m;
                    changed = true;
                }
            }
        }
        if changed {
            let pods = self.pods.clone();
            if let Ok(t) = self.compile(&pods) {
                let _ = self.commands.send(Command::Tables(t, Instant::now()));
            }
        }
    }

    /// Applies updates from the cluster source: the model says what changed, only those
    /// Services are compiled again, and a new tables snapshot goes to the worker, which swaps
    /// it in between two batches. Returns the new generation, if anything changed.
    pub fn apply_updates(&mut self, updates: impl IntoIterator<Item = Update>) -> Option<u64> {
        let t0 = Instant::now();
        let mut dirty = crate::model::Dirty::default();
        for u in updates {
            dirty.merge(self.facts.model.apply(u));
        }
        if dirty.is_empty() {
            return None;
        }
        if dirty.nodes {
            self.facts.update_remotes();
        }
        if !dirty.services.is_empty() {
            self.facts.compile_services(Some(&dirty.services));
            let node_ports = crate::services::node_port_redirects(self.facts.model.services.values());
            if node_ports != self.facts.node_ports {
                self.facts.node_ports = node_ports;
                if let Err(e) = install_rules(&self.facts) {
                    eprintln!("vxnat: node-local NodePort rules: {e}");
                }
            }
        }
        let pods = self.pods.clone();
        match self.compile(&pods) {
            Ok(t) => {
                let generation = t.generation;
                let _ = self.commands.send(Command::Tables(t, t0));
                eprintln!(
                    "vxnat: tables generation {generation}: {} Services changed{}, compiled in {:.1} ms",
                    dirty.services.len(),
                    if dirty.nodes { ", Nodes changed" } else { "" },
                    t0.elapsed().as_secs_f64() * 1e3
                );
                Some(generation)
            }
            Err(e) => {
                eprintln!("vxnat: new tables not built ({e}); the current ones stay");
                None
            }
        }
    }

    /// Every port's name, by number.
    pub fn port_names(&self) -> std::collections::BTreeMap<u16, String> {
        let mut m = std::collections::BTreeMap::new();
        m.insert(0, self.port_name(0));
        if self.facts.host.is_some() {
            m.insert(1, self.port_name(1));
        }
        for p in &self.pods {
            m.insert(p.port, self.port_name(p.port));
        }
        m
    }

    /// Port names for reports.
    pub fn port_name(&self, port: u16) -> String {
        match port {
            0 => format!("uplink {}", self.facts.file.uplink),
            1 => format!("host {}", self.facts.file.host.ifname),
            p => self
                .pods
                .iter()
                .find(|q| q.port == p)
                .map(|q| format!("pod {} {}", q.ifname, q.ip))
                .unwrap_or(format!("port {p}")),
        }
    }
}

/// Writes vxnat's nftables table for this node (node-local NodePorts, host port SNAT, pod
/// masquerade).
fn install_rules(facts: &Facts) -> Result<(), String> {
    let file = &facts.file;
    let services = file.service_cidr.parse::<Ipv4Cidr>().map_err(|_| "service_cidr".to_string())?.network().to_string();
    netinfo::install_node_rules(&netinfo::NodeRules {
        cluster: &facts.cluster.network().to_string(),
        services: &services,
        host_stack_if: facts.host.as_ref().map(|h| h.2.as_str()),
        gateway: facts.me.pod_cidr.first_host(),
        masquerade: file.masquerade,
        node_ports: &facts.node_ports,
    })
}

/// Runs the node until SIGTERM/SIGINT; cleans up on the way out.
pub fn run(file: NodeFile) -> Result<(), String> {
    let previous = load_pods(&file);
    cleanup_leftovers(&file, &previous);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("signal handler: {e}"))?;
    }
    // The cluster source: the state file, followed for changes, or the Kubernetes API.
    let (update_tx, updates) = crossbeam_channel::unbounded();
    let (annotate_tx, annotate_rx) = crossbeam_channel::unbounded();
    let _source = match &file.state {
        Some(path) => crate::source::follow_file(path.clone(), update_tx, stop.clone()),
        None => crate::source::KubeSource { config: None, node: file.node.clone() }.spawn(
            update_tx,
            annotate_rx,
            stop.clone(),
        ),
    }
    .map_err(|e| format!("starting the cluster source: {e}"))?;
    let mut facts = gather(&file, initial_model(&file, &updates, Duration::from_secs(60))?)?;
    if file.state.is_none() {
        let mac = facts.vtep_mac.to_string();
        let _ =
            annotate_tx.send(crate::source::flannel_annotations(file.vxlan.vni, &mac, &facts.me.node_ip.to_string()));
    }
    if file.host.enabled {
        let gw = facts.me.pod_cidr.first_host();
        // The pods' MTU: what fits the underlay after VXLAN.
        let mtu = facts.uplink_mtu.saturating_sub(50);
        let net = facts.me.pod_cidr.network().address();
        let services =
            file.service_cidr.parse::<Ipv4Cidr>().map_err(|_| "service_cidr".to_string())?.network().to_string();
        let stack = netinfo::create_host_port(
            &file.host.ifname,
            gw,
            net,
            mtu,
            &facts.cluster.network().to_string(),
            &services,
        )?;
        facts.host =
            Some((file.host.ifname.clone(), netinfo::mac(&file.host.ifname)?, stack.clone(), netinfo::mac(&stack)?));
    }
    install_rules(&facts)?;
    if file.masquerade && std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        eprintln!("vxnat: net.ipv4.ip_forward is 0: pod traffic leaving the cluster will not be forwarded by this node (set it to 1, as flannel nodes have it)");
    }
    // Pods attached before a restart come back if their interface still exists.
    let pods: Vec<Pod> = previous.into_iter().filter(|p| netinfo::exists(&p.ifname)).collect();
    let tables = Arc::new(facts.tables(&pods, 1)?);
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = bounded(1);
    let cfg = WorkerConfig {
        frames: file.umem.frames_for(file.max_pods),
        fill: file.umem.plan(),
        flows: file.nat.max_flows,
        snat_ports: file.nat.ports()?,
        snat_hold_ns: file.nat.snat_hold_s.saturating_mul(1_000_000_000),
        timeouts: file.conntrack.timeouts(),
        attach: if file.xdp_mode.as_deref() == Some("generic") { AttachMode::Generic } else { AttachMode::Native },
        ..WorkerConfig::default()
    };
    let worker = {
        let (uplink, host, stop) = (file.uplink.clone(), facts.host.as_ref().map(|h| h.0.clone()), stop.clone());
        let (ip, port, busy, core, t) =
            (facts.me.node_ip.octets(), file.vxlan.port, file.busy_poll, file.cores.first().copied(), tables.clone());
        std::thread::Builder::new()
            .name("vxnat-worker-0".into())
            .spawn(move || worker_main(cfg, core, uplink, host, ip, port, t, cmd_rx, stop, busy, ready_tx))
            .map_err(|e| format!("starting the worker: {e}"))?
    };
    let shutdown = |why: String| {
        netinfo::delete_link(&file.host.ifname);
        netinfo::remove_masquerade();
        let _ = std::fs::remove_file(&file.socket);
        why
    };
    match ready_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = worker.join();
            return Err(shutdown(e));
        }
        Err(_) => return Err(shutdown("the worker did not start".into())),
    }
    // Control (this thread: ctl, refreshes) on a core the worker does not use.
    if let Some(worker_core) = file.cores.first() {
        if let Some(c) = core_affinity::get_core_ids().unwrap_or_default().into_iter().find(|c| c.id != *worker_core) {
            core_affinity::set_for_current(c);
        }
    }
    let arp = match crate::arpwatch::ArpWatch::open(&file.uplink) {
        Ok(a) => Some(a),
        Err(e) => {
            eprintln!("vxnat: {e}; ARP conflicts will not be detected");
            None
        }
    };
    let mut node = Node { arp, facts, pods: Vec::new(), generation: 1, commands: cmd_tx, started: Instant::now() };
    for p in &pods {
        let mac = p.mac.parse().ok();
        match node.attach(&p.ifname, p.ip, mac) {
            Ok(_) => eprintln!("vxnat: re-attached pod {} on {}", p.ip, p.ifname),
            Err(e) => eprintln!("vxnat: could not re-attach pod {} on {}: {e}", p.ip, p.ifname),
        }
    }
    let node = Arc::new(std::sync::Mutex::new(node));
    let server = crate::ctl::serve(&file.socket, node.clone(), stop.clone()).map_err(&shutdown)?;
    let metrics = if file.metrics.is_empty() {
        None
    } else {
        match crate::metrics::serve(&file.metrics, node.clone(), stop.clone()) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("vxnat: {e}; no metrics");
                None
            }
        }
    };
    eprintln!(
        "vxnat: node {} up: uplink {}, VXLAN {}:{} VNI {}, ctl {}",
        file.node,
        file.uplink,
        node.lock().map(|n| n.facts.me.node_ip.to_string()).unwrap_or_default(),
        file.vxlan.port,
        file.vxlan.vni,
        file.socket.display()
    );
    // Underlay next hops: refreshed as soon as the kernel's neighbour or route tables change,
    // and every 10 s regardless.
    let dirty = Arc::new(AtomicBool::new(false));
    {
        let d = dirty.clone();
        if let Err(e) = crate::rtnl::watch(move || d.store(true, Ordering::Relaxed)) {
            eprintln!("vxnat: cannot watch route/neighbour changes ({e}); refreshing every 10 s only");
        }
    }
    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Cluster changes: everything queued is applied as one new snapshot.
        if let Ok(first) = updates.recv_timeout(Duration::from_millis(100)) {
            let batch: Vec<Update> = std::iter::once(first).chain(updates.try_iter()).collect();
            if let Ok(mut n) = node.lock() {
                n.apply_updates(batch);
            }
        }
        if let Ok(mut n) = node.lock() {
            if let Some(a) = n.arp.as_mut() {
                for line in a.poll() {
                    eprintln!("vxnat: {line}");
                }
            }
        }
        if dirty.swap(false, Ordering::Relaxed) || last_refresh.elapsed() > Duration::from_secs(10) {
            if let Ok(mut n) = node.lock() {
                n.refresh_underlay();
            }
            last_refresh = Instant::now();
        }
    }
    eprintln!("vxnat: stopping");
    let _ = worker.join();
    let _ = server.join();
    if let Some(m) = metrics {
        let _ = m.join();
    }
    // Pods stay listed in the pods file so a restart re-attaches them.
    shutdown(String::new());
    Ok(())
}

/// Runs an observer in the worker until it has what it asked for or `timeout` passes, and
/// returns it with what it collected.
pub fn observe(
    commands: &Sender<Command>,
    o: dataplane::observe::Observe,
    timeout: Duration,
) -> Result<Box<dataplane::observe::Observe>, String> {
    let ask = |cmd: Command| commands.send(cmd).map_err(|_| "worker stopped".to_string());
    let (tx, rx) = bounded(1);
    ask(Command::StartObserve(Box::new(o), tx))?;
    if !rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "worker did not answer".to_string())? {
        return Err("a capture or trace is already running on this node; try again when it ends".into());
    }
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        let (tx, rx) = bounded(1);
        ask(Command::ObserveDone(tx))?;
        if rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false) {
            break;
        }
    }
    let (tx, rx) = bounded(1);
    ask(Command::StopObserve(tx))?;
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| "worker did not answer".to_string())?
        .ok_or("the observer went missing".to_string())
}

/// Drop reason help, for reports.
pub fn reason_help(name: &str) -> &'static str {
    DropReason::from_name(name).map(|r| r.help()).unwrap_or("")
}
