//! kube-proxy's health servers, as load balancers and node probes expect them
//! (`kubernetes/pkg/proxy/healthcheck`):
//!
//! - **healthCheckNodePort servers.** Every Service of type `LoadBalancer` with
//!   `externalTrafficPolicy: Local` and a `spec.healthCheckNodePort` (kube-proxy's
//!   `NeedsHealthCheck`; headless and ExternalName Services are skipped, as kube-proxy skips
//!   them) gets an HTTP server on that port, on each of `healthcheck_addresses` (default: the
//!   node's primary address, kube-proxy's nftables-mode `--nodeport-addresses primary`). Any
//!   method and path gets status 200 when this node has at least one local ready endpoint for
//!   the Service and the proxy is healthy, else 503, with kube-proxy's headers
//!   (`Content-Type: application/json`, `X-Content-Type-Options: nosniff`,
//!   `X-Load-Balancing-Endpoint-Weight: <local endpoints>`) and body
//!   ([`service_response`]). Local endpoints are counted as kube-proxy's
//!   `LocalReadyEndpoints` counts them: distinct addresses of endpoints whose `nodeName` is
//!   this node and whose `ready` condition is true (absent counts as true), over the Service's
//!   TCP and UDP ports, from IPv4 EndpointSlices.
//! - **The proxier health server** on `proxy_health` (default `0.0.0.0:10256`, kube-proxy's
//!   `--healthz-bind-address`): `/healthz` and `/livez`, as [`healthz_response`] and
//!   [`livez_response`] say, from [`crate::health::Health::proxy`].
//!
//! Servers open and close as Services appear, go or change port ([`HealthChecks::publish`],
//! called by the control loop after every batch of cluster changes, which also refreshes the
//! endpoint counts). A port that cannot be bound is logged naming the Service, the field and
//! the address, counted once (`vxnat_healthcheck_bind_failures_total`), and retried every
//! [`RETRY`]; the other Services' servers go on. A bad `healthCheckNodePort` is logged naming
//! the Service and the field.
//!
//! Everything runs on one thread of the control plane (`vxnat-healthcheck`): nonblocking
//! listeners and connections polled in turn, so no client, however slow, holds up another for
//! longer than a turn, and at most [`MAX_CONNECTIONS`] are open at once. It reads only the
//! published checks (a `Mutex` of the control plane, held to clone an `Arc`) and the proxy's
//! state (`crate::health::Health::proxy`): never the worker, never the node's lock.

use crate::health::ProxyState;
use crate::model::{Key, Model, ServiceView};
use core::net::Ipv4Addr;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a port that could not be bound is tried again (a predecessor handing over may
/// still hold it for a moment; another program may let it go).
pub const RETRY: Duration = Duration::from_secs(2);
/// Connections open at once, at most; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest request head read.
const MAX_REQUEST: usize = 8192;

/// kube-proxy's taint of a node the cluster autoscaler is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// One Service's health check: its port, and its local ready endpoints now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub port: u16,
    pub local_endpoints: usize,
}

/// The checks the Services of `model` need on node `node`, by Service, and the problems found
/// (each naming the Service and the field; such a Service gets no server).
pub fn desired(model: &Model, node: &str) -> (BTreeMap<Key, Check>, Vec<String>) {
    let mut checks = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, svc) in &model.services {
        if svc.type_.as_deref() != Some("LoadBalancer") || svc.external_traffic_policy.as_deref() != Some("Local") {
            continue;
        }
        // kube-proxy's ShouldSkipService: no ClusterIP, no proxying, no health check.
        if matches!(svc.cluster_ip.as_deref(), None | Some("") | Some("None")) {
            continue;
        }
        let port = match svc.health_check_node_port {
            None | Some(0) => continue,
            Some(p) => match u16::try_from(p) {
                Ok(port) => port,
                Err(_) => {
                    problems.push(format!(
                        "Service {}/{}: spec.healthCheckNodePort: {p} is not a port; no health check server",
                        key.0, key.1
                    ));
                    continue;
                }
            },
        };
        let slices = model.slices_of(key);
        checks.insert(key.clone(), Check { port, local_endpoints: local_ready(svc, &slices, node) });
    }
    (checks, problems)
}

