//! ARP conflict detection on the uplink (incident 3: another host answering ARP for an
//! address, so some nodes send to the wrong machine). A packet socket sees a copy of the ARP
//! the node's kernel receives (the XDP program passes ARP to the kernel; a socket for one
//! protocol gets no copy of what the node itself sends); when two MACs claim one IPv4 address
//! within a minute, that is a conflict: counted, logged once per new pair, listed by
//! `vxnat ctl stats` and exported as a metric.
//!
//! The socket is opened by `socket2` (AF_PACKET, raw, ETH_P_ARP, non-blocking) and bound to
//! the uplink by `nix`, with the uplink's own link-layer address as getifaddrs(3) lists it:
//! every system call goes through those crates' safe APIs.

use core::net::Ipv4Addr;
use dataplane::wire::MacAddr;
use nix::sys::socket::LinkAddr;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Two claims further apart than this are a change of owner, not a conflict.
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose last claim is remembered at most (a link's hosts, with room; ARP with
/// made-up sender addresses would otherwise grow the map without end).
const MAX_CLAIMS: usize = 65_536;
/// Addresses in conflict remembered at most.
const MAX_CONFLICTS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub ip: Ipv4Addr,
    pub macs: BTreeSet<MacAddr>,
    /// Claims that disagreed with the previous one.
    pub count: u64,
}

/// The claims seen on one link and the conflicts among them.
#[derive(Debug)]
pub struct ArpClaims {
    pub ifname: String,
    last: HashMap<Ipv4Addr, (MacAddr, Instant)>,
    conflicts: BTreeMap<Ipv4Addr, Conflict>,
    /// Claims not checked for want of room (new addresses while `last` is full of recent
    /// ones, new conflicts past `MAX_CONFLICTS`).
    pub untracked: u64,
    /// When a full `last` may next be pruned (at most once per second: a prune is a scan).
    prune_at: Option<Instant>,
}

/// The packet socket and the claims it feeds.
#[derive(Debug)]
pub struct ArpWatch {
    sock: Socket,
    pub claims: ArpClaims,
}

/// Why the ARP watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ARP watch: no interface {0}")]
    NoInterface(String),
    #[error("ARP watch: listing interfaces: {0}")]
    Interfaces(nix::Error),
    #[error("ARP watch on {ifname}: {err}")]
    Socket { ifname: String, err: io::Error },
    #[error("ARP watch on {ifname}: bind: {err}")]
    Bind { ifname: String, err: nix::Error },
}

const ETH_P_ARP: u16 = 0x0806;

impl ArpWatch {
    /// A non-blocking packet socket for ARP on `ifname`.
    pub fn open(ifname: &str) -> Result<ArpWatch, Error> {
        let link = link_address(ifname)?;
        // packet(7) takes the protocol in network byte order.
        let arp = Protocol::from(i32::from(ETH_P_ARP.to_be()));
        let sock = Socket::new(Domain::PACKET, Type::RAW.nonblocking(), Some(arp))
            .map_err(|err| Error::Socket { ifname: ifname.to_string(), err })?;
        nix::sys::socket::bind(sock.as_raw_fd(), &link)
            .map_err(|err| Error::Bind { ifname: ifname.to_string(), err })?;
        Ok(ArpWatch { sock, claims: ArpClaims::new(ifname) })
    }

    /// Reads every ARP frame waiting; returns log lines for conflicts seen for the first time
    /// (or with a new MAC).
    pub fn poll(&mut self) -> Vec<String> {
        let mut logs = Vec::new();
        let mut buf = [0u8; 128];
        // Until nothing is waiting (the socket is non-blocking) or it fails.
        while let Ok(n @ 1..) = (&self.sock).read(&mut buf) {
            if let Some(l) = self.claims.observe(&buf[..n], Instant::now()) {
                logs.push(l);
            }
        }
        logs
    }
}

