//! vxnat's packet engine.
//!
//! Sans-IO: every stage is a plain function over a byte buffer plus the node's tables and
//! `now`, tested without sockets; no libbpf, libxdp or clang is needed to build it, so the
//! fuzzer, the benchmarks and the oracle tests build from this crate alone. The AF_XDP
//! plumbing that feeds it is the `vxnat-xsk` crate (`dataplane/xsk`). No `unsafe` here
//! beyond the audited `cpu` module (prefetch, madvise).

pub mod conntrack;
pub mod cpu;
pub mod filter;
pub mod gro;
pub mod gso;
pub mod nat;
pub mod observe;
pub mod pipeline;
pub mod tables;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod vxlan;
pub mod wire;
