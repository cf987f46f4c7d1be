//! The takeover's handoff (`xsk::handoff`) between two workers, judged by real kernels: pods
//! (namespaces with their own TCP stacks) on one node stream through worker A; A hands its
//! UMEM and sockets over mid-stream (descriptors passed with `SCM_RIGHTS` over a socket pair,
//! as between two processes) and worker B adopts them. The stream ends intact, B's programs
//! replace A's, and every chunk is accounted for. And a handoff the successor cannot use (its
//! uplink is another interface now) is refused whole: B binds afresh and forwards.

use dataplane::tables::{PortId, Tables};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vxnat_tests::netns::{require_root, tcp_transfer};
use vxnat_tests::pods::{TwoPods, P1, P2, POD2};
use xsk::bpf::{AttachMode, Mode};
use xsk::handoff::{recv_with_fds, send_with_fds, Handoff};
use xsk::worker::{Worker, WorkerConfig};

const UPLINK: PortId = PortId(0);
const NODE_IP: [u8; 4] = [192, 168, 99, 1];

/// Two pods, and an uplink that goes nowhere: a handoff needs one (new sockets share the UMEM
/// through it).
fn setup() -> TwoPods {
    let s = TwoPods::new("h");
    s.node.ip(&["link", "add", "ul", "type", "veth", "peer", "name", "ulpeer"]);
    s.node.ip(&["link", "set", "ul", "up"]);
    s.node.ip(&["link", "set", "ulpeer", "up"]);
    s
}

fn tables(s: &TwoPods) -> Tables {
    s.tables(s.node.mac("ul"))
}

fn config() -> WorkerConfig {
    WorkerConfig { attach: AttachMode::Native, ..WorkerConfig::default() }
}

fn bind_all(w: &mut Worker) {
    w.add_uplink(UPLINK, "ul", NODE_IP, 8472, &[]).expect("bind ul");
    w.add_port(P1, "vxp1", Mode::All, NODE_IP, 8472).expect("bind vxp1");
    w.add_port(P2, "vxp2", Mode::All, NODE_IP, 8472).expect("bind vxp2");
}

fn poll_until(w: &mut Worker, tables: &Tables, stop: &AtomicBool, start: Instant) {
    while !stop.load(Ordering::Relaxed) {
        if w.poll(tables, start.elapsed().as_nanos() as u64) == 0 {
            w.wait(1);
        }
    }
}

