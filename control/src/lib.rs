//! vxnat's control plane, as rooms with one job each:
//!
//! ```text
//!   sources (source: state file, Kubernetes watch) ──updates──► model (what changed)
//!        └► services (per-Service compile cache), remotes (the other Nodes, per object) ──► node::Cluster
//!   node facts (netinfo, rtnl: uplink, next hops; pods: attached pods) ──► compile::NodeFacts
//!   compile (pure: facts + Services + pods ─► Tables) ──► node::Node ──Command──► xsk::host (worker)
//!   ctl (socket API) / metrics (Prometheus) / observe (flows, traces, pcap) / stats ◄── node
//!   skips: objects left out or held at their last good version, named and counted
//!   linkwatch: pod ports whose interface vanished are detached (rtnetlink link events)
//!   run: wiring only (start, control loop, shutdown, supervision); health: /healthz, /readyz
//!   healthcheck: kube-proxy's health servers (healthCheckNodePort per Service, :10256 /healthz /livez)
//!   cni: the vxnat-cni plugin; fault: test-only fault injection (feature `fault-injection`)
//! ```

pub mod arpwatch;
pub mod cni;
pub mod compile;
pub mod config;
pub mod ctl;
pub mod drops;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod health;
pub mod healthcheck;
pub mod json;
pub mod linkwatch;
pub mod metrics;
pub mod model;
pub mod netinfo;
pub mod node;
pub mod observe;
pub mod pods;
pub mod remotes;
pub mod rtnl;
pub mod run;
pub mod services;
pub mod skips;
pub mod source;
pub mod state;
pub mod stats;
