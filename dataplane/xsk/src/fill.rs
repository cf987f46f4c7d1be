//! Fill-ring budgeting: how many UMEM chunks each port's fill ring holds.
//!
//! A chunk posted to a fill ring cannot be taken back: it returns only when the kernel
//! receives a frame into it. So the budget decides what to post, never what to recall.
//!
//! Contract:
//! - **A guaranteed minimum per port.** Every port is entitled to `min` chunks in its fill
//!   ring. Chunks beyond a port's minimum are granted only from what is left after every
//!   port's shortfall below its own minimum (and a reserve for segmentation and multi-buffer
//!   transmit) is covered. A busy port can therefore never take the chunks an idle port needs
//!   to receive its next frame, whatever the number of ports.
//! - **Refill follows consumption.** A port's ring is topped up to its `target` with exactly
//!   what it consumed. The target doubles (up to `max`) when the kernel has used half the ring
//!   between two services (quadruples when it used all of it), and halves back
//!   towards `min` after `SHRINK_AFTER_NS` without a frame, so an idle port does not keep a
//!   large share posted.
//! - **The transmit side is bounded by the reserve.** A frame received into one port's fill
//!   ring and forwarded leaves that ring's count (its port's shortfall grows) but does not
//!   return to the pool until its egress has sent it. Chunks away on the transmit side (queued
//!   on tx rings, staged for them, or in the batch being processed) are therefore capped at the
//!   reserve (`tx_limits`): with that cap the free pool always covers every port's shortfall,
//!   however slowly an egress drains. Frames beyond it are dropped at their egress
//!   (`tx_backlog`), where the overload is, instead of starving every port's receive. No single
//!   egress holds more than half the cap, so one overloaded port leaves room for the others.
//! - The UMEM is sized from the port count (`umem_frames`), so the minimums always fit, and a
//!   port that would break that is refused at attach (`admits`).
//!
//! Why the cap keeps the guarantee: let `pool` be the free chunks, `D` the sum of the ports'
//! shortfalls and `T` the chunks away on the transmit side. Grants beyond a minimum leave
//! `pool >= D + reserve`; a minimum grant moves one chunk from `pool` to a ring and lowers `D`
//! by one; a received frame raises `D` by at most one and either returns its chunk (pool + 1)
//! or raises `T` by one; a completion moves a chunk from `T` to the pool. So
//! `pool >= D + reserve - T` holds throughout, and `T <= reserve` gives `pool >= D`.
//!
//! Pure arithmetic with time passed in; the worker applies it to real rings.

/// Nanoseconds on the worker's clock.
pub type Nanos = u64;

/// A port idle this long has its target halved (once per period, down to its minimum).
pub const SHRINK_AFTER_NS: Nanos = 1_000_000_000;

/// Fill-ring bounds of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillLimits {
    /// Chunks the port is always entitled to.
    pub min: u32,
    /// At most this many in its fill ring (at most the ring size).
    pub max: u32,
}

/// One port's fill state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFill {
    pub limits: FillLimits,
    /// What the ring is topped up to, between `min` and `max`.
    pub target: u32,
    /// Chunks posted and not yet received back.
    pub in_fill: u32,
    /// When the port last received a frame (or its target last shrank).
    last_busy: Nanos,
    /// Times the port was below its minimum and no chunk was free to post (UMEM exhausted).
    pub starved: u64,
    /// Times the target doubled / halved.
    pub grown: u64,
    pub shrunk: u64,
}

impl PortFill {
    /// A port that starts at its minimum and grows with use (a pod).
    pub fn new(limits: FillLimits, now: Nanos) -> PortFill {
        PortFill { limits, target: limits.min, in_fill: 0, last_busy: now, starved: 0, grown: 0, shrunk: 0 }
    }

    /// A port that starts at its maximum (the uplink and host port: always busy, and only
    /// two of them, so they cannot hoard at a pod's expense: beyond their minimum they are
    /// granted only what the surplus holds).
    pub fn new_busy(limits: FillLimits, now: Nanos) -> PortFill {
        PortFill { target: limits.max, ..PortFill::new(limits, now) }
    }

    /// Chunks missing to reach the guaranteed minimum.
    #[inline]
    pub fn deficit(&self) -> u32 {
        self.limits.min.saturating_sub(self.in_fill)
    }

