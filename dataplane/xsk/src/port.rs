//! One AF_XDP socket bound to (interface, queue 0) on the worker's shared UMEM, with its own
//! rx/tx rings and fill/completion rings (shared UMEM across devices, Linux 5.10+).

use crate::umem::Umem;
use crate::{last_err, os_err, XskError};
use libxdp_sys as sys;
use std::ffi::CString;
use std::os::fd::RawFd;

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

pub struct XskPort {
    pub ifname: String,
    pub ifindex: u32,
    pub queue: u32,
    raw: *mut sys::xsk_socket,
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
        XskPort { ifname: ifname.to_string(), ifindex, queue: 0, raw, fd, rx, tx, fill, comp, in_tx: 0, sg }
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
        // SAFETY: raw came from xsk_socket__create_shared and is deleted once.
        unsafe { sys::xsk_socket__delete(self.raw) };
    }
}
