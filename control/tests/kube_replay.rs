//! The Kubernetes API source against recorded API traffic. No API server can run on this
//! machine, so a local HTTP server replays what one sends (the list and watch responses of
//! `GET /api/v1/services?watch=true&resourceVersion=...`, in the API's JSON, watch events as
//! chunked JSON lines): lists, watch events, a bookmark, a dropped connection, a `410 Gone`
//! (expired resourceVersion), a relist, and the merge patch of this node's annotations. The
//! updates the real source (kube-rs's watcher) produces are applied to the model and compiled,
//! and the resulting Service table is asserted.
//!
//! `against_a_real_cluster_when_kubeconfig_is_set` runs the same source against the cluster
//! `KUBECONFIG` points to, and is skipped (saying so) when it is not set.

use crossbeam_channel::{unbounded, Receiver};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vxnat_control::model::{Kind, Model, Update};
use vxnat_control::services::Compiler;
use vxnat_control::source::{flannel_annotations, KubeSource};

fn node(name: &str, ip: &str, cidr: &str) -> String {
    format!(
        r#"{{"kind":"Node","apiVersion":"v1","metadata":{{"name":"{name}","resourceVersion":"5"}},"spec":{{"podCIDR":"{cidr}"}},"status":{{"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#
    )
}

fn service(name: &str, ip: &str, rv: u32) -> String {
    format!(
        r#"{{"kind":"Service","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"default","resourceVersion":"{rv}"}},"spec":{{"clusterIP":"{ip}","ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}}]}}}}"#
    )
}

