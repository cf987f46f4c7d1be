//! Where the cluster state comes from: the state file (reloaded when it changes) or the
//! Kubernetes API (watched). Both send `Update`s over a channel to the control thread, which
//! owns the model; a source never touches the dataplane.

use crate::model::{Kind, Object, Update};
use crate::state::ClusterState;
use crossbeam_channel::Sender;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
/// good state keeps serving.
pub fn follow_file(
    path: PathBuf,
    tx: Sender<Update>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("vxnat-state-file".into()).spawn(move || {
        let mut seen = file_stamp(&path);
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(FILE_POLL);
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
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
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
