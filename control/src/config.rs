//! The node configuration file (TOML). Unknown keys are errors, and every error names the
//! key, so a typo cannot silently fall back to a default.

use serde::Deserialize;
use std::path::{Path, PathBuf};

fn default_socket() -> PathBuf {
    PathBuf::from("/run/vxnat/vxnat.sock")
}
fn default_cluster_cidr() -> String {
    "10.244.0.0/16".to_string()
}
fn default_service_cidr() -> String {
    "10.96.0.0/12".to_string()
}
fn default_maglev() -> usize {
    dataplane::nat::maglev::DEFAULT_TABLE_SIZE
}
fn default_vni() -> u32 {
    1
}
fn default_port() -> u16 {
    8472
}
fn default_max_pods() -> u32 {
    xsk::worker::DEFAULT_MAX_PODS
}
fn default_pod_fill_min() -> u32 {
    xsk::fill::FillPlan::default().pod.min
}
fn default_surplus() -> u32 {
    xsk::fill::FillPlan::default().surplus
}
fn default_host_ifname() -> String {
    "vxnat0".to_string()
}

/// Pod ports are numbered from 2 in a u16, and each costs a socket, four rings and an XDP
/// program: this bound keeps a typo from asking for a million.
pub const MAX_PODS_LIMIT: u32 = 4096;
/// 4 GiB of UMEM (descriptors address it with 32-bit chunk indexes in reports).
pub const MAX_FRAMES: u32 = 1 << 20;

