//! A packet filter with tcpdump's basics, one parser for `vxnat ctl flows`, `trace` and
//! `capture`:
//!
//! ```text
//! expr    := or
//! or      := and ( ("or" | "||") and )*
//! and     := not ( ("and" | "&&") not )*
//! not     := ("not" | "!") not | "(" expr ")" | prim
//! prim    := [src|dst] host ADDR | [src|dst] net CIDR | [src|dst] port N
//!          | tcp | udp | icmp | proto N|tcp|udp|icmp
//! ```
//!
//! As in tcpdump, a protocol may qualify the primitive after it: `udp port 53` is
//! `udp and port 53`.
//!
//! `host`, `net` and `port` without a direction match either end. Primitives are matched
//! against a [`Tuple`]; for a frame, [`tuples_of`] gives its IPv4 header's tuple and, for VXLAN,
//! the inner one too (a frame matches when either does, so `host <pod>` finds tunnelled
//! traffic on the uplink). Frames are read through [`crate::wire::frame`], the same walk the
//! trace printer uses.

use crate::wire::{frame, IpProtocol, Ipv4Cidr, Ipv4Packet};
use core::net::Ipv4Addr;

/// What a filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// The protocol number, as a conntrack key holds it ([`IpProtocol`] says which).
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// 0 when the protocol has no ports.
    pub sport: u16,
    pub dport: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Src,
    Dst,
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    True,
    Host(Dir, Ipv4Addr),
    Net(Dir, Ipv4Cidr),
    Port(Dir, u16),
    Proto(u8),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
}

/// A parsed filter. The empty filter matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    root: Node,
    text: String,
}

impl Default for Filter {
    fn default() -> Self {
        Filter { root: Node::True, text: String::new() }
    }
}

impl core::fmt::Display for Filter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.text.is_empty() { "(all)" } else { &self.text })
    }
}

fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        if c.is_whitespace() || c == '(' || c == ')' || c == '!' || two == "&&" || two == "||" {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            if two == "&&" || two == "||" {
                out.push(two);
                i += 2;
                continue;
            }
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
        } else {
            cur.push(c);
        }
        i += 1;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Parser {
    toks: Vec<String>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.toks.get(self.at).map(String::as_str)
    }
    fn next(&mut self) -> Option<String> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }
    fn or(&mut self) -> Result<Node, String> {
        let mut n = self.and()?;
        while matches!(self.peek(), Some("or" | "||")) {
            self.at += 1;
            n = Node::Or(Box::new(n), Box::new(self.and()?));
        }
        Ok(n)
    }
    fn and(&mut self) -> Result<Node, String> {
        let mut n = self.not()?;
        loop {
            match self.peek() {
                Some("and" | "&&") => {
                    self.at += 1;
                    n = Node::And(Box::new(n), Box::new(self.not()?));
                }
                // `udp port 53`: a protocol qualifies the primitive after it (an implied and).
                Some("host" | "net" | "port" | "src" | "dst") if matches!(n, Node::Proto(_)) => {
                    n = Node::And(Box::new(n), Box::new(self.not()?));
                }
                _ => return Ok(n),
            }
        }
    }
    fn not(&mut self) -> Result<Node, String> {
        match self.peek() {
            Some("not" | "!") => {
                self.at += 1;
                Ok(Node::Not(Box::new(self.not()?)))
            }
            Some("(") => {
                self.at += 1;
                let n = self.or()?;
                match self.next().as_deref() {
                    Some(")") => Ok(n),
                    other => {
                        Err(format!("expected ')' but found {}", other.map_or("the end".into(), |t| format!("{t:?}"))))
                    }
                }
            }
            _ => self.prim(),
        }
    }
    fn prim(&mut self) -> Result<Node, String> {
        let Some(t) = self.next() else {
            return Err("expected a primitive (host, net, port, tcp, udp, icmp, proto) but found the end".into());
        };
        let (dir, kw) = match t.as_str() {
            "src" | "dst" => {
                let d = if t == "src" { Dir::Src } else { Dir::Dst };
                match self.next() {
                    Some(k) if matches!(k.as_str(), "host" | "net" | "port") => (d, k),
                    other => {
                        return Err(format!(
                            "{t:?} must be followed by host, net or port, not {}",
                            other.map_or("the end".into(), |o| format!("{o:?}"))
                        ))
                    }
                }
            }
            _ => (Dir::Either, t.clone()),
        };
        let arg = |p: &mut Parser, what: &str| p.next().ok_or(format!("{kw} needs {what}"));
        match kw.as_str() {
            "host" => {
                let a = arg(self, "an IPv4 address")?;
                Ok(Node::Host(dir, a.parse().map_err(|_| format!("host {a:?}: not an IPv4 address"))?))
            }
            "net" => {
                let a = arg(self, "a CIDR")?;
                Ok(Node::Net(dir, a.parse().map_err(|_| format!("net {a:?}: not an IPv4 CIDR (like 10.244.0.0/16)"))?))
            }
            "port" => {
                let a = arg(self, "a port number")?;
                Ok(Node::Port(dir, a.parse().map_err(|_| format!("port {a:?}: not a port number"))?))
            }
            "tcp" => Ok(Node::Proto(IpProtocol::Tcp.into())),
            "udp" => Ok(Node::Proto(IpProtocol::Udp.into())),
            "icmp" => Ok(Node::Proto(IpProtocol::Icmp.into())),
            "proto" => {
                let a = arg(self, "a protocol")?;
                let p = match a.as_str() {
                    "tcp" => IpProtocol::Tcp,
                    "udp" => IpProtocol::Udp,
                    "icmp" => IpProtocol::Icmp,
                    n => IpProtocol::from(
                        n.parse::<u8>().map_err(|_| format!("proto {n:?}: not tcp, udp, icmp or a number"))?,
                    ),
                };
                Ok(Node::Proto(p.into()))
            }
            other => Err(format!(
                "unknown primitive {other:?} (expected host, net, port, tcp, udp, icmp, proto, src, dst, not, '(')"
            )),
        }
    }
}

