//! The Service NAT stage, between validation and routing. A packet of a tracked flow is
//! translated as its flow says; a new flow to a Service frontend gets an endpoint (kube-proxy's
//! rules, Maglev) and is tracked; a new flow with no endpoint is refused (TCP RST / ICMP port
//! unreachable). Everything else passes untouched.
//!
//! A flow's two keys carry its whole translation: the original key is what the client sent
//! (client -> Service), the reply key what the endpoint answers with (endpoint -> client, or ->
//! the SNAT address). Original-direction packets get the reply key's source as destination (and
//! its destination as source when SNAT'd); reply packets get the original key's destination as
//! source and its source as destination. Checksums are updated incrementally (RFC 1624).

use super::overlay::{Ctx, Ipv4Meta, Origin};
use super::reply;
use super::{Disposition, DropReason, FrameBuf};
use crate::conntrack::{CtError, Dir, FlowKey, KeyHash, TcpEvent};
use crate::nat::snat::Destination;
use crate::wire::checksum;
use crate::wire::{ethernet, tcp, udp, MacAddr, TcpFlags};
use core::net::Ipv4Addr;

/// Flows created from outside the cluster remember where their client is: the tag holds this
/// flag and the source MAC of the client's frame (its L2 next hop on the uplink), so replies go
/// straight back out of the uplink to it.
const TAG_UPLINK_RETURN: u64 = 1 << 63;

/// What the stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nat {
    /// Not a Service flow.
    Untouched,
    /// Translated; for a reply to a client outside the cluster, the MAC to send it to.
    Translated { dir: Dir, uplink_return: Option<MacAddr> },
    /// Refused; the answer (RST / ICMP) goes here.
    Answered(Disposition),
}

fn uplink_return(tag: u64) -> Option<MacAddr> {
    (tag & TAG_UPLINK_RETURN != 0).then(|| {
        let b = tag.to_be_bytes();
        MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
    })
}

/// Applies Service NAT to the validated packet `m` describes. `client_mac` is the source MAC of
/// a frame that came from outside through the uplink.
#[inline]
pub(crate) fn apply(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &mut Ipv4Meta,
    origin: Origin,
    client_mac: Option<MacAddr>,
) -> Result<Nat, DropReason> {
    if m.proto == 1 && m.icmp_error && !m.is_fragment {
        return Ok(icmp_error(ctx, frame, m));
    }
    if (m.proto != 6 && m.proto != 17) || m.is_fragment {
        return Ok(Nat::Untouched);
    }
    let (sport, dport) = ((m.ports >> 16) as u16, m.ports as u16);
    let key = FlowKey { proto: m.proto, src: m.src, dst: m.dst, sport, dport };
    let flags = if m.proto == 6 { tcp_flags(frame, m) } else { TcpFlags(0) };
    let hash = match ctx.hint {
        Some((k, h)) if k == key => h,
        _ => KeyHash::of(&key),
    };
    if let Some((id, dir)) = ctx.flows.lookup_hashed(&key, hash, ctx.now) {
        match ctx.flows.update(id, dir, flags, m.total_len, ctx.now) {
            TcpEvent::Reopened => {
                // A new SYN on a closed flow: start over (and pick an endpoint afresh).
                if let Some(f) = ctx.flows.remove(id) {
                    release_snat(ctx, &f, ctx.now);
                }
                return new_flow(ctx, frame, m, key, flags, origin, client_mac);
            }
            TcpEvent::BareAckToSyn => {
                ctx.events().bare_ack_to_syn += 1;
                backend_event(ctx, id, |b| b.bare_ack_to_syn += 1);
            }
            TcpEvent::SynRetransmit => backend_event(ctx, id, |b| b.syn_retransmits += 1),
            TcpEvent::SynAnswered => backend_event(ctx, id, |b| b.syn_answered += 1),
            _ => {}
        }
        if flags.contains(TcpFlags::SYN) {
            record_mss(ctx, frame, m, id, dir);
        }
        let Some(f) = ctx.flows.get(id) else { return Ok(Nat::Untouched) };
        let ret = uplink_return(f.tag);
        let (src, dst) = match dir {
            Dir::Orig => ((f.reply.dst, f.reply.dport), (f.reply.src, f.reply.sport)),
            Dir::Reply => ((f.orig.dst, f.orig.dport), (f.orig.src, f.orig.sport)),
        };
        rewrite(frame, m, src, dst);
        return Ok(Nat::Translated { dir, uplink_return: if dir == Dir::Reply { ret } else { None } });
    }
    new_flow(ctx, frame, m, key, flags, origin, client_mac)
}