fn slice(service: &str, addrs: &[&str], rv: u32) -> String {
    let eps: Vec<String> = addrs
        .iter()
        .map(|a| format!(r#"{{"addresses":["{a}"],"conditions":{{"ready":true}},"nodeName":"node-b"}}"#))
        .collect();
    format!(
        r#"{{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{{"name":"{service}-1","namespace":"default","resourceVersion":"{rv}","labels":{{"kubernetes.io/service-name":"{service}"}}}},"addressType":"IPv4","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],"endpoints":[{}]}}"#,
        eps.join(",")
    )
}

fn list(kind: &str, api: &str, rv: u32, items: &[String]) -> String {
    format!(
        r#"{{"kind":"{kind}","apiVersion":"{api}","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#,
        items.join(",")
    )
}

fn event(ty: &str, obj: &str) -> String {
    format!(r#"{{"type":"{ty}","object":{obj}}}"#)
}

/// What one watch request gets: events, then either the connection closes or it stays open.
struct Watch {
    events: Vec<String>,
    then_close: bool,
}

/// The recorded conversation, per resource path.
struct Script {
    /// Successive list responses (the last one repeats).
    lists: Vec<String>,
    /// Watch responses by the resourceVersion the client asks to watch from.
    watches: BTreeMap<String, Watch>,
}

#[derive(Default)]
struct Seen {
    requests: Vec<String>,
    patches: Vec<String>,
}

struct Server {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(scripts: BTreeMap<&'static str, Script>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    l.set_nonblocking(true).expect("nonblocking");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let scripts = Arc::new(scripts);
    let lists_served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let (seen2, stop2) = (seen.clone(), stop.clone());
    std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let Ok((c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let (scripts, seen, stop, lists_served) =
                (scripts.clone(), seen2.clone(), stop2.clone(), lists_served.clone());
            std::thread::spawn(move || handle(c, &scripts, &seen, &stop, &lists_served));
        }
    });
    Server { port, seen, stop }
}

fn handle(
    c: TcpStream,
    scripts: &BTreeMap<&'static str, Script>,
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
    lists_served: &Mutex<BTreeMap<String, usize>>,
) {
    let _ = c.set_nonblocking(false);
    let mut r = BufReader::new(c.try_clone().expect("clone"));
    let mut w = c;
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; content_length];
    let _ = r.read_exact(&mut body);
    seen.lock().expect("lock").requests.push(format!("{method} {target}"));
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
    let respond = |w: &mut TcpStream, status: &str, body: &str| {
        let _ = write!(
            w,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    if method == "PATCH" {
        seen.lock().expect("lock").patches.push(String::from_utf8_lossy(&body).to_string());
        respond(&mut w, "200 OK", &node("node-a", "192.168.77.1", "10.244.0.0/24"));
        return;
    }
    let Some(script) = scripts.get(path) else {
        respond(&mut w, "404 Not Found", r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#);
        return;
    };
    if params.get("watch") != Some(&"true") {
        let n = {
            let mut m = lists_served.lock().expect("lock");
            let e = m.entry(path.to_string()).or_default();
            *e += 1;
            *e - 1
        };
        let body = &script.lists[n.min(script.lists.len() - 1)];
        respond(&mut w, "200 OK", body);
        return;
    }
    let rv = params.get("resourceVersion").copied().unwrap_or("");
    let Some(watch) = script.watches.get(rv) else {
        // An unexpected resourceVersion: the test's assertions will notice the missing events.
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        return;
    };
    let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
    for e in &watch.events {
        let line = format!("{e}\n");
        let _ = write!(w, "{:x}\r\n{line}\r\n", line.len());
        let _ = w.flush();
        std::thread::sleep(Duration::from_millis(20));
    }
    if watch.then_close {
        let _ = write!(w, "0\r\n\r\n");
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn collect_until(
    rx: &Receiver<Update>,
    model: &mut Model,
    log: &mut Vec<String>,
    deadline: Duration,
    done: impl Fn(&Model, &[String]) -> bool,
) -> bool {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if let Ok(u) = rx.recv_timeout(Duration::from_millis(100)) {
            log.push(match &u {
                Update::Relisted(k, objs) => format!("relisted {k:?} ({})", objs.len()),
                Update::Apply(_) => "apply".into(),
                Update::Delete(_) => "delete".into(),
                Update::State(_) => "state".into(),
            });
            model.apply(u);
        }
        if done(model, log) {
            return true;
        }
    }
    false
}

#[test]
fn watch_survives_bookmarks_drops_and_410_gone() {
    let web = service("web", "10.96.0.50", 10);
    let db = service("db", "10.96.0.60", 11);
    let api = service("api", "10.96.0.70", 20);
    let bookmark = r#"{"kind":"Service","apiVersion":"v1","metadata":{"resourceVersion":"12"}}"#;
    let gone = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 12 (15)","reason":"Expired","code":410}}"#;
    let scripts = BTreeMap::from([
        (
            "/api/v1/nodes",
            Script {
                lists: vec![list(
                    "NodeList",
                    "v1",
                    100,
                    &[node("node-a", "192.168.77.1", "10.244.0.0/24"), node("node-b", "192.168.77.2", "10.244.1.0/24")],
                )],
                watches: BTreeMap::from([("100".to_string(), Watch { events: vec![], then_close: false })]),
            },
        ),
        (
            "/api/v1/services",
            Script {
                // First list: web. After the 410, the relist: web and api; db is gone.
                lists: vec![
                    list("ServiceList", "v1", 10, std::slice::from_ref(&web)),
                    list("ServiceList", "v1", 20, &[web.clone(), api.clone()]),
                ],
                watches: BTreeMap::from([
                    // db added, a bookmark moves the resourceVersion to 12, the connection drops.
                    (
                        "10".to_string(),
                        Watch { events: vec![event("ADDED", &db), event("BOOKMARK", bookmark)], then_close: true },
                    ),
                    // Re-watching from the bookmark's version: it has expired.
                    ("12".to_string(), Watch { events: vec![gone.to_string()], then_close: true }),
                    ("20".to_string(), Watch { events: vec![], then_close: false }),
                ]),
            },
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            Script {
                lists: vec![list("EndpointSliceList", "discovery.k8s.io/v1", 30, &[slice("web", &["10.244.1.2"], 30)])],
                watches: BTreeMap::from([(
                    "30".to_string(),
                    Watch {
                        events: vec![
                            event("MODIFIED", &slice("web", &["10.244.1.2", "10.244.1.3"], 31)),
                            event("ADDED", &slice("api", &["10.244.1.7"], 32)),
                        ],
                        then_close: false,
                    },
                )]),
            },
        ),
    ]);
    let server = serve(scripts);
    let (tx, rx) = unbounded();
    let (atx, arx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let config = kube::Config::new(format!("http://127.0.0.1:{}", server.port).parse().expect("url"));
    let source =
        KubeSource { config: Some(config), node: "node-a".into() }.spawn(tx, arx, stop.clone()).expect("spawn");
    atx.send(flannel_annotations(1, "0e:76:78:00:00:01", "192.168.77.1")).expect("annotate");
    let mut model = Model::default();
    let mut log = Vec::new();
    let ok = collect_until(&rx, &mut model, &mut log, Duration::from_secs(20), |m, log| {
        let key = |n: &str| ("default".to_string(), n.to_string());
        log.iter().filter(|l| l.starts_with("relisted Service")).count() == 2
            && m.services.contains_key(&key("api"))
            && !m.services.contains_key(&key("db"))
            && m.slices_of(&key("api")).len() == 1
            && m.slices_of(&key("web")).first().is_some_and(|s| s.endpoints.len() == 2)
    });
    let seen = server.seen.lock().expect("lock").requests.clone();
    assert!(ok, "expected state not reached; updates {log:?}; requests {seen:#?}");
    // The second watch resumed from the bookmark's resourceVersion, not the last event's.
    assert!(
        seen.iter()
            .any(|r| r.contains("/api/v1/services?") && r.contains("watch=true") && r.contains("resourceVersion=12")),
        "{seen:#?}"
    );
    // db was seen (added by the first watch) before the relist removed it.
    assert!(log.iter().any(|l| l == "apply"), "{log:?}");
    // The tables that result.
    assert_eq!(model.nodes.len(), 2);
    let mut c = Compiler::new("node-a", 16381);
    assert!(c.compile_all(&model).is_empty());
    let (t, problems) = c.table();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(t.lookup(6, Ipv4Addr::new(10, 96, 0, 60), 80, false).is_none(), "db is gone after the relist");
    let (p, k) = t.lookup(6, Ipv4Addr::new(10, 96, 0, 70), 80, false).expect("api");
    assert_eq!(p.choose(k, false, 1).expect("endpoint").endpoint.ip, Ipv4Addr::new(10, 244, 1, 7));
    let (p, k) = t.lookup(6, Ipv4Addr::new(10, 96, 0, 50), 80, false).expect("web");
    let picked: std::collections::BTreeSet<Ipv4Addr> = (0..64u64)
        .map(|h| p.choose(k, false, h.wrapping_mul(0x9e37_79b9_7f4a_7c15)).expect("ep").endpoint.ip)
        .collect();
    assert_eq!(picked.len(), 2, "both endpoints of web after the slice update: {picked:?}");
    // This node's flannel annotations were published with a merge patch.
    let until = Instant::now() + Duration::from_secs(5);
    while server.seen.lock().expect("lock").patches.is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let patches = server.seen.lock().expect("lock").patches.clone();
    assert_eq!(patches.len(), 1, "{patches:?}");
    let v: serde_json::Value = serde_json::from_str(&patches[0]).expect("patch JSON");
    let a = &v["metadata"]["annotations"];
    assert_eq!(a["flannel.alpha.coreos.com/backend-data"], r#"{"VNI":1,"VtepMAC":"0e:76:78:00:00:01"}"#);
    assert_eq!(a["flannel.alpha.coreos.com/public-ip"], "192.168.77.1");
    assert!(server.seen.lock().expect("lock").requests.iter().any(|r| r.starts_with("PATCH /api/v1/nodes/node-a")));
    stop.store(true, Ordering::Relaxed);
    source.join().expect("source thread");
}

/// An API server that is down at first: the source keeps retrying with backoff and delivers
/// the state once it answers (the dataplane would have kept its last tables meanwhile).
#[test]
fn an_unreachable_api_server_is_retried() {
    // Reserve a port, then free it: nothing listens there yet.
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let (tx, rx) = unbounded();
    let (_atx, arx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().expect("url"));
    let source =
        KubeSource { config: Some(config), node: "node-a".into() }.spawn(tx, arx, stop.clone()).expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rx.try_recv().is_err(), "nothing to report while the API server is down");
    let l = TcpListener::bind(("127.0.0.1", port)).expect("rebind");
    let served = Arc::new(AtomicUsize::new(0));
    let (s2, stop2) = (served.clone(), stop.clone());
    std::thread::spawn(move || {
        l.set_nonblocking(true).expect("nonblocking");
        while !stop2.load(Ordering::Relaxed) {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let _ = c.set_nonblocking(false);
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s2.fetch_add(1, Ordering::Relaxed);
            if req.contains("watch=true") {
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                );
                std::thread::sleep(Duration::from_secs(3));
                continue;
            }
            let body = if req.contains("/nodes") {
                list("NodeList", "v1", 1, &[node("node-a", "192.168.77.1", "10.244.0.0/24")])
            } else if req.contains("/services") {
                list("ServiceList", "v1", 1, &[])
            } else {
                list("EndpointSliceList", "discovery.k8s.io/v1", 1, &[])
            };
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let mut model = Model::default();
    let mut log = Vec::new();
    let ok = collect_until(&rx, &mut model, &mut log, Duration::from_secs(30), |m, log| {
        m.nodes.contains_key("node-a") && log.iter().filter(|l| l.starts_with("relisted")).count() >= 3
    });
    stop.store(true, Ordering::Relaxed);
    assert!(ok, "state delivered once the API server answered: {log:?}");
    source.join().expect("source thread");
}

#[test]
fn against_a_real_cluster_when_kubeconfig_is_set() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set (no Kubernetes API server can run on this machine)");
        return;
    }
    let (tx, rx) = unbounded();
    let (_atx, arx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let source = KubeSource { config: None, node: String::new() }.spawn(tx, arx, stop.clone()).expect("spawn");
    let mut model = Model::default();
    let mut log = Vec::new();
    let ok = collect_until(&rx, &mut model, &mut log, Duration::from_secs(60), |_, log| {
        [Kind::Node, Kind::Service, Kind::Slice]
            .iter()
            .all(|k| log.iter().any(|l| l.starts_with(&format!("relisted {k:?}"))))
    });
    stop.store(true, Ordering::Relaxed);
    assert!(ok, "the cluster's Nodes, Services and EndpointSlices were listed: {log:?}");
    assert!(!model.nodes.is_empty(), "a cluster has Nodes");
    assert!(
        model.services.contains_key(&("default".to_string(), "kubernetes".to_string())),
        "default/kubernetes exists"
    );
    let mut c = Compiler::new(model.nodes.keys().next().map(String::as_str).unwrap_or(""), 16381);
    c.compile_all(&model);
    assert!(c.table().0.port_count() > 0);
    source.join().expect("source thread");
}
