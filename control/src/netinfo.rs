//! Facts about the node's interfaces and underlay, read from the kernel: MACs and MTUs from
//! sysfs; the underlay next hop toward an address from the kernel's route and neighbour tables
//! (`rtnl`, in process); the host port veth; a pod's MAC from its veth peer (iproute2's JSON
//! output, `ip -j`, which finds the peer across namespaces); vxnat's nftables rules.

use core::net::Ipv4Addr;
use dataplane::wire::MacAddr;
use serde_json::Value;
use std::io;
use std::process::Command;

/// Why reading an interface fact or changing the node's interfaces or rules failed. Each
/// message names the interface or the command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `ip` could not be started (`args` as given, e.g. `["link", "del", "vxnat0"]`).
    #[error("running ip {args:?}: {source}")]
    IpSpawn { args: Vec<String>, source: io::Error },
    /// `ip` failed (`cmd`: its arguments joined by spaces; `stderr`: what it said, trimmed).
    #[error("ip {cmd}: {stderr}")]
    Ip { cmd: String, stderr: String },
    /// `ip -j` printed something that is not JSON.
    #[error("ip {cmd}: unreadable JSON: {source}")]
    IpJson { cmd: String, source: serde_json::Error },
    /// A sysfs attribute of the interface could not be read (`path` is the file).
    #[error("interface {ifname}: {path}: {source}")]
    Sysfs { ifname: String, path: String, source: io::Error },
    /// The interface's `address` is not a MAC.
    #[error("interface {ifname}: address {value:?} is not a MAC")]
    Mac { ifname: String, value: String },
    /// The interface's `mtu` is not a 16-bit number.
    #[error("interface {ifname}: mtu {value:?}")]
    Mtu { ifname: String, value: String },
    /// The interface's `ifindex` is not a 32-bit number.
    #[error("interface {ifname}: ifindex {value:?}")]
    Ifindex { ifname: String, value: String },
    /// The underlay next hop toward `dst` could not be looked up.
    #[error("next hop toward {dst}: {source}")]
    NextHop { dst: Ipv4Addr, source: crate::rtnl::Error },
    /// `ip link show` does not know the interface.
    #[error("interface {ifname}: not found")]
    NotFound { ifname: String },
    /// The interface has no peer (not a veth).
    #[error("interface {ifname}: not a veth with a peer")]
    NotVeth { ifname: String },
    /// The veth's peer is in this namespace, so it cannot be a pod's.
    #[error("interface {ifname}: its peer is not in another namespace; give the pod's MAC with --mac")]
    PeerNotElsewhere { ifname: String },
    /// The peer's namespace has no name under `ip netns`.
    #[error("interface {ifname}: its peer's namespace (nsid {nsid}) has no name; give the pod's MAC with --mac")]
    PeerNamespaceUnnamed { ifname: String, nsid: u64 },
    /// The peer namespace has no interface with the veth's `link_index` (or it has no MAC).
    #[error("interface {ifname}: no peer with index {index} in namespace {ns}")]
    NoPeer { ifname: String, index: u64, ns: String },
    /// `nft` could not be started.
    #[error("running nft (nftables): {0}")]
    NftSpawn(#[source] io::Error),
    /// Feeding the rules to `nft`, or waiting for it, failed.
    #[error("nft: {0}")]
    NftIo(#[source] io::Error),
    /// `nft` refused vxnat's rules (`stderr`: what it said, trimmed).
    #[error("nft: vxnat rules: {stderr}")]
    Nft { stderr: String },
    /// A sysctl could not be written.
    #[error("{path}: {source}")]
    Sysctl { path: String, source: std::io::Error },
}

fn ip_failed(args: &[&str], stderr: &[u8]) -> Error {
    Error::Ip { cmd: args.join(" "), stderr: String::from_utf8_lossy(stderr).trim().to_string() }
}

fn ip_spawn(args: &[&str], source: io::Error) -> Error {
    Error::IpSpawn { args: args.iter().map(|a| a.to_string()).collect(), source }
}

fn ip_json(args: &[&str]) -> Result<Value, Error> {
    let out = Command::new("ip").arg("-j").args(args).output().map_err(|e| ip_spawn(args, e))?;
    if !out.status.success() {
        return Err(ip_failed(args, &out.stderr));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| Error::IpJson { cmd: args.join(" "), source: e })
}

pub fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip").args(args).output().map_err(|e| ip_spawn(args, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ip_failed(args, &out.stderr))
    }
}

fn sys(ifname: &str, what: &str) -> Result<String, Error> {
    let p = format!("/sys/class/net/{ifname}/{what}");
    std::fs::read_to_string(&p).map(|s| s.trim().to_string()).map_err(|e| Error::Sysfs {
        ifname: ifname.to_string(),
        path: p,
        source: e,
    })
}

pub fn exists(ifname: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{ifname}")).exists()
}