/// Remembers the MSS a SYN or SYN|ACK announced (for segmenting toward that side later).
#[cold]
fn record_mss(ctx: &mut Ctx<'_>, frame: &FrameBuf<'_>, m: &Ipv4Meta, id: crate::conntrack::FlowId, dir: Dir) {
    let start = ethernet::HEADER_LEN + m.header_len;
    let Some(tcp) = frame.data().get(start..ethernet::HEADER_LEN + m.total_len) else { return };
    let Some(mss) = announced_mss(tcp) else { return };
    if let Some(f) = ctx.flows.get_mut(id) {
        f.mss[if dir == Dir::Orig { 0 } else { 1 }] = mss;
    }
}

/// The MSS option of a TCP header, if present and well formed.
pub(crate) fn announced_mss(tcp: &[u8]) -> Option<u16> {
    let thl = usize::from(*tcp.get(12)? >> 4) * 4;
    let opts = tcp.get(20..thl)?;
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let v = u16::from_be_bytes([*opts.get(i + 2)?, *opts.get(i + 3)?]);
                    return (v > 0).then_some(v);
                }
                i += len;
            }
        }
    }
    None
}

/// The MSS the receiver of a TCP packet with this (translated) tuple announced, if its flow is
/// tracked: a packet travelling in a flow's original direction goes to the side whose SYN|ACK
/// announced `mss[1]`, and the other way round.
pub(crate) fn receiver_mss(ctx: &mut Ctx<'_>, key: &FlowKey) -> Option<u16> {
    let (id, dir) = ctx.flows.lookup(&key.reversed(), ctx.now)?;
    let f = ctx.flows.get(id)?;
    // The reversed tuple matched `dir`: this packet travels the other way.
    let mss = if dir == Dir::Reply { f.mss[1] } else { f.mss[0] };
    (mss > 0).then_some(mss)
}

/// Counts a handshake event against the flow's endpoint.
#[cold]
fn backend_event(ctx: &mut Ctx<'_>, id: crate::conntrack::FlowId, f: impl FnOnce(&mut super::BackendCounters)) {
    if let Some(flow) = ctx.flows.get(id) {
        f(ctx.backends.entry((flow.reply.src, flow.reply.sport)).or_default());
    }
}

