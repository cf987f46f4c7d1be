//! Runs an AF_XDP worker inside a test namespace.

use crate::netns::Netns;
use dataplane::tables::Tables;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xsk::worker::Worker;

/// Starts a worker (made by `make`, ports bound by it) on a thread in `ns`, returns once its
/// ports are bound; the worker polls with `tables` until `stop`, then keeps polling 300 ms so
/// the kernel completes what is in flight, and hands itself to `report`.
pub fn run_worker<R: Send + 'static>(
    ns: &Netns,
    tables: Tables,
    stop: Arc<AtomicBool>,
    make: impl FnOnce() -> Worker + Send + 'static,
    report: impl FnOnce(&Worker) -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = ns.spawn(move || {
        let mut w = make();
        let _ = ready_tx.send(());
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if w.poll(&tables, start.elapsed().as_nanos() as u64) == 0 {
                w.wait(1);
            }
        }
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            w.poll(&tables, start.elapsed().as_nanos() as u64);
            std::thread::sleep(Duration::from_millis(5));
        }
        report(&w)
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the worker bound its ports");
    h
}
