#!/usr/bin/env python3
"""Pod-to-remote-pod UDP over VXLAN: vxnat against the kernel path, same topology, one run.

Two node namespaces joined by a veth underlay (MTU 1500), one pod per node (MTU 1450).
  kernel: both nodes configured as flannel's vxlan backend (flannel.1: VNI 1, port 8472,
          nolearning, neighbour + FDB entries, onlink route; pods on a cni0 bridge);
  vxnat:  both nodes run `vxnat run` (configs/demo-cluster.yaml), pods attached as ports.
trafgen in pod A sends UDP of a given frame size to pod B for a fixed time. Measured: packets
received on pod B's interface per second, and the whole machine's busy CPU time (/proc/stat:
everything but idle and iowait), so vxnat's polling and the kernel's softirq work, and trafgen
itself, are all counted the same way for both paths. Paths alternate over repetitions; medians
and spread are reported with vxnat/kernel ratios.

Usage (root): python3 benches/rig/overlay_udp.py [--seconds 5] [--reps 3] [--sizes 64,1400]
"""
import argparse, atexit, json, os, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "vxnat")
STATE = os.path.join(ROOT, "configs", "demo-cluster.yaml")
VTEP = {"a": "0e:a1:00:00:00:0a", "b": "0e:a1:00:00:00:0b"}
UNDERLAY = {"a": "192.168.77.1", "b": "192.168.77.2"}
POD = {"a": "10.244.0.2", "b": "10.244.1.2"}
NET = {"a": 0, "b": 1}


