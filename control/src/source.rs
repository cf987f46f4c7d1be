//! Where the cluster state comes from: the state file (reloaded when it changes) or the
//! Kubernetes API (watched). Both send `Update`s over a channel to the control thread, which
//! owns the model; a source never touches the dataplane.
//!
//! A source runs on its own thread, kept running by a [`Supervised`]: when the thread ends
//! (a panic, or a Kubernetes source that could not build its client) while vxnat runs, the
//! death is logged naming the source, counted in [`SourceStatus`] (`vxnat ctl stats`, metrics,
//! `/readyz`) and the source is started again after a backoff (1 s doubling to 30 s, back to
//! 1 s once a source has run a minute). The last good state keeps serving meanwhile; a
//! restarted source sends the whole state again (the file re-read, the API relisted).

use crate::model::{Kind, Object, Update};
use crate::state::ClusterState;
use crossbeam_channel::Sender;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the state file's metadata is checked.
pub const FILE_POLL: Duration = Duration::from_millis(100);
/// How long the file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(30);

fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Follows the state file: whenever its modification time, size or inode changes (editors
/// that write a new file and rename it included), it is parsed again and sent whole. A file
/// that does not parse is reported (naming the object and field) and nothing is sent: the last
/// good state keeps serving. With `send_now` (a restarted source, which may have missed a
/// change) the file is also read and sent once at start.
pub fn follow_file(
    path: PathBuf,
    tx: Sender<Update>,
    stop: Arc<AtomicBool>,
    send_now: bool,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("vxnat-state-file".into()).spawn(move || {
        let mut seen = if send_now { None } else { file_stamp(&path) };
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(FILE_POLL);
            #[cfg(feature = "fault-injection")]
            crate::fault::source_point();
            let mut now = file_stamp(&path);
            if now == seen || now.is_none() {
                continue;
            }
            // A writer may still be at it (`kubectl get ... > file` writes as it goes): read
            // once the file has stood still for a moment.
            loop {
                std::thread::sleep(SETTLE);
                let again = file_stamp(&path);
                if again == now {
                    break;
                }
                now = again;
            }
            seen = now;
            match ClusterState::load(&path) {
                Ok(s) => {
                    if tx.send(Update::State(s)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!("state file {e}; still serving the last good state"),
            }
        }
    })
}

/// The Kubernetes API source: watches Nodes, Services and EndpointSlices with kube-rs's
/// watcher (list then watch, bookmarks, relist after 410 Gone, reconnect with client-go's
/// backoff after errors or dropped connections; the model and the dataplane keep their last
/// state meanwhile). Each completed (re)list is sent as `Update::Relisted`, each event as
/// `Apply`/`Delete`. Annotations received on `annotate` are merged into this node's Node object
/// (retried until they stick).
#[derive(Debug)]
pub struct KubeSource {
    pub config: Option<kube::Config>,
    pub node: String,
}

impl KubeSource {
    pub fn spawn(
        self,
        tx: Sender<Update>,
        annotate: crossbeam_channel::Receiver<BTreeMap<String, String>>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name("vxnat-kube".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("Kubernetes source: tokio runtime: {e}");
                    return;
                }
            };
            rt.block_on(self.run(tx, annotate, stop));
        })
    }

    async fn run(
        self,
        tx: Sender<Update>,
        annotate: crossbeam_channel::Receiver<BTreeMap<String, String>>,
        stop: Arc<AtomicBool>,
    ) {
        use k8s_openapi::api::core::v1::{Node, Service};
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let config = match self.config {
            Some(c) => c,
            None => match kube::Config::infer().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("Kubernetes source: no in-cluster config or kubeconfig: {e}");
                    return;
                }
            },
        };
        let client = match kube::Client::try_from(config) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("Kubernetes source: client: {e}");
                return;
            }
        };
        let nodes = follow(kube::Api::<Node>::all(client.clone()), Kind::Node, |n| Object::Node(Box::new(n)), &tx);
        let services =
            follow(kube::Api::<Service>::all(client.clone()), Kind::Service, |s| Object::Service(Box::new(s)), &tx);
        let slices =
            follow(kube::Api::<EndpointSlice>::all(client.clone()), Kind::Slice, |s| Object::Slice(Box::new(s)), &tx);
        let publish = publish_annotations(kube::Api::<Node>::all(client), &self.node, annotate, &stop);
        let stopped = async {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                #[cfg(feature = "fault-injection")]
                crate::fault::source_point();
            }
        };
        tokio::select! {
            _ = async { tokio::join!(nodes, services, slices, publish) } => {}
            _ = stopped => {}
        }
    }
}