/// The AF_PACKET address of `ifname` as getifaddrs(3) lists it, which is what bind(2) needs to
/// tie a packet socket to that interface: only its interface index and protocol count, and
/// its protocol is 0, which the kernel reads as "keep the socket's own" (ETH_P_ARP). nix
/// offers no constructor for a link-layer address (nix issue 2059), so it is taken from the
/// kernel's own list of links rather than built.
fn link_address(ifname: &str) -> Result<LinkAddr, Error> {
    nix::ifaddrs::getifaddrs()
        .map_err(Error::Interfaces)?
        .filter(|a| a.interface_name == ifname)
        .find_map(|a| a.address.as_ref().and_then(|s| s.as_link_addr().copied()))
        .ok_or_else(|| Error::NoInterface(ifname.to_string()))
}

impl ArpClaims {
    pub fn new(ifname: &str) -> ArpClaims {
        ArpClaims {
            ifname: ifname.to_string(),
            last: HashMap::new(),
            conflicts: BTreeMap::new(),
            untracked: 0,
            prune_at: None,
        }
    }

    /// One ARP frame (Ethernet header included): the sender's claim.
    pub fn observe(&mut self, frame: &[u8], now: Instant) -> Option<String> {
        let a = frame.get(14..14 + 28)?;
        // Ethernet/IPv4 ARP only.
        if a[0..2] != [0, 1] || a[2..4] != [8, 0] || a[4] != 6 || a[5] != 4 {
            return None;
        }
        let sha = MacAddr([a[8], a[9], a[10], a[11], a[12], a[13]]);
        let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
        if spa.is_unspecified() || !sha.is_unicast() {
            return None;
        }
        if self.last.len() >= MAX_CLAIMS && !self.last.contains_key(&spa) {
            if self.prune_at.is_none_or(|t| now >= t) {
                self.last.retain(|_, (_, at)| now.duration_since(*at) <= WINDOW);
                self.prune_at = Some(now + Duration::from_secs(1));
            }
            if self.last.len() >= MAX_CLAIMS {
                self.untracked += 1;
                return (self.untracked == 1).then(|| {
                    format!(
                        "ARP on {}: {MAX_CLAIMS} addresses claimed within {}s, the most tracked; claims from new \
                         addresses go unchecked for conflicts until older ones age out",
                        self.ifname,
                        WINDOW.as_secs()
                    )
                });
            }
        }
        let prev = self.last.insert(spa, (sha, now));
        let (old, at) = prev?;
        if old == sha || now.duration_since(at) > WINDOW {
            return None;
        }
        if self.conflicts.len() >= MAX_CONFLICTS && !self.conflicts.contains_key(&spa) {
            self.untracked += 1;
            return None;
        }
        let c = self.conflicts.entry(spa).or_insert_with(|| Conflict { ip: spa, macs: BTreeSet::new(), count: 0 });
        c.count += 1;
        let new_pair = c.macs.insert(old) | c.macs.insert(sha);
        new_pair.then(|| {
            format!(
                "ARP conflict on {}: {spa} is claimed by {} (another host answers ARP for this address)",
                self.ifname,
                c.macs.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(" and ")
            )
        })
    }

