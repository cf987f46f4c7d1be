//! Internet checksum throughput (the wide-word sum) and CHECKSUM_PARTIAL completion.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::wire::checksum;
use std::hint::black_box;

fn bytewise(data: &[u8]) -> u16 {
    let mut acc: u32 = 0;
    for pair in data.chunks(2) {
        let w = if pair.len() == 2 { u16::from_be_bytes([pair[0], pair[1]]) } else { u16::from_be_bytes([pair[0], 0]) };
        acc += u32::from(w);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in [64usize, 1500, 9000, 65535] {
        let data: Vec<u8> = (0..len).map(|i| (i * 131) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("wide/{len}B"), |b| b.iter(|| checksum::checksum(black_box(&data))));
        g.bench_function(format!("bytewise_reference/{len}B"), |b| b.iter(|| bytewise(black_box(&data))));
    }
    let mut seg = vec![0u8; 1480];
    seg[0..8].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0x05, 0xc8, 0, 0]);
    g.throughput(Throughput::Bytes(seg.len() as u64));
    g.bench_function("complete_partial_udp/1480B", |b| {
        b.iter(|| {
            black_box(&mut seg)[6..8].copy_from_slice(&[0x12, 0x34]);
            checksum::complete_partial(&mut seg, 6, true)
        })
    });
    g.finish();
}

/// Software segmentation and fragmentation, bytes of input per second (criterion reports
/// GiB/s; x 8.59 for Gbit/s): a 64 KiB aggregated TCP frame cut for a 1450-byte pod MTU (46
/// segments, both checksums computed per segment), and a 64 KiB UDP datagram fragmented.
fn gso(c: &mut Criterion) {
    use dataplane::gso::{fragment, segment_tcp, VecSink};
    use dataplane::testkit::{ipv4, ipv4_with, Ip, L4};
    use std::net::Ipv4Addr;
    let (src, dst) = (Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 1, 2));
    let payload = vec![0x5au8; 65_000];
    let tcp = ipv4(src, dst, &L4::Tcp { sport: 1, dport: 2, seq: 3, ack: 4, flags: 0x18, payload: &payload });
    let udp = ipv4_with(
        &Ip { dont_frag: false, ..Ip::new(src, dst) },
        &L4::Udp { sport: 1, dport: 2, payload: &payload[..65_000 - 8] },
    );
    let mut sink = VecSink::new(80_000);
    let mut g = c.benchmark_group("gso");
    g.throughput(Throughput::Bytes(tcp.len() as u64));
    g.bench_function("segment_tcp_64k_to_1450", |b| {
        b.iter(|| {
            sink.clear();
            segment_tcp(black_box(&tcp), 1450, None, &mut sink)
        })
    });
    g.throughput(Throughput::Bytes(udp.len() as u64));
    g.bench_function("fragment_udp_64k_to_1450", |b| {
        b.iter(|| {
            sink.clear();
            fragment(black_box(&udp), 1450, &mut sink)
        })
    });
    g.finish();
}

criterion_group!(benches, bench, gso);
criterion_main!(benches);
