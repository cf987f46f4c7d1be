//! The control plane at scale: N Services with E endpoints each (10,000 x 10 by default).
//!
//! Measures, in one run:
//! - parsing the state as the file source gets it (kubectl-shaped YAML);
//! - a full compile: the model, every Service's Maglev tables (all cores), the assembled table;
//! - one EndpointSlice change to the new snapshot in use by a worker: the change is applied to
//!   the model, that Service compiled again, the table assembled and the tables snapshot built,
//!   sent over the same channel the daemon uses, and swapped in by a worker thread that keeps
//!   running pipeline batches meanwhile; timed from the change to the worker's swap (p50, p99);
//! - the scans of every Service the daemon's control loop makes per batch of changes besides
//!   (node-local NodePort and load balancer / external IP rules, the health-check list);
//! - memory: resident set growth for the compiled state, and the Maglev tables' share.
//!
//! `cargo run --release -p vxnat-benches --example control_scale -- [services] [endpoints] [changes]`

use dataplane::pipeline::WorkerState;
use dataplane::tables::Tables;
use dataplane::testkit;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vxnat_benches::Batch;
use vxnat_control::model::{Model, Object, Update};
use vxnat_control::services::Compiler;
use vxnat_control::state::ClusterState;

/// Counts live heap bytes, so memory figures are what the structures hold, not what the
/// allocator keeps after parsing (fragmentation makes RSS overstate it).
struct Counting;
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[allow(unsafe_code)]
// SAFETY: forwards to the system allocator unchanged, only counting sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_mib() -> f64 {
    LIVE.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1 << 20) as f64
}

/// Resident set, after handing freed heap back to the kernel (so garbage from parsing does not
/// count as state).
fn rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn ip(base: u32, i: usize) -> String {
    std::net::Ipv4Addr::from(base + i as u32).to_string()
}