/// kube-proxy's `LocalReadyEndpoints` for one Service: distinct addresses of its endpoints on
/// `node` that are ready, for any of its TCP or UDP ports (an endpoint counts for a port when
/// its slice has a port of that name and protocol, as `crate::services` resolves them).
fn local_ready(svc: &ServiceView, slices: &[&crate::model::SliceView], node: &str) -> usize {
    let proto = |p: Option<&str>| match p.unwrap_or("TCP") {
        p @ ("TCP" | "UDP") => Some(p.to_string()),
        _ => None,
    };
    let mut ips = BTreeSet::new();
    for sp in &svc.ports {
        let Some(want) = proto(sp.protocol.as_deref()) else { continue };
        for s in slices.iter().filter(|s| s.address_type == "IPv4") {
            let has_port = s
                .ports
                .iter()
                .any(|(n, p, num)| *n == sp.name && proto(p.as_deref()).as_ref() == Some(&want) && num.is_some());
            if !has_port {
                continue;
            }
            for e in &s.endpoints {
                if e.node_name.as_deref() == Some(node) && e.ready.unwrap_or(true) {
                    if let Some(ip) = e.address.as_deref().and_then(|a| a.parse::<Ipv4Addr>().ok()) {
                        ips.insert(ip);
                    }
                }
            }
        }
    }
    ips.len()
}

/// kube-proxy's `nodeEligible` for this node's Node object: false when it is gone, has a
/// deletionTimestamp or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
/// taint.
pub fn node_eligible(node: Option<&k8s_openapi::api::core::v1::Node>) -> bool {
    let Some(n) = node else { return false };
    if n.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    fn json(status: u16, body: String) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into()), ("X-Content-Type-Options", "nosniff".into())],
            body,
        }
    }

    /// The response as sent (`HEAD`: without the body).
    pub fn to_http(&self, head: bool) -> String {
        let reason = match self.status {
            200 => "OK",
            404 => "Not Found",
            _ => "Service Unavailable",
        };
        let mut s = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", self.body.len()));
        if !head {
            s.push_str(&self.body);
        }
        s
    }
}

/// What a healthCheckNodePort server answers for Service `key` with `local` local ready
/// endpoints: kube-proxy's `hcHandler`, byte for byte (its body is the dedented template,
/// tabs and all, without a trailing newline).
pub fn service_response(key: &Key, local: usize, proxy_healthy: bool) -> Response {
    let mut ns = String::new();
    crate::json::push_str(&mut ns, &key.0);
    let mut name = String::new();
    crate::json::push_str(&mut name, &key.1);
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {ns},\n\t\t\"name\": {name}\n\t}},\n\t\"localEndpoints\": {local},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}"
    );
    let mut r = Response::json(if local != 0 && proxy_healthy { 200 } else { 503 }, body);
    r.headers.push(("X-Load-Balancing-Endpoint-Weight", local.to_string()));
    r
}

/// kube-proxy's `/healthz`: 200 when the proxy is healthy and the node eligible, else 503;
/// `lastUpdated` is `now` when healthy (as kube-proxy keeps it, for compatibility), else when
/// the worker last took the cluster's changes.
pub fn healthz_response(p: &ProxyState, now: SystemTime) -> Response {
    let healthy = p.healthy && p.node_eligible;
    let last = if healthy { now } else { p.last_updated };
    let body = format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": {}}}",
        go_time(last),
        go_time(now),
        p.node_eligible
    );
    Response::json(if healthy { 200 } else { 503 }, body)
}

/// kube-proxy's `/livez`: as `/healthz` without the node's eligibility.
pub fn livez_response(p: &ProxyState, now: SystemTime) -> Response {
    let last = if p.healthy { now } else { p.last_updated };
    let body = format!("{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}", go_time(last), go_time(now));
    Response::json(if p.healthy { 200 } else { 503 }, body)
}

/// What Go's `time.Time.String()` prints for a UTC time (`2006-01-02 15:04:05.999999999 +0000
/// UTC`: the fraction without trailing zeros, none when whole), which kube-proxy's bodies
/// quote. Go also appends the monotonic reading (` m=+12.345678901`); that is left out.
pub fn go_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut s = format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        s.push_str(format!(".{nanos:09}").trim_end_matches('0'));
    }
    s.push_str(" +0000 UTC");
    s
}

