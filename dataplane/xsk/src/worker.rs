//! The poll-mode worker: several ports on one shared UMEM, polled in turn. Per port and
//! iteration: reclaim completed tx chunks, restock the fill ring, take a batch of up to 32
//! received frames, run them through the pipeline, and queue each on its egress port's tx ring
//! (or return it to the pool). Nothing is allocated per packet; the only syscalls are the
//! wakeups the kernel asks for (need_wakeup) and the idle poll.
//!
//! How many chunks each fill ring gets is `fill`'s budget: a guaranteed minimum per port,
//! refill by consumption, growth only into a shared surplus. Every chunk is always somewhere
//! known: the free pool, or the rings of the port recorded as its `owner`. So a port can be
//! removed at any time and the chunks the kernel held for it come back (`remove_port`), and
//! attach/detach churn never leaks the UMEM.

use crate::bpf::{AttachMode, Mode, XdpProgram};
use crate::fill::{FillLimits, FillPlan, PortFill};
use crate::port::{PortConfig, XskPort, XDP_PKT_CONTD};
use crate::umem::{FrameAccount, Umem, FRAME_SIZE};
use crate::XskError;
use dataplane::pipeline::{process_batch, Counters, Disposition, DropReason, FrameBuf, Nanos, WorkerState};
use dataplane::tables::{PortId, Tables};
use libxdp_sys as sys;

/// Frames per rx batch.
pub const BATCH: usize = 32;
/// Descriptors peeked per rx batch: a batch of single-chunk frames, or fewer frames when some
/// arrive as chains.
const RX_DESCS: usize = 64;
/// Room for one frame that arrived as a descriptor chain, and headroom for VXLAN in front.
const JUMBO_MAX: usize = 64 << 10;
const JUMBO_HEADROOM: usize = 256;
/// `chunks[k]` of a frame that lives in a jumbo buffer rather than a UMEM chunk.
const JUMBO: u64 = u64::MAX;
/// Flow slots examined for expiry per poll pass (busy or idle).
const MAINTAIN_SLOTS: usize = 64;
const MAINTAIN_SLOTS_IDLE: usize = 1024;
/// At most one idle sweep this often (a full pass over 64 Ki flows in about 0.6 s).
const IDLE_SWEEP_EVERY_NS: u64 = 10_000_000;
/// Frames copy-mode transmit sends per sendto(2) (the kernel's `TX_BATCH_SIZE`).
const TX_PER_KICK: u32 = 32;
/// Batches taken from one port per pass over the ports.
pub const RX_BATCHES_PER_PASS: usize = 4;

/// Worker sizing.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// UMEM chunks (4 KiB each); `FillPlan::umem_frames` sizes it from the pod count.
    pub frames: u32,
    /// Ring sizes (fill, completion, rx, tx) of the uplink and host port, a power of two.
    pub ring_size: u32,
    /// Ring sizes of pod ports, a power of two.
    pub pod_ring_size: u32,
    /// Fill-ring minimums and maximums per port kind, the reserve and the shared surplus.
    pub fill: FillPlan,
    pub attach: AttachMode,
    /// Connections tracked at most.
    pub flows: usize,
    /// ClientIP-affinity clients remembered at most (`None`: as `WorkerState::with_flows_and_timeouts`).
    pub affinity: Option<usize>,
    /// SNAT source ports and how long a tuple is held after its flow ends.
    pub snat_ports: core::ops::RangeInclusive<u16>,
    pub snat_hold_ns: u64,
    /// The VXLAN port: never a SNAT port (`SnatAllocator::exclude`).
    pub vxlan_port: u16,
    pub timeouts: dataplane::conntrack::Timeouts,
    /// How frames leave toward pods.
    pub pod_tx: PodTx,
}

/// How a pod port transmits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodTx {
    /// Its AF_XDP socket: every frame at most an MTU (veth drops longer non-GSO frames).
    #[default]
    Xsk,
    /// A packet socket with virtio-net headers, the frames of each flush merged by GRO
    /// ([`crate::packet`], [`crate::bulk`]): the pod's stack gets up to 64 KiB at a time.
    PacketGro,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let fill = FillPlan::default();
        WorkerConfig {
            frames: fill.umem_frames(DEFAULT_MAX_PODS) as u32,
            ring_size: 2048,
            pod_ring_size: 2048,
            fill,
            attach: AttachMode::Native,
            flows: dataplane::pipeline::DEFAULT_FLOWS,
            affinity: None,
            snat_ports: dataplane::nat::snat::DEFAULT_PORTS,
            snat_hold_ns: dataplane::nat::snat::DEFAULT_HOLD_NS,
            vxlan_port: dataplane::wire::vxlan::FLANNEL_PORT,
            timeouts: dataplane::conntrack::Timeouts::default(),
            pod_tx: PodTx::default(),
        }
    }
}

/// Pods per node when nothing says otherwise: kubelet's default `maxPods`.
pub const DEFAULT_MAX_PODS: u32 = 110;

dataplane::counter_set! {
    /// I/O events of the worker that are not per-packet pipeline drops.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct IoStats {
        fill_starved: "times a port was below its guaranteed fill minimum and no chunk was free (UMEM exhausted); per port in PortReport::fill",
        bad_descriptors: "descriptors from the kernel outside the UMEM (never expected; dropped)",
        tx_packets: "packets queued to tx rings",
        tx_bytes: "bytes queued to tx rings",
        multi_buffer_frames: "frames received as descriptor chains (multi-buffer: larger than a chunk)",
        discarded_at_detach: "frames still in a port's rx ring when it was removed (never processed)",
        reclaimed_at_detach: "chunks that came back from the rings of removed sockets",
        gro_frames: "aggregated frames sent to pods (two segments or more, one skb each)",
        gro_segments: "segments that went to pods inside aggregated frames",
        programs_not_replaced: "ports taken over from a predecessor whose XDP program could not be replaced (the predecessor's still redirects to the socket)",
    }
}

/// One port's fill-ring state and the kernel's counters for its socket, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortReport {
    pub fill: PortFill,
    pub socket: Option<crate::port::SocketStats>,
}

/// A port's XDP program.
enum PortProgram {
    /// Attached by this worker.
    Own(XdpProgram),
    /// The port was taken over with its socket (`Worker::adopt`): the predecessor's program
    /// redirects to it still, while a helper thread attaches this worker's in its place.
    Replacing(Mode),
    /// That replacement failed (why): the predecessor's program stays, redirecting to the same
    /// socket, so the port forwards; its exit counters are not readable.
    Predecessors(Mode, String),
}

impl PortProgram {
    fn mode(&self) -> Mode {
        match self {
            PortProgram::Own(p) => p.mode(),
            PortProgram::Replacing(m) | PortProgram::Predecessors(m, _) => *m,
        }
    }
}

/// What the program-replacing helper thread reports per port.
type Replaced = (PortId, Result<XdpProgram, String>);

struct WorkerPort {
    // Field order matters: the socket is deleted before the program is detached.
    xsk: XskPort,
    prog: PortProgram,
    fill: PortFill,
    /// The aggregated-frame transmit socket ([`PodTx::PacketGro`] pods).
    bulk: Option<crate::packet::PacketTx>,
    /// The last errno the kernel refused a frame on `bulk` with.
    bulk_error: Option<i32>,
}