/// Why the configuration is refused. Every message names the key; a file's errors are
/// wrapped in `InFile`, which puts the file's path first.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// An error in the file at `path`.
    #[error("{}: {source}", path.display())]
    InFile { path: PathBuf, source: Box<Error> },
    /// Not TOML, or not the expected keys and types (toml's message names the key).
    #[error("{}", .0.to_string().trim_end())]
    Toml(#[source] toml::de::Error),
    /// `node` is absent and so is `NODE_NAME`.
    #[error("node: missing (set it, or NODE_NAME as a DaemonSet does from spec.nodeName)")]
    NodeMissing,
    #[error("uplink: must not be empty")]
    UplinkEmpty,
    /// `cluster_cidr` or `service_cidr` (`key`) is not a CIDR.
    #[error("{key}: {value:?} is not an IPv4 CIDR")]
    Cidr { key: &'static str, value: String },
    #[error("maglev_table_size: {0} is not a prime of at least 7")]
    MaglevTableSize(usize),
    #[error("nat.max_affinity_clients: {0} is not between 1 and 2^31")]
    MaxAffinityClients(usize),
    #[error("nat.max_flows: must be at least 1")]
    MaxFlows,
    #[error("nodeport_addresses[{index}]: {value:?} is neither \"primary\" nor an IPv4 CIDR")]
    NodePortAddress { index: usize, value: String },
    #[error("nat.external_ip_cidrs[{index}]: {value:?} is not an IPv4 CIDR")]
    ExternalIpCidr { index: usize, value: String },
    #[error("vxlan.vni: {0} does not fit 24 bits")]
    Vni(u32),
    #[error("host.ifname: {0:?} is too long (14 bytes at most)")]
    HostIfname(String),
    #[error("max_pods: {0} must be 1..={MAX_PODS_LIMIT}")]
    MaxPods(u32),
    /// `umem.pod_fill_min` outside 8..=`ring` (the pod ring size).
    #[error("umem.pod_fill_min: {value} must be 8..={ring} (the pod ring size)")]
    PodFillMin { value: u32, ring: u32 },
    /// `umem.frames` is below the `need`ed minimum for `max_pods`.
    #[error(
        "umem.frames: {frames} cannot guarantee every port's minimum with max_pods = {max_pods}: at least {need} \
         (or leave it out to size the UMEM from max_pods)"
    )]
    UmemFrames { frames: u32, max_pods: u32, need: u64 },
    /// The UMEM (configured or sized from `max_pods`) is more than `MAX_FRAMES` chunks.
    #[error("umem: {0} chunks is more than {MAX_FRAMES} (4 GiB); lower max_pods, umem.surplus or umem.frames")]
    UmemTooBig(u32),
    #[error("xdp_mode: {0:?} is not \"native\" or \"generic\"")]
    XdpMode(String),
    #[error("pod_tx: {0:?} is not \"xsk\" or \"packet-gro\"")]
    PodTx(String),
    #[error("metrics: {0:?} is not an address:port (or \"\" for off)")]
    Metrics(String),
    #[error("health: {0:?} is not an address:port (or \"\" for off)")]
    Health(String),
    #[error("proxy_health: {0:?} is not an address:port (or \"\" for off)")]
    ProxyHealth(String),
    /// `healthcheck_addresses[index]` is neither `primary` nor an IPv4 address.
    #[error("healthcheck_addresses[{index}]: {value:?} is not \"primary\" or an IPv4 address")]
    HealthcheckAddress { index: usize, value: String },
    /// `checksum.pods`, `checksum.host` or `checksum.uplink` (`key`) is not a policy; `message`
    /// is the policy parser's.
    #[error("checksum.{key}: {message}")]
    ChecksumPolicy { key: &'static str, message: String },
    #[error("checksum.outer_udp: {0:?} is not \"zero\" or \"compute\"")]
    OuterUdp(String),
    #[error("nat.snat_ports: {0:?} is not LOW-HIGH")]
    SnatPortsFormat(String),
    /// One end of `nat.snat_ports` (as written) is not a port number.
    #[error("nat.snat_ports: {0:?} is not a port")]
    SnatPort(String),
    #[error("nat.snat_ports: {low}-{high} is empty or starts at 0")]
    SnatPortsEmpty { low: u16, high: u16 },
    #[error("nat.snat_ports: {low}-{high} overlaps the NodePort range 30000-32767")]
    SnatPortsOverlap { low: u16, high: u16 },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// This node's Node object in the cluster state; absent: the `NODE_NAME` environment
    /// variable (a DaemonSet sets it from `spec.nodeName`).
    #[serde(default)]
    pub node: String,
    /// Underlay interface (the node NIC).
    pub uplink: String,
    /// Kubernetes-shaped YAML cluster state, followed for changes; absent: the Kubernetes API
    /// (in-cluster config, else `KUBECONFIG` / `~/.kube/config`).
    pub state: Option<PathBuf>,
    /// The ctl socket (mode 0600).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Cores for the dataplane workers; the first one is used today (one worker).
    #[serde(default)]
    pub cores: Vec<usize>,
    /// The most pods this node attaches (kubelet's default `maxPods`); the UMEM is sized from
    /// it, and an attach past it is refused.
    #[serde(default = "default_max_pods")]
    pub max_pods: u32,
    /// The cluster's pod network (flannel's `Network`).
    #[serde(default = "default_cluster_cidr")]
    pub cluster_cidr: String,
    /// The Service ClusterIP range (routed from the node stack into vxnat).
    #[serde(default = "default_service_cidr")]
    pub service_cidr: String,
    /// Maglev table size per Service port (prime).
    #[serde(default = "default_maglev")]
    pub maglev_table_size: usize,
    /// Masquerade pod traffic leaving the cluster network (flannel's ip-masq) with nftables.
    #[serde(default = "yes")]
    pub masquerade: bool,
    /// Spin on the rings even when idle (lowest latency, one core at 100 %); otherwise poll
    /// adaptively: busy under load, sleep on the ring fds when idle.
    #[serde(default)]
    pub busy_poll: bool,
    /// A `vxnat run` started while another runs with the same socket asks it to hand over
    /// (a planned restart with overlap, as a DaemonSet with `maxSurge` rolls out); `false`:
    /// it refuses to start instead.
    #[serde(default = "yes")]
    pub handover: bool,
    /// XDP attach mode: "native" (xdpdrv, default) or "generic".
    #[serde(default)]
    pub xdp_mode: Option<String>,
    /// How frames leave toward pods: "xsk" (their AF_XDP sockets, MTU frames; default) or
    /// "packet-gro" (merged by software GRO and sent as aggregated frames through a packet
    /// socket with virtio-net headers).
    #[serde(default)]
    pub pod_tx: Option<String>,
    #[serde(default)]
    pub vxlan: VxlanSection,
    #[serde(default)]
    pub host: HostSection,
    #[serde(default)]
    pub umem: UmemSection,
    #[serde(default)]
    pub nat: NatSection,
    #[serde(default)]
    pub conntrack: ConntrackSection,
    #[serde(default)]
    pub checksum: ChecksumSection,
    /// Segment and fragment frames larger than their egress (incident 5).
    #[serde(default = "yes")]
    pub segmentation: bool,
    /// Prometheus metrics listen address (`GET /metrics`); empty: off.
    #[serde(default = "default_metrics")]
    pub metrics: String,
    /// Liveness and readiness (`GET /healthz`, `GET /readyz`) listen address, apart from
    /// `metrics` so a probe never waits behind a scrape; empty: off (the metrics listener
    /// answers them too).
    #[serde(default = "default_health")]
    pub health: String,
    /// Where NodePorts answer, as kube-proxy's `--nodeport-addresses`: `"primary"` (this
    /// node's address, as its Node gives it; the default, as kube-proxy's nftables mode's)
    /// and IPv4 CIDRs (every address of the node within one, read at start).
    #[serde(default = "default_nodeport_addresses")]
    pub nodeport_addresses: Vec<String>,
    /// NodePorts on 127.0.0.1 for clients on the node itself (kube-proxy's iptables mode did
    /// this with `route_localnet`; its nftables mode does not). Off by default.
    #[serde(default)]
    pub nodeport_localhost: bool,
    /// kube-proxy's proxier health server (`GET /healthz`, `GET /livez`, kube-proxy's
    /// `--healthz-bind-address`); empty: off.
    #[serde(default = "default_proxy_health")]
    pub proxy_health: String,
    /// Where the healthCheckNodePort servers listen: `"primary"` (this node's address, as its
    /// Node gives it) or IPv4 addresses (`"0.0.0.0"`: all). Default `["primary"]`, kube-proxy's
    /// in nftables mode (`--nodeport-addresses primary`); empty: no such servers.
    #[serde(default = "default_healthcheck_addresses")]
    pub healthcheck_addresses: Vec<String>,
    /// vxnat's name for the `service.kubernetes.io/service-proxy-name` label: Services
    /// labelled with it are handled; those labelled with any other name are left to that
    /// proxy (kube-proxy leaves every labelled Service alone). Absent or empty: none, every
    /// labelled Service is left alone.
    #[serde(default)]
    pub proxy_name: Option<String>,
}

