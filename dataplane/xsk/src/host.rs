//! The worker host: one [`Worker`] on its own thread, pinned to its core, reachable only
//! through a command channel whose commands are applied between two polls (attach, detach,
//! new tables, and closures that read or adjust the worker: stats, flows, capture). Nothing
//! the control plane does runs on the data path: the uplink's frontends map is handed to the
//! caller at start ([`WorkerHost::take_frontends`]) and written from the control thread.
//!
//! The loop: apply queued commands, poll every port once, and when idle long enough sleep on
//! the ports' fds (adaptive polling) unless `busy_poll`.
//!
//! Supervision: each pass stores its clock in the [`Heartbeat`] (one relaxed store per pass, no
//! lock, no syscall beyond the clock read the pass makes anyway), so health checks on other
//! threads see a stalled worker; [`WorkerHost::exited`] tells the control thread the worker
//! thread has ended (a panic included) and why. Attach and detach carry a [`Claim`], so one
//! whose sender stopped waiting never takes effect later.

use crate::bpf::{FrontendsMap, Mode};
use crate::flowfile::{FlowFile, LoadError};
use crate::worker::{Worker, WorkerConfig};
use crossbeam_channel::{bounded, Receiver, Sender};
use dataplane::tables::{PortId, Tables};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Empty passes before an adaptive worker sleeps on the ports' fds.
const IDLE_PASSES: u32 = 256;
/// How long one idle sleep lasts at most (a frame on any port wakes it at once).
const IDLE_SLEEP_MS: i32 = 5;

/// What a closure run on the worker thread sees besides the worker.
#[derive(Debug, Clone)]
pub struct HostView {
    /// Generation of the tables in use.
    pub generation: u64,
    /// The worker's clock: nanoseconds since the host started (the pipeline's `now`).
    pub now: u64,
    /// Time from a change being noticed to the worker using the tables that carry it.
    pub swaps: SwapHistogram,
}

/// A closure run on the worker thread between two polls.
pub type Job = Box<dyn FnOnce(&mut Worker, &HostView) + Send>;

/// Commands to the worker, applied between polls in the order sent.
pub enum Command {
    /// Binds a pod port and swaps in `tables` (which list it) once bound; nothing at all if
    /// the sender abandoned `claim` first.
    Attach { port: PortId, ifname: String, tables: Arc<Tables>, claim: Arc<Claim>, reply: Sender<Result<(), String>> },
    /// Swaps in `tables` (which no longer list it), then unbinds the port; nothing at all if
    /// the sender abandoned `claim` first.
    Detach { port: PortId, tables: Arc<Tables>, claim: Arc<Claim>, reply: Sender<Result<(), String>> },
    /// New tables, and when the change they carry was noticed (for the swap latency).
    Tables(Arc<Tables>, Instant),
    /// Runs a closure on the worker thread.
    Run(Job),
    /// Ends the worker after handing its datapath over (`Worker::hand_off`): its sockets and
    /// UMEM go to `reply`, for a successor process, and its programs stay attached.
    HandOff(Sender<Result<crate::handoff::Handoff, String>>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Attach { port, ifname, .. } => write!(f, "Attach({port}, {ifname})"),
            Command::Detach { port, .. } => write!(f, "Detach({port})"),
            Command::Tables(t, _) => write!(f, "Tables(generation {})", t.generation),
            Command::Run(_) => f.write_str("Run"),
            Command::HandOff(_) => f.write_str("HandOff"),
        }
    }
}

/// Settles a request between its sender, who may stop waiting for the answer, and the worker,
/// who may reach it late (stalled, or busy with a long job): whichever comes first wins. The
/// worker takes the claim before acting; a sender that timed out abandons it. So a request the
/// sender gave up on (and reported as failed) never takes effect afterwards, and a sender whose
/// abandon fails knows the worker is acting on it and that its answer is coming.
#[derive(Debug, Default)]
pub struct Claim(AtomicU8);

