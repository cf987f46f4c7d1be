//! Per-port counters kept by each worker: plain integers, no atomics, read out by the
//! control thread from snapshots (later issue). Indexed by [`PortId`].

use super::DropReason;
use crate::tables::PortId;

/// Things that happened to frames that were not dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCounters {
    /// ARP replies sent for the pod gateway.
    pub arp_replies: u64,
    /// CHECKSUM_PARTIAL TCP/UDP checksums completed in software.
    pub partial_checksums_completed: u64,
    /// Frames encapsulated toward a remote node.
    pub encapsulated: u64,
    /// Outer VXLAN UDP checksums accepted as offload-pending (pseudo-header only, or valid by
    /// local checksum offload once the inner checksum was completed): what a veth underlay
    /// delivers from a Linux sender. Corrupt ones are `vxlan_bad_outer_checksum` drops.
    pub outer_partial_checksums: u64,
    /// Frames decapsulated from a remote node.
    pub decapsulated: u64,
    /// ICMP time exceeded messages generated.
    pub icmp_time_exceeded_sent: u64,
    /// New Service flows (DNAT to an endpoint).
    pub service_flows: u64,
    /// TCP resets sent to refuse a connection (no endpoint, SNAT exhausted).
    pub tcp_resets_sent: u64,
    /// SYNs answered by a bare ACK: the endpoint still holds the 5-tuple (incident 2).
    pub bare_ack_to_syn: u64,
    /// TCP frames larger than their egress, segmented in software, and the segments sent.
    pub segmented: u64,
    pub segments_sent: u64,
    /// Non-TCP packets (DF clear) larger than their egress, fragmented, and the fragments.
    pub fragmented: u64,
    pub fragments_sent: u64,
    /// ICMP fragmentation needed sent for oversized packets with DF set.
    pub icmp_frag_needed_sent: u64,
}

/// What one Service endpoint did with the connections sent to it (for the handshake: the
/// signals incidents 1-4 needed, per backend).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// New TCP flows (SYNs) sent to it.
    pub syns: u64,
    /// SYNs the client had to send again before an answer.
    pub syn_retransmits: u64,
    /// SYNs answered with SYN|ACK.
    pub syn_answered: u64,
    /// Flows that expired with their SYN never answered.
    pub syn_unanswered: u64,
    /// SYNs answered by a bare ACK: it still held the 5-tuple (TIME_WAIT, incident 2).
    pub bare_ack_to_syn: u64,
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
