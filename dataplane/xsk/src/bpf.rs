//! Loads vxnat's XDP program (built from `bpf/` by build.rs) onto one interface, configures
//! it, binds sockets into its XSKMAP and reads its exit counters. Detaches on drop, and can
//! remove a program left behind by a killed vxnat.

use libbpf_rs::{MapCore, MapFlags, Object, ObjectBuilder, Xdp, XdpFlags};
use std::os::fd::{AsFd, AsRawFd, RawFd};

/// The compiled program.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vxnat.bpf.o"));

/// `enum vxnat_mode` of bpf/vxnat.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Mode {
    Pass = 0,
    All = 1,
    Uplink = 2,
}

/// `enum vxnat_exit` of bpf/vxnat.h, in order (`VXNAT_EXIT_` + the upper-cased name; the test
/// below reads the header and fails if the two lists differ).
pub const EXIT_NAMES: [&str; 4] = ["redirect", "pass_not_ours", "drop_no_socket", "pass_unconfigured"];

/// The Service frontends the uplink's program redirects to vxnat (its `frontends` map).
#[derive(Debug)]
pub struct FrontendsMap {
    handle: libbpf_rs::MapHandle,
}

impl FrontendsMap {
    fn of(object: &Object) -> Result<FrontendsMap, String> {
        let map = XdpProgram::map(object, "frontends")?;
        let handle = libbpf_rs::MapHandle::try_from(&map).map_err(|e| err("duplicating the frontends map", e))?;
        Ok(FrontendsMap { handle })
    }

    /// A second handle on the same map.
    pub fn try_clone(&self) -> Result<FrontendsMap, String> {
        let handle =
            libbpf_rs::MapHandle::try_from(&self.handle).map_err(|e| err("duplicating the frontends map", e))?;
        Ok(FrontendsMap { handle })
    }

    /// Replaces the frontends: (address, port, protocol). New ones are added before stale ones
    /// are removed, so a frontend in both lists is never missing.
    pub fn set(&self, list: &[(std::net::Ipv4Addr, u16, u8)]) -> Result<(), String> {
        let key = |ip: &std::net::Ipv4Addr, port: u16, proto: u8| -> [u8; 8] {
            let o = ip.octets();
            let p = port.to_be_bytes();
            [o[0], o[1], o[2], o[3], p[0], p[1], proto, 0]
        };
        let wanted: std::collections::BTreeSet<[u8; 8]> =
            list.iter().map(|(ip, port, proto)| key(ip, *port, *proto)).collect();
        for k in &wanted {
            self.handle.update(k, &[1], MapFlags::ANY).map_err(|e| err("writing the frontends map", e))?;
        }
        let present: Vec<Vec<u8>> = self.handle.keys().collect();
        for k in present {
            if !wanted.iter().any(|w| w[..] == k[..]) {
                let _ = self.handle.delete(&k);
            }
        }
        Ok(())
    }
}

/// How the program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP: `xdpdrv`, what veth supports.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

pub struct XdpProgram {
    object: Object,
    ifindex: i32,
    attach: AttachMode,
    mode: Mode,
    /// Left attached when dropped (`leave_attached`).
    leave: bool,
}

impl std::fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpProgram")
            .field("ifindex", &self.ifindex)
            .field("attach", &self.attach)
            .finish_non_exhaustive()
    }
}

