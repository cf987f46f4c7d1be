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
//!
//! - **Proxy healthy** ([`Health::proxy`], kube-proxy's `/healthz` and `/livez` on
//!   `proxy_health`, and `serviceProxyHealthy` of the healthCheckNodePort servers; see
//!   `crate::healthcheck`): live, and no cluster change has waited more than [`SYNC_LIMIT`] to
//!   reach the worker. A change counts as waiting from the moment the control loop takes it
//!   ([`Health::queued`]) until the worker runs a marker queued behind the tables that carry
//!   it ([`Health::applied`]): tables compiled but not yet swapped in by the worker are still
//!   waiting. This is kube-proxy's `QueuedUpdate`/`Updated` with the worker's swap as the
//!   update. The marker only stores two atomics on the worker thread; the bookkeeping that
//!   takes a lock (a `Mutex` of the control plane) is on the control thread and the health
//!   servers' thread, never the worker's.

use crate::source::SourceStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use xsk::host::Heartbeat;

/// The oldest the worker's last pass may be for the node to count as live. An idle adaptive
/// worker passes at least every 5 ms (its poll(2) timeout); a busy one every batch.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(1);

/// The longest a cluster change may wait to reach the worker before the proxy counts as
/// unhealthy: kube-proxy's own bound (twice its 30 s sync period). vxnat compiles a change and
/// the worker swaps it in within milliseconds (`vxnat_table_swap_seconds`), so a change still
/// waiting long after that means the control plane is stuck; but the kubelet restarts the
/// container on this (`/livez` is the liveness probe), and a restart loop at a scale where a
/// full compile is slow would be worse than a slow change, so the bound is kube-proxy's, not
/// tighter. A stuck worker fails sooner, by its heartbeat ([`HEARTBEAT_LIMIT`]).
pub const SYNC_LIMIT: Duration = Duration::from_secs(60);

/// The control plane's side of the proxy's sync state (see the module docs).
#[derive(Debug, Default)]
struct Sync {
    /// When the oldest change not yet in the worker's tables was taken.
    oldest: Option<Instant>,
    /// A batch is being compiled (taken, not yet sent).
    busy: bool,
    /// The generation of the tables that carry every change taken so far.
    wanted: u64,
}

impl Sync {
    fn queued(&mut self, now: Instant) {
        self.busy = true;
        self.oldest.get_or_insert(now);
    }

    fn sent(&mut self, generation: Option<u64>) {
        self.busy = false;
        if let Some(g) = generation {
            self.wanted = self.wanted.max(g);
        }
    }

    /// Since when a change has waited, given the worker's `applied` generation.
    fn waiting_since(&mut self, applied: u64) -> Option<Instant> {
        if !self.busy && applied >= self.wanted {
            self.oldest = None;
        }
        self.oldest
    }
}

/// What kube-proxy's proxier health server answers from ([`Health::proxy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyState {
    /// Live, and no change waiting longer than [`SYNC_LIMIT`] (kube-proxy's `isHealthy`).
    pub healthy: bool,
    /// Why not, when not.
    pub why: Option<String>,
    /// When the worker last took tables carrying the cluster's changes (or the node came up).
    pub last_updated: SystemTime,
    /// The node is not being deleted: no deletionTimestamp and no
    /// `ToBeDeletedByClusterAutoscaler` taint (kube-proxy's `nodeEligible`).
    pub node_eligible: bool,
}

