//! The poll-mode worker: several ports on one shared UMEM, polled in turn. Per port and
//! iteration: reclaim completed tx chunks, restock the fill ring, take a batch of up to 32
//! received frames, run them through the pipeline, and queue each on its egress port's tx ring
//! (or return it to the pool). Nothing is allocated per packet; the only syscalls are the
//! wakeups the kernel asks for (need_wakeup) and the idle poll.

use super::bpf::{AttachMode, Mode, XdpProgram};
use super::port::{PortConfig, XskPort, XDP_PKT_CONTD};
use super::umem::{FrameAccount, Umem, FRAME_SIZE};
use super::XskError;
use crate::pipeline::{process_batch, Counters, Disposition, DropReason, FrameBuf, Nanos, WorkerState};
use crate::tables::{PortId, Tables};
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
/// Batches taken from one port per pass over the ports.
pub const RX_BATCHES_PER_PASS: usize = 4;

/// Worker sizing.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// UMEM chunks (4 KiB each).
    pub frames: u32,
    /// Ring sizes (fill, completion, rx, tx), a power of two.
    pub ring_size: u32,
    /// At most this many chunks in one port's fill ring, so one port cannot starve the rest.
    pub fill_per_port: u32,
    pub attach: AttachMode,
    /// Connections tracked at most.
    pub flows: usize,
    /// SNAT source ports and how long a tuple is held after its flow ends.
    pub snat_ports: core::ops::RangeInclusive<u16>,
    pub snat_hold_ns: u64,
    pub timeouts: crate::conntrack::Timeouts,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            frames: 16384,
            ring_size: 2048,
            fill_per_port: 2048,
            attach: AttachMode::Native,
            flows: crate::pipeline::DEFAULT_FLOWS,
            snat_ports: crate::nat::snat::DEFAULT_PORTS,
            snat_hold_ns: crate::nat::snat::DEFAULT_HOLD_NS,
            timeouts: crate::conntrack::Timeouts::default(),
        }
    }
}

/// I/O events of the worker that are not per-packet pipeline drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Times a fill ring could not be restocked because the pool was empty (UMEM exhausted).
    pub fill_starved: u64,
    /// Descriptors from the kernel outside the UMEM (never expected; dropped).
    pub bad_descriptors: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames received as descriptor chains (multi-buffer: larger than a chunk).
    pub multi_buffer_frames: u64,
}

struct WorkerPort {
    xsk: XskPort,
    prog: XdpProgram,
}

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
    /// Chunks that were in the rings of removed sockets (the kernel freed them with the
    /// socket; they are no longer in this worker's circulation).
    lost_with_sockets: u64,
    total_reduction: u32,
    /// When the last idle expiry sweep ran (worker clock, ns).
    last_idle_sweep: u64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("account", &self.account()).field("io", &self.io).finish_non_exhaustive()
    }
}

impl Worker {
    pub fn new(id: u16, cfg: WorkerConfig) -> Result<Worker, XskError> {
        let umem = Umem::new(cfg.frames, cfg.ring_size)?;
        let pool: Vec<u64> = umem.chunk_addrs().collect();
        let mut state = WorkerState::with_flows_and_timeouts(id, cfg.flows, cfg.timeouts);
        state.snat =
            crate::nat::snat::SnatAllocator::new(cfg.snat_ports.clone(), cfg.snat_hold_ns, u64::from(id) ^ 0x5eed);
        Ok(Worker {
            ports: Vec::new(),
            umem,
            pool,
            state,
            staged: Vec::new(),
            jumbo: Vec::new(),
            host: None,
            cfg,
            io: IoStats::default(),
            lost_with_sockets: 0,
            total_reduction: 0,
            last_idle_sweep: 0,
        })
    }