    /// After taking `n` frames from the rx ring at `now`, with `left` chunks still in the fill
    /// ring unconsumed by the kernel: double the target when the kernel used half the ring
    /// between two services (four-fold when it used all of it: frames are being dropped), and
    /// shrink it after a long idle spell. Growing at half keeps a burst that doubles from one
    /// service to the next (TCP slow start) inside the ring.
    #[inline]
    pub fn on_rx(&mut self, n: u32, left: u32, now: Nanos) {
        if n > 0 {
            self.last_busy = now;
            if left <= self.target / 2 && self.target < self.limits.max {
                let factor = if left == 0 { 4 } else { 2 };
                self.target = self.target.saturating_mul(factor).min(self.limits.max);
                self.grown += 1;
            }
        } else if self.target > self.limits.min && now.saturating_sub(self.last_busy) >= SHRINK_AFTER_NS {
            self.target = (self.target / 2).max(self.limits.min);
            self.last_busy = now;
            self.shrunk += 1;
        }
    }

    /// How many chunks to post now: first whatever brings this port to its minimum (as far as
    /// the pool goes), then up to its target from what the pool holds beyond every other
    /// port's shortfall (`total_deficit` includes this port's own) and `reserve`.
    #[inline]
    pub fn grant(&self, pool: u32, total_deficit: u32, reserve: u32) -> u32 {
        let want = self.target.saturating_sub(self.in_fill);
        let mine = self.deficit();
        let own = mine.min(want).min(pool);
        let spare = pool.saturating_sub(own).saturating_sub(total_deficit.saturating_sub(mine)).saturating_sub(reserve);
        own + (want - own).min(spare)
    }
}

/// Bounds on the chunks a worker keeps away on the transmit side (`FillPlan::tx_limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    /// Across all ports: queued on tx rings plus staged for them.
    pub total: u32,
    /// On any one egress port.
    pub per_port: u32,
}

/// UMEM sizing for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillPlan {
    /// Uplink and host port.
    pub node: FillLimits,
    /// Each pod port.
    pub pod: FillLimits,
    /// Chunks never granted beyond minimums: the transmit side's allowance (frames on their
    /// way out, segmentation spill and multi-buffer transmit; see `tx_limits`).
    pub reserve: u32,
    /// Chunks beyond every minimum, shared by busy ports to grow into.
    pub surplus: u32,
}

impl Default for FillPlan {
    fn default() -> Self {
        FillPlan {
            node: FillLimits { min: 512, max: 2048 },
            // A veth holds at most 256 frames for XDP (VETH_RING_SIZE) and drops the rest
            // itself: a pod's fill ring guaranteed as many never loses what the veth could
            // queue, even while the worker is descheduled.
            pod: FillLimits { min: 256, max: 1024 },
            // Two egress rings' worth of frames in flight (and a batch being processed): more
            // than one kick of copy-mode transmit or one batch's segments ever needs.
            reserve: 2560,
            surplus: 6144,
        }
    }
}

impl FillPlan {
    /// Chunks the minimums of two node ports and `pods` pod ports need, with the reserve.
    pub fn minimum_frames(&self, pods: u32) -> u64 {
        2 * u64::from(self.node.min) + u64::from(pods) * u64::from(self.pod.min) + u64::from(self.reserve)
    }

    /// The UMEM size for up to `pods` pod ports: every minimum, the reserve and the surplus.
    pub fn umem_frames(&self, pods: u32) -> u64 {
        self.minimum_frames(pods) + u64::from(self.surplus)
    }

    /// How many chunks may be away on the transmit side: the reserve less the chunks of the
    /// batch being processed (`in_process`, taken from an rx ring and not yet staged), in
    /// total and per egress port.
    pub fn tx_limits(&self, in_process: u32) -> TxLimits {
        let total = self.reserve.saturating_sub(in_process);
        TxLimits { total, per_port: (total / 2).max(1) }
    }

