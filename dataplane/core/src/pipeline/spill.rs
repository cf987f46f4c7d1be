//! The spill area: where the packets of an oversized frame go once segmented or fragmented
//! (one frame in, many out). Allocated once per worker; per batch the worker copies the spilled
//! packets into free UMEM chunks, queues them on their egress ports and clears it.

use crate::gso::Sink;
use crate::tables::PortId;

/// Bytes of spill per worker: a whole batch (32) of aggregated 64 KiB frames' worth of
/// segments, each with up to 64 bytes of Ethernet and VXLAN headers (~2.2 MiB).
const SPILL_BYTES: usize = 32 * ((64 << 10) + 48 * 64);
/// Packets of spill per worker: 32 frames of up to 48 segments (64 KiB at a 1398-byte MSS).
const SPILL_PACKETS: usize = 32 * 48;

/// Where a frame's spilled packets start: (bytes used, packets), to roll back to.
pub(crate) type Mark = (usize, usize);

#[derive(Debug)]
pub struct Spill {
    buf: Vec<u8>,
    used: usize,
    packets: Vec<(usize, usize, PortId)>,
}

impl Default for Spill {
    fn default() -> Self {
        Spill { buf: vec![0; SPILL_BYTES], used: 0, packets: Vec::with_capacity(SPILL_PACKETS) }
    }
}

impl Spill {
    /// The spilled packets, in order: (frame bytes, egress port).
    pub fn packets(&self) -> impl Iterator<Item = (&[u8], PortId)> + '_ {
        self.packets.iter().map(|&(s, l, p)| (&self.buf[s..s + l], p))
    }
    pub fn len(&self) -> usize {
        self.packets.len()
    }
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
    pub fn clear(&mut self) {
        self.used = 0;
        self.packets.clear();
    }
    /// A mark to roll back to (when a frame's segmentation fails half-way).
    pub(crate) fn mark(&self) -> Mark {
        (self.used, self.packets.len())
    }
    pub(crate) fn rollback(&mut self, mark: Mark) {
        self.used = mark.0;
        self.packets.truncate(mark.1);
    }
    /// The `i`-th packet's whole buffer region, mutable (for the headers written after
    /// segmentation).
    pub(crate) fn region_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let &(s, l, _) = self.packets.get(i)?;
        self.buf.get_mut(s..s + l)
    }
    /// A sink reserving `prefix` bytes before every packet (for the Ethernet and VXLAN
    /// headers), with every packet bound for `port`.
    pub(crate) fn sink(&mut self, prefix: usize, port: PortId) -> SpillSink<'_> {
        SpillSink { spill: self, prefix, port }
    }
}

pub(crate) struct SpillSink<'a> {
    spill: &'a mut Spill,
    prefix: usize,
    port: PortId,
}

impl Sink for SpillSink<'_> {
    fn next(&mut self, len: usize) -> Option<&mut [u8]> {
        let s = &mut *self.spill;
        let need = self.prefix + len;
        if s.packets.len() >= SPILL_PACKETS || s.used + need > s.buf.len() {
            return None;
        }
        let start = s.used;
        s.used += need;
        s.packets.push((start, need, self.port));
        s.buf.get_mut(start + self.prefix..start + need)
    }
}