fn default_nodeport_addresses() -> Vec<String> {
    vec!["primary".to_string()]
}

fn default_metrics() -> String {
    "127.0.0.1:9478".to_string()
}

/// Next to metrics, on loopback (a host-network pod's probes reach it with `host: 127.0.0.1`).
/// vxnat's own probes, apart from kube-proxy's 10256 (`proxy_health`), whose meaning cloud
/// load balancers and kube-proxy's users expect there.
fn default_health() -> String {
    "127.0.0.1:9479".to_string()
}

/// kube-proxy's default `--healthz-bind-address`.
fn default_proxy_health() -> String {
    "0.0.0.0:10256".to_string()
}

fn default_healthcheck_addresses() -> Vec<String> {
    vec!["primary".to_string()]
}

/// Checksum policies per port kind ("complete", "verify" or "trust") and the outer VXLAN UDP
/// checksum on transmit ("zero" or "compute").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksumSection {
    pub pods: String,
    pub host: String,
    pub uplink: String,
    pub outer_udp: String,
}

impl Default for ChecksumSection {
    fn default() -> Self {
        ChecksumSection {
            pods: "complete".into(),
            host: "complete".into(),
            uplink: "complete".into(),
            outer_udp: "zero".into(),
        }
    }
}

impl ChecksumSection {
    /// (pods, host, uplink) policies, each error naming its key.
    pub fn policies(
        &self,
    ) -> Result<
        (dataplane::tables::ChecksumPolicy, dataplane::tables::ChecksumPolicy, dataplane::tables::ChecksumPolicy),
        Error,
    > {
        let p = |key: &'static str, v: &str| v.parse().map_err(|message| Error::ChecksumPolicy { key, message });
        Ok((p("pods", &self.pods)?, p("host", &self.host)?, p("uplink", &self.uplink)?))
    }