impl Claim {
    const PENDING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    /// The worker: true if it may act (the sender has not given up).
    pub fn take(&self) -> bool {
        self.0.compare_exchange(Self::PENDING, Self::TAKEN, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The sender: true if the worker will never act on the request; false if it already is.
    pub fn abandon(&self) -> bool {
        self.0.compare_exchange(Self::PENDING, Self::ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// The worker's pulse: the clock of its last pass, and whether its thread still runs. Written
/// by the worker once per pass (a relaxed store), read by health checks on any thread.
#[derive(Debug)]
pub struct Heartbeat {
    /// The worker's clock starts here (the pipeline's `now` is nanoseconds since `epoch`).
    epoch: Instant,
    /// `epoch` on CLOCK_MONOTONIC, which other processes share (the flow file's times).
    origin: u64,
    /// `now` at the start of the last pass.
    last_ns: AtomicU64,
    /// Set when the loop starts, cleared when the thread ends (however it ends).
    running: AtomicBool,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        // Instant is CLOCK_MONOTONIC on Linux: the two readings are the same clock, ns apart.
        let (epoch, origin) = (Instant::now(), crate::flowfile::monotonic_ns());
        Heartbeat { epoch, origin, last_ns: AtomicU64::new(0), running: AtomicBool::new(false) }
    }

    /// How long ago the worker last started a pass (since the host started, if never).
    pub fn age(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.last_ns.load(Ordering::Relaxed)))
    }

    /// Whether the worker thread is in its loop (false before it starts and after it ends).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    fn beat(&self, now_ns: u64) {
        self.last_ns.store(now_ns, Ordering::Relaxed);
    }
}

/// Clears `running` when the worker thread leaves its loop, a panic included.
struct Running<'a>(&'a Heartbeat);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Relaxed);
    }
}

/// Histogram of table swap latencies: cumulative counts for the bounds in `SWAP_BUCKETS_S`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwapHistogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

/// Upper bounds (seconds) of the swap latency buckets.
pub const SWAP_BUCKETS_S: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

impl SwapHistogram {
    pub fn observe(&mut self, d: Duration) {
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

/// Where the worker runs and what it binds at start.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub worker: WorkerConfig,
    /// The core to pin the worker thread to.
    pub core: Option<usize>,
    /// The uplink (port `UPLINK`) and, if any, the host port's vxnat end (port `HOST`).
    pub uplink: String,
    pub host: Option<String>,
    pub node_ip: [u8; 4],
    pub vxlan_port: u16,
    /// Spin even when idle.
    pub busy_poll: bool,
    /// Where the flows live across restarts (`crate::flowfile`): read at start, then kept
    /// current. `None`: flows die with the process.
    pub flow_file: Option<std::path::PathBuf>,
    /// Pod ports to bind at start, with the uplink and host port (the pods a restart brings
    /// back; `tables` lists them): (port, interface).
    pub pods: Vec<(PortId, String)>,
}

/// Runs on the worker thread once the UMEM is ready and before any port is bound (a
/// successor's takeover: the predecessor releases its sockets, flows and lock here, and
/// hands its datapath over when it can). An error ends the start.
pub type Gate = Box<dyn FnOnce() -> Result<Option<crate::handoff::Handoff>, String> + Send>;

/// What the worker thread reports once its start is over.
type Started = Result<(FrontendsMap, Option<Carried>, Vec<Result<(), String>>, Option<TakenOver>), String>;

/// How a takeover's handoff went (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakenOver {
    /// The predecessor's sockets taken over (port numbers); the rest were bound afresh.
    Sockets(Vec<PortId>),
    /// Why the handoff was not used (everything bound afresh).
    Refused(String),
    /// The predecessor handed over no sockets (an older vxnat, or its worker had stopped).
    Nothing,
}

/// What the worker carried over from the flow file an earlier process left (for the log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// Flows tracked again, with their NAT state and SNAT tuples.
    pub flows: usize,
    /// SNAT tuples held again for flows that had already left the table (retired).
    pub held: usize,
    /// Intact records not tracked again (the table is smaller now, or a duplicate key).
    pub refused: usize,
    /// Records torn by a crash or damaged, skipped.
    pub corrupt: usize,
    /// Why nothing was read, or why the flows are not being kept from now on (the file could
    /// not be written): the flows then die with this process.
    pub problems: Vec<String>,
}

/// The uplink's port number.
pub const UPLINK: PortId = PortId(0);
/// The host port's number.
pub const HOST: PortId = PortId(1);
/// The first pod port's number.
pub const FIRST_POD: u16 = 2;

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerHost {
    commands: Sender<Command>,
    frontends: Option<FrontendsMap>,
    thread: Option<std::thread::JoinHandle<()>>,
    heartbeat: Arc<Heartbeat>,
    stop: Arc<AtomicBool>,
    carried: Option<Carried>,
    pods: Vec<Result<(), String>>,
    taken_over: Option<TakenOver>,
}