/// The counters the metrics show.
#[derive(Debug, Default)]
pub struct Counters {
    /// healthCheckNodePort servers open now (one per Service, on every address).
    pub open: AtomicU64,
    /// Ports that could not be bound: each (Service, port) or proxy address once per failure
    /// episode (until it is bound or no longer wanted).
    pub bind_failures: AtomicU64,
}

/// The checks the control loop publishes, and where the servers listen.
#[derive(Debug)]
pub struct HealthChecks {
    /// Addresses each healthCheckNodePort server listens on.
    addresses: Vec<Ipv4Addr>,
    /// The proxier health server's address; `None`: off.
    proxy: Option<SocketAddr>,
    checks: Mutex<Arc<BTreeMap<Key, Check>>>,
    /// Bumped on every publish that changed the set of (Service, port).
    version: AtomicU64,
    /// Problems logged, so each is logged once (control thread only).
    problems: Mutex<BTreeSet<String>>,
    counters: Arc<Counters>,
}

impl HealthChecks {
    /// Servers on each of `addresses` for the Services' checks, and the proxier health server
    /// on `proxy`; they count into `counters`.
    pub fn new(addresses: Vec<Ipv4Addr>, proxy: Option<SocketAddr>, counters: Arc<Counters>) -> HealthChecks {
        HealthChecks {
            addresses,
            proxy,
            checks: Mutex::default(),
            version: AtomicU64::new(0),
            problems: Mutex::default(),
            counters,
        }
    }

    /// Makes `checks` the current ones (the servers follow within a turn, ~20 ms) and logs
    /// problems not logged before.
    pub fn publish(&self, (checks, problems): (BTreeMap<Key, Check>, Vec<String>)) {
        if let Ok(mut logged) = self.problems.lock() {
            for p in problems.iter().filter(|p| !logged.contains(*p)) {
                tracing::warn!("{p}");
            }
            *logged = problems.into_iter().collect();
        }
        let Ok(mut cur) = self.checks.lock() else { return };
        let ports = |m: &BTreeMap<Key, Check>| m.iter().map(|(k, c)| (k.clone(), c.port)).collect::<Vec<_>>();
        if ports(&cur) != ports(&checks) {
            self.version.fetch_add(1, Ordering::Relaxed);
        }
        *cur = Arc::new(checks);
    }

    fn current(&self) -> Arc<BTreeMap<Key, Check>> {
        self.checks.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Runs the servers on their own thread until `stop`, answering from `proxy` (the proxy's
    /// health, read for every answer: `crate::health::Health::proxy`).
    pub fn serve(
        self: Arc<Self>,
        proxy: impl Fn() -> ProxyState + Send + 'static,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("vxnat-healthcheck".into())
            .spawn(move || Servers::new(self, Box::new(proxy)).run(&stop))
    }
}

/// Which server a connection came to.
#[derive(Debug, Clone)]
enum Route {
    Proxy,
    Service(Key),
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    route: Route,
    buf: Vec<u8>,
    deadline: Instant,
}

/// One Service's open server.
#[derive(Debug)]
struct Open {
    port: u16,
    listeners: Vec<TcpListener>,
}

/// A port that could not be bound: what was tried, and when to try again.
#[derive(Debug)]
struct Failed {
    port: u16,
    retry: Instant,
}

/// The server thread's state.
struct Servers {
    hc: Arc<HealthChecks>,
    proxy_state: Box<dyn Fn() -> ProxyState + Send>,
    proxy: Option<TcpListener>,
    proxy_failed: Option<Instant>,
    open: BTreeMap<Key, Open>,
    failed: BTreeMap<Key, Failed>,
    conns: Vec<Conn>,
    version: u64,
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl Servers {
    fn new(hc: Arc<HealthChecks>, proxy_state: Box<dyn Fn() -> ProxyState + Send>) -> Servers {
        Servers {
            hc,
            proxy_state,
            proxy: None,
            proxy_failed: None,
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
            conns: Vec::new(),
            version: u64::MAX,
        }
    }

    fn counters(&self) -> &Counters {
        &self.hc.counters
    }

    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.proxy_listener(now);
            let version = self.hc.version.load(Ordering::Relaxed);
            if version != self.version || self.failed.values().any(|f| now >= f.retry) {
                self.version = version;
                self.reconcile(now);
            }
            let accepted = self.accept(now);
            let answered = self.progress(now);
            if !accepted && !answered {
                std::thread::sleep(Duration::from_millis(if self.conns.is_empty() { 20 } else { 2 }));
            }
        }
        self.counters().open.store(0, Ordering::Relaxed);
    }

    /// Binds the proxier health server, at first and after a failure every `RETRY`.
    fn proxy_listener(&mut self, now: Instant) {
        let Some(addr) = self.hc.proxy else { return };
        if self.proxy.is_some() || self.proxy_failed.is_some_and(|t| now < t) {
            return;
        }
        match listen(addr) {
            Ok(l) => {
                if self.proxy_failed.is_some() {
                    tracing::info!("proxy_health: serving /healthz and /livez on {addr} now");
                }
                self.proxy = Some(l);
                self.proxy_failed = None;
            }
            Err(e) => {
                if self.proxy_failed.is_none() {
                    self.counters().bind_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "proxy_health: cannot listen on {addr} ({e}); no kube-proxy /healthz or /livez there, trying again every {} s",
                        RETRY.as_secs()
                    );
                }
                self.proxy_failed = Some(now + RETRY);
            }
        }
    }

