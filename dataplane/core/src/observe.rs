//! Looking at packets on their way: capture (copies of frames at a point, for a pcap file) and
//! trace (what went in, what came out, where, and the verdict with its drop reason).
//!
//! Off by default: the pipeline then pays one branch per batch and nothing per packet. The
//! points inside the pipeline need no hook: encapsulation only pushes headers in front of the
//! inner frame and decapsulation only pulls them off, so the frame just before encapsulation is
//! what follows the VXLAN header of an output, and the frame just after decapsulation is what
//! follows it in the input (before any rewrite). On, matching frames are copied (bounded by the
//! count asked for) and nothing else changes. Frames are looked into through
//! [`crate::wire::frame`] only (the inner frame of VXLAN); [`crate::wire::PrettyPrinter`] prints
//! what was collected.

use crate::filter::{frame_matches, Filter};
use crate::pipeline::{Disposition, DropReason};
use crate::tables::PortId;
use crate::wire::frame::vxlan_inner;

/// Where a frame is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// As received on a port.
    Rx(PortId),
    /// As sent on a port.
    Tx(PortId),
    /// An inner frame about to be encapsulated toward a remote node.
    PreEncap,
    /// An inner frame just decapsulated.
    PostDecap,
}

impl core::fmt::Display for Point {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Point::Rx(p) => write!(f, "port {}:rx", p.0),
            Point::Tx(p) => write!(f, "port {}:tx", p.0),
            Point::PreEncap => f.write_str("pre-encap"),
            Point::PostDecap => f.write_str("post-decap"),
        }
    }
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub wall_ns: u64,
    pub point: Point,
    pub data: Vec<u8>,
}

/// One traced packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRecord {
    pub wall_ns: u64,
    pub ingress: PortId,
    /// The frame as received.
    pub input: Vec<u8>,
    /// The inner frame just after decapsulation, if it was decapsulated.
    pub post_decap: Option<Vec<u8>>,
    /// The inner frame just before encapsulation, if it was encapsulated.
    pub pre_encap: Option<Vec<u8>>,
    pub verdict: Disposition,
    /// What left, and where (several for a segmented frame; at most 8 are kept).
    pub outputs: Vec<(PortId, Vec<u8>)>,
    /// Segments or fragments the frame became, when more than were kept.
    pub output_count: usize,
}

impl TraceRecord {
    pub fn drop_reason(&self) -> Option<DropReason> {
        match self.verdict {
            Disposition::Drop(r) => Some(r),
            _ => None,
        }
    }
}

/// A capture or trace in progress.
#[derive(Debug, Default)]
pub struct Observe {
    capture: Option<(Vec<Point>, Filter, usize)>,
    pub captured: Vec<Captured>,
    trace: Option<(Filter, usize)>,
    pub traces: Vec<TraceRecord>,
    /// Per frame of the current batch: index into `traces` when it is traced.
    current: Vec<Option<usize>>,
    /// Per frame of the current batch: its inner frame if it arrived as VXLAN.
    inner_in: Vec<Option<Vec<u8>>>,
    /// The frame being processed (its batch index).
    pub(crate) frame: usize,
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

const KEPT_OUTPUTS: usize = 8;

impl Observe {
    /// Captures up to `count` frames matching `filter` at any of `points`.
    pub fn capture(points: Vec<Point>, filter: Filter, count: usize) -> Observe {
        Observe { capture: Some((points, filter, count)), ..Observe::default() }
    }

    /// Traces up to `count` packets matching `filter` (on receive, by either header).
    pub fn trace(filter: Filter, count: usize) -> Observe {
        Observe { trace: Some((filter, count)), ..Observe::default() }
    }

    /// Whether everything asked for has been collected.
    pub fn done(&self) -> bool {
        let cap = self.capture.as_ref().is_none_or(|(_, _, n)| self.captured.len() >= *n);
        let tr = self.trace.as_ref().is_none_or(|(_, n)| self.traces.len() >= *n);
        cap && tr
    }

    /// A frame seen at `point`.
    pub(crate) fn at(&mut self, point: Point, data: &[u8]) {
        if let Some((points, filter, n)) = &self.capture {
            if self.captured.len() < *n && points.contains(&point) && frame_matches(filter, data) {
                self.captured.push(Captured { wall_ns: wall_ns(), point, data: data.to_vec() });
            }
        }
        if let Some(Some(t)) = self.current.get(self.frame) {
            if let Some(r) = self.traces.get_mut(*t) {
                match point {
                    Point::PreEncap => r.pre_encap = Some(data.to_vec()),
                    Point::PostDecap => r.post_decap = Some(data.to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// A batch received on `ingress`, before processing.
    pub(crate) fn before<'a>(&mut self, ingress: PortId, frames: impl Iterator<Item = &'a [u8]>) {
        self.current.clear();
        self.inner_in.clear();
        for (i, data) in frames.enumerate() {
            self.frame = i;
            self.at(Point::Rx(ingress), data);
            self.inner_in.push(vxlan_inner(data).map(<[u8]>::to_vec));
            let traced = match &self.trace {
                Some((filter, n)) if self.traces.len() < *n && frame_matches(filter, data) => {
                    self.traces.push(TraceRecord {
                        wall_ns: wall_ns(),
                        ingress,
                        input: data.to_vec(),
                        post_decap: None,
                        pre_encap: None,
                        verdict: Disposition::Drop(DropReason::PortUnknown),
                        outputs: Vec::new(),
                        output_count: 0,
                    });
                    Some(self.traces.len() - 1)
                }
                _ => None,
            };
            self.current.push(traced);
        }
    }

    /// Frame `i` of the batch came out as `d`, leaving as `outputs` (on their ports).
    pub(crate) fn after<'a>(&mut self, i: usize, d: Disposition, outputs: impl Iterator<Item = (PortId, &'a [u8])>) {
        self.frame = i;
        let trace = self.current.get(i).copied().flatten();
        if let Some(r) = trace.and_then(|t| self.traces.get_mut(t)) {
            r.verdict = d;
        }
        // Decapsulated unless it was refused before or at decapsulation.
        let decapsulated = !matches!(d, Disposition::Drop(r) if r.name().starts_with("vxlan_") || r.name().starts_with("uplink_") || r.name().starts_with("eth") || r.name() == "port_unknown");
        if let Some(inner) = self.inner_in.get_mut(i).and_then(Option::take).filter(|_| decapsulated) {
            self.at(Point::PostDecap, &inner);
        }
        for (port, data) in outputs {
            if let Some(inner) = vxlan_inner(data) {
                self.at(Point::PreEncap, inner);
            }
            self.at(Point::Tx(port), data);
            if let Some(r) = trace.and_then(|t| self.traces.get_mut(t)) {
                r.output_count += 1;
                if r.outputs.len() < KEPT_OUTPUTS {
                    r.outputs.push((port, data.to_vec()));
                }
            }
        }
    }
}
