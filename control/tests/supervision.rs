//! Supervision of `vxnat run` (issue 17), on real nodes in network namespaces (the demo cluster
//! of `common`): a worker that dies ends the process at once, non-zero and saying why; the
//! health probes follow the worker's heartbeat; a dead cluster source is reported and
//! restarted; a second daemon with the same socket refuses to start; an attach the worker did
//! not answer in time never takes effect later. Faults are injected with the hidden `vxnat ctl
//! fault`, compiled into the daemon only for tests (cargo feature `fault-injection`).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vxnat_tests::netns::require_root;

/// `GET path` from inside the node's namespace: the status code and the body.
fn get(n: &NodeNs, addr: &'static str, path: &'static str) -> (u16, String) {
    n.ns.spawn(move || {
        let Ok(mut c) = TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(3)) else {
            return (0, "connection refused".to_string());
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).expect("send");
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        let code = s.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, s.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    })
    .join()
    .expect("GET")
}

fn log(n: &NodeNs) -> String {
    std::fs::read_to_string(&n.log).unwrap_or_default()
}

fn fault(n: &NodeNs, what: &str, ms: u64) {
    n.ctl(&["fault", what, "--ms", &ms.to_string()]).unwrap_or_else(|e| panic!("fault {what}: {e}"));
}

fn xdp_on(n: &NodeNs, ifname: &str) -> bool {
    String::from_utf8_lossy(&n.ns.ip(&["link", "show", ifname]).stdout).contains("xdp")
}