/// `owner` value of a chunk that no port's rings hold (it may be in the pool).
const NO_OWNER: u16 = u16::MAX;

pub struct Worker {
    // Field order matters: ports (sockets) drop before the UMEM they are bound to.
    ports: Vec<Option<WorkerPort>>,
    umem: Umem,
    pool: Vec<u64>,
    state: WorkerState,
    /// Per egress port: (address, length, options) descriptors to transmit; a frame larger
    /// than a chunk is a chain, all but its last descriptor with `XDP_PKT_CONTD`.
    staged: Vec<Vec<(u64, u32, u32)>>,
    /// Buffers for frames that arrived as descriptor chains (multi-buffer), one per batch slot:
    /// the pipeline wants a frame in one piece.
    jumbo: Vec<Vec<u8>>,
    host: Option<PortId>,
    cfg: WorkerConfig,
    pub io: IoStats,
    /// Per chunk (by index), the port whose fill or tx ring it was last posted to. Only
    /// meaningful for chunks not in the pool; read when a port is removed.
    owner: Vec<u16>,
    /// Chunks a removed socket held that could not be found again (never expected).
    lost_with_sockets: u32,
    /// Sum of the fill minimums of the bound ports (admission against the UMEM).
    min_sum: u64,
    /// The rx fds for the idle poll(2), one per bound port, rebuilt when ports change.
    pollfds: Vec<libc::pollfd>,
    /// When the last idle expiry sweep ran (worker clock, ns).
    last_idle_sweep: u64,
    /// Programs loaded ahead of their port's bind (`preload`), by port.
    preloaded: Vec<(PortId, crate::bpf::LoadedProgram)>,
    /// The clock of the last poll (for ports bound between polls).
    last_now: u64,
    /// What may still be staged for transmit this pass.
    tx: TxBudget,
    /// The port each pass starts at, one further each pass: a pass serves ports in turn, and
    /// when an egress is overloaded the first ones served get its room.
    first_port: usize,
    /// Scratch for the aggregated-frame transmit path.
    bulk: crate::bulk::BulkTx,
    /// Programs being attached in place of a predecessor's (`adopt`), and how many are due.
    replacing: Option<crossbeam_channel::Receiver<Replaced>>,
    replacements_left: usize,
    /// Programs `adopt` leaves for the helper thread: (port, program, interface, socket).
    replace_later: Vec<(PortId, crate::bpf::LoadedProgram, u32, std::os::fd::OwnedFd)>,
    /// The frontends map of the uplink's program while it replaces a predecessor's.
    adopted_frontends: Option<crate::bpf::FrontendsMap>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("account", &self.account()).field("io", &self.io).finish_non_exhaustive()
    }
}

impl Worker {
    pub fn new(id: u16, cfg: WorkerConfig) -> Result<Worker, XskError> {
        let umem = Umem::new(cfg.frames, cfg.ring_size)?;
        Ok(Self::with_umem(id, cfg, umem))
    }

    /// `new` with a UMEM made already (`Umem::prepare`) of `cfg.frames` chunks.
    pub fn with_umem(id: u16, cfg: WorkerConfig, umem: Umem) -> Worker {
        let pool: Vec<u64> = umem.chunk_addrs().collect();
        let owner = vec![NO_OWNER; cfg.frames as usize];
        let mut state = match cfg.affinity {
            Some(clients) => WorkerState::with_capacities(id, cfg.flows, clients, cfg.timeouts),
            None => WorkerState::with_flows_and_timeouts(id, cfg.flows, cfg.timeouts),
        };
        state.snat =
            dataplane::nat::snat::SnatAllocator::new(cfg.snat_ports.clone(), cfg.snat_hold_ns, u64::from(id) ^ 0x5eed);
        state.snat.exclude(cfg.vxlan_port);
        let limits = cfg.fill.tx_limits(BATCH as u32);
        let tx = TxBudget { left: 0, total: limits.total, per_port: limits.per_port, pressure: false };
        Worker {
            ports: Vec::new(),
            umem,
            pool,
            state,
            staged: Vec::new(),
            jumbo: Vec::new(),
            host: None,
            cfg,
            io: IoStats::default(),
            owner,
            lost_with_sockets: 0,
            min_sum: 0,
            pollfds: Vec::new(),
            last_idle_sweep: 0,
            preloaded: Vec::new(),
            last_now: 0,
            tx,
            first_port: 0,
            bulk: crate::bulk::BulkTx::default(),
            replacing: None,
            replacements_left: 0,
            replace_later: Vec::new(),
            adopted_frontends: None,
        }
    }

    /// Binds `ifname` as port `id`: loads and attaches the XDP program in `mode`, binds an
    /// AF_XDP socket, inserts it into the program's XSKMAP and stocks the fill ring. The uplink
    /// (`Mode::Uplink`) gets the node ports' rings and fill budget, every other port a pod's.
    /// Refused when the UMEM cannot guarantee one more port's minimum.
    pub fn add_port(
        &mut self,
        id: PortId,
        ifname: &str,
        mode: Mode,
        node_ip: [u8; 4],
        vxlan_port: u16,
    ) -> Result<(), String> {
        let node = mode == Mode::Uplink;
        self.bind(id, ifname, mode, node, node_ip, vxlan_port, &[])
    }

    /// Loads and configures port `id`'s program now, for its bind later (`add_port` with the
    /// same `mode`): a successor does this before the takeover, so the forwarding gap holds
    /// only binds and attaches, not the verifier.
    pub fn preload(&mut self, id: PortId, mode: Mode, node_ip: [u8; 4], vxlan_port: u16) -> Result<(), String> {
        let loaded = XdpProgram::load(mode, node_ip, vxlan_port)?;
        self.preloaded.retain(|(p, _)| *p != id);
        self.preloaded.push((id, loaded));
        Ok(())
    }

    /// Port `id`'s program for `mode`: the one `preload` loaded, else loaded now.
    fn take_preloaded(
        &mut self,
        id: PortId,
        mode: Mode,
        node_ip: [u8; 4],
        vxlan_port: u16,
    ) -> Result<crate::bpf::LoadedProgram, String> {
        match self.preloaded.iter().position(|(p, l)| *p == id && l.mode() == mode) {
            Some(i) => Ok(self.preloaded.swap_remove(i).1),
            None => XdpProgram::load(mode, node_ip, vxlan_port),
        }
    }

    /// `add_port` for the uplink, with the Service frontends its program redirects in place
    /// before it is attached (`XdpProgram::attach`).
    pub fn add_uplink(
        &mut self,
        id: PortId,
        ifname: &str,
        node_ip: [u8; 4],
        vxlan_port: u16,
        frontends: &[(std::net::Ipv4Addr, u16, u8)],
    ) -> Result<(), String> {
        self.bind(id, ifname, Mode::Uplink, true, node_ip, vxlan_port, frontends)
    }