fn new_flow(
    ctx: &mut Ctx<'_>,
    frame: &mut FrameBuf<'_>,
    m: &mut Ipv4Meta,
    key: FlowKey,
    flags: TcpFlags,
    origin: Origin,
    client_mac: Option<MacAddr>,
) -> Result<Nat, DropReason> {
    let tables = ctx.tables;
    let Some((sp, kind)) = tables.services().lookup(key.proto, key.dst, key.dport, tables.is_local_addr(key.dst))
    else {
        return Ok(Nat::Untouched);
    };
    let from_outside = origin == Origin::Outside || !tables.node.cluster_cidr.contains(key.src);
    // ClientIP affinity: hash the client alone, so Maglev keeps it on one endpoint.
    let hash = match sp.affinity_ns {
        Some(_) => u64::from(u32::from(key.src)).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        None => u64::from(m.flow_hash()).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(m.flow_hash()),
    };
    // ClientIP affinity: the client's last endpoint while within the timeout and still a
    // candidate; otherwise a fresh choice, remembered.
    let sticky = sp.affinity_ns.and_then(|_| {
        let (e, expires) = *ctx.affinity.get(&(key.proto, key.dst, key.dport, key.src))?;
        (expires > ctx.now).then_some(e).and_then(|e| sp.still_usable(kind, from_outside, e))
    });
    let chosen = match sticky {
        Some(c) => Ok(c),
        None => sp.choose(kind, from_outside, hash),
    };
    if let (Some(t), Ok(c)) = (sp.affinity_ns, &chosen) {
        ctx.affinity.insert(
            (key.proto, key.dst, key.dport, key.src),
            ((c.endpoint.ip, c.endpoint.port), ctx.now.saturating_add(t)),
        );
    }
    let Ok(choice) = chosen else {
        ctx.counters.drops[DropReason::ServiceNoEndpoint.index()] += 1;
        let answer = if let (Some(mac), 6) = (client_mac.filter(|_| origin == Origin::Outside), key.proto) {
            reply::tcp_reset_outside(ctx, frame, m, mac)
        } else if origin == Origin::Outside {
            // UDP from outside: no route to the client is known here for an ICMP error.
            ctx.counters.drops[DropReason::ServiceNoEndpoint.index()] -= 1;
            return Err(DropReason::ServiceNoEndpoint);
        } else if key.proto == 6 {
            reply::tcp_reset(ctx, frame, m)
        } else {
            reply::port_unreachable(ctx, frame, m, key.dst)
        };
        return answer.map(Nat::Answered);
    };
    let ep = choice.endpoint;
    // SNAT when the endpoint could not answer the client directly:
    // - hairpin: a pod reaching itself through its Service must see another source, or its
    //   kernel drops the packet as a martian;
    // - clients outside the cluster under externalTrafficPolicy Cluster: the endpoint, maybe on
    //   another node, must answer through this node, which holds the flow.
    // The SNAT address is this node's address on the pod network (its gateway, which every node
    // routes here over VXLAN), with a TIME_WAIT-safe port.
    let snat = ep.ip == key.src || (from_outside && !choice.preserve_client);
    let (snat_ip, snat_port) = if snat {
        let d = Destination { proto: key.proto, snat_ip: tables.gateway(), backend_ip: ep.ip, backend_port: ep.port };
        match ctx.snat.allocate(d, ctx.now) {
            Ok(p) => (tables.gateway(), p),
            Err(_) if key.proto != 6 => return Err(DropReason::SnatPortsExhausted),
            Err(_) => {
                ctx.counters.drops[DropReason::SnatPortsExhausted.index()] += 1;
                let answer = match client_mac.filter(|_| origin == Origin::Outside) {
                    Some(mac) => reply::tcp_reset_outside(ctx, frame, m, mac),
                    None => reply::tcp_reset(ctx, frame, m),
                };
                return answer.map(Nat::Answered);
            }
        }
    } else {
        (key.src, key.sport)
    };
    let reply_key = FlowKey { proto: key.proto, src: ep.ip, dst: snat_ip, sport: ep.port, dport: snat_port };
    let tag = match client_mac {
        Some(mac) if origin == Origin::Outside => {
            let b = mac.0;
            TAG_UPLINK_RETURN | u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
        }
        _ => 0,
    };
    let id = match ctx.flows.insert(key, reply_key, ctx.now, tag) {
        Ok(id) => id,
        Err(e) => {
            if snat_ip != key.src {
                let d = Destination { proto: key.proto, snat_ip, backend_ip: ep.ip, backend_port: ep.port };
                ctx.snat.release(d, snat_port, ctx.now);
            }
            return Err(match e {
                CtError::Full => DropReason::ConntrackFull,
                CtError::Exists => DropReason::ConntrackCollision,
            });
        }
    };
    ctx.flows.update(id, Dir::Orig, flags, m.total_len, ctx.now);
    if flags.contains(TcpFlags::SYN) {
        record_mss(ctx, frame, m, id, Dir::Orig);
    }
    ctx.events().service_flows += 1;
    if key.proto == 6 && flags.contains(TcpFlags::SYN) {
        ctx.backends.entry((ep.ip, ep.port)).or_default().syns += 1;
    }
    rewrite(frame, m, (snat_ip, snat_port), (ep.ip, ep.port));
    Ok(Nat::Translated { dir: Dir::Orig, uplink_return: None })
}

