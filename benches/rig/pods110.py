#!/usr/bin/env python3
"""110 active pods on one node (issue 13): vxnat against the kernel path, aggregate pps and CPU.

Topology (overlay_udp.Topology, with rig.py's underlay switch): two nodes on a bridge "switch"
(MTU 1500); node A has --pods pods (default 110, kubelet's default maxPods), node B has
--receivers pods (default 1). Pods are veths with MTU 1450, set up as each path's existing rig
does:
  kernel: flannel.1 (VNI 1, port 8472, nolearning, neighbour + FDB entries, onlink route) and a
          cni0 bridge on both nodes; pods on cni0 as flannel's bridge CNI plugs them (/24,
          default via cni0);
  vxnat:  `vxnat run` on both nodes (configs/demo-cluster.yaml, default node.toml, so
          max_pods = 110), pods /32 with the gateway on-link, attached with `vxnat ctl attach`.

Senders: not one process per pod. --senders processes (default 1, as rig.py runs trafgen with
-P 1), each pinned to a CPU (sender k on CPU k), enter the pod namespaces of their share of the
pods once (setns) and open an AF_PACKET socket on each pod's eth0; then, for --seconds, they
go round the pods in turn, each time handing a pod's socket a burst of --burst identical 64-byte
UDP frames (pod -> its receiver on B, port 9) in one sendmmsg(2). So every pod has frames in
flight every few milliseconds, all 110 at the same time at that time scale, and the sender
costs what trafgen costs per frame (one skb per frame, one system call per burst), not a
process wake-up per frame: with 2 cores, 110 rate-limited trafgen processes would measure the
scheduler. The senders offer more than either dataplane carries (see `offered kpps`): the
figure is what the dataplane delivers, with the sender's CPU counted like everything else.

Measured per repetition (a fresh topology each time, paths alternating kernel, vxnat, vxnat,
kernel, ... as rig.py does):
  - packets/s received: the receivers' eth0 rx_packets (/sys, in their namespaces), over the
    senders' own sending time;
  - senders through: how many of node A's pods had at least one packet counted at the
    receiver (an nftables dynamic set with a counter per source address, in each receiver's
    namespace, prerouting);
  - busy CPU-seconds per million packets received: the whole machine's /proc/stat (everything
    but idle and iowait), as rig.py counts it, from "go" to 0.3 s after the last frame (not the
    senders' exit: closing 110 packet sockets waits in synchronize_net() for seconds);
  - vxnat: `vxnat ctl --socket S --json stats` on both nodes before and after the measurement
    (xsk_* drops, fill_starved, every drop by name, over the measurement and since the node
    started; UMEM accounting) and node A's vxnat RSS; the raw stats are kept.
The machine may be shared: before each measurement the run waits (up to --quiet-wait s) for the
machine's busy CPU to fall under --quiet-cpu, and records it, the CPU used by processes outside
the rig during the measurement, and the busy CPU in the second after it; a repetition where any
is above --quiet-cpu is measured again (up to --retries times) and, if still busy, marked and
left out of the medians when clean repetitions exist. The vxnat binary is copied first, so a
rebuild during the run does not change it.

Usage (root, after `cargo build --release -p vxnat-control`):
  python3 benches/rig/pods110.py [--seconds 5] [--reps 3] [--pods 110] [--receivers 1]
                                 [--senders 1] [--burst 8] [--rate 0] [--out target/rig/pods110]
                                 [--bin target/release/vxnat] [--quiet-cpu 0.15] [--quiet-wait 120] [--retries 2]
"""
import argparse, atexit, hashlib, json, os, select, shutil, statistics, subprocess, sys, tempfile, time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlay_udp as topo  # noqa: E402  (the shared topology pieces)

NFT_TABLE = "pods110"
NFT_RULES = """table ip %s {
 set src { type ipv4_addr; size 1024; flags dynamic; counter; }
 chain pre {
  type filter hook prerouting priority -300; policy accept;
  udp dport 9 update @src { ip saddr }
 }
}
""" % NFT_TABLE