impl Filter {
    /// Parses a filter; the error says what was expected where.
    pub fn parse(s: &str) -> Result<Filter, String> {
        let toks = tokens(s);
        if toks.is_empty() {
            return Ok(Filter::default());
        }
        let mut p = Parser { toks, at: 0 };
        let root = p.or()?;
        if let Some(t) = p.peek() {
            return Err(format!("unexpected {t:?} (join primitives with and/or)"));
        }
        Ok(Filter { root, text: s.trim().to_string() })
    }

    pub fn matches(&self, t: &Tuple) -> bool {
        eval(&self.root, t)
    }

    /// Whether any of `tuples` matches.
    pub fn matches_any(&self, tuples: &[Tuple]) -> bool {
        tuples.iter().any(|t| self.matches(t))
    }

    pub fn is_all(&self) -> bool {
        self.root == Node::True
    }
}

fn eval(n: &Node, t: &Tuple) -> bool {
    let has_ports = matches!(IpProtocol::from(t.proto), IpProtocol::Tcp | IpProtocol::Udp);
    match n {
        Node::True => true,
        Node::Host(d, a) => dir_match(*d, t.src == *a, t.dst == *a),
        Node::Net(d, c) => dir_match(*d, c.contains(t.src), c.contains(t.dst)),
        Node::Port(d, p) => has_ports && dir_match(*d, t.sport == *p, t.dport == *p),
        Node::Proto(p) => t.proto == *p,
        Node::Not(x) => !eval(x, t),
        Node::And(a, b) => eval(a, t) && eval(b, t),
        Node::Or(a, b) => eval(a, t) || eval(b, t),
    }
}

fn dir_match(d: Dir, src: bool, dst: bool) -> bool {
    match d {
        Dir::Src => src,
        Dir::Dst => dst,
        Dir::Either => src || dst,
    }
}

/// The tuple of an IPv4 packet: ports for TCP and UDP carrying their header, else 0.
fn ipv4_tuple(ip: &Ipv4Packet<&[u8]>) -> Tuple {
    let (sport, dport) = ip.ports().unwrap_or((0, 0));
    Tuple { proto: ip.protocol().into(), src: ip.src_addr(), dst: ip.dst_addr(), sport, dport }
}