    /// Brings the open servers in line with the published checks.
    fn reconcile(&mut self, now: Instant) {
        let want = self.hc.current();
        let gone: Vec<Key> = self
            .open
            .iter()
            .filter(|(k, o)| want.get(*k).is_none_or(|c| c.port != o.port))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(o) = self.open.remove(&k) {
                tracing::info!("Service {}/{}: health check server on port {} closed", k.0, k.1, o.port);
            }
        }
        self.conns.retain(|c| match &c.route {
            Route::Service(k) => want.contains_key(k),
            Route::Proxy => true,
        });
        self.failed.retain(|k, f| want.get(k).is_some_and(|c| c.port == f.port));
        for (k, c) in want.iter() {
            if self.open.contains_key(k) || self.failed.get(k).is_some_and(|f| now < f.retry) {
                continue;
            }
            let mut listeners = Vec::new();
            let mut error = None;
            for ip in &self.hc.addresses {
                let addr = SocketAddr::from((*ip, c.port));
                match listen(addr) {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        error = Some(format!("{addr}: {e}"));
                        break;
                    }
                }
            }
            match error {
                // Closes what was opened: all addresses or none, as kube-proxy does.
                Some(e) => {
                    if self.failed.insert(k.clone(), Failed { port: c.port, retry: now + RETRY }).is_none() {
                        self.counters().bind_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "Service {}/{}: spec.healthCheckNodePort {}: cannot listen on {e}; no health check server for it (trying again every {} s), the others go on",
                            k.0,
                            k.1,
                            c.port,
                            RETRY.as_secs()
                        );
                    }
                }
                None => {
                    let was_failed = self.failed.remove(k).is_some();
                    tracing::info!(
                        "Service {}/{}: health check server on port {} open{} ({} local endpoints)",
                        k.0,
                        k.1,
                        c.port,
                        if was_failed { " after all" } else { "" },
                        c.local_endpoints
                    );
                    self.open.insert(k.clone(), Open { port: c.port, listeners });
                }
            }
        }
        self.counters().open.store(self.open.len() as u64, Ordering::Relaxed);
    }

    /// Accepts what waits on every listener; true if anything was.
    fn accept(&mut self, now: Instant) -> bool {
        let mut any = false;
        let mut take = |l: &TcpListener, route: &Route, conns: &mut Vec<Conn>| {
            while let Ok((stream, _)) = l.accept() {
                any = true;
                if conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                    continue; // dropped: closed at once
                }
                conns.push(Conn { stream, route: route.clone(), buf: Vec::new(), deadline: now + REQUEST_TIMEOUT });
            }
        };
        if let Some(l) = &self.proxy {
            take(l, &Route::Proxy, &mut self.conns);
        }
        for (k, o) in &self.open {
            let route = Route::Service(k.clone());
            for l in &o.listeners {
                take(l, &route, &mut self.conns);
            }
        }
        any
    }

    /// Reads what the connections sent and answers those whose request head is complete;
    /// closes those done, gone or past their deadline. True if any was answered.
    fn progress(&mut self, now: Instant) -> bool {
        if self.conns.is_empty() {
            return false;
        }
        let checks = self.hc.current();
        let proxy = (self.proxy_state)();
        let mut answered = false;
        self.conns.retain_mut(|c| {
            let mut chunk = [0u8; 1024];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return false,
                    Ok(n) => {
                        c.buf.extend_from_slice(&chunk[..n]);
                        if c.buf.len() > MAX_REQUEST {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
            if !c.buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return now < c.deadline;
            }
            let head = String::from_utf8_lossy(&c.buf);
            let mut words = head.split_whitespace();
            let method = words.next().unwrap_or("");
            let path = words.next().unwrap_or("").split('?').next().unwrap_or("");
            let r = answer(&c.route, path, &checks, &proxy, SystemTime::now());
            let _ = c.stream.write_all(r.to_http(method == "HEAD").as_bytes());
            answered = true;
            false
        });
        answered
    }
}

