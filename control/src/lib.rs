//! vxnat's control plane. Today it holds the operator-facing reports; the cluster-state
//! sources, the compiler into dataplane tables and the ctl API arrive with later issues.

pub mod drops;
pub mod json;
