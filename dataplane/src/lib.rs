//! vxnat's packet engine.
//!
//! Sans-IO at its core: every stage is a plain function over a byte buffer plus the node's
//! tables and `now`, tested without sockets. The AF_XDP plumbing that feeds it lives in
//! `xsk` (a later addition) and is the only place allowed `unsafe` code.

pub mod conntrack;
pub mod filter;
pub mod gso;
pub mod nat;
pub mod observe;
pub mod pipeline;
pub mod tables;
pub mod testkit;
pub mod vxlan;
pub mod wire;
pub mod xsk;
