//! Runs one pipeline case for a fixed number of batches, for `valgrind --tool=callgrind`
//! (instruction counts are exact and repeatable, unlike wall time on a shared VM):
//!
//! ```text
//! cargo build --release -p vxnat-benches --example pipeline_profile
//! valgrind --tool=callgrind target/release/examples/pipeline_profile pod_to_encap 64 10000
//! ```

use dataplane::pipeline::WorkerState;
use dataplane::testkit;
use vxnat_benches::Batch;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let case = args.get(1).map(String::as_str).unwrap_or("pod_to_encap");
    let len: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let iters: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let mut batch = match case {
        "pod_to_encap" => Batch::pod_to_remote(len),
        "pod_partial_csum_to_encap" => Batch::pod_to_remote_partial(len),
        "uplink_decap_to_pod" => Batch::remote_to_pod(len),
        // Dropped at the first check: the floor (harness, dispatch, counting).
        "runt" => Batch::new(testkit::POD1, vec![0u8; 10]),
        other => {
            eprintln!("unknown case {other}: pod_to_encap | pod_partial_csum_to_encap | uplink_decap_to_pod | runt");
            std::process::exit(2);
        }
    };
    let tables = testkit::tables();
    let mut state = WorkerState::new(0);
    for i in 0..iters {
        batch.rearm();
        batch.run(&tables, &mut state, i);
    }
    println!("{case} {len}B: {} batches, last disposition {:?}", iters, batch.out[0]);
}
