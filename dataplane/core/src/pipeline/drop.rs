//! The one declared list of drop reasons. Every rejection anywhere in the packet path is one
//! of these; each has a stable snake_case name (for stats, metrics and logs) and a help line
//! an operator can act on, as VPP's per-node error strings.

macro_rules! drop_reasons {
    ($( $variant:ident = $name:literal : $help:literal, )*) => {
        /// Why a frame was dropped. See [`DropReason::help`] for each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason { $( $variant, )* }

        impl DropReason {
            /// Every reason, in declaration order (the order of `index`).
            pub const ALL: &'static [DropReason] = &[ $( DropReason::$variant, )* ];
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name.
            pub const fn name(self) -> &'static str {
                match self { $( DropReason::$variant => $name, )* }
            }
            /// One line saying what happened, for operators.
            pub const fn help(self) -> &'static str {
                match self { $( DropReason::$variant => $help, )* }
            }
            /// Dense index for counter arrays.
            pub const fn index(self) -> usize {
                self as usize
            }
            pub fn from_name(name: &str) -> Option<DropReason> {
                Self::ALL.iter().copied().find(|r| r.name() == name)
            }
        }

        impl core::fmt::Display for DropReason {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

drop_reasons! {
    // Ethernet
    EthTruncated = "eth_truncated": "frame shorter than an Ethernet header",
    EthTooManyTags = "eth_too_many_tags": "more than two VLAN tags",
    VlanTagged = "vlan_tagged": "VLAN-tagged frame on a port that carries untagged traffic only",
    DstMacNotOurs = "dst_mac_not_ours": "unicast frame addressed to a MAC that is not vxnat's on this port",
    L2Multicast = "l2_multicast": "IPv4 frame sent to a broadcast or multicast MAC (not routed)",
    Ipv6Unsupported = "ipv6_unsupported": "IPv6 frame (vxnat routes IPv4 only)",
    EthertypeUnsupported = "ethertype_unsupported": "EtherType other than IPv4 or ARP",
    PortUnknown = "port_unknown": "frame from a port that is not in the tables (detached or never attached)",
    // ARP
    ArpMalformed = "arp_malformed": "ARP packet truncated, or not Ethernet/IPv4 ARP",
    ArpSpoofed = "arp_spoofed_source": "ARP sender MAC or IP is not the pod attached to this port",
    ArpNotForGateway = "arp_not_for_gateway": "ARP request for an address vxnat does not answer for on this port (pod ports: only the gateway; host port: cluster addresses)",
    ArpReplyIgnored = "arp_reply_ignored": "unsolicited ARP reply (vxnat never sends ARP requests on this port)",
    ArpOnUplink = "arp_on_uplink": "ARP reached vxnat on the uplink (the kernel owns ARP there; check the XDP program)",
    // Pod and host port security
    PodSpoofedMac = "pod_spoofed_mac": "source MAC is not the MAC of the pod attached to this port",
    PodSpoofedIp = "pod_spoofed_ip": "source IP is not the IP of the pod attached to this port",
    HostSpoofedMac = "host_spoofed_mac": "source MAC on the host port is not the node stack's interface",
    PodToVxlanPort = "pod_to_vxlan_port": "UDP from a pod to the VXLAN port of a node's underlay address (this node's or another's) or of a remote node's pod-network address (.0, .1): pods must not inject VXLAN frames (issue 17)",
    // IPv4
    Ipv4Truncated = "ipv4_truncated": "IPv4 header or datagram longer than the frame",
    Ipv4BadLength = "ipv4_bad_length": "IPv4 IHL below 5 or total length below the header length",
    Ipv4BadVersion = "ipv4_bad_version": "IPv4 version field is not 4",
    Ipv4BadChecksum = "ipv4_bad_checksum": "IPv4 header checksum does not verify",
    Ipv4ReservedFlag = "ipv4_reserved_flag": "IPv4 reserved flag bit set",
    Ipv4MartianSource = "ipv4_martian_source": "IPv4 source is zero, loopback, multicast or broadcast",
    Ipv4DstMulticast = "ipv4_dst_multicast": "IPv4 destination is broadcast or multicast (not routed)",
    Ipv4TinyFragment = "ipv4_tiny_fragment": "first fragment too short to hold its TCP/UDP header",
    Ipv4FragmentOverflow = "ipv4_fragment_overflow": "fragment offset plus length beyond 65535 bytes",
    L4BadChecksum = "l4_bad_checksum": "TCP/UDP checksum does not verify (the port's checksum policy is verify)",
    L4Truncated = "l4_truncated": "TCP/UDP header truncated or its length field inconsistent with IPv4",
    TtlExpired = "ttl_expired": "TTL reached zero; no ICMP sent (packet was an ICMP error, a fragment or from a non-unicast source)",
    IcmpRateLimited = "icmp_rate_limited": "an ICMP error vxnat would have answered with (time exceeded for a TTL that reached zero, port unreachable refusing a Service connection, fragmentation needed) suppressed by the per-worker rate limit, as the kernel's icmp_ratelimit suppresses its own; the packet is dropped",
    // Routing
    NoSuchPod = "no_such_pod": "destination in this node's pod CIDR but no pod attached with that address",
    NoRouteToNode = "no_route_to_node": "destination in the cluster CIDR but no known node owns it",
    NoHostPort = "no_host_port": "packet for this node's own stack but no host port is configured",
    HostNotRoutable = "host_not_routable": "packet from the node stack that vxnat cannot route (outside the cluster network, or back to the node itself)",
    // Uplink and VXLAN decapsulation
    UplinkNotForNode = "uplink_not_for_node": "IPv4 on the uplink not addressed to this node",
    UplinkNotVxlan = "uplink_not_vxlan": "uplink traffic that is not UDP to this node's VXLAN port",
    VxlanOuterFragment = "vxlan_outer_fragment": "fragmented outer VXLAN datagram (check underlay MTU; vxnat does not reassemble)",
    VxlanBadOuterChecksum = "vxlan_bad_outer_checksum": "non-zero outer UDP checksum that does not verify (incident 1: a broken checksum offload upstream)",
    VxlanUnknownVtep = "vxlan_unknown_vtep": "VXLAN from an address that is not a known node",
    VxlanTruncated = "vxlan_truncated": "VXLAN header or inner frame truncated",
    VxlanBadFlags = "vxlan_bad_flags": "VXLAN I flag clear, or reserved bits set",
    VxlanWrongVni = "vxlan_wrong_vni": "VXLAN network identifier is not this cluster's",
    VxlanInnerDstMac = "vxlan_inner_dst_mac": "inner frame not addressed to this node's VTEP MAC",
    VxlanInnerNotIpv4 = "vxlan_inner_not_ipv4": "inner frame is not untagged IPv4",
    TunnelInnerSourceSpoofed = "tunnel_inner_source_spoofed": "decapsulated packet whose source is not in the sending node's pod CIDR (its pods, tunnel and gateway addresses): a spoofed inner source (issue 17; a pod may have hand-built the VXLAN frame)",
    VxlanInnerNotLocal = "vxlan_inner_not_local": "decapsulated packet is not for a pod or address on this node",
    // Encapsulation
    MtuExceeded = "mtu_exceeded": "packet larger than its egress MTU that could not be segmented or fragmented (DF set and no ICMP sent: the packet was an ICMP error or a non-first fragment; or headers alone exceed the MTU)",
    SegmentationDisabled = "segmentation_disabled": "frame larger than its egress MTU (an aggregated GRO/LRO frame, or a jumbo pod's) and software segmentation is off (incident 5): set segmentation = true, or turn LRO/GRO off upstream",
    SpillFull = "spill_full": "no room left for the segments or fragments of an oversized frame (this batch's spill area or the free UMEM chunks are exhausted); the whole frame is dropped",
    NoHeadroom = "no_headroom": "frame buffer too small to push the VXLAN header or build a reply",
    UnderlayNoNextHop = "underlay_no_next_hop": "underlay next hop for the remote node not resolved yet",
    // Services
    ServiceNoEndpoint = "service_no_endpoint": "Service with no ready or serving endpoint: refused with ICMP port unreachable, TCP and UDP alike, as kube-proxy rejects",
    ServiceNoLocalEndpoint = "service_no_local_endpoint": "a new connection under a Local traffic policy (externalTrafficPolicy from outside, internalTrafficPolicy from pods) while this node has no serving endpoint of the Service and others do: dropped without an answer, as kube-proxy drops it (a load balancer's health check steers clients to nodes that have one)",
    LbSourceRange = "lb_source_range": "a new connection to a load balancer IP from a client outside the Service's loadBalancerSourceRanges: dropped, as kube-proxy's firewall drops it",
    ServiceEndpointGone = "service_endpoint_gone": "a UDP reply from an endpoint that has left its Service or stopped serving: the flow was moved to another endpoint (or ended) on the tables change, as kube-proxy clears such conntrack entries",
    SnatPortsExhausted = "snat_ports_exhausted": "no SNAT port toward the endpoint is free of its TIME_WAIT hold: refused with TCP RST",
    ConntrackFull = "conntrack_full": "connection tracking table full: new flow refused",
    ConntrackCollision = "conntrack_collision": "the translated flow's reply tuple is already tracked for another flow",
    ReusedTupleBadOptions = "reused_tuple_bad_options": "a segment of a flow on a SNAT tuple reused from the endpoint's TIME_WAIT has malformed TCP options: its sequence numbers and timestamps cannot be translated",
    // Transmit (counted against the egress port by the AF_XDP worker)
    TxRingFull = "tx_ring_full": "egress port's transmit ring full (its peer is not draining it fast enough)",
    TxRefused = "tx_refused": "the kernel refused a frame on a pod's packet socket (the aggregated-frame path: a virtio-net header it found inconsistent, or a frame too long); the last errno is in `ctl ports`",
    TxBacklog = "tx_backlog": "egress port already holds its share of the worker's transmit chunks (frames arrive faster than it sends them); dropped here so that every port keeps its guaranteed fill ring",
    EgressPortDown = "egress_port_down": "egress port has no AF_XDP socket (not attached, or being detached)",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_every_reason_has_help() {
        let mut names: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(r.name().chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
            assert!(r.help().len() > 10, "{r}");
            assert_eq!(DropReason::from_name(r.name()), Some(*r));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
