//! ARP conflict detection on the uplink (incident 3: another host answering ARP for an
//! address, so some nodes send to the wrong machine). A packet socket sees a copy of the ARP
//! the node's kernel receives and sends (the XDP program passes ARP to the kernel); when two
//! MACs claim one IPv4 address within a minute, that is a conflict: counted, logged once per
//! new pair, listed by `vxnat ctl stats` and exported as a metric.

use core::net::Ipv4Addr;
use dataplane::wire::MacAddr;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Two claims further apart than this are a change of owner, not a conflict.
const WINDOW: Duration = Duration::from_secs(60);

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
}

/// The packet socket and the claims it feeds.
#[derive(Debug)]
pub struct ArpWatch {
    fd: OwnedFd,
    pub claims: ArpClaims,
}

const ETH_P_ARP: u16 = 0x0806;

impl ArpWatch {
    /// A non-blocking packet socket for ARP on `ifname`.
    #[allow(unsafe_code)]
    pub fn open(ifname: &str) -> Result<ArpWatch, String> {
        let name = std::ffi::CString::new(ifname).map_err(|_| format!("{ifname:?}: bad interface name"))?;
        // SAFETY: plain socket calls with valid arguments; the fd is owned from here on.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            if ifindex == 0 {
                return Err(format!("ARP watch: no interface {ifname}"));
            }
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            );
            if fd < 0 {
                return Err(format!("ARP watch on {ifname}: {}", std::io::Error::last_os_error()));
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ARP.to_be();
            addr.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc != 0 {
                return Err(format!("ARP watch on {ifname}: bind: {}", std::io::Error::last_os_error()));
            }
            Ok(ArpWatch { fd, claims: ArpClaims::new(ifname) })
        }
    }

    /// Reads every ARP frame waiting; returns log lines for conflicts seen for the first time
    /// (or with a new MAC).
    #[allow(unsafe_code)]
    pub fn poll(&mut self) -> Vec<String> {
        let mut logs = Vec::new();
        let mut buf = [0u8; 128];
        loop {
            // SAFETY: reading into a local buffer of the stated size from our own socket.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            if let Some(l) = self.claims.observe(&buf[..n as usize], Instant::now()) {
                logs.push(l);
            }
        }
        logs
    }
}

impl ArpClaims {
    pub fn new(ifname: &str) -> ArpClaims {
        ArpClaims { ifname: ifname.to_string(), last: HashMap::new(), conflicts: BTreeMap::new() }
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
        let prev = self.last.insert(spa, (sha, now));
        let (old, at) = prev?;
        if old == sha || now.duration_since(at) > WINDOW {
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
}