    /// Whether a UMEM of `frames` chunks can guarantee `min_sum` (the minimums of the ports
    /// bound so far plus the one being added) and the reserve.
    pub fn admits(&self, frames: u32, min_sum: u64) -> bool {
        min_sum + u64::from(self.reserve) <= u64::from(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: FillLimits = FillLimits { min: 64, max: 1024 };

    /// A toy of the worker's bookkeeping: `ports` fill rings on one pool.
    struct Sim {
        pool: u32,
        ports: Vec<PortFill>,
        reserve: u32,
        /// Chunks queued on one egress's tx ring (the uplink, not among `ports`).
        tx: u32,
    }

    impl Sim {
        fn new(frames: u32, ports: usize, reserve: u32) -> Sim {
            Sim { pool: frames, ports: (0..ports).map(|_| PortFill::new(POD, 0)).collect(), reserve, tx: 0 }
        }
        /// Port `i` receives `received` frames and forwards them to the egress, whose tx ring
        /// (2048 entries) takes them within `cap` (`None`: the ring is the only bound); the
        /// rest are dropped (their chunks go back to the pool). Then `i` is refilled.
        fn forward(&mut self, i: usize, received: u32, cap: Option<u32>, now: Nanos) -> u32 {
            let n = received.min(self.ports[i].in_fill);
            self.ports[i].in_fill -= n;
            let room = cap.unwrap_or(u32::MAX).min(2048).saturating_sub(self.tx);
            let queued = n.min(room);
            self.tx += queued;
            self.pool += n - queued;
            let left = self.ports[i].in_fill;
            self.ports[i].on_rx(n, left, now);
            self.service(i, 0, now);
            n - queued
        }
        /// The egress sends `n` frames: their chunks come back.
        fn drain(&mut self, n: u32) {
            let n = n.min(self.tx);
            self.tx -= n;
            self.pool += n;
        }
        fn total_deficit(&self) -> u32 {
            self.ports.iter().map(PortFill::deficit).sum()
        }
        fn service(&mut self, i: usize, received: u32, now: Nanos) {
            let n = received.min(self.ports[i].in_fill);
            self.ports[i].in_fill -= n;
            self.pool += n; // frames are processed and their chunks come back
            let left = self.ports[i].in_fill;
            self.ports[i].on_rx(n, left, now);
            let g = self.ports[i].grant(self.pool, self.total_deficit(), self.reserve);
            if g == 0 && self.ports[i].deficit() > 0 {
                self.ports[i].starved += 1;
            }
            self.pool -= g;
            self.ports[i].in_fill += g;
        }
    }

    #[test]
    fn every_port_gets_its_minimum_when_the_umem_is_sized_from_the_port_count() {
        let plan = FillPlan { surplus: 0, pod: POD, ..FillPlan::default() };
        let frames = (plan.minimum_frames(250) - 2 * u64::from(plan.node.min)) as u32;
        let mut s = Sim::new(frames, 250, plan.reserve);
        for i in 0..250 {
            s.service(i, 0, 0);
        }
        assert!(s.ports.iter().all(|p| p.in_fill == 64), "every one of 250 ports holds its minimum");
        assert_eq!(s.ports.iter().map(|p| p.starved).sum::<u64>(), 0);
    }

    #[test]
    fn a_busy_port_grows_only_into_the_surplus_and_never_starves_the_idle_ones() {
        let mut s = Sim::new(110 * 64 + 512 + 4096, 110, 512);
        for i in 0..110 {
            s.service(i, 0, 0);
        }
        // Port 0 takes everything it is given, pass after pass.
        for pass in 0..1000u64 {
            s.service(0, u32::MAX, pass * 1000);
            // Some idle ports receive a frame now and then; they must be restocked.
            let i = 1 + (pass as usize % 109);
            s.service(i, 3, pass * 1000);
        }
        assert_eq!(s.ports[0].target, POD.max, "the busy port grew to its max");
        assert!(s.ports[0].in_fill <= POD.max);
        for p in &s.ports[1..] {
            assert_eq!(p.in_fill, 64, "idle ports keep their minimum");
            assert_eq!(p.starved, 0);
        }
        assert!(s.pool >= 512, "the reserve is never handed out beyond minimums");
    }

    #[test]
    fn growth_stops_at_the_surplus_when_many_ports_are_busy() {
        let surplus = 1000;
        let mut s = Sim::new(110 * 64 + 512 + surplus, 110, 512);
        for round in 0..200u64 {
            for i in 0..110 {
                s.service(i, u32::MAX, round);
            }
        }
        let beyond: u32 = s.ports.iter().map(|p| p.in_fill.saturating_sub(64)).sum();
        assert!(beyond <= surplus, "beyond minimums {beyond} <= surplus {surplus}");
        assert!(s.ports.iter().all(|p| p.in_fill >= 64), "nobody below its minimum");
        assert_eq!(s.ports.iter().map(|p| p.starved).sum::<u64>(), 0);
    }

    /// 110 pods all forwarding to one egress that sends less than they receive (two senders
    /// saturating the uplink): run `rounds` rounds starting each at a rotating pod, and return
    /// (times a pod was starved, frames dropped at the egress, frames delivered per pod).
    fn overload(plan: FillPlan, cap: Option<u32>, rounds: u64) -> (u64, u32, Vec<u32>) {
        let frames = (plan.umem_frames(110) - 2 * u64::from(plan.node.min)) as u32;
        let mut s = Sim::new(frames, 110, plan.reserve);
        for i in 0..110 {
            s.service(i, 0, 0);
        }
        let mut dropped = 0;
        let mut delivered = vec![0u32; 110];
        for round in 0..rounds {
            for j in 0..110 {
                let i = (j + round as usize) % 110;
                let lost = s.forward(i, 48, cap, round * 10_000);
                delivered[i] += 48 - lost;
                dropped += lost;
            }
            s.drain(110 * 48 / 2); // the egress sends half of what arrives
            assert_eq!(s.pool + s.tx + s.ports.iter().map(|p| p.in_fill).sum::<u32>(), frames, "no chunk lost");
        }
        (s.ports.iter().map(|p| p.starved).sum(), dropped, delivered)
    }

    #[test]
    fn an_overloaded_egress_never_starves_a_port_below_its_minimum() {
        let plan = FillPlan { pod: POD, ..FillPlan::default() };
        let limits = plan.tx_limits(32);
        assert_eq!(limits.total, plan.reserve - 32);
        let (starved, dropped, delivered) = overload(plan, Some(limits.per_port), 2000);
        assert_eq!(starved, 0, "the transmit cap keeps the pool above every shortfall");
        assert!(dropped > 0, "the overload is dropped at the egress");
        let (lo, hi) = (delivered.iter().min().unwrap(), delivered.iter().max().unwrap());
        assert!(*lo * 10 >= *hi * 9, "a rotating start shares the egress evenly: {lo}..{hi} per pod");
    }

    #[test]
    fn without_the_transmit_cap_the_same_overload_starves_ports() {
        // What the cap fixes (measured on the 110-pod rig before it existed, with a 512-chunk
        // reserve: `fill starved` on 104 pod ports): a tx ring's 2048 chunks exceed the
        // reserve, and the pool runs dry while pods are below their minimum.
        let before = FillPlan { pod: POD, reserve: 512, surplus: 8192, ..FillPlan::default() };
        let (starved, _, _) = overload(before, None, 2000);
        assert!(starved > 0);
        let (starved, _, _) = overload(before, Some(before.tx_limits(32).per_port), 2000);
        assert_eq!(starved, 0, "the same plan with the cap");
    }

    #[test]
    fn an_idle_port_shrinks_back_to_its_minimum() {
        let mut p = PortFill::new(POD, 0);
        p.on_rx(32, 40, 10);
        assert_eq!(p.target, 64, "the kernel left plenty in the ring");
        p.on_rx(32, 32, 10);
        assert_eq!(p.target, 128, "half used: doubled");
        p.on_rx(32, 0, 10);
        assert_eq!(p.target, 512, "ran dry: quadrupled");
        p.on_rx(32, 0, 10);
        assert_eq!(p.target, 1024, "capped at the max");
        p.in_fill = 1024;
        p.on_rx(0, 1024, 10 + SHRINK_AFTER_NS / 2);
        assert_eq!(p.target, 1024, "not idle long enough");
        let mut t = 10;
        for _ in 0..10 {
            t += SHRINK_AFTER_NS;
            p.on_rx(0, 1024, t);
        }
        assert_eq!(p.target, 64);
        assert_eq!(p.grant(10_000, 0, 0), 0, "chunks above the target are not replaced");
    }

    #[test]
    fn a_starved_port_takes_what_there_is_up_to_its_minimum() {
        let p = PortFill::new(POD, 0);
        assert_eq!(p.grant(10, 640, 512), 10, "below the minimum, even the reserve is used");
        assert_eq!(p.grant(0, 640, 512), 0);
    }

    #[test]
    fn admission_keeps_every_minimum_within_the_umem() {
        let plan = FillPlan { pod: POD, ..FillPlan::default() };
        let frames = plan.umem_frames(110) as u32;
        let node = 2 * u64::from(plan.node.min);
        assert!(plan.admits(frames, node + 110 * 64));
        assert!(plan.admits(frames, node + (110 + 96) * 64), "the surplus admits more than max_pods");
        assert!(!plan.admits(frames, node + (110 + 97) * 64));
    }
}