/// Worker A on a thread in the node namespace: binds everything, polls until `stop`, then
/// hands over and sends the descriptors on `to`, as a process would on its ctl socket.
fn predecessor(
    s: &TwoPods,
    tables: Arc<Tables>,
    stop: Arc<AtomicBool>,
    to: UnixStream,
) -> std::thread::JoinHandle<usize> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = s.node.spawn(move || {
        let mut w = Worker::new(0, config()).expect("worker A");
        bind_all(&mut w);
        let _ = ready_tx.send(());
        poll_until(&mut w, &tables, &stop, Instant::now());
        let fds = w.hand_off().expect("hand off").into_fds().expect("descriptors");
        send_with_fds(&to, b"{}\n", &fds).expect("send the descriptors");
        fds.len()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("worker A bound its ports");
    h
}

fn receive(from: &UnixStream, count: usize) -> Handoff {
    let (_, fds) = recv_with_fds(from, |_| count).expect("receive the descriptors");
    Handoff::from_fds(fds).expect("a readable handoff")
}

/// Two pods, their tables, worker A running, and the end of the socket pair it hands over on.
#[allow(clippy::type_complexity)]
fn start() -> (TwoPods, Arc<Tables>, UnixStream, Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let s = setup();
    let t = Arc::new(tables(&s));
    let (x, y) = UnixStream::pair().expect("socket pair");
    let stop_a = Arc::new(AtomicBool::new(false));
    let a = predecessor(&s, t.clone(), stop_a.clone(), x);
    (s, t, y, stop_a, a)
}

const WANT: [(PortId, &str, Mode); 3] =
    [(UPLINK, "ul", Mode::Uplink), (P1, "vxp1", Mode::All), (P2, "vxp2", Mode::All)];

#[test]
fn a_successor_takes_the_sockets_over_mid_stream() {
    if !require_root("a_successor_takes_the_sockets_over_mid_stream") {
        return;
    }
    let (s, t, y, stop_a, a) = start();
    std::thread::scope(|sc| {
        let stream = sc.spawn(|| tcp_transfer(&s.pod1, &s.pod2, POD2, 5201, 128 << 20));
        std::thread::sleep(Duration::from_millis(400));

        // Worker B takes over while the stream runs.
        let stop_b = Arc::new(AtomicBool::new(false));
        let (tb, sb) = (t.clone(), stop_b.clone());
        let b = s.node.spawn(move || {
            let h = receive(&y, 2 + 3);
            let mut w = Worker::new(0, config()).expect("worker B");
            let (adopted, _fresh) = w.adopt(h, &WANT, NODE_IP, 8472, &[]).expect("adopt");
            let start = Instant::now();
            poll_until(&mut w, &tb, &sb, start);
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                w.poll(&tb, start.elapsed().as_nanos() as u64);
                std::thread::sleep(Duration::from_millis(5));
            }
            let exits: Vec<bool> =
                [UPLINK, P1, P2].iter().map(|p| w.xdp_exits(*p).is_some_and(|e| e.is_ok())).collect();
            (adopted, w.account(), exits, w.io.programs_not_replaced)
        });
        assert!(!stream.is_finished(), "the stream ended before the handoff: nothing crossed it");
        stop_a.store(true, Ordering::Relaxed);
        let sent = a.join().expect("worker A");
        let streamed = stream.join().expect("stream");
        stop_b.store(true, Ordering::Relaxed);
        let (adopted, account, exits, not_replaced) = b.join().expect("worker B");
        assert_eq!(sent, 5, "the metadata, the UMEM and three sockets");
        assert_eq!(adopted, vec![UPLINK, P1, P2], "every socket taken over");
        streamed.expect("the stream crossed the handoff intact");
        assert!(account.balanced(), "every chunk accounted for after the handoff: {account:?}");
        assert_eq!(account.total, WorkerConfig::default().frames, "the predecessor's UMEM, whole");
        assert_eq!((exits, not_replaced), (vec![true; 3], 0), "B's programs replaced A's");
    });
}

#[test]
fn a_handoff_the_successor_cannot_use_is_refused_whole_and_it_binds_afresh() {
    if !require_root("a_handoff_the_successor_cannot_use_is_refused_whole_and_it_binds_afresh") {
        return;
    }
    let (s, t, y, stop_a, a) = start();
    stop_a.store(true, Ordering::Relaxed);
    assert_eq!(a.join().expect("worker A"), 5);
    let stop_b = Arc::new(AtomicBool::new(false));
    let (tb, sb) = (t.clone(), stop_b.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let b = s.node.spawn(move || {
        let h = receive(&y, 2 + 3);
        let mut w = Worker::new(0, config()).expect("worker B");
        // The uplink is another interface now: nothing can share the UMEM, so nothing is taken.
        let want = [(UPLINK, "eth9", Mode::Uplink), (P1, "vxp1", Mode::All), (P2, "vxp2", Mode::All)];
        let refused = w.adopt(h, &want, NODE_IP, 8472, &[]).map(|(p, _)| p).expect_err("refused");
        assert_eq!(w.port_count(), 0, "nothing half-taken");
        // The handoff's sockets are closed: the queues come free and bind again.
        bind_all(&mut w);
        let _ = ready_tx.send(refused);
        poll_until(&mut w, &tb, &sb, Instant::now());
        w.account()
    });
    let refused = ready_rx.recv_timeout(Duration::from_secs(10)).expect("worker B bound afresh");
    assert!(refused.contains("uplink"), "{refused}");
    let ping = s.pod1.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.244.0.3"]);
    stop_b.store(true, Ordering::Relaxed);
    let account = b.join().expect("worker B");
    assert!(ping.status.success(), "pod1 -> pod2 through B: {}", String::from_utf8_lossy(&ping.stdout));
    assert!(account.balanced(), "{account:?}");
}