    pub fn outer_compute(&self) -> Result<bool, Error> {
        match self.outer_udp.as_str() {
            "zero" => Ok(false),
            "compute" => Ok(true),
            other => Err(Error::OuterUdp(other.to_string())),
        }
    }
}

/// Connection tracking timeouts in seconds; defaults are a kube-proxy node's (see
/// `dataplane::conntrack::Timeouts`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackSection {
    pub tcp_syn_sent: u64,
    pub tcp_syn_recv: u64,
    pub tcp_established: u64,
    pub tcp_fin_wait: u64,
    pub tcp_close_wait: u64,
    pub tcp_last_ack: u64,
    pub tcp_time_wait: u64,
    pub tcp_close: u64,
    pub udp: u64,
    pub udp_stream: u64,
    pub icmp: u64,
}

impl Default for ConntrackSection {
    fn default() -> Self {
        let t = dataplane::conntrack::Timeouts::default();
        let s = |ns: u64| ns / 1_000_000_000;
        ConntrackSection {
            tcp_syn_sent: s(t.tcp_syn_sent),
            tcp_syn_recv: s(t.tcp_syn_recv),
            tcp_established: s(t.tcp_established),
            tcp_fin_wait: s(t.tcp_fin_wait),
            tcp_close_wait: s(t.tcp_close_wait),
            tcp_last_ack: s(t.tcp_last_ack),
            tcp_time_wait: s(t.tcp_time_wait),
            tcp_close: s(t.tcp_close),
            udp: s(t.udp),
            udp_stream: s(t.udp_stream),
            icmp: s(t.other),
        }
    }
}

impl ConntrackSection {
    pub fn timeouts(&self) -> dataplane::conntrack::Timeouts {
        let ns = |s: u64| s.saturating_mul(1_000_000_000);
        dataplane::conntrack::Timeouts {
            tcp_syn_sent: ns(self.tcp_syn_sent),
            tcp_syn_recv: ns(self.tcp_syn_recv),
            tcp_established: ns(self.tcp_established),
            tcp_fin_wait: ns(self.tcp_fin_wait),
            tcp_close_wait: ns(self.tcp_close_wait),
            tcp_last_ack: ns(self.tcp_last_ack),
            tcp_time_wait: ns(self.tcp_time_wait),
            tcp_close: ns(self.tcp_close),
            udp: ns(self.udp),
            udp_stream: ns(self.udp_stream),
            other: ns(self.icmp),
        }
    }
}

fn default_snat_ports() -> String {
    "1024-29999".to_string()
}
fn default_hold() -> u64 {
    dataplane::nat::snat::DEFAULT_HOLD_NS / 1_000_000_000
}
fn default_flows() -> usize {
    65536
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// SNAT source ports, "LOW-HIGH"; must not overlap the NodePort range 30000-32767.
    #[serde(default = "default_snat_ports")]
    pub snat_ports: String,
    /// Seconds a (SNAT address, port, backend) tuple is held after its flow ends.
    #[serde(default = "default_hold")]
    pub snat_hold_s: u64,
    /// Connections tracked at most (per worker). A full table makes room by dropping a flow
    /// that never completed its handshake (early drop, per-source quota), else refuses.
    #[serde(default = "default_flows")]
    pub max_flows: usize,
    /// ClientIP-affinity clients remembered at most (per worker); unset: as many as
    /// `max_flows`, from 1,024 to 65,536. Past it, a new client is not remembered.
    #[serde(default)]
    pub max_affinity_clients: Option<usize>,
    /// The only ranges a Service's `spec.externalIPs` may come from (empty: any address that
    /// is not refused anyway: a node's, the cluster's and Service CIDRs, non-unicast).
    #[serde(default)]
    pub external_ip_cidrs: Vec<String>,
}

impl Default for NatSection {
    fn default() -> Self {
        NatSection {
            snat_ports: default_snat_ports(),
            snat_hold_s: default_hold(),
            max_flows: default_flows(),
            max_affinity_clients: None,
            external_ip_cidrs: Vec::new(),
        }
    }
}

