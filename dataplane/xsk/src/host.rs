//! The worker host: one [`Worker`] on its own thread, pinned to its core, reachable only
//! through a command channel whose commands are applied between two polls (attach, detach,
//! new tables, and closures that read or adjust the worker: stats, flows, capture). Nothing
//! the control plane does runs on the data path: the uplink's frontends map is handed to the
//! caller at start ([`WorkerHost::take_frontends`]) and written from the control thread.
//!
//! The loop: apply queued commands, poll every port once, and when idle long enough sleep on
//! the ports' fds (adaptive polling) unless `busy_poll`.

use crate::bpf::{FrontendsMap, Mode};
use crate::worker::{Worker, WorkerConfig};
use crossbeam_channel::{bounded, Receiver, Sender};
use dataplane::tables::{PortId, Tables};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Binds a pod port and swaps in `tables` (which list it) once bound.
    Attach { port: PortId, ifname: String, tables: Arc<Tables>, reply: Sender<Result<(), String>> },
    /// Swaps in `tables` (which no longer list it), then unbinds the port.
    Detach { port: PortId, tables: Arc<Tables>, reply: Sender<Result<(), String>> },
    /// New tables, and when the change they carry was noticed (for the swap latency).
    Tables(Arc<Tables>, Instant),
    /// Runs a closure on the worker thread.
    Run(Job),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Attach { port, ifname, .. } => write!(f, "Attach({port}, {ifname})"),
            Command::Detach { port, .. } => write!(f, "Detach({port})"),
            Command::Tables(t, _) => write!(f, "Tables(generation {})", t.generation),
            Command::Run(_) => f.write_str("Run"),
        }
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
}

impl WorkerHost {
    /// Starts the worker thread, binds the uplink and host port, and returns once they are
    /// bound (or with why they could not be). The thread runs until `stop`.
    pub fn spawn(cfg: HostConfig, tables: Arc<Tables>, stop: Arc<AtomicBool>) -> Result<WorkerHost, String> {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("vxnat-worker-0".into())
            .spawn(move || worker_main(cfg, tables, cmd_rx, stop, ready_tx))
            .map_err(|e| format!("starting the worker: {e}"))?;
        match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(frontends)) => Ok(WorkerHost { commands: cmd_tx, frontends: Some(frontends), thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err("the worker did not start within 20 s".into()),
        }
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

    /// Waits for the worker thread to end (after `stop`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
fn worker_main(
    cfg: HostConfig,
    mut tables: Arc<Tables>,
    commands: Receiver<Command>,
    stop: Arc<AtomicBool>,
    ready: Sender<Result<FrontendsMap, String>>,
) {
    if let Some(c) = cfg.core {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    let (node_ip, vxlan_port) = (cfg.node_ip, cfg.vxlan_port);
    let started = (|| {
        let mut w = Worker::new(0, cfg.worker.clone()).map_err(|e| e.to_string())?;
        w.add_port(UPLINK, &cfg.uplink, Mode::Uplink, node_ip, vxlan_port)
            .map_err(|e| format!("uplink {}: {e}", cfg.uplink))?;
        if let Some(h) = &cfg.host {
            w.add_host_port(HOST, h, node_ip, vxlan_port).map_err(|e| format!("host port {h}: {e}"))?;
        }
        let frontends = w.frontends(UPLINK)?;
        Ok::<_, String>((w, frontends))
    })();
    let mut w = match started {
        Ok((w, frontends)) => {
            let _ = ready.send(Ok(frontends));
            w
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let start = Instant::now();
    let mut idle = 0u32;
    let mut swaps = SwapHistogram::default();
    while !stop.load(Ordering::Relaxed) {
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
                Command::Run(job) => {
                    let view = HostView {
                        generation: tables.generation,
                        now: start.elapsed().as_nanos() as u64,
                        swaps: swaps.clone(),
                    };
                    job(&mut w, &view);
                }
            }
        }
        if w.poll(&tables, start.elapsed().as_nanos() as u64) > 0 {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            // Adaptive: spin while traffic flows, sleep on the ring fds once idle.
            if !cfg.busy_poll && idle > IDLE_PASSES {
                w.wait(IDLE_SLEEP_MS);
            }
        }
    }
}
