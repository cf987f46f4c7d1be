//! A minimal rtnetlink client: the route toward an address (RTM_GETROUTE), the neighbour
//! table (RTM_GETNEIGH dump), and a subscription to link, neighbour and IPv4 route changes so
//! the underlay next hops are refreshed when the kernel's tables change.
//!
//! Messages are built and parsed by `netlink-packet-route` (on `netlink-packet-core`'s
//! framing) and travel over `netlink-sys`'s synchronous socket, in process: every system call
//! goes through those crates' safe APIs, and no async runtime is involved. The answers are the
//! kernel's own tables, as `ip route get` and `ip neigh` show them.

use core::net::Ipv4Addr;
use dataplane::wire::MacAddr;
use netlink_packet_core::{NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;

/// Neighbour states whose link-layer address must not be used: still resolving, or failed.
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
/// Multicast groups: link, neighbour and IPv4 route changes.
pub const RTMGRP_LINK: u32 = 0x1;
pub const RTMGRP_NEIGH: u32 = 0x4;
pub const RTMGRP_IPV4_ROUTE: u32 = 0x40;
/// A reply datagram: the kernel fills a dump datagram up to 32 KiB, so one this size is never
/// truncated.
const REPLY_BUF: usize = 32768;
/// A change notification: only its arrival matters, not its content.
const NOTIFY_BUF: usize = 16384;

/// Why a lookup or the subscription failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink send: {0}")]
    Send(io::Error),
    #[error("netlink receive: {0}")]
    Recv(io::Error),
    /// The kernel refused the request (its errno, e.g. "Network is unreachable").
    #[error("{0}")]
    Kernel(io::Error),
    /// The kernel answered a route lookup without a route.
    #[error("no route in the kernel's answer")]
    NoRoute,
    #[error("starting the netlink watch thread: {0}")]
    Thread(io::Error),
}

/// A NETLINK_ROUTE socket.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a socket, subscribed to `groups` (0 for requests only).
    pub fn open(groups: u32) -> Result<Rtnl, Error> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        // Port number 0: the kernel assigns this socket's address.
        sock.bind(&SocketAddr::new(0, groups)).map_err(Error::Socket)?;
        Ok(Rtnl { sock, seq: 1 })
    }

    /// Receives one datagram (one or more netlink messages).
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
        self.sock.recv(&mut &mut buf[..], 0).map_err(Error::Recv)
    }

    /// Makes `recv` give up after `timeout` (a `WouldBlock` or `TimedOut` error), so a watch
    /// thread can notice it should stop; and asks for a receive buffer of `rcvbuf` bytes, so a
    /// burst of events (a node deleting many pods at once) is not lost.
    pub fn set_watch_options(&self, timeout: std::time::Duration, rcvbuf: usize) -> Result<(), Error> {
        let s = socket2::SockRef::from(&self.sock);
        s.set_read_timeout(Some(timeout)).map_err(Error::Socket)?;
        s.set_recv_buffer_size(rcvbuf).map_err(Error::Socket)
    }

    /// Sends a request to the kernel; returns its sequence number.
    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, Error> {
        self.seq = self.seq.wrapping_add(1);
        self.sock.send(&encode(msg, flags, self.seq), 0).map_err(Error::Send)?;
        Ok(self.seq)
    }

    /// Sends a request and collects every reply message until the answer is complete
    /// (NLMSG_DONE for dumps, the single reply otherwise). Messages answering other requests
    /// are skipped, and so is a reply that does not decode: one odd entry must not hide the
    /// rest of a dump.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, Error> {
        let seq = self.send(msg, flags)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut buf = vec![0u8; REPLY_BUF];
        loop {
            let n = self.recv(&mut buf)?;
            for (s, m) in messages(&buf[..n]) {
                if s != seq {
                    continue;
                }
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(m).map(|m| m.payload) {
                    Ok(NetlinkPayload::Done(_)) => return Ok(out),
                    // An error message with no error code is the kernel's acknowledgement.
                    Ok(NetlinkPayload::Error(e)) => {
                        return if e.code.is_none() { Ok(out) } else { Err(Error::Kernel(e.to_io())) };
                    }
                    Ok(NetlinkPayload::InnerMessage(r)) => out.push(r),
                    _ => {}
                }
                if !dump {
                    return Ok(out);
                }
            }
        }
    }

    /// The route toward `dst`: (gateway if any, output interface index).
    pub fn route_get(&mut self, dst: Ipv4Addr) -> Result<(Option<Ipv4Addr>, u32), Error> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        q.header.destination_prefix_length = 32;
        q.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        route_of(self.request(RouteNetlinkMessage::GetRoute(q), 0)?)
    }

    /// The usable link-layer address of neighbour `ip` on interface `ifindex`, if known.
    pub fn neigh_get(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<Option<MacAddr>, Error> {
        let mut q = NeighbourMessage::default();
        q.header.family = AddressFamily::Inet;
        Ok(neighbour_mac(&self.request(RouteNetlinkMessage::GetNeighbour(q), NLM_F_DUMP)?, ip, ifindex))
    }
}