/// The answer of the server `route` to a request for `path`.
fn answer(route: &Route, path: &str, checks: &BTreeMap<Key, Check>, proxy: &ProxyState, now: SystemTime) -> Response {
    match route {
        // kube-proxy's handler is the whole server: every path gets the answer. A Service
        // gone between accept and answer has no local endpoints.
        Route::Service(k) => service_response(k, checks.get(k).map_or(0, |c| c.local_endpoints), proxy.healthy),
        Route::Proxy if path == "/healthz" => healthz_response(proxy, now),
        Route::Proxy if path == "/livez" => livez_response(proxy, now),
        Route::Proxy => Response {
            status: 404,
            headers: vec![
                ("Content-Type", "text/plain; charset=utf-8".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ],
            body: "404 page not found\n".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ClusterState;

    const STATE: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a}
  spec: {podCIDR: 10.244.0.0/24}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.20
    externalTrafficPolicy: Local
    healthCheckNodePort: 32000
    ports:
    - {name: http, port: 80, protocol: TCP, nodePort: 30080}
    - {name: https, port: 443, protocol: TCP, nodePort: 30443}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}, {name: https, port: 8443, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.5], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.0.6], nodeName: node-a}
  - {addresses: [10.244.0.7], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-a}
  - {addresses: [10.244.1.5], conditions: {ready: true}, nodeName: node-b}
- apiVersion: v1
  kind: Service
  metadata: {name: cluster, namespace: shop}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.21
    healthCheckNodePort: 32001
    ports: [{port: 80}]
- apiVersion: v1
  kind: Service
  metadata: {name: np, namespace: shop}
  spec:
    type: NodePort
    clusterIP: 10.96.0.22
    externalTrafficPolicy: Local
    healthCheckNodePort: 32002
    ports: [{port: 80}]
- apiVersion: v1
  kind: Service
  metadata: {name: bad, namespace: shop}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.23
    externalTrafficPolicy: Local
    healthCheckNodePort: 70000
    ports: [{port: 80}]
- apiVersion: v1
  kind: Service
  metadata: {name: empty, namespace: shop}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.24
    externalTrafficPolicy: Local
    healthCheckNodePort: 32004
    ports: [{port: 80}]
