//! `vxnat run`: wiring only. Clean up what a killed predecessor left, start the cluster source,
//! capture the node facts, start the worker host, serve ctl and metrics, and run the control
//! loop (cluster updates, ARP watch, underlay refreshes) until SIGTERM/SIGINT; then clean up.

use crate::compile::{compile, HostPort, NodeFacts};
use crate::config::NodeFile;
use crate::model::{Model, Update};
use crate::netinfo;
use crate::node::{install_rules, Cluster, Node};
use crate::pods::{self, Pod};
use crate::state::{derived_vtep_mac, ClusterState, NodeView};
use dataplane::wire::Ipv4Cidr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xsk::bpf::{AttachMode, XdpProgram};
use xsk::host::{HostConfig, WorkerHost};
use xsk::worker::WorkerConfig;

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
    Ok(NodeFacts {
        file: file.clone(),
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
        let u = updates.recv_timeout(left).map_err(|_| Error::NoInitialList { timeout })?;
        if let Update::Relisted(k, _) = &u {
            if !listed.contains(k) {
                listed.push(*k);
            }
        }
        model.apply(u);
    }
    Ok(model)
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
    let pods_path = pods::pods_file(&file.socket);
    let previous = pods::load(&pods_path);
    cleanup_leftovers(&file, &previous);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(Error::Signal)?;
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
    .map_err(Error::Source)?;
    let model = initial_model(&file, &updates, Duration::from_secs(60))?;
    let mut facts = gather(&file, &model)?;
    let cluster = Cluster::new(model, &facts.me.name, file.maglev_table_size);
    facts.remotes = cluster.remotes(&facts.me, &[]);
    if file.state.is_none() {
        let mac = facts.vtep_mac.to_string();
        let _ =
            annotate_tx.send(crate::source::flannel_annotations(file.vxlan.vni, &mac, &facts.me.node_ip.to_string()));
    }
    if file.host.enabled {
        facts.host = Some(host_port(&file, &facts)?);
    }
    install_rules(&facts, &cluster)?;
    if file.masquerade && std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!("net.ipv4.ip_forward is 0: pod traffic leaving the cluster will not be forwarded by this node (set it to 1, as flannel nodes have it)");
    }
    // Pods attached before a restart come back if their interface still exists.
    let pods: Vec<Pod> = previous.into_iter().filter(|p| netinfo::exists(&p.ifname)).collect();
    let tables = Arc::new(compile(&facts, cluster.services.clone(), &[], 1)?);
    let cfg = HostConfig {
        worker: WorkerConfig {
            frames: file.umem.frames_for(file.max_pods),
            fill: file.umem.plan(),
            flows: file.nat.max_flows,
            snat_ports: file.nat.ports()?,
            snat_hold_ns: file.nat.snat_hold_s.saturating_mul(1_000_000_000),
            timeouts: file.conntrack.timeouts(),
            attach: if file.xdp_mode.as_deref() == Some("generic") { AttachMode::Generic } else { AttachMode::Native },
            ..WorkerConfig::default()
        },
        core: file.cores.first().copied(),
        uplink: file.uplink.clone(),
        host: facts.host.as_ref().map(|h| h.ifname.clone()),
        node_ip: facts.me.node_ip.octets(),
        vxlan_port: file.vxlan.port,
        busy_poll: file.busy_poll,
    };
    let clean_up = || {
        netinfo::delete_link(&file.host.ifname);
        netinfo::remove_masquerade();
        let _ = std::fs::remove_file(&file.socket);
    };
    let shutdown = |why: Error| {
        clean_up();
        why
    };
    let mut worker = WorkerHost::spawn(cfg, tables, stop.clone()).map_err(|e| shutdown(Error::Worker(e)))?;
    // Control (this thread: ctl, refreshes) on a core the worker does not use.
    if let Some(worker_core) = file.cores.first() {
        if let Some(c) = core_affinity::get_core_ids().unwrap_or_default().into_iter().find(|c| c.id != *worker_core) {
            core_affinity::set_for_current(c);
        }
    }
    let frontends = worker.take_frontends().ok_or_else(|| shutdown(Error::FrontendsKept))?;
    let mut node = Node::new(facts, cluster, worker.commands(), frontends);
    node.arp = match crate::arpwatch::ArpWatch::open(&file.uplink) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!("{e}; ARP conflicts will not be detected");
            None
        }
    };
    for p in &pods {
        let mac = p.mac.parse().ok();
        match node.attach(&p.ifname, p.ip, mac) {
            Ok(_) => tracing::info!("re-attached pod {} on {}", p.ip, p.ifname),
            Err(e) => tracing::warn!("could not re-attach pod {} on {}: {e}", p.ip, p.ifname),
        }
    }
    let node_ip = node.facts.me.node_ip;
    let node = Arc::new(std::sync::Mutex::new(node));
    let server = crate::ctl::serve(&file.socket, node.clone(), stop.clone()).map_err(|e| shutdown(Error::Ctl(e)))?;
    let metrics = if file.metrics.is_empty() {
        None
    } else {
        match crate::metrics::serve(&file.metrics, node.clone(), stop.clone()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("{e}; no metrics");
                None
            }
        }
    };
    tracing::info!(
        "node {} up: uplink {}, VXLAN {node_ip}:{} VNI {}, ctl {}",
        file.node,
        file.uplink,
        file.vxlan.port,
        file.vxlan.vni,
        file.socket.display()
    );
    control_loop(&node, &updates, &stop);
    tracing::info!("stopping");
    worker.join();
    let _ = server.join();
    if let Some(m) = metrics {
        let _ = m.join();
    }
    // Pods stay listed in the pods file so a restart re-attaches them.
    clean_up();
    Ok(())
}

/// Until `stop`: cluster changes (everything queued applied as one snapshot), ARP claims on
/// the uplink, and underlay refreshes as soon as the kernel's neighbour or route tables change
/// (and every 10 s regardless).
fn control_loop(node: &std::sync::Mutex<Node>, updates: &crossbeam_channel::Receiver<Update>, stop: &AtomicBool) {
    let dirty = Arc::new(AtomicBool::new(false));
    {
        let d = dirty.clone();
        if let Err(e) = crate::rtnl::watch(move || d.store(true, Ordering::Relaxed)) {
            tracing::warn!("cannot watch route/neighbour changes ({e}); refreshing every 10 s only");
        }
    }
    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(first) = updates.recv_timeout(Duration::from_millis(100)) {
            let batch: Vec<Update> = std::iter::once(first).chain(updates.try_iter()).collect();
            if let Ok(mut n) = node.lock() {
                n.apply_updates(batch);
            }
        }
        if let Ok(mut n) = node.lock() {
            if let Some(a) = n.arp.as_mut() {
                for line in a.poll() {
                    tracing::warn!("{line}");
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
}
