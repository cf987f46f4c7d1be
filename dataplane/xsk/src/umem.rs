//! The UMEM: one mmap'd region of aligned 4 KiB chunks shared by every port of a worker, and
//! the pool of free chunks. The region is a memfd mapped shared, so a successor process given
//! the memfd and the sockets (`crate::handoff`) maps the very pages the kernel has pinned and
//! goes on where this process stopped. A chunk is always in exactly one place: the free pool, a fill ring,
//! an rx ring or the pipeline (briefly), a tx ring, or a completion ring; `FrameAccount` counts
//! the kernel-held ones so a leak shows as a mismatch, never silently.

use crate::{last_err, os_err, XskError};
use core::ptr::NonNull;
use libxdp_sys as sys;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Chunk size (aligned mode: descriptors may point anywhere inside their chunk).
pub const FRAME_SIZE: u32 = 4096;
/// The kernel places received data this far into a chunk (XDP_PACKET_HEADROOM, with no extra
/// UMEM headroom): room for the 50 bytes of VXLAN in front, and more.
pub const RX_HEADROOM: u32 = sys::XDP_PACKET_HEADROOM;

/// The UMEM region and its registration. The fill and completion rings created with it are
/// handed to the first socket bound to it (libxdp's shared-UMEM rule).
pub struct Umem {
    area: NonNull<u8>,
    size: usize,
    frames: u32,
    /// The region's file: what a successor maps (`adopt`).
    memfd: OwnedFd,
    /// libxdp's registration; null for an adopted UMEM (registered by a predecessor, whose
    /// sockets this process holds) and after `unregister`.
    pub(crate) raw: *mut sys::xsk_umem,
    /// Rings created with the UMEM, moved into the first port.
    pub(crate) first_rings: Option<(Box<sys::xsk_ring_prod>, Box<sys::xsk_ring_cons>)>,
    /// For an adopted UMEM, a bound socket on it that a new socket shares it through
    /// (`XDP_SHARED_UMEM`): the uplink's, set by the worker before each bind (so it is never
    /// a descriptor closed since, and no extra one is kept open).
    pub(crate) share: Option<RawFd>,
    /// Entries of the fill and completion rings of sockets bound to it.
    pub(crate) ring_size: u32,
    /// Whether its first socket was bound multi-buffer (sockets sharing it are too).
    pub(crate) sg: bool,
    /// Whether dropping unmaps the region (not once `unregister` handed it on).
    mapped: bool,
}

impl std::fmt::Debug for Umem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Umem").field("frames", &self.frames).field("size", &self.size).finish_non_exhaustive()
    }
}

// SAFETY: the UMEM is owned by one worker thread; the raw pointers are not shared.
unsafe impl Send for Umem {}

