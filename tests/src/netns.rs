//! Network namespaces for tests: unique names (`vxt-<pid>-<n>-<tag>`), removed on drop even
//! when the test fails, and a way for a thread to enter one. Traffic stays inside them.

#![allow(unsafe_code)] // setns(2) and geteuid(2): the harness must enter namespaces.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Whether this process may create namespaces and load XDP programs. In CI (`CI` set) a test
/// that needs root must not silently pass without it.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var_os("CI").is_none(), "{test} needs root (CAP_NET_ADMIN, CAP_BPF) and CI is set");
        eprintln!("skipping {test}: needs root (CAP_NET_ADMIN, CAP_BPF)");
    }
    root
}

/// Runs a command, returning its output; panics with stderr if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vxt-{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a program inside the namespace and returns its output (not checked).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {args:?} in {}: {e}", self.name))
    }

    /// The MAC address of `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> dataplane::wire::MacAddr {
        let out = self.ip(&["-o", "link", "show", ifname]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        while let Some(w) = words.next() {
            if w == "link/ether" {
                if let Some(mac) = words.next().and_then(|m| m.parse().ok()) {
                    return mac;
                }
            }
        }
        panic!("no MAC for {ifname} in {}: {text}", self.name)
    }

    /// Moves the calling thread into this namespace (for sockets and XDP attach).
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; affects only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}: {}", self.name, std::io::Error::last_os_error());
    }

    /// Runs `f` on a new thread inside this namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            Netns { name: name.clone() }.enter_no_drop();
            f()
        })
    }

    fn enter_no_drop(self) {
        self.enter();
        std::mem::forget(self);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// FNV-1a, 64-bit: a content hash for transfer checks.
pub fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Deterministic test payload: byte i of a stream seeded by `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends raw Ethernet frames out of `ifname` from the calling thread's namespace (AF_PACKET):
/// how tests inject hostile frames from a pod.
pub fn send_raw(ifname: &str, frames: &[Vec<u8>]) {
    let name = std::ffi::CString::new(ifname).expect("ifname");
    // SAFETY: plain socket syscalls on our own fd with valid, initialised arguments.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert!(ifindex != 0, "no interface {ifname}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be()));
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        for f in frames {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(
                &f[..6.min(f.len())].iter().copied().chain(std::iter::repeat(0)).take(6).collect::<Vec<_>>(),
            );
            let rc = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(rc >= 0, "sendto {} bytes: {}", f.len(), std::io::Error::last_os_error());
        }
        libc::close(fd);
    }
}

/// Streams `len` deterministic bytes over TCP from `from` to a listener on `to_ip:port` in
/// `to`, and checks both ends: every byte arrived and the content hash matches.
pub fn tcp_transfer(from: &Netns, to: &Netns, to_ip: std::net::Ipv4Addr, port: u16, len: usize) -> Result<(), String> {
    use std::io::{Read, Write};
    let server = to.spawn(move || -> Result<(usize, u64), String> {
        let l = std::net::TcpListener::bind((to_ip, port)).map_err(|e| format!("listen: {e}"))?;
        let (mut c, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let (mut h, mut n, mut buf) = (FNV_OFFSET, 0usize, vec![0u8; 65536]);
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    h = fnv1a(&buf[..k], h);
                    n += k;
                }
            }
        }
        Ok((n, h))
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let data = payload(u64::from(port), len);
    let sent = fnv1a(&data, FNV_OFFSET);
    let client = from.spawn(move || -> Result<(), String> {
        let mut c = std::net::TcpStream::connect_timeout(&(to_ip, port).into(), std::time::Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        c.set_write_timeout(Some(std::time::Duration::from_secs(20))).map_err(|e| e.to_string())?;
        c.write_all(&data).map_err(|e| format!("write: {e}"))
    });
    let sent_ok = client.join().map_err(|_| "client panicked".to_string());
    let got = server.join().map_err(|_| "server panicked".to_string())??;
    sent_ok??;
    if got != (len, sent) {
        return Err(format!(
            "TCP to {to_ip}:{port}: received {} of {len} bytes, hash {:#x} vs {sent:#x}",
            got.0, got.1
        ));
    }
    Ok(())
}

/// Sends `n` datagrams of `size` bytes from `from_ip` in `from` to `to_ip:port` in `to`, paced;
/// returns how many arrived intact.
pub fn udp_datagrams(
    from: &Netns,
    from_ip: std::net::Ipv4Addr,
    to: &Netns,
    to_ip: std::net::Ipv4Addr,
    port: u16,
    n: usize,
    size: usize,
) -> usize {
    let rx = to.spawn(move || {
        let u = std::net::UdpSocket::bind((to_ip, port)).expect("bind udp");
        u.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("timeout");
        let (mut got, mut buf, want) = (0, vec![0u8; size + 64], payload(size as u64, size));
        while let Ok((k, _)) = u.recv_from(&mut buf) {
            got += usize::from(buf[..k] == want[..]);
        }
        got
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    from.spawn(move || {
        let u = std::net::UdpSocket::bind((from_ip, 0)).expect("bind udp");
        let data = payload(size as u64, size);
        for _ in 0..n {
            let _ = u.send_to(&data, (to_ip, port));
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
    })
    .join()
    .expect("udp sender");
    rx.join().expect("udp receiver")
}

/// Path MTU discovery as a sender sees it, from the calling thread's namespace: a UDP socket
/// with DF set (IP_PMTUDISC_DO) sends `len` bytes to `dst:port`, waits for any ICMP
/// fragmentation needed, sends again, and reads the socket's path MTU. Returns (first send,
/// second send as an errno, IP_MTU).
#[allow(unsafe_code)]
pub fn udp_df_probe(
    dst: std::net::Ipv4Addr,
    port: u16,
    len: usize,
) -> (Result<usize, String>, Result<usize, Option<i32>>, i32) {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    let on: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt on our own socket with a valid int option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "IP_MTU_DISCOVER");
    s.connect((dst, port)).expect("connect");
    let buf = vec![0u8; len];
    let first = s.send(&buf).map_err(|e| e.to_string());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = s.send(&buf).map_err(|e| e.raw_os_error());
    let mut mtu: libc::c_int = 0;
    let mut optlen = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: getsockopt into a local int of the stated size.
    unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut optlen,
        )
    };
    (first, second, mtu)
}

/// A TCP connection from a chosen source address and port (SO_REUSEADDR), from the calling
/// thread's namespace; reads what the server sends until it closes.
#[allow(unsafe_code)]
pub fn tcp_fetch_from(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Result<String, String> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: socket calls on our own fd with valid, initialised arguments; the fd is owned
    // by the TcpStream from then on.
    let mut stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let s = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&one as *const libc::c_int).cast(), 4);
        let a = sa(src);
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) != 0
        {
            return Err(format!("bind {src}: {}", std::io::Error::last_os_error()));
        }
        let d = sa(dst);
        if libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32)
            != 0
        {
            return Err(format!("connect {dst}: {}", std::io::Error::last_os_error()));
        }
        s
    };
    stream.set_read_timeout(Some(std::time::Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let mut out = String::new();
    stream.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}
