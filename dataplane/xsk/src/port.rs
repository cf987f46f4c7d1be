//! One AF_XDP socket bound to (interface, queue 0) on the worker's shared UMEM, with its own
//! rx/tx rings and fill/completion rings (shared UMEM across devices, Linux 5.10+).
//!
//! Sockets are made by libxdp, except where libxdp has no object to make them with: a socket
//! a predecessor process handed over (`XskPort::adopt`: its rings are mapped here from the
//! kernel's offsets, with the indices where the predecessor left them), and a new socket on a
//! UMEM that came that way (`Umem::adopt`: bound with `XDP_SHARED_UMEM` to a socket already
//! on it, which is all libxdp itself does for a second socket).

use crate::umem::Umem;
use crate::{last_err, os_err, XskError};
use libxdp_sys as sys;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// Multi-buffer sockets (Linux 6.6+; not in libxdp-sys's headers yet): a frame larger than a
/// chunk arrives as several descriptors, all but the last with `XDP_PKT_CONTD` in `options`.
pub const XDP_USE_SG: u16 = 1 << 4;
pub const XDP_PKT_CONTD: u32 = 1;

/// How the socket binds.
#[derive(Debug, Clone, Copy)]
pub struct PortConfig {
    pub ring_size: u32,
    /// XDP_COPY (veth has no zero-copy mode).
    pub copy_mode: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig { ring_size: 2048, copy_mode: true }
    }
}

dataplane::counter_set! {
    /// The kernel's per-socket counters (`XDP_STATISTICS`).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct SocketStats {
        rx_dropped: "frames the kernel dropped on the way into the socket (includes rx_ring_full)",
        rx_invalid_descs: "rx descriptors the kernel found invalid",
        tx_invalid_descs: "tx descriptors the kernel found invalid",
        rx_ring_full: "frames dropped because vxnat's rx ring was full (the worker fell behind)",
        rx_fill_ring_empty: "times the kernel found no free frame in the fill ring (UMEM starved)",
        tx_ring_empty: "times the kernel found the tx ring empty",
    }
}

/// The entries of a socket's four rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSizes {
    pub rx: u32,
    pub tx: u32,
    pub fill: u32,
    pub comp: u32,
}

impl RingSizes {
    fn valid(&self) -> bool {
        [self.rx, self.tx, self.fill, self.comp].iter().all(|n| n.is_power_of_two())
    }
}

/// A socket made or adopted without libxdp: its ring mappings (unmapped first) and its fd.
struct OwnSocket {
    _maps: RingMaps,
    _fd: OwnedFd,
}

/// The four ring mappings of a socket, unmapped on drop.
struct RingMaps([(*mut libc::c_void, usize); 4]);

impl Drop for RingMaps {
    fn drop(&mut self) {
        for &(ptr, len) in &self.0 {
            if !ptr.is_null() {
                // SAFETY: a ring mapping this socket made, unmapped once.
                unsafe { libc::munmap(ptr, len) };
            }
        }
    }
}

pub struct XskPort {
    pub ifname: String,
    pub ifindex: u32,
    pub queue: u32,
    /// libxdp's socket; null for one made or adopted without it (`own`).
    raw: *mut sys::xsk_socket,
    /// Dropped after `raw`'s deletion, for its effect (unmap, close).
    _own: Option<OwnSocket>,
    fd: RawFd,
    pub(crate) rx: Box<sys::xsk_ring_cons>,
    pub(crate) tx: Box<sys::xsk_ring_prod>,
    pub(crate) fill: Box<sys::xsk_ring_prod>,
    pub(crate) comp: Box<sys::xsk_ring_cons>,
    /// Chunks posted to this port's tx ring and not yet completed.
    pub(crate) in_tx: u32,
    /// Bound with XDP_USE_SG: frames larger than a chunk come (and go) as descriptor chains.
    pub sg: bool,
}

impl std::fmt::Debug for XskPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskPort")
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .field("in_tx", &self.in_tx)
            .finish_non_exhaustive()
    }
}

