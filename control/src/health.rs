//! Liveness and readiness, as `GET /healthz` and `GET /readyz` answer them (served by
//! `metrics::serve` on the `health` address, and on the `metrics` one too).
//!
//! - **Live** (`/healthz`, the liveness probe): the worker thread runs and started a pass within
//!   [`HEARTBEAT_LIMIT`]. A worker that is stuck (or spinning inside one batch) fails it, and
//!   the kubelet restarts the container. A worker that died ends the process anyway (`run`).
//! - **Ready** (`/readyz`, the readiness probe): live, and the node is up (first tables
//!   installed, remembered pods re-attached, ctl served; not yet shutting down), and the
//!   cluster source runs (not dead and waiting to restart).
//!
//! Reading them takes no lock and asks nothing of the worker: the heartbeat is an atomic the
//! worker stores once per pass, so a probe answers even while the worker or the node's mutex
//! is stuck, which is exactly when it matters.

use crate::source::SourceStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use xsk::host::Heartbeat;

/// The oldest the worker's last pass may be for the node to count as live. An idle adaptive
/// worker passes at least every 5 ms (its poll(2) timeout); a busy one every batch.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(1);

/// What the probes read.
#[derive(Debug)]
pub struct Health {
    heartbeat: Arc<Heartbeat>,
    source: Arc<SourceStatus>,
    /// Set once the node is up, cleared when it starts shutting down.
    up: AtomicBool,
}

impl Health {
    pub fn new(heartbeat: Arc<Heartbeat>, source: Arc<SourceStatus>) -> Health {
        Health { heartbeat, source, up: AtomicBool::new(false) }
    }

    /// The node is up (or, with `false`, shutting down).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// How long ago the worker last started a pass.
    pub fn heartbeat_age(&self) -> Duration {
        self.heartbeat.age()
    }

    pub fn source(&self) -> &SourceStatus {
        &self.source
    }

    /// `Ok` with a line saying so, or why the node is not live.
    pub fn live(&self) -> Result<String, String> {
        if !self.heartbeat.running() {
            return Err("the worker thread is not running".into());
        }
        let age = self.heartbeat.age();
        if age > HEARTBEAT_LIMIT {
            return Err(format!(
                "the worker's last pass started {:.3} s ago (limit {} s): it is stalled",
                age.as_secs_f64(),
                HEARTBEAT_LIMIT.as_secs()
            ));
        }
        Ok(format!("ok: worker passed {} us ago", age.as_micros()))
    }

    /// `Ok` with a line saying so, or why the node is not ready.
    pub fn ready(&self) -> Result<String, String> {
        self.live()?;
        if !self.up.load(Ordering::Relaxed) {
            return Err("the node is starting or shutting down".into());
        }
        if !self.source.up() {
            let r = self.source.report();
            return Err(format!(
                "the cluster source ({}) is down ({}; {} failures); restarting it",
                r.name,
                r.last_failure.unwrap_or_default(),
                r.failures
            ));
        }
        Ok("ok: tables installed, worker passing, cluster source up".into())
    }
}