impl NatSection {
    /// `external_ip_cidrs`, parsed.
    pub fn external_ip_cidrs(&self) -> Result<Vec<dataplane::wire::Ipv4Cidr>, Error> {
        self.external_ip_cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.parse::<dataplane::wire::Ipv4Cidr>()
                    .map(|c| c.network())
                    .map_err(|_| Error::ExternalIpCidr { index: i, value: c.clone() })
            })
            .collect()
    }

    /// The SNAT port range, validated.
    pub fn ports(&self) -> Result<core::ops::RangeInclusive<u16>, Error> {
        let (a, b) = self.snat_ports.split_once('-').ok_or_else(|| Error::SnatPortsFormat(self.snat_ports.clone()))?;
        let (a, b): (u16, u16) = (
            a.trim().parse().map_err(|_| Error::SnatPort(a.to_string()))?,
            b.trim().parse().map_err(|_| Error::SnatPort(b.to_string()))?,
        );
        if a == 0 || a > b {
            return Err(Error::SnatPortsEmpty { low: a, high: b });
        }
        if a <= 32767 && b >= 30000 {
            return Err(Error::SnatPortsOverlap { low: a, high: b });
        }
        Ok(a..=b)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VxlanSection {
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_port")]
    pub port: u16,
}

impl Default for VxlanSection {
    fn default() -> Self {
        VxlanSection { vni: default_vni(), port: default_port() }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// Name of vxnat's end of the host port veth; the node stack's end is `<ifname>h`.
    #[serde(default = "default_host_ifname")]
    pub ifname: String,
    /// Create the host port at all.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

impl Default for HostSection {
    fn default() -> Self {
        HostSection { ifname: default_host_ifname(), enabled: true }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UmemSection {
    /// 4 KiB chunks per worker; 0 (the default): sized from `max_pods` (`plan`).
    #[serde(default)]
    pub frames: u32,
    /// Chunks every pod port's fill ring is guaranteed.
    #[serde(default = "default_pod_fill_min")]
    pub pod_fill_min: u32,
    /// Chunks beyond every port's minimum, for busy ports to grow into.
    #[serde(default = "default_surplus")]
    pub surplus: u32,
}

impl Default for UmemSection {
    fn default() -> Self {
        UmemSection { frames: 0, pod_fill_min: default_pod_fill_min(), surplus: default_surplus() }
    }
}

impl UmemSection {
    /// The fill budget these settings describe.
    pub fn plan(&self) -> xsk::fill::FillPlan {
        let mut plan = xsk::fill::FillPlan { surplus: self.surplus, ..Default::default() };
        plan.pod.min = self.pod_fill_min;
        plan
    }

    /// UMEM chunks for `max_pods`: the configured count, or every minimum plus the surplus.
    pub fn frames_for(&self, max_pods: u32) -> u32 {
        if self.frames > 0 {
            self.frames
        } else {
            u32::try_from(self.plan().umem_frames(max_pods)).unwrap_or(u32::MAX)
        }
    }
}

impl NodeFile {
    pub fn parse(text: &str, origin: &Path) -> Result<NodeFile, Error> {
        Self::check(text, origin).map_err(|e| Error::InFile { path: origin.to_path_buf(), source: Box::new(e) })
    }

    /// `parse` without the file's path in front of the error.
    fn check(text: &str, origin: &Path) -> Result<NodeFile, Error> {
        let mut f: NodeFile = toml::from_str(text).map_err(Error::Toml)?;
        if f.node.is_empty() {
            f.node = std::env::var("NODE_NAME").unwrap_or_default();
            if f.node.is_empty() {
                return Err(Error::NodeMissing);
            }
        }
        if f.uplink.is_empty() {
            return Err(Error::UplinkEmpty);
        }
        if f.cluster_cidr.parse::<dataplane::wire::Ipv4Cidr>().is_err() {
            return Err(Error::Cidr { key: "cluster_cidr", value: f.cluster_cidr });
        }
        if f.service_cidr.parse::<dataplane::wire::Ipv4Cidr>().is_err() {
            return Err(Error::Cidr { key: "service_cidr", value: f.service_cidr });
        }
        let m = f.maglev_table_size;
        if m < 7 || !(2..).take_while(|d| d * d <= m).all(|d| !m.is_multiple_of(d)) {
            return Err(Error::MaglevTableSize(m));
        }
        f.nat.ports()?;
        if f.nat.max_flows == 0 {
            return Err(Error::MaxFlows);
        }
        f.nat.external_ip_cidrs()?;
        f.nodeport_ranges()?;
        if let Some(n) = f.nat.max_affinity_clients.filter(|n| !(1..=1 << 31).contains(n)) {
            return Err(Error::MaxAffinityClients(n));
        }
        if f.vxlan.vni > 0x00ff_ffff {
            return Err(Error::Vni(f.vxlan.vni));
        }
        if f.host.ifname.len() > 14 {
            return Err(Error::HostIfname(f.host.ifname));
        }
        if f.max_pods == 0 || f.max_pods > MAX_PODS_LIMIT {
            return Err(Error::MaxPods(f.max_pods));
        }
        let pod_ring = xsk::worker::WorkerConfig::default().pod_ring_size;
        if f.umem.pod_fill_min < 8 || f.umem.pod_fill_min > pod_ring {
            return Err(Error::PodFillMin { value: f.umem.pod_fill_min, ring: pod_ring });
        }
        let need = f.umem.plan().minimum_frames(f.max_pods);
        if f.umem.frames > 0 && u64::from(f.umem.frames) < need {
            return Err(Error::UmemFrames { frames: f.umem.frames, max_pods: f.max_pods, need });
        }
        if f.umem.frames_for(f.max_pods) > MAX_FRAMES {
            return Err(Error::UmemTooBig(f.umem.frames_for(f.max_pods)));
        }
        match f.xdp_mode.as_deref() {
            None | Some("native") | Some("generic") => {}
            Some(other) => return Err(Error::XdpMode(other.to_string())),
        }
        if let Some(other) = f.pod_tx.as_deref().filter(|v| !matches!(*v, "xsk" | "packet-gro")) {
            return Err(Error::PodTx(other.to_string()));
        }
        f.checksum.policies()?;
        if !f.metrics.is_empty() && f.metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::Metrics(f.metrics));
        }
        if !f.health.is_empty() && f.health.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::Health(f.health));
        }
        if !f.proxy_health.is_empty() && f.proxy_health.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::ProxyHealth(f.proxy_health));
        }
        f.healthcheck_ips(std::net::Ipv4Addr::UNSPECIFIED)?;
        f.checksum.outer_compute()?;
        // Relative state paths are relative to the config file.
        if let (Some(s), Some(dir)) = (&f.state, origin.parent()) {
            if s.is_relative() {
                f.state = Some(dir.join(s));
            }
        }
        Ok(f)
    }

    /// The addresses the healthCheckNodePort servers listen on, `primary` being this node's
    /// address; each once, in the order given.
    /// `nodeport_addresses`, parsed: whether `"primary"` is among them, and the CIDRs.
    pub fn nodeport_ranges(&self) -> Result<(bool, Vec<dataplane::wire::Ipv4Cidr>), Error> {
        let (mut primary, mut cidrs) = (false, Vec::new());
        for (index, value) in self.nodeport_addresses.iter().enumerate() {
            match value.as_str() {
                "primary" => primary = true,
                v => cidrs.push(
                    v.parse::<dataplane::wire::Ipv4Cidr>()
                        .map_err(|_| Error::NodePortAddress { index, value: value.clone() })?
                        .network(),
                ),
            }
        }
        Ok((primary, cidrs))
    }

    /// The addresses NodePorts answer on: `primary` if asked for, and every one of `local`
    /// (the node's addresses) within a CIDR, loopback aside (`nodeport_localhost` is its own
    /// switch), in order, once each.
    pub fn nodeport_ips(
        &self,
        primary: std::net::Ipv4Addr,
        local: &[std::net::Ipv4Addr],
    ) -> Result<Vec<std::net::Ipv4Addr>, Error> {
        let (want_primary, cidrs) = self.nodeport_ranges()?;
        let mut ips = Vec::new();
        if want_primary {
            ips.push(primary);
        }
        for &ip in local {
            if !ip.is_loopback() && cidrs.iter().any(|c| c.contains(ip)) && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Ok(ips)
    }

    pub fn healthcheck_ips(&self, primary: std::net::Ipv4Addr) -> Result<Vec<std::net::Ipv4Addr>, Error> {
        let mut ips = Vec::new();
        for (index, value) in self.healthcheck_addresses.iter().enumerate() {
            let ip = match value.as_str() {
                "primary" => primary,
                v => v.parse().map_err(|_| Error::HealthcheckAddress { index, value: value.clone() })?,
            };
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Ok(ips)
    }

    pub fn load(path: &Path) -> Result<NodeFile, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read { path: path.to_path_buf(), source: e })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let f = NodeFile::parse(
            r#"
node = "node-a"
uplink = "eth0"
state = "cluster.yaml"
socket = "/run/vxnat/node-a.sock"
cores = [1]
[vxlan]
vni = 1
port = 8472
"#,
            Path::new("/etc/vxnat/node.toml"),
        )
        .unwrap();
        assert_eq!(f.node, "node-a");
        assert_eq!(f.state, Some(PathBuf::from("/etc/vxnat/cluster.yaml")));
        assert_eq!(f.vxlan, VxlanSection { vni: 1, port: 8472 });
        assert!(f.host.enabled);
    }

    #[test]
    fn the_umem_is_sized_from_max_pods() {
        let p = Path::new("n.toml");
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n", p).unwrap();
        assert_eq!(f.max_pods, 110);
        // 2 node ports x 512 + 110 pods x 256 + 2560 reserve + 6144 surplus.
        assert_eq!(f.umem.frames_for(f.max_pods), 1024 + 28160 + 2560 + 6144);
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nmax_pods = 250\n", p).unwrap();
        assert_eq!(f.umem.frames_for(f.max_pods), 1024 + 64000 + 2560 + 6144);
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nmax_pods = 8\n[umem]\nframes = 8192\n", p).unwrap();
        assert_eq!(f.umem.frames_for(f.max_pods), 8192, "an explicit size wins");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nmax_pods = 16\n[umem]\nframes = 4096\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 7680"), "{e}");
    }

    #[test]
    fn the_shipped_example_configs_parse() {
        for (name, text) in [
            ("node-a", include_str!("../../configs/node-a.toml")),
            ("node-b", include_str!("../../configs/node-b.toml")),
        ] {
            let f = NodeFile::parse(text, Path::new("/etc/vxnat/node.toml")).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(f.node, name);
            assert_eq!(f.nat.ports().unwrap(), 1024..=29999);
            assert!(f.masquerade);
            assert_eq!(f.conntrack.timeouts(), dataplane::conntrack::Timeouts::default());
        }
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[conntrack]\ntcp_time_wait = 30\n", Path::new("n.toml"))
            .unwrap();
        assert_eq!(f.conntrack.timeouts().tcp_time_wait, 30_000_000_000);
        assert_eq!((f.conntrack.tcp_established, f.conntrack.tcp_close_wait), (86_400, 3_600));
    }

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("n.toml");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nvxlan = { vni = 1, prot = 8472 }\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
        let e = NodeFile::parse("node = \"a\"\n", p).unwrap_err().to_string();
        assert!(e.contains("uplink"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\ncluster_cidr = \"10.0.0.0/99\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster_cidr"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[vxlan]\nvni = 16777216\n", p).unwrap_err().to_string();
        assert!(e.contains("vxlan.vni"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[umem]\nframes = 1000\n", p).unwrap_err().to_string();
        assert!(e.contains("umem.frames") && e.contains("max_pods = 110"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nmax_pods = 0\n", p).unwrap_err().to_string();
        assert!(e.contains("max_pods"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[umem]\npod_fill_min = 4\n", p).unwrap_err().to_string();
        assert!(e.contains("umem.pod_fill_min"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[nat]\nsnat_ports = \"29000-31000\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nat.snat_ports") && e.contains("NodePort"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[nat]\nmax_affinity_clients = 0\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nat.max_affinity_clients"), "{e}");
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[nat]\nmax_affinity_clients = 4096\n", p).unwrap();
        assert_eq!(f.nat.max_affinity_clients, Some(4096));
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nhealth = \"localhost\"\n", p).unwrap_err().to_string();
        assert!(e.contains("health"), "{e}");
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n", p).unwrap();
        assert_eq!((f.metrics.as_str(), f.health.as_str()), ("127.0.0.1:9478", "127.0.0.1:9479"));
    }

    #[test]
    fn kube_proxy_health_servers_default_to_kube_proxys_addresses() {
        let p = Path::new("n.toml");
        let node = std::net::Ipv4Addr::new(192, 168, 77, 1);
        let f = NodeFile::parse("node = \"a\"\nuplink = \"e\"\n", p).unwrap();
        assert_eq!(f.proxy_health, "0.0.0.0:10256");
        assert_eq!(f.healthcheck_ips(node).unwrap(), vec![node]);
        let f = NodeFile::parse(
            "node = \"a\"\nuplink = \"e\"\nproxy_health = \"\"\nhealthcheck_addresses = [\"0.0.0.0\", \"primary\", \"0.0.0.0\"]\n",
            p,
        )
        .unwrap();
        assert_eq!(f.proxy_health, "");
        assert_eq!(f.healthcheck_ips(node).unwrap(), vec![std::net::Ipv4Addr::UNSPECIFIED, node]);
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nproxy_health = \"10256\"\n", p).unwrap_err().to_string();
        assert!(e.contains("proxy_health") && e.contains("10256"), "{e}");
        let e = NodeFile::parse("node = \"a\"\nuplink = \"e\"\nhealthcheck_addresses = [\"primary\", \"eth0\"]\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("healthcheck_addresses[1]") && e.contains("eth0"), "{e}");
    }

    #[test]
    fn checksum_policies_parse_and_errors_name_the_key() {
        let f = NodeFile::parse(
            "node = \"a\"\nuplink = \"e\"\n[checksum]\npods = \"verify\"\nouter_udp = \"compute\"\n",
            Path::new("n.toml"),
        )
        .expect("valid");
        assert_eq!(f.checksum.policies().expect("policies").0, dataplane::tables::ChecksumPolicy::Verify);
        assert!(f.checksum.outer_compute().expect("outer_udp"));
        let e =
            NodeFile::parse("node = \"a\"\nuplink = \"e\"\n[checksum]\nuplink = \"paranoid\"\n", Path::new("n.toml"))
                .expect_err("invalid")
                .to_string();
        assert!(e.contains("checksum.uplink") && e.contains("paranoid"), "{e}");
        let e = NodeFile::parse(
            "node = \"a\"\nuplink = \"e\"\n[checksum]\nouter_udp = \"sometimes\"\n",
            Path::new("n.toml"),
        )
        .expect_err("invalid")
        .to_string();
        assert!(e.contains("checksum.outer_udp"), "{e}");
    }

    #[test]
    fn nodeport_addresses_resolve_primary_and_cidrs_against_the_nodes_addresses() {
        let f = |extra: &str| NodeFile::parse(&format!("node = \"a\"\nuplink = \"e\"\n{extra}"), Path::new("n.toml"));
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        let local = [ip("127.0.0.1"), ip("192.168.77.1"), ip("192.168.77.11"), ip("10.0.0.5"), ip("10.244.0.1")];
        assert_eq!(
            f("").unwrap().nodeport_ips(ip("192.168.77.1"), &local).unwrap(),
            vec![ip("192.168.77.1")],
            "primary"
        );
        let both = f("nodeport_addresses = [\"primary\", \"192.168.77.0/24\", \"0.0.0.0/0\"]\n").unwrap();
        assert_eq!(
            both.nodeport_ips(ip("192.168.77.1"), &local).unwrap(),
            vec![ip("192.168.77.1"), ip("192.168.77.11"), ip("10.0.0.5"), ip("10.244.0.1")],
            "every address in a CIDR, once, loopback aside"
        );
        let cidr_only = f("nodeport_addresses = [\"10.0.0.0/8\"]\n").unwrap();
        assert_eq!(cidr_only.nodeport_ips(ip("192.168.77.1"), &local).unwrap(), vec![ip("10.0.0.5"), ip("10.244.0.1")]);
        let e = f("nodeport_addresses = [\"primary\", \"eth0\"]\n").unwrap_err().to_string();
        assert!(e.contains("nodeport_addresses[1]: \"eth0\" is neither \"primary\" nor an IPv4 CIDR"), "{e}");
    }
}
