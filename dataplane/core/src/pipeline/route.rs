//! Route: where a validated (and possibly translated) packet goes, and the egress step that
//! hands it to its port.
//!
//! [`forward`] looks the destination up and applies the rules per origin: the gateway and
//! this node's addresses go to the host port; this node's pod CIDR to the attached pod
//! (`no_such_pod` otherwise); another node's pod CIDR to that node over VXLAN; the rest of the
//! cluster CIDR is `no_route_to_node`; destinations outside the cluster go to the host stack
//! from pods and are refused from the host port, the tunnel and outside (no hairpinning
//! through vxnat). TTL follows flannel's hop count: a packet from a pod to a remote pod is
//! decremented once on each node (flannel: cni0 -> flannel.1 on the sender, flannel.1 -> cni0
//! on the receiver); delivery into the node stack is local delivery (no decrement), and
//! packets from the node stack were already routed by it. One difference: pod to pod on the
//! same node is a routed hop here (decremented once) where flannel's bridge switches it. At
//! TTL 1 the sender gets ICMP time exceeded ([`reply::time_exceeded`]).
//!
//! Pods never reach a node's VXLAN port (issue 17): UDP from a pod to that port is
//! `pod_to_vxlan_port` at
//! - a node's underlay address ([`crate::tables::Tables::is_node_underlay_addr`], this node's
//!   or a remote node's): the node stack would route (and masquerade) a hand-built VXLAN
//!   frame, which then arrives with the node's address as outer source, a known VTEP;
//! - a remote node's pod-network address, its pod CIDR's network address (flannel.1's
//!   10.244.X.0) or gateway (.1): a flannel node's kernel VXLAN socket listens on every
//!   address, so the frame would be decapsulated there, inner source unchecked.
//!
//! Checked on the destination after Service NAT; pod-to-pod traffic pays one compare of the
//! destination port. Replies to SNAT'd flows never go to the VXLAN port: no vxnat hands it
//! out as a SNAT port (`SnatAllocator::exclude`), and the kernel's masquerade uses
//! 32768-60999.

use super::ctx::{Ctx, Ipv4Meta, Origin};
use super::{encap, oversize, reply};
use super::{Disposition, DropReason, FrameBuf};
use crate::tables::{LocalPod, Route, Tables};
use crate::wire::ethernet;
use crate::wire::{EthernetFrame, IpProtocol, Ipv4Packet, MacAddr};

/// Routes a validated packet and hands it to its egress.
#[inline(always)]
pub(crate) fn forward(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &Ipv4Meta,
    origin: Origin,
) -> Result<Disposition, DropReason> {
    let route = ctx.tables.route(m.dst);
    match (route, origin) {
        (Route::NoSuchPod, _) => Err(DropReason::NoSuchPod),
        (Route::NoNode, _) => Err(DropReason::NoRouteToNode),
        (Route::Host | Route::External, Origin::Host) => Err(DropReason::HostNotRoutable),
        (Route::Remote(_) | Route::External, Origin::Tunnel) => Err(DropReason::VxlanInnerNotLocal),
        (Route::Host | Route::External, Origin::Outside) => Err(DropReason::UplinkNotForNode),
        // Into the node stack: local delivery for node addresses; for destinations outside
        // the cluster the node stack routes (and masquerades) as it does behind flannel.
        (Route::Host | Route::External, _) => {
            if origin == Origin::Pod && to_vxlan_port_of_a_node(ctx.tables, m) {
                return Err(DropReason::PodToVxlanPort);
            }
            deliver_host(ctx.tables, frame)
        }
        (Route::LocalPod(_) | Route::Remote(_), _) => {
            if origin == Origin::Pod && to_vxlan_port_in_a_remote_pod_network(ctx.tables, m, route) {
                return Err(DropReason::PodToVxlanPort);
            }
            if origin != Origin::Host {
                if m.ttl <= 1 {
                    return reply::time_exceeded(ctx, frame, m);
                }
                decrement_ttl(frame);
            }
            egress(ctx, frame, route, m.flow_hash())
        }
    }
}

/// UDP to the VXLAN port of a node's underlay address.
#[inline(always)]
fn to_vxlan_port_of_a_node(tables: &Tables, m: &Ipv4Meta) -> bool {
    m.dport() == tables.node.vxlan_port && m.protocol() == IpProtocol::Udp && tables.is_node_underlay_addr(m.dst)
}

/// UDP to the VXLAN port of a remote node's pod-network address: its pod CIDR's network
/// address or gateway.
#[inline(always)]
fn to_vxlan_port_in_a_remote_pod_network(tables: &Tables, m: &Ipv4Meta, route: Route) -> bool {
    let Route::Remote(idx) = route else { return false };
    if m.dport() != tables.node.vxlan_port || m.protocol() != IpProtocol::Udp {
        return false;
    }
    tables.remote(idx).is_some_and(|r| {
        let host = u32::from(m.dst).wrapping_sub(u32::from(r.pod_cidr.network().address()));
        host <= 1
    })
}

/// Sends a routed frame (starting with a 14-byte Ethernet header) out of its egress.
#[inline]
pub(crate) fn egress(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    route: Route,
    flow_hash: u32,
) -> Result<Disposition, DropReason> {
    // Every egress carries IPv4 packets of at most the pod MTU (the tunnel: the underlay MTU
    // less VXLAN; pods and the host port are configured with the same).
    if frame.len() > ethernet::HEADER_LEN + ctx.tables.node.max_inner_ip_len() {
        return oversize::oversize(ctx, frame, route, flow_hash);
    }
    match route {
        Route::LocalPod(p) => deliver_pod(ctx.tables, frame, &p),
        Route::Host => deliver_host(ctx.tables, frame),
        Route::Remote(idx) => encap::to_remote(ctx, frame, idx, flow_hash),
        Route::NoSuchPod => Err(DropReason::NoSuchPod),
        Route::NoNode | Route::External => Err(DropReason::NoRouteToNode),
    }
}

/// Decrements the TTL of the validated packet behind the Ethernet header (RFC 1624 checksum
/// update); the caller has checked it is above 1.
#[inline(always)]
pub(crate) fn decrement_ttl(frame: &mut FrameBuf<'_>) {
    if let Some(Ok(mut ip)) = frame.data_mut().get_mut(ethernet::HEADER_LEN..).map(Ipv4Packet::new_fixed_mut) {
        ip.decrement_ttl();
    }
}

/// Rewrites the Ethernet destination and source addresses.
#[inline]
pub(crate) fn set_macs(frame: &mut FrameBuf<'_>, dst: MacAddr, src: MacAddr) {
    if let Ok(mut eth) = EthernetFrame::new_fixed_mut(frame.data_mut()) {
        eth.set_dst_addr(dst);
        eth.set_src_addr(src);
    }
}

/// To a pod on this node: from the pod port's MAC to the pod's.
pub(crate) fn deliver_pod(tables: &Tables, frame: &mut FrameBuf<'_>, p: &LocalPod) -> Result<Disposition, DropReason> {
    let port = tables.port(p.port).ok_or(DropReason::NoSuchPod)?;
    set_macs(frame, p.mac, port.mac);
    Ok(Disposition::Forward(p.port))
}

/// Into the node's stack: from the host port's MAC to the stack's.
pub(crate) fn deliver_host(tables: &Tables, frame: &mut FrameBuf<'_>) -> Result<Disposition, DropReason> {
    let host = tables.host().ok_or(DropReason::NoHostPort)?;
    let port = tables.port(host.port).ok_or(DropReason::NoHostPort)?;
    set_macs(frame, host.stack_mac, port.mac);
    Ok(Disposition::ToHost)
}
