//! A minimal rtnetlink client: the route toward an address (RTM_GETROUTE), the neighbour
//! table (RTM_GETNEIGH dump), and a subscription to neighbour and IPv4 route changes so the
//! underlay next hops are refreshed when the kernel's tables change.
#![allow(unsafe_code)] // socket(2), bind(2), send(2), recv(2) on a netlink socket; each call is commented.

use core::net::Ipv4Addr;
use dataplane::wire::MacAddr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
/// Multicast groups: link, neighbour and IPv4 route changes.
pub const RTMGRP_LINK: u32 = 0x1;
pub const RTMGRP_NEIGH: u32 = 0x4;
pub const RTMGRP_IPV4_ROUTE: u32 = 0x40;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A NETLINK_ROUTE socket.
#[derive(Debug)]
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    /// Opens a socket, subscribed to `groups` (0 for requests only).
    pub fn open(groups: u32) -> io::Result<Rtnl> {
        // SAFETY: creating a socket; the fd is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; we set family and groups.
        let mut addr: libc::sockaddr_nl = unsafe { core::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = groups;
        // SAFETY: binding our socket to a valid sockaddr_nl of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                core::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Rtnl { fd, seq: 1 })
    }

    fn send(&mut self, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDR + body.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&msg_type.to_ne_bytes());
        m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        // SAFETY: sending our own initialised buffer on our socket (to the kernel, pid 0).
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives one datagram (one or more netlink messages).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into our own buffer of the given length.
        let rc = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// Sends a request and collects the (type, payload) of every reply message until the
    /// answer is complete (NLMSG_DONE for dumps, the single reply otherwise).
    fn request(&mut self, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let seq = self.send(msg_type, flags, body)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32768];
        loop {
            let n = self.recv(&mut buf)?;
            for (ty, s, payload) in messages(&buf[..n]) {
                if s != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = payload.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => {
                        out.push((ty, payload.to_vec()));
                        if !dump {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }

    /// The route toward `dst`: (gateway if any, output interface index).
    pub fn route_get(&mut self, dst: Ipv4Addr) -> io::Result<(Option<Ipv4Addr>, u32)> {
        let mut body = vec![0u8; 12];
        body[0] = libc::AF_INET as u8;
        body[1] = 32; // dst_len
        push_attr(&mut body, RTA_DST, &dst.octets());
        let replies = self.request(RTM_GETROUTE, 0, &body)?;
        let (_, p) = replies.into_iter().find(|(t, _)| *t == RTM_NEWROUTE).ok_or(io::ErrorKind::NotFound)?;
        let mut gw = None;
        let mut oif = 0;
        for (ty, data) in attrs(p.get(12..).unwrap_or_default()) {
            match (ty, data.len()) {
                (RTA_GATEWAY, 4) => gw = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
                (RTA_OIF, 4) => oif = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
                _ => {}
            }
        }
        Ok((gw, oif))
    }

    /// The usable link-layer address of neighbour `ip` on interface `ifindex`, if known.
    pub fn neigh_get(&mut self, ip: Ipv4Addr, ifindex: u32) -> io::Result<Option<MacAddr>> {
        let mut body = vec![0u8; 12];
        body[0] = libc::AF_INET as u8;
        let replies = self.request(RTM_GETNEIGH, NLM_F_DUMP, &body)?;
        for (ty, p) in replies {
            if ty != RTM_NEWNEIGH || p.len() < 12 {
                continue;
            }
            let idx = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
            let state = u16::from_ne_bytes([p[8], p[9]]);
            if idx != ifindex || state & (NUD_INCOMPLETE | NUD_FAILED) != 0 {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for (t, d) in attrs(&p[12..]) {
                match (t, d.len()) {
                    (NDA_DST, 4) => dst = Some(Ipv4Addr::new(d[0], d[1], d[2], d[3])),
                    (NDA_LLADDR, 6) => mac = Some(MacAddr::from_bytes(d)),
                    _ => {}
                }
            }
            if dst == Some(ip) {
                return Ok(mac);
            }
        }
        Ok(None)
    }
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

/// Splits a datagram into (type, seq, payload) messages; stops at anything malformed.
fn messages(mut b: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        out.push((ty, seq, &b[NLMSG_HDR..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

/// Splits route attributes into (type, data); stops at anything malformed.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        if len < 4 || len > b.len() {
            break;
        }
        out.push((u16::from_ne_bytes([b[2], b[3]]) & 0x3fff, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

/// Resolves the MAC of the next hop toward `dst`; if the neighbour is not resolved yet, asks
/// the kernel to resolve it (a datagram to the discard port makes it ARP) and looks again.
pub fn next_hop_mac(dst: Ipv4Addr) -> io::Result<Option<MacAddr>> {
    let mut rt = Rtnl::open(0)?;
    let (gw, oif) = rt.route_get(dst)?;
    let hop = gw.unwrap_or(dst);
    if let Some(m) = rt.neigh_get(hop, oif)? {
        return Ok(Some(m));
    }
    if let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = s.send_to(&[], (hop, 9));
    }
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Some(m) = rt.neigh_get(hop, oif)? {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

/// Calls `changed`, on a thread, every time the kernel's links, neighbours or IPv4 routes
/// change. The thread ends when the socket fails.
pub fn watch(changed: impl Fn() + Send + 'static) -> io::Result<std::thread::JoinHandle<()>> {
    let rt = Rtnl::open(RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE)?;
    std::thread::Builder::new().name("vxnat-rtnl".into()).spawn(move || {
        let mut buf = vec![0u8; 16384];
        while rt.recv(&mut buf).is_ok() {
            changed();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_and_messages_parse_and_stop_on_garbage() {
        let mut b = Vec::new();
        push_attr(&mut b, RTA_GATEWAY, &[10, 0, 0, 1]);
        push_attr(&mut b, RTA_OIF, &7u32.to_ne_bytes());
        b.extend_from_slice(&[0xff, 0xff, 1]); // truncated garbage
        let a = attrs(&b);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], (RTA_GATEWAY, &[10u8, 0, 0, 1][..]));
        assert!(messages(&[0u8; 10]).is_empty());
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&5u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        assert_eq!(messages(&m), vec![(NLMSG_DONE, 5, &[0u8; 4][..])]);
    }

    /// Against the real kernel: the loopback route has no gateway and goes out `lo`.
    #[test]
    fn route_to_loopback_from_the_kernel() {
        let mut rt = Rtnl::open(0).expect("netlink socket");
        let (gw, oif) = rt.route_get(Ipv4Addr::LOCALHOST).expect("route get");
        assert_eq!(gw, None);
        assert_eq!(oif, crate::netinfo::ifindex("lo").expect("lo"));
    }
}
