//! Decap: VXLAN from another node, arriving on the uplink. The outer headers are checked and
//! stripped by [`crate::vxlan::decap`] (the tunnel's byte work, in the order Linux checks
//! them); this stage then validates the inner packet, applies the uplink's checksum policy to
//! it, judges an outer UDP checksum that could only be checked once the inner one was complete
//! ([`OuterChecksum`]), and hands the packet to Service NAT and [`super::route`] as
//! `Origin::Tunnel` (or to [`super::outside`] for a translated reply to a client outside).
//!
//! Anti-spoofing (issue 17): the outer source only says which node sent the frame; the inner
//! source must then be that node's, an address in its pod CIDR (its pods, and its tunnel and
//! gateway addresses, flannel's 10.244.x.0 on flannel.1 and .1 on cni0, which are what a node
//! stack's own traffic and vxnat's SNAT and ICMP errors carry). Anything else is
//! `tunnel_inner_source_spoofed`: without it, a pod that can reach a node's VXLAN port (a
//! flannel node's pod; the outer source masqueraded to its node's, a known VTEP) could deliver
//! packets from any address, this node's pods' included. One prefix compare, after the inner
//! header checksum has vouched for the address.
//!
//! Contract: every outer check failure is one of the `vxlan_*`/`uplink_*`/`eth*` reasons (the
//! observer relies on that prefix to tell "never decapsulated" apart); a frame that gets past
//! [`crate::vxlan::decap::decap`] is counted as `decapsulated` unless its inner packet fails.
//! The source check judges the decapsulated packet, so its reason is deliberately not
//! `vxlan_*`: the observer shows a spoofed frame at the post-decap point, where its inner
//! source can be seen.

use super::ctx::{Ctx, Origin};
use super::service_nat::{self, Nat};
use super::validate::{l4_checksum, validate_ipv4};
use super::{outside, route};
use super::{Disposition, DropReason, FrameBuf};
use crate::tables::ChecksumPolicy;
use crate::vxlan::decap::{decap, OuterChecksum};
use crate::wire::checksum;

#[inline(always)]
pub(crate) fn from_tunnel(
    ctx: &mut Ctx<'_>,
    policy: ChecksumPolicy,
    frame: &mut FrameBuf<'_>,
) -> Result<Disposition, DropReason> {
    let d = decap(ctx.tables, frame)?;
    let m = validate_ipv4(frame)?;
    if !d.sender_pod_cidr.contains(m.src) {
        return Err(DropReason::TunnelInnerSourceSpoofed);
    }
    // A veth underlay delivers what the sender left to offloads: complete the inner checksum,
    // then judge the outer one (see `OuterChecksum`).
    let completed = l4_checksum(policy, frame, &m)?;
    match d.outer_checksum {
        OuterChecksum::Ok => {}
        OuterChecksum::Partial => ctx.events().outer_partial_checksums += 1,
        OuterChecksum::PendingInner { sum } => match completed {
            // RFC 1624: the inner field went from `old` to `new`; the outer sum follows.
            Some((old, new)) if checksum::add(checksum::add(sum, !old), new) == 0xffff => {
                ctx.events().outer_partial_checksums += 1;
            }
            _ => return Err(DropReason::VxlanBadOuterChecksum),
        },
    }
    if completed.is_some() {
        ctx.events().partial_checksums_completed += 1;
    }
    ctx.events().decapsulated += 1;
    let mut m = m;
    match service_nat::apply(ctx, frame, &mut m, Origin::Tunnel, None)? {
        Nat::Answered(d) => Ok(d),
        Nat::Translated { uplink_return: Some(mac), .. } => outside::to_outside(ctx, frame, &m, mac),
        _ => route::forward(ctx, frame, &m, Origin::Tunnel),
    }
}