/// Every IPv4 address on this network namespace's interfaces (getifaddrs(3)), in its order.
pub fn ipv4_addresses() -> Vec<Ipv4Addr> {
    let mut v = Vec::new();
    for a in nix::ifaddrs::getifaddrs().into_iter().flatten() {
        if let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) {
            if !v.contains(&ip) {
                v.push(ip);
            }
        }
    }
    v
}

pub fn mac(ifname: &str) -> Result<MacAddr, Error> {
    let s = sys(ifname, "address")?;
    s.parse().map_err(|_| Error::Mac { ifname: ifname.to_string(), value: s })
}

pub fn mtu(ifname: &str) -> Result<u16, Error> {
    let s = sys(ifname, "mtu")?;
    s.parse().map_err(|_| Error::Mtu { ifname: ifname.to_string(), value: s })
}

pub fn ifindex(ifname: &str) -> Result<u32, Error> {
    let s = sys(ifname, "ifindex")?;
    s.parse().map_err(|_| Error::Ifindex { ifname: ifname.to_string(), value: s })
}

/// The MAC of the next hop toward `dst` on the underlay (the route's gateway, else `dst`
/// itself), from the kernel's routing and neighbour tables over rtnetlink; `None` while
/// unresolved (the pipeline counts `underlay_no_next_hop` meanwhile).
pub fn next_hop_mac(dst: Ipv4Addr) -> Result<Option<MacAddr>, Error> {
    crate::rtnl::next_hop_mac(dst).map_err(|e| Error::NextHop { dst, source: e })
}

/// Creates the host port: a veth pair `ifname` (vxnat's end) / `{ifname}h` (the node stack's),
/// both up, the pod gateway `gateway/32` on the node end (the node owns it, as flannel's cni0
/// does) and the cluster network routed over the link from that address (vxnat answers ARP
/// for cluster addresses on it). A pair left by a predecessor is kept and brought to this
/// configuration; a lone leftover end is removed first.
pub fn create_host_port(
    ifname: &str,
    gateway: Ipv4Addr,
    net: Ipv4Addr,
    mtu: u16,
    cluster: &str,
    services: &str,
) -> Result<String, Error> {
    let stack = format!("{ifname}h");
    // A predecessor's pair (vxnat restarted) is kept, with its MACs, so the node stack's
    // neighbour entries and its connections to pods go on; anything else by that name goes.
    let reuse = exists(ifname) && exists(&stack);
    if !reuse && exists(ifname) {
        ip(&["link", "del", ifname])?;
    }
    if !reuse {
        ip(&["link", "add", ifname, "type", "veth", "peer", "name", &stack])?;
    }
    let mtu = mtu.to_string();
    ip(&["link", "set", ifname, "mtu", &mtu, "up"])?;
    ip(&["link", "set", &stack, "mtu", &mtu, "up"])?;
    ip(&["addr", "replace", &format!("{gateway}/32"), "dev", &stack])?;
    ip(&["route", "replace", cluster, "dev", &stack, "scope", "link", "src", &gateway.to_string()])?;
    // Service addresses: through vxnat too, via a cluster address it answers ARP for.
    ip(&["route", "replace", services, "via", &net.to_string(), "dev", &stack, "onlink", "src", &gateway.to_string()])?;
    Ok(stack)
}

pub fn delete_link(ifname: &str) {
    if exists(ifname) {
        let _ = ip(&["link", "del", ifname]);
    }
}

/// The MAC of the other end of veth `ifname`: the peer is identified exactly by the veth's
/// `link_netnsid` (mapped to a named namespace with `ip netns list-id`, where container
/// runtimes and tests put pods) and its `link_index` there. Interface indexes repeat across
/// namespaces, so both are needed.
pub fn veth_peer_mac(ifname: &str) -> Result<MacAddr, Error> {
    let name = || ifname.to_string();
    let me = ip_json(&["-d", "link", "show", "dev", ifname])?;
    let me = me.get(0).ok_or_else(|| Error::NotFound { ifname: name() })?;
    let peer_index = me.get("link_index").and_then(Value::as_u64).ok_or_else(|| Error::NotVeth { ifname: name() })?;
    let nsid =
        me.get("link_netnsid").and_then(Value::as_u64).ok_or_else(|| Error::PeerNotElsewhere { ifname: name() })?;
    let ids = ip_json(&["netns", "list-id"])?;
    let ns = ids
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e.get("nsid").and_then(Value::as_u64) == Some(nsid))
        .and_then(|e| e.get("name").and_then(Value::as_str))
        .ok_or_else(|| Error::PeerNamespaceUnnamed { ifname: name(), nsid })?
        .to_string();
    let links = ip_json(&["-n", &ns, "link", "show"])?;
    links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l.get("ifindex").and_then(Value::as_u64) == Some(peer_index))
        .and_then(|l| l.get("address").and_then(Value::as_str))
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| Error::NoPeer { ifname: name(), index: peer_index, ns: ns.clone() })
}

