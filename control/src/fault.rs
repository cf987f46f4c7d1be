//! Test-only fault injection: `vxnat ctl fault WHAT` (hidden) makes the worker panic or
//! stall, the cluster source panic, or shortens how long the control thread waits for the
//! worker, so the supervision tests can cause what they check on a real `vxnat run`.
//!
//! Compiled in only with the cargo feature `fault-injection`, which nothing enables but this
//! crate's own dev-dependency on itself: `cargo test` builds the daemon its integration tests
//! run with it, and `cargo build` / `cargo build --release` (the image) build it without, so a
//! production binary has neither the ctl request nor the code behind it. A cargo feature rather
//! than `cfg(test)` because integration tests run the real binary, which `cfg(test)` never
//! reaches; rather than an environment variable because a variable is an opt-in any
//! production binary would still carry.

use crate::node::Node;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use xsk::host::Command;

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The worker thread panics between two polls.
    WorkerPanic,
    /// The worker thread sleeps `ms` between two polls: no pass, no heartbeat.
    WorkerStall,
    /// The cluster source's thread panics at its next turn.
    SourcePanic,
    /// The control thread waits `ms` (instead of 10 s) for the worker to answer an attach or
    /// detach.
    WorkerWait,
}

/// Set by `SourcePanic`, taken by the source thread.
static SOURCE_PANIC: AtomicBool = AtomicBool::new(false);

/// Called by the source threads on each turn: panics once after `SourcePanic`.
pub fn source_point() {
    if SOURCE_PANIC.swap(false, Ordering::Relaxed) {
        panic!("fault injection: the cluster source panics");
    }
}

/// Injects `fault` into the running node; returns at once (a stall runs on after).
pub fn inject(node: &Mutex<Node>, fault: Fault, ms: u64) -> Result<Value, String> {
    let mut n = node.lock().map_err(|_| "node state poisoned".to_string())?;
    match fault {
        Fault::WorkerPanic => n
            .commands()
            .send(Command::Run(Box::new(|_, _| panic!("fault injection: the worker panics"))))
            .map_err(|_| "worker stopped".to_string())?,
        Fault::WorkerStall => n
            .commands()
            .send(Command::Run(Box::new(move |_, _| std::thread::sleep(Duration::from_millis(ms)))))
            .map_err(|_| "worker stopped".to_string())?,
        Fault::SourcePanic => SOURCE_PANIC.store(true, Ordering::Relaxed),
        Fault::WorkerWait => n.worker_wait = Duration::from_millis(ms),
    }
    Ok(json!({ "injected": fault, "ms": ms }))
}