def sh(*args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


LIVE = []  # topologies not yet torn down (atexit and signals tear them down)


def cleanup():
    while LIVE:
        t = LIVE.pop()
        try:
            t.teardown()
        except Exception as e:  # noqa: BLE001  (best effort at exit)
            print(f"teardown {t.tag}: {e}", file=sys.stderr)


def on_signal(signum, _frame):
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the teardown short
    sys.exit(128 + signum)  # SystemExit: finally blocks and atexit run


def tear_down_at_exit():
    """Tears down every topology in LIVE at exit, on SIGTERM and on SIGHUP."""
    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


class Topology:
    # Services both paths carry: YAML appended to the demo state vxnat reads, and the nftables
    # ruleset (kube-proxy's nftables mode) the kernel path loads on `kube_proxy_nodes`.
    services = ""
    kube_proxy = ""
    kube_proxy_nodes = "ab"

    def __init__(self, kind, tag, pod_mtu=1450):
        self.kind, self.tag, self.procs, self.nses = kind, tag, [], []
        self.pod_mtu = str(pod_mtu)
        self.work = tempfile.mkdtemp(prefix="vxnat-rig-")

    def ns(self, name):
        full = f"{self.tag}-{name}"
        sh("ip", "netns", "add", full)
        self.nses.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def ip(self, ns, *args):
        return sh("ip", "-n", ns, *args)

    def mac(self, ns, ifname):
        return sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{ifname}/address").strip()

    def build(self):
        self.node = {n: self.ns(f"node{n}") for n in "ab"}
        self.pod = {n: self.ns(f"pod{n}") for n in "ab"}
        self.ip(self.node["a"], "link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns", self.node["b"])
        for n in "ab":
            self.ip(self.node[n], "addr", "add", f"{UNDERLAY[n]}/24", "dev", "ul")
            self.ip(self.node[n], "link", "set", "ul", "up")
        getattr(self, f"build_{self.kind}")()

    def build_kernel(self):
        for n, peer in (("a", "b"), ("b", "a")):
            ns, k, pk = self.node[n], NET[n], NET[peer]
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.ip(ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", UNDERLAY[n], "dev", "ul", "dstport", "8472", "nolearning")
            self.ip(ns, "link", "set", "flannel.1", "address", VTEP[n], "mtu", "1450", "up")
            self.ip(ns, "addr", "add", f"10.244.{k}.0/32", "dev", "flannel.1")
            self.ip(ns, "route", "add", f"10.244.{pk}.0/24", "via", f"10.244.{pk}.0", "dev", "flannel.1", "onlink")
            self.ip(ns, "neigh", "add", f"10.244.{pk}.0", "lladdr", VTEP[peer], "dev", "flannel.1", "nud", "permanent")
            sh("ip", "netns", "exec", ns, "bridge", "fdb", "append", VTEP[peer], "dev", "flannel.1", "dst", UNDERLAY[peer])
            self.ip(ns, "link", "add", "cni0", "type", "bridge")
            self.ip(ns, "addr", "add", f"10.244.{k}.1/24", "dev", "cni0")
            self.ip(ns, "link", "set", "cni0", "mtu", self.pod_mtu, "up")
            self.add_kernel_pod(n, self.pod[n], "vethpod", POD[n])
        self.gw_mac = self.mac(self.node["a"], "cni0")
        if self.kube_proxy:
            for n in self.kube_proxy_nodes:
                subprocess.run(["ip", "netns", "exec", self.node[n], "nft", "-f", "-"], input=self.kube_proxy, text=True, check=True)

    def add_kernel_pod(self, n, pod_ns, host_if, addr):
        """A pod on node n's cni0 as flannel's bridge CNI plugs it: veth, /24, default via cni0."""
        ns, k = self.node[n], NET[n]
        self.ip(ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        self.ip(ns, "link", "set", host_if, "master", "cni0", "mtu", self.pod_mtu, "up")
        self.ip(pod_ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        self.ip(pod_ns, "link", "set", "eth0", "mtu", self.pod_mtu, "up")
        self.ip(pod_ns, "route", "add", "default", "via", f"10.244.{k}.1")

    def build_vxnat(self):
        state = STATE
        if self.services:
            state = os.path.join(self.work, "cluster.yaml")
            with open(STATE) as f, open(state, "w") as out:
                out.write(f.read() + self.services)
        for n in "ab":
            ns = self.node[n]
            self.add_vxnat_pod(n, self.pod[n], "vxpod", POD[n])
            cfg = os.path.join(self.work, f"node-{n}.toml")
            sock = os.path.join(self.work, f"node-{n}.sock")
            with open(cfg, "w") as f:
                f.write(f'node = "node-{n}"\nuplink = "ul"\nstate = "{state}"\nsocket = "{sock}"\ncores = [{1 if n == "a" else 0}]\n')
                if os.environ.get("VXNAT_BUSY_POLL"):
                    f.write("busy_poll = true\n")
                f.write(getattr(self, "extra_config", ""))
            log = open(os.path.join(self.work, f"node-{n}.log"), "w")
            self.procs.append(subprocess.Popen(["ip", "netns", "exec", ns, BIN, "run", "--config", cfg], stdout=subprocess.DEVNULL, stderr=log))
            for _ in range(200):
                if subprocess.run([BIN, "ctl", "--socket", sock, "ports"], capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
            sh(BIN, "ctl", "--socket", sock, "attach", "--ifname", "vxpod", "--ip", POD[n])
        self.gw_mac = self.mac(self.node["a"], "vxpod")

    def add_vxnat_pod(self, n, pod_ns, host_if, addr):
        """A pod as vxnat's CNI contract wants it: veth, /32, the gateway on-link, default via it
        (attaching the host end to vxnat is the caller's)."""
        ns, k = self.node[n], NET[n]
        self.ip(ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        self.ip(ns, "link", "set", host_if, "mtu", self.pod_mtu, "up")
        self.ip(pod_ns, "addr", "add", f"{addr}/32", "dev", "eth0")
        self.ip(pod_ns, "link", "set", "eth0", "mtu", self.pod_mtu, "up")
        self.ip(pod_ns, "route", "add", f"10.244.{k}.1", "dev", "eth0", "scope", "link")
        self.ip(pod_ns, "route", "add", "default", "via", f"10.244.{k}.1", "dev", "eth0")

    def build_switch(self, ports):
        """The underlay switch: bridge br0 in namespace self.switch (the caller makes it), one veth
        per (namespace, switch port, interface name) joined to it; both nodes' `ul` addressed, up."""
        self.ip(self.switch, "link", "add", "br0", "type", "bridge")
        self.ip(self.switch, "link", "set", "br0", "up")
        for ns, port, ifname in ports:
            self.ip(self.switch, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
            self.ip(self.switch, "link", "set", port, "master", "br0", "up")
        for n in "ab":
            self.ip(self.node[n], "addr", "add", f"{UNDERLAY[n]}/24", "dev", "ul")
            self.ip(self.node[n], "link", "set", "ul", "up")

    def teardown(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.nses:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", self.work])


def percentile_us(sorted_seconds, q):
    """The q-quantile of a sorted list of durations in seconds, in microseconds (NaN if empty)."""
    if not sorted_seconds:
        return float("nan")
    return sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))] * 1e6


def cpu_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, os.sysconf("SC_CLK_TCK")


def counter(ns, ifname, what):
    return int(sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{ifname}/statistics/{what}"))


def measure(t, size, seconds):
    """Frame size is the Ethernet frame without FCS, as sent by the pod."""
    payload = max(size - 42, 0)
    pod_mac = t.mac(t.pod["a"], "eth0")
    conf = os.path.join(t.work, f"udp{size}.cfg")
    with open(conf, "w") as f:
        f.write("{ eth(da=%s, sa=%s), ipv4(saddr=%s, daddr=%s, ttl=64, df), udp(sport=4000, dport=9), fill(0x41, %d) }\n"
                % (t.gw_mac, pod_mac, POD["a"], POD["b"], payload))
    # Warm up (ARP, caches), then measure.
    sh("ip", "netns", "exec", t.pod["a"], "ping", "-c", "2", "-W", "1", POD["b"], check=False)
    rx0, tx0 = counter(t.pod["b"], "eth0", "rx_packets"), counter(t.pod["a"], "eth0", "tx_packets")
    b0, hz = cpu_busy()
    start = time.time()
    subprocess.run(["timeout", "-s", "INT", str(seconds), "ip", "netns", "exec", t.pod["a"], "trafgen", "-o", "eth0", "-i", conf, "-q", "-t", "0", "-P", "1"],
                   capture_output=True)
    elapsed = time.time() - start
    time.sleep(0.3)
    b1, _ = cpu_busy()
    rx1, tx1 = counter(t.pod["b"], "eth0", "rx_packets"), counter(t.pod["a"], "eth0", "tx_packets")
    cpu_s = (b1 - b0) / hz
    if t.kind == "vxnat":
        # Where vxnat lost packets, by name (ctl stats drops).
        for n in "ab":
            sock = os.path.join(t.work, f"node-{n}.sock")
            out = subprocess.run([BIN, "ctl", "--socket", sock, "stats"], capture_output=True, text=True).stdout
            lost = [l.strip() for l in out.split("drops:", 1)[-1].splitlines() if l.strip() and not l.startswith(("tx:", "umem:")) and "ipv6_unsupported" not in l]
            if lost:
                print(f"   node-{n} drops after {size} B: " + "; ".join(" ".join(l.split()[:4]) for l in lost), flush=True)
    return {"sent_pps": (tx1 - tx0) / elapsed, "rx_pps": (rx1 - rx0) / elapsed, "cpu_s_per_s": cpu_s / elapsed,
            "rx_per_cpu_s": (rx1 - rx0) / cpu_s if cpu_s > 0 else 0.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="64,1400")
    ap.add_argument("--json", help="write raw results here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, XDP)")
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release -p vxnat-control")
    sizes = [int(s) for s in a.sizes.split(",")]
    results = {(k, s): [] for k in ("kernel", "vxnat") for s in sizes}
    for rep in range(a.reps):
        for kind in (("kernel", "vxnat") if rep % 2 == 0 else ("vxnat", "kernel")):
            t = Topology(kind, f"vxrig{os.getpid()}{kind[0]}{rep}")
            try:
                t.build()
                for s in sizes:
                    r = measure(t, s, a.seconds)
                    results[(kind, s)].append(r)
                    print(f"rep {rep + 1} {kind:6} {s:5} B: rx {r['rx_pps']/1e3:8.1f} kpps  sent {r['sent_pps']/1e3:8.1f} kpps  "
                          f"cpu {r['cpu_s_per_s']:.2f} s/s  {r['rx_per_cpu_s']/1e3:8.1f} kpkt/cpu-s", flush=True)
            finally:
                t.teardown()
    print()
    print("| frame | path | rx kpps (median, min-max) | busy CPU s/s | kpkt per CPU-second | vxnat/kernel pps | vxnat/kernel per CPU-s |")
    print("|---|---|---|---|---|---|---|")
    for s in sizes:
        med = {}
        for kind in ("kernel", "vxnat"):
            rs = results[(kind, s)]
            rx = [r["rx_pps"] for r in rs]
            eff = [r["rx_per_cpu_s"] for r in rs]
            med[kind] = (statistics.median(rx), statistics.median(eff))
            cpu = statistics.median([r["cpu_s_per_s"] for r in rs])
            ratio = ("%.2f" % (med["vxnat"][0] / med["kernel"][0]), "%.2f" % (med["vxnat"][1] / med["kernel"][1])) if kind == "vxnat" and med["kernel"][0] > 0 and med["kernel"][1] > 0 else ("", "")
            print(f"| {s} B | {kind} | {med[kind][0]/1e3:.1f} ({min(rx)/1e3:.1f}-{max(rx)/1e3:.1f}) | {cpu:.2f} | {med[kind][1]/1e3:.1f} | {ratio[0]} | {ratio[1]} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{k}_{s}": v for (k, s), v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
