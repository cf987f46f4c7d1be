//! Encap: the egress toward another node. A routed frame (or each segment of an oversized one)
//! is wrapped in VXLAN by [`crate::vxlan::encap`], which writes flannel.1's exact bytes from
//! the per-node template, and leaves by the uplink.
//!
//! Contract: on success the frame starts with the outer Ethernet header, each packet took the
//! next outer IPv4 ident of this worker, and `encapsulated` counts it; on failure the frame is
//! dropped with the reason `vxlan::encap` gives (`underlay_no_next_hop`, `no_headroom`, ...)
//! and, for segments, the frame's spilled packets are rolled back.

use super::ctx::Ctx;
use super::spill::Mark;
use super::{Disposition, DropReason, FrameBuf};
use crate::tables::RemoteNode;
use crate::vxlan::encap::encap;
use crate::wire::ethernet;

/// Encapsulates a routed frame toward remote node `idx`.
#[inline]
pub(crate) fn to_remote(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    idx: u32,
    flow_hash: u32,
) -> Result<Disposition, DropReason> {
    let remote = ctx.tables.remote(idx).ok_or(DropReason::NoRouteToNode)?;
    let ident = ctx.next_ident();
    encap(frame, &ctx.tables.node, remote, ident, flow_hash)?;
    ctx.events().encapsulated += 1;
    Ok(Disposition::Forward(ctx.tables.uplink()))
}

/// Encapsulates the `n` packets spilled since `mark` toward `remote`. Each was written with
/// `prefix` bytes of room before it, its inner Ethernet header in the last 14 of them.
pub(crate) fn spilled(
    ctx: &mut Ctx<'_>,
    remote: &RemoteNode,
    mark: Mark,
    n: usize,
    prefix: usize,
    flow_hash: u32,
) -> Result<(), DropReason> {
    let tables = ctx.tables;
    let start = prefix - ethernet::HEADER_LEN;
    for i in mark.1..mark.1 + n {
        let ident = ctx.next_ident();
        let Some(region) = ctx.spill.region_mut(i) else { break };
        let len = region.len();
        let mut f = FrameBuf::new(region, start, len - start).ok_or(DropReason::NoHeadroom)?;
        if let Err(e) = encap(&mut f, &tables.node, remote, ident, flow_hash) {
            ctx.spill.rollback(mark);
            return Err(e);
        }
    }
    ctx.events().encapsulated += n as u64;
    Ok(())
}
