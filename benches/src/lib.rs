//! Shared set-up for the criterion benchmarks: batches of frames in UMEM-like buffers.

use dataplane::pipeline::{process_batch, Disposition, FrameBuf, WorkerState};
use dataplane::tables::{PortId, Tables};
use dataplane::testkit::{self, Ip, Vxlan, L4};

/// Batch size the workers use.
pub const BATCH: usize = 32;

/// A batch of identical frames in buffers with headroom, re-armed before each run (the
/// pipeline rewrites frames in place).
#[derive(Debug)]
pub struct Batch {
    template: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    pub port: PortId,
    pub out: Vec<Disposition>,
}

/// UDP payload length for an Ethernet frame of `frame_len` bytes (pod side: 14 + 20 + 8).
pub fn udp_payload_for(frame_len: usize) -> usize {
    frame_len.saturating_sub(42)
}

impl Batch {
    /// `frame_len`-byte UDP frames from pod 1 to a pod on node B (to be encapsulated).
    pub fn pod_to_remote(frame_len: usize) -> Batch {
        let payload = vec![0xa5u8; udp_payload_for(frame_len)];
        let ip = testkit::ipv4(
            testkit::POD1_IP,
            testkit::REMOTE_POD_B,
            &L4::Udp { sport: 40000, dport: 5201, payload: &payload },
        );
        Batch::new(testkit::POD1, testkit::from_pod1(&ip))
    }

    /// The same, but with the pod's CHECKSUM_PARTIAL offload (the veth default), so every frame
    /// needs its UDP checksum completed in software.
    pub fn pod_to_remote_partial(frame_len: usize) -> Batch {
        let mut b = Batch::pod_to_remote(frame_len);
        testkit::make_partial(&mut b.template);
        b
    }

    /// VXLAN from node B whose inner frame is `frame_len` bytes, to pod 1.
    pub fn remote_to_pod(frame_len: usize) -> Batch {
        let payload = vec![0x5au8; udp_payload_for(frame_len)];
        let ip = testkit::ipv4_with(
            &Ip { ttl: 63, ..Ip::new(testkit::REMOTE_POD_B, testkit::POD1_IP) },
            &L4::Udp { sport: 40000, dport: 5201, payload: &payload },
        );
        Batch::new(testkit::UPLINK, testkit::vxlan_frame(&Vxlan::b_to_a(), &ip))
    }

    /// `frame_len`-byte TCP segments (ACK) from pod 1 to the testkit's ClusterIP, whose endpoint
    /// is on node B: conntrack hit, DNAT, encap.
    pub fn pod_to_service(frame_len: usize) -> Batch {
        let payload = vec![0x3cu8; frame_len.saturating_sub(54)];
        let ip = testkit::ipv4(
            testkit::POD1_IP,
            testkit::SERVICE_VIP,
            &L4::Tcp { sport: 40000, dport: 80, seq: 1, ack: 1, flags: 0x010, payload: &payload },
        );
        Batch::new(testkit::POD1, testkit::from_pod1(&ip))
    }

    pub fn new(port: PortId, frame: Vec<u8>) -> Batch {
        let bufs = (0..BATCH).map(|_| testkit::umem(&frame)).collect();
        Batch { template: frame, bufs, port, out: vec![Disposition::ToHost; BATCH] }
    }

    /// Restores every frame to the template (not part of the measured work's semantics, but
    /// measured with it: a memcpy per frame, the same as an AF_XDP copy-mode receive).
    pub fn rearm(&mut self) {
        let n = self.template.len();
        for b in &mut self.bufs {
            b[testkit::HEADROOM..testkit::HEADROOM + n].copy_from_slice(&self.template);
        }
    }

    /// Runs the batch through the pipeline once.
    pub fn run(&mut self, tables: &Tables, state: &mut WorkerState, now: u64) {
        let n = self.template.len();
        let mut frames: [Option<FrameBuf<'_>>; BATCH] = Default::default();
        let mut count = 0;
        for (slot, b) in frames.iter_mut().zip(self.bufs.iter_mut()) {
            *slot = FrameBuf::new(b, testkit::HEADROOM, n);
            count += 1;
        }
        let mut flat: [FrameBuf<'_>; BATCH] =
            frames.map(|f| f.unwrap_or_else(|| unreachable!("template fits its buffer")));
        process_batch(tables, state, now, self.port, &mut flat[..count], &mut self.out);
    }

    pub fn frame_len(&self) -> usize {
        self.template.len()
    }
}
