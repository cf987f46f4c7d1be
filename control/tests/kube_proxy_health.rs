//! kube-proxy's health servers on real nodes (issue 18, "Health servers"), in the demo cluster
//! of `common` (two nodes in network namespaces, a client on the underlay): a LoadBalancer
//! Service with `externalTrafficPolicy: Local` gets a server on its `healthCheckNodePort` on
//! each node's address, answering as kube-proxy does from the node's local ready endpoints;
//! `:10256/healthz` and `/livez` follow the worker. Probed from the client, as a cloud load
//! balancer probes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use vxnat_tests::netns::{require_root, Netns};

const HC_PORT: u16 = 32100;

/// The Service and its slice: one ready endpoint on node-a (pod a1), one on node-b that is
/// terminating (not ready, so not counted).
const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: lb-local, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.90
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-local-1, namespace: default, labels: {kubernetes.io/service-name: lb-local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.2], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.1.2], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-b}
"#;
const A_ENDPOINT: &str = "- {addresses: [10.244.0.2], conditions: {ready: true}, nodeName: node-a}\n";

/// `GET path` on `ip:port` from `from`: status (0: no connection), head and body.
fn get(from: &Netns, ip: &'static str, port: u16, path: &'static str) -> (u16, String, String) {
    from.spawn(move || {
        let addr = format!("{ip}:{port}").parse().expect("addr");
        let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return (0, String::new(), String::new());
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = c.write_all(format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nUser-Agent: lb-probe\r\n\r\n").as_bytes());
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        let code = s.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let (head, body) = s.split_once("\r\n\r\n").unwrap_or_default();
        (code, head.to_string(), body.to_string())
    })
    .join()
    .expect("GET")
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[test]
fn health_check_node_ports_and_healthz_answer_as_kube_proxy() {
    if !require_root("health_check_node_ports_and_healthz_answer_as_kube_proxy") {
        return;
    }
    let t0 = Instant::now();
    let c = cluster_with(SERVICE);
    let (a, client) = (&c.nodes[0], &c.client);
    let state = c._dir.0.join("cluster.yaml");
    let full = std::fs::read_to_string(&state).expect("state");
    let up = t0.elapsed();

    // The servers start right after ctl answers: give them a moment.
    for (ip, port) in [("192.168.77.1", HC_PORT), ("192.168.77.2", HC_PORT), ("192.168.77.1", 10256)] {
        assert!(within(Duration::from_secs(2), || get(client, ip, port, "/").0 != 0), "nothing on {ip}:{port}");
    }
    // node-a has a ready local endpoint: 200 and kube-proxy's body and headers.
    let (code, head, body) = get(client, "192.168.77.1", HC_PORT, "/");
    assert_eq!(code, 200, "node-a {head}\n{body}");
    for h in
        ["Content-Type: application/json", "X-Content-Type-Options: nosniff", "X-Load-Balancing-Endpoint-Weight: 1"]
    {
        assert!(head.contains(h), "no {h}: {head}");
    }
    let v = json(&body);
    assert_eq!(v["service"]["namespace"], "default");
    assert_eq!(v["service"]["name"], "lb-local");
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["serviceProxyHealthy"], true);
    // node-b's endpoint is terminating, not ready: 503.
    let (code, head, body) = get(client, "192.168.77.2", HC_PORT, "/");
    assert_eq!(code, 503, "node-b {head}\n{body}");
    assert_eq!(json(&body)["localEndpoints"], 0);
    assert!(head.contains("X-Load-Balancing-Endpoint-Weight: 0"), "{head}");

    // The proxier health server on 0.0.0.0:10256, reached on the node's address.
    for path in ["/healthz", "/livez"] {
        let (code, head, body) = get(client, "192.168.77.1", 10256, path);
        assert_eq!(code, 200, "{path}: {head}\n{body}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let v = json(&body);
        assert!(v["lastUpdated"].as_str().is_some_and(|t| t.ends_with(" +0000 UTC")), "{body}");
        assert!(v["currentTime"].is_string(), "{body}");
        assert_eq!(v.get("nodeEligible").and_then(|e| e.as_bool()), (path == "/healthz").then_some(true), "{body}");
    }

    // The worker stalls for 2 s: /healthz and /livez fail within the heartbeat's 1 s limit
    // (and a probe's time), the Service's check reports the proxy unhealthy, and all recover.
    a.ctl(&["fault", "worker-stall", "--ms", "2000"]).expect("fault");
    let stalled = Instant::now();
    assert!(
        within(Duration::from_millis(1800), || get(client, "192.168.77.1", 10256, "/healthz").0 == 503),
        "/healthz not 503 {:?} into a stall",
        stalled.elapsed()
    );
    let seen = stalled.elapsed();
    let (code, _, body) = get(client, "192.168.77.1", 10256, "/livez");
    assert_eq!(code, 503, "/livez during the stall: {body}");
    let (code, _, body) = get(client, "192.168.77.1", HC_PORT, "/");
    assert_eq!(code, 503, "the Service's check during the stall: {body}");
    assert_eq!(
        (json(&body)["localEndpoints"].as_u64(), json(&body)["serviceProxyHealthy"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(get(client, "192.168.77.2", 10256, "/healthz").0, 200, "node-b is not stalled");
    assert!(within(Duration::from_secs(3), || get(client, "192.168.77.1", 10256, "/healthz").0 == 200), "no recovery");
    assert_eq!(get(client, "192.168.77.1", HC_PORT, "/").0, 200);

    // node-a's endpoint leaves the slice: its check answers 503 once the change is in.
    let changed = Instant::now();
    std::fs::write(&state, full.replace(A_ENDPOINT, "")).expect("write state");
    assert!(
        within(Duration::from_secs(2), || get(client, "192.168.77.1", HC_PORT, "/").0 == 503),
        "node-a still 200 after its endpoint left"
    );
    let followed = changed.elapsed();
    let (_, _, body) = get(client, "192.168.77.1", HC_PORT, "/");
    assert_eq!(json(&body)["localEndpoints"], 0, "{body}");
    assert_eq!(get(client, "192.168.77.1", 10256, "/healthz").0, 200, "the change reached the worker");

    // The Service goes: its server closes on both nodes.
    let base = full.split("\n---\n").next().expect("demo state").to_string();
    std::fs::write(&state, base).expect("write state");
    for ip in ["192.168.77.1", "192.168.77.2"] {
        assert!(
            within(Duration::from_secs(2), || get(client, ip, HC_PORT, "/").0 == 0),
            "{ip}: still serving {HC_PORT}"
        );
    }
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(log.contains("Service default/lb-local: health check server on port 32100 open"), "{log}");
    assert!(log.contains("Service default/lb-local: health check server on port 32100 closed"), "{log}");
    println!(
        "cluster up {up:?}; /healthz 503 {seen:?} into a stall; endpoint removal seen by the check in {followed:?}; whole test {:?}",
        t0.elapsed()
    );
}

/// A healthCheckNodePort already taken on the node: logged naming the Service and the port,
/// counted, and the other Services' checks go on.
#[test]
fn a_taken_health_check_port_is_named_counted_and_the_rest_go_on() {
    if !require_root("a_taken_health_check_port_is_named_counted_and_the_rest_go_on") {
        return;
    }
    let other = SERVICE
        .replace("lb-local", "lb-other")
        .replace("10.96.0.90", "10.96.0.91")
        .replace("32100", "32101")
        .replace("30090", "30091");
    let c = cluster_with(&format!("{SERVICE}---\n{other}"));
    let (a, client) = (&c.nodes[0], &c.client);
    assert!(within(Duration::from_secs(2), || get(client, "192.168.77.1", 32101, "/").0 == 200), "lb-other's check");
    let state = c._dir.0.join("cluster.yaml");
    let full = std::fs::read_to_string(&state).expect("state");
    // Something else takes 32102 on node-a; lb-other moves there.
    let squatter = a.ns.spawn(|| std::net::TcpListener::bind("192.168.77.1:32102").expect("squat"));
    let squatter = squatter.join().expect("squatter");
    std::fs::write(&state, full.replace("healthCheckNodePort: 32101", "healthCheckNodePort: 32102")).expect("state");
    let metric = || {
        let (_, _, m) = get(&a.ns, "127.0.0.1", 9478, "/metrics");
        m.lines().find_map(|l| l.strip_prefix("vxnat_healthcheck_bind_failures_total ").map(str::to_string))
    };
    assert!(within(Duration::from_secs(2), || metric().as_deref() == Some("1")), "not counted: {:?}", metric());
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(
        log.contains("Service default/lb-other: spec.healthCheckNodePort 32102: cannot listen on 192.168.77.1:32102"),
        "{log}"
    );
    assert_eq!(get(client, "192.168.77.1", 32100, "/").0, 200, "lb-local's check goes on");
    assert_eq!(get(client, "192.168.77.1", 32101, "/").0, 0, "lb-other's old port closed");
    assert!(
        within(Duration::from_secs(2), || get(client, "192.168.77.2", 32102, "/").0 == 503),
        "node-b did not bind lb-other's new port"
    );
    // Freed: the retry binds it, still counted once.
    drop(squatter);
    assert!(within(Duration::from_secs(3), || get(client, "192.168.77.1", 32102, "/").0 == 200), "not retried");
    assert_eq!(metric().as_deref(), Some("1"));
}