/// Follows one kind: buffers a (re)list until it is complete, then sends it whole.
async fn follow<K>(api: kube::Api<K>, kind: Kind, wrap: fn(K) -> Object, tx: &Sender<Update>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    use futures_util::StreamExt;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listed = Vec::new();
    while let Some(ev) = stream.next().await {
        let sent = match ev {
            Ok(Event::Init) => {
                listed.clear();
                Ok(())
            }
            Ok(Event::InitApply(k)) => {
                listed.push(wrap(k));
                Ok(())
            }
            Ok(Event::InitDone) => tx.send(Update::Relisted(kind, std::mem::take(&mut listed))),
            Ok(Event::Apply(k)) => tx.send(Update::Apply(wrap(k))),
            Ok(Event::Delete(k)) => tx.send(Update::Delete(wrap(k))),
            Err(e) => {
                tracing::warn!("watching {kind:?}s: {e}; retrying with backoff (last state kept)");
                Ok(())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Merges requested annotations into this node's Node object (a JSON merge patch), retrying
/// every 2 s until the API server accepts it.
async fn publish_annotations(
    api: kube::Api<k8s_openapi::api::core::v1::Node>,
    node: &str,
    requests: crossbeam_channel::Receiver<BTreeMap<String, String>>,
    stop: &AtomicBool,
) {
    use kube::api::{Patch, PatchParams};
    while !stop.load(Ordering::Relaxed) {
        let annotations = match requests.try_recv() {
            Ok(a) => a,
            Err(crossbeam_channel::TryRecvError::Empty) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(crossbeam_channel::TryRecvError::Disconnected) => return,
        };
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        loop {
            match api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!("published this node's flannel annotations on Node {node}");
                    break;
                }
                Err(e) => {
                    tracing::warn!("annotating Node {node}: {e}; retrying in 2 s");
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }
}

/// flannel's Node annotations for a VXLAN node, so flannel nodes route to this one.
pub fn flannel_annotations(vni: u32, vtep_mac: &str, public_ip: &str) -> BTreeMap<String, String> {
    use crate::state::{ANNOTATION_BACKEND_DATA, ANNOTATION_BACKEND_TYPE, ANNOTATION_PUBLIC_IP};
    BTreeMap::from([
        (ANNOTATION_BACKEND_DATA.to_string(), format!("{{\"VNI\":{vni},\"VtepMAC\":\"{vtep_mac}\"}}")),
        (ANNOTATION_BACKEND_TYPE.to_string(), "vxlan".to_string()),
        ("flannel.alpha.coreos.com/kube-subnet-manager".to_string(), "true".to_string()),
        (ANNOTATION_PUBLIC_IP.to_string(), public_ip.to_string()),
    ])
}

/// The first wait before a dead source is started again; it doubles on each death in a row.
pub const RESTART_FIRST: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
pub const RESTART_MAX: Duration = Duration::from_secs(30);
/// A source that ran this long before dying starts its backoff over at `RESTART_FIRST`.
pub const RESTART_RESET: Duration = Duration::from_secs(60);

/// What a supervised source's state is, shared with ctl, metrics and `/readyz` (atomics, and a
/// mutex touched only when it dies).
#[derive(Debug)]
pub struct SourceStatus {
    /// The state file's path, or "Kubernetes API".
    pub name: String,
    up: AtomicBool,
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

/// `SourceStatus` as ctl reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceReport {
    pub name: String,
    /// Whether its thread runs now (false while waiting to restart it).
    pub up: bool,
    /// How many times its thread has died.
    pub failures: u64,
    /// Why it last died.
    pub last_failure: Option<String>,
}

impl SourceStatus {
    pub fn new(name: &str) -> SourceStatus {
        SourceStatus {
            name: name.to_string(),
            up: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
        }
    }

    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> SourceReport {
        SourceReport {
            name: self.name.clone(),
            up: self.up(),
            failures: self.failures(),
            last_failure: self.last_failure.lock().ok().and_then(|l| l.clone()),
        }
    }
}

/// Starts a source's thread (again).
pub type SpawnSource = Box<dyn FnMut() -> std::io::Result<JoinHandle<()>> + Send>;

/// A source thread kept running: [`Supervised::check`], called on every turn of the control
/// loop, notices the thread has ended, reports it and starts it again after a backoff.
pub struct Supervised {
    spawn: SpawnSource,
    thread: Option<JoinHandle<()>>,
    /// When the running thread was started.
    since: Instant,
    /// The wait before the next restart.
    delay: Duration,
    retry_at: Option<Instant>,
    first: Duration,
    max: Duration,
    pub status: Arc<SourceStatus>,
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised").field("status", &self.status).field("retry_at", &self.retry_at).finish()
    }
}

impl Supervised {
    /// Starts the source (`spawn`) under the name `name`; restarts wait `RESTART_FIRST`
    /// doubling to `RESTART_MAX`.
    pub fn start(name: &str, spawn: SpawnSource) -> std::io::Result<Supervised> {
        Self::with_backoff(name, spawn, RESTART_FIRST, RESTART_MAX)
    }

    /// `start` with another backoff (tests).
    pub fn with_backoff(
        name: &str,
        mut spawn: SpawnSource,
        first: Duration,
        max: Duration,
    ) -> std::io::Result<Supervised> {
        let thread = spawn()?;
        let status = Arc::new(SourceStatus::new(name));
        status.up.store(true, Ordering::Relaxed);
        Ok(Supervised {
            spawn,
            thread: Some(thread),
            since: Instant::now(),
            delay: first,
            retry_at: None,
            first,
            max,
            status,
        })
    }

    /// Notices a dead source (logged as an error naming it and why, counted) and starts it
    /// again once its backoff has passed. Returns true when it was started again by this call.
    /// Does nothing once `stop` is set (sources end then by design).
    pub fn check(&mut self, stop: &AtomicBool) -> bool {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            let why = match self.thread.take().map(JoinHandle::join) {
                Some(Err(payload)) => format!("its thread panicked: {}", xsk::host::panic_message(payload.as_ref())),
                _ => "its thread ended".to_string(),
            };
            if self.since.elapsed() >= RESTART_RESET {
                self.delay = self.first;
            }
            self.status.up.store(false, Ordering::Relaxed);
            self.status.failures.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = self.status.last_failure.lock() {
                *l = Some(why.clone());
            }
            tracing::error!(
                "cluster source ({}) died: {why}; restarting it in {:?} (the last state keeps serving)",
                self.status.name,
                self.delay
            );
            self.retry_at = Some(Instant::now() + self.delay);
            self.delay = (self.delay * 2).min(self.max);
        }
        match self.retry_at {
            Some(at) if Instant::now() >= at => match (self.spawn)() {
                Ok(t) => {
                    self.thread = Some(t);
                    self.since = Instant::now();
                    self.retry_at = None;
                    self.status.up.store(true, Ordering::Relaxed);
                    tracing::info!(
                        "cluster source ({}) restarted (it has died {} times)",
                        self.status.name,
                        self.status.failures()
                    );
                    true
                }
                Err(e) => {
                    tracing::error!(
                        "cluster source ({}): could not start it again: {e}; next try in {:?}",
                        self.status.name,
                        self.delay
                    );
                    self.retry_at = Some(Instant::now() + self.delay);
                    self.delay = (self.delay * 2).min(self.max);
                    false
                }
            },
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `check` every 5 ms until `done` or `limit` passes.
    fn check_until(s: &mut Supervised, limit: Duration, mut done: impl FnMut(&Supervised) -> bool) -> bool {
        let stop = AtomicBool::new(false);
        let until = Instant::now() + limit;
        while Instant::now() < until {
            s.check(&stop);
            if done(s) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_dead_source_is_counted_reported_and_restarted_with_backoff() {
        let starts = Arc::new(AtomicU64::new(0));
        let counted = starts.clone();
        // Every thread dies at once: the first by a panic, the rest by returning.
        let spawn: SpawnSource = Box::new(move || {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            std::thread::Builder::new().spawn(move || {
                if n == 0 {
                    panic!("source broke");
                }
            })
        });
        let first = Duration::from_millis(40);
        let mut s = Supervised::with_backoff("state file x.yaml", spawn, first, Duration::from_millis(100)).unwrap();
        assert!(check_until(&mut s, Duration::from_secs(2), |s| s.status.failures() == 1));
        let r = s.status.report();
        assert!(!r.up, "down while waiting to restart");
        assert_eq!(r.name, "state file x.yaml");
        assert_eq!(r.last_failure.as_deref(), Some("its thread panicked: source broke"));
        assert_eq!(starts.load(Ordering::Relaxed), 1, "not restarted before its backoff");
        let t0 = Instant::now();
        assert!(check_until(&mut s, Duration::from_secs(2), |_| starts.load(Ordering::Relaxed) == 2));
        assert!(t0.elapsed() >= first - Duration::from_millis(10), "restarted after {:?}", t0.elapsed());
        // It dies again; the wait doubles (40 ms, then 80 ms), and stays at most 100 ms.
        assert!(check_until(&mut s, Duration::from_secs(2), |_| starts.load(Ordering::Relaxed) == 4));
        assert!(s.status.failures() >= 3);
        assert_eq!(s.status.report().last_failure.as_deref(), Some("its thread ended"));
        assert_eq!(s.delay, Duration::from_millis(100), "capped");
    }

    #[test]
    fn a_source_ending_because_vxnat_stops_is_not_restarted() {
        let spawn: SpawnSource = Box::new(|| std::thread::Builder::new().spawn(|| {}));
        let mut s = Supervised::with_backoff("x", spawn, Duration::ZERO, Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let stop = AtomicBool::new(true);
        assert!(!s.check(&stop));
        assert_eq!(s.status.failures(), 0);
        assert!(s.status.up());
    }

    #[test]
    fn a_restarted_file_source_sends_the_whole_state_at_once() {
        let dir = std::env::temp_dir().join(format!("vxnat-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.yaml");
        std::fs::write(&path, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let t = follow_file(path.clone(), tx.clone(), stop.clone(), true).unwrap();
        assert!(matches!(rx.recv_timeout(Duration::from_secs(2)), Ok(Update::State(_))), "sent without a change");
        let quiet = follow_file(path, tx, stop.clone(), false).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(400)).is_err(), "a first start sends nothing unchanged");
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        quiet.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