/// The nftables table vxnat owns for pod egress masquerade.
pub const NFT_TABLE: &str = "vxnat";

/// vxnat's rules in the node stack (nftables table `vxnat`, replaced whole):
/// - NodePorts used from the node itself (kubelet, hostNetwork pods) are local deliveries that
///   never reach vxnat: they are DNAT'd to the Service's ClusterIP, which routes into vxnat
///   through the host port (kube-proxy does the same in its output chain);
/// - Service traffic the node sends into vxnat gets the node's pod-network address (`gateway`)
///   as source, so endpoints on other nodes answer over VXLAN;
/// - with `masquerade`, pod traffic leaving the cluster network is masqueraded, as flannel's
///   ip-masq rules do (`-s CLUSTER ! -d CLUSTER -j MASQUERADE --random-fully`), TCP/UDP into
///   ports 32768-60999 only, so return traffic never lands on a NodePort (30000-32767) that the
///   uplink's XDP program hands to vxnat.
#[derive(Debug)]
pub struct NodeRules<'a> {
    pub cluster: &'a str,
    pub services: &'a str,
    pub host_stack_if: Option<&'a str>,
    pub gateway: Ipv4Addr,
    pub masquerade: bool,
    /// (protocol, node port, ClusterIP, port)
    pub node_ports: &'a [(&'static str, u16, Ipv4Addr, u16)],
    /// (protocol, load balancer or external IP, port, ClusterIP, port)
    pub local_redirects: &'a [(&'static str, Ipv4Addr, u16, Ipv4Addr, u16)],
    /// Where NodePorts answer (`nodeport_addresses`), and on 127.0.0.1 too (`localhost`).
    pub node_port_addrs: &'a [Ipv4Addr],
    pub localhost: bool,
}

pub fn install_node_rules(r: &NodeRules<'_>) -> Result<(), Error> {
    let (cluster, services, gw) = (r.cluster, r.services, r.gateway);
    // One transaction replaces the table (created empty if absent, deleted, written again):
    // a restart never leaves a moment without NodePort or masquerade rules.
    let mut out = String::from(
        "table ip vxnat\ndelete table ip vxnat\ntable ip vxnat {\n chain output {\n  type nat hook output priority -100; policy accept;\n",
    );
    // Clients on the node itself: NodePorts on the NodePort addresses only (as kube-proxy's
    // nodeport-addresses), and on 127.0.0.1 when asked (then `route_localnet` on the host
    // port lets a loopback-sourced packet leave by it, and the rule below gives it the
    // gateway's address).
    let mut addrs: Vec<String> = r.node_port_addrs.iter().map(|a| a.to_string()).collect();
    if r.localhost {
        addrs.push("127.0.0.1".to_string());
    }
    if !addrs.is_empty() {
        let set = addrs.join(", ");
        for (proto, np, vip, port) in r.node_ports {
            out.push_str(&format!("  ip daddr {{ {set} }} {proto} dport {np} dnat to {vip}:{port}\n"));
        }
    }
    // Clients on the node itself to load balancer and external IPs: to the ClusterIP, as
    // kube-proxy captures them (otherwise they would leave by the uplink).
    for (proto, ip, port, vip, vport) in r.local_redirects {
        out.push_str(&format!("  ip daddr {ip} {proto} dport {port} dnat to {vip}:{vport}\n"));
    }
    out.push_str(" }\n chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n");
    if let Some(stack) = r.host_stack_if {
        out.push_str(&format!("  oifname \"{stack}\" ip daddr {services} ip saddr != {cluster} snat to {gw}\n"));
    }
    if r.masquerade {
        out.push_str(&format!(
            "  ip saddr {cluster} ip daddr {cluster} return\n  ip saddr {cluster} ip daddr 224.0.0.0/4 return\n  ip saddr {cluster} meta l4proto {{ tcp, udp }} masquerade to :32768-60999 fully-random\n  ip saddr {cluster} masquerade fully-random\n"
        ));
    }
    out.push_str(" }\n}\n");
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(Error::NftSpawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(out.as_bytes()).map_err(Error::NftIo)?;
    }
    let res = child.wait_with_output().map_err(Error::NftIo)?;
    if !res.status.success() {
        return Err(Error::Nft { stderr: String::from_utf8_lossy(&res.stderr).trim().to_string() });
    }
    Ok(())
}

/// `net.ipv4.conf.<ifname>.route_localnet = 1`.
pub fn set_route_localnet(ifname: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/route_localnet");
    std::fs::write(&path, "1").map_err(|e| Error::Sysctl { path, source: e })
}

pub fn remove_masquerade() {
    let _ = Command::new("nft").args(["delete", "table", "ip", NFT_TABLE]).output();
}
