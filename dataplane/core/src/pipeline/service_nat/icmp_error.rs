//! ICMP errors about a translated flow (fragmentation needed for path MTU discovery, port
//! unreachable, time exceeded): the quoted packet, as it travelled after translation, is the
//! reverse of one of the flow's keys. Translate the quote back to what its sender sent, send
//! the error to that sender, and if it came from the endpoint itself, from the Service address.
//!
//! Contract: an error whose quote is not a complete IPv4 header plus the 8 bytes of TCP/UDP
//! ports RFC 792 requires, or matches no flow, is `Untouched`. Otherwise the quote's
//! addresses, ports and checksums (its header checksum; its TCP/UDP checksum when quoted and
//! in use), the outer addresses, and the outer IPv4 and ICMP checksums are rewritten. On a flow
//! with sequence/timestamp offsets (a reused SNAT tuple), a quoted TCP header gets its sender's
//! numbers back ([`crate::nat::seqadj`]); as much of it as is quoted.

use super::{uplink_return, Nat};
use crate::conntrack::{Dir, FlowKey};
use crate::pipeline::ctx::{Ctx, Ipv4Meta};
use crate::pipeline::FrameBuf;
use crate::wire::checksum;
use crate::wire::{ethernet, icmp, tcp, udp};
use crate::wire::{IcmpPacket, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};

pub(super) fn icmp_error(ctx: &mut Ctx<'_>, frame: &mut FrameBuf<'_>, m: &mut Ipv4Meta) -> Nat {
    let ip = ethernet::HEADER_LEN;
    let icmp_at = ip + m.header_len;
    let quote_at = icmp_at + icmp::HEADER_LEN;
    let end = ip + m.total_len;
    // The quoted header and its first 8 bytes of TCP/UDP.
    let (qkey, qproto, qhl) = {
        let Some(q) = frame.data().get(quote_at..end) else { return Nat::Untouched };
        let Ok(h) = Ipv4Packet::new_fixed(q) else { return Nat::Untouched };
        let (qhl, proto) = (h.header_len(), h.protocol());
        let ports = matches!(proto, IpProtocol::Tcp | IpProtocol::Udp);
        if h.version() != 4 || qhl < 20 || !ports || q.len() < qhl + udp::HEADER_LEN {
            return Nat::Untouched;
        }
        let Some((sport, dport)) = Ipv4Packet::new_unchecked(q).l4_ports() else { return Nat::Untouched };
        (FlowKey { proto: proto.into(), src: h.src_addr(), dst: h.dst_addr(), sport, dport }, proto, qhl)
    };
    let Some((id, dir)) = ctx.flows.lookup(&qkey.reversed(), ctx.now) else { return Nat::Untouched };
    let Some(f) = ctx.flows.get(id) else { return Nat::Untouched };
    // `dir` is the direction of the error itself; the quote travelled the other way.
    let (quote_src, quote_dst, new_outer_dst, endpoint_side, service_side) = match dir {
        // From the endpoint's side about a packet the client sent: the client sees its packet
        // as sent (client -> Service) in an error from the Service address.
        Dir::Reply => ((f.orig.src, f.orig.sport), (f.orig.dst, f.orig.dport), f.orig.src, f.reply.src, f.orig.dst),
        // From the client's side about a reply: the endpoint sees its reply as it sent it.
        Dir::Orig => ((f.reply.src, f.reply.sport), (f.reply.dst, f.reply.dport), f.reply.src, f.orig.dst, f.reply.dst),
    };
    let ret = if dir == Dir::Reply { uplink_return(f.tag) } else { None };
    let adj = f.adj;
    // The outer header: to the quoted packet's sender; from the Service address if the error
    // came from the endpoint itself (a router in between keeps its own address).
    // An error from beyond the client (a router on the way to a client outside) about a reply
    // of a SNAT'd flow comes from the SNAT address: the endpoint only knows that address as its
    // peer, and a node holding the endpoint accepts from the tunnel only sources of the sending
    // node (issue 17's anti-spoofing), never a router's outside address.
    let snat_reply = dir == Dir::Orig && super::is_snat(f);
    let new_outer_src = if m.src == endpoint_side {
        service_side
    } else if snat_reply {
        f.reply.dst
    } else {
        m.src
    };
    let Some(d) = frame.data_mut().get_mut(..end) else { return Nat::Untouched };
    {
        // The quote: addresses, ports, its header checksum, its TCP/UDP checksum when quoted.
        let (qip, ql4) = d[quote_at..].split_at_mut(qhl);
        let mut q = Ipv4Packet::new_unchecked(qip);
        q.set_src_addr(quote_src.0);
        q.set_dst_addr(quote_dst.0);
        q.fill_checksum();
        let l4_sum = |old: u16| {
            let c = checksum::update32(old, u32::from(qkey.src), u32::from(quote_src.0));
            let c = checksum::update32(c, u32::from(qkey.dst), u32::from(quote_dst.0));
            checksum::update16(checksum::update16(c, qkey.sport, quote_src.1), qkey.dport, quote_dst.1)
        };
        if qproto == IpProtocol::Tcp {
            // RFC 792 quotes 8 bytes: the TCP checksum is there only when the sender quoted more.
            let has_checksum = ql4.len() >= tcp::CHECKSUM_OFFSET + 2;
            let mut t = TcpPacket::new_unchecked(&mut *ql4);
            t.set_src_port(quote_src.1);
            t.set_dst_port(quote_dst.1);
            if has_checksum {
                t.set_checksum(l4_sum(t.checksum()));
            }
            // A flow on a reused tuple: the quote's sequence space and clock are its sender's
            // again (the client's TCP ignores an error quoting a sequence number it never sent).
            match dir {
                Dir::Reply => adj.restore_quote_from_client(ql4),
                Dir::Orig => adj.restore_quote_from_backend(ql4),
            }
        } else {
            let mut u = UdpPacket::new_unchecked(ql4);
            u.set_src_port(quote_src.1);
            u.set_dst_port(quote_dst.1);
            if u.checksum() != 0 {
                u.set_checksum(l4_sum(u.checksum()));
            }
        }
    }
    let mut h = Ipv4Packet::new_unchecked(&mut d[ip..icmp_at]);
    h.set_src_addr(new_outer_src);
    h.set_dst_addr(new_outer_dst);
    h.fill_checksum();
    // The ICMP checksum covers the quote: recompute it.
    IcmpPacket::new_unchecked(&mut d[icmp_at..]).fill_checksum();
    m.src = new_outer_src;
    m.dst = new_outer_dst;
    Nat::Translated { dir, uplink_return: ret }
}