"#;

    fn key(ns: &str, n: &str) -> Key {
        (ns.into(), n.into())
    }

    #[test]
    fn only_local_load_balancers_get_a_check_counting_local_ready_addresses_once() {
        let model = Model::from_state(ClusterState::parse(STATE).unwrap());
        let (checks, problems) = desired(&model, "node-a");
        // web: 10.244.0.5 and .6 (ready absent counts as ready), once each though both ports
        // list them; .7 is terminating, not ready; 10.244.1.5 is node-b's.
        assert_eq!(checks.get(&key("shop", "web")), Some(&Check { port: 32000, local_endpoints: 2 }));
        assert_eq!(checks.get(&key("shop", "empty")), Some(&Check { port: 32004, local_endpoints: 0 }));
        assert_eq!(checks.len(), 2, "Cluster policy, NodePort and a bad port get none: {checks:?}");
        assert_eq!(
            problems,
            vec!["Service shop/bad: spec.healthCheckNodePort: 70000 is not a port; no health check server".to_string()]
        );
        let (b, _) = desired(&model, "node-b");
        assert_eq!(b[&key("shop", "web")].local_endpoints, 1);
    }

    #[test]
    fn the_service_answer_is_kube_proxys() {
        let r = service_response(&key("shop", "web"), 2, true);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["localEndpoints"], 2);
        assert!(r.headers.contains(&("Content-Type", "application/json".into())));
        assert!(r.headers.contains(&("X-Content-Type-Options", "nosniff".into())));
        assert!(r.headers.contains(&("X-Load-Balancing-Endpoint-Weight", "2".into())));
        assert_eq!(service_response(&key("shop", "web"), 0, true).status, 503, "no local endpoint");
        let sick = service_response(&key("shop", "web"), 3, false);
        assert_eq!(sick.status, 503, "the proxy is unhealthy");
        assert!(sick.body.contains("\"serviceProxyHealthy\": false"));
        let http = sick.to_http(false);
        assert!(http.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{http}");
        assert!(http.contains(&format!("Content-Length: {}\r\n", sick.body.len())));
        assert!(sick.to_http(true).ends_with("\r\n\r\n"), "HEAD: no body");
    }

    #[test]
    fn healthz_and_livez_are_kube_proxys() {
        let now = UNIX_EPOCH + Duration::from_nanos(1_714_566_896_123_400_000);
        let then = UNIX_EPOCH + Duration::from_secs(1_714_566_800);
        let mut p = ProxyState { healthy: true, why: None, last_updated: then, node_eligible: true };
        let r = healthz_response(&p, now);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            "{\"lastUpdated\": \"2024-05-01 12:34:56.1234 +0000 UTC\",\"currentTime\": \"2024-05-01 12:34:56.1234 +0000 UTC\", \"nodeEligible\": true}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(&r.body).is_ok());
        assert_eq!(livez_response(&p, now).status, 200);
        // Not eligible (being deleted): /healthz fails, /livez does not.
        p.node_eligible = false;
        let r = healthz_response(&p, now);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("\"lastUpdated\": \"2024-05-01 12:33:20 +0000 UTC\""), "{}", r.body);
        assert!(r.body.ends_with("\"nodeEligible\": false}"));
        assert_eq!(livez_response(&p, now).status, 200);
        // Unhealthy: both fail, with the last update's time.
        p.healthy = false;
        let r = livez_response(&p, now);
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            "{\"lastUpdated\": \"2024-05-01 12:33:20 +0000 UTC\",\"currentTime\": \"2024-05-01 12:34:56.1234 +0000 UTC\"}"
        );
        let p = ProxyState { healthy: true, why: None, last_updated: then, node_eligible: true };
        assert_eq!(answer(&Route::Proxy, "/metrics", &BTreeMap::new(), &p, now).status, 404);
        assert_eq!(answer(&Route::Service(key("a", "b")), "/anything", &BTreeMap::new(), &p, now).status, 503);
    }

    #[test]
    fn go_time_prints_go_s_format() {
        assert_eq!(go_time(UNIX_EPOCH), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29 00:00:00 +0000 UTC");
        assert_eq!(
            go_time(UNIX_EPOCH + Duration::new(4_102_444_799, 999_999_999)),
            "2099-12-31 23:59:59.999999999 +0000 UTC"
        );
    }

    #[test]
    fn eligibility_follows_deletion_and_the_autoscaler_taint() {
        use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
        let mut n = Node::default();
        assert!(node_eligible(Some(&n)));
        assert!(!node_eligible(None), "a Node gone");
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(!node_eligible(Some(&n)));
        n.spec = None;
        n.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(!node_eligible(Some(&n)));
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// `GET path` on 127.0.0.1:`port`: status, head and body (status 0: no connection).
    fn get(port: u16, path: &str) -> (u16, String, String) {
        let Ok(mut c) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))
        else {
            return (0, String::new(), String::new());
        };
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        let code = s.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let (head, body) = s.split_once("\r\n\r\n").unwrap_or_default();
        (code, head.to_string(), body.to_string())
    }

    /// Polls `f` every 10 ms for up to 2 s; true once it holds.
    fn soon(mut f: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        f()
    }

    /// The servers follow the published checks: open, answer with the current count, close;
    /// a port already taken is counted once and the others go on; the proxier server answers
    /// /healthz and /livez from the proxy's state.
    #[test]
    fn servers_open_answer_and_close_as_published() {
        let (p1, p2, p3) = (free_port(), free_port(), free_port());
        let counters = Arc::new(Counters::default());
        let hc = Arc::new(HealthChecks::new(
            vec![Ipv4Addr::LOCALHOST],
            Some(SocketAddr::from(([127, 0, 0, 1], p3))),
            counters.clone(),
        ));
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        let proxy = move || ProxyState {
            healthy: h.load(Ordering::Relaxed),
            why: None,
            last_updated: SystemTime::now(),
            node_eligible: true,
        };
        let thread = hc.clone().serve(proxy, stop.clone()).unwrap();
        let web = key("shop", "web");
        let with = |entries: &[(&Key, u16, usize)]| {
            let m: BTreeMap<Key, Check> =
                entries.iter().map(|(k, port, n)| ((*k).clone(), Check { port: *port, local_endpoints: *n })).collect();
            (m, Vec::new())
        };
        hc.publish(with(&[(&web, p1, 2)]));
        assert!(soon(|| get(p1, "/").0 == 200), "web's server did not open");
        let (code, head, body) = get(p1, "/any/path");
        assert_eq!(code, 200);
        assert!(head.contains("X-Load-Balancing-Endpoint-Weight: 2"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["service"]["name"].as_str(), v["localEndpoints"].as_u64()), (Some("web"), Some(2)));
        // The count follows each publish; the proxy's health too.
        hc.publish(with(&[(&web, p1, 0)]));
        assert!(soon(|| get(p1, "/").0 == 503), "no local endpoints: 503");
        hc.publish(with(&[(&web, p1, 1)]));
        assert!(soon(|| get(p1, "/").0 == 200));
        healthy.store(false, Ordering::Relaxed);
        let (code, _, body) = get(p1, "/");
        assert_eq!(code, 503);
        assert!(body.contains("\"serviceProxyHealthy\": false"), "{body}");
        assert_eq!(get(p3, "/healthz").0, 503);
        assert_eq!(get(p3, "/livez").0, 503);
        healthy.store(true, Ordering::Relaxed);
        let (code, head, body) = get(p3, "/healthz?verbose");
        assert_eq!(code, 200, "{body}");
        assert!(
            head.contains("Content-Type: application/json") && body.contains("\"nodeEligible\": true"),
            "{head}{body}"
        );
        assert_eq!(get(p3, "/livez").0, 200);
        assert_eq!(get(p3, "/metrics").0, 404);
        // A second Service whose port is taken: logged and counted once, web goes on.
        let taken = TcpListener::bind(("127.0.0.1", p2)).unwrap();
        let other = key("shop", "other");
        hc.publish(with(&[(&web, p1, 1), (&other, p2, 1)]));
        assert!(soon(|| counters.bind_failures.load(Ordering::Relaxed) == 1));
        assert_eq!(get(p1, "/").0, 200, "web still answers");
        // Retried: once the port is free, the server opens, and the failure was counted once.
        drop(taken);
        assert!(
            soon(|| get(p2, "/").0 == 200) || {
                std::thread::sleep(RETRY);
                get(p2, "/").0 == 200
            }
        );
        assert_eq!(counters.bind_failures.load(Ordering::Relaxed), 1);
        assert_eq!(counters.open.load(Ordering::Relaxed), 2);
        // Gone: closed. Moved: reopened on the new port.
        hc.publish(with(&[(&other, p1, 1)]));
        assert!(soon(|| get(p2, "/").0 == 0), "the old port closes");
        assert!(soon(|| get(p1, "/").2.contains("\"name\": \"other\"")), "other moved to web's old port");
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
        assert_eq!(get(p1, "/").0, 0, "closed on stop");
    }
}