impl Umem {
    /// Maps `frames` chunks of a new memfd and registers them as a UMEM with rings of
    /// `ring_size` entries.
    pub fn new(frames: u32, ring_size: u32) -> Result<Umem, XskError> {
        let size = frames as usize * FRAME_SIZE as usize;
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vxnat-umem".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(last_err("memfd_create for the UMEM"));
        }
        // SAFETY: fd is the memfd just created, owned from here on.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(last_err(format!("sizing the UMEM memfd to {size} bytes")));
        }
        let area = map_shared(&memfd, size, true)?;
        // SAFETY: plain C structs that libxdp initialises; all-zero is their "unset" state.
        let mut fill: Box<sys::xsk_ring_prod> = Box::new(unsafe { core::mem::zeroed() });
        let mut comp: Box<sys::xsk_ring_cons> = Box::new(unsafe { core::mem::zeroed() });
        let cfg = sys::xsk_umem_config {
            fill_size: ring_size,
            comp_size: ring_size,
            frame_size: FRAME_SIZE,
            frame_headroom: 0,
            flags: 0,
        };
        let mut raw = core::ptr::null_mut();
        // SAFETY: area/size describe the mapping above; the ring structs are boxed so their
        // addresses stay valid for as long as libxdp keeps them.
        let rc =
            unsafe { sys::xsk_umem__create(&mut raw, area.as_ptr().cast(), size as u64, &mut *fill, &mut *comp, &cfg) };
        if rc != 0 {
            // SAFETY: unmapping what we mapped.
            unsafe { libc::munmap(area.as_ptr().cast(), size) };
            return Err(os_err("registering the UMEM (xsk_umem__create)", rc));
        }
        Ok(Umem {
            area,
            size,
            frames,
            memfd,
            raw,
            first_rings: Some((fill, comp)),
            share: None,
            ring_size,
            sg: false,
            mapped: true,
        })
    }

    /// Maps a predecessor's UMEM (its memfd, `memfd_of`): the same pages, registered with the
    /// kernel through the predecessor's sockets, which the caller adopts next. `frames` must
    /// be what the predecessor had (a memfd of another size is refused), `ring_size` its
    /// sockets' fill and completion ring size, `sg` whether they were bound multi-buffer.
    pub fn adopt(memfd: OwnedFd, frames: u32, ring_size: u32, sg: bool) -> Result<Umem, XskError> {
        let size = frames as usize * FRAME_SIZE as usize;
        // SAFETY: fstat into a zeroed stat struct.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: as above; fd is live (owned).
        if unsafe { libc::fstat(memfd.as_raw_fd(), &mut st) } != 0 {
            return Err(last_err("fstat of the handed-over UMEM"));
        }
        if st.st_size as usize != size {
            return Err(XskError {
                what: format!("the handed-over UMEM is {} bytes, not {frames} chunks", st.st_size),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        // Not populated: the pages exist, and mapping all of them (a page table entry per
        // 4 KiB) would lengthen the takeover's gap; they fault in as frames touch them.
        let area = map_shared(&memfd, size, false)?;
        Ok(Umem {
            area,
            size,
            frames,
            memfd,
            raw: core::ptr::null_mut(),
            first_rings: None,
            share: None,
            ring_size,
            sg,
            mapped: true,
        })
    }

    /// The region's memfd, for a successor (`crate::handoff`).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// `new` on another thread, started now: a process creates its UMEM (100-170 ms for
    /// 150 MB here: shared memory, zeroed page by page) while it does its other start-up work.
    pub fn prepare(frames: u32, ring_size: u32) -> PreparedUmem {
        let h = std::thread::Builder::new().name("vxnat-umem".into()).spawn(move || Umem::new(frames, ring_size));
        PreparedUmem { frames, ring_size, thread: h.ok() }
    }

    pub fn frame_count(&self) -> u32 {
        self.frames
    }

    /// Every chunk's base address, for the initial free pool.
    pub fn chunk_addrs(&self) -> impl Iterator<Item = u64> {
        (0..u64::from(self.frames)).map(|i| i * u64::from(FRAME_SIZE))
    }

    /// The chunk containing `addr` (any offset inside it).
    #[inline]
    pub fn chunk_of(addr: u64) -> u64 {
        addr & !(u64::from(FRAME_SIZE) - 1)
    }

    /// The bytes of the chunk at `chunk`.
    ///
    /// # Safety
    /// `chunk` must be a chunk base of this UMEM that the caller holds (not in any ring), and
    /// no other live reference to the same chunk may exist.
    #[inline]
    pub(crate) unsafe fn chunk_mut<'a>(&self, chunk: u64) -> &'a mut [u8] {
        debug_assert!(chunk.is_multiple_of(u64::from(FRAME_SIZE)) && (chunk as usize) < self.size);
        core::slice::from_raw_parts_mut(self.area.as_ptr().add(chunk as usize), FRAME_SIZE as usize)
    }

    /// Where descriptor `addr`/`len` starts in memory, if it lies inside one chunk (for
    /// iovecs handed to the kernel; reading or writing through it is the caller's to justify).
    #[inline]
    pub(crate) fn desc_ptr(&self, addr: u64, len: u32) -> Option<*mut u8> {
        // SAFETY: in bounds of the mapping, checked just before.
        self.valid_desc(addr, len).then(|| unsafe { self.area.as_ptr().add(addr as usize) })
    }

    /// Whether `addr`..`addr+len` lies inside one chunk of this UMEM (descriptors from the
    /// kernel are checked before use).
    #[inline]
    pub fn valid_desc(&self, addr: u64, len: u32) -> bool {
        let chunk = Self::chunk_of(addr);
        (chunk as usize) < self.size && addr + u64::from(len) <= chunk + u64::from(FRAME_SIZE)
    }
}

impl Umem {
    /// Unregisters the UMEM now (closing the socket it was registered on, which holds the
    /// first port's queue) and returns its memory, unmapped when that is dropped: freeing
    /// ~150 MB takes tens of ms a stopping worker's successor need not wait for.
    pub fn unregister(mut self) -> UmemArea {
        if !self.raw.is_null() {
            // SAFETY: raw came from xsk_umem__create; deleted once (Drop sees null).
            unsafe { sys::xsk_umem__delete(self.raw) };
            self.raw = core::ptr::null_mut();
        }
        self.mapped = false;
        UmemArea { area: self.area, size: self.size }
    }
}

/// A UMEM being made on another thread (`Umem::prepare`).
#[derive(Debug)]
pub struct PreparedUmem {
    frames: u32,
    ring_size: u32,
    thread: Option<std::thread::JoinHandle<Result<Umem, XskError>>>,
}

impl PreparedUmem {
    /// The UMEM, once made, if it has `frames` chunks and rings of `ring_size` (made here if
    /// its thread could not start).
    pub fn take(self, frames: u32, ring_size: u32) -> Result<Umem, XskError> {
        let made = match self.thread {
            Some(t) => t.join().unwrap_or_else(|_| Umem::new(self.frames, self.ring_size)),
            None => Umem::new(self.frames, self.ring_size),
        }?;
        if (self.frames, self.ring_size) == (frames, ring_size) {
            Ok(made)
        } else {
            Umem::new(frames, ring_size)
        }
    }
}

/// Maps `size` bytes of `memfd` shared (populated if `populate`).
fn map_shared(memfd: &OwnedFd, size: usize, populate: bool) -> Result<NonNull<u8>, XskError> {
    let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
    // SAFETY: a new shared mapping of our memfd; the result is checked against MAP_FAILED.
    let area = unsafe {
        libc::mmap(core::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, flags, memfd.as_raw_fd(), 0)
    };
    if area == libc::MAP_FAILED {
        return Err(last_err(format!("mmap of a {size}-byte UMEM")));
    }
    NonNull::new(area.cast::<u8>()).ok_or_else(|| last_err("mmap returned null"))
}

/// A UMEM's memory after `Umem::unregister`, unmapped on drop.
#[derive(Debug)]
pub struct UmemArea {
    area: NonNull<u8>,
    size: usize,
}

// SAFETY: plain memory no one else references once the UMEM is unregistered.
unsafe impl Send for UmemArea {}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // SAFETY: area/size from mmap, unmapped once.
        unsafe { libc::munmap(self.area.as_ptr().cast(), self.size) };
    }
}

impl Drop for Umem {
    fn drop(&mut self) {
        // Ports (sockets) must be dropped first; the worker drops them before the UMEM.
        // SAFETY: raw came from xsk_umem__create (null when adopted or after `unregister`);
        // area/size from mmap, unmapped here unless `unregister` handed them to a `UmemArea`.
        unsafe {
            if !self.raw.is_null() {
                sys::xsk_umem__delete(self.raw);
            }
            if self.mapped {
                libc::munmap(self.area.as_ptr().cast(), self.size);
            }
        }
    }
}

/// Where the worker's chunks are, for the leak check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameAccount {
    pub total: u32,
    /// In the free pool.
    pub free: u32,
    /// Posted to fill rings, not yet received back.
    pub in_fill: u32,
    /// Posted to tx rings, not yet completed.
    pub in_tx: u32,
}

impl FrameAccount {
    /// Every chunk is accounted for (call between batches, when the pipeline holds none).
    pub fn balanced(&self) -> bool {
        self.free + self.in_fill + self.in_tx == self.total
    }
}
