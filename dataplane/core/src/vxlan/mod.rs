//! VXLAN overlay, wire-compatible with flannel's `vxlan` backend (the kernel's flannel.1),
//! split by direction as VPP's vxlan plugin is (`encap.c` / `decap.c`): [`encap`] toward
//! remote nodes, [`decap`] from them. The VTEP table (remote nodes, their VtepMACs and pod
//! CIDRs) is part of [`crate::tables::Tables`].
//!
//! Why these stay here rather than under `pipeline/`: they are the tunnel's byte work — the
//! exact 50 bytes flannel.1 writes, the outer checks in the order Linux makes them — and take
//! only the tables and the frame, no worker state. The pipeline's `encap` and `decap` stages
//! are the graph nodes that call them and own what is counted and what happens next; the
//! per-node [`encap::OuterTemplate`] is built with the tables, not per packet.

pub mod decap;
pub mod encap;