/// The tuples a filter sees in an Ethernet frame: its IPv4 header's, and for VXLAN (UDP to
/// 8472 or 4789) the inner packet's too. At most two; none for non-IPv4.
pub fn tuples_of(f: &[u8]) -> ([Tuple; 2], usize) {
    let blank = Tuple { proto: 0, src: Ipv4Addr::UNSPECIFIED, dst: Ipv4Addr::UNSPECIFIED, sport: 0, dport: 0 };
    let mut out = [blank; 2];
    let Ok(outer) = frame::ipv4(f) else { return (out, 0) };
    out[0] = ipv4_tuple(&outer);
    match frame::vxlan_inner(f).and_then(|inner| frame::ipv4(inner).ok()) {
        Some(inner) => {
            out[1] = ipv4_tuple(&inner);
            (out, 2)
        }
        None => (out, 1),
    }
}

/// Whether a frame matches (either of its tuples).
pub fn frame_matches(f: &Filter, frame: &[u8]) -> bool {
    if f.is_all() {
        return true;
    }
    let (t, n) = tuples_of(frame);
    f.matches_any(&t[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
        Tuple { proto, src: src.into(), dst: dst.into(), sport, dport }
    }

    #[test]
    fn tcpdump_basics() {
        let web = t(6, [10, 244, 0, 2], 40000, [10, 96, 0, 50], 80);
        let dns = t(17, [10, 244, 0, 2], 5353, [10, 96, 0, 10], 53);
        let ping = t(1, [10, 244, 0, 2], 0, [10, 244, 1, 2], 0);
        let cases: &[(&str, [bool; 3])] = &[
            ("", [true, true, true]),
            ("tcp", [true, false, false]),
            ("udp or icmp", [false, true, true]),
            ("host 10.96.0.50", [true, false, false]),
            ("src host 10.244.0.2 and not icmp", [true, true, false]),
            ("dst net 10.96.0.0/12", [true, true, false]),
            ("net 10.244.1.0/24", [false, false, true]),
            ("port 53 || port 80", [true, true, false]),
            ("src port 80", [false, false, false]),
            ("dst port 80 && tcp", [true, false, false]),
            ("not (tcp or udp)", [false, false, true]),
            ("! port 53", [true, false, true]),
            ("proto 1", [false, false, true]),
            ("proto udp and (dst port 53 or dst port 5353)", [false, true, false]),
        ];
        for (expr, want) in cases {
            let f = Filter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            let got = [f.matches(&web), f.matches(&dns), f.matches(&ping)];
            assert_eq!(&got, want, "{expr:?}");
        }
        // ICMP has no ports: `port 0` does not match it.
        assert!(!Filter::parse("port 0").expect("ok").matches(&ping));
    }

    #[test]
    fn errors_say_what_was_expected() {
        for (expr, says) in [
            ("host", "host needs an IPv4 address"),
            ("host 10.0.0.300", "not an IPv4 address"),
            ("net 10.0.0.0/33", "not an IPv4 CIDR"),
            ("port http", "not a port number"),
            ("src tcp", "must be followed by host, net or port"),
            ("(tcp", "expected ')'"),
            ("tcp udp", "join primitives with and/or"),
            ("frobnicate", "unknown primitive"),
            ("tcp and", "found the end"),
        ] {
            let e = Filter::parse(expr).expect_err(expr);
            assert!(e.contains(says), "{expr:?}: {e}");
        }
    }

    #[test]
    fn frames_match_by_outer_or_inner_header() {
        use crate::testkit::{ipv4, vxlan_frame, Vxlan, L4};
        let inner =
            ipv4([10, 244, 1, 5].into(), [10, 244, 0, 2].into(), &L4::Udp { sport: 53, dport: 5000, payload: b"x" });
        let frame = vxlan_frame(&Vxlan::b_to_a(), &inner);
        assert!(frame_matches(&Filter::parse("host 10.244.0.2 and port 53").expect("ok"), &frame));
        assert!(frame_matches(&Filter::parse("udp port 8472").expect("ok"), &frame));
        assert!(!frame_matches(&Filter::parse("tcp").expect("ok"), &frame));
        assert!(!frame_matches(&Filter::parse("host 1.2.3.4").expect("ok"), &[0u8; 10]));
    }
}