/// How long a bind retries a queue still held by a socket closed just before.
const BIND_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

// SAFETY: a port is owned and used by one worker thread.
unsafe impl Send for XskPort {}

impl XskPort {
    /// Binds a socket on `ifname` queue 0 (retrying for `BIND_BUSY_WAIT` while the queue is
    /// still held by a socket closed just before). libxdp's own program loading is inhibited: vxnat
    /// loads its program and inserts the socket into its XSKMAP itself.
    pub fn bind(umem: &mut Umem, ifname: &str, cfg: PortConfig) -> Result<XskPort, XskError> {
        let name = CString::new(ifname).map_err(|_| XskError {
            what: format!("interface name {ifname:?}"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: name is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(last_err(format!("interface {ifname}")));
        }
        // The first port takes over the rings created with the UMEM; later ones get new ones.
        // SAFETY (zeroed): plain C ring structs, all-zero until libxdp fills them in.
        let (mut fill, mut comp) = umem
            .first_rings
            .take()
            .unwrap_or_else(|| (Box::new(unsafe { core::mem::zeroed() }), Box::new(unsafe { core::mem::zeroed() })));
        let mut rx: Box<sys::xsk_ring_cons> = Box::new(unsafe { core::mem::zeroed() });
        let mut tx: Box<sys::xsk_ring_prod> = Box::new(unsafe { core::mem::zeroed() });
        let mut bind_flags = sys::XDP_USE_NEED_WAKEUP as u16 | XDP_USE_SG;
        if cfg.copy_mode {
            bind_flags |= sys::XDP_COPY as u16;
        }
        // Multi-buffer first; a kernel without it refuses the flag, and the socket is bound
        // without (frames larger than a chunk are then dropped by the kernel, in its counters).
        // A queue whose previous socket was just closed (a predecessor's, handing over or
        // killed) stays registered until a kernel work item releases it after the close
        // returned: EBUSY meanwhile, retried with the same rings (not the flag's fault: binding
        // without it moments later would lose multi-buffer for the port's life).
        let busy_until = std::time::Instant::now() + BIND_BUSY_WAIT;
        if umem.raw.is_null() {
            return Self::bind_shared(umem, ifname, ifindex, cfg, rx, tx, fill, comp);
        }
        let first = loop {
            match Self::create(umem, &name, ifname, cfg, bind_flags, &mut rx, &mut tx, &mut fill, &mut comp) {
                Err(e) if e.source.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < busy_until => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                r => break r,
            }
        };
        match first {
            Ok((raw, fd)) => Ok(XskPort::new(ifname, ifindex, raw, fd, rx, tx, fill, comp, true)),
            Err(e) if e.source.raw_os_error() == Some(libc::EBUSY) => Err(e),
            Err(_) => {
                let (raw, fd) = Self::create(
                    umem,
                    &name,
                    ifname,
                    cfg,
                    bind_flags & !XDP_USE_SG,
                    &mut rx,
                    &mut tx,
                    &mut fill,
                    &mut comp,
                )?;
                Ok(XskPort::new(ifname, ifindex, raw, fd, rx, tx, fill, comp, false))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        ifname: &str,
        ifindex: u32,
        raw: *mut sys::xsk_socket,
        fd: RawFd,
        rx: Box<sys::xsk_ring_cons>,
        tx: Box<sys::xsk_ring_prod>,
        fill: Box<sys::xsk_ring_prod>,
        comp: Box<sys::xsk_ring_cons>,
        sg: bool,
    ) -> XskPort {
        XskPort { ifname: ifname.to_string(), ifindex, queue: 0, raw, _own: None, fd, rx, tx, fill, comp, in_tx: 0, sg }
    }

    /// Takes over a socket a predecessor bound on `ifname` (`ifindex` when it did: an
    /// interface of that name made since is not the socket's) and left with `in_tx` chunks on
    /// its tx ring: its rings are mapped again and read from where the predecessor left them.
    pub fn adopt(
        fd: OwnedFd,
        ifname: &str,
        ifindex: u32,
        sizes: RingSizes,
        sg: bool,
        in_tx: u32,
    ) -> Result<XskPort, XskError> {
        let invalid = |what: String| XskError { what, source: std::io::Error::from(std::io::ErrorKind::InvalidData) };
        let name = CString::new(ifname).map_err(|_| invalid(format!("interface name {ifname:?}")))?;
        // SAFETY: name is a valid C string.
        let now = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if now != ifindex {
            return Err(invalid(format!(
                "{ifname} is interface {now} now, not {ifindex} as when its socket was bound"
            )));
        }
        if !sizes.valid() {
            return Err(invalid(format!("{ifname}: ring sizes {sizes:?} are not powers of two")));
        }
        // SAFETY (zeroed): plain C ring structs, filled in by `map_rings`.
        let (mut rx, mut tx): (Box<sys::xsk_ring_cons>, Box<sys::xsk_ring_prod>) =
            (Box::new(unsafe { core::mem::zeroed() }), Box::new(unsafe { core::mem::zeroed() }));
        let (mut fill, mut comp): (Box<sys::xsk_ring_prod>, Box<sys::xsk_ring_cons>) =
            (Box::new(unsafe { core::mem::zeroed() }), Box::new(unsafe { core::mem::zeroed() }));
        let maps = map_rings(fd.as_raw_fd(), ifname, sizes, &mut rx, &mut tx, &mut fill, &mut comp)?;
        Ok(Self::own(ifname, ifindex, fd, maps, (rx, tx, fill, comp), in_tx, sg))
    }

    /// A new socket on an adopted UMEM (`Umem::adopt`), shared through `umem.share`: ring
    /// sizes set, rings mapped, then bound with `XDP_SHARED_UMEM` alone (the kernel takes
    /// copy mode, need_wakeup and multi-buffer from the socket it shares with, and refuses
    /// them as flags here). EBUSY is retried as in `bind`.
    #[allow(clippy::too_many_arguments)]
    fn bind_shared(
        umem: &Umem,
        ifname: &str,
        ifindex: u32,
        cfg: PortConfig,
        mut rx: Box<sys::xsk_ring_cons>,
        mut tx: Box<sys::xsk_ring_prod>,
        mut fill: Box<sys::xsk_ring_prod>,
        mut comp: Box<sys::xsk_ring_cons>,
    ) -> Result<XskPort, XskError> {
        let Some(share) = umem.share else {
            return Err(XskError {
                what: format!("binding {ifname}: the adopted UMEM has no socket to share it through"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        };
        let sizes = RingSizes { rx: cfg.ring_size, tx: cfg.ring_size, fill: umem.ring_size, comp: umem.ring_size };
        // SAFETY: a new socket; the result is checked and owned from here on.
        let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(last_err(format!("an AF_XDP socket for {ifname}")));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for (opt, n) in [
            (libc::XDP_RX_RING, sizes.rx),
            (libc::XDP_TX_RING, sizes.tx),
            (libc::XDP_UMEM_FILL_RING, sizes.fill),
            (libc::XDP_UMEM_COMPLETION_RING, sizes.comp),
        ] {
            // SAFETY: a u32 option value of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_XDP,
                    opt,
                    (&n as *const u32).cast(),
                    core::mem::size_of::<u32>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(last_err(format!("sizing the rings of {ifname}'s socket")));
            }
        }
        let maps = map_rings(fd.as_raw_fd(), ifname, sizes, &mut rx, &mut tx, &mut fill, &mut comp)?;
        // SAFETY: all-zero is a valid sockaddr_xdp, completed below.
        let mut sa: libc::sockaddr_xdp = unsafe { core::mem::zeroed() };
        sa.sxdp_family = libc::AF_XDP as u16;
        sa.sxdp_flags = libc::XDP_SHARED_UMEM;
        sa.sxdp_ifindex = ifindex;
        sa.sxdp_queue_id = 0;
        sa.sxdp_shared_umem_fd = share as u32;
        let busy_until = std::time::Instant::now() + BIND_BUSY_WAIT;
        loop {
            // SAFETY: binding our socket to a sockaddr_xdp of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_xdp).cast(),
                    core::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
            let e = last_err(format!("binding an AF_XDP socket on {ifname} queue 0"));
            if e.source.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= busy_until {
                return Err(e);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(Self::own(ifname, ifindex, fd, maps, (rx, tx, fill, comp), 0, umem.sg))
    }

    /// A port on a socket made or adopted without libxdp (`adopt`, `bind_shared`).
    #[allow(clippy::type_complexity)]
    fn own(
        ifname: &str,
        ifindex: u32,
        fd: OwnedFd,
        maps: RingMaps,
        (rx, tx, fill, comp): (
            Box<sys::xsk_ring_cons>,
            Box<sys::xsk_ring_prod>,
            Box<sys::xsk_ring_prod>,
            Box<sys::xsk_ring_cons>,
        ),
        in_tx: u32,
        sg: bool,
    ) -> XskPort {
        let raw_fd = fd.as_raw_fd();
        XskPort {
            ifname: ifname.to_string(),
            ifindex,
            queue: 0,
            raw: core::ptr::null_mut(),
            _own: Some(OwnSocket { _maps: maps, _fd: fd }),
            fd: raw_fd,
            rx,
            tx,
            fill,
            comp,
            in_tx,
            sg,
        }
    }

    /// The sizes of this socket's rings (for a successor, with `dup_fd`).
    pub fn ring_sizes(&self) -> RingSizes {
        RingSizes { rx: self.rx.size, tx: self.tx.size, fill: self.fill.size, comp: self.comp.size }
    }

    /// A second descriptor of this socket, for a successor: the socket lives while either is open.
    pub fn dup_fd(&self) -> Result<OwnedFd, XskError> {
        // SAFETY: self.fd is open for as long as self lives.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
            .try_clone_to_owned()
            .map_err(|source| XskError { what: format!("duplicating {}'s socket", self.ifname), source })
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        umem: &mut Umem,
        name: &CString,
        ifname: &str,
        cfg: PortConfig,
        bind_flags: u16,
        rx: &mut Box<sys::xsk_ring_cons>,
        tx: &mut Box<sys::xsk_ring_prod>,
        fill: &mut Box<sys::xsk_ring_prod>,
        comp: &mut Box<sys::xsk_ring_cons>,
    ) -> Result<(*mut sys::xsk_socket, RawFd), XskError> {
        let scfg = sys::xsk_socket_config {
            rx_size: cfg.ring_size,
            tx_size: cfg.ring_size,
            __bindgen_anon_1: sys::xsk_socket_config__bindgen_ty_1 {
                libxdp_flags: sys::XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
            },
            xdp_flags: 0,
            bind_flags,
        };
        let mut raw = core::ptr::null_mut();
        // SAFETY: umem.raw is a live UMEM; the four ring structs are boxed (stable addresses
        // for as long as the socket lives: libxdp keeps pointers to them).
        let rc = unsafe {
            sys::xsk_socket__create_shared(
                &mut raw,
                name.as_ptr(),
                0,
                umem.raw,
                &mut **rx,
                &mut **tx,
                &mut **fill,
                &mut **comp,
                &scfg,
            )
        };
        if rc != 0 {
            return Err(os_err(format!("binding an AF_XDP socket on {ifname} queue 0"), rc));
        }
        // SAFETY: raw is the socket just created.
        let fd = unsafe { sys::xsk_socket__fd(raw) };
        Ok((raw, fd))
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The kernel's own counters for this socket (`XDP_STATISTICS`): frames it dropped after
    /// the XDP program redirected them (rx ring full, no fill ring entries), invalid
    /// descriptors. What the pipeline cannot see, made visible.
    pub fn kernel_stats(&self) -> Result<SocketStats, XskError> {
        // SAFETY: a plain C struct of u64s; all-zero is valid.
        let mut st: sys::xdp_statistics = unsafe { core::mem::zeroed() };
        let mut len = core::mem::size_of::<sys::xdp_statistics>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `st`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_XDP,
                sys::XDP_STATISTICS as i32,
                (&mut st as *mut sys::xdp_statistics).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(last_err(format!("XDP_STATISTICS on {}", self.ifname)));
        }
        Ok(SocketStats {
            rx_dropped: st.rx_dropped,
            rx_invalid_descs: st.rx_invalid_descs,
            tx_invalid_descs: st.tx_invalid_descs,
            rx_ring_full: st.rx_ring_full,
            rx_fill_ring_empty: st.rx_fill_ring_empty_descs,
            tx_ring_empty: st.tx_ring_empty_descs,
        })
    }

    /// Entries of the fill ring the kernel has not consumed yet (one read of its consumer
    /// index, no syscall).
    #[inline]
    pub(crate) fn fill_unconsumed(&mut self) -> u32 {
        let size = self.fill.size;
        // SAFETY: fill is this socket's live ring; asking for `size` free entries makes libxdp
        // refresh its cached consumer index from the kernel's.
        let free = unsafe { sys::xsk_prod_nb_free(&mut *self.fill, size) };
        size.saturating_sub(free)
    }

    /// Frames on the tx ring the kernel has not taken yet (one read of its consumer index).
    #[inline]
    pub(crate) fn tx_unsent(&mut self) -> u32 {
        let size = self.tx.size;
        // SAFETY: tx is this socket's live ring; as in `fill_unconsumed`.
        let free = unsafe { sys::xsk_prod_nb_free(&mut *self.tx, size) };
        size.saturating_sub(free)
    }

    /// Kicks until the kernel has taken everything on the tx ring, at most `max_kicks` times.
    /// Copy mode sends at most 32 frames per sendto(2) (the kernel's `TX_BATCH_SIZE`), so one
    /// kick per pass would cap an egress at 32 frames per pass however many were queued; the
    /// syscalls are the transmit work itself, paid per 32 frames. Stops early when the kernel
    /// refuses (busy, or nothing it asked to be woken for).
    pub(crate) fn push_tx(&mut self, max_kicks: u32) {
        for _ in 0..max_kicks {
            // SAFETY: tx is this socket's live ring.
            if self.tx_unsent() == 0 || unsafe { sys::xsk_ring_prod__needs_wakeup(&*self.tx) } == 0 {
                return;
            }
            // SAFETY: a zero-length sendto on our own socket.
            let rc = unsafe { libc::sendto(self.fd, core::ptr::null(), 0, libc::MSG_DONTWAIT, core::ptr::null(), 0) };
            if rc < 0 {
                return;
            }
        }
    }

    /// Kicks the kernel to transmit (copy mode transmits from sendto), if it asked for it.
    #[inline]
    pub(crate) fn kick_tx(&self) {
        // SAFETY: tx is this socket's live ring.
        if unsafe { sys::xsk_ring_prod__needs_wakeup(&*self.tx) } != 0 {
            // SAFETY: a zero-length sendto on our own socket; EAGAIN/EBUSY/ENOBUFS are fine
            // (the kernel is busy transmitting and will see the ring).
            unsafe { libc::sendto(self.fd, core::ptr::null(), 0, libc::MSG_DONTWAIT, core::ptr::null(), 0) };
        }
    }

    /// Wakes the kernel to pick up fill ring entries, if it asked for it.
    #[inline]
    pub(crate) fn kick_fill(&self) {
        // SAFETY: fill is this socket's live ring.
        if unsafe { sys::xsk_ring_prod__needs_wakeup(&*self.fill) } != 0 {
            // SAFETY: a zero-length non-blocking recvfrom on our own socket.
            unsafe {
                libc::recvfrom(
                    self.fd,
                    core::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    core::ptr::null_mut(),
                    core::ptr::null_mut(),
                )
            };
        }
    }
}

impl Drop for XskPort {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: raw came from xsk_socket__create_shared and is deleted once.
            unsafe { sys::xsk_socket__delete(self.raw) };
        }
        // An own socket's rings are unmapped and its fd closed as `own` drops.
    }
}

/// Maps the four rings of socket `fd` (sizes `sizes`) and points the ring structs at them,
/// their cached indices read from the kernel's (a socket may have been in use by another
/// process: its rings go on from there).
fn map_rings(
    fd: RawFd,
    ifname: &str,
    sizes: RingSizes,
    rx: &mut sys::xsk_ring_cons,
    tx: &mut sys::xsk_ring_prod,
    fill: &mut sys::xsk_ring_prod,
    comp: &mut sys::xsk_ring_cons,
) -> Result<RingMaps, XskError> {
    // SAFETY: a plain C struct of offsets; all-zero is valid.
    let mut off: sys::xdp_mmap_offsets = unsafe { core::mem::zeroed() };
    let mut len = core::mem::size_of::<sys::xdp_mmap_offsets>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `off`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            sys::XDP_MMAP_OFFSETS as i32,
            (&mut off as *mut sys::xdp_mmap_offsets).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(last_err(format!("XDP_MMAP_OFFSETS of {ifname}'s socket")));
    }
    let desc = core::mem::size_of::<sys::xdp_desc>() as u64;
    let addr = core::mem::size_of::<u64>() as u64;
    let plan = [
        (u64::from(sys::XDP_PGOFF_RX_RING), off.rx, u64::from(sizes.rx) * desc),
        (u64::from(sys::XDP_PGOFF_TX_RING), off.tx, u64::from(sizes.tx) * desc),
        (sys::XDP_UMEM_PGOFF_FILL_RING, off.fr, u64::from(sizes.fill) * addr),
        (sys::XDP_UMEM_PGOFF_COMPLETION_RING, off.cr, u64::from(sizes.comp) * addr),
    ];
    let mut maps = RingMaps([(core::ptr::null_mut(), 0); 4]);
    for (k, (pgoff, o, bytes)) in plan.iter().enumerate() {
        let len = (o.desc + bytes) as usize;
        // SAFETY: mapping a ring of our socket at the offset the kernel names for it; the
        // result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                *pgoff as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_err(format!("mapping ring {k} of {ifname}'s socket ({len} bytes)")));
        }
        maps.0[k] = (p, len);
    }
    let at = |k: usize, o: u64| -> *mut u8 {
        // SAFETY: o is inside mapping k (the kernel's offsets, within the length mapped).
        unsafe { maps.0[k].0.cast::<u8>().add(o as usize) }
    };
    // SAFETY: the index words are u32s the kernel keeps aligned in the mappings.
    let load = |p: *mut u8| unsafe { AtomicU32::from_ptr(p.cast()) }.load(Ordering::Acquire);
    macro_rules! point {
        ($ring:expr, $k:expr, $o:expr, $size:expr, $producer_side:expr) => {{
            let (producer, consumer) = (at($k, $o.producer), at($k, $o.consumer));
            $ring.mask = $size - 1;
            $ring.size = $size;
            $ring.producer = producer.cast();
            $ring.consumer = consumer.cast();
            $ring.ring = at($k, $o.desc).cast();
            $ring.flags = at($k, $o.flags).cast();
            $ring.cached_prod = load(producer);
            // libxdp keeps a producer ring's cached consumer one ring ahead (free = cons - prod).
            $ring.cached_cons = load(consumer).wrapping_add(if $producer_side { $size } else { 0 });
        }};
    }
    point!(rx, 0, off.rx, sizes.rx, false);
    point!(tx, 1, off.tx, sizes.tx, true);
    point!(fill, 2, off.fr, sizes.fill, true);
    point!(comp, 3, off.cr, sizes.comp, false);
    Ok(maps)
}
