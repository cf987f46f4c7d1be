//! The running node as the control thread sees it: the captured node facts, the cluster model
//! and its compiled Services, the attached pods, and the channel to the worker. Every change
//! (a pod attached or detached, a cluster update, an underlay change) compiles a new `Tables`
//! snapshot (`compile`, pure) and sends it to the worker, which swaps it in between two
//! batches; the uplink's frontends map is then brought in line from here, not from the worker.
//!
//! Shared by the ctl server, the metrics server and the control loop behind one mutex; long
//! requests (traces, captures) take the command channel and let go of the lock while they wait.
//!
//! An attach or detach the worker does not answer in time is withdrawn (its [`Claim`]
//! abandoned) and reported as failed: the worker then skips it when it gets there, so it never
//! takes effect behind the caller's back. If the worker had already begun it, the answer is
//! waited for a second time; an attach still unanswered then is undone by a detach queued
//! right behind it.

use crate::compile::{compile, NodeFacts};
use crate::config::NodeFile;
use crate::model::{Model, Update};
use crate::netinfo;
use crate::pods::{self, Pod};
use crate::services::Compiler;
use crate::skips::{Problem, Skips, SERVICE};
use crate::state::NodeView;
use crate::stats::{snapshot, WorkerStats};
use core::net::Ipv4Addr;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use dataplane::nat::service::ServiceTable;
use dataplane::tables::{PortId, Tables};
use dataplane::wire::{Ipv4Cidr, MacAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xsk::bpf::FrontendsMap;
use xsk::host::{ask, Claim, Command, FIRST_POD};

/// How an attach refused because the node holds `max_pods` pods begins (the CNI plugin maps
/// it to its own error).
pub const NODE_FULL: &str = "node full";

/// Why a request on the running node failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node holds `max_pods` pods already (begins with `NODE_FULL`).
    #[error("{NODE_FULL}: {max} pods attached, max_pods is {max}; {ifname} ({ip}) not attached")]
    Full { max: usize, ifname: String, ip: Ipv4Addr },
    #[error("ifname: {ifname} does not exist")]
    NoSuchInterface { ifname: String },
    #[error("ifname: {ifname} is already attached")]
    AlreadyAttached { ifname: String },
    #[error("ifname: {ifname} is not attached")]
    NotAttached { ifname: String },
    /// Reading the pod's interface failed.
    #[error(transparent)]
    Interface(#[from] netinfo::Error),
    /// The new tables could not be compiled.
    #[error(transparent)]
    Compile(#[from] crate::compile::Error),
    /// The worker's command channel is closed.
    #[error("worker stopped")]
    WorkerStopped,
    /// The worker did not reach an attach or detach (`what`) within `waited`; it was withdrawn
    /// and will never take effect.
    #[error("worker did not answer within {waited:?}; the {what} was withdrawn and will not take effect")]
    Withdrawn { what: &'static str, waited: Duration },
    /// The worker began an attach but did not finish it within twice `waited`; a detach queued
    /// behind it undoes it as soon as the worker gets there.
    #[error("worker did not finish the attach within {waited:?}; it will be undone as soon as the worker gets to it")]
    AttachUndone { waited: Duration },
    /// The worker refused the request, or could not be asked (xsk's own message, free-form:
    /// the worker host reports a `String`).
    #[error("{0}")]
    Worker(String),
    /// The configuration's `service_cidr` is not a CIDR.
    #[error("service_cidr")]
    ServiceCidr,
    /// Writing vxnat's nftables rules failed.
    #[error(transparent)]
    Rules(netinfo::Error),
    /// An observer (capture or trace) already runs in the worker.
    #[error("a capture or trace is already running on this node; try again when it ends")]
    ObserverBusy,
    /// The worker no longer held the observer when it was collected.
    #[error("the observer went missing")]
    ObserverMissing,
}

/// The cluster as the source reported it, and what was compiled from it.
#[derive(Debug)]
pub struct Cluster {
    pub model: Model,
    /// Per-Service compiled forms, and the Service table they make.
    pub compiler: Compiler,
    pub services: Arc<ServiceTable>,
    /// NodePorts as the node-local nftables rules were last written.
    pub node_ports: Vec<(&'static str, u16, Ipv4Addr, u16)>,
    /// Load balancer and external IPs as the node-local nftables rules were last written
    /// (`Compiler::local_redirects`).
    pub local_redirects: Vec<(&'static str, Ipv4Addr, u16, Ipv4Addr, u16)>,
    /// Services and Nodes left out or held at their last good version (each logged and
    /// counted once, when it appears).
    pub skips: Skips,
}

impl Cluster {
    /// The cluster `model` with every Service compiled for node `me`, external IPs installed
    /// as `external_ips` allows.
    pub fn new(
        model: Model,
        me: &str,
        maglev_table_size: usize,
        external_ips: crate::services::ExternalIpPolicy,
    ) -> Cluster {
        let mut compiler = Compiler::new(me, maglev_table_size);
        compiler.set_external_ip_policy(external_ips);
        let mut c = Cluster {
            compiler,
            model,
            services: Arc::default(),
            node_ports: Vec::new(),
            local_redirects: Vec::new(),
            skips: Skips::default(),
        };
        c.compile_services(None);
        c.node_ports = crate::services::node_port_redirects(c.model.services.values());
        c.local_redirects = c.compiler.local_redirects(&c.model);
        c
    }

    /// Sets vxnat's own `service.kubernetes.io/service-proxy-name` (`proxy_name`, node.toml):
    /// the Services it brings in or leaves to another proxy are compiled again. Returns
    /// whether any did.
    pub fn set_proxy_name(&mut self, name: Option<&str>) -> bool {
        let d = self.model.set_proxy_name(name);
        if d.services.is_empty() {
            return false;
        }
        self.compile_services(Some(&d.services));
        self.node_ports = crate::services::node_port_redirects(self.model.services.values());
        self.local_redirects = self.compiler.local_redirects(&self.model);
        true
    }

    /// Compiles the Services `dirty` names (all of them when `None`) and assembles the table.
    fn compile_services(&mut self, dirty: Option<&std::collections::BTreeSet<crate::model::Key>>) {
        match dirty {
            None => self.compiler.compile_all(&self.model),
            Some(d) => self.compiler.compile_changed(&self.model, d),
        };
        self.compiler.set_node_addresses(crate::services::node_addresses(&self.model));
        let (table, conflicts) = self.compiler.table_keyed();
        // One entry per Service: its compile error, then any frontend it lost.
        let mut by_service: std::collections::BTreeMap<crate::model::Key, Vec<String>> = Default::default();
        for (k, e) in self.compiler.keyed_problems().map(|(k, e)| (k.clone(), e.clone())).chain(conflicts) {
            by_service.entry(k).or_default().push(e);
        }
        let problems = by_service
            .into_iter()
            .map(|((ns, name), es)| Problem::new(SERVICE, format!("{ns}/{name}"), es.join("; ")))
            .collect();
        self.skips.update(SERVICE, problems);
        self.services = Arc::new(table);
    }

    /// The other Nodes of the model with the underlay next hop toward each, chosen object by
    /// object against `known` (the remotes of the tables in use; see `crate::remotes` for who
    /// wins a conflict): a Node that is invalid or conflicts is named, counted and left out (or
    /// held at its last good version), never failing the tables. Known Nodes keep their next
    /// hop, new ones are resolved (only once chosen: a bad Node costs no lookup). This node's
    /// own Node cannot change live (its pod CIDR and address are wired into the host port and
    /// the XDP program): a change is reported.
    pub fn remotes(
        &mut self,
        me: &NodeView,
        cluster: Ipv4Cidr,
        known: &[(NodeView, MacAddr)],
    ) -> Vec<(NodeView, MacAddr)> {
        let last: Vec<NodeView> = known.iter().map(|(v, _)| v.clone()).collect();
        let chosen = crate::remotes::select(me, cluster, &self.model.nodes, &last);
        self.skips.update(crate::remotes::KIND, chosen.problems);
        let mut remotes = Vec::new();
        for v in chosen.remotes {
            let hop = known
                .iter()
                .find(|(r, _)| r.node_ip == v.node_ip)
                .map(|(_, h)| *h)
                .or_else(|| netinfo::next_hop_mac(v.node_ip).ok().flatten())
                .unwrap_or(MacAddr::ZERO);
            remotes.push((v, hop));
        }
        remotes
    }
}

/// The running node: what the ctl server works on.
#[derive(Debug)]
pub struct Node {
    /// ARP claims on the uplink (incident 3), when the packet socket could be opened.
    pub arp: Option<crate::arpwatch::ArpWatch>,
    pub facts: NodeFacts,
    pub cluster: Cluster,
    pub pods: Vec<Pod>,
    generation: u64,
    commands: Sender<Command>,
    /// The uplink program's frontends, kept equal to the current Service table's.
    frontends: FrontendsMap,
    pub started: Instant,
    /// How long an attach or detach waits for the worker before it is withdrawn.
    pub worker_wait: Duration,
    /// The cluster source's state (for `ctl stats`), once supervised.
    pub source: Option<Arc<crate::source::SourceStatus>>,
    /// Pod ports detached because their interface vanished without a detach.
    pub vanished: u64,
    /// Where a successor's handover request goes (`crate::run`); `None` until running.
    pub handover: Option<Sender<HandoverAsk>>,
    /// The Service table changed since the worker's first tables (`proxy_name` applied in
    /// [`Node::new`]): [`Node::adopt`] publishes it with the pods.
    services_unpublished: bool,
}

/// A successor's handover request: its pid, and where to say the node has released (with the
/// datapath's descriptors, `xsk::handoff`; none when the worker could not hand it over).
pub type HandoverAsk = (u32, Sender<Result<Vec<std::os::fd::OwnedFd>, String>>);

/// What became of an attach or detach sent to the worker.
enum Answer {
    /// The worker's answer.
    Done(Result<(), String>),
    /// The worker is gone.
    Stopped,
    /// Not reached in time, and withdrawn: it never takes effect.
    Withdrawn,
    /// Begun by the worker, and not finished after twice the wait.
    Late,
}

/// The default of `Node::worker_wait`.
pub const WORKER_WAIT: Duration = Duration::from_secs(10);

impl Node {
    pub fn new(facts: NodeFacts, mut cluster: Cluster, commands: Sender<Command>, frontends: FrontendsMap) -> Node {
        // `proxy_name` reaches the model here, where the configuration and the cluster first
        // meet in this file. With none set (the default) nothing moves; with one, the Services
        // labelled with it join now, and the worker gets tables with them once the pods it
        // bound at its start are adopted (its first tables lacked them; setting the name on
        // the model before `Cluster::new`, in `crate::run`, would spare that).
        let joined = cluster.set_proxy_name(facts.file.proxy_name.as_deref());
        let node = Node {
            arp: None,
            facts,
            cluster,
            pods: Vec::new(),
            generation: 1,
            commands,
            frontends,
            started: Instant::now(),
            worker_wait: WORKER_WAIT,
            source: None,
            vanished: 0,
            handover: None,
            services_unpublished: joined,
        };
        if joined {
            if let Err(e) = install_rules(&node.facts, &node.cluster) {
                tracing::error!("node-local NodePort rules: {e}");
            }
        }
        node.sync_frontends();
        node
    }

    /// Takes `pods` as attached: the worker bound them at its start (a restart brings back
    /// the pods of the pods file), with tables of this node's generation 1 listing them.
    pub fn adopt(&mut self, pods: Vec<Pod>) {
        self.pods = pods;
        self.save_pods();
        if self.services_unpublished {
            self.republish();
        }
    }

    /// Sends the worker tables compiled from the current state and pods.
    pub fn republish(&mut self) {
        self.services_unpublished = false;
        let pods = self.pods.clone();
        match self.compile(&pods) {
            Ok(t) => {
                let _ = self.commands.send(Command::Tables(t, Instant::now()));
            }
            Err(e) => tracing::error!("compiling tables: {e}"),
        }
    }

    fn next_port(&self) -> u16 {
        (FIRST_POD..).find(|p| !self.pods.iter().any(|q| q.port == *p)).unwrap_or(FIRST_POD)
    }

    fn compile(&mut self, pods: &[Pod]) -> Result<Arc<Tables>, Error> {
        self.generation += 1;
        Ok(Arc::new(compile(&self.facts, self.cluster.services.clone(), pods, self.generation)?))
    }

    /// Writes the uplink program's frontends from the current Service table.
    fn sync_frontends(&self) {
        let list = self.cluster.services.uplink_frontends(&self.facts.nodeport_ips);
        if let Err(e) = self.frontends.set(&list) {
            tracing::error!("updating the uplink's Service frontends: {e}");
        }
    }

    pub fn attach(&mut self, ifname: &str, ip: Ipv4Addr, mac: Option<MacAddr>) -> Result<Pod, Error> {
        let max = self.facts.file.max_pods as usize;
        if self.pods.len() >= max {
            return Err(Error::Full { max, ifname: ifname.to_string(), ip });
        }
        if !netinfo::exists(ifname) {
            return Err(Error::NoSuchInterface { ifname: ifname.to_string() });
        }
        // A pod whose interface vanished and whose link event is not handled yet would hold its
        // address (or, under a reused name, its port) against this one: detach those first.
        self.detach_vanished(None);
        if self.pods.iter().any(|p| p.ifname == ifname) {
            return Err(Error::AlreadyAttached { ifname: ifname.to_string() });
        }
        let mac = match mac {
            Some(m) => m,
            None => netinfo::veth_peer_mac(ifname)?,
        };
        // The port's own MAC and index, captured now: compiling never reads the system.
        let port_mac = netinfo::mac(ifname)?;
        let ifindex = netinfo::ifindex(ifname)?;
        let pod = Pod {
            ifname: ifname.to_string(),
            ip,
            mac: mac.to_string(),
            port: self.next_port(),
            port_mac: port_mac.to_string(),
            ifindex,
        };
        let mut pods = self.pods.clone();
        pods.push(pod.clone());
        let tables = self.compile(&pods)?;
        let (tx, rx) = bounded(1);
        let claim = Arc::new(Claim::default());
        let port = PortId(pod.port);
        self.commands
            .send(Command::Attach { port, ifname: ifname.to_string(), tables, claim: claim.clone(), reply: tx })
            .map_err(|_| Error::WorkerStopped)?;
        match self.answer(&rx, &claim) {
            Answer::Done(r) => r.map_err(Error::Worker)?,
            Answer::Stopped => return Err(Error::WorkerStopped),
            Answer::Withdrawn => return Err(Error::Withdrawn { what: "attach", waited: self.worker_wait }),
            Answer::Late => {
                // Whatever the attach ends in, this detach follows it (the channel keeps order)
                // and leaves the worker with the tables of the pods this node lists.
                let current = self.pods.clone();
                let tables = self.compile(&current)?;
                let (tx, _) = bounded(1);
                let claim = Arc::new(Claim::default());
                let _ = self.commands.send(Command::Detach { port, tables, claim, reply: tx });
                tracing::warn!("attach of {ifname} ({ip}) unfinished after {:?}; undoing it", self.worker_wait * 2);
                return Err(Error::AttachUndone { waited: self.worker_wait * 2 });
            }
        }
        self.pods = pods;
        self.save_pods();
        Ok(pod)
    }

    /// Waits for the worker's answer to an attach or detach carrying `claim`: `worker_wait`,
    /// then withdraws it if the worker has not reached it, else waits as long again.
    fn answer(&self, rx: &Receiver<Result<(), String>>, claim: &Claim) -> Answer {
        let got = |r: Result<Result<(), String>, RecvTimeoutError>| match r {
            Ok(r) => Some(Answer::Done(r)),
            Err(RecvTimeoutError::Disconnected) => Some(Answer::Stopped),
            Err(RecvTimeoutError::Timeout) => None,
        };
        if let Some(a) = got(rx.recv_timeout(self.worker_wait)) {
            return a;
        }
        if claim.abandon() {
            return Answer::Withdrawn;
        }
        got(rx.recv_timeout(self.worker_wait)).unwrap_or(Answer::Late)
    }

    pub fn detach(&mut self, ifname: &str) -> Result<Pod, Error> {
        let pod = self
            .pods
            .iter()
            .find(|p| p.ifname == ifname)
            .cloned()
            .ok_or_else(|| Error::NotAttached { ifname: ifname.to_string() })?;
        let pods: Vec<Pod> = self.pods.iter().filter(|p| p.ifname != ifname).cloned().collect();
        let tables = self.compile(&pods)?;
        let (tx, rx) = bounded(1);
        let claim = Arc::new(Claim::default());
        self.commands
            .send(Command::Detach { port: PortId(pod.port), tables, claim: claim.clone(), reply: tx })
            .map_err(|_| Error::WorkerStopped)?;
        match self.answer(&rx, &claim) {
            Answer::Done(r) => r.map_err(Error::Worker)?,
            Answer::Stopped => return Err(Error::WorkerStopped),
            Answer::Withdrawn => return Err(Error::Withdrawn { what: "detach", waited: self.worker_wait }),
            // The worker is carrying it out and nothing sent later overtakes it: the pod is
            // as good as detached.
            Answer::Late => tracing::warn!(
                "detach of {ifname} unfinished after {:?}; it completes when the worker gets to it",
                self.worker_wait * 2
            ),
        }
        self.pods = pods;
        self.save_pods();
        Ok(pod)
    }

    /// Detaches, as `vxnat ctl detach` does, every pod port whose interface is gone: those the
    /// kernel reported deleted (`Some`: (index, name) of each RTM_DELLINK), or, with `None`,
    /// those found gone now (no interface by that name, or another one under it: for link
    /// events that were lost). Each is logged by name and counted in `vanished`. Returns the
    /// pods detached.
    pub fn detach_vanished(&mut self, deleted: Option<&[(u32, String)]>) -> Vec<Pod> {
        let gone: Vec<Pod> = self
            .pods
            .iter()
            .filter(|p| match deleted {
                // The index when recorded: a new interface may already carry the name.
                Some(links) => links.iter().any(|(i, n)| if p.ifindex != 0 { *i == p.ifindex } else { *n == p.ifname }),
                None => match netinfo::ifindex(&p.ifname) {
                    Ok(i) => p.ifindex != 0 && i != p.ifindex,
                    Err(_) => true,
                },
            })
            .cloned()
            .collect();
        let mut done = Vec::new();
        for p in gone {
            match self.detach(&p.ifname) {
                Ok(_) => {
                    self.vanished += 1;
                    tracing::warn!(
                        "pod {} on {}: its interface vanished without a detach; port {} detached",
                        p.ip,
                        p.ifname,
                        p.port
                    );
                    done.push(p);
                }
                Err(e) => {
                    tracing::error!("pod {} on {}: its interface vanished; detaching it failed: {e}", p.ip, p.ifname)
                }
            }
        }
        done
    }

    fn save_pods(&self) {
        let path = pods::pods_file(&self.facts.file.socket);
        if let Err(e) = pods::save(&path, &self.pods) {
            tracing::error!("{}: {e}; a restart will not re-attach the current pods", path.display());
        }
    }

    /// The channel to the worker (for long requests that must not hold the node lock).
    pub fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    /// The worker's stats, read on its thread between two polls.
    pub fn stats(&self) -> Result<WorkerStats, Error> {
        ask(&self.commands, Duration::from_secs(5), |w, v| snapshot(w, v)).map_err(Error::Worker)
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
            self.republish();
        }
    }

    /// Applies updates from the cluster source: the model says what changed, only those
    /// Services are compiled again, and a new tables snapshot goes to the worker, which swaps
    /// it in between two batches. Returns the new generation, if anything changed.
    pub fn apply_updates(&mut self, updates: impl IntoIterator<Item = Update>) -> Option<u64> {
        let t0 = Instant::now();
        let mut dirty = crate::model::Dirty::default();
        for u in updates {
            dirty.merge(self.cluster.model.apply(u));
        }
        if dirty.is_empty() {
            return None;
        }
        if dirty.nodes {
            self.facts.remotes = self.cluster.remotes(&self.facts.me, self.facts.cluster, &self.facts.remotes);
        }
        // This node's zone label picks the topology-hinted endpoints at compile time: when it
        // changed, `compile_changed` compiles every Service again (other Node changes compile
        // none: the external-IP guard reads Node addresses when the table is assembled).
        let rezone = dirty.nodes && self.cluster.compiler.zone_changed(&self.cluster.model);
        // A Node address that changed may let in or shut out an external IP (the guard): the
        // table is assembled again (no Service compiled). Other Node changes touch neither.
        let readdress = dirty.nodes
            && self.cluster.compiler.node_addresses_differ(&crate::services::node_addresses(&self.cluster.model));
        let services_changed = !dirty.services.is_empty() || rezone || readdress;
        if services_changed {
            self.cluster.compile_services(Some(&dirty.services));
            let node_ports = crate::services::node_port_redirects(self.cluster.model.services.values());
            let local = self.cluster.compiler.local_redirects(&self.cluster.model);
            if node_ports != self.cluster.node_ports || local != self.cluster.local_redirects {
                self.cluster.node_ports = node_ports;
                self.cluster.local_redirects = local;
                if let Err(e) = install_rules(&self.facts, &self.cluster) {
                    tracing::error!("node-local Service rules: {e}");
                }
            }
        }
        let pods = self.pods.clone();
        match self.compile(&pods) {
            Ok(t) => {
                let generation = t.generation;
                let _ = self.commands.send(Command::Tables(t, t0));
                if services_changed {
                    self.sync_frontends();
                }
                tracing::info!(
                    "tables generation {generation}: {} Services changed{}{}, compiled in {:.1} ms",
                    dirty.services.len(),
                    if dirty.nodes { ", Nodes changed" } else { "" },
                    if rezone { ", this node's zone changed (every Service compiled)" } else { "" },
                    t0.elapsed().as_secs_f64() * 1e3
                );
                Some(generation)
            }
            Err(e) => {
                tracing::error!("new tables not built ({e}); the current ones stay");
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
pub fn install_rules(facts: &NodeFacts, cluster: &Cluster) -> Result<(), Error> {
    let file: &NodeFile = &facts.file;
    let services = file.service_cidr.parse::<Ipv4Cidr>().map_err(|_| Error::ServiceCidr)?.network().to_string();
    netinfo::install_node_rules(&netinfo::NodeRules {
        cluster: &facts.cluster.network().to_string(),
        services: &services,
        host_stack_if: facts.host.as_ref().map(|h| h.stack_ifname.as_str()),
        gateway: facts.me.pod_cidr.first_host(),
        masquerade: file.masquerade,
        node_ports: &cluster.node_ports,
        local_redirects: &cluster.local_redirects,
        node_port_addrs: &facts.nodeport_ips,
        localhost: file.nodeport_localhost,
    })
    .map_err(Error::Rules)?;
    if file.nodeport_localhost {
        // A node-local client of 127.0.0.1:nodePort is DNAT'd to the ClusterIP and leaves by
        // the host port with its loopback source (then SNAT'd to the gateway): the kernel
        // routes such a packet out of an interface only with route_localnet there (kube-proxy's
        // iptables mode set it on all interfaces; here, the host port's alone).
        if let Some(h) = &facts.host {
            netinfo::set_route_localnet(&h.stack_ifname).map_err(Error::Rules)?;
        }
    }
    Ok(())
}

/// Runs an observer in the worker until it has what it asked for or `timeout` passes, and
/// returns it with what it collected.
pub fn observe(
    commands: &Sender<Command>,
    o: dataplane::observe::Observe,
    timeout: Duration,
) -> Result<Box<dataplane::observe::Observe>, Error> {
    let wait = Duration::from_secs(5);
    let o = Box::new(o);
    let started = ask(commands, wait, move |w, _| {
        let slot = &mut w.state_mut().observe;
        let free = slot.is_none();
        if free {
            *slot = Some(o);
        }
        free
    })
    .map_err(Error::Worker)?;
    if !started {
        return Err(Error::ObserverBusy);
    }
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        if ask(commands, wait, |w, _| w.state().observe.as_ref().is_none_or(|o| o.done())).unwrap_or(false) {
            break;
        }
    }
    ask(commands, wait, |w, _| w.state_mut().observe.take()).map_err(Error::Worker)?.ok_or(Error::ObserverMissing)
}

/// Drop reason help, for reports.
pub fn reason_help(name: &str) -> &'static str {
    dataplane::pipeline::DropReason::from_name(name).map(|r| r.help()).unwrap_or("")
}