/// One request as sent: a netlink header (`flags` plus NLM_F_REQUEST, sequence number `seq`,
/// to the kernel) and `msg`.
fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags | NLM_F_REQUEST;
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// Splits a datagram into (sequence number, whole message); stops at anything malformed.
pub(crate) fn messages(mut b: &[u8]) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    // `new_checked` refuses a header that is short or whose length runs past the datagram.
    while let Ok(nb) = NetlinkBuffer::new_checked(b) {
        let len = nb.length() as usize;
        out.push((nb.sequence_number(), &b[..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// The gateway and output interface of the first route in a RTM_GETROUTE answer.
fn route_of(replies: Vec<RouteNetlinkMessage>) -> Result<(Option<Ipv4Addr>, u32), Error> {
    let route = replies
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        })
        .ok_or(Error::NoRoute)?;
    let mut gw = None;
    let mut oif = 0;
    for a in route.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(g),
            RouteAttribute::Oif(i) => oif = i,
            _ => {}
        }
    }
    Ok((gw, oif))
}

/// The link-layer address of the first neighbour entry for `ip` on `ifindex` in a usable
/// state; `None` if there is none (or it has no Ethernet address).
fn neighbour_mac(replies: &[RouteNetlinkMessage], ip: Ipv4Addr, ifindex: u32) -> Option<MacAddr> {
    replies
        .iter()
        .find_map(|m| {
            let RouteNetlinkMessage::NewNeighbour(n) = m else { return None };
            if n.header.ifindex != ifindex || u16::from(n.header.state) & (NUD_INCOMPLETE | NUD_FAILED) != 0 {
                return None;
            }
            let mut dst = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(*d),
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => mac = Some(MacAddr::from_bytes(l)),
                    _ => {}
                }
            }
            (dst == Some(ip)).then_some(mac)
        })
        .flatten()
}

