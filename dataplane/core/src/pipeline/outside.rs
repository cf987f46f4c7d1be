//! Outside: Service traffic from clients outside the cluster, which the uplink's XDP program
//! redirects here beside the tunnel (NodePorts on the node address, external and load
//! balancer IPs), and the replies going back to them.
//!
//! Contract: [`service_candidate`] only looks (an untagged IPv4 TCP/UDP/ICMP frame to the
//! uplink MAC that is not VXLAN to this node) and never drops; [`from_outside`] accepts Service traffic
//! only (anything else is `uplink_not_vxlan` / `uplink_not_for_node`) and routes it as
//! `Origin::Outside`; [`to_outside`] sends a translated reply straight back out of the uplink
//! to the client's L2 next hop, remembered in its flow, as a router would (TTL decremented).

use super::ctx::{Ctx, Ipv4Meta, Origin};
use super::service_nat::{self, Nat};
use super::validate::{l4_checksum, validate_ipv4};
use super::{route, Disposition, DropReason, FrameBuf};
use crate::tables::{ChecksumPolicy, Tables};
use crate::wire::ethernet;
use crate::wire::{EtherType, EthernetFrame, IpProtocol, Ipv4Packet, MacAddr};

/// An untagged IPv4 TCP/UDP/ICMP frame to our uplink MAC that is not VXLAN to this node: maybe a
/// client outside the cluster reaching a NodePort, external or load balancer IP, or a router
/// on the way to one answering a reply with an ICMP error. Returns the client's (next hop's)
/// MAC.
pub(crate) fn service_candidate(tables: &Tables, d: &[u8]) -> Option<MacAddr> {
    let eth = EthernetFrame::new_fixed(d).ok()?;
    if eth.ethertype_or_tpid() != EtherType::Ipv4 || eth.dst_addr() != tables.node.uplink_mac {
        return None;
    }
    let ip = d.get(ethernet::HEADER_LEN..)?;
    let h = Ipv4Packet::new_fixed(ip).ok()?;
    match h.protocol() {
        // TCP to a frontend, or an ICMP error about what one sent (the XDP program redirects
        // only those; `service_nat` translates the error for the endpoint or drops it, named).
        IpProtocol::Tcp | IpProtocol::Icmp => {}
        IpProtocol::Udp => {
            // Not validated yet: the ports are wherever the IHL says.
            if h.dst_addr() == tables.node.node_ip
                && Ipv4Packet::new_unchecked(ip).l4_ports().map(|(_, dport)| dport) == Some(tables.node.vxlan_port)
            {
                return None;
            }
        }
        _ => return None,
    }
    Some(eth.src_addr())
}

/// A client outside the cluster: only Service traffic is accepted.
pub(crate) fn from_outside(
    ctx: &mut Ctx<'_>,
    policy: ChecksumPolicy,
    frame: &mut FrameBuf<'_>,
    client_mac: MacAddr,
) -> Result<Disposition, DropReason> {
    let mut m = validate_ipv4(frame)?;
    // A veth underlay hands over what the sender left to offloads; NAT's incremental update
    // needs a complete checksum to start from.
    if l4_checksum(policy, frame, &m)?.is_some() {
        ctx.events().partial_checksums_completed += 1;
    }
    match service_nat::apply(ctx, frame, &mut m, Origin::Outside, Some(client_mac))? {
        Nat::Answered(d) => Ok(d),
        Nat::Translated { .. } => route::forward(ctx, frame, &m, Origin::Outside),
        Nat::Untouched => Err(if m.dst == ctx.tables.node.node_ip {
            DropReason::UplinkNotVxlan
        } else {
            DropReason::UplinkNotForNode
        }),
    }
}

/// A translated reply to a client outside the cluster: straight back out of the uplink to the
/// client's L2 next hop, as a router would (TTL decremented).
pub(crate) fn to_outside(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    mac: MacAddr,
) -> Result<Disposition, DropReason> {
    if m.ttl <= 1 {
        return Err(DropReason::TtlExpired);
    }
    route::decrement_ttl(frame);
    route::set_macs(frame, mac, ctx.tables.node.uplink_mac);
    Ok(Disposition::Forward(ctx.tables.uplink()))
}
