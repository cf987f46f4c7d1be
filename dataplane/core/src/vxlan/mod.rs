//! VXLAN overlay, wire-compatible with flannel's `vxlan` backend (the kernel's flannel.1),
//! split by direction: [`encap`] toward remote nodes, [`decap`] from them. The VTEP table
//! (remote nodes, their VtepMACs and pod CIDRs) is part of [`crate::tables::Tables`].

pub mod decap;
pub mod encap;
