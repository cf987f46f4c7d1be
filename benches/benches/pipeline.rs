//! ns per packet through the overlay pipeline, batches of 32:
//! pod -> encap (64 B and 1400 B pod frames, with full or CHECKSUM_PARTIAL checksums), and
//! uplink -> decap -> pod. Each iteration re-arms the batch (one memcpy per frame, as an
//! AF_XDP copy-mode receive would do) and runs it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::pipeline::{Disposition, WorkerState};
use dataplane::testkit;
use std::hint::black_box;
use vxnat_benches::{Batch, BATCH};

/// A benchmark case: name, batch constructor (by frame length), expected disposition.
type Case = (&'static str, fn(usize) -> Batch, Disposition);

fn bench(c: &mut Criterion) {
    let tables = testkit::tables();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BATCH as u64));
    let cases: [Case; 3] = [
        ("pod_to_encap", Batch::pod_to_remote, Disposition::Forward(testkit::UPLINK)),
        ("pod_partial_csum_to_encap", Batch::pod_to_remote_partial, Disposition::Forward(testkit::UPLINK)),
        ("uplink_decap_to_pod", Batch::remote_to_pod, Disposition::Forward(testkit::POD1)),
    ];
    for (name, make, expect) in cases {
        for len in [64usize, 1400] {
            let mut batch = make(len);
            let mut state = WorkerState::new(0);
            batch.rearm();
            batch.run(&tables, &mut state, 0);
            assert!(batch.out.iter().all(|d| *d == expect), "{name}/{len}: {:?}", batch.out[0]);
            g.bench_function(format!("{name}/{len}B"), |b| {
                b.iter(|| {
                    batch.rearm();
                    batch.run(black_box(&tables), &mut state, 0);
                    black_box(&batch.out);
                })
            });
        }
    }
    // The full Service path: conntrack hit, DNAT, encap (the flow is created by the warm-up).
    let service_tables = testkit::tables_with_service();
    for len in [64usize, 1400] {
        let mut batch = Batch::pod_to_service(len);
        let mut state = WorkerState::new(0);
        batch.rearm();
        batch.run(&service_tables, &mut state, 0);
        assert!(
            batch.out.iter().all(|d| *d == Disposition::Forward(testkit::UPLINK)),
            "service/{len}: {:?}",
            batch.out[0]
        );
        g.bench_function(format!("pod_to_service_hit_dnat_encap/{len}B"), |b| {
            b.iter(|| {
                batch.rearm();
                batch.run(black_box(&service_tables), &mut state, 1);
                black_box(&batch.out);
            })
        });
    }
    // The re-arm alone, to subtract: what the pipeline itself costs.
    for len in [64usize, 1400] {
        let mut batch = Batch::pod_to_remote(len);
        g.bench_function(format!("rearm_only/{len}B"), |b| b.iter(|| black_box(&mut batch).rearm()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
