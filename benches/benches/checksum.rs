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

criterion_group!(benches, bench);
criterion_main!(benches);
