//! One line per frame, tcpdump style (smoltcp's `PrettyPrinter` idea): what `vxnat ctl trace`
//! shows at each step of a packet's way. The one printer for packets; it reads only through
//! [`super::frame`] and the views, so it prints whatever it is given without panicking.
//!
//! ```text
//! TCP 10.244.0.2:40000 > 10.96.0.10:80 [S] ttl 64 54 B
//! VXLAN 192.168.50.1:49152 > 192.168.50.2:8472 vni 1 | UDP 10.244.0.2:5000 > 10.244.1.5:53 ttl 63 43 B
//! ```

use super::frame;
use super::{Error, EtherType, EthernetFrame, IcmpPacket, IpProtocol, TcpFlags, TcpPacket};
use core::fmt;

/// VXLAN nested deeper than this is not unwrapped further (hostile frames nest it to no end).
const MAX_DEPTH: usize = 4;

/// A frame, printed in one line by its `Display`.
#[derive(Debug, Clone, Copy)]
pub struct PrettyPrinter<'a> {
    frame: &'a [u8],
    depth: usize,
}

impl<'a> PrettyPrinter<'a> {
    pub fn new(frame: &'a [u8]) -> PrettyPrinter<'a> {
        PrettyPrinter { frame, depth: 0 }
    }
}

/// Bytes of a TCP header up to and including its flags.
const FLAGS_END: usize = 14;

/// tcpdump's letters for the flags it shows, in its order.
const FLAG_LETTERS: [(TcpFlags, char); 5] =
    [(TcpFlags::SYN, 'S'), (TcpFlags::ACK, '.'), (TcpFlags::FIN, 'F'), (TcpFlags::RST, 'R'), (TcpFlags::PSH, 'P')];

impl fmt::Display for PrettyPrinter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.frame.len();
        let ip = match frame::ipv4(self.frame) {
            Ok(ip) => ip,
            Err(Error::Unsupported) => {
                return match EthernetFrame::new_fixed(self.frame).map(|e| e.ethertype_or_tpid()) {
                    Ok(EtherType::Arp) => write!(f, "ARP {len} B"),
                    Ok(EtherType::Ipv6) => write!(f, "IPv6 {len} B"),
                    _ => write!(f, "non-IP frame {len} B"),
                }
            }
            Err(Error::Truncated) if len >= super::ethernet::HEADER_LEN => return write!(f, "truncated IPv4 {len} B"),
            Err(Error::Truncated) => return write!(f, "non-IP frame {len} B"),
            Err(_) => return write!(f, "malformed IPv4 {len} B"),
        };
        let (src, dst, ttl) = (ip.src_addr(), ip.dst_addr(), ip.ttl());
        // As the bytes say, even for a packet whose lengths or fragment offset are off.
        let l4 = frame::l4_bytes(&ip);
        let (sp, dp) = ip.l4_ports().unwrap_or((0, 0));
        match ip.protocol() {
            IpProtocol::Tcp => {
                // The flags end at byte 14: a header cut short after them still shows them.
                let flags = if l4.len() >= FLAGS_END { TcpPacket::new_unchecked(l4).flags() } else { TcpFlags(0) };
                write!(f, "TCP {src}:{sp} > {dst}:{dp} [")?;
                for (flag, letter) in FLAG_LETTERS {
                    if flags.contains(flag) {
                        write!(f, "{letter}")?;
                    }
                }
                write!(f, "] ttl {ttl} {len} B")
            }
            IpProtocol::Udp => match frame::vxlan(&ip) {
                Some((vx, inner)) => {
                    write!(f, "VXLAN {src}:{sp} > {dst}:{dp} vni {} | ", vx.vni())?;
                    if self.depth < MAX_DEPTH {
                        write!(f, "{}", PrettyPrinter { frame: inner, depth: self.depth + 1 })
                    } else {
                        write!(f, "... {} B", inner.len())
                    }
                }
                None => write!(f, "UDP {src}:{sp} > {dst}:{dp} ttl {ttl} {len} B"),
            },
            IpProtocol::Icmp => {
                let (t, c) = IcmpPacket::new_fixed(l4).map_or((0, 0), |i| (i.msg_type(), i.msg_code()));
                write!(f, "ICMP {src} > {dst} type {t} code {c} {len} B")
            }
            IpProtocol::Unknown(p) => write!(f, "IPv4 proto {p} {src} > {dst} {len} B"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{from_pod1, ipv4, vxlan_frame, Vxlan, L4};

    #[test]
    fn prints_tcp_udp_vxlan_and_what_is_not_ip() {
        let syn = ipv4(
            [10, 244, 0, 2].into(),
            [10, 96, 0, 10].into(),
            &L4::Tcp { sport: 40000, dport: 80, seq: 1, ack: 0, flags: 0x012, payload: &[] },
        );
        let frame = from_pod1(&syn);
        assert_eq!(
            PrettyPrinter::new(&frame).to_string(),
            format!("TCP 10.244.0.2:40000 > 10.96.0.10:80 [S.] ttl 64 {} B", frame.len())
        );
        let udp =
            ipv4([10, 244, 1, 5].into(), [10, 244, 0, 2].into(), &L4::Udp { sport: 53, dport: 5000, payload: b"x" });
        let vx = vxlan_frame(&Vxlan::b_to_a(), &udp);
        let line = PrettyPrinter::new(&vx).to_string();
        assert!(line.starts_with("VXLAN 192.168.50.2:"), "{line}");
        assert!(line.contains(" > 192.168.50.1:8472 vni 1 | UDP 10.244.1.5:53 > 10.244.0.2:5000 ttl 64 "), "{line}");
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(PrettyPrinter::new(&arp).to_string(), format!("ARP {} B", arp.len()));
        assert_eq!(PrettyPrinter::new(&frame[..20]).to_string(), "truncated IPv4 20 B");
        assert_eq!(PrettyPrinter::new(&[0u8; 10]).to_string(), "non-IP frame 10 B");
        for n in 0..vx.len() {
            let _ = PrettyPrinter::new(&vx[..n]).to_string();
        }
    }
}