    /// Binds the host port (the node stack's side, the destination of `Disposition::ToHost`)
    /// with the node ports' rings and fill budget.
    pub fn add_host_port(&mut self, id: PortId, ifname: &str, node_ip: [u8; 4], vxlan_port: u16) -> Result<(), String> {
        self.bind(id, ifname, Mode::All, true, node_ip, vxlan_port, &[])?;
        self.host = Some(id);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn bind(
        &mut self,
        id: PortId,
        ifname: &str,
        mode: Mode,
        node: bool,
        node_ip: [u8; 4],
        vxlan_port: u16,
        frontends: &[(std::net::Ipv4Addr, u16, u8)],
    ) -> Result<(), String> {
        self.settle_replacements();
        let i = usize::from(id.0);
        if id.0 == NO_OWNER {
            return Err(format!("port {id}: out of range"));
        }
        if self.ports.get(i).is_some_and(Option::is_some) {
            return Err(format!("port {id} already bound"));
        }
        let (limits, ring_size) = self.port_limits(node);
        if !self.cfg.fill.admits(self.cfg.frames, self.min_sum + u64::from(limits.min)) {
            return Err(format!(
                "UMEM full: {} chunks cannot guarantee {} more to {ifname} beside the {} the bound ports need \
                 (raise umem.frames or lower max_pods)",
                self.cfg.frames, limits.min, self.min_sum
            ));
        }
        // On an adopted UMEM a new socket shares it through the uplink's (`XskPort::bind_shared`).
        self.umem.share = self.ports.iter().flatten().find(|p| p.prog.mode() == Mode::Uplink).map(|p| p.xsk.fd());
        let mut xsk = XskPort::bind(&mut self.umem, ifname, PortConfig { ring_size, copy_mode: true })
            .map_err(|e| e.to_string())?;
        let mut fill =
            if node { PortFill::new_busy(limits, self.last_now) } else { PortFill::new(limits, self.last_now) };
        // Stock the fill ring before the socket is in the XSKMAP: a frame redirected to a
        // socket whose fill ring is still empty would be dropped by the kernel.
        let deficit = self.total_deficit() + fill.deficit();
        stock(&mut xsk, &mut fill, &mut self.pool, &mut self.owner, id.0, deficit, self.cfg.fill.reserve, &mut self.io);
        let loaded = self.take_preloaded(id, mode, node_ip, vxlan_port);
        let prog =
            loaded.and_then(|l| XdpProgram::attach(l, xsk.ifindex, self.cfg.attach, (xsk.queue, xsk.fd()), frontends));
        let prog = match prog {
            Ok(prog) => prog,
            Err(e) => {
                let posted = fill.in_fill;
                drop(xsk);
                self.reclaim_owned(id.0, posted);
                return Err(e);
            }
        };
        self.install(id, xsk, PortProgram::Own(prog), fill, node)
    }

    /// Puts a bound socket with its attached program in slot `id` (with the packet socket a
    /// `PodTx::PacketGro` pod transmits aggregated frames on); on failure both are closed and
    /// the chunks their rings held come back.
    fn install(
        &mut self,
        id: PortId,
        xsk: XskPort,
        prog: PortProgram,
        fill: PortFill,
        node: bool,
    ) -> Result<(), String> {
        let i = usize::from(id.0);
        let bulk = if !node && self.cfg.pod_tx == PodTx::PacketGro {
            match crate::packet::PacketTx::open(xsk.ifindex) {
                Ok(b) => Some(b),
                Err(e) => {
                    let (posted, ifname) = (fill.in_fill + xsk.in_tx, xsk.ifname.clone());
                    drop(prog);
                    drop(xsk);
                    self.reclaim_owned(id.0, posted);
                    return Err(format!("{ifname}: packet socket for aggregated frames: {e}"));
                }
            }
        } else {
            None
        };
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
            self.staged.resize_with(i + 1, || Vec::with_capacity(BATCH * 2));
        }
        self.min_sum += u64::from(fill.limits.min);
        self.ports[i] = Some(WorkerPort { xsk, prog, fill, bulk, bulk_error: None });
        self.rebuild_pollfds();
        Ok(())
    }

    /// The fill limits and ring size of a port of kind `node` (uplink, host port) or pod.
    fn port_limits(&self, node: bool) -> (FillLimits, u32) {
        let (limits, ring_size) =
            if node { (self.cfg.fill.node, self.cfg.ring_size) } else { (self.cfg.fill.pod, self.cfg.pod_ring_size) };
        (FillLimits { min: limits.min.min(ring_size), max: limits.max.min(ring_size) }, ring_size)
    }

    /// Hands this worker's datapath over (`crate::handoff`): call between polls. The programs
    /// stay attached and the sockets open in the handoff's descriptors; this worker's own
    /// descriptors close as it drops.
    pub fn hand_off(mut self) -> Result<crate::handoff::Handoff, XskError> {
        use crate::handoff::{Handoff, Meta, PortMeta, FREE};
        self.leave_attached();
        let mut owner = self.owner.clone();
        for &c in &self.pool {
            if let Some(o) = owner.get_mut((c / u64::from(FRAME_SIZE)) as usize) {
                *o = FREE;
            }
        }
        let mut ports = Vec::new();
        let mut sockets = Vec::new();
        let mut sg = false;
        for (i, p) in self.ports.iter().enumerate() {
            let Some(p) = p else { continue };
            let id = i as u16;
            let mode = p.prog.mode();
            let host = self.host == Some(PortId(id));
            sg |= mode == Mode::Uplink && p.xsk.sg;
            sockets.push(p.xsk.dup_fd()?);
            ports.push(PortMeta {
                id,
                mode,
                node: mode == Mode::Uplink || host,
                host,
                ifname: p.xsk.ifname.clone(),
                ifindex: p.xsk.ifindex,
                sizes: p.xsk.ring_sizes(),
                sg: p.xsk.sg,
                in_fill: p.fill.in_fill,
                in_tx: p.xsk.in_tx,
            });
        }
        let umem = self
            .umem
            .memfd()
            .try_clone_to_owned()
            .map_err(|source| XskError { what: "duplicating the UMEM memfd".into(), source })?;
        let meta = Meta { frames: self.umem.frame_count(), ring_size: self.umem.ring_size, sg, ports, owner };
        // This process's descriptors and mappings go on another thread (the handoff's keep
        // the sockets): unmapping 4 rings per socket and the UMEM is milliseconds at 110
        // pods, not for the successor to wait for. Sockets first, then the UMEM.
        let (ports, umem_view) = (std::mem::take(&mut self.ports), self.umem);
        let _ = std::thread::Builder::new().name("vxnat-umem-free".into()).spawn(move || {
            drop(ports);
            drop(umem_view.unregister());
        });
        Ok(Handoff { meta, umem, sockets })
    }