/// An ICMP error about a packet of a translated flow (frag-needed for path MTU discovery, port
/// unreachable, time exceeded): the quoted packet, as it travelled after translation, is the
/// reverse of one of the flow's keys. Translate the quote back to what its sender sent, send
/// the error to that sender, and if it came from the endpoint itself, from the Service address.
fn icmp_error(ctx: &mut Ctx<'_>, frame: &mut FrameBuf<'_>, m: &mut Ipv4Meta) -> Nat {
    let ip = ethernet::HEADER_LEN;
    let icmp_at = ip + m.header_len;
    let quote_at = icmp_at + crate::wire::icmp::HEADER_LEN;
    let end = ip + m.total_len;
    // The quoted header and its first 8 bytes of TCP/UDP.
    let (qkey, qhl) = {
        let Some(q) = frame.data().get(quote_at..end) else { return Nat::Untouched };
        let Some(h) = q.first_chunk::<20>() else { return Nat::Untouched };
        let qhl = usize::from(h[0] & 0x0f) * 4;
        let proto = h[9];
        if h[0] >> 4 != 4 || qhl < 20 || (proto != 6 && proto != 17) || q.len() < qhl + 8 {
            return Nat::Untouched;
        }
        let l4 = &q[qhl..];
        let key = FlowKey {
            proto,
            src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
            dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
        };
        (key, qhl)
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
    let d = frame.data_mut();
    // The quote: addresses, ports, its header checksum, its UDP checksum when quoted.
    let q = quote_at;
    let (old_qs, old_qd) = (u32::from(qkey.src), u32::from(qkey.dst));
    d[q + 12..q + 16].copy_from_slice(&quote_src.0.octets());
    d[q + 16..q + 20].copy_from_slice(&quote_dst.0.octets());
    d[q + 10..q + 12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&d[q..q + qhl]);
    d[q + 10..q + 12].copy_from_slice(&c.to_be_bytes());
    let l4 = q + qhl;
    d[l4..l4 + 2].copy_from_slice(&quote_src.1.to_be_bytes());
    d[l4 + 2..l4 + 4].copy_from_slice(&quote_dst.1.to_be_bytes());
    let field = l4 + if qkey.proto == 6 { tcp::CHECKSUM_OFFSET } else { udp::CHECKSUM_OFFSET };
    if field + 2 <= end {
        let old = u16::from_be_bytes([d[field], d[field + 1]]);
        if qkey.proto == 6 || old != 0 {
            let mut c = checksum::update32(
                checksum::update32(old, old_qs, u32::from(quote_src.0)),
                old_qd,
                u32::from(quote_dst.0),
            );
            c = checksum::update16(checksum::update16(c, qkey.sport, quote_src.1), qkey.dport, quote_dst.1);
            d[field..field + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    // The outer header: to the quoted packet's sender; from the Service address if the error
    // came from the endpoint itself (a router in between keeps its own address).
    let new_outer_src = if m.src == endpoint_side { service_side } else { m.src };
    d[ip + 12..ip + 16].copy_from_slice(&new_outer_src.octets());
    d[ip + 16..ip + 20].copy_from_slice(&new_outer_dst.octets());
    d[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&d[ip..ip + m.header_len]);
    d[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    // The ICMP checksum covers the quote: recompute it.
    d[icmp_at + 2..icmp_at + 4].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&d[icmp_at..end]);
    d[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
    m.src = new_outer_src;
    m.dst = new_outer_dst;
    Nat::Translated { dir, uplink_return: ret }
}

/// Returns the SNAT port of a flow that ended (if it had one) to the allocator, which holds it.
pub(crate) fn release_snat(ctx: &mut Ctx<'_>, f: &crate::conntrack::Flow, now: u64) {
    if f.reply.dst != f.orig.src || f.reply.dport != f.orig.sport {
        let d = Destination {
            proto: f.orig.proto,
            snat_ip: f.reply.dst,
            backend_ip: f.reply.src,
            backend_port: f.reply.sport,
        };
        ctx.snat.release(d, f.reply.dport, now);
    }
}

fn tcp_flags(frame: &FrameBuf<'_>, m: &Ipv4Meta) -> TcpFlags {
    let at = ethernet::HEADER_LEN + m.header_len + 12;
    match frame.data().get(at..at + 2) {
        Some(b) => TcpFlags(u16::from_be_bytes([b[0], b[1]]) & 0x01ff),
        None => TcpFlags(0),
    }
}

/// Rewrites source and destination address and port, with incremental checksum updates.
fn rewrite(frame: &mut FrameBuf<'_>, m: &mut Ipv4Meta, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) {
    let (old_sport, old_dport) = ((m.ports >> 16) as u16, m.ports as u16);
    if (m.src, old_sport, m.dst, old_dport) == (src.0, src.1, dst.0, dst.1) {
        return;
    }
    let ip = ethernet::HEADER_LEN;
    let l4 = ip + m.header_len;
    let (os, od, ns, nd) = (u32::from(m.src), u32::from(m.dst), u32::from(src.0), u32::from(dst.0));
    let d = frame.data_mut();
    let mut c = u16::from_be_bytes([d[ip + 10], d[ip + 11]]);
    c = checksum::update32(checksum::update32(c, os, ns), od, nd);
    d[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    d[ip + 12..ip + 16].copy_from_slice(&src.0.octets());
    d[ip + 16..ip + 20].copy_from_slice(&dst.0.octets());
    let field = l4 + if m.proto == 6 { tcp::CHECKSUM_OFFSET } else { udp::CHECKSUM_OFFSET };
    let old = u16::from_be_bytes([d[field], d[field + 1]]);
    if m.proto == 6 || old != 0 {
        let mut c = checksum::update32(checksum::update32(old, os, ns), od, nd);
        c = checksum::update16(checksum::update16(c, old_sport, src.1), old_dport, dst.1);
        if m.proto == 17 && c == 0 {
            c = 0xffff;
        }
        d[field..field + 2].copy_from_slice(&c.to_be_bytes());
    }
    d[l4..l4 + 2].copy_from_slice(&src.1.to_be_bytes());
    d[l4 + 2..l4 + 4].copy_from_slice(&dst.1.to_be_bytes());
    m.src = src.0;
    m.dst = dst.0;
    m.ports = (u32::from(src.1) << 16) | u32::from(dst.1);
}