SENDER = r"""
import ctypes, json, os, socket, struct, sys, time
spec = json.load(open(sys.argv[1]))
os.sched_setaffinity(0, {spec["cpu"]})
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def frame(da, sa, src, dst):
    # Ethernet + IPv4 (DF, TTL 64) + UDP 4000 -> 9, padded with 'A' to spec["size"] bytes (no FCS).
    payload = b"A" * max(spec["size"] - 42, 0)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", 4000, 9, ulen, 0) + payload
    c = csum(s + d + struct.pack("!BBH", 0, 17, ulen) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, s, d)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return da + sa + b"\x08\x00" + ip + udp

class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]

class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]

assert ctypes.sizeof(mmsghdr) == 64
sendmmsg = libc.sendmmsg
sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
sendmmsg.restype = ctypes.c_int
home = os.open("/proc/self/ns/net", os.O_RDONLY)
keep, fds, vecs = [], [], []
burst = spec["burst"]
for p in spec["pods"]:
    fd = os.open("/var/run/netns/" + p["ns"], os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        sys.exit("setns %s: errno %d" % (p["ns"], ctypes.get_errno()))
    os.close(fd)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends only
    s.bind(("eth0", 0))
    f = frame(bytes.fromhex(p["gw"].replace(":", "")), s.getsockname()[4], p["src"], p["dst"])
    buf = ctypes.create_string_buffer(f, len(f))
    iov = iovec(ctypes.addressof(buf), len(f))
    msgs = (mmsghdr * burst)()
    for m in msgs:
        m.hdr.iov = ctypes.pointer(iov)
        m.hdr.iovlen = 1
    keep.append((s, buf, iov, msgs))
    fds.append(s.fileno())
    vecs.append(ctypes.addressof(msgs))
if libc.setns(home, CLONE_NEWNET) != 0:
    sys.exit("setns back: errno %d" % ctypes.get_errno())
n = len(fds)
for i in range(n):  # warm-up: one frame per pod (bridge learning, neighbours)
    sendmmsg(fds[i], vecs[i], 1, 0)
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
sent, errors = [0] * n, 0
# --rate: this sender's share, paced per round of the pods (0: as fast as it can).
interval = n * burst / spec["rate"] if spec["rate"] > 0 else 0.0
t0 = time.monotonic()
end = t0 + spec["seconds"]
due = t0
while True:
    for i in range(n):
        r = sendmmsg(fds[i], vecs[i], burst, 0)
        if r > 0:
            sent[i] += r
        else:
            errors += 1
    now = time.monotonic()
    if now >= end:
        break
    if interval:
        due += interval
        if due > now:
            time.sleep(min(due - now, end - now))
print(json.dumps({"sent": sent, "elapsed": time.monotonic() - t0, "errors": errors}), flush=True)
"""

class Pods(topo.Topology):
    """overlay_udp's two nodes on rig.py's switch, with many pods on node A."""

    def __init__(self, kind, tag, pods, receivers):
        super().__init__(kind, tag)
        self.npods, self.nrecv = pods, receivers
        if pods > 110:
            self.extra_config = f"max_pods = {pods}\n"

    def build(self):
        self.switch = self.ns("sw")
        self.node = {n: self.ns(f"node{n}") for n in "ab"}
        self.pod = {n: self.ns(f"pod{n}") for n in "ab"}
        self.build_switch(((self.node["a"], "pa", "ul"), (self.node["b"], "pb", "ul")))
        # Both nodes' datapaths and the first pod on each (10.244.0.2, 10.244.1.2).
        getattr(self, f"build_{self.kind}")()
        first = {"kernel": "vethpod", "vxnat": "vxpod"}[self.kind]
        self.senders = [(self.pod["a"], first, topo.POD["a"])]
        self.receivers = [(self.pod["b"], first, topo.POD["b"])]
        for n, count, into in (("a", self.npods, self.senders), ("b", self.nrecv, self.receivers)):
            for i in range(1, count):
                pod_ns, host_if, addr = self.ns(f"{n}{i}"), f"vp{i}", f"10.244.{topo.NET[n]}.{2 + i}"
                if self.kind == "kernel":
                    self.add_kernel_pod(n, pod_ns, host_if, addr)
                else:
                    self.add_vxnat_pod(n, pod_ns, host_if, addr)
                    topo.sh(topo.BIN, "ctl", "--socket", self.socket(n), "attach", "--ifname", host_if, "--ip", addr)
                into.append((pod_ns, host_if, addr))
        # The gateway MAC each pod addresses: cni0's (kernel), its veth's host end (vxnat).
        links = {l["ifname"]: l.get("address") for l in json.loads(topo.sh("ip", "-n", self.node["a"], "-j", "link", "show"))}
        self.gw = [links["cni0"] if self.kind == "kernel" else links[h] for _, h, _ in self.senders]
        for ns, _, _ in self.receivers:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=NFT_RULES, text=True, check=True,
                           capture_output=True, timeout=30)

    def socket(self, n):
        return os.path.join(self.work, f"node-{n}.sock")

    def vxnat_pid(self, n):
        """`ip netns exec` execs the program, so the Popen's pid is vxnat's (checked)."""
        pid = self.procs["ab".index(n)].pid
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().strip() == "vxnat" else None