/// Resolves the MAC of the next hop toward `dst`; if the neighbour is not resolved yet, asks
/// the kernel to resolve it (a datagram to the discard port makes it ARP) and looks again.
pub fn next_hop_mac(dst: Ipv4Addr) -> Result<Option<MacAddr>, Error> {
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
pub fn watch(changed: impl Fn() + Send + 'static) -> Result<std::thread::JoinHandle<()>, Error> {
    let rt = Rtnl::open(RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE)?;
    std::thread::Builder::new()
        .name("vxnat-rtnl".into())
        .spawn(move || {
            let mut buf = vec![0u8; NOTIFY_BUF];
            while rt.recv(&mut buf).is_ok() {
                changed();
            }
        })
        .map_err(Error::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_route::neighbour::NeighbourState;

    /// A reply message as the kernel would send it.
    fn reply(payload: NetlinkPayload<RouteNetlinkMessage>, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(header, payload);
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn neighbour(ifindex: u32, state: NeighbourState, ip: [u8; 4], mac: &[u8]) -> RouteNetlinkMessage {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        n.header.ifindex = ifindex;
        n.header.state = state;
        n.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip.into())));
        n.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        RouteNetlinkMessage::NewNeighbour(n)
    }

    /// The requests are byte for byte what the kernel was sent before the crates built them.
    #[test]
    fn requests_are_the_classic_wire_format() {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        q.header.destination_prefix_length = 32;
        q.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 1, 2, 3))));
        let mut want = Vec::new();
        want.extend_from_slice(&36u32.to_ne_bytes());
        want.extend_from_slice(&26u16.to_ne_bytes()); // RTM_GETROUTE
        want.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // rtmsg: AF_INET, /32
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes()); // RTA_DST
        want.extend_from_slice(&[10, 1, 2, 3]);
        assert_eq!(encode(RouteNetlinkMessage::GetRoute(q), 0, 7), want);

        let mut q = NeighbourMessage::default();
        q.header.family = AddressFamily::Inet;
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&30u16.to_ne_bytes()); // RTM_GETNEIGH
        want.extend_from_slice(&0x301u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_DUMP
        want.extend_from_slice(&8u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // ndmsg: AF_INET
        assert_eq!(encode(RouteNetlinkMessage::GetNeighbour(q), NLM_F_DUMP, 8), want);
    }

    #[test]
    fn messages_split_and_stop_on_garbage() {
        assert!(messages(&[0u8; 10]).is_empty());
        let mut d = reply(NetlinkPayload::Done(DoneMessage::default()), 5);
        let first = d.len();
        d.extend_from_slice(&reply(NetlinkPayload::Error(ErrorMessage::default()), 6));
        d.extend_from_slice(&[0xff, 0xff, 1]); // truncated garbage
        let m = messages(&d);
        assert_eq!(m.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(m[0].1, &d[..first]);
        // A length running past the datagram ends the walk.
        let mut bad = reply(NetlinkPayload::Done(DoneMessage::default()), 9);
        bad[0] = 200;
        assert!(messages(&bad).is_empty());
    }

    #[test]
    fn route_answer_gives_gateway_and_interface() {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(192, 168, 9, 9))));
        r.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(192, 168, 77, 1))));
        r.attributes.push(RouteAttribute::Oif(4));
        // Through the wire and back, as the kernel's answer arrives.
        let wire = reply(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)), 3);
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&wire).expect("decodes");
        let NetlinkPayload::InnerMessage(m) = parsed.payload else { panic!("not a route") };
        assert_eq!(route_of(vec![m]).expect("route"), (Some(Ipv4Addr::new(192, 168, 77, 1)), 4));
        assert!(matches!(route_of(Vec::new()), Err(Error::NoRoute)));
    }

    #[test]
    fn only_a_usable_entry_on_the_interface_gives_a_mac() {
        let ip = [192, 168, 77, 2];
        let mac = [2, 0, 0, 0, 0, 0xb];
        let want = Some(MacAddr(mac));
        let on = |state| vec![neighbour(3, state, ip, &mac)];
        assert_eq!(neighbour_mac(&on(NeighbourState::Reachable), ip.into(), 3), want);
        assert_eq!(neighbour_mac(&on(NeighbourState::Stale), ip.into(), 3), want);
        assert_eq!(neighbour_mac(&on(NeighbourState::Permanent), ip.into(), 3), want);
        assert_eq!(neighbour_mac(&on(NeighbourState::Incomplete), ip.into(), 3), None);
        assert_eq!(neighbour_mac(&on(NeighbourState::Failed), ip.into(), 3), None);
        assert_eq!(neighbour_mac(&on(NeighbourState::Reachable), ip.into(), 4), None, "other interface");
        assert_eq!(neighbour_mac(&on(NeighbourState::Reachable), Ipv4Addr::new(192, 168, 77, 3), 3), None);
        // Unusable entries are passed over; the first usable one for the address decides, even
        // when it has no Ethernet address.
        let two = vec![
            neighbour(3, NeighbourState::Failed, ip, &[2, 0, 0, 0, 0, 1]),
            neighbour(3, NeighbourState::Reachable, ip, &[2, 0, 0, 0, 0, 2]),
        ];
        assert_eq!(neighbour_mac(&two, ip.into(), 3), Some(MacAddr([2, 0, 0, 0, 0, 2])));
        assert_eq!(neighbour_mac(&[neighbour(3, NeighbourState::Noarp, ip, &[])], ip.into(), 3), None);
    }

    /// Against the real kernel: the loopback route has no gateway and goes out `lo`.
    #[test]
    fn route_to_loopback_from_the_kernel() {
        let mut rt = Rtnl::open(0).expect("netlink socket");
        let (gw, oif) = rt.route_get(Ipv4Addr::LOCALHOST).expect("route get");
        assert_eq!(gw, None);
        assert_eq!(oif, crate::netinfo::ifindex("lo").expect("lo"));
    }

    /// Against the real kernel: a neighbour dump completes, and an address nobody has is not found.
    #[test]
    fn neighbour_dump_from_the_kernel() {
        let mut rt = Rtnl::open(0).expect("netlink socket");
        let lo = crate::netinfo::ifindex("lo").expect("lo");
        assert_eq!(rt.neigh_get(Ipv4Addr::new(192, 0, 2, 251), lo).expect("neighbour dump"), None);
        // The socket stays usable: sequence numbers keep the answers apart.
        assert!(rt.route_get(Ipv4Addr::LOCALHOST).is_ok());
    }
}
