//! Handing the datapath to a successor process without closing a socket.
//!
//! Closing an AF_XDP socket waits for an RCU grace period and binding one costs about as much
//! (10-30 ms each here), so a restart that closes and binds every socket is off the network
//! for tens of milliseconds per port: seconds at 110 pods. Instead the stopping worker hands
//! over what the kernel already has: the UMEM's memfd (the pages the kernel pinned), one
//! descriptor per bound socket, and where every chunk is. The successor maps the same pages
//! and rings (`Umem::adopt`, `XskPort::adopt`) and polls on from the ring indices the
//! predecessor left. Nothing is unbound, so frames keep arriving into the rings meanwhile, and
//! the old XDP programs keep redirecting into the same sockets until the successor's replace
//! them (`Worker::adopt`).
//!
//! The descriptors travel between processes with `SCM_RIGHTS` (the ctl socket: `vxnat`'s
//! control crate); this module turns a handoff into descriptors and back. Its first
//! descriptor is a sealed memfd holding the metadata below, in an explicit little-endian
//! layout with a magic and a version: a successor of another version refuses it and binds
//! afresh rather than misreading it.
//!
//! The contract with the worker: a handoff is taken between two poll passes (nothing staged,
//! the pipeline holding no chunk), so every chunk is in the free pool or in the rings of the
//! port recorded as its owner. `in_fill`/`in_tx` say how many each port's rings hold.

use crate::bpf::Mode;
use crate::port::RingSizes;
use crate::XskError;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

const MAGIC: u32 = 0x5658_484f; // "VXHO"
const VERSION: u32 = 1;
/// `owner` value of a chunk in the free pool.
pub(crate) const FREE: u16 = u16::MAX - 1;

/// One handed-over socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortMeta {
    pub id: u16,
    pub mode: Mode,
    /// The uplink or the host port (node rings and fill budget).
    pub node: bool,
    /// The host port (`Worker::add_host_port`).
    pub host: bool,
    pub ifname: String,
    pub ifindex: u32,
    pub sizes: RingSizes,
    pub sg: bool,
    pub in_fill: u32,
    pub in_tx: u32,
}

/// Everything but the descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub frames: u32,
    /// Fill and completion ring entries of sockets bound to the UMEM.
    pub ring_size: u32,
    pub sg: bool,
    pub ports: Vec<PortMeta>,
    /// Per chunk: the port whose rings hold it, or `FREE`.
    pub owner: Vec<u16>,
}

/// A worker's datapath on its way to a successor: the UMEM, its sockets (in `meta.ports`
/// order) and the metadata.
#[derive(Debug)]
pub struct Handoff {
    pub(crate) meta: Meta,
    pub(crate) umem: OwnedFd,
    pub(crate) sockets: Vec<OwnedFd>,
}

impl Handoff {
    /// The ports it carries: (port number, interface).
    pub fn ports(&self) -> impl Iterator<Item = (u16, &str)> {
        self.meta.ports.iter().map(|p| (p.id, p.ifname.as_str()))
    }

    /// The descriptors to pass, in order: the metadata memfd (sealed), the UMEM memfd, one
    /// socket per port.
    pub fn into_fds(self) -> Result<Vec<OwnedFd>, XskError> {
        let bytes = self.meta.encode();
        // SAFETY: a NUL-terminated name; the result is checked and owned from here on.
        let fd = unsafe { libc::memfd_create(c"vxnat-handoff".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(crate::last_err("memfd_create for the handoff"));
        }
        // SAFETY: fd was just created, owned by nobody else.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(&bytes).map_err(|source| XskError { what: "writing the handoff".into(), source })?;
        // Sealed: the successor reads exactly what was written, whatever this process does next.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own memfd.
        if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(crate::last_err("sealing the handoff"));
        }
        let mut fds = Vec::with_capacity(2 + self.sockets.len());
        fds.push(OwnedFd::from(file));
        fds.push(self.umem);
        fds.extend(self.sockets);
        Ok(fds)
    }

