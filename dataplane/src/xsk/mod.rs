//! AF_XDP plumbing: the XDP program loader, UMEM and frame accounting, sockets and their
//! rings, and the poll-mode worker that feeds the sans-IO pipeline. The only module allowed
//! `unsafe` code; every block states why it is sound.
//!
//! Built directly on libxdp-sys (the library xsk-rs wraps) rather than xsk-rs: xsk-rs keeps a
//! descriptor's address private, so a frame could not be transmitted from 50 bytes before
//! where it was received (VXLAN encapsulation into the headroom) or from after the outer
//! headers (decapsulation) without moving every packet. Here a descriptor is a plain
//! (address, length) pair inside an aligned 4 KiB chunk, and encap/decap are pointer moves.
#![allow(unsafe_code)]

pub mod bpf;
pub mod fill;
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

/// Asks the kernel to back `v`'s allocation (its whole capacity) with transparent huge pages,
/// before it is first written: large tables (conntrack) otherwise pay a page walk on nearly
/// every random access. Advisory: errors are ignored.
pub fn advise_huge_pages<T>(v: &Vec<T>) {
    let bytes = v.capacity() * core::mem::size_of::<T>();
    const HUGE: usize = 2 << 20;
    if bytes < HUGE {
        return;
    }
    let start = v.as_ptr() as usize;
    let aligned = (start + HUGE - 1) & !(HUGE - 1);
    let end = (start + bytes) & !(HUGE - 1);
    if end > aligned {
        // SAFETY: madvise on a range inside this vector's own allocation; MADV_HUGEPAGE only
        // changes how the kernel backs the pages, never their contents.
        unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
    }
}

/// Hints the CPU to bring the cache lines holding `*p` into L1 without waiting for it (a
/// software prefetch: it retires at once, so many can be outstanding). A no-op elsewhere than
/// x86_64.
#[inline(always)]
pub fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        // Every cache line `p` spans: a value straddling two lines would otherwise still miss
        // on the second. The size is a constant, so this unrolls to one or two instructions.
        let start = p as *const T as usize;
        let last = start + core::mem::size_of::<T>().max(1) - 1;
        let mut line = start & !63;
        while line <= last {
            // SAFETY: prefetch is a hint; it never faults and reads nothing architecturally.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line as *const i8) };
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches only the cache line `p` starts on (for a value whose first line is its hot part).
#[inline(always)]
pub fn prefetch_first_line<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; it never faults and reads nothing architecturally.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const T as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