fn flags(attach: AttachMode) -> XdpFlags {
    match attach {
        AttachMode::Native => XdpFlags::DRV_MODE,
        AttachMode::Generic => XdpFlags::SKB_MODE,
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// The program loaded and configured for one port, not attached yet (`XdpProgram::load`): what
/// a successor prepares before it asks its predecessor to hand over, so the takeover itself
/// only binds and attaches.
pub struct LoadedProgram {
    object: Object,
    mode: Mode,
}

impl std::fmt::Debug for LoadedProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedProgram").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl LoadedProgram {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Its frontends map (`XdpProgram::frontends`), writable before it is attached.
    pub fn frontends(&self) -> Result<FrontendsMap, String> {
        FrontendsMap::of(&self.object)
    }
}

impl XdpProgram {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Loads the program (the verifier runs here) and writes its configuration.
    pub fn load(mode: Mode, node_ip: [u8; 4], vxlan_port: u16) -> Result<LoadedProgram, String> {
        let mut open = ObjectBuilder::default().open_memory(OBJECT).map_err(|e| err("opening the XDP object", e))?;
        if mode != Mode::Uplink {
            // Only the uplink's program looks Service frontends up. The map is preallocated,
            // 65536 entries (~4 MiB of kernel memory): a pod port's copy would cost that per pod.
            for mut m in open.maps_mut() {
                if m.name() == "frontends" {
                    m.set_max_entries(1).map_err(|e| err("sizing the frontends map", e))?;
                }
            }
        }
        let object = open.load().map_err(|e| err("loading the XDP program (needs CAP_BPF)", e))?;
        let mut cfg = [0u8; 12];
        cfg[0..4].copy_from_slice(&(mode as u32).to_ne_bytes());
        cfg[4..8].copy_from_slice(&node_ip);
        cfg[8..10].copy_from_slice(&vxlan_port.to_be_bytes());
        Self::map(&object, "config")?
            .update(&0u32.to_ne_bytes(), &cfg, MapFlags::ANY)
            .map_err(|e| err("writing the XDP config", e))?;
        Ok(LoadedProgram { object, mode })
    }

    /// Puts the AF_XDP socket `socket` (queue, fd) in the XSKMAP of `loaded`, writes the
    /// uplink's Service `frontends` and attaches it to `ifindex`, in that order: attaching
    /// replaces at once whatever program is there (one a predecessor left, whose sockets are
    /// gone), and the new one redirects from its first frame (a NodePort segment it passed to
    /// the kernel for want of its frontend would be reset). A program of the other mode
    /// (native or generic) cannot be replaced in place: it is removed first.
    pub fn attach(
        loaded: LoadedProgram,
        ifindex: u32,
        attach: AttachMode,
        socket: (u32, RawFd),
        frontends: &[(std::net::Ipv4Addr, u16, u8)],
    ) -> Result<XdpProgram, String> {
        // Not attached yet: nothing to detach if anything below fails.
        let mut program =
            XdpProgram { object: loaded.object, ifindex: ifindex as i32, attach, mode: loaded.mode, leave: true };
        program.bind_socket(socket.0, socket.1)?;
        if !frontends.is_empty() {
            program.frontends()?.set(frontends)?;
        }
        let prog =
            program.object.progs().find(|p| p.name() == "vxnat_xdp").ok_or("XDP object has no vxnat_xdp program")?;
        let xdp = Xdp::new(prog.as_fd());
        if xdp.attach(program.ifindex, flags(attach)).is_err() {
            Self::detach_any(ifindex);
            xdp.attach(program.ifindex, flags(attach))
                .map_err(|e| err(&format!("attaching XDP to ifindex {ifindex}"), e))?;
        }
        program.leave = false;
        Ok(program)
    }

    /// Leaves the program attached when this is dropped, for a successor to replace (a
    /// restart): until then a frame meets a program without a socket (`drop_no_socket`), and
    /// the successor's attach is one atomic replacement.
    pub fn leave_attached(&mut self) {
        self.leave = true;
    }

    fn map<'a>(object: &'a Object, name: &str) -> Result<libbpf_rs::Map<'a>, String> {
        object.maps().find(|m| m.name() == name).ok_or_else(|| format!("XDP object has no {name} map"))
    }

    /// Puts the AF_XDP socket `fd` in the XSKMAP slot of `queue`.
    fn bind_socket(&self, queue: u32, fd: RawFd) -> Result<(), String> {
        Self::map(&self.object, "xsks_map")?
            .update(&queue.to_ne_bytes(), &(fd as u32).to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| err("inserting the socket into the XSKMAP", e))
    }

    /// A handle on this program's frontends map that another thread can write (a duplicated
    /// map fd): the control thread keeps the uplink's redirects current, off the data path.
    pub fn frontends(&self) -> Result<FrontendsMap, String> {
        FrontendsMap::of(&self.object)
    }

    /// Exit counters summed over CPUs, in `EXIT_NAMES` order.
    pub fn exits(&self) -> Result<[u64; 4], String> {
        let map = Self::map(&self.object, "exits")?;
        let mut out = [0u64; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu =
                map.lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY).map_err(|e| err("reading XDP exits", e))?;
            *slot = per_cpu
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    v.get(..8)
                        .map(|b| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                        .unwrap_or(0)
                })
                .sum();
        }
        Ok(out)
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex as u32
    }

    /// Removes whatever XDP program is attached to `ifindex` in either mode (cleanup after a
    /// `kill -9`). Errors are ignored: there may be nothing attached.
    pub fn detach_any(ifindex: u32) {
        let Ok(open) = ObjectBuilder::default().open_memory(OBJECT) else { return };
        let Ok(object) = open.load() else { return };
        let prog = object.progs().find(|p| p.name() == "vxnat_xdp");
        if let Some(prog) = prog {
            let xdp = Xdp::new(prog.as_fd());
            let _ = xdp.detach(ifindex as i32, XdpFlags::DRV_MODE);
            let _ = xdp.detach(ifindex as i32, XdpFlags::SKB_MODE);
        }
    }

    /// The program's fd (for tests).
    pub fn prog_fd(&self) -> Option<RawFd> {
        self.object.progs().find(|p| p.name() == "vxnat_xdp").map(|p| p.as_fd().as_raw_fd())
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        if self.leave {
            return;
        }
        if let Some(prog) = self.object.progs().find(|p| p.name() == "vxnat_xdp") {
            let _ = Xdp::new(prog.as_fd()).detach(self.ifindex, flags(self.attach));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `VXNAT_EXIT_*` of bpf/vxnat.h, in order, with its value: what the C side declares.
    fn c_exits() -> Vec<(String, u32)> {
        let header = include_str!("../../../bpf/vxnat.h");
        let start = header.find("enum vxnat_exit {").expect("enum vxnat_exit in bpf/vxnat.h");
        let body = &header[start..start + header[start..].find("};").expect("end of enum vxnat_exit")];
        body.lines()
            .filter_map(|l| {
                let l = l.trim();
                let rest = l.strip_prefix("VXNAT_EXIT_")?;
                let (name, value) = rest.split_once('=')?;
                let digits: String = value.trim_start().chars().take_while(char::is_ascii_digit).collect();
                Some((name.trim().to_ascii_lowercase(), digits.parse().ok()?))
            })
            .collect()
    }

    /// Runs the uplink's program over `frame` (BPF_PROG_TEST_RUN) with `frontends` in its map;
    /// the XDP action it returns. No socket is bound: a frame it would redirect comes back as
    /// `XDP_DROP` (`drop_no_socket`), one it leaves to the kernel as `XDP_PASS`.
    fn uplink_verdict(frontends: &[(std::net::Ipv4Addr, u16, u8)], frame: &[u8]) -> Option<u32> {
        // Without CAP_BPF (not root) the load fails: the caller skips.
        let loaded = XdpProgram::load(Mode::Uplink, [192, 168, 77, 1], 8472).ok()?;
        loaded.frontends().expect("frontends").set(frontends).expect("set frontends");
        let mut progs = loaded.object.progs_mut();
        let prog = progs.find(|p| p.name() == "vxnat_xdp").expect("program");
        let input = libbpf_rs::ProgramInput { data_in: Some(frame), ..Default::default() };
        Some(prog.test_run(input).expect("test run").return_value)
    }

    /// An Ethernet + IPv4 frame from `src` to `dst` carrying `proto` and `body` (checksums
    /// left zero: the program checks none).
    fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = (20 + body.len()) as u16;
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(body);
        f
    }

    /// The uplink's program hands vxnat the ICMP errors about what a Service frontend sent (a
    /// router's fragmentation needed about a NodePort reply: path MTU discovery for clients
    /// outside), and leaves other ICMP to the kernel.
    #[test]
    fn the_uplink_redirects_icmp_errors_about_a_frontends_packets_only() {
        const XDP_DROP: u32 = 1;
        const XDP_PASS: u32 = 2;
        let node = [192, 168, 77, 1];
        let frontends = [(std::net::Ipv4Addr::from(node), 30600, 6)];
        // The reply as it left: node:30600 -> client:40000, TCP; quoted in the error.
        let quoted = |sport: u16, proto: u8| {
            let mut q =
                frame(node, [192, 168, 78, 2], proto, &[(sport >> 8) as u8, sport as u8, 0x9c, 0x40, 0, 0, 0, 1]);
            q.drain(..14);
            q
        };
        let error = |kind: u8, q: Vec<u8>| {
            let mut body = vec![kind, 4, 0, 0, 0, 0, 0x04, 0xb0];
            body.extend_from_slice(&q);
            frame([192, 168, 77, 254], node, 1, &body)
        };
        let Some(v) = uplink_verdict(&frontends, &error(3, quoted(30600, 6))) else {
            eprintln!("skipped: loading an XDP program needs CAP_BPF");
            return;
        };
        assert_eq!(v, XDP_DROP, "frag needed about a NodePort reply: to vxnat (no socket bound here: dropped)");
        assert_eq!(uplink_verdict(&frontends, &error(11, quoted(30600, 6))), Some(XDP_DROP), "time exceeded");
        assert_eq!(uplink_verdict(&frontends, &error(3, quoted(22, 6))), Some(XDP_PASS), "about the node's own SSH");
        assert_eq!(uplink_verdict(&frontends, &error(3, quoted(30600, 17))), Some(XDP_PASS), "another protocol");
        assert_eq!(uplink_verdict(&frontends, &error(8, quoted(30600, 6))), Some(XDP_PASS), "an echo request");
        let mut cut = error(3, quoted(30600, 6));
        cut.truncate(14 + 20 + 8 + 20 + 2);
        assert_eq!(uplink_verdict(&frontends, &cut), Some(XDP_PASS), "a quote too short for its ports");
    }

    #[test]
    fn the_exit_list_matches_the_xdp_programs() {
        let c = c_exits();
        let (max, exits): (Vec<_>, Vec<_>) = c.into_iter().partition(|(n, _)| n == "max");
        let rust: Vec<(String, u32)> = EXIT_NAMES.iter().enumerate().map(|(i, n)| (n.to_string(), i as u32)).collect();
        assert_eq!(exits, rust, "bpf/vxnat.h enum vxnat_exit and EXIT_NAMES disagree");
        assert_eq!(max, vec![("max".to_string(), EXIT_NAMES.len() as u32)]);
    }

    #[test]
    fn the_mode_values_match_the_xdp_programs() {
        let header = include_str!("../../../bpf/vxnat.h");
        for (c, m) in [
            ("VXNAT_MODE_PASS = 0", Mode::Pass),
            ("VXNAT_MODE_ALL = 1", Mode::All),
            ("VXNAT_MODE_UPLINK = 2", Mode::Uplink),
        ] {
            assert!(header.contains(c), "{c}");
            assert_eq!(c.rsplit(' ').next().and_then(|v| v.parse::<u32>().ok()), Some(m as u32));
        }
    }
}