/// What the probes read.
#[derive(Debug)]
pub struct Health {
    heartbeat: Arc<Heartbeat>,
    source: Arc<SourceStatus>,
    /// Set once the node is up, cleared when it starts shutting down.
    up: AtomicBool,
    sync: Mutex<Sync>,
    /// The generation of the tables the worker had when it last ran a marker (stored by the
    /// worker thread: an atomic, no lock).
    applied: AtomicU64,
    /// When that was, in ns since the Unix epoch (likewise).
    applied_at: AtomicU64,
    node_eligible: AtomicBool,
    /// The health check servers' counters (`crate::healthcheck`), for the metrics.
    pub checks: Arc<crate::healthcheck::Counters>,
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Health {
    pub fn new(heartbeat: Arc<Heartbeat>, source: Arc<SourceStatus>) -> Health {
        Health {
            heartbeat,
            source,
            up: AtomicBool::new(false),
            sync: Mutex::new(Sync::default()),
            applied: AtomicU64::new(0),
            applied_at: AtomicU64::new(0),
            node_eligible: AtomicBool::new(true),
            checks: Arc::default(),
        }
    }

    /// The node is up (or, with `false`, shutting down). Up means the first tables are
    /// installed: the proxy's `lastUpdated` starts there.
    pub fn set_up(&self, up: bool) {
        if up {
            let _ =
                self.applied_at.compare_exchange(0, unix_ns(SystemTime::now()), Ordering::Relaxed, Ordering::Relaxed);
        }
        self.up.store(up, Ordering::Relaxed);
    }

    /// The control loop took a batch of cluster changes (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self) {
        if let Ok(mut s) = self.sync.lock() {
            s.queued(Instant::now());
        }
    }

    /// The batch taken last is compiled: `Some(generation)` of the tables sent to the worker,
    /// `None` when it changed nothing (no tables were built).
    pub fn sent(&self, generation: Option<u64>) {
        if let Ok(mut s) = self.sync.lock() {
            s.sent(generation);
        }
    }

    /// Run by the worker, between two passes, once the tables of `generation` are in use
    /// (kube-proxy's `Updated`). Atomics only: no lock on the worker's thread.
    pub fn applied(&self, generation: u64) {
        self.applied.fetch_max(generation, Ordering::Relaxed);
        self.applied_at.store(unix_ns(SystemTime::now()), Ordering::Relaxed);
    }

    /// Sets kube-proxy's `nodeEligible` (from this node's Node object).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// How long the oldest change not yet in the worker's tables has waited.
    pub fn waiting(&self) -> Option<Duration> {
        let since = self.sync.lock().ok()?.waiting_since(self.applied.load(Ordering::Relaxed));
        since.map(|t| t.elapsed())
    }

    /// The proxier's health, as kube-proxy's health servers report it.
    pub fn proxy(&self) -> ProxyState {
        let why = match (self.live(), self.waiting()) {
            (Err(why), _) => Some(why),
            (Ok(_), Some(w)) if w >= SYNC_LIMIT => Some(format!(
                "a cluster change taken {:.1} s ago has not reached the worker (limit {} s)",
                w.as_secs_f64(),
                SYNC_LIMIT.as_secs()
            )),
            _ => None,
        };
        let at = self.applied_at.load(Ordering::Relaxed);
        ProxyState {
            healthy: why.is_none(),
            why,
            last_updated: UNIX_EPOCH + Duration::from_nanos(at),
            node_eligible: self.node_eligible.load(Ordering::Relaxed),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A change waits from when it is taken until the worker uses tables at least as new as
    /// the ones built for it; the oldest waiting change sets the time, as kube-proxy's
    /// `oldestPendingQueued` does.
    #[test]
    fn a_change_waits_until_the_worker_uses_its_tables() {
        let mut s = Sync::default();
        let t0 = Instant::now();
        assert_eq!(s.waiting_since(0), None, "nothing taken: healthy at start");
        s.queued(t0);
        assert_eq!(s.waiting_since(1), Some(t0), "taken, being compiled");
        s.sent(Some(5));
        assert_eq!(s.waiting_since(4), Some(t0), "sent, the worker still on generation 4");
        // A second change while the first waits: the oldest stays.
        s.queued(t0 + Duration::from_secs(1));
        s.sent(Some(6));
        assert_eq!(s.waiting_since(5), Some(t0));
        assert_eq!(s.waiting_since(6), None, "the worker uses generation 6: nothing waits");
        // A batch that changed nothing builds no tables and waits for nothing.
        s.queued(t0 + Duration::from_secs(2));
        s.sent(None);
        assert_eq!(s.waiting_since(6), None);
    }
}
