//! vxnat's control plane: the node configuration, the cluster state (Kubernetes objects) and
//! its compilation into dataplane tables, the node daemon, the ctl API and the reports.

pub mod arpwatch;
pub mod cni;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod drops;
pub mod json;
pub mod metrics;
pub mod model;
pub mod netinfo;
pub mod observe;
pub mod rtnl;
pub mod services;
pub mod source;
pub mod state;