    /// Binds `ifname` as port `id`: loads and attaches the XDP program in `mode`, binds an
    /// AF_XDP socket, inserts it into the program's XSKMAP and stocks the fill ring.
    pub fn add_port(
        &mut self,
        id: PortId,
        ifname: &str,
        mode: Mode,
        node_ip: [u8; 4],
        vxlan_port: u16,
    ) -> Result<(), String> {
        let i = usize::from(id.0);
        if self.ports.get(i).is_some_and(Option::is_some) {
            return Err(format!("port {id} already bound"));
        }
        let xsk = XskPort::bind(&mut self.umem, ifname, PortConfig { ring_size: self.cfg.ring_size, copy_mode: true })
            .map_err(|e| e.to_string())?;
        let prog = XdpProgram::attach(xsk.ifindex, mode, node_ip, vxlan_port, self.cfg.attach)?;
        prog.bind_socket(xsk.queue, xsk.fd())?;
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
            self.staged.resize_with(i + 1, || Vec::with_capacity(BATCH * 2));
        }
        self.ports[i] = Some(WorkerPort { xsk, prog });
        self.refill(i);
        Ok(())
    }

    /// Marks `id` as the host port (the destination of `Disposition::ToHost`).
    pub fn set_host_port(&mut self, id: PortId) {
        self.host = Some(id);
    }

    /// Unbinds a port; the chunks in its rings are reclaimed where the kernel gives them back
    /// (completions), the rest are counted as lost with the socket.
    pub fn remove_port(&mut self, id: PortId) -> bool {
        let i = usize::from(id.0);
        let Some(Some(_)) = self.ports.get(i) else { return false };
        self.reclaim(i);
        if let Some(p) = self.ports[i].take() {
            // The kernel frees the rings with the socket: chunks still in them are gone from
            // this UMEM's point of view. Count them so the account stays honest.
            self.lost_with_sockets += u64::from(p.xsk.in_fill + p.xsk.in_tx);
            self.total_reduction += p.xsk.in_fill + p.xsk.in_tx;
        }
        true
    }

    /// Where every chunk is (call between polls).
    pub fn account(&self) -> FrameAccount {
        let mut a = FrameAccount {
            total: self.umem.frame_count() - self.total_reduction,
            free: self.pool.len() as u32,
            ..Default::default()
        };
        for p in self.ports.iter().flatten() {
            a.in_fill += p.xsk.in_fill;
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

    /// XDP exit counters of the program on port `id`.
    pub fn xdp_exits(&self, id: PortId) -> Option<Result<[u64; 4], String>> {
        self.ports.get(usize::from(id.0))?.as_ref().map(|p| p.prog.exits())
    }

    /// Replaces the Service frontends the XDP program on port `id` (the uplink) redirects.
    pub fn set_frontends(&self, id: PortId, list: &[(std::net::Ipv4Addr, u16, u8)]) -> Result<(), String> {
        match self.ports.get(usize::from(id.0)) {
            Some(Some(p)) => p.prog.set_frontends(list),
            _ => Err(format!("port {id} not bound")),
        }
    }

    /// The kernel's counters for the socket on port `id`.
    pub fn socket_stats(&self, id: PortId) -> Option<super::port::SocketStats> {
        self.ports.get(usize::from(id.0))?.as_ref().and_then(|p| p.xsk.kernel_stats().ok())
    }

    /// The rx fds, for an idle poll(2).
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.ports.iter().flatten().map(|p| p.xsk.fd())
    }

    /// One pass over every port. Returns the frames received.
    pub fn poll(&mut self, tables: &Tables, now: Nanos) -> usize {
        let mut received = 0;
        for i in 0..self.ports.len() {
            if self.ports[i].is_none() {
                continue;
            }
            // Up to RX_BATCHES_PER_PASS batches per port before moving on: enough to keep up
            // with bursts, bounded so one busy port cannot starve the others.
            for _ in 0..RX_BATCHES_PER_PASS {
                self.reclaim(i);
                self.refill(i);
                let n = self.rx(i, tables, now);
                received += n;
                if n < BATCH {
                    break;
                }
            }
        }
        self.flush_tx();
        // Busy passes look at a few flow slots each; idle ones a larger share, but at most every
        // IDLE_SWEEP_EVERY_NS, so an idle worker's quick passes (and its wake-ups) stay cheap.
        if received > 0 {
            crate::pipeline::maintain(tables, &mut self.state, now, MAINTAIN_SLOTS);
        } else if now.saturating_sub(self.last_idle_sweep) >= IDLE_SWEEP_EVERY_NS {
            self.last_idle_sweep = now;
            crate::pipeline::maintain(tables, &mut self.state, now, MAINTAIN_SLOTS_IDLE);
        }
        received
    }

    /// Waits up to `timeout_ms` for any port to have frames (the idle half of adaptive poll).
    pub fn wait(&self, timeout_ms: i32) {
        let mut fds: [libc::pollfd; 64] = [libc::pollfd { fd: -1, events: 0, revents: 0 }; 64];
        let mut n = 0;
        for fd in self.fds().take(64) {
            fds[n] = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            n += 1;
        }
        // SAFETY: fds[..n] are initialised pollfd entries.
        unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
    }

    fn reclaim(&mut self, i: usize) {
        let Some(Some(p)) = self.ports.get_mut(i) else { return };
        loop {
            let mut idx = 0u32;
            // SAFETY: comp is this port's live completion ring.
            let n = unsafe { sys::xsk_ring_cons__peek(&mut *p.xsk.comp, 64, &mut idx) };
            if n == 0 {
                break;
            }
            for k in 0..n {
                // SAFETY: idx+k < idx+n are entries the peek handed us.
                let addr = unsafe { *sys::xsk_ring_cons__comp_addr(&*p.xsk.comp, idx + k) };
                self.pool.push(Umem::chunk_of(addr));
            }
            // SAFETY: releasing exactly what we peeked.
            unsafe { sys::xsk_ring_cons__release(&mut *p.xsk.comp, n) };
            p.xsk.in_tx = p.xsk.in_tx.saturating_sub(n);
        }
        if p.xsk.in_tx > 0 {
            // Copy mode transmits from sendto, 32 frames at a time: keep kicking.
            p.xsk.kick_tx();
        }
    }

    fn refill(&mut self, i: usize) {
        let Some(Some(p)) = self.ports.get_mut(i) else { return };
        let room = self.cfg.fill_per_port.saturating_sub(p.xsk.in_fill);
        if room == 0 {
            return;
        }
        let want = room.min(self.pool.len() as u32).min(256);
        if want == 0 {
            self.io.fill_starved += 1;
            return;
        }
        let mut idx = 0u32;
        // SAFETY: fill is this port's live fill ring.
        let got = unsafe { sys::xsk_ring_prod__reserve(&mut *p.xsk.fill, want, &mut idx) };
        for k in 0..got {
            let Some(chunk) = self.pool.pop() else { break };
            // SAFETY: idx+k is a slot we reserved.
            unsafe { *sys::xsk_ring_prod__fill_addr(&mut *p.xsk.fill, idx + k) = chunk };
        }
        // SAFETY: submitting exactly what we reserved and wrote (got <= pool length).
        unsafe { sys::xsk_ring_prod__submit(&mut *p.xsk.fill, got) };
        p.xsk.in_fill += got;
        p.xsk.kick_fill();
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
                p.xsk.in_fill = p.xsk.in_fill.saturating_sub(n as u32);
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
        p.xsk.in_fill = p.xsk.in_fill.saturating_sub(whole as u32);

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
            let Some((e, staged)) = egress.and_then(|e| self.staged.get_mut(usize::from(e.0)).map(|s| (e, s))) else {
                if let Some(e) = egress {
                    self.state.counters.port_mut(e).drops[DropReason::EgressPortDown.index()] += 1;
                }
                if chunks[k] != JUMBO {
                    self.pool.push(chunks[k]);
                }
                continue;
            };
            if chunks[k] != JUMBO {
                staged.push((chunks[k] + f.start() as u64, f.len() as u32, 0));
                continue;
            }
            // A frame that arrived as a chain leaves as one: chunk-sized pieces.
            let data = f.data();
            let pieces = data.len().div_ceil(FRAME_SIZE as usize).max(1);
            if self.pool.len() < pieces {
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
            let Some(staged) = self.staged.get_mut(usize::from(port.0)) else {
                counters.port_mut(port).drops[DropReason::EgressPortDown.index()] += 1;
                continue;
            };
            if bytes.len() > FRAME_SIZE as usize {
                counters.port_mut(port).drops[DropReason::MtuExceeded.index()] += 1;
                continue;
            }
            let Some(chunk) = self.pool.pop() else {
                counters.port_mut(port).drops[DropReason::SpillFull.index()] += 1;
                continue;
            };
            // SAFETY: the chunk came from the free pool, so nothing else references it until
            // it is queued on the tx ring below.
            let buf = unsafe { self.umem.chunk_mut(chunk) };
            buf[..bytes.len()].copy_from_slice(bytes);
            staged.push((chunk, bytes.len() as u32, 0));
        }
        spill.clear();
    }

    fn flush_tx(&mut self) {
        for e in 0..self.staged.len() {
            if self.staged[e].is_empty() {
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
            p.xsk.kick_tx();
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

const _: () = assert!(FRAME_SIZE.is_power_of_two());