impl WorkerHost {
    /// Starts the worker thread, which maps the UMEM, passes `gate`, binds the uplink, the host
    /// port and `cfg.pods`, and carries the flows over; returns once that is done (or with why
    /// the uplink or host port could not be bound). The thread runs until `stop`.
    pub fn spawn(
        cfg: HostConfig,
        tables: Arc<Tables>,
        stop: Arc<AtomicBool>,
        gate: Option<Gate>,
        umem: Option<crate::umem::PreparedUmem>,
    ) -> Result<WorkerHost, String> {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let heartbeat = Arc::new(Heartbeat::new());
        let (hb, worker_stop) = (heartbeat.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vxnat-worker-0".into())
            .spawn(move || worker_main(cfg, tables, gate, umem, cmd_rx, worker_stop, ready_tx, &hb))
            .map_err(|e| format!("starting the worker: {e}"))?;
        match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok((frontends, carried, pods, taken_over))) => Ok(WorkerHost {
                commands: cmd_tx,
                frontends: Some(frontends),
                thread: Some(thread),
                heartbeat,
                stop,
                carried,
                pods,
                taken_over,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err("the worker did not start within 20 s".into()),
        }
    }

    /// What was carried over from a predecessor's flow file (`None` without a flow file).
    pub fn carried(&self) -> Option<&Carried> {
        self.carried.as_ref()
    }

    /// How taking over a predecessor's datapath went (`None` without a predecessor).
    pub fn taken_over(&self) -> Option<&TakenOver> {
        self.taken_over.as_ref()
    }

    /// Hands the datapath over and ends the worker thread (`Command::HandOff`); join it next.
    pub fn hand_off(&self, timeout: Duration) -> Result<crate::handoff::Handoff, String> {
        let (tx, rx) = bounded(1);
        self.commands.send(Command::HandOff(tx)).map_err(|_| "worker stopped".to_string())?;
        rx.recv_timeout(timeout).map_err(|_| "the worker did not hand over".to_string())?
    }

    /// How binding each of `HostConfig::pods` went, in order.
    pub fn pods(&self) -> &[Result<(), String>] {
        &self.pods
    }

    /// The channel to the worker.
    pub fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    /// The uplink program's frontends map, for the control thread to write (once: it moves
    /// to its owner).
    pub fn take_frontends(&mut self) -> Option<FrontendsMap> {
        self.frontends.take()
    }

    /// The worker's heartbeat, for health checks.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Why the worker thread ended before `stop` was set (its panic message, or that it
    /// returned), once it has; `None` while it runs or when it was asked to stop. Cheap: the
    /// control loop asks on every turn.
    pub fn exited(&mut self) -> Option<String> {
        if self.stop.load(Ordering::Relaxed) || !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return None;
        }
        let t = self.thread.take()?;
        Some(match t.join() {
            Ok(()) => "the worker thread returned".to_string(),
            Err(payload) => format!("the worker thread panicked: {}", panic_message(payload.as_ref())),
        })
    }

    /// Waits for the worker thread to end (after `stop`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The message a panic carried (`panic!` with a literal or a format string), else a placeholder.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Runs `job` on the worker thread and waits up to `timeout` for its answer.
pub fn ask<R: Send + 'static>(
    commands: &Sender<Command>,
    timeout: Duration,
    job: impl FnOnce(&mut Worker, &HostView) -> R + Send + 'static,
) -> Result<R, String> {
    let (tx, rx) = bounded(1);
    commands
        .send(Command::Run(Box::new(move |w, v| {
            let _ = tx.send(job(w, v));
        })))
        .map_err(|_| "worker stopped".to_string())?;
    rx.recv_timeout(timeout).map_err(|_| "worker did not answer".to_string())
}