def busy_rate(window):
    b0, hz = topo.cpu_busy()
    time.sleep(window)
    b1, _ = topo.cpu_busy()
    return (b1 - b0) / hz / window


def others_cpu():
    """CPU-seconds used so far by processes outside this rig: every user process that is not this
    script or one of its descendants, with the time of its reaped children (cutime, cstime), so
    a short-lived compiler that exits during the window still counts through its parent. Kernel
    threads are left out (the rig's own softirq work may run in ksoftirqd)."""
    me, hz = os.getpid(), os.sysconf("SC_CLK_TCK")
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        if int(fields[6]) & 0x00200000:  # PF_KTHREAD
            continue
        parent[int(d)] = int(fields[1])
        ticks[int(d)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    mine = {}

    def is_mine(pid):
        seen = []
        while pid > 1 and pid not in mine:
            if pid == me:
                mine[pid] = True
                break
            seen.append(pid)
            pid = parent.get(pid, 0)
        verdict = mine.get(pid, False)
        for q in seen:
            mine[q] = verdict
        return verdict

    return sum(t for pid, t in ticks.items() if not is_mine(pid)) / hz


def wait_quiet(limit_cpu, max_wait):
    """Waits (at most max_wait s) for the machine's busy CPU to fall under limit_cpu (CPU-s/s):
    the previous topology's namespaces are cleaned up by the kernel in the background, and
    other work may share the machine. Returns the last measured background rate."""
    deadline = time.time() + max_wait
    for waited in range(int(max_wait) + 2):  # one-second samples
        r = busy_rate(1.0)
        if r <= limit_cpu or time.time() >= deadline:
            break
        if waited % 15 == 0:
            print(f"   waiting for a quiet machine: background {r:.2f} CPU-s/s", flush=True)
    return r


def rx_total(t):
    return sum(topo.counter(ns, "eth0", "rx_packets") for ns, _, _ in t.receivers)


def per_source(t):
    counts = {}
    for ns, _, _ in t.receivers:
        out = json.loads(topo.sh("ip", "netns", "exec", ns, "nft", "-j", "list", "set", "ip", NFT_TABLE, "src", timeout=30))
        for item in out["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                el = e["elem"]
                counts[el["val"]] = counts.get(el["val"], 0) + el["counter"]["packets"]
    return counts


def read_line(p, deadline):
    while time.time() < deadline:
        r, _, _ = select.select([p.stdout], [], [], max(0.0, min(1.0, deadline - time.time())))
        if r:
            return p.stdout.readline()
        if p.poll() is not None:
            return ""
    return ""


def vxnat_stats(t):
    """Both nodes' `vxnat ctl --json stats` (None for a node that did not answer)."""
    out = {}
    for n in "ab":
        r = subprocess.run([topo.BIN, "ctl", "--socket", t.socket(n), "--json", "stats"], capture_output=True, text=True, timeout=30)
        try:
            out[n] = json.loads(r.stdout)
        except ValueError:
            out[n] = {"error": (r.stderr or r.stdout).strip()}
    return out


def port_counters(s):
    """Per port name: (rx_packets, fill_starved, {drop name: count})."""
    names = {x["port"]: x["name"] for x in s.get("names", [])}
    return {str(names.get(p["port"], p["port"])): (p.get("rx_packets", 0), p.get("fill_starved", 0), {d[0]: d[1] for d in p.get("drops", [])})
            for p in s.get("worker", {}).get("ports", [])}


def vxnat_report(t, before, after):
    """What changed in both nodes' stats over the measurement: xsk_* drops (kernel drops after the
    XDP redirect), fill starvation (a port below its guaranteed minimum with no free chunk),
    every drop by name, pod ports that received; and the UMEM accounting and node A's vxnat
    RSS at the end. The raw `stats` after the measurement are kept."""
    out = {}
    for n in "ab":
        s0, s1 = before.get(n, {}), after.get(n, {})
        if "worker" not in s1 or "worker" not in s0:
            out[n] = {"error": s1.get("error") or s0.get("error")}
            continue
        c0, c1 = port_counters(s0), port_counters(s1)
        drops, xsk, starved_ports, pods_rx = {}, {}, {}, 0
        for name, (rx, starved, d1) in c1.items():
            rx0, starved0, d0 = c0.get(name, (0, 0, {}))
            for k, v in d1.items():
                dv = v - d0.get(k, 0)
                if dv:
                    drops[k] = drops.get(k, 0) + dv
                    if k.startswith("xsk_"):
                        xsk[f"{name}: {k}"] = dv
            if starved - starved0:
                starved_ports[name] = starved - starved0
            if name.startswith("pod ") and rx > rx0:
                pods_rx += 1
        w0, w1 = s0["worker"], s1["worker"]
        since_start = {"xsk_drops": sum(v for _, _, d in c1.values() for k, v in d.items() if k.startswith("xsk_")),
                       "fill_starved": w1.get("fill_starved", 0)}
        out[n] = {"since_start": since_start,"xsk_drops": xsk, "xsk_drops_total": sum(xsk.values()), "fill_starved": w1.get("fill_starved", 0) - w0.get("fill_starved", 0),
                  "fill_starved_ports": starved_ports, "drops": drops, "umem_total": w1.get("umem_total"),
                  "umem_balanced": w1.get("umem_balanced"), "pod_ports_with_rx": pods_rx, "raw": s1}
    pid = t.vxnat_pid("a")
    if pid and "a" in out:
        with open(f"/proc/{pid}/status") as f:
            st = {l.split(":")[0]: l.split()[1] for l in f if l.startswith(("VmRSS", "VmHWM"))}
        out["a"]["rss_kib"], out["a"]["hwm_kib"] = int(st.get("VmRSS", 0)), int(st.get("VmHWM", 0))
    return out


def measure(t, a):
    cpus = os.cpu_count() or 1
    specs, procs = [], []
    for k in range(a.senders):
        pods = [{"ns": ns, "src": addr, "gw": t.gw[i], "dst": t.receivers[i % len(t.receivers)][2]}
                for i, (ns, _, addr) in enumerate(t.senders) if i % a.senders == k]
        path = os.path.join(t.work, f"sender{k}.json")
        with open(path, "w") as f:
            json.dump({"cpu": k % cpus, "burst": a.burst, "seconds": a.seconds, "size": 64, "pods": pods,
                       "rate": a.rate * len(pods) / len(t.senders)}, f)
        specs.append(pods)
        procs.append(subprocess.Popen([sys.executable, "-c", SENDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 60
        for p in procs:
            if read_line(p, deadline).strip() != "ready":
                p.kill()
                raise RuntimeError(f"sender did not start: {p.stderr.read() if p.poll() is not None else 'timeout'}")
        # The warm-up frames resolve neighbours and fill the bridges' tables; then wait for quiet.
        time.sleep(1.0)
        background = wait_quiet(a.quiet_cpu, a.quiet_wait)
        for ns, _, _ in t.receivers:
            topo.sh("ip", "netns", "exec", ns, "nft", "flush", "set", "ip", NFT_TABLE, "src", timeout=30)
        stats0 = vxnat_stats(t) if t.kind == "vxnat" else None
        rx0 = rx_total(t)
        o0 = others_cpu()
        b0, hz = topo.cpu_busy()
        start = time.time()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        # The result line, not the exit: closing 110 packet sockets takes seconds of
        # synchronize_net() (idle time that is not the dataplane's).
        reports = []
        deadline = time.time() + a.seconds + 30
        for p in procs:
            line = read_line(p, deadline)
            if not line.strip():
                raise RuntimeError(f"sender failed: {p.stderr.read().strip() if p.poll() is not None else 'timeout'}")
            reports.append(json.loads(line))
        # Rates over the senders' own sending time.
        elapsed = max(x["elapsed"] for x in reports)
        time.sleep(0.3)
        b1, _ = topo.cpu_busy()
        o1 = others_cpu()
        window = time.time() - start
        rx1 = rx_total(t)
    finally:
        for p in procs:
            try:
                p.stdin.close()  # a sender still waiting for "go" sees EOF and leaves
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
    cpu_s = (b1 - b0) / hz
    after = busy_rate(1.0)  # did other work share the machine? (nothing of the rig runs now)
    src = per_source(t)
    sent = {}
    for pods, rep in zip(specs, reports):
        for pod, n in zip(pods, rep["sent"]):
            sent[pod["src"]] = n
    got = [src.get(addr, 0) for _, _, addr in t.senders]
    rx = rx1 - rx0
    r = {"elapsed_s": elapsed, "rx_packets": rx, "rx_pps": rx / elapsed, "sent_pps": sum(sent.values()) / elapsed,
         "send_errors": sum(x["errors"] for x in reports), "cpu_s": cpu_s, "cpu_s_per_s": cpu_s / window,
         "cpu_s_per_mpkt": cpu_s / (rx / 1e6) if rx else float("nan"), "background_cpu_s_per_s": background,
         "background_after_cpu_s_per_s": after, "others_cpu_s_per_s": (o1 - o0) / window,
         "clean": max(background, after, (o1 - o0) / window) <= a.quiet_cpu,
         "senders_through": sum(1 for g in got if g > 0), "pods": len(t.senders),
         "per_pod_rx_pps": {"min": min(got) / elapsed, "median": statistics.median(got) / elapsed, "max": max(got) / elapsed},
         "per_pod_rx": dict(zip((x[2] for x in t.senders), got)), "per_pod_sent": sent,
         "counted_by_source": sum(src.values())}
    if t.kind == "vxnat":
        r["vxnat"] = vxnat_report(t, stats0, vxnat_stats(t))
    return r


def med(vals):
    vals = [v for v in vals if v == v]
    return (statistics.median(vals), min(vals), max(vals)) if vals else (float("nan"),) * 3


def summarize(results, a):
    s = {}
    for kind in ("kernel", "vxnat"):
        # Repetitions measured while other work shared the machine are left out when clean ones exist.
        rs = [r for r in results[kind] if r["clean"]] or results[kind]
        s[kind] = {"reps_used": len(rs), "reps": len(results[kind]),"rx_kpps": med([r["rx_pps"] / 1e3 for r in rs]), "sent_kpps": med([r["sent_pps"] / 1e3 for r in rs]),
                   "cpu_s_per_mpkt": med([r["cpu_s_per_mpkt"] for r in rs]), "cpu_s_per_s": med([r["cpu_s_per_s"] for r in rs]),
                   "senders_through": med([r["senders_through"] for r in rs]),
                   "pod_min_kpps": med([r["per_pod_rx_pps"]["min"] / 1e3 for r in rs]),
                   "pod_max_kpps": med([r["per_pod_rx_pps"]["max"] / 1e3 for r in rs]),
                   "background": med([r["background_cpu_s_per_s"] for r in rs])}
    k, x = s["kernel"], s["vxnat"]
    s["ratio"] = {"rx_pps": x["rx_kpps"][0] / k["rx_kpps"][0] if k["rx_kpps"][0] else float("nan"),
                  "cpu_s_per_mpkt": x["cpu_s_per_mpkt"][0] / k["cpu_s_per_mpkt"][0] if k["cpu_s_per_mpkt"][0] else float("nan")}
    return s


def f3(t, fmt="%.1f"):
    return f"{fmt % t[0]} ({fmt % t[1]}-{fmt % t[2]})"


def render(s, results, a):
    n = a.pods
    lines = [f"| path | received kpps (median, min-max) | offered kpps | senders through (of {n}) | per-pod received kpps, slowest / fastest pod | busy CPU s/s | CPU-s per Mpkt (median, min-max) | vxnat/kernel: pps | vxnat/kernel: CPU-s per Mpkt |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, label in (("kernel", "kernel (cni0 + flannel.1)"), ("vxnat", "vxnat")):
        c = s[kind]
        through = "/".join(str(r["senders_through"]) for r in results[kind] if r["clean"] or c["reps_used"] == c["reps"])
        ratio = ("", "") if kind == "kernel" else (f"**{s['ratio']['rx_pps']:.2f}**", f"**{s['ratio']['cpu_s_per_mpkt']:.2f}**")
        if c["reps_used"] < c["reps"]:
            label += f" ({c['reps_used']} of {c['reps']} reps: the others ran beside other work)"
        lines.append(f"| {label} | {f3(c['rx_kpps'])} | {c['sent_kpps'][0]:.0f} | {through} | {c['pod_min_kpps'][0]:.2f} / {c['pod_max_kpps'][0]:.2f} | "
                     f"{c['cpu_s_per_s'][0]:.2f} | {f3(c['cpu_s_per_mpkt'], '%.2f')} | {ratio[0]} | {ratio[1]} |")
    lines += ["", f"Each repetition (other work, CPU-s/s: the machine's busy CPU in the second before the measurement and the second after it, nothing of the rig running, and the CPU of processes outside the rig during it; any above {a.quiet_cpu:g} marks the repetition `busy`, measured again up to --retries times and left out of the medians if clean ones exist):", "",
              "| rep | path | received kpps | offered kpps | senders through | busy CPU s/s | CPU-s per Mpkt | other work before / during / after | |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("kernel", "vxnat"):
        for i, r in enumerate(results[kind]):
            lines.append(f"| {i + 1} | {kind} | {r['rx_pps'] / 1e3:.1f} | {r['sent_pps'] / 1e3:.1f} | {r['senders_through']}/{r['pods']} | "
                         f"{r['cpu_s_per_s']:.2f} | {r['cpu_s_per_mpkt']:.2f} | {r['background_cpu_s_per_s']:.2f} / {r['others_cpu_s_per_s']:.2f} / {r['background_after_cpu_s_per_s']:.2f} | {'' if r['clean'] else 'busy'} |")
    lines += ["", "vxnat over each measurement (`vxnat ctl --json stats` before and after; in brackets since the node started, pod attaches "
              "and warm-up included; UMEM and RSS at the end):", "",
              "| rep | node A: xsk_* drops | node A: fill starved (worker / ports) | node A: UMEM chunks, all accounted for | node A: pod ports that received | node A: vxnat RSS MiB (peak) | node A: other drops | node B: xsk_* drops | node B: other drops |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results["vxnat"]):
        v = r.get("vxnat", {})
        A, B = v.get("a", {}), v.get("b", {})
        other = lambda d: ", ".join(f"{k} {c}" for k, c in sorted(d.get("drops", {}).items()) if not k.startswith("xsk_")) or "none"
        xs = lambda d: ", ".join(f"{k} {c}" for k, c in d.get("xsk_drops", {}).items()) or "0"
        ss = A.get("since_start", {})
        lines.append(f"| {i + 1} | {xs(A)} ({ss.get('xsk_drops')}) | {A.get('fill_starved')} / {sum(A.get('fill_starved_ports', {}).values())} "
                     f"({ss.get('fill_starved')}) | "
                     f"{A.get('umem_total')}, {A.get('umem_balanced')} | {A.get('pod_ports_with_rx')} | "
                     f"{A.get('rss_kib', 0) / 1024:.1f} ({A.get('hwm_kib', 0) / 1024:.1f}) | {other(A)} | {xs(B)} | {other(B)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pods", type=int, default=110, help="sending pods on node A (1-250)")
    ap.add_argument("--receivers", type=int, default=1, help="receiving pods on node B")
    ap.add_argument("--senders", type=int, default=1, help="sender processes (sender k pinned to CPU k)")
    ap.add_argument("--burst", type=int, default=8, help="frames per pod per turn (one sendmmsg)")
    ap.add_argument("--rate", type=float, default=0, help="offered packets/s in all (0: as fast as the senders go)")
    ap.add_argument("--quiet-cpu", type=float, default=0.15, help="background busy CPU-s/s to wait for before measuring")
    ap.add_argument("--quiet-wait", type=float, default=120, help="at most this many seconds")
    ap.add_argument("--retries", type=int, default=2, help="measure again (same topology) if the machine was busy right after")
    ap.add_argument("--out", default=os.path.join(topo.ROOT, "target", "rig", "pods110"))
    ap.add_argument("--bin", default=topo.BIN, help="the vxnat binary (copied first: a rebuild during the run does not change it)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, XDP)")
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} missing: cargo build --release -p vxnat-control")
    snapshot = tempfile.mkdtemp(prefix="vxnat-pods110-bin-")
    atexit.register(shutil.rmtree, snapshot, True)
    topo.BIN = os.path.join(snapshot, "vxnat")
    shutil.copy2(a.bin, topo.BIN)
    with open(topo.BIN, "rb") as f:
        binary = {"path": os.path.abspath(a.bin), "sha256": hashlib.sha256(f.read()).hexdigest(),
                  "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(a.bin)))}
    if not (1 <= a.pods <= 250 and 1 <= a.receivers <= 250 and a.senders >= 1 and 1 <= a.burst <= 1024):
        sys.exit("--pods/--receivers 1-250, --senders >= 1, --burst 1-1024")
    topo.tear_down_at_exit()
    os.makedirs(a.out, exist_ok=True)
    results = {"kernel": [], "vxnat": []}
    started = time.time()
    for rep in range(a.reps):
        for kind in (("kernel", "vxnat") if rep % 2 == 0 else ("vxnat", "kernel")):
            t = Pods(kind, f"p110{os.getpid() % 100000}{kind[0]}{rep}", a.pods, a.receivers)
            topo.LIVE.append(t)
            try:
                t0 = time.time()
                t.build()
                build_s = time.time() - t0
                for attempt in range(a.retries + 1):
                    r = measure(t, a)
                    if r["clean"] or attempt == a.retries:
                        break
                    print(f"   other work shared the machine (CPU-s/s: {r['others_cpu_s_per_s']:.2f} by other processes during the "
                          f"measurement, {r['background_after_cpu_s_per_s']:.2f} right after it): measuring again", flush=True)
                r["build_s"], r["attempts"] = build_s, attempt + 1
            finally:
                t.teardown()
                topo.LIVE.remove(t)  # only now: an interrupted teardown is finished at exit
            results[kind].append(r)
            extra = ""
            if kind == "vxnat":
                A, B = r["vxnat"]["a"], r["vxnat"]["b"]
                extra = (f"  A: xsk drops {A.get('xsk_drops_total')} fill starved {A.get('fill_starved')}/{sum(A.get('fill_starved_ports', {}).values())} "
                         f"umem balanced {A.get('umem_balanced')} rss {A.get('rss_kib', 0) / 1024:.1f} MiB; B: xsk drops {B.get('xsk_drops_total')} "
                         f"drops {B.get('drops')}")
            print(f"rep {rep + 1} {kind:6}: rx {r['rx_pps'] / 1e3:7.1f} kpps (offered {r['sent_pps'] / 1e3:6.1f})  through {r['senders_through']}/{r['pods']}  "
                  f"cpu {r['cpu_s_per_s']:.2f} s/s  {r['cpu_s_per_mpkt']:.2f} CPU-s/Mpkt  other work {r['background_cpu_s_per_s']:.2f}/{r['others_cpu_s_per_s']:.2f}/{r['background_after_cpu_s_per_s']:.2f}{'' if r['clean'] else ' BUSY'}  "
                  f"built in {build_s:.0f} s{extra}", flush=True)
    s = summarize(results, a)
    md = render(s, results, a)
    elapsed = time.time() - started
    print()
    print(md)
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
            brnf = f"br_netfilter loaded, bridge-nf-call-iptables = {f.read().strip()}"
    except OSError:
        brnf = "br_netfilter not loaded"
    machine = {"cpus": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release, "bridge_netfilter": brnf}
    cmd = (f"python3 benches/rig/pods110.py --seconds {a.seconds:g} --reps {a.reps} --pods {a.pods} --receivers {a.receivers} "
           f"--senders {a.senders} --burst {a.burst}" + (f" --rate {a.rate:g}" if a.rate else ""))
    report = (f"# {a.pods} pods on one node: vxnat vs the kernel path\n\nMachine: {os.cpu_count()} vCPUs ({cpu}), kernel {os.uname().release}, {brnf}. "
              f"Command: `{cmd}`; {a.reps} repetitions per path, alternating, {a.seconds:g} s each, {elapsed:.0f} s in all, "
              f"{time.strftime('%Y-%m-%d')}. vxnat binary: {binary['path']} (built {binary['mtime']}, sha256 {binary['sha256'][:12]}).\n\n{md}\n")
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report)
    for kind in results:  # the raw stats are large: keep them, but in their own file
        for i, r in enumerate(results[kind]):
            for n, v in r.get("vxnat", {}).items():
                raw = v.pop("raw", None)
                if raw is not None:
                    with open(os.path.join(a.out, f"stats-{kind}-{i + 1}-node-{n}.json"), "w") as f:
                        json.dump(raw, f, indent=1)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "machine": machine, "binary": binary, "elapsed_s": elapsed, "summary": s, "runs": results}, f, indent=1)
    print(f"\nreport: {a.out}/report.md, raw: {a.out}/results.json ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