#[test]
fn a_worker_panic_ends_vxnat_non_zero_within_a_second_naming_it_and_a_restart_recovers() {
    if !require_root("a_worker_panic_ends_vxnat_non_zero_within_a_second_naming_it_and_a_restart_recovers") {
        return;
    }
    let mut c = cluster();
    let b1 = c.pods[2].ip;
    assert!(ping(&c.pods[0].ns, b1), "a1 -> b1 before");
    fault(&c.nodes[0], "worker-panic", 0);
    let injected = Instant::now();
    let daemon = c.nodes[0].daemon.as_mut().expect("running");
    let mut status = None;
    while status.is_none() && injected.elapsed() < Duration::from_secs(3) {
        status = daemon.try_wait().expect("wait");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = injected.elapsed();
    let status =
        status.unwrap_or_else(|| panic!("vxnat still runs 3 s after its worker panicked:\n{}", log(&c.nodes[0])));
    println!("worker panic to process exit: {took:?} ({status})");
    assert!(!status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(1), "exited after {took:?}");
    let text = log(&c.nodes[0]);
    assert!(
        text.contains("worker died: the worker thread panicked: fault injection: the worker panics"),
        "the log does not say why:\n{text}"
    );
    // It cleaned up as on SIGTERM, so what restarts it (the DaemonSet) starts clean.
    assert!(!c.nodes[0].socket.exists(), "ctl socket left behind");
    assert!(!xdp_on(&c.nodes[0], "ul"), "XDP left on the uplink");
    c.nodes[0].daemon = None;
    c.nodes[0].start();
    let ports = c.nodes[0].ctl(&["ports"]).expect("ports");
    assert!(ports.contains("vxa1") && ports.contains("vxa2"), "pods not re-attached after the restart: {ports}");
    assert!(ping(&c.pods[0].ns, b1), "a1 -> b1 after the restart");
}

#[test]
fn healthz_and_readyz_answer_200_and_healthz_fails_while_the_worker_stalls() {
    if !require_root("healthz_and_readyz_answer_200_and_healthz_fails_while_the_worker_stalls") {
        return;
    }
    let c = cluster();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    for n in [a, b] {
        for addr in ["127.0.0.1:9479", "127.0.0.1:9478"] {
            for path in ["/healthz", "/readyz"] {
                let (code, body) = get(n, addr, path);
                assert_eq!(code, 200, "{} {addr}{path}: {body}", n.name);
                assert!(body.starts_with("ok"), "{body}");
            }
        }
    }
    let (code, _) = get(a, "127.0.0.1:9479", "/metrics");
    assert_eq!(code, 404, "the health address serves only the probes");
    let metrics = get(a, "127.0.0.1:9478", "/metrics").1;
    assert!(metrics.contains("vxnat_worker_heartbeat_age_seconds "), "{metrics}");
    assert!(metrics.contains("vxnat_source_up 1"), "{metrics}");
    // The worker stalls for 3 s: liveness and readiness fail within the 1 s limit (and a
    // little), with the reason; the other node is untouched; both recover once it passes again.
    fault(a, "worker-stall", 3000);
    let stalled = Instant::now();
    let mut seen = (0, String::new());
    assert!(
        within(Duration::from_millis(1800), || {
            seen = get(a, "127.0.0.1:9479", "/healthz");
            seen.0 == 503
        }),
        "/healthz still {seen:?} {:?} into a stall",
        stalled.elapsed()
    );
    println!("/healthz 503 {:?} into the stall: {}", stalled.elapsed(), seen.1.trim());
    assert!(seen.1.contains("stalled"), "{}", seen.1);
    let (code, body) = get(a, "127.0.0.1:9479", "/readyz");
    assert_eq!(code, 503, "/readyz during the stall: {body}");
    assert_eq!(get(b, "127.0.0.1:9479", "/healthz").0, 200, "node B is not stalled");
    assert!(within(Duration::from_secs(4), || get(a, "127.0.0.1:9479", "/healthz").0 == 200), "no recovery");
    assert_eq!(get(a, "127.0.0.1:9479", "/readyz").0, 200);
    assert!(a.daemon.is_some() && a.ctl(&["ports"]).is_ok(), "a stall does not end the process");
    assert!(log(a).contains("it is stalled"), "{}", log(a));
    assert!(ping(&c.pods[0].ns, c.pods[2].ip), "a1 -> b1 after the stall");
}

#[test]
fn a_dead_state_source_is_reported_and_restarted() {
    if !require_root("a_dead_state_source_is_reported_and_restarted") {
        return;
    }
    let c = cluster();
    let a = &c.nodes[0];
    fault(a, "source-panic", 0);
    // Reported: an error naming the source and why, counted in ctl stats and metrics.
    assert!(
        within(Duration::from_secs(3), || log(a).contains("cluster source (state file ")),
        "no report:\n{}",
        log(a)
    );
    let text = log(a);
    assert!(
        text.contains("died: its thread panicked: fault injection: the cluster source panics; restarting it in 1s"),
        "{text}"
    );
    // Restarted after its 1 s backoff.
    assert!(within(Duration::from_secs(3), || log(a).contains("restarted (it has died 1 times)")), "{}", log(a));
    let stats = a.stats_json();
    assert_eq!(stats["source"]["failures"], 1, "{}", stats["source"]);
    assert_eq!(stats["source"]["up"], true, "{}", stats["source"]);
    let text = a.ctl(&["stats"]).expect("stats");
    assert!(text.contains("cluster source state file") && text.contains("died 1 times"), "{text}");
    let metrics = get(a, "127.0.0.1:9478", "/metrics").1;
    assert!(metrics.contains("vxnat_source_failures_total 1"), "{metrics}");
    assert_eq!(get(a, "127.0.0.1:9479", "/readyz").0, 200, "ready again");
    // And it follows the file again: a new Service makes new tables.
    let generation = |n: &NodeNs| n.stats_json()["worker"]["tables_generation"].as_u64().unwrap_or(0);
    let before = generation(a);
    let state = c._dir.0.join("cluster.yaml");
    let mut text = std::fs::read_to_string(&state).expect("state");
    text.push_str(
        "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: default}\nspec:\n  clusterIP: 10.96.0.77\n  ports: [{port: 80, targetPort: 8080, protocol: TCP}]\n",
    );
    std::fs::write(&state, text).expect("write state");
    assert!(within(Duration::from_secs(3), || generation(a) > before), "the restarted source missed a change");
}

/// With `handover = false` a second `vxnat run` refuses to start (with handovers on, the
/// default, it takes over instead: `restart.rs`); either way it never tears the first down.
#[test]
fn a_second_vxnat_with_the_same_socket_refuses_to_start_and_the_first_keeps_working() {
    if !require_root("a_second_vxnat_with_the_same_socket_refuses_to_start_and_the_first_keeps_working") {
        return;
    }
    let c = cluster_with_config("", "handover = false\n");
    let a = &c.nodes[0];
    let mut second = Command::new("ip")
        .args(["netns", "exec", &a.ns.name, BIN, "run", "--config"])
        .arg(&a.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a second vxnat");
    let started = Instant::now();
    let mut status = None;
    while status.is_none() && started.elapsed() < Duration::from_secs(10) {
        status = second.try_wait().expect("wait");
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("the second vxnat is still running");
    };
    let mut err = String::new();
    let _ = second.stderr.take().expect("stderr").read_to_string(&mut err);
    println!("second vxnat: {status}: {}", err.trim());
    assert!(!status.success(), "{status}");
    let lock = format!("{}.lock", a.socket.display());
    assert!(err.contains(&lock), "the message does not name the lock {lock}: {err}");
    assert!(err.contains(&format!("locked by another vxnat (pid {})", a.pid())), "{err}");
    // The first one lost nothing: its socket, its programs, its pods, its traffic.
    let ports = a.ctl(&["ports"]).expect("the first still answers");
    assert!(ports.contains("vxa1") && ports.contains("vxa2"), "{ports}");
    assert!(xdp_on(a, "ul") && xdp_on(a, "vxa1"), "the second tore down the first's XDP");
    assert!(ping(&c.pods[0].ns, c.pods[2].ip), "a1 -> b1");
    assert!(ping(&c.nodes[0].ns, c.pods[0].ip), "node A -> a1 through the host port");
}

#[test]
fn an_attach_the_worker_did_not_answer_in_time_never_takes_effect() {
    if !require_root("an_attach_the_worker_did_not_answer_in_time_never_takes_effect") {
        return;
    }
    let c = cluster();
    let a = &c.nodes[0];
    let ip = Ipv4Addr::new(10, 244, 0, 4);
    let pod = make_pod(&a.ns, "vxa3", ip);
    // The control thread waits 500 ms instead of 10 s; the worker stalls for 2.5 s.
    fault(a, "worker-wait", 500);
    let stalled = Instant::now();
    fault(a, "worker-stall", 2500);
    let t0 = Instant::now();
    let err = a.ctl(&["attach", "--ifname", "vxa3", "--ip", &ip.to_string()]).expect_err("attach during a stall");
    assert!(err.contains("withdrawn and will not take effect"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2), "answered after {:?}", t0.elapsed());
    // Once the worker has worked through its queue (stats is answered behind the withdrawn
    // attach: commands keep their order), the attach has not happened behind our back.
    let s = a.stats_json();
    assert!(stalled.elapsed() >= Duration::from_millis(2500), "stats answered during the stall");
    assert_eq!(s["worker"]["umem_balanced"], true, "{}", s["worker"]);
    assert!(!xdp_on(a, "vxa3"), "the withdrawn attach bound the port later");
    let ports = a.ctl(&["ports"]).expect("ports");
    assert!(!ports.contains("vxa3"), "{ports}");
    // Asked again with the worker answering, it works (on the port number the withdrawn one
    // was given: the worker never bound it).
    fault(a, "worker-wait", 10_000);
    a.ctl(&["attach", "--ifname", "vxa3", "--ip", &ip.to_string()]).expect("attach");
    assert!(xdp_on(a, "vxa3"));
    assert!(ping(&pod.ns, c.pods[2].ip), "the new pod reaches b1");
}
