//! CPU hints for the hot path: software prefetch and transparent huge pages. The core's only
//! `unsafe`: each is a hint that never reads, writes or faults architecturally (prefetch) or
//! only changes how the kernel backs pages the caller owns (madvise). Audited here, once, so
//! the stages stay safe code.
#![allow(unsafe_code)]

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