    /// A handoff from the descriptors `into_fds` made (received from the predecessor).
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Handoff, String> {
        let mut fds = fds.into_iter();
        let (Some(meta), Some(umem)) = (fds.next(), fds.next()) else {
            return Err("fewer than two descriptors".into());
        };
        let mut file = std::fs::File::from(meta);
        let mut bytes = Vec::new();
        file.rewind().and_then(|()| file.read_to_end(&mut bytes)).map_err(|e| format!("reading the metadata: {e}"))?;
        let meta = Meta::decode(&bytes)?;
        let sockets: Vec<OwnedFd> = fds.collect();
        if sockets.len() != meta.ports.len() {
            return Err(format!("{} sockets for {} ports", sockets.len(), meta.ports.len()));
        }
        Ok(Handoff { meta, umem, sockets })
    }
}

impl Meta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.ports.len() * 64 + self.owner.len() * 2);
        let u32s = |b: &mut Vec<u8>, v: &[u32]| v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        u32s(&mut b, &[MAGIC, VERSION, self.frames, self.ring_size, u32::from(self.sg), self.ports.len() as u32]);
        for p in &self.ports {
            b.extend_from_slice(&p.id.to_le_bytes());
            b.extend_from_slice(&[p.mode as u8, u8::from(p.node), u8::from(p.host), u8::from(p.sg)]);
            u32s(&mut b, &[p.ifindex, p.sizes.rx, p.sizes.tx, p.sizes.fill, p.sizes.comp, p.in_fill, p.in_tx]);
            b.push(p.ifname.len() as u8);
            b.extend_from_slice(p.ifname.as_bytes());
        }
        u32s(&mut b, &[self.owner.len() as u32]);
        self.owner.iter().for_each(|o| b.extend_from_slice(&o.to_le_bytes()));
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Meta, String> {
        let mut r = Reader { b, at: 0 };
        let (magic, version) = (r.u32()?, r.u32()?);
        if magic != MAGIC {
            return Err(format!("not a vxnat handoff (magic {magic:#x})"));
        }
        if version != VERSION {
            return Err(format!("handoff version {version}, this vxnat reads {VERSION}"));
        }
        let (frames, ring_size, sg, n) = (r.u32()?, r.u32()?, r.u32()? != 0, r.u32()?);
        let mut ports = Vec::new();
        for _ in 0..n {
            let id = r.u16()?;
            let [mode, node, host, sg] = r.take::<4>()?;
            let mode = match mode {
                m if m == Mode::Uplink as u8 => Mode::Uplink,
                m if m == Mode::All as u8 => Mode::All,
                m if m == Mode::Pass as u8 => Mode::Pass,
                m => return Err(format!("port {id}: program mode {m}")),
            };
            let (ifindex, rx, tx, fill, comp, in_fill, in_tx) =
                (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            let len = usize::from(r.take::<1>()?[0]);
            let ifname = String::from_utf8(r.bytes(len)?.to_vec()).map_err(|_| format!("port {id}: interface name"))?;
            ports.push(PortMeta {
                id,
                mode,
                node: node != 0,
                host: host != 0,
                ifname,
                ifindex,
                sizes: RingSizes { rx, tx, fill, comp },
                sg: sg != 0,
                in_fill,
                in_tx,
            });
        }
        let chunks = r.u32()?;
        if chunks != frames {
            return Err(format!("{chunks} chunk owners for {frames} chunks"));
        }
        let owner = (0..chunks).map(|_| r.u16()).collect::<Result<Vec<u16>, String>>()?;
        if r.at != b.len() {
            return Err(format!("{} bytes after the end", b.len() - r.at));
        }
        Ok(Meta { frames, ring_size, sg, ports, owner })
    }
}

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD` is 253).
const FDS_PER_MESSAGE: usize = 250;

/// Sends `line` (a line of the ctl protocol) over `conn` with `fds` attached (`SCM_RIGHTS`):
/// up to 250 with the line, the rest 250 at a time with a space byte each after it.
pub fn send_with_fds(conn: &UnixStream, line: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut chunks = raw.chunks(FDS_PER_MESSAGE);
    let send = |bytes: &[u8], fds: &[RawFd]| -> std::io::Result<usize> {
        let iov = [IoSlice::new(bytes)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(conn.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map_err(std::io::Error::from)
    };
    let mut sent = send(line, chunks.next().unwrap_or(&[]))?;
    // A stream may take part of the line; the descriptors went with its first byte.
    while sent < line.len() {
        sent += send(&line[sent..], &[])?;
    }
    for c in chunks {
        send(b" ", c)?;
    }
    Ok(())
}

/// Receives what `send_with_fds` sent: the line (through its newline) and every descriptor,
/// reading on until `wanted(line)` of them have come (the line says how many).
pub fn recv_with_fds(conn: &UnixStream, wanted: impl Fn(&[u8]) -> usize) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut want = None;
    let mut buf = [0u8; 4096];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: descriptors the kernel just installed in this process for us; each
                // is owned by nothing else.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(std::io::Error::other("descriptors were cut off (control buffer too small)"));
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        if want.is_none() {
            line.extend_from_slice(&buf[..n]);
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                line.truncate(end + 1);
                want = Some(wanted(&line));
            }
        }
        if want.is_some_and(|w| fds.len() >= w) {
            return Ok((line, fds));
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], String> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at += n;
        Ok(s)
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.take::<2>().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        let port = |id: u16, ifname: &str, mode, node, host| PortMeta {
            id,
            mode,
            node,
            host,
            ifname: ifname.into(),
            ifindex: 7 + u32::from(id),
            sizes: RingSizes { rx: 2048, tx: 2048, fill: 4096, comp: 4096 },
            sg: true,
            in_fill: 100 + u32::from(id),
            in_tx: 3,
        };
        Meta {
            frames: 8,
            ring_size: 4096,
            sg: true,
            ports: vec![
                port(0, "eth0", Mode::Uplink, true, false),
                port(1, "vxnat-host", Mode::All, true, true),
                port(2, "veth1234abcd", Mode::All, false, false),
            ],
            owner: vec![FREE, 0, 0, 1, 2, FREE, FREE, 2],
        }
    }

    #[test]
    fn metadata_round_trips() {
        let m = meta();
        assert_eq!(Meta::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn damaged_or_foreign_metadata_is_refused_not_misread() {
        let b = meta().encode();
        for cut in [0, 3, 10, 30, b.len() - 1] {
            assert!(Meta::decode(&b[..cut]).is_err(), "truncated at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(Meta::decode(&longer).unwrap_err().contains("after the end"));
        let mut other = b.clone();
        other[4] = 2;
        assert!(Meta::decode(&other).unwrap_err().contains("version 2"));
        let mut foreign = b;
        foreign[0] ^= 0xff;
        assert!(Meta::decode(&foreign).unwrap_err().contains("magic"));
    }

    #[test]
    fn descriptors_cross_a_socket_in_messages_of_250() {
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<OwnedFd> = (0..600).map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap())).collect();
        let line = b"{\"fds\":600}\n";
        let sender = std::thread::spawn(move || send_with_fds(&a, line, &fds).map(|()| fds.len()));
        let (got, fds) = recv_with_fds(&b, |l| if l == line { 600 } else { 0 }).unwrap();
        assert_eq!(sender.join().unwrap().unwrap(), 600);
        assert_eq!(got, line);
        assert_eq!(fds.len(), 600);
    }

    #[test]
    fn descriptors_carry_the_metadata() {
        let m = meta();
        // Stand-ins for the UMEM and the sockets: what travels is descriptors, whatever they are.
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let h = Handoff { meta: m.clone(), umem: fd(), sockets: vec![fd(), fd(), fd()] };
        let fds = h.into_fds().unwrap();
        assert_eq!(fds.len(), 5);
        let back = Handoff::from_fds(fds).unwrap();
        assert_eq!(back.meta, m);
        assert_eq!(back.ports().map(|(id, _)| id).collect::<Vec<_>>(), [0, 1, 2]);
    }
}
