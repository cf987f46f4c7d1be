//! Pod ports whose interface vanishes are detached by themselves: a pod's veth deleted without
//! a detach (the runtime removed the sandbox without CNI DEL, or an `ip link del` by hand) must
//! not keep its port, its address and its UMEM share, nor hold the name against a new attach.
//!
//! Contract: a thread subscribed to rtnetlink's link group (through `crate::rtnl`, i.e.
//! `netlink-packet-route` over `netlink-sys`) reads every RTM_DELLINK of the node's namespace
//! and detaches the pod ports among them, by recorded interface index, as `vxnat ctl detach`
//! does (`Node::detach_vanished`: logged by name, counted in `ctl stats` and the metrics).
//! Nothing is missed: right after subscribing, whenever the kernel reports that events were
//! dropped (ENOBUFS: the socket's buffer overflowed), and every [`SWEEP`] regardless, every
//! pod's interface is checked instead. The thread ends within [`POLL`] of `stop`, or when the
//! node's lock is poisoned (the control loop then ends the process).

use crate::node::Node;
use crate::rtnl::{messages, Rtnl, RTMGRP_LINK};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the thread looks at `stop` while no event comes.
pub const POLL: Duration = Duration::from_millis(200);
/// How often every pod's interface is checked even without a reason to.
pub const SWEEP: Duration = Duration::from_secs(10);
/// The socket's receive buffer: a burst of events from a node deleting its pods at once fits.
const RCVBUF: usize = 1 << 20;
/// One datagram of link events (each is under 2 KiB; the kernel sends one per datagram).
const BUF: usize = 65536;

/// Starts the watch on a thread.
pub fn spawn(node: Arc<Mutex<Node>>, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>, crate::rtnl::Error> {
    let rt = open()?;
    std::thread::Builder::new()
        .name("vxnat-links".into())
        .spawn(move || watch(rt, &node, &stop))
        .map_err(crate::rtnl::Error::Thread)
}

fn open() -> Result<Rtnl, crate::rtnl::Error> {
    let rt = Rtnl::open(RTMGRP_LINK)?;
    rt.set_watch_options(POLL, RCVBUF)?;
    Ok(rt)
}

fn watch(mut rt: Rtnl, node: &Mutex<Node>, stop: &AtomicBool) {
    let mut buf = vec![0u8; BUF];
    // Anything that vanished before the subscription (after the re-attach at start) too.
    let mut sweep = true;
    let mut swept = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if sweep || swept.elapsed() >= SWEEP {
            let Ok(mut n) = node.lock() else { return };
            n.detach_vanished(None);
            (sweep, swept) = (false, Instant::now());
        }
        match rt.recv(&mut buf) {
            Ok(len) => {
                let deleted = deleted_links(&buf[..len]);
                if !deleted.is_empty() {
                    let Ok(mut n) = node.lock() else { return };
                    n.detach_vanished(Some(&deleted));
                }
            }
            Err(crate::rtnl::Error::Recv(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(crate::rtnl::Error::Recv(e)) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                tracing::warn!("link events were lost (socket buffer full); checking every pod's interface");
                sweep = true;
            }
            Err(e) => {
                tracing::warn!("link events: {e}; subscribing again in 1 s (every pod's interface is checked then)");
                std::thread::sleep(Duration::from_secs(1));
                match open() {
                    Ok(r) => rt = r,
                    Err(e) => tracing::warn!("link events: {e}"),
                }
                sweep = true;
            }
        }
    }
}

/// The (index, name) of every link a datagram of link events says was deleted.
pub fn deleted_links(datagram: &[u8]) -> Vec<(u32, String)> {
    messages(datagram)
        .into_iter()
        .filter_map(|(_, m)| match NetlinkMessage::<RouteNetlinkMessage>::deserialize(m).ok()?.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                let name = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                });
                Some((l.header.index, name.unwrap_or_default()))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkMessage;

    fn event(msg: RouteNetlinkMessage) -> Vec<u8> {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn link(index: u32, name: &str) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        l
    }

    #[test]
    fn only_deleted_links_are_reported_with_index_and_name() {
        let mut d = event(RouteNetlinkMessage::NewLink(link(5, "vxa1")));
        d.extend(event(RouteNetlinkMessage::DelLink(link(7, "vxa2"))));
        d.extend(event(RouteNetlinkMessage::DelLink(LinkMessage::default())));
        assert_eq!(deleted_links(&d), vec![(7, "vxa2".to_string()), (0, String::new())]);
        assert!(deleted_links(&[1, 2, 3]).is_empty(), "garbage");
    }
}
