//! What the stages share: the per-batch context ([`Ctx`]: tables, time, the worker's mutable
//! state borrowed once per batch), where a packet came from ([`Origin`]), and the facts the
//! validation stage established about a packet ([`Ipv4Meta`]), which every later stage works
//! from instead of decoding the header again.

use super::{Nanos, PortCounters, TokenBucket};
use crate::tables::{PortId, Tables};
use crate::wire::IpProtocol;
use core::net::Ipv4Addr;

/// Where the packet being routed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Pod,
    Host,
    Tunnel,
    /// A client outside the cluster, through the uplink (NodePort, external and LB IPs).
    Outside,
}

/// The per-packet context threaded through the stages.
pub(crate) struct Ctx<'a> {
    pub(crate) tables: &'a Tables,
    pub(crate) now: Nanos,
    pub(crate) ingress: PortId,
    /// The worker's outer IPv4 ident sequence.
    pub(crate) ident: &'a mut u16,
    pub(crate) icmp_limit: &'a mut TokenBucket,
    /// The ingress port's counters, borrowed for the whole batch.
    pub(crate) counters: &'a mut PortCounters,
    pub(crate) flows: &'a mut crate::conntrack::ConnTrack,
    pub(crate) snat: &'a mut crate::nat::snat::SnatAllocator,
    pub(crate) affinity: &'a mut crate::nat::affinity::AffinityTable,
    /// The current frame's flow key as the batch's prefetch pass guessed it, with its hash
    /// (so a lookup of that key does not hash it again).
    pub(crate) hint: Option<(crate::conntrack::FlowKey, crate::conntrack::KeyHash)>,
    /// Where segments and fragments of oversized frames go.
    pub(crate) fragments: &'a mut crate::nat::fragments::Fragments,
    pub(crate) spill: &'a mut super::Spill,
    /// A capture or trace in progress.
    pub(crate) observe: Option<&'a mut crate::observe::Observe>,
    pub(crate) backends: &'a mut super::BackendTable,
}

impl Ctx<'_> {
    #[inline]
    pub(crate) fn events(&mut self) -> &mut super::EventCounters {
        &mut self.counters.events
    }
    #[inline]
    pub(crate) fn next_ident(&mut self) -> u16 {
        *self.ident = self.ident.wrapping_add(1);
        *self.ident
    }
}

/// Facts about a validated IPv4 packet at offset 14 of the frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ipv4Meta {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    /// The protocol number as on the wire (the byte a conntrack key holds); decisions go
    /// through [`Ipv4Meta::protocol`].
    pub(crate) proto: u8,
    pub(crate) header_len: usize,
    pub(crate) total_len: usize,
    pub(crate) ttl: u8,
    /// In bytes, as [`crate::wire::Ipv4Packet::frag_offset`] gives it.
    pub(crate) frag_offset: u16,
    pub(crate) is_fragment: bool,
    /// `src_port << 16 | dst_port` for TCP/UDP with a transport header present, else 0.
    pub(crate) ports: u32,
    /// An ICMP error message (never answered with another ICMP error).
    pub(crate) icmp_error: bool,
}

impl Ipv4Meta {
    #[inline]
    pub(crate) fn sport(&self) -> u16 {
        (self.ports >> 16) as u16
    }
    #[inline]
    pub(crate) fn dport(&self) -> u16 {
        self.ports as u16
    }
    #[inline(always)]
    pub(crate) fn protocol(&self) -> IpProtocol {
        IpProtocol::from(self.proto)
    }
    /// TCP or UDP: the protocols Service NAT and segmentation act on.
    #[inline(always)]
    pub(crate) fn has_ports(&self) -> bool {
        matches!(self.protocol(), IpProtocol::Tcp | IpProtocol::Udp)
    }

    /// Hash of the flow for the VXLAN source port: stable per 5-tuple (3-tuple for
    /// fragments), well mixed (murmur3's 64-bit finalizer).
    #[inline(always)]
    pub(crate) fn flow_hash(&self) -> u32 {
        let a = (u64::from(u32::from(self.src)) << 32) | u64::from(u32::from(self.dst));
        let b = (u64::from(self.ports) << 8) | u64::from(self.proto);
        let mut h = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h as u32
    }
}
