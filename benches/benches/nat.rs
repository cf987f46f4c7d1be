//! SNAT allocator operations near exhaustion, Maglev build/lookup, conntrack lookups and the
//! per-segment cost of TIME_WAIT-safe sequence/timestamp offsets.

use core::net::Ipv4Addr;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::nat::maglev::{Maglev, DEFAULT_TABLE_SIZE};
use dataplane::nat::seqadj::SeqAdj;
use dataplane::nat::snat::{Destination, SnatAllocator};
use dataplane::wire::{TcpFlags, TcpOption, TcpPacket};
use std::hint::black_box;

fn snat(c: &mut Criterion) {
    let mut g = c.benchmark_group("snat");
    let d = Destination {
        proto: 6,
        snat_ip: Ipv4Addr::new(192, 168, 77, 1),
        backend_ip: Ipv4Addr::new(10, 244, 1, 2),
        backend_port: 8080,
    };
    // 28976 ports, all but 16 in use; each iteration releases the oldest and allocates one
    // (whose hold has expired): the steady state of a busy backend near exhaustion.
    let hold = 1_000;
    let mut a = SnatAllocator::new(1024..=29999, hold, 1);
    let mut live = std::collections::VecDeque::new();
    let mut now = 0u64;
    for _ in 0..(a.range_len() - 16) {
        live.push_back(a.allocate(d, now).expect("fresh port").port);
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("release_then_allocate_near_exhaustion", |b| {
        b.iter(|| {
            now += hold;
            if let Some(p) = live.pop_front() {
                a.release(d, p, now, dataplane::nat::snat::End::BackendClosedFirst(None));
            }
            now += hold;
            let p = a.allocate(black_box(d), now).expect("a port past its hold").port;
            live.push_back(p);
        })
    });
    g.finish();
}

fn maglev(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev");
    for n in [10usize, 100, 1000] {
        let keys: Vec<String> = (0..n).map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 2)).collect();
        g.bench_function(format!("build_{n}_backends"), |b| {
            b.iter(|| Maglev::build(black_box(&keys), DEFAULT_TABLE_SIZE))
        });
        let t = Maglev::build(&keys, DEFAULT_TABLE_SIZE).expect("prime size");
        let mut h = 0u64;
        g.bench_function(format!("lookup_{n}_backends"), |b| {
            b.iter(|| {
                h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
                t.lookup(black_box(h))
            })
        });
    }
    g.finish();
}

fn conntrack(c: &mut Criterion) {
    use dataplane::conntrack::{ConnTrack, FlowKey, KeyHash, Timeouts};
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(1));
    for n in [1_000usize, 1_000_000] {
        let key = |i: usize| FlowKey {
            proto: 6,
            src: Ipv4Addr::from(0x0af4_0000u32 + (i as u32 >> 8)),
            dst: Ipv4Addr::new(10, 96, 0, 10),
            sport: 1024 + (i & 0xff) as u16 * 7,
            dport: 80,
        };
        let mut ct = ConnTrack::new(n, Timeouts::default());
        for i in 0..n {
            ct.insert(key(i), key(i).reversed(), 0, i as u64).expect("capacity");
        }
        // Probe keys in a scrambled order so the cache sees a realistic spread.
        let mut i = 0usize;
        g.bench_function(format!("lookup_hit_{n}_flows"), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                ct.lookup(black_box(&key(i)), 1)
            })
        });
        // As the pipeline does it: a batch of 32 is hashed once and touched first, then looked
        // up.
        g.throughput(Throughput::Elements(32));
        let mut j = 0usize;
        g.bench_function(format!("lookup_batch32_prefetched_{n}_flows"), |b| {
            b.iter(|| {
                let mut keys = [key(0); 32];
                let mut hashes = [KeyHash::of(&keys[0]); 32];
                for (k, h) in keys.iter_mut().zip(hashes.iter_mut()) {
                    j = (j + 7919) % n;
                    *k = key(j);
                    *h = KeyHash::of(k);
                }
                ct.prefetch_buckets(&hashes);
                ct.prefetch_flows(&hashes);
                for (k, &h) in keys.iter().zip(hashes.iter()) {
                    black_box(ct.lookup_hashed(k, h, 1));
                }
            })
        });
        g.throughput(Throughput::Elements(1));
    }
    println!("conntrack: {} bytes per flow at capacity", ConnTrack::memory_per_flow());
    g.finish();
}

/// A data segment (ACK|PSH, 100 bytes of payload) with `opts` after the fixed header and a full
/// checksum, as the TIME_WAIT-safe sequence offsets see it.
fn segment_with(opts: &[TcpOption<'_>]) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(192, 168, 77, 1), Ipv4Addr::new(10, 244, 1, 2));
    let opts_len: usize = opts.iter().map(TcpOption::buffer_len).sum();
    let hl = 20 + opts_len.div_ceil(4) * 4;
    let mut b = vec![0u8; hl + 100];
    let mut at = 20;
    for o in opts {
        at += o.emit(&mut b[at..]);
    }
    let mut t = TcpPacket::new_unchecked(&mut b[..]);
    t.set_src_port(41000);
    t.set_dst_port(8080);
    t.set_seq_number(0x1234_5678);
    t.set_ack_number(0x9abc_def0);
    t.set_header_len_flags(hl, TcpFlags::ACK | TcpFlags::PSH);
    t.set_window_len(501);
    for (i, x) in t.payload_mut().iter_mut().enumerate() {
        *x = i as u8;
    }
    t.fill_checksum(src, dst);
    b
}

/// Per-segment cost of the sequence/timestamp offsets a reused SNAT tuple needs, each way, and
/// of a flow that needs none.
fn seqadj(c: &mut Criterion) {
    let mut g = c.benchmark_group("seqadj");
    g.throughput(Throughput::Elements(1));
    let ts = TcpOption::Timestamps { tsval: 0x0102_0304, tsecr: 0x0506_0708 };
    let edges: Vec<u8> = (1..=16u8).collect();
    let cases = [
        ("ts", segment_with(&[TcpOption::NoOperation, TcpOption::NoOperation, ts])),
        (
            "ts_sack2",
            segment_with(&[
                TcpOption::NoOperation,
                TcpOption::NoOperation,
                ts,
                TcpOption::NoOperation,
                TcpOption::NoOperation,
                TcpOption::SackRange(&edges),
            ]),
        ),
    ];
    let adj = SeqAdj { seq: 0x4000_0000, ts: 0x0100_0000 };
    for (name, seg) in cases {
        assert_eq!(seg.len(), if name == "ts" { 132 } else { 152 });
        assert_eq!(adj.to_backend(&mut seg.clone()), Ok(()));
        assert_eq!(adj.to_client(&mut seg.clone()), Ok(()));
        let mut b = seg.clone();
        g.bench_function(format!("to_backend_{name}"), |bench| {
            bench.iter(|| black_box(&adj).to_backend(black_box(&mut b[..])))
        });
        let mut b = seg.clone();
        g.bench_function(format!("to_client_{name}"), |bench| {
            bench.iter(|| black_box(&adj).to_client(black_box(&mut b[..])))
        });
        let mut b = seg.clone();
        g.bench_function(format!("none_{name}"), |bench| {
            bench.iter(|| black_box(&SeqAdj::NONE).to_backend(black_box(&mut b[..])))
        });
    }
    g.finish();
}

criterion_group!(benches, snat, maglev, conntrack, seqadj);
criterion_main!(benches);