/// The worker thread's body: bind the uplink and host port, then poll until `stop`.
#[allow(clippy::too_many_arguments)]
fn worker_main(
    cfg: HostConfig,
    mut tables: Arc<Tables>,
    gate: Option<Gate>,
    umem: Option<crate::umem::PreparedUmem>,
    commands: Receiver<Command>,
    stop: Arc<AtomicBool>,
    ready: Sender<Started>,
    heartbeat: &Heartbeat,
) {
    if let Some(c) = cfg.core {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    let (node_ip, vxlan_port) = (cfg.node_ip, cfg.vxlan_port);
    let started = (|| {
        let mut w = match umem {
            Some(u) => Worker::with_umem(
                0,
                cfg.worker.clone(),
                u.take(cfg.worker.frames, cfg.worker.ring_size).map_err(|e| e.to_string())?,
            ),
            None => Worker::new(0, cfg.worker.clone()).map_err(|e| e.to_string())?,
        };
        let uplink_frontends = tables.services().uplink_frontends(tables.node_port_addrs());
        let host = cfg.host.iter().map(|h| (HOST, h.as_str(), Mode::All));
        let pods = cfg.pods.iter().map(|(p, ifname)| (*p, ifname.as_str(), Mode::All));
        let want: Vec<(PortId, &str, Mode)> =
            std::iter::once((UPLINK, cfg.uplink.as_str(), Mode::Uplink)).chain(host).chain(pods).collect();
        let mut adopted = Vec::new();
        let mut taken_over = None;
        let mut prepared = None;
        if let Some(gate) = gate {
            // Everything that does not need the predecessor's sockets, before it lets go.
            for &(port, _, mode) in &want {
                w.preload(port, mode, node_ip, vxlan_port)?;
            }
            if let Some(path) = &cfg.flow_file {
                prepared = Some(FlowFile::prepare(path, w.state().flows.capacity(), heartbeat.origin));
            }
            let g = gate()?;
            taken_over = Some(match g {
                Some(h) => match w.adopt(h, &want, node_ip, vxlan_port, &uplink_frontends) {
                    Ok((ports, fresh)) => {
                        // The UMEM made for a start from nothing: freed off the gap.
                        let area = fresh.unregister();
                        let _ = std::thread::Builder::new().name("vxnat-umem-free".into()).spawn(move || drop(area));
                        adopted = ports.clone();
                        TakenOver::Sockets(ports)
                    }
                    Err(e) => TakenOver::Refused(e),
                },
                None => TakenOver::Nothing,
            });
        }
        let bound = |p: PortId| adopted.contains(&p);
        if !bound(UPLINK) {
            w.add_uplink(UPLINK, &cfg.uplink, node_ip, vxlan_port, &uplink_frontends)
                .map_err(|e| format!("uplink {}: {e}", cfg.uplink))?;
        }
        if let Some(h) = cfg.host.as_ref().filter(|_| !bound(HOST)) {
            w.add_host_port(HOST, h, node_ip, vxlan_port).map_err(|e| format!("host port {h}: {e}"))?;
        }
        let pods: Vec<Result<(), String>> = cfg
            .pods
            .iter()
            .map(
                |(port, ifname)| {
                    if bound(*port) {
                        Ok(())
                    } else {
                        w.add_port(*port, ifname, Mode::All, node_ip, vxlan_port)
                    }
                },
            )
            .collect();
        let frontends = w.frontends(UPLINK)?;
        Ok::<_, String>((w, frontends, pods, taken_over, prepared))
    })();
    let (mut w, mut flow_file) = match started {
        Ok((mut w, frontends, pods, taken_over, prepared)) => {
            let (file, carried) = match &cfg.flow_file {
                Some(path) => {
                    let (file, carried) = carry_flows(path, &mut w, heartbeat, prepared);
                    (file, Some(carried))
                }
                None => (None, None),
            };
            let _ = ready.send(Ok((frontends, carried, pods, taken_over)));
            (w, file)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let start = heartbeat.epoch;
    heartbeat.running.store(true, Ordering::Relaxed);
    let _running = Running(heartbeat);
    let mut idle = 0u32;
    let mut swaps = SwapHistogram::default();
    let mut handing_off = None;
    'passes: while !stop.load(Ordering::Relaxed) {
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                Command::Attach { claim, reply, .. } | Command::Detach { claim, reply, .. } if !claim.take() => {
                    let _ = reply.send(Err("abandoned by its sender before the worker reached it".into()));
                }
                Command::Attach { port, ifname, tables: t, reply, .. } => {
                    let r = w.add_port(port, &ifname, Mode::All, node_ip, vxlan_port);
                    if r.is_ok() {
                        tables = t;
                    }
                    let _ = reply.send(r);
                }
                Command::Detach { port, tables: t, reply, .. } => {
                    tables = t;
                    let r = if w.remove_port(port) { Ok(()) } else { Err(format!("port {} not bound", port.0)) };
                    let _ = reply.send(r);
                }
                Command::Tables(t, noticed) => {
                    tables = t;
                    swaps.observe(noticed.elapsed());
                }
                Command::Run(job) => {
                    let view = HostView {
                        generation: tables.generation,
                        now: start.elapsed().as_nanos() as u64,
                        swaps: swaps.clone(),
                    };
                    job(&mut w, &view);
                }
                Command::HandOff(reply) => {
                    handing_off = Some(reply);
                    break 'passes;
                }
            }
        }
        let now = start.elapsed().as_nanos() as u64;
        heartbeat.beat(now);
        let busy = w.poll(&tables, now) > 0;
        if let Some(f) = flow_file.as_mut() {
            f.write_changes(&mut w.state_mut().flows);
        }
        if busy {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            // Adaptive: spin while traffic flows, sleep on the ring fds once idle.
            if !cfg.busy_poll && idle > IDLE_PASSES {
                w.wait(IDLE_SLEEP_MS);
            }
        }
    }
    if let Some(reply) = handing_off {
        // Between passes: the flow file holds the last one, every chunk is in the pool or a
        // ring. The sockets live on in the handoff's descriptors; this worker's close.
        let r = w.hand_off().map_err(|e| e.to_string());
        let _ = reply.send(r);
        return;
    }
    // Asked to stop (SIGTERM: a restart or an upgrade, as a rollout does it): the programs
    // stay for the successor to replace, and the flow file holds every change up to the last
    // pass. A panic unwinds past this and detaches them (the successor attaches afresh).
    w.leave_attached();
    // The sockets close here, the UMEM's registration with them (the successor binds their
    // queues next); unmapping its memory (tens of ms for ~150 MB) is not for it to wait for.
    let umem = w.into_umem().unregister();
    let _ = std::thread::Builder::new().name("vxnat-umem-free".into()).spawn(move || drop(umem));
}

