//! `vxnat run`: wiring only. Take the single-instance lock, start the cluster source, capture
//! the node facts, take over what a predecessor left (host port, nftables table, XDP programs,
//! replaced in place; its flows, from the flow file), start the worker host, serve ctl,
//! metrics, the health probes and kube-proxy's health servers (`crate::healthcheck`), and run
//! the control loop (cluster updates, ARP watch, underlay refreshes, supervision) until
//! SIGTERM/SIGINT; then stop, leaving the datapath in place for the successor.
//!
//! **Restarts are replacements** (issue 17). kube-proxy and flanneld restart without touching
//! traffic because the kernel keeps their state; vxnat's state is its flows, so they live in a
//! file mapped shared (`xsk::flowfile`), written as they change, and read back by the next
//! process, whether this one stopped on SIGTERM or was killed. Nothing is torn down on the way
//! out: the XDP programs stay attached (a frame meets a program without a socket and goes to
//! the stack until the successor's attach replaces it atomically), the host port keeps its
//! MACs, the nftables table is replaced in one transaction. The gap is the successor's start.
//!
//! **Supervision.** The control loop checks on every turn (at most ~100 ms apart) that the
//! worker thread still runs. If it ended (a panic, or any return) vxnat does not try to carry
//! on or restart it: it logs why, cleans up as on SIGTERM and exits with status 1, so the
//! DaemonSet (or systemd) restarts the whole process, which re-attaches the remembered pods.
//! A worker that panicked may have left its UMEM, rings and flow state half-updated, and a
//! fresh process is the one restart path that is already exercised (kill -9, upgrades);
//! restarting the thread in place would be a second, rarely-run one. This is also why the
//! release profile keeps `panic = "unwind"` rather than `"abort"`: catching the end of the
//! thread gives a clear log line and the usual clean-up, and a panic in a ctl connection
//! thread does not take the node down. A poisoned node lock (a thread panicked holding it)
//! ends the process the same way. A worker that is stuck rather than dead is the liveness
//! probe's job (`/healthz`, from the worker's heartbeat; see `crate::health`). The cluster
//! source is restarted in place instead (`source::Supervised`): it holds no dataplane state.

