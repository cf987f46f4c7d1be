//! A transmit-only AF_PACKET socket with a virtio-net header (`PACKET_VNET_HDR`) on a pod's
//! veth: the way an aggregated frame reaches a pod whole. AF_XDP cannot hand a veth a GSO frame
//! (`xsk_build_skb` builds a plain skb, and veth drops one longer than its MTU), so frames toward
//! a pod that [`dataplane::gro`] merged leave through this socket instead, as one skb with
//! `gso_type` TCPv4: the pod's stack takes 64 KiB in one pass.
//!
//! - Protocol 0: the socket receives nothing (transmit only), so it costs nothing on receive.
//! - `PACKET_QDISC_BYPASS`: straight to the driver, as AF_XDP transmit does.
//! - The kernel copies each message into a new skb inside `sendmmsg`: when the call returns the
//!   UMEM chunks the iovecs pointed at are free again (no completion ring to wait for).
//! - Non-blocking: a full socket buffer returns `EAGAIN`; the caller counts what was not sent.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One port's transmit socket.
#[derive(Debug)]
pub struct PacketTx {
    fd: OwnedFd,
}

impl PacketTx {
    /// Opens the socket on interface `ifindex`.
    pub fn open(ifindex: u32) -> io::Result<PacketTx> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        for opt in [libc::PACKET_VNET_HDR, libc::PACKET_QDISC_BYPASS] {
            // SAFETY: an int option, passed by pointer with its size.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    opt,
                    (&on as *const libc::c_int).cast(),
                    core::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { core::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = 0;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: binding to a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                core::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketTx { fd })
    }

    /// Sends `msgs` (each a virtio-net header and a frame, as iovecs), in order. Each sent
    /// message has its `msg_len` set by the kernel (set them to 0 before); a message the kernel
    /// refuses (a header it finds inconsistent, a frame too long) is skipped, its `msg_len`
    /// left at 0; a full socket buffer (`EAGAIN`/`ENOBUFS`) ends the call, the rest untried.
    ///
    /// # Safety
    /// Every iovec in `msgs` must point at memory readable for its length for the duration of
    /// the call.
    pub unsafe fn send(&self, msgs: &mut [libc::mmsghdr]) -> Sent {
        let mut out = Sent::default();
        let mut at = 0;
        while at < msgs.len() {
            let rest = &mut msgs[at..];
            // SAFETY: `rest` is a valid mmsghdr array; the caller vouches for the iovecs.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), rest.as_mut_ptr(), rest.len() as u32, 0) };
            if r > 0 {
                at += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                    out.full = msgs.len() - at;
                    break;
                }
                // The first message of `rest` was refused: skip it, go on with the others.
                _ => {
                    out.last_error = e.raw_os_error();
                    at += 1;
                }
            }
        }
        out
    }
}

/// What [`PacketTx::send`] could not say per message (sent and refused ones are told apart
/// by their `msg_len`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// The last messages, not tried: the socket buffer was full.
    pub full: usize,
    /// Why the kernel refused the last message it refused.
    pub last_error: Option<i32>,
}