/// Restores the flows a predecessor left in `path` into the worker and starts a new flow file
/// there holding them (and, from then on, every change).
/// `prepared`: the new file, made before a takeover (`FlowFile::prepare`), or why it could not be.
fn carry_flows(
    path: &std::path::Path,
    w: &mut Worker,
    heartbeat: &Heartbeat,
    prepared: Option<std::io::Result<FlowFile>>,
) -> (Option<FlowFile>, Carried) {
    let mut carried = Carried::default();
    let now = heartbeat.epoch.elapsed().as_nanos() as u64;
    let mut retired = Vec::new();
    match FlowFile::load(path, heartbeat.origin) {
        Ok(loaded) => {
            retired = loaded.retired;
            let r = dataplane::pipeline::restore(w.state_mut(), loaded.flows, retired.iter().cloned(), now);
            (carried.flows, carried.held, carried.refused, carried.corrupt) =
                (r.flows, r.held, r.refused, loaded.corrupt);
        }
        Err(LoadError::Missing) => {}
        Err(e) => carried.problems.push(format!("{}: {e}", path.display())),
    }
    let flows = &mut w.state_mut().flows;
    let c = match prepared {
        Some(p) => p.and_then(|mut f| f.publish(flows).map(|()| f)),
        None => FlowFile::create(path, flows, heartbeat.origin),
    };
    match c {
        Ok(mut f) => {
            // Holds still running go on in the new file, for the restart after this one.
            let flows = &mut w.state_mut().flows;
            for r in retired.iter().rev().filter(|r| r.expires_at > now) {
                flows.retire(r, r.expires_at);
            }
            f.write_changes(flows);
            (Some(f), carried)
        }
        Err(e) => {
            carried.problems.push(format!("{}: {e}; flows will not survive a restart", path.display()));
            (None, carried)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_goes_to_whoever_comes_first() {
        let late_worker = Claim::default();
        assert!(late_worker.abandon(), "the sender gives up before the worker reaches it");
        assert!(!late_worker.take(), "the worker must not act on an abandoned request");
        let busy_worker = Claim::default();
        assert!(busy_worker.take(), "the worker reaches it first");
        assert!(!busy_worker.abandon(), "the sender learns the worker is acting on it");
    }

    #[test]
    fn a_heartbeat_ages_until_the_next_beat() {
        let h = Heartbeat::new();
        std::thread::sleep(Duration::from_millis(20));
        assert!(h.age() >= Duration::from_millis(20), "never beaten: as old as the host");
        h.beat(h.epoch.elapsed().as_nanos() as u64);
        assert!(h.age() < Duration::from_millis(20), "just beaten: {:?}", h.age());
        assert!(!h.running());
    }
}
