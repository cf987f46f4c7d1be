//! The aggregated-frame transmit path toward a pod: one flush of the frames staged for a pod
//! port, merged by [`dataplane::gro`] and sent through the port's [`PacketTx`] with
//! `sendmmsg`, each message a virtio-net header and iovecs straight into the UMEM (the head
//! frame whole, then the other members' payloads): no copy here, one in the kernel.
//!
//! Contract: every staged frame is accounted for in the returned [`Flushed`] (sent, refused by
//! the kernel, or not tried because the socket buffer was full), and the UMEM chunks of all of
//! them are free again when [`BulkTx::flush`] returns (the kernel copied what it took). The
//! scratch buffers grow to the largest flush seen and are reused: no allocation once warm.

use crate::packet::PacketTx;
use crate::port::XDP_PKT_CONTD;
use crate::umem::Umem;
use dataplane::gro::Coalescer;
use dataplane::wire::virtio_net::{self, VirtioNetHdr};

/// What one flush did, in segments (the frames as staged) and messages (what went out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Flushed {
    pub sent_segments: u64,
    pub sent_bytes: u64,
    /// Messages carrying two segments or more, and the segments inside them.
    pub aggregated: u64,
    pub aggregated_segments: u64,
    pub refused_segments: u64,
    pub full_segments: u64,
    pub last_error: Option<i32>,
}

#[derive(Default)]
pub(crate) struct BulkTx {
    gro: Coalescer,
    /// Logical frames: (first staged descriptor, descriptors).
    frames: Vec<(u32, u32)>,
    hdrs: Vec<[u8; virtio_net::LEN]>,
    iov: Vec<libc::iovec>,
    /// Per message: (first iovec, iovecs, segments).
    spans: Vec<(u32, u32, u32)>,
    msgs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for BulkTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkTx").field("frames", &self.frames.len()).finish_non_exhaustive()
    }
}

impl BulkTx {
    /// Sends `staged` (descriptors into `umem` that the caller holds; a chain's pieces carry
    /// `XDP_PKT_CONTD`) through `sock`.
    pub(crate) fn flush(&mut self, sock: &PacketTx, staged: &[(u64, u32, u32)], umem: &Umem) -> Flushed {
        let BulkTx { gro, frames, hdrs, iov, spans, msgs } = self;
        frames.clear();
        let mut k = 0;
        while k < staged.len() {
            let start = k;
            while k + 1 < staged.len() && staged[k].2 & XDP_PKT_CONTD != 0 {
                k += 1;
            }
            k += 1;
            frames.push((start as u32, (k - start) as u32));
        }
        let view = |i: usize| -> Option<&[u8]> {
            let &(s, n) = frames.get(i)?;
            let &(addr, len, _) = staged.get(s as usize)?;
            if n != 1 {
                return None; // a chain goes on its own
            }
            let p = umem.desc_ptr(addr, len)?;
            // SAFETY: the caller holds these chunks (staged, in no ring); nothing writes them
            // while the plan reads.
            Some(unsafe { core::slice::from_raw_parts(p, len as usize) })
        };
        let groups = gro.plan(frames.len(), view).len();
        hdrs.clear();
        iov.clear();
        spans.clear();
        // Reserved up front so that no push below moves the buffers the iovecs point into.
        hdrs.reserve(groups);
        iov.reserve(groups + staged.len());
        for g in gro.groups() {
            let (s, n) = frames[g.head as usize];
            let hdr = if g.count > 1 {
                let (addr, len, _) = staged[s as usize];
                match umem.desc_ptr(addr, len) {
                    // SAFETY: the head's chunk is ours and no other reference to it is live.
                    Some(p) => gro.finish(g, unsafe { core::slice::from_raw_parts_mut(p, len as usize) }),
                    None => VirtioNetHdr::default(),
                }
            } else {
                VirtioNetHdr::default()
            };
            let mut b = [0u8; virtio_net::LEN];
            hdr.emit(&mut b);
            hdrs.push(b);
            let first = iov.len() as u32;
            let h = hdrs.last().map_or(core::ptr::null(), |h| h.as_ptr());
            iov.push(libc::iovec { iov_base: h as *mut libc::c_void, iov_len: virtio_net::LEN });
            if g.count > 1 {
                let (addr, len, _) = staged[s as usize];
                push_desc(iov, umem, addr, len, 0);
                for (m, at) in gro.members(g) {
                    let (ms, _) = frames[m];
                    let (addr, len, _) = staged[ms as usize];
                    push_desc(iov, umem, addr, len, at);
                }
            } else {
                for &(addr, len, _) in &staged[s as usize..(s + n) as usize] {
                    push_desc(iov, umem, addr, len, 0);
                }
            }
            spans.push((first, iov.len() as u32 - first, g.count));
        }
        msgs.clear();
        for &(first, n, _) in spans.iter() {
            // SAFETY: mmsghdr is plain data; zeroed is a valid value (no name, no control).
            let mut m: libc::mmsghdr = unsafe { core::mem::zeroed() };
            // SAFETY: `first..first+n` are iovecs pushed above, within `iov`.
            m.msg_hdr.msg_iov = unsafe { iov.as_mut_ptr().add(first as usize) };
            m.msg_hdr.msg_iovlen = n as _;
            msgs.push(m);
        }
        // SAFETY: every iovec points at a header in `hdrs` or at UMEM bytes of chunks the
        // caller holds; neither moves nor is freed during the call.
        let sent = unsafe { sock.send(msgs) };
        let mut out = Flushed { last_error: sent.last_error, ..Flushed::default() };
        let tried = msgs.len() - sent.full;
        for (i, (m, &(_, _, segs))) in msgs.iter().zip(spans.iter()).enumerate() {
            let segs = u64::from(segs);
            if i >= tried {
                out.full_segments += segs;
            } else if m.msg_len == 0 {
                out.refused_segments += segs;
            } else {
                out.sent_segments += segs;
                out.sent_bytes += u64::from(m.msg_len).saturating_sub(virtio_net::LEN as u64);
                if segs > 1 {
                    out.aggregated += 1;
                    out.aggregated_segments += segs;
                }
            }
        }
        out
    }
}

/// An iovec over descriptor `addr`/`len` from byte `skip` on (nothing if it is not in the
/// UMEM: the frame goes shorter and the kernel or the pod judges it).
fn push_desc(iov: &mut Vec<libc::iovec>, umem: &Umem, addr: u64, len: u32, skip: usize) {
    if let Some(p) = umem.desc_ptr(addr, len) {
        let skip = skip.min(len as usize);
        // SAFETY: `skip <= len`, inside the descriptor.
        let base = unsafe { p.add(skip) };
        iov.push(libc::iovec { iov_base: base.cast(), iov_len: len as usize - skip });
    }
}
