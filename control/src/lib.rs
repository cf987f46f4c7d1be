//! vxnat's control plane: the node configuration, the cluster state (Kubernetes objects) and
//! its compilation into dataplane tables, the operator-facing reports.

pub mod config;
pub mod drops;
pub mod json;
pub mod state;
