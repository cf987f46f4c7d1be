//! vxnat's I/O crate: AF_XDP plumbing around the sans-IO core (`dataplane`). The XDP program
//! loader (`bpf`, the program itself built from `bpf/` by build.rs), the UMEM and its frame
//! accounting (`umem`), the fill-ring budget (`fill`), sockets and their rings (`port`), the
//! poll-mode worker that feeds the pipeline (`worker`), and what outlives a process: its flows
//! (`flowfile`) and, handed to a successor, its UMEM and sockets (`handoff`). It owns the
//! project's `unsafe` (beyond the core's tiny `cpu` module); every block states why it is sound.
//!
//! Built directly on libxdp-sys (the library xsk-rs wraps) rather than xsk-rs: xsk-rs keeps a
//! descriptor's address private, so a frame could not be transmitted from 50 bytes before
//! where it was received (VXLAN encapsulation into the headroom) or from after the outer
//! headers (decapsulation) without moving every packet. Here a descriptor is a plain
//! (address, length) pair inside an aligned 4 KiB chunk, and encap/decap are pointer moves.
#![allow(unsafe_code)]

pub mod bpf;
mod bulk;
pub mod fill;
pub mod flowfile;
pub mod handoff;
pub mod host;
pub mod packet;
pub mod port;
pub mod umem;
pub mod worker;

/// An I/O error with what vxnat was doing when it happened.
#[derive(Debug)]
pub struct XskError {
    pub what: String,
    pub source: std::io::Error,
}

impl std::fmt::Display for XskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for XskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

pub(crate) fn os_err(what: impl Into<String>, negative_errno: i32) -> XskError {
    XskError { what: what.into(), source: std::io::Error::from_raw_os_error(-negative_errno) }
}

pub(crate) fn last_err(what: impl Into<String>) -> XskError {
    XskError { what: what.into(), source: std::io::Error::last_os_error() }
}