use crate::compile::{compile, HostPort, NodeFacts};
use crate::config::NodeFile;
use crate::health::{Health, HEARTBEAT_LIMIT};
use crate::healthcheck::{self, HealthChecks};
use crate::model::{Model, Update};
use crate::netinfo;
use crate::node::{install_rules, Cluster, Node};
use crate::pods::{self, Pod};
use crate::source::Supervised;
use crate::state::{derived_vtep_mac, ClusterState, NodeView};
use dataplane::tables::PortId;
use dataplane::wire::Ipv4Cidr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xsk::bpf::{AttachMode, XdpProgram};
use xsk::host::{Command, HostConfig, WorkerHost};
use xsk::worker::{PodTx, WorkerConfig};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (its message names the key).
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The state file, or this node's Node object, is invalid (the message names the object
    /// and the field).
    #[error(transparent)]
    State(#[from] crate::state::Error),
    /// The cluster state (`origin`: the state file or "Kubernetes API") has no Node named as
    /// the config's `node`.
    #[error("{origin}: no Node named {node:?} (node in the config)")]
    NoNode { origin: String, node: String },
    /// The VNI this node's Node announces differs from the config's `vxlan.vni`.
    #[error("Node {node}: backend-data VNI {vni} differs from vxlan.vni {config}")]
    VniMismatch { node: String, vni: u32, config: u32 },
    #[error("cluster_cidr: not a CIDR")]
    ClusterCidr,
    #[error("service_cidr")]
    ServiceCidr,
    /// The Kubernetes API did not list every kind in time.
    #[error("Kubernetes API: no complete list of Nodes, Services and EndpointSlices within {timeout:?}")]
    NoInitialList { timeout: Duration },
    /// Reading the uplink, or creating the host port, failed.
    #[error(transparent)]
    Interface(#[from] netinfo::Error),
    /// The first tables could not be compiled.
    #[error(transparent)]
    Compile(#[from] crate::compile::Error),
    /// vxnat's nftables rules could not be written.
    #[error(transparent)]
    Rules(#[from] crate::node::Error),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("starting the cluster source: {0}")]
    Source(#[source] std::io::Error),
    /// The worker host did not start (xsk's own message, free-form: it reports a `String`).
    #[error("{0}")]
    Worker(String),
    #[error("the worker kept the frontends map")]
    FrontendsKept,
    /// The ctl socket could not be served (ctl's own message, free-form: ctl reports a
    /// `String`, as its wire protocol carries them).
    #[error("{0}")]
    Ctl(String),
    /// Another `vxnat run` with the same ctl socket holds the single-instance lock `path`.
    #[error("{}: locked by another vxnat ({holder}) running with ctl socket {}; refusing to start (stop that one first)", path.display(), socket.display())]
    Locked { path: PathBuf, socket: PathBuf, holder: String },
    /// The single-instance lock file could not be opened or locked.
    #[error("{}: {source}", path.display())]
    Lock { path: PathBuf, source: std::io::Error },
    /// The worker thread ended while the node ran (its panic message, or that it returned).
    #[error("worker died: {0}")]
    WorkerDied(String),
    /// A thread panicked while holding the node's state, which can no longer be trusted.
    #[error("the node's state is poisoned (a thread panicked holding it)")]
    Poisoned,
}

/// Where the single-instance lock of the node whose ctl socket is `socket` lives.
pub fn lock_file(socket: &Path) -> PathBuf {
    let mut p = socket.to_path_buf().into_os_string();
    p.push(".lock");
    p.into()
}

/// Takes `<socket>.lock` (flock(2), exclusive, not waiting) for as long as the returned file
/// is open, i.e. the process lives (the kernel lets go when it exits, however it exits). It is
/// taken before anything else, so a second `vxnat run` with the same socket stops before it
/// could replace the first one's programs or write its flow file (and `vxnat cleanup` refuses
/// while a vxnat runs). The file
/// holds the holder's pid, for the refusal message. It is never removed: a removed lock file
/// would let a third process lock a new file while the second still holds the old one.
pub fn lock_instance(socket: &Path) -> Result<std::fs::File, Error> {
    use std::io::{Read, Seek, Write};
    let path = lock_file(socket);
    let err = |source| Error::Lock { path: path.clone(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
    match f.try_lock() {
        Ok(()) => {
            f.set_len(0).map_err(err)?;
            f.rewind().map_err(err)?;
            writeln!(f, "{}", std::process::id()).map_err(err)?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => "pid unknown".to_string(),
                p => format!("pid {p}"),
            };
            Err(Error::Locked { path, socket: socket.to_path_buf(), holder })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

/// What this node is, from `file` and its Node in the cluster `model`: the facts the tables
/// are compiled from (the host port is filled in once created).
pub fn gather(file: &NodeFile, model: &Model) -> Result<NodeFacts, Error> {
    let source = file.state.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "Kubernetes API".into());
    let me = model
        .nodes
        .get(&file.node)
        .ok_or_else(|| Error::NoNode { origin: source, node: file.node.clone() })
        .and_then(|n| NodeView::from_node(n).map_err(Error::from))?;
    if let Some(vni) = me.vni.filter(|v| *v != file.vxlan.vni) {
        return Err(Error::VniMismatch { node: me.name, vni, config: file.vxlan.vni });
    }
    let nodeport_ips = file.nodeport_ips(me.node_ip, &netinfo::ipv4_addresses()).map_err(Error::Config)?;
    Ok(NodeFacts {
        file: file.clone(),
        nodeport_ips,
        vtep_mac: me.vtep_mac.unwrap_or_else(|| derived_vtep_mac(&me.name)),
        me,
        uplink_mac: netinfo::mac(&file.uplink)?,
        uplink_mtu: netinfo::mtu(&file.uplink)?,
        cluster: file.cluster_cidr.parse().map_err(|_| Error::ClusterCidr)?,
        host: None,
        remotes: Vec::new(),
    })
}

/// The first complete cluster state: the file, or the Kubernetes API's first list of every
/// kind (waited for up to `timeout`).
fn initial_model(
    file: &NodeFile,
    updates: &crossbeam_channel::Receiver<Update>,
    source: &mut Supervised,
    stop: &AtomicBool,
    timeout: Duration,
) -> Result<Model, Error> {
    if let Some(path) = &file.state {
        return Ok(Model::from_state(ClusterState::load(path)?));
    }
    let mut model = Model::default();
    let mut listed = Vec::new();
    let deadline = Instant::now() + timeout;
    while listed.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::Relaxed) {
            return Err(Error::NoInitialList { timeout });
        }
        source.check(stop);
        let Ok(u) = updates.recv_timeout(left.min(Duration::from_millis(100))) else {
            continue;
        };
        if let Update::Relisted(k, _) = &u {
            if !listed.contains(k) {
                listed.push(*k);
            }
        }
        model.apply(u);
    }
    Ok(model)
}

/// Where the worker keeps its flows across restarts (`xsk::flowfile`): beside the ctl socket,
/// on the tmpfs `/run` is.
pub fn flows_file(socket: &Path) -> PathBuf {
    let mut p = socket.to_path_buf().into_os_string();
    p.push(".flows");
    p.into()
}

/// `vxnat cleanup`: removes what vxnat leaves in place when it stops (for its successor) —
/// XDP programs on the uplink and on the pods it had attached, the host port veth, its
/// nftables table, the ctl socket and the flow file — for an uninstall. Refused while a vxnat
/// runs with this socket (its lock). The pods file stays: a later `vxnat run` re-attaches
/// the pods listed there.
pub fn cleanup(file: &NodeFile) -> Result<(), Error> {
    let _lock = lock_instance(&file.socket)?;
    for ifname in
        std::iter::once(&file.uplink).chain(pods::load(&pods::pods_file(&file.socket)).iter().map(|p| &p.ifname))
    {
        if let Ok(i) = netinfo::ifindex(ifname) {
            XdpProgram::detach_any(i);
        }
    }
    netinfo::delete_link(&file.host.ifname);
    netinfo::remove_masquerade();
    let _ = std::fs::remove_file(&file.socket);
    let flows = flows_file(&file.socket);
    for suffix in ["", ".new", ".old"] {
        let mut p = flows.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Creates the host port (the node stack's way into the cluster network, as flannel's cni0).
fn host_port(file: &NodeFile, facts: &NodeFacts) -> Result<HostPort, Error> {
    let gw = facts.me.pod_cidr.first_host();
    // The pods' MTU: what fits the underlay after VXLAN.
    let mtu = facts.uplink_mtu.saturating_sub(50);
    let net = facts.me.pod_cidr.network().address();
    let services = file.service_cidr.parse::<Ipv4Cidr>().map_err(|_| Error::ServiceCidr)?.network().to_string();
    let stack =
        netinfo::create_host_port(&file.host.ifname, gw, net, mtu, &facts.cluster.network().to_string(), &services)?;
    Ok(HostPort {
        ifname: file.host.ifname.clone(),
        mac: netinfo::mac(&file.host.ifname)?,
        stack_mac: netinfo::mac(&stack)?,
        stack_ifname: stack,
    })
}

/// Runs the node until SIGTERM/SIGINT; cleans up on the way out.
pub fn run(file: NodeFile) -> Result<(), Error> {
    // A running predecessor (its lock held) is asked to hand over once this process is ready
    // to bind (`take_over`), unless handovers are off.
    let (lock, predecessor) = match lock_instance(&file.socket) {
        Ok(l) => (Some(l), None),
        Err(Error::Locked { holder, .. }) if file.handover => (None, Some(holder)),
        Err(e) => return Err(e),
    };
    let lock = Arc::new(std::sync::Mutex::new(lock));
    if let Some(holder) = &predecessor {
        tracing::info!("another vxnat ({holder}) runs with this socket: preparing to take over from it");
    }
    let pods_path = pods::pods_file(&file.socket);
    let previous = pods::load(&pods_path);
    // `stop` ends every thread (SIGTERM, SIGINT, a handover); `term` is the signal alone.
    let (stop, term) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(Error::Signal)?;
        signal_hook::flag::register(sig, term.clone()).map_err(Error::Signal)?;
    }
    // The cluster source: the state file, followed for changes, or the Kubernetes API.
    // Supervised: started again (after a backoff) whenever its thread dies.
    let (update_tx, updates) = crossbeam_channel::unbounded();
    let (annotate_tx, annotate_rx) = crossbeam_channel::unbounded();
    let (source_name, spawn_source): (String, crate::source::SpawnSource) = match &file.state {
        Some(path) => {
            let (path, stop, mut restarted) = (path.clone(), stop.clone(), false);
            (
                format!("state file {}", path.display()),
                Box::new(move || {
                    // The first start follows the file initial_model loads; a restart may have
                    // missed a change, so it sends the file at once.
                    let h = crate::source::follow_file(path.clone(), update_tx.clone(), stop.clone(), restarted);
                    restarted = true;
                    h
                }),
            )
        }
        None => {
            let (node, stop) = (file.node.clone(), stop.clone());
            (
                "Kubernetes API".to_string(),
                Box::new(move || {
                    crate::source::KubeSource { config: None, node: node.clone() }.spawn(
                        update_tx.clone(),
                        annotate_rx.clone(),
                        stop.clone(),
                    )
                }),
            )
        }
    };
    let mut source = Supervised::start(&source_name, spawn_source).map_err(Error::Source)?;
    // The UMEM is made meanwhile (the slowest part of a start without a predecessor to take
    // it from; unused, and freed, when one hands its own over).
    let umem = xsk::umem::Umem::prepare(file.umem.frames_for(file.max_pods), WorkerConfig::default().ring_size);
    let mut model = initial_model(&file, &updates, &mut source, &stop, Duration::from_secs(60))?;
    // Services labelled for vxnat by name are its own from the first tables on.
    model.set_proxy_name(file.proxy_name.as_deref());
    let mut facts = gather(&file, &model)?;
    let external_ips = crate::services::ExternalIpPolicy::new(
        facts.cluster,
        file.service_cidr.parse().map_err(|_| {
            Error::Config(crate::config::Error::Cidr { key: "service_cidr", value: file.service_cidr.clone() })
        })?,
        file.nat.external_ip_cidrs().map_err(Error::Config)?,
    );
    let mut cluster = Cluster::new(model, &facts.me.name, file.maglev_table_size, external_ips);
    facts.remotes = cluster.remotes(&facts.me, facts.cluster, &[]);
    // Sent again whenever the Kubernetes source restarts (the one that died may have taken
    // them without publishing them).
    let annotations = file.state.is_none().then(|| {
        crate::source::flannel_annotations(file.vxlan.vni, &facts.vtep_mac.to_string(), &facts.me.node_ip.to_string())
    });
    let annotate = || {
        if let Some(a) = &annotations {
            let _ = annotate_tx.send(a.clone());
        }
    };
    annotate();
    if file.host.enabled {
        facts.host = Some(host_port(&file, &facts)?);
    }
    install_rules(&facts, &cluster)?;
    if file.masquerade && std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!("net.ipv4.ip_forward is 0: pod traffic leaving the cluster will not be forwarded by this node (set it to 1, as flannel nodes have it)");
    }
    // Pods attached before a restart come back if their interface still exists: bound by the
    // worker at its start, with the uplink (the first tables list them).
    let pods: Vec<Pod> = previous.into_iter().filter(|p| netinfo::exists(&p.ifname)).collect();
    let tables = Arc::new(compile(&facts, cluster.services.clone(), &pods, 1)?);
    let cfg = HostConfig {
        worker: WorkerConfig {
            frames: file.umem.frames_for(file.max_pods),
            fill: file.umem.plan(),
            flows: file.nat.max_flows,
            affinity: file.nat.max_affinity_clients,
            snat_ports: file.nat.ports()?,
            snat_hold_ns: file.nat.snat_hold_s.saturating_mul(1_000_000_000),
            vxlan_port: file.vxlan.port,
            timeouts: file.conntrack.timeouts(),
            attach: if file.xdp_mode.as_deref() == Some("generic") { AttachMode::Generic } else { AttachMode::Native },
            pod_tx: if file.pod_tx.as_deref() == Some("packet-gro") { PodTx::PacketGro } else { PodTx::Xsk },
            ..WorkerConfig::default()
        },
        core: file.cores.first().copied(),
        uplink: file.uplink.clone(),
        host: facts.host.as_ref().map(|h| h.ifname.clone()),
        node_ip: facts.me.node_ip.octets(),
        vxlan_port: file.vxlan.port,
        busy_poll: file.busy_poll,
        flow_file: Some(flows_file(&file.socket)),
        pods: pods.iter().map(|p| (PortId(p.port), p.ifname.clone())).collect(),
    };
    // What a predecessor left (XDP programs, the host port, the nftables table, the flow
    // file) is taken over in place, and left in place for the successor: a restart is a
    // replacement, never a teardown (`vxnat cleanup` removes it all for an uninstall).
    let clean_up = || {
        let _ = std::fs::remove_file(&file.socket);
    };
    let shutdown = |why: Error| {
        clean_up();
        why
    };
    let gate = predecessor.map(|holder| -> xsk::host::Gate {
        let (socket, lock) = (file.socket.clone(), lock.clone());
        Box::new(move || take_over(&socket, &holder, &lock))
    });
    let mut worker =
        WorkerHost::spawn(cfg, tables, stop.clone(), gate, Some(umem)).map_err(|e| shutdown(Error::Worker(e)))?;
    // Control (this thread: ctl, refreshes) on a core the worker does not use.
    if let Some(worker_core) = file.cores.first() {
        if let Some(c) = core_affinity::get_core_ids().unwrap_or_default().into_iter().find(|c| c.id != *worker_core) {
            core_affinity::set_for_current(c);
        }
    }
    let frontends = worker.take_frontends().ok_or_else(|| shutdown(Error::FrontendsKept))?;
    match worker.taken_over() {
        Some(xsk::host::TakenOver::Sockets(ports)) => {
            tracing::info!("took over {} sockets from the previous process without unbinding them", ports.len())
        }
        Some(xsk::host::TakenOver::Refused(why)) => {
            tracing::warn!("did not take over the previous process's sockets ({why}); bound afresh")
        }
        Some(xsk::host::TakenOver::Nothing) => {
            tracing::info!("the previous process handed over no sockets; bound afresh")
        }
        None => {}
    }
    if let Some(c) = worker.carried() {
        if c.flows + c.held + c.refused + c.corrupt > 0 {
            tracing::info!(
                "carried over {} flows from the previous process, and {} SNAT tuples still held for flows gone ({} refused: table full or duplicate; {} torn records skipped)",
                c.flows,
                c.held,
                c.refused,
                c.corrupt
            );
        }
        for p in &c.problems {
            tracing::warn!("{p}");
        }
    }
    let health = Arc::new(Health::new(worker.heartbeat(), source.status.clone()));
    let mut node = Node::new(facts, cluster, worker.commands(), frontends);
    node.source = Some(source.status.clone());
    node.arp = match crate::arpwatch::ArpWatch::open(&file.uplink) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!("{e}; ARP conflicts will not be detected");
            None
        }
    };
    let mut bound = Vec::new();
    for (p, r) in pods.into_iter().zip(worker.pods()) {
        match r {
            Ok(()) => {
                tracing::info!("re-attached pod {} on {}", p.ip, p.ifname);
                bound.push(p);
            }
            Err(e) => tracing::warn!("could not re-attach pod {} on {}: {e}", p.ip, p.ifname),
        }
    }
    let failed = bound.len() < worker.pods().len();
    node.adopt(bound);
    if failed {
        // The first tables listed every remembered pod: the worker gets tables without the
        // ones it could not bind.
        node.republish();
    }
    let (handover_tx, handovers) = crossbeam_channel::bounded(1);
    node.handover = Some(handover_tx);
    let node_ip = node.facts.me.node_ip;
    let node = Arc::new(std::sync::Mutex::new(node));
    let server = crate::ctl::serve(&file.socket, node.clone(), stop.clone()).map_err(|e| shutdown(Error::Ctl(e)))?;
    // Metrics (with the probes too), and the probes alone on their own address.
    let mut listeners = Vec::new();
    let mut health_checks = None;
    for (addr, with_metrics) in [(&file.metrics, true), (&file.health, false)] {
        if addr.is_empty() || (!with_metrics && *addr == file.metrics) {
            continue;
        }
        match crate::metrics::serve(addr, with_metrics.then(|| node.clone()), health.clone(), stop.clone()) {
            Ok(h) => listeners.push(h),
            Err(e) if with_metrics => tracing::warn!("{e}; no metrics"),
            Err(e) => tracing::warn!("{e}; no /healthz or /readyz there"),
        }
    }
    // kube-proxy's health servers: a healthCheckNodePort server per Service that needs one,
    // and the proxier's /healthz and /livez. Their own thread; they read the checks the
    // control loop publishes and the health's atomics, never the node or the worker.
    if !file.proxy_health.is_empty() || !file.healthcheck_addresses.is_empty() {
        let ips = file.healthcheck_ips(node_ip).map_err(|e| shutdown(Error::Config(e)))?;
        let checks = Arc::new(HealthChecks::new(ips, file.proxy_health.parse().ok(), health.checks.clone()));
        {
            let n = node.lock().map_err(|_| shutdown(Error::Poisoned))?;
            health.set_node_eligible(healthcheck::node_eligible(n.cluster.model.nodes.get(&file.node)));
            checks.publish(healthcheck::desired(&n.cluster.model, &file.node));
        }
        let h = health.clone();
        match checks.clone().serve(move || h.proxy(), stop.clone()) {
            Ok(t) => listeners.push(t),
            Err(e) => tracing::warn!("health check servers: {e}; no kube-proxy health servers"),
        }
        health_checks = Some(checks);
    }
    // Pod ports whose interface vanishes are detached (rtnetlink link events).
    match crate::linkwatch::spawn(node.clone(), stop.clone()) {
        Ok(h) => listeners.push(h),
        Err(e) => tracing::warn!("{e}; pods whose interface vanishes are detached only at the next attach"),
    }
    health.set_up(true);
    tracing::info!(
        "node {} up: uplink {}, VXLAN {node_ip}:{} VNI {}, ctl {}",
        file.node,
        file.uplink,
        file.vxlan.port,
        file.vxlan.vni,
        file.socket.display()
    );
    let outcome = control_loop(
        &node,
        &updates,
        &handovers,
        &stop,
        &mut worker,
        &mut source,
        &annotate,
        &health,
        health_checks.as_deref(),
    );
    health.set_up(false);
    match &outcome {
        Ok(None) => tracing::info!("stopping; the datapath and the flows stay for the next vxnat"),
        Ok(Some((pid, _))) => tracing::info!("handing over to pid {pid}"),
        Err(e) => tracing::error!("{e}; exiting with status 1, to be restarted"),
    }
    // A successor gets the worker's datapath (sockets, UMEM, where every chunk is): nothing
    // closes or unbinds, and frames wait in the rings for it. Without one, the worker's last
    // pass wrote the flow file; its sockets close with it, its programs stay.
    let handoff = match &outcome {
        Ok(Some((pid, _))) => {
            match worker.hand_off(Duration::from_secs(5)).and_then(|h| h.into_fds().map_err(|e| e.to_string())) {
                Ok(fds) => fds,
                Err(e) => {
                    tracing::warn!("could not hand the datapath to pid {pid} ({e}): it binds afresh");
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    };
    stop.store(true, Ordering::Relaxed);
    worker.join();
    if let Ok(Some((pid, released))) = outcome {
        // The successor takes the lock once answered: release it, then answer.
        drop(lock.lock().map(|mut l| l.take()));
        let _ = released.send(Ok(handoff));
        let _ = server.join();
        for l in listeners {
            let _ = l.join();
        }
        // The socket is the successor's now. Stay until told to stop, so a supervisor (the
        // kubelet of a DaemonSet rolling out with maxSurge) does not restart this process,
        // which would then take over back.
        tracing::info!("handed over to pid {pid}; idle until SIGTERM");
        while !term.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    let _ = server.join();
    for l in listeners {
        let _ = l.join();
    }
    // Pods stay listed in the pods file so a restart re-attaches them.
    clean_up();
    outcome.map(|_| ())
}

/// A successor's side of a handover (`Gate`, run by the worker once its UMEM is ready and
/// before it binds anything): ask the predecessor to release, then take the lock it let go.
/// Everything slow (the cluster's first list, compiling, the UMEM) is done by then, so the
/// forwarding gap is the predecessor's release and this process's binds.
fn take_over(
    socket: &Path,
    holder: &str,
    lock: &std::sync::Mutex<Option<std::fs::File>>,
) -> Result<Option<xsk::handoff::Handoff>, String> {
    let refused = |why: String| format!("another vxnat ({holder}) runs with ctl socket {}: {why}", socket.display());
    let (_, fds) = crate::ctl::request_handover(socket, std::process::id())
        .map_err(|e| refused(format!("it did not hand over ({e})")))?;
    // No descriptors: an older vxnat, or its worker could not hand over; its sockets are
    // closed and this process binds afresh.
    let handoff = match fds.is_empty() {
        true => None,
        false => match xsk::handoff::Handoff::from_fds(fds) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("the datapath {holder} handed over is unreadable ({e}); binding afresh");
                None
            }
        },
    };
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        match lock_instance(socket) {
            Ok(f) => {
                *lock.lock().map_err(|_| "lock slot poisoned".to_string())? = Some(f);
                return Ok(handoff);
            }
            Err(Error::Locked { .. }) if Instant::now() < until => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(refused(format!("its lock was not released ({e})"))),
        }
    }
}

/// Until `stop`: cluster changes (everything queued applied as one snapshot), ARP claims on
/// the uplink, and underlay refreshes as soon as the kernel's neighbour or route tables change
/// (and every 10 s regardless). On every turn: a dead worker (or a poisoned node) ends the loop
/// with the error `run` exits with, a dead cluster source is restarted (`resend` then sends
/// the Node annotations again), and a stalled worker is logged once per stall. Each batch of
/// cluster changes is tracked until the worker uses the tables that carry it (`health`'s
/// queued/sent/applied, kube-proxy's healthz semantics), and refreshes the health checks'
/// Services and endpoint counts (`checks`).
#[allow(clippy::too_many_arguments)]
fn control_loop(
    node: &std::sync::Mutex<Node>,
    updates: &crossbeam_channel::Receiver<Update>,
    handovers: &crossbeam_channel::Receiver<crate::node::HandoverAsk>,
    stop: &AtomicBool,
    worker: &mut WorkerHost,
    source: &mut Supervised,
    resend: &dyn Fn(),
    health: &Arc<Health>,
    checks: Option<&HealthChecks>,
) -> Result<Option<crate::node::HandoverAsk>, Error> {
    let dirty = Arc::new(AtomicBool::new(false));
    {
        let d = dirty.clone();
        if let Err(e) = crate::rtnl::watch(move || d.store(true, Ordering::Relaxed)) {
            tracing::warn!("cannot watch route/neighbour changes ({e}); refreshing every 10 s only");
        }
    }
    let mut last_refresh = Instant::now();
    let mut stalled = false;
    while !stop.load(Ordering::Relaxed) {
        if let Some(why) = worker.exited() {
            return Err(Error::WorkerDied(why));
        }
        if source.check(stop) {
            resend();
        }
        let age = health.heartbeat_age();
        if age > HEARTBEAT_LIMIT && !stalled {
            tracing::warn!("the worker's last pass started {age:?} ago: it is stalled (/healthz answers 503)");
        } else if age <= HEARTBEAT_LIMIT && stalled {
            tracing::info!("the worker passes again");
        }
        stalled = age > HEARTBEAT_LIMIT;
        crossbeam_channel::select! {
            recv(updates) -> first => if let Ok(first) = first {
                let batch: Vec<Update> = std::iter::once(first).chain(updates.try_iter()).collect();
                health.queued();
                let mut n = node.lock().map_err(|_| Error::Poisoned)?;
                let generation = n.apply_updates(batch);
                if generation.is_some() {
                    // A marker behind the new tables (the channel keeps order): the worker runs
                    // it between two passes once they are in use, and it stores two atomics.
                    let h = health.clone();
                    let _ = n.commands().send(Command::Run(Box::new(move |_, v| h.applied(v.generation))));
                }
                health.sent(generation);
                let me = n.facts.me.name.clone();
                health.set_node_eligible(healthcheck::node_eligible(n.cluster.model.nodes.get(&me)));
                if let Some(c) = checks {
                    c.publish(healthcheck::desired(&n.cluster.model, &me));
                }
            },
            recv(handovers) -> ask => if let Ok(ask) = ask {
                return Ok(Some(ask));
            },
            default(Duration::from_millis(100)) => {}
        }
        {
            let mut n = node.lock().map_err(|_| Error::Poisoned)?;
            if let Some(a) = n.arp.as_mut() {
                for line in a.poll() {
                    tracing::warn!("{line}");
                }
            }
        }
        if dirty.swap(false, Ordering::Relaxed) || last_refresh.elapsed() > Duration::from_secs(10) {
            node.lock().map_err(|_| Error::Poisoned)?.refresh_underlay();
            last_refresh = Instant::now();
        }
    }
    Ok(None)
}