    pub fn conflicts(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arp(op: u16, sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&sha);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 10]);
        f
    }

    /// ARP from made-up senders cannot grow the claims without end: past the cap, new
    /// addresses are counted and not tracked (said once), and once the old claims age out
    /// there is room again.
    #[test]
    fn a_flood_of_made_up_senders_is_bounded() {
        let mut w = ArpClaims::new("ul");
        let t0 = Instant::now();
        let mut said = Vec::new();
        for i in 0..(MAX_CLAIMS as u32 + 1000) {
            said.extend(w.observe(&arp(2, [2, 0, 0, 0, 0, 1], (0x0a00_0000 + i).to_be_bytes()), t0));
        }
        assert_eq!(w.last.len(), MAX_CLAIMS);
        assert_eq!(w.untracked, 1000);
        assert_eq!(said.len(), 1, "said once: {said:?}");
        assert!(said[0].contains("unchecked"), "{}", said[0]);
        let later = t0 + WINDOW + Duration::from_secs(2);
        assert_eq!(w.observe(&arp(2, [2, 0, 0, 0, 0, 2], [192, 168, 0, 1]), later), None);
        assert_eq!(w.last.len(), 1, "aged-out claims pruned to make room");
    }

    #[test]
    fn two_macs_for_one_ip_within_a_minute_is_a_conflict() {
        let mut w = ArpClaims::new("ul");
        let t0 = Instant::now();
        let ip = [192, 168, 77, 2];
        assert_eq!(w.observe(&arp(2, [2, 0, 0, 0, 0, 0xb], ip), t0), None);
        assert_eq!(w.observe(&arp(2, [2, 0, 0, 0, 0, 0xb], ip), t0), None, "the same claim again");
        let log = w.observe(&arp(2, [2, 0, 0, 0, 0, 0x66], ip), t0 + Duration::from_millis(3)).expect("conflict");
        assert!(
            log.contains("ARP conflict on ul: 192.168.77.2 is claimed by 02:00:00:00:00:0b and 02:00:00:00:00:66"),
            "{log}"
        );
        assert_eq!(
            w.observe(&arp(2, [2, 0, 0, 0, 0, 0xb], ip), t0 + Duration::from_millis(5)),
            None,
            "logged once per pair"
        );
        let c: Vec<&Conflict> = w.conflicts().collect();
        assert_eq!((c.len(), c[0].count), (1, 2));
        // A change of owner after the window is not a conflict.
        let other = [192, 168, 77, 9];
        w.observe(&arp(2, [2, 0, 0, 0, 0, 1], other), t0);
        assert_eq!(w.observe(&arp(2, [2, 0, 0, 0, 0, 2], other), t0 + Duration::from_secs(120)), None);
    }

    #[test]
    fn the_socket_is_bound_with_the_interfaces_own_link_address() {
        let lo = link_address("lo").expect("lo is listed");
        assert_eq!(lo.ifindex(), crate::netinfo::ifindex("lo").expect("lo") as usize);
        assert_eq!(lo.protocol(), 0, "bind keeps the socket's protocol (ETH_P_ARP)");
        let e = link_address("nosuch0").expect_err("no such interface");
        assert_eq!(e.to_string(), "ARP watch: no interface nosuch0");
        assert_eq!(ArpWatch::open("nosuch0").expect_err("no such interface").to_string(), e.to_string());
    }

    /// Against the real kernel (needs CAP_NET_RAW): conflicting claims sent on `lo` are read
    /// from the socket bound there, and a poll with nothing waiting returns at once. The frames
    /// go to a MAC that is not lo's, so the node's own ARP ignores them.
    #[test]
    fn claims_sent_on_a_link_are_read_from_its_socket() {
        let mut rx = match ArpWatch::open("lo") {
            Ok(w) => w,
            Err(Error::Socket { err, .. }) if err.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: opening a packet socket needs CAP_NET_RAW");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // Bound to lo, for ARP: the protocol 0 of the listed address kept the socket's own.
        let bound: nix::sys::socket::SockaddrStorage =
            nix::sys::socket::getsockname(rx.sock.as_raw_fd()).expect("getsockname");
        let bound = bound.as_link_addr().expect("a packet socket address");
        assert_eq!(bound.ifindex(), crate::netinfo::ifindex("lo").expect("lo") as usize);
        assert_eq!(bound.protocol(), ETH_P_ARP.to_be());
        let tx = ArpWatch::open("lo").expect("second socket");
        let started = Instant::now();
        assert!(rx.poll().is_empty());
        assert!(started.elapsed() < Duration::from_secs(1), "poll must not block");
        let ip = [192, 0, 2, 77];
        for sha in [[2, 0, 0, 0, 0, 0xb], [2, 0, 0, 0, 0, 0x66]] {
            let mut f = arp(2, sha, ip);
            f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
            tx.sock.send(&f).expect("send on lo");
        }
        let mut logs = Vec::new();
        while logs.is_empty() && started.elapsed() < Duration::from_secs(2) {
            logs = rx.poll();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            logs,
            ["ARP conflict on lo: 192.0.2.77 is claimed by 02:00:00:00:00:0b and 02:00:00:00:00:66 (another host answers ARP for this address)"]
        );
        assert_eq!(rx.claims.conflicts().map(|c| (c.ip, c.count)).collect::<Vec<_>>(), [(Ipv4Addr::from(ip), 1)]);
    }
}