/// The state as `kubectl get services,endpointslices -A -o yaml` would print it; endpoints are
/// spread over ten nodes, so each Service has one endpoint on this node (node-0).
fn state_yaml(services: usize, endpoints: usize, generation: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
    y.push_str("- {apiVersion: v1, kind: Node, metadata: {name: node-0}, spec: {podCIDR: 10.244.0.0/24}, status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}}\n");
    for s in 0..services {
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: svc-{s}, namespace: bench}}\n  spec:\n    clusterIP: {}\n    ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n",
            ip(0x0a60_0000, s + 1)
        );
        let _ = write!(
            y,
            "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {{name: svc-{s}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{s}}}}}\n  addressType: IPv4\n  ports: [{{name: http, port: 8080, protocol: TCP}}]\n  endpoints:\n"
        );
        for e in 0..endpoints {
            let _ = writeln!(
                y,
                "  - {{addresses: [{}], conditions: {{ready: true}}, nodeName: node-{}}}",
                ip(0x0a80_0000, s * endpoints + e + generation * 7919),
                e % 10
            );
        }
    }
    y
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (services, endpoints, changes) = (
        args.first().copied().unwrap_or(10_000),
        args.get(1).copied().unwrap_or(10),
        args.get(2).copied().unwrap_or(200),
    );
    let yaml = state_yaml(services, endpoints, 0);
    let rss0 = rss_kib();
    let live0 = live_mib();
    let t = Instant::now();
    let state = ClusterState::parse(&yaml).expect("generated state parses");
    let parse = t.elapsed();
    drop(yaml);
    // The slices the changes will modify, kept aside as the API would send them.
    let originals: std::collections::BTreeMap<usize, k8s_openapi::api::discovery::v1::EndpointSlice> =
        (0..changes).map(|i| (i * 7919) % services).map(|s| (s, state.endpoint_slices[s].clone())).collect();
    let t = Instant::now();
    let mut model = Model::from_state(state);
    let model_time = t.elapsed();
    let rss_model = rss_kib();
    let live_model = live_mib();
    let mut compiler = Compiler::new("node-0", dataplane::nat::maglev::DEFAULT_TABLE_SIZE);
    let t = Instant::now();
    let problems = compiler.compile_all(&model);
    let compile = t.elapsed();
    assert!(problems.is_empty(), "{problems:?}");
    let t = Instant::now();
    let (table, conflicts) = compiler.table();
    let assemble = t.elapsed();
    assert!(conflicts.is_empty());
    assert_eq!(table.port_count(), services);
    let maglev_bytes = table.table_bytes();
    let tables = Arc::new(testkit::tables_with_services(table));
    let rss1 = rss_kib();
    let live_tables = live_mib();

    // The worker: swaps in what arrives between batches, as the daemon's worker does.
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, Arc<Tables>)>();
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<(usize, Instant)>();
    let worker = std::thread::spawn(move || {
        let mut tables = tables;
        let mut state = WorkerState::new(0);
        let mut batch = Batch::pod_to_remote(64);
        let mut batches = 0u64;
        loop {
            match rx.try_recv() {
                Ok((id, t)) => {
                    tables = t;
                    let _ = ack_tx.send((id, Instant::now()));
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => return batches,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            batch.rearm();
            batch.run(&tables, &mut state, batches);
            batches += 1;
        }
    });
    let mut live = Vec::with_capacity(changes);
    let mut compile_only = Vec::with_capacity(changes);
    for i in 0..changes {
        // One endpoint of one Service replaced (a pod rescheduled).
        let s = (i * 7919) % services;
        let mut slice = originals[&s].clone();
        slice.endpoints[i % endpoints].addresses = vec![ip(0x0a90_0000, i)];
        let t0 = Instant::now();
        let dirty = model.apply(Update::Apply(Object::Slice(Box::new(slice))));
        compiler.compile_changed(&model, &dirty.services);
        let (table, _) = compiler.table();
        let next = Arc::new(testkit::tables_with_services(table));
        compile_only.push(t0.elapsed());
        tx.send((i, next)).expect("worker alive");
        let (id, at) = ack_rx.recv().expect("worker acks");
        assert_eq!(id, i);
        live.push(at - t0);
    }
    drop(tx);
    let batches = worker.join().expect("worker");
    // The daemon's control loop also scans every Service once per batch of changes (not
    // part of the path above): the node-local NodePort rules, the node-local load balancer
    // and external IP rules, and the health-check servers' list. Median of 5 of each.
    let median = |f: &mut dyn FnMut()| {
        let mut v: Vec<Duration> = (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        v[2]
    };
    let node_ports = median(&mut || {
        std::hint::black_box(vxnat_control::services::node_port_redirects(model.services.values()));
    });
    let local = median(&mut || {
        std::hint::black_box(compiler.local_redirects(&model));
    });
    let checks = median(&mut || {
        std::hint::black_box(vxnat_control::healthcheck::desired(&model, "node-0"));
    });
    live.sort();
    compile_only.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "control plane: {services} Services x {endpoints} endpoints ({} endpoints), {changes} changes",
        services * endpoints
    );
    println!("  parse state file (YAML)          {:8.1} ms", ms(parse));
    println!("  model from state                 {:8.1} ms", ms(model_time));
    println!(
        "  full compile (Maglev, {} cores)   {:8.1} ms",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        ms(compile)
    );
    println!("  assemble table                   {:8.1} ms", ms(assemble));
    println!("  full compile + assemble          {:8.1} ms", ms(compile + assemble));
    println!(
        "  one EndpointSlice change -> worker using it: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(percentile(&live, 0.5)),
        ms(percentile(&live, 0.99)),
        ms(*live.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "    of which compile + snapshot build: p50 {:.2} ms  p99 {:.2} ms",
        ms(percentile(&compile_only, 0.5)),
        ms(percentile(&compile_only, 0.99))
    );
    println!(
        "  per-change scans in the daemon's control loop (not in the figure above): NodePort rules {:.2} ms, load balancer and external IP rules {:.2} ms, health-check list {:.2} ms",
        ms(node_ports),
        ms(local),
        ms(checks)
    );
    println!(
        "  memory (live heap): model {:.1} MiB, compiled tables {:.1} MiB",
        live_model - live0,
        live_tables - live_model
    );
    println!(
        "  memory (RSS): model of Kubernetes objects +{:.1} MiB, compiled tables +{:.1} MiB (Maglev tables and endpoint lists {:.1} MiB of it)",
        (rss_model.saturating_sub(rss0)) as f64 / 1024.0,
        (rss1.saturating_sub(rss_model)) as f64 / 1024.0,
        maglev_bytes as f64 / (1 << 20) as f64
    );
    println!("  (worker ran {batches} pipeline batches meanwhile)");
}
