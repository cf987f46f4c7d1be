//! Per-port counters kept by each worker: plain integers, no atomics, bumped per batch where
//! they can be, read out between batches. Indexed by [`PortId`].
//!
//! Every named counter is declared once, with its help line, by [`counter_set!`] (as VPP's
//! `.def` files and `drop_reasons!` for drops): the struct, the names and the help text come
//! from the one list, and `ctl stats`, the Prometheus families and reports iterate it instead
//! of listing fields again.

use super::DropReason;
use crate::tables::PortId;

/// Declares a struct of named `u64` counters from one list of `field: "help"` pairs, with
/// `NAMES`, `HELP`, `get(i)` and `iter()` (name, help, value) generated from that list.
#[macro_export]
macro_rules! counter_set {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $( $field:ident : $help:literal, )* }) => {
        $(#[$meta])*
        $vis struct $name { $( #[doc = $help] pub $field: u64, )* }

        impl $name {
            /// Each counter's stable snake_case name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[ $( stringify!($field), )* ];
            /// Each counter's help line, in declaration order.
            pub const HELP: &'static [&'static str] = &[ $( $help, )* ];

            /// The `i`-th counter's value, in declaration order.
            pub fn get(&self, i: usize) -> u64 {
                [ $( self.$field, )* ].get(i).copied().unwrap_or(0)
            }

            /// (name, help, value) of every counter, in declaration order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
                Self::NAMES.iter().zip(Self::HELP).enumerate().map(move |(i, (n, h))| (*n, *h, self.get(i)))
            }

            /// The non-zero counters, (name, value).
            pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
                self.iter().filter(|(_, _, v)| *v > 0).map(|(n, _, v)| (n, v))
            }
        }
    };
}

counter_set! {
    /// Things that happened to frames that were not dropped.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct EventCounters {
        arp_replies: "ARP replies sent for the pod gateway",
        partial_checksums_completed: "CHECKSUM_PARTIAL TCP/UDP checksums completed in software",
        outer_partial_checksums: "outer VXLAN UDP checksums accepted as offload-pending (pseudo-header only, or valid by local checksum offload once the inner checksum was completed): what a veth underlay delivers from a Linux sender; corrupt ones are vxlan_bad_outer_checksum drops",
        encapsulated: "frames encapsulated toward a remote node",
        decapsulated: "frames decapsulated from a remote node",
        icmp_time_exceeded_sent: "ICMP time exceeded messages generated",
        service_flows: "new Service flows (DNAT to an endpoint)",
        conntrack_early_drops: "unassured flows (handshake never completed, UDP never answered) evicted from a full conntrack table or SNAT pool to make room for a new flow (netfilter's early_drop)",
        early_drop_spared: "young unassured flows of known clients (a TCP handshake completed from their address in the last 10 minutes) passed over by early drop, counted per eviction that passed them: a lost ACK or request still has time for its retransmission",
        udp_flows_moved: "UDP flows whose endpoint left its Service or stopped serving, ended on their next packet after the tables change; a packet from the client starts a new flow on a serving endpoint (kube-proxy's conntrack cleanup for UDP, without a table scan)",
        to_gone_endpoint: "packets of TCP flows whose endpoint has left its Service, sent on to it (kept until the connection ends, as kube-proxy keeps them)",
        fragments_translated: "later fragments of a UDP datagram to or from a Service given the address rewrite their first fragment got (nat::fragments)",
        affinity_full: "new clients of a ClientIP-affinity Service not remembered: the affinity table was full (the client still gets the endpoint its address hashes to)",
        tcp_resets_sent: "TCP resets sent to refuse a connection (every SNAT tuple toward the endpoint in use; a Service without endpoints is refused with ICMP port unreachable, as kube-proxy refuses it)",
        bare_ack_to_syn: "SYNs answered by a bare ACK: the endpoint still holds the 5-tuple (incident 2)",
        snat_reuse_bare_ack: "of those, SYNs on a SNAT tuple reused from the endpoint's TIME_WAIT with sequence/timestamp offsets (the offsets did not satisfy it: expected to stay 0)",
        segmented: "TCP frames larger than their egress, segmented in software",
        segments_sent: "segments sent for segmented frames",
        fragmented: "non-TCP packets (DF clear) larger than their egress, fragmented",
        fragments_sent: "fragments sent for fragmented packets",
        icmp_frag_needed_sent: "ICMP fragmentation needed sent for oversized packets with DF set",
    }
}

counter_set! {
    /// What one Service endpoint did with the connections sent to it (for the handshake: the
    /// signals incidents 1-4 needed, per backend).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct BackendCounters {
        syns: "new TCP flows (SYNs) sent to it",
        syn_retransmits: "SYNs the client had to send again before an answer",
        syn_answered: "SYNs answered with SYN|ACK",
        syn_unanswered: "flows that expired with their SYN never answered",
        bare_ack_to_syn: "SYNs answered by a bare ACK: it still held the 5-tuple (TIME_WAIT, incident 2)",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Transmitted on this port (counted by the AF_XDP worker when queued to the tx ring).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    pub events: EventCounters,
}

impl Default for PortCounters {
    fn default() -> Self {
        PortCounters {
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            drops: [0; DropReason::COUNT],
            events: EventCounters::default(),
        }
    }
}

impl PortCounters {
    #[inline]
    pub(crate) fn rx(&mut self, packets: u64, bytes: u64) {
        self.rx_packets += packets;
        self.rx_bytes += bytes;
    }
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
    /// The non-zero drop counters, in declaration order.
    pub fn nonzero_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops[r.index()])).filter(|(_, n)| *n > 0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    ports: Vec<PortCounters>,
}

impl Counters {
    /// The counters of `port`, created on first use (once per port, not per packet).
    #[inline]
    pub fn port_mut(&mut self, port: PortId) -> &mut PortCounters {
        let i = usize::from(port.0);
        if i >= self.ports.len() {
            self.ports.resize_with(i + 1, PortCounters::default);
        }
        &mut self.ports[i]
    }
    pub fn port(&self, port: PortId) -> Option<&PortCounters> {
        self.ports.get(usize::from(port.0))
    }
    pub fn iter(&self) -> impl Iterator<Item = (PortId, &PortCounters)> {
        self.ports.iter().enumerate().map(|(i, c)| (PortId(i as u16), c))
    }
    /// A drop reason summed over all ports.
    pub fn drop_total(&self, r: DropReason) -> u64 {
        self.ports.iter().map(|p| p.drops[r.index()]).sum()
    }
}
