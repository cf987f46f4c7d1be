//! Fuzzes the pipeline entry: the first byte picks the ingress port (uplink, host, two pods,
//! an unattached port), the second a headroom, the rest is the frame. The tables carry a
//! ClusterIP Service, so conntrack, NAT and ICMP-error translation are fuzzed as well. Whatever comes in, the
//! pipeline must not panic, must return a disposition, must count a drop exactly once, and a
//! forwarded frame must stay inside its buffer.
#![no_main]

use dataplane::pipeline::{process_frame, Disposition, FrameBuf, WorkerState};
use dataplane::tables::PortId;
use dataplane::testkit;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static TABLES: OnceLock<dataplane::tables::Tables> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let [port, headroom, frame @ ..] = data else { return };
    // Node A with a ClusterIP Service: the Service NAT paths are exercised too.
    let tables = TABLES.get_or_init(testkit::tables_with_service);
    let port = PortId(u16::from(*port % 5));
    let headroom = usize::from(*headroom);
    let mut buf = vec![0u8; headroom + frame.len() + 128];
    buf[headroom..headroom + frame.len()].copy_from_slice(frame);
    let cap = buf.len();
    let Some(mut f) = FrameBuf::new(&mut buf, headroom, frame.len()) else { return };
    // A small flow table: the fuzzer builds a fresh worker state per input.
    let mut state = WorkerState::with_flows(0, 64);
    let d = process_frame(tables, &mut state, 0, port, &mut f);
    assert!(f.start() + f.len() <= cap);
    if let Disposition::Drop(r) = d {
        assert_eq!(state.counters.drop_total(r), 1);
    }
});