    /// Takes over a predecessor's datapath (`hand_off` in the other process): its UMEM
    /// replaces this worker's fresh one, which is returned to be freed off the hot path, and
    /// each of its sockets that `want` lists (port, interface, program mode, node kind) becomes
    /// that port again, with the program preloaded for it (or loaded now) attached in place of
    /// the predecessor's. Call before any port is bound. Sockets not wanted, and wanted ones
    /// that cannot be taken (their interface was replaced), are closed and their chunks
    /// reclaimed; the caller binds the wanted ports this does not return. An error means
    /// nothing was taken (the handoff's descriptors are closed, the predecessor's sockets
    /// with them) and this worker is as it was.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        &mut self,
        handoff: crate::handoff::Handoff,
        want: &[(PortId, &str, Mode)],
        node_ip: [u8; 4],
        vxlan_port: u16,
        frontends: &[(std::net::Ipv4Addr, u16, u8)],
    ) -> Result<(Vec<PortId>, Umem), String> {
        use crate::handoff::FREE;
        if self.ports.iter().any(Option::is_some) {
            return Err("ports are bound already".into());
        }
        let crate::handoff::Handoff { meta, umem, sockets } = handoff;
        let Some(up) = meta.ports.iter().position(|p| p.mode == Mode::Uplink) else {
            return Err("the handoff has no uplink socket".into());
        };
        if meta.owner.len() != meta.frames as usize {
            return Err(format!("{} chunk owners for {} chunks", meta.owner.len(), meta.frames));
        }
        let umem = Umem::adopt(umem, meta.frames, meta.ring_size, meta.sg).map_err(|e| e.to_string())?;
        let fresh = core::mem::replace(&mut self.umem, umem);
        let mut sockets: Vec<Option<std::os::fd::OwnedFd>> = sockets.into_iter().map(Some).collect();
        // The uplink first: new sockets share the UMEM through it, so without it nothing is
        // taken. Installing it touches no chunk, so its failure undoes only the UMEM.
        let uplink = &meta.ports[up];
        let wanted = |m: &crate::handoff::PortMeta| {
            want.iter().any(|&(p, ifname, mode)| p == PortId(m.id) && ifname == m.ifname && mode == m.mode)
        };
        let taken = match sockets[up].take() {
            Some(fd) if wanted(uplink) => self.adopt_port(uplink, fd, node_ip, vxlan_port, frontends),
            _ => Err(String::new()),
        };
        if taken.is_err() {
            drop(core::mem::replace(&mut self.umem, fresh));
            return Err(format!("the uplink socket on {} could not be taken over", uplink.ifname));
        }
        let mut adopted = vec![PortId(uplink.id)];
        self.cfg.frames = meta.frames;
        self.pool = (0..meta.frames)
            .filter(|&k| meta.owner[k as usize] == FREE)
            .map(|k| u64::from(k) * u64::from(FRAME_SIZE))
            .collect();
        self.owner = meta.owner.iter().map(|&o| if o == FREE { NO_OWNER } else { o }).collect();
        for (m, fd) in meta.ports.iter().zip(sockets) {
            let Some(fd) = fd else { continue };
            let taken =
                if wanted(m) { self.adopt_port(m, fd, node_ip, vxlan_port, frontends) } else { Err(String::new()) };
            match taken {
                Ok(()) => adopted.push(PortId(m.id)),
                // Closed with `fd` (the last reference: the kernel releases it before close
                // returns), so its chunks are back in our hands.
                Err(_) => self.reclaim_owned(m.id, m.in_fill + m.in_tx),
            }
        }
        self.start_replacing();
        Ok((adopted, fresh))
    }

    /// One port of `adopt`.
    fn adopt_port(
        &mut self,
        m: &crate::handoff::PortMeta,
        fd: std::os::fd::OwnedFd,
        node_ip: [u8; 4],
        vxlan_port: u16,
        frontends: &[(std::net::Ipv4Addr, u16, u8)],
    ) -> Result<(), String> {
        let id = PortId(m.id);
        let xsk = XskPort::adopt(fd, &m.ifname, m.ifindex, m.sizes, m.sg, m.in_tx).map_err(|e| e.to_string())?;
        let (limits, _) = self.port_limits(m.node);
        let mut fill =
            if m.node { PortFill::new_busy(limits, self.last_now) } else { PortFill::new(limits, self.last_now) };
        fill.in_fill = m.in_fill;
        let loaded = self.take_preloaded(id, m.mode, node_ip, vxlan_port)?;
        if m.mode == Mode::Uplink {
            // The control thread keeps this map current from now on; the predecessor's
            // program redirects by its own map (as the predecessor left it) until replaced.
            let map = loaded.frontends()?;
            map.set(frontends)?;
            self.adopted_frontends = Some(map);
        }
        // An attach costs ~12 ms here (a grace period in the kernel), 1.3 s for 110 pods: not
        // for the forwarding gap, nor for the worker, since the predecessor's program
        // redirects to this very socket meanwhile. A helper thread replaces them, the uplink's
        // first (`start_replacing`).
        let socket = xsk.dup_fd().map_err(|e| e.to_string())?;
        self.replace_later.push((id, loaded, xsk.ifindex, socket));
        let prog = PortProgram::Replacing(m.mode);
        if m.host {
            self.host = Some(id);
        }
        self.install(id, xsk, prog, fill, m.node)
    }

    /// Starts the helper thread that attaches the programs `adopt_port` left to replace.
    fn start_replacing(&mut self) {
        let jobs = std::mem::take(&mut self.replace_later);
        if jobs.is_empty() {
            return;
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        self.replacements_left = jobs.len();
        self.replacing = Some(rx);
        let attach = self.cfg.attach;
        let spawned = std::thread::Builder::new().name("vxnat-attach".into()).spawn(move || {
            for (id, loaded, ifindex, socket) in jobs {
                let r = XdpProgram::attach(loaded, ifindex, attach, (0, std::os::fd::AsRawFd::as_raw_fd(&socket)), &[]);
                if tx.send((id, r)).is_err() {
                    break;
                }
            }
        });
        if spawned.is_err() {
            // No thread: the predecessor's programs stay, and forward.
            self.replacing = None;
            self.replacements_left = 0;
            for p in self.ports.iter_mut().flatten() {
                if let PortProgram::Replacing(m) = p.prog {
                    p.prog = PortProgram::Predecessors(m, "no thread to replace it".into());
                    self.io.programs_not_replaced += 1;
                }
            }
        }
    }

    /// Unbinds a port and takes back every chunk its rings held. Frames still in its rx ring
    /// are discarded (counted); completions are reclaimed; then the socket is deleted (the
    /// kernel waits for in-flight receives, and copy mode has copied whatever it transmits),
    /// so the chunks recorded as this port's in `owner` are free again.
    pub fn remove_port(&mut self, id: PortId) -> bool {
        self.settle_replacements();
        let i = usize::from(id.0);
        let Some(Some(_)) = self.ports.get(i) else { return false };
        self.reclaim(i);
        self.discard_rx(i);
        let Some(p) = self.ports[i].take() else { return false };
        let expected = p.fill.in_fill + p.xsk.in_tx;
        self.min_sum -= u64::from(p.fill.limits.min);
        drop(p);
        self.rebuild_pollfds();
        self.reclaim_owned(id.0, expected);
        true
    }

    /// Returns to the pool every chunk last posted to port `port`'s rings, once its socket is
    /// gone; `expected` is how many that should be (a shortfall is counted as lost).
    fn reclaim_owned(&mut self, port: u16, expected: u32) {
        // Chunks in the pool may carry a stale owner: mark them first.
        let mut in_pool = vec![false; self.owner.len()];
        for &c in &self.pool {
            if let Some(slot) = in_pool.get_mut((c / u64::from(FRAME_SIZE)) as usize) {
                *slot = true;
            }
        }
        let mut found = 0u32;
        for (k, o) in self.owner.iter_mut().enumerate() {
            if *o == port && !in_pool[k] {
                *o = NO_OWNER;
                self.pool.push(k as u64 * u64::from(FRAME_SIZE));
                found += 1;
            }
        }
        self.io.reclaimed_at_detach += u64::from(found);
        self.lost_with_sockets += expected.saturating_sub(found);
    }

    /// Drops what is still in port `i`'s rx ring (its socket is about to go).
    fn discard_rx(&mut self, i: usize) {
        let Some(Some(p)) = self.ports.get_mut(i) else { return };
        loop {
            let mut idx = 0u32;
            // SAFETY: rx is this port's live rx ring.
            let n = unsafe { sys::xsk_ring_cons__peek(&mut *p.xsk.rx, RX_DESCS as u32, &mut idx) };
            if n == 0 {
                break;
            }
            for k in 0..n {
                // SAFETY: idx+k < idx+n are entries the peek handed us.
                let d = unsafe { *sys::xsk_ring_cons__rx_desc(&*p.xsk.rx, idx + k) };
                if self.umem.valid_desc(d.addr, 0) {
                    self.pool.push(Umem::chunk_of(d.addr));
                }
                if d.options & XDP_PKT_CONTD == 0 {
                    self.io.discarded_at_detach += 1;
                }
            }
            // SAFETY: releasing exactly what we peeked.
            unsafe { sys::xsk_ring_cons__release(&mut *p.xsk.rx, n) };
            p.fill.in_fill = p.fill.in_fill.saturating_sub(n);
        }
    }

    fn rebuild_pollfds(&mut self) {
        self.pollfds = self
            .ports
            .iter()
            .flatten()
            .map(|p| libc::pollfd { fd: p.xsk.fd(), events: libc::POLLIN, revents: 0 })
            .collect();
    }

    /// Chunks missing below the guaranteed minimums of all bound ports.
    fn total_deficit(&self) -> u32 {
        self.ports.iter().flatten().map(|p| p.fill.deficit()).sum()
    }

    /// Port `id`'s fill state and kernel counters.
    pub fn port_report(&self, id: PortId) -> Option<PortReport> {
        let p = self.ports.get(usize::from(id.0))?.as_ref()?;
        Some(PortReport { fill: p.fill, socket: p.xsk.kernel_stats().ok() })
    }

    /// How many ports are bound.
    pub fn port_count(&self) -> usize {
        self.ports.iter().flatten().count()
    }

    /// Where every chunk is (call between polls).
    pub fn account(&self) -> FrameAccount {
        let mut a = FrameAccount {
            total: self.umem.frame_count() - self.lost_with_sockets,
            free: self.pool.len() as u32,
            ..Default::default()
        };
        for p in self.ports.iter().flatten() {
            a.in_fill += p.fill.in_fill;
            a.in_tx += p.xsk.in_tx;
        }
        a
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    /// The worker's pipeline state (flows, SNAT allocator), for reports.
    pub fn state(&self) -> &WorkerState {
        &self.state
    }

    /// The pipeline state, to start or stop a capture or trace between polls.
    pub fn state_mut(&mut self) -> &mut WorkerState {
        &mut self.state
    }

    /// Leaves every port's XDP program attached when the worker is dropped (a restart: the
    /// successor replaces them, `XdpProgram::leave_attached`).
    pub fn leave_attached(&mut self) {
        self.settle_replacements();
        for p in self.ports.iter_mut().flatten() {
            if let PortProgram::Own(prog) = &mut p.prog {
                prog.leave_attached();
            }
        }
    }

    /// Takes the programs the helper thread attached in place of a predecessor's (`adopt`)
    /// onto their ports; with `wait`, until every one has come.
    fn collect_replacements(&mut self, wait: bool) {
        let Some(rx) = &self.replacing else { return };
        while self.replacements_left > 0 {
            let next = if wait { rx.recv().ok() } else { rx.try_recv().ok() };
            let Some((id, r)) = next else { break };
            self.replacements_left -= 1;
            if let Some(Some(p)) = self.ports.get_mut(usize::from(id.0)) {
                let mode = p.prog.mode();
                p.prog = match r {
                    Ok(prog) => {
                        if mode == Mode::Uplink {
                            // Its own map now: the second handle on it is not needed.
                            self.adopted_frontends = None;
                        }
                        PortProgram::Own(prog)
                    }
                    Err(e) => {
                        self.io.programs_not_replaced += 1;
                        PortProgram::Predecessors(mode, e)
                    }
                };
            }
        }
        if self.replacements_left == 0 || wait {
            // All in, or the helper is gone (a closed channel): none is coming.
            self.replacing = None;
            self.replacements_left = 0;
        }
    }

    /// Waits for every pending program replacement: before a port is bound or removed (a
    /// late replacement must not land on a port bound since), and before a stop.
    fn settle_replacements(&mut self) {
        if self.replacements_left > 0 {
            self.collect_replacements(true);
        }
    }

    /// Closes every port's socket now (programs left attached if `leave_attached` was called),
    /// the UMEM staying mapped until the worker is dropped: a stopping worker frees the queues
    /// for its successor first.
    pub fn close_ports(&mut self) {
        // Releasing a bound socket waits for an RCU grace period (~15 ms here): one after the
        // other, 1.7 s at 110 pods, and a successor's binds wait on each. Second descriptors
        // keep the sockets through libxdp's teardown (not thread-safe: one at a time, and
        // quick while they are held); closing those on several threads at once lets the
        // grace periods overlap. Returns once every socket is released.
        let held: Vec<std::os::fd::OwnedFd> = self.ports.iter().flatten().filter_map(|p| p.xsk.dup_fd().ok()).collect();
        for p in &mut self.ports {
            drop(p.take());
        }
        self.pollfds.clear();
        close_together(held);
    }

    /// The UMEM alone, every port closed first (to free it on another thread: `Worker` is not
    /// `Send`, the UMEM is).
    pub fn into_umem(mut self) -> crate::umem::Umem {
        self.close_ports();
        self.umem
    }

    /// XDP exit counters of the program on port `id`.
    pub fn xdp_exits(&self, id: PortId) -> Option<Result<[u64; 4], String>> {
        self.ports.get(usize::from(id.0))?.as_ref().map(|p| match &p.prog {
            PortProgram::Own(prog) => prog.exits(),
            PortProgram::Replacing(_) => Err("the predecessor's program is being replaced".into()),
            PortProgram::Predecessors(_, why) => Err(format!("the predecessor's program stays ({why})")),
        })
    }

    /// A handle on the frontends map of the XDP program on port `id` (the uplink), for the
    /// control thread to write.
    pub fn frontends(&self, id: PortId) -> Result<crate::bpf::FrontendsMap, String> {
        match self.ports.get(usize::from(id.0)) {
            Some(Some(WorkerPort { prog: PortProgram::Own(prog), .. })) => prog.frontends(),
            Some(Some(WorkerPort { prog: PortProgram::Replacing(Mode::Uplink), .. })) => {
                self.adopted_frontends.as_ref().ok_or_else(|| format!("port {id}: no frontends map"))?.try_clone()
            }
            Some(Some(_)) => Err(format!("port {id}: its program is not this worker's")),
            _ => Err(format!("port {id} not bound")),
        }
    }

    /// One pass over every port. Returns the frames received.
    pub fn poll(&mut self, tables: &Tables, now: Nanos) -> usize {
        self.last_now = now;
        if self.replacements_left > 0 {
            self.collect_replacements(false);
        }
        let mut received = 0;
        // What every port lacks below its minimum, kept current through the pass: chunks
        // beyond a port's minimum are granted only out of what covers all of these.
        let mut deficit = self.total_deficit();
        // The transmit allowance: what the tx rings do not already hold (nothing is staged
        // between passes).
        let queued: u32 = self.ports.iter().flatten().map(|p| p.xsk.in_tx).sum();
        self.tx.left = self.tx.total.saturating_sub(queued);
        let ports = self.ports.len();
        self.first_port = if self.first_port + 1 < ports { self.first_port + 1 } else { 0 };
        for j in 0..ports {
            let i = if self.first_port + j < ports { self.first_port + j } else { self.first_port + j - ports };
            let Some(p) = &self.ports[i] else { continue };
            let before = p.fill.deficit();
            // Up to RX_BATCHES_PER_PASS batches per port before moving on: enough to keep up
            // with bursts, bounded so one busy port cannot starve the others.
            for _ in 0..RX_BATCHES_PER_PASS {
                self.reclaim(i);
                self.refill(i, deficit);
                let n = self.rx(i, tables, now);
                if let Some(Some(p)) = self.ports.get_mut(i) {
                    let left = if n > 0 { p.xsk.fill_unconsumed() } else { p.fill.in_fill };
                    p.fill.on_rx(n as u32, left, now);
                }
                received += n;
                if n < BATCH {
                    break;
                }
            }
            let after = self.ports[i].as_ref().map_or(0, |p| p.fill.deficit());
            deficit = deficit - before.min(deficit) + after;
            if self.tx.pressure {
                // An egress is using most of its share: send now rather than at the end of
                // the pass, so the ports served after this one find room.
                self.tx.pressure = false;
                self.flush_tx();
            }
        }
        self.flush_tx();
        // Busy passes look at a few flow slots each; idle ones a larger share, but at most every
        // IDLE_SWEEP_EVERY_NS, so an idle worker's quick passes (and its wake-ups) stay cheap.
        if received > 0 {
            dataplane::pipeline::maintain(tables, &mut self.state, now, MAINTAIN_SLOTS);
        } else if now.saturating_sub(self.last_idle_sweep) >= IDLE_SWEEP_EVERY_NS {
            self.last_idle_sweep = now;
            dataplane::pipeline::maintain(tables, &mut self.state, now, MAINTAIN_SLOTS_IDLE);
        }
        received
    }

    /// Waits up to `timeout_ms` for any port to have frames (the idle half of adaptive poll):
    /// every bound port's socket is watched, however many there are.
    pub fn wait(&mut self, timeout_ms: i32) {
        // SAFETY: pollfds is a live, initialised array of `len` entries.
        unsafe { libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as libc::nfds_t, timeout_ms) };
    }

    fn reclaim(&mut self, i: usize) {
        let Some(Some(p)) = self.ports.get_mut(i) else { return };
        if p.xsk.in_tx == 0 {
            // Nothing posted for transmit: the completion ring is empty, skip touching it.
            return;
        }
        take_completions(&mut p.xsk, &mut self.pool, &mut self.tx);
        if p.xsk.in_tx > 0 && p.xsk.tx_unsent() > 0 {
            // Copy mode transmits from sendto, 32 frames at a time: keep kicking.
            p.xsk.kick_tx();
        }
    }

    /// Tops port `i`'s fill ring up as the budget allows (`deficit`: what all ports lack
    /// below their minimums).
    fn refill(&mut self, i: usize, deficit: u32) {
        let Some(Some(p)) = self.ports.get_mut(i) else { return };
        let reserve = self.cfg.fill.reserve;
        stock(&mut p.xsk, &mut p.fill, &mut self.pool, &mut self.owner, i as u16, deficit, reserve, &mut self.io);
    }

    fn rx(&mut self, i: usize, tables: &Tables, now: Nanos) -> usize {
        let Some(Some(p)) = self.ports.get_mut(i) else { return 0 };
        let mut idx = 0u32;
        // SAFETY: rx is this port's live rx ring.
        let n = unsafe { sys::xsk_ring_cons__peek(&mut *p.xsk.rx, RX_DESCS as u32, &mut idx) } as usize;
        if n == 0 {
            return 0;
        }
        let mut descs = [(0u64, 0u32, 0u32); RX_DESCS];
        for (k, d) in descs.iter_mut().enumerate().take(n) {
            // SAFETY: idx+k < idx+n are entries the peek handed us.
            let raw = unsafe { *sys::xsk_ring_cons__rx_desc(&*p.xsk.rx, idx + k as u32) };
            *d = (raw.addr, raw.len, raw.options);
        }
        // Only whole frames: a chain cut by the end of the peek stays in the ring for the next
        // call (a frame is at most 17 descriptors, the peek up to 64).
        // At most BATCH frames per call: the end of the BATCH-th complete frame, or of the last.
        let mut whole = 0;
        let mut frames_seen = 0;
        for (k, d) in descs[..n].iter().enumerate() {
            if d.2 & XDP_PKT_CONTD == 0 {
                whole = k + 1;
                frames_seen += 1;
                if frames_seen == BATCH {
                    break;
                }
            }
        }
        if whole == 0 {
            if n == RX_DESCS {
                // A chain longer than the peek can hold: impossible for a 64 KiB frame; drop
                // the descriptors rather than stall the ring.
                self.io.bad_descriptors += n as u64;
                for d in &descs[..n] {
                    self.pool.push(Umem::chunk_of(d.0));
                }
                // SAFETY: releasing exactly what we peeked.
                unsafe { sys::xsk_ring_cons__release(&mut *p.xsk.rx, n as u32) };
                p.fill.in_fill = p.fill.in_fill.saturating_sub(n as u32);
            } else {
                // SAFETY: releasing nothing: the chain's rest is still to come.
                unsafe { sys::xsk_ring_cons__cancel(&mut *p.xsk.rx, n as u32) };
            }
            return 0;
        }
        // SAFETY: releasing the whole frames we copied the descriptors of; the rest of a cut
        // chain is handed back to be peeked again.
        unsafe {
            sys::xsk_ring_cons__cancel(&mut *p.xsk.rx, (n - whole) as u32);
            sys::xsk_ring_cons__release(&mut *p.xsk.rx, whole as u32);
        }
        p.fill.in_fill = p.fill.in_fill.saturating_sub(whole as u32);

        if self.jumbo.is_empty() {
            self.jumbo = (0..BATCH).map(|_| vec![0u8; JUMBO_HEADROOM + JUMBO_MAX]).collect();
        }
        let mut frames: [FrameBuf<'_>; BATCH] = core::array::from_fn(|_| FrameBuf::empty());
        // The chunk each frame lives in; `JUMBO` for frames copied out of a chain.
        let mut chunks = [0u64; BATCH];
        let mut m = 0;
        let mut jumbo = self.jumbo.iter_mut();
        let mut k = 0;
        while k < whole && m < BATCH {
            let (addr, len, opts) = descs[k];
            if opts & XDP_PKT_CONTD == 0 {
                k += 1;
                if !self.umem.valid_desc(addr, len) {
                    self.io.bad_descriptors += 1;
                    continue;
                }
                let chunk = Umem::chunk_of(addr);
                // SAFETY: the kernel handed this chunk to us through the rx ring; each
                // descriptor names a distinct chunk, so the slices do not alias, and they live
                // only for this batch, before the chunk is queued anywhere again.
                let buf = unsafe { self.umem.chunk_mut(chunk) };
                match FrameBuf::new(buf, (addr - chunk) as usize, len as usize) {
                    Some(f) => {
                        frames[m] = f;
                        chunks[m] = chunk;
                        m += 1;
                    }
                    None => {
                        self.io.bad_descriptors += 1;
                        self.pool.push(chunk);
                    }
                }
                continue;
            }
            // A chain: copy it into one buffer and give its chunks back at once.
            let end = k + descs[k..whole].iter().position(|d| d.2 & XDP_PKT_CONTD == 0).unwrap_or(whole - k - 1) + 1;
            let Some(buf) = jumbo.next() else { break };
            let mut at = JUMBO_HEADROOM;
            let mut ok = true;
            for &(a, l, _) in &descs[k..end] {
                let chunk = Umem::chunk_of(a);
                if ok && self.umem.valid_desc(a, l) && at + l as usize <= buf.len() {
                    // SAFETY: as above; the chunk is read here and returned to the pool after.
                    let src = unsafe { self.umem.chunk_mut(chunk) };
                    let off = (a - chunk) as usize;
                    buf[at..at + l as usize].copy_from_slice(&src[off..off + l as usize]);
                    at += l as usize;
                } else {
                    ok = false;
                }
                if self.umem.valid_desc(a, 0) {
                    self.pool.push(chunk);
                }
            }
            k = end;
            self.io.multi_buffer_frames += 1;
            if !ok {
                self.io.bad_descriptors += 1;
                continue;
            }
            if let Some(f) = FrameBuf::new(buf, JUMBO_HEADROOM, at - JUMBO_HEADROOM) {
                frames[m] = f;
                chunks[m] = JUMBO;
                m += 1;
            }
        }
        let mut out = [Disposition::Drop(DropReason::PortUnknown); BATCH];
        process_batch(tables, &mut self.state, now, PortId(i as u16), &mut frames[..m], &mut out[..m]);
        for k in 0..m {
            let egress = match out[k] {
                Disposition::Forward(port) => Some(port),
                Disposition::ToHost => self.host,
                Disposition::Drop(_) | Disposition::Spilled => None,
            };
            let f = &frames[k];
            // A chain leaves as chunk-sized pieces, each a chunk on the transmit side.
            let pieces = if chunks[k] == JUMBO { f.len().div_ceil(FRAME_SIZE as usize).max(1) as u32 } else { 1 };
            let refused = match egress {
                Some(e) if usize::from(e.0) < self.staged.len() => {
                    (!tx_admit(&self.ports, &self.staged, &mut self.tx, usize::from(e.0), pieces))
                        .then_some((e, DropReason::TxBacklog))
                }
                Some(e) => Some((e, DropReason::EgressPortDown)),
                None => None,
            };
            let Some(e) = egress.filter(|_| refused.is_none()) else {
                if let Some((e, why)) = refused {
                    self.state.counters.port_mut(e).drops[why.index()] += 1;
                }
                if chunks[k] != JUMBO {
                    self.pool.push(chunks[k]);
                }
                continue;
            };
            let staged = &mut self.staged[usize::from(e.0)];
            if chunks[k] != JUMBO {
                staged.push((chunks[k] + f.start() as u64, f.len() as u32, 0));
                continue;
            }
            // A frame that arrived as a chain leaves as one: chunk-sized pieces.
            let data = f.data();
            let pieces = data.len().div_ceil(FRAME_SIZE as usize).max(1);
            if self.pool.len() < pieces {
                self.tx.left += pieces as u32;
                self.state.counters.port_mut(e).drops[DropReason::SpillFull.index()] += 1;
                continue;
            }
            for (j, piece) in data.chunks(FRAME_SIZE as usize).enumerate() {
                let Some(chunk) = self.pool.pop() else { break };
                // SAFETY: a free chunk nothing else references until it is queued below.
                let buf = unsafe { self.umem.chunk_mut(chunk) };
                buf[..piece.len()].copy_from_slice(piece);
                let opts = if j + 1 < pieces { XDP_PKT_CONTD } else { 0 };
                staged.push((chunk, piece.len() as u32, opts));
            }
        }
        if !self.state.spill.is_empty() {
            self.send_spill();
        }
        m
    }

    /// Copies the segments and fragments the pipeline spilled into free chunks and stages them
    /// on their egress ports. No free chunk: counted as `spill_full` on that port.
    #[cold]
    fn send_spill(&mut self) {
        let WorkerState { spill, counters, .. } = &mut self.state;
        for (bytes, port) in spill.packets() {
            let e = usize::from(port.0);
            if e >= self.staged.len() {
                counters.port_mut(port).drops[DropReason::EgressPortDown.index()] += 1;
                continue;
            }
            if bytes.len() > FRAME_SIZE as usize {
                counters.port_mut(port).drops[DropReason::MtuExceeded.index()] += 1;
                continue;
            }
            if !tx_admit(&self.ports, &self.staged, &mut self.tx, e, 1) {
                counters.port_mut(port).drops[DropReason::TxBacklog.index()] += 1;
                continue;
            }
            let Some(chunk) = self.pool.pop() else {
                self.tx.left += 1;
                counters.port_mut(port).drops[DropReason::SpillFull.index()] += 1;
                continue;
            };
            // SAFETY: the chunk came from the free pool, so nothing else references it until
            // it is queued on the tx ring below.
            let buf = unsafe { self.umem.chunk_mut(chunk) };
            buf[..bytes.len()].copy_from_slice(bytes);
            self.staged[e].push((chunk, bytes.len() as u32, 0));
        }
        spill.clear();
    }

    fn flush_tx(&mut self) {
        for e in 0..self.staged.len() {
            if self.staged[e].is_empty() {
                continue;
            }
            if self.ports.get(e).and_then(Option::as_ref).is_some_and(|p| p.bulk.is_some()) {
                self.flush_bulk(e);
                continue;
            }
            let Some(Some(p)) = self.ports.get_mut(e) else {
                let lost = self.staged[e].len() as u64;
                self.state.counters.port_mut(PortId(e as u16)).drops[DropReason::EgressPortDown.index()] += lost;
                for (addr, _, _) in self.staged[e].drain(..) {
                    self.pool.push(Umem::chunk_of(addr));
                }
                continue;
            };
            // Whole frames only: a chain is reserved with all its descriptors or not at all.
            let staged = &self.staged[e];
            // SAFETY: tx is this port's live tx ring.
            let free = unsafe { sys::xsk_prod_nb_free(&mut *p.xsk.tx, staged.len() as u32) } as usize;
            let fits = if free >= staged.len() {
                staged.len()
            } else {
                staged[..free].iter().rposition(|d| d.2 & XDP_PKT_CONTD == 0).map_or(0, |k| k + 1)
            };
            let mut idx = 0u32;
            // SAFETY: tx is this port's live tx ring; `fits` slots are free.
            let got = unsafe { sys::xsk_ring_prod__reserve(&mut *p.xsk.tx, fits as u32, &mut idx) } as usize;
            let pc = self.state.counters.port_mut(PortId(e as u16));
            for (k, &(addr, len, options)) in staged.iter().take(got).enumerate() {
                if let Some(o) = self.owner.get_mut((addr / u64::from(FRAME_SIZE)) as usize) {
                    *o = e as u16;
                }
                // SAFETY: idx+k is a slot we reserved.
                let d = unsafe { &mut *sys::xsk_ring_prod__tx_desc(&mut *p.xsk.tx, idx + k as u32) };
                d.addr = addr;
                d.len = len;
                d.options = options;
                self.io.tx_bytes += u64::from(len);
                pc.tx_bytes += u64::from(len);
                if options & XDP_PKT_CONTD == 0 {
                    self.io.tx_packets += 1;
                    pc.tx_packets += 1;
                }
            }
            // SAFETY: submitting exactly what we reserved and wrote.
            unsafe { sys::xsk_ring_prod__submit(&mut *p.xsk.tx, got as u32) };
            p.xsk.in_tx += got as u32;
            let unsent = p.xsk.tx_unsent();
            p.xsk.push_tx(unsent.div_ceil(TX_PER_KICK));
            // Copy mode completes a frame once the kernel has handed it on: take those back
            // now, so the egress's share is free again for the rest of the pass.
            take_completions(&mut p.xsk, &mut self.pool, &mut self.tx);
            if got < staged.len() {
                let full = staged[got..].iter().filter(|d| d.2 & XDP_PKT_CONTD == 0).count() as u64;
                self.state.counters.port_mut(PortId(e as u16)).drops[DropReason::TxRingFull.index()] += full;
                for &(addr, _, _) in &staged[got..] {
                    self.pool.push(Umem::chunk_of(addr));
                }
            }
            self.staged[e].clear();
        }
    }
}

impl Worker {
    /// Sends what is staged for pod port `e` through its packet socket, merged
    /// ([`crate::bulk`]). The kernel copies what it takes, so every chunk is free again at once.
    fn flush_bulk(&mut self, e: usize) {
        let Some(Some(p)) = self.ports.get_mut(e) else { return };
        let Some(sock) = p.bulk.as_ref() else { return };
        let staged = &self.staged[e];
        let out = self.bulk.flush(sock, staged, &self.umem);
        if out.last_error.is_some() {
            p.bulk_error = out.last_error;
        }
        for &(addr, _, _) in staged {
            self.pool.push(Umem::chunk_of(addr));
        }
        self.tx.left += staged.len() as u32;
        self.io.tx_packets += out.sent_segments;
        self.io.tx_bytes += out.sent_bytes;
        self.io.gro_frames += out.aggregated;
        self.io.gro_segments += out.aggregated_segments;
        let pc = self.state.counters.port_mut(PortId(e as u16));
        pc.tx_packets += out.sent_segments;
        pc.tx_bytes += out.sent_bytes;
        pc.drops[DropReason::TxRefused.index()] += out.refused_segments;
        pc.drops[DropReason::TxRingFull.index()] += out.full_segments;
        self.staged[e].clear();
    }
}

/// Returns to the pool every chunk on `xsk`'s completion ring (a ring read, no syscall).
/// Closes `fds` on up to 16 threads at once, returning when all are closed.
fn close_together(mut fds: Vec<std::os::fd::OwnedFd>) {
    const THREADS: usize = 16;
    let per = fds.len().div_ceil(THREADS).max(1);
    std::thread::scope(|s| {
        while fds.len() > per {
            let part = fds.split_off(fds.len() - per);
            if std::thread::Builder::new().name("vxnat-close".into()).spawn_scoped(s, move || drop(part)).is_err() {
                // No thread: closed here, one after the other, as the rest.
                break;
            }
        }
        drop(fds);
    });
}

fn take_completions(xsk: &mut XskPort, pool: &mut Vec<u64>, tx: &mut TxBudget) {
    loop {
        let mut idx = 0u32;
        // SAFETY: comp is this port's live completion ring.
        let n = unsafe { sys::xsk_ring_cons__peek(&mut *xsk.comp, 64, &mut idx) };
        if n == 0 {
            break;
        }
        for k in 0..n {
            // SAFETY: idx+k < idx+n are entries the peek handed us.
            let addr = unsafe { *sys::xsk_ring_cons__comp_addr(&*xsk.comp, idx + k) };
            pool.push(Umem::chunk_of(addr));
        }
        // SAFETY: releasing exactly what we peeked.
        unsafe { sys::xsk_ring_cons__release(&mut *xsk.comp, n) };
        xsk.in_tx = xsk.in_tx.saturating_sub(n);
        tx.left += n;
    }
}

/// The transmit side's allowance during a poll pass (`FillPlan::tx_limits`).
#[derive(Debug, Clone, Copy)]
struct TxBudget {
    /// Chunks that may still be staged this pass: `total` less what the tx rings hold (set at
    /// the start of each pass; completions add back, staging takes).
    left: u32,
    /// At most this many queued on or staged for all ports together.
    total: u32,
    /// At most this many queued on or staged for any one egress port.
    per_port: u32,
    /// Set when an egress holds over half its share (or half the total is used): flush
    /// before serving the next port.
    pressure: bool,
}

/// Takes `pieces` chunks of the transmit allowance for egress `e` if both its own share and
/// the worker's total have room. Refused frames are dropped as `tx_backlog`: the egress is
/// not draining as fast as frames arrive, and holding more of them would starve fill rings.
#[inline]
fn tx_admit(
    ports: &[Option<WorkerPort>],
    staged: &[Vec<(u64, u32, u32)>],
    tx: &mut TxBudget,
    e: usize,
    pieces: u32,
) -> bool {
    let queued = ports.get(e).and_then(Option::as_ref).map_or(0, |p| p.xsk.in_tx);
    let held = queued + staged.get(e).map_or(0, Vec::len) as u32;
    if pieces > tx.left || held + pieces > tx.per_port {
        tx.pressure = true;
        return false;
    }
    tx.left -= pieces;
    if 2 * (held + pieces) > tx.per_port || tx.left < tx.per_port {
        tx.pressure = true;
    }
    true
}

/// Posts to `xsk`'s fill ring what the budget grants (`deficit`: what all ports lack below
/// their minimums), recording `port` as the owner of each chunk.
#[allow(clippy::too_many_arguments)]
fn stock(
    xsk: &mut XskPort,
    fill: &mut PortFill,
    pool: &mut Vec<u64>,
    owner: &mut [u16],
    port: u16,
    deficit: u32,
    reserve: u32,
    io: &mut IoStats,
) {
    if fill.in_fill >= fill.target {
        return;
    }
    let grant = fill.grant(pool.len() as u32, deficit, reserve).min(256);
    if grant == 0 {
        if fill.deficit() > 0 {
            fill.starved += 1;
            io.fill_starved += 1;
        }
        return;
    }
    let mut idx = 0u32;
    // SAFETY: fill is this socket's live fill ring.
    let got = unsafe { sys::xsk_ring_prod__reserve(&mut *xsk.fill, grant, &mut idx) };
    for k in 0..got {
        let Some(chunk) = pool.pop() else { break };
        if let Some(o) = owner.get_mut((chunk / u64::from(FRAME_SIZE)) as usize) {
            *o = port;
        }
        // SAFETY: idx+k is a slot we reserved.
        unsafe { *sys::xsk_ring_prod__fill_addr(&mut *xsk.fill, idx + k) = chunk };
    }
    // SAFETY: submitting exactly what we reserved and wrote (got <= grant <= pool length).
    unsafe { sys::xsk_ring_prod__submit(&mut *xsk.fill, got) };
    fill.in_fill += got;
    xsk.kick_fill();
}

const _: () = assert!(FRAME_SIZE.is_power_of_two());
