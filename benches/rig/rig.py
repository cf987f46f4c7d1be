#!/usr/bin/env python3
"""vxnat against the kernel path, side by side, in one run.

Builds the same namespace topology twice: two nodes and an external client on an underlay
switch (a bridge, MTU 1500), one pod per node (MTU 1450), and
  kernel: both nodes as flannel's vxlan backend configures them (flannel.1: VNI 1, port 8472,
          nolearning, neighbour + FDB entries, onlink routes, pods on cni0), and Services as
          kube-proxy's nftables mode writes them (DNAT in prerouting; NodePorts marked and
          masqueraded `fully-random`);
  vxnat:  both nodes run `vxnat run` on the same cluster state (demo nodes + the Services).
Paths alternate over repetitions (a fresh topology each time); every measurement runs for a
fixed time. Reported: medians with min-max and vxnat/kernel ratios on the terminal, a markdown
report and an SVG chart.

Measured, per path:
  - UDP packets/s, 64 B and 1400 B frames (trafgen): pod A -> pod B, and the external client ->
    a NodePort on node A backed by pod B; and busy CPU-seconds per million packets received
    (the whole machine's /proc/stat, so vxnat's polling and the kernel's softirqs count alike);
  - TCP bulk Gbit/s (iperf3): pod A -> pod B, and pod A -> a ClusterIP backed by pod B;
  - new TCP connections/s through the ClusterIP, with connect latency p50/p99;
  - request/response latency p50/p99 (1-byte ping-pong over one connection to the ClusterIP);
  - incident 2: 20 short connections from the client through a NodePort whose SNAT may use
    only 8 ports, the backend closing first: connections served, refused (visibly), timed out,
    and SYNs the backend did not answer with SYN-ACK (it held the tuple in TIME_WAIT).

Every measurement runs on two underlays (`--underlays`): "veth", where 64 KiB GSO frames cross
from node to node whole, and "wire", a 1500-byte link as a physical network is (the switch's
ports `tso off gso off`: frames are segmented on their way out; the uplinks `gro on`).

Usage (root, after `cargo build --release -p vxnat-control`):
  python3 benches/rig/rig.py [--seconds 3] [--reps 3] [--underlays veth,wire] [--out target/rig]
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlay_udp as rig  # noqa: E402  (the shared topology pieces)
import services_conn as conn  # noqa: E402

VIP = "10.96.0.50"
CLIENT_IP = "192.168.77.100"
SERVICES = """
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    clusterIP: 10.96.0.50
    ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
    - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
    - {name: echo, port: 7, targetPort: 7007, protocol: TCP}
- apiVersion: v1
  kind: Service
  metadata: {name: np, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.51
    externalTrafficPolicy: Cluster
    ports:
    - {name: udp, port: 53, targetPort: 9, protocol: UDP, nodePort: 30053}
    - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30090}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-x1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}, {name: iperf, port: 5201, protocol: TCP}, {name: echo, port: 7007, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: np-x1, namespace: default, labels: {kubernetes.io/service-name: np}}
  addressType: IPv4
  ports: [{name: udp, port: 9, protocol: UDP}, {name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"""

# kube-proxy's nftables mode, reduced to these Services: ClusterIP DNAT; NodePorts marked,
# DNAT'd and masqueraded fully-random (the incident-2 NodePort limited to the same 8 ports
# vxnat gets).
KUBE_PROXY = """table ip kube-proxy {
 chain nat-prerouting {
  type nat hook prerouting priority dstnat; policy accept;
  ip daddr 10.96.0.50 tcp dport 80 dnat to 10.244.1.2:8080
  ip daddr 10.96.0.50 tcp dport 5201 dnat to 10.244.1.2:5201
  ip daddr 10.96.0.50 tcp dport 7 dnat to 10.244.1.2:7007
  fib daddr type local udp dport 30053 meta mark set mark | 0x4000 dnat to 10.244.1.2:9
  fib daddr type local tcp dport 30090 meta mark set mark | 0x8000 dnat to 10.244.1.2:8080
 }
 chain nat-postrouting {
  type nat hook postrouting priority srcnat; policy accept;
  meta mark & 0x4000 == 0x4000 masquerade fully-random
  meta mark & 0x8000 == 0x8000 meta l4proto tcp masquerade to :20000-20007 fully-random
 }
}
"""


# The underlays measured: "veth" carries 64 KiB GSO frames from node to node as they are (no
# real network does: the kernel path never segments there); "wire" behaves like a 1500-byte
# physical link, segmentation on the way out (the switch's ports do not take GSO frames, as a
# NIC's TSO would cut them) and GRO on the way in (the nodes' uplinks).
UNDERLAYS = ("veth", "wire")


def wire(t, switch_ports, uplinks):
    """Make the underlay a 1500-byte wire: `tso off gso off` on the switch's ports, `gro on` on
    the hosts' uplinks."""
    for port in switch_ports:
        rig.sh("ip", "netns", "exec", t.switch, "ethtool", "-K", port, "tso", "off", "gso", "off")
    for ns, ifname in uplinks:
        rig.sh("ip", "netns", "exec", ns, "ethtool", "-K", ifname, "gro", "on")


class Full(rig.Topology):
    extra_config = '\n[nat]\nsnat_ports = "20000-20007"\n'
    services = SERVICES
    kube_proxy = KUBE_PROXY
    underlay = "veth"

    def build(self):
        self.switch = self.ns("sw")
        self.node = {n: self.ns(f"node{n}") for n in "ab"}
        self.pod = {n: self.ns(f"pod{n}") for n in "ab"}
        self.client = self.ns("client")
        self.build_switch(((self.node["a"], "pa", "ul"), (self.node["b"], "pb", "ul"), (self.client, "pc", "eth0")))
        if self.underlay == "wire":
            wire(self, ("pa", "pb", "pc"), ((self.node["a"], "ul"), (self.node["b"], "ul"), (self.client, "eth0")))
        self.ip(self.client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        self.ip(self.client, "link", "set", "eth0", "up")
        getattr(self, f"build_{self.kind}")()
        self.node_a_mac = self.mac(self.node["a"], "ul")


def nodeport_pps(t, size, seconds):
    """trafgen in the external client -> node A's NodePort 30053, received on pod B."""
    payload = max(size - 42, 0)
    conf = os.path.join(t.work, f"np{size}.cfg")
    with open(conf, "w") as f:
        f.write("{ eth(da=%s, sa=%s), ipv4(saddr=%s, daddr=%s, ttl=64, df), udp(sport=4000, dport=30053), fill(0x41, %d) }\n"
                % (t.node_a_mac, t.mac(t.client, "eth0"), CLIENT_IP, rig.UNDERLAY["a"], payload))
    rig.sh("ip", "netns", "exec", t.client, "ping", "-c", "2", "-W", "1", rig.UNDERLAY["a"], check=False)
    rx0 = rig.counter(t.pod["b"], "eth0", "rx_packets")
    b0, hz = rig.cpu_busy()
    start = time.time()
    subprocess.run(["timeout", "-s", "INT", str(seconds), "ip", "netns", "exec", t.client, "trafgen", "-o", "eth0", "-i", conf,
                    "-q", "-t", "0", "-P", "1"], capture_output=True)
    elapsed = time.time() - start
    time.sleep(0.3)
    b1, _ = rig.cpu_busy()
    rx1 = rig.counter(t.pod["b"], "eth0", "rx_packets")
    cpu = (b1 - b0) / hz
    return {"rx_pps": (rx1 - rx0) / elapsed, "cpu_s_per_s": cpu / elapsed, "rx_per_cpu_s": (rx1 - rx0) / cpu if cpu > 0 else 0.0}


def iperf(t, dst, port, seconds):
    srv = subprocess.Popen(["ip", "netns", "exec", t.pod["b"], "iperf3", "-s", "-1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    out = subprocess.run(["ip", "netns", "exec", t.pod["a"], "iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    try:
        srv.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.kill()
    try:
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        return 0.0


ECHO_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.244.1.2", 7007)); s.listen(4); s.settimeout(float(sys.argv[1]))
try:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(64)
        if not b:
            break
        c.sendall(b)
except socket.timeout:
    pass
"""

ECHO_CLIENT = r"""
import socket, sys, time, json
seconds = float(sys.argv[1]); lat = []
c = socket.create_connection(("10.96.0.50", 7), timeout=3)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    t0 = time.perf_counter(); c.sendall(b"x"); c.recv(1); lat.append(time.perf_counter() - t0)
c.close()
print(json.dumps(lat))
"""


def rr(t, seconds):
    srv = subprocess.Popen(["ip", "netns", "exec", t.pod["b"], "python3", "-c", ECHO_SERVER, str(seconds + 5)])
    time.sleep(0.5)
    try:
        lat = sorted(json.loads(rig.sh("ip", "netns", "exec", t.pod["a"], "python3", "-c", ECHO_CLIENT, str(seconds))))
    except (RuntimeError, ValueError):
        lat = []
    srv.wait(timeout=15)
    return {"p50_us": rig.percentile_us(lat, 0.5), "p99_us": rig.percentile_us(lat, 0.99)}


INCIDENT_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.244.1.2", 8080)); s.listen(64); s.settimeout(0.5)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()   # the backend closes first: TIME_WAIT
    except socket.timeout:
        pass
"""

INCIDENT_CLIENT = r"""
import socket, json
served = refused = timed_out = 0
for _ in range(20):
    try:
        c = socket.create_connection(("192.168.77.1", 30090), timeout=2.5)
        c.settimeout(2.5); c.recv(2); c.close(); served += 1
    except ConnectionRefusedError:
        refused += 1
    except OSError:
        timed_out += 1
print(json.dumps({"served": served, "refused": refused, "timed_out": timed_out}))
"""


def incident_2(t):
    pcap = os.path.join(t.work, "backend.pcap")
    dump = subprocess.Popen(["ip", "netns", "exec", t.pod["b"], "tcpdump", "-i", "eth0", "-nn", "-U", "-w", pcap, "tcp", "port", "8080"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    srv = subprocess.Popen(["ip", "netns", "exec", t.pod["b"], "python3", "-c", INCIDENT_SERVER, "60"])
    time.sleep(1.0)
    r = json.loads(rig.sh("ip", "netns", "exec", t.client, "python3", "-c", INCIDENT_CLIENT))
    time.sleep(0.3)
    srv.kill()
    dump.send_signal(2)
    dump.wait(timeout=10)
    count = lambda f: len(subprocess.run(["tcpdump", "-nn", "-r", pcap, f], capture_output=True, text=True).stdout.splitlines())
    syns, synacks = count("tcp[13] == 2"), count("tcp[13] == 18")
    r["syns_not_answered"] = max(syns - synacks, 0)
    return r


def measure_all(t, seconds):
    out = {}
    for size in (64, 1400):
        r = rig.measure(t, size, seconds)
        out[f"pod_pps_{size}"] = r["rx_pps"]
        out[f"pod_cpu_s_per_mpkt_{size}"] = 1e6 / r["rx_per_cpu_s"] if r["rx_per_cpu_s"] else float("nan")
        r = nodeport_pps(t, size, seconds)
        out[f"nodeport_pps_{size}"] = r["rx_pps"]
        out[f"nodeport_cpu_s_per_mpkt_{size}"] = 1e6 / r["rx_per_cpu_s"] if r["rx_per_cpu_s"] else float("nan")
    out["tcp_gbps_pod"] = iperf(t, rig.POD["b"], 5201, seconds)
    out["tcp_gbps_clusterip"] = iperf(t, VIP, 5201, seconds)
    c = conn.measure(t, seconds)
    out["conn_per_s"], out["connect_p50_us"], out["connect_p99_us"] = c["cps"], c["p50_us"], c["p99_us"]
    r = rr(t, seconds)
    out["rr_p50_us"], out["rr_p99_us"] = r["p50_us"], r["p99_us"]
    i = incident_2(t)
    out["inc2_served"], out["inc2_refused"], out["inc2_timed_out"], out["inc2_syns_not_answered"] = (
        i["served"], i["refused"], i["timed_out"], i["syns_not_answered"])
    return out


# (key, label, unit, higher is better)
METRICS = [
    ("pod_pps_64", "UDP pod -> remote pod, 64 B", "kpps", True),
    ("pod_pps_1400", "UDP pod -> remote pod, 1400 B", "kpps", True),
    ("nodeport_pps_64", "UDP client -> NodePort -> remote pod, 64 B", "kpps", True),
    ("nodeport_pps_1400", "UDP client -> NodePort -> remote pod, 1400 B", "kpps", True),
    ("pod_cpu_s_per_mpkt_64", "CPU-s per Mpkt, pod -> pod 64 B", "s", False),
    ("nodeport_cpu_s_per_mpkt_64", "CPU-s per Mpkt, NodePort 64 B", "s", False),
    ("tcp_gbps_pod", "TCP bulk pod -> remote pod", "Gbit/s", True),
    ("tcp_gbps_clusterip", "TCP bulk pod -> ClusterIP", "Gbit/s", True),
    ("conn_per_s", "new TCP connections through a ClusterIP", "conn/s", True),
    ("connect_p50_us", "connect latency p50", "us", False),
    ("connect_p99_us", "connect latency p99", "us", False),
    ("rr_p50_us", "request/response p50", "us", False),
    ("rr_p99_us", "request/response p99", "us", False),
    ("inc2_served", "incident 2: connections served (of 20, 8 SNAT ports)", "", True),
    ("inc2_refused", "incident 2: refused visibly (RST)", "", None),
    ("inc2_timed_out", "incident 2: timed out (silent)", "", False),
    ("inc2_syns_not_answered", "incident 2: SYNs answered by a bare ACK at the backend", "", False),
]


def scale(key, v):
    return v / 1e3 if "pps" in key else v


def fmt(v):
    if v != v:  # NaN
        return "n/a"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def table(results):
    rows = []
    for key, label, unit, _ in METRICS:
        cells = {}
        for kind in ("kernel", "vxnat"):
            vals = [scale(key, r[key]) for r in results[kind] if key in r]
            vals = [v for v in vals if v == v]
            cells[kind] = (statistics.median(vals), min(vals), max(vals)) if vals else (float("nan"),) * 3
        k, x = cells["kernel"][0], cells["vxnat"][0]
        ratio = x / k if k and k == k and x == x and k != 0 else float("nan")
        rows.append((key, label, unit, cells, ratio))
    return rows


def render(rows):
    lines = ["| measurement | unit | kernel (median, min-max) | vxnat (median, min-max) | vxnat/kernel |", "|---|---|---|---|---|"]
    for key, label, unit, c, ratio in rows:
        kk, vv = c["kernel"], c["vxnat"]
        lines.append(f"| {label} | {unit} | {fmt(kk[0])} ({fmt(kk[1])}-{fmt(kk[2])}) | {fmt(vv[0])} ({fmt(vv[1])}-{fmt(vv[2])}) | "
                     f"{'n/a' if ratio != ratio else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def svg(rows, underlay):
    """Horizontal bars of vxnat/kernel per measurement (log scale, 1.0 marked), coloured by
    whether vxnat wins (green) or loses (red) given the measurement's direction."""
    import math
    shown = [(label, ratio, better) for (key, label, unit, c, ratio), (_, _, _, better) in zip(rows, METRICS)
             if ratio == ratio and ratio > 0 and better is not None]
    w, left, bar_h, gap, top = 900, 380, 18, 8, 40
    h = top + len(shown) * (bar_h + gap) + 40
    x_of = lambda r: left + (math.log10(r) + 1.5) / 3.0 * (w - left - 20)  # 0.03x .. 30x
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14">vxnat / kernel path, {underlay} underlay (log scale; right of 1.0 = more of the measured quantity)</text>']
    one = x_of(1.0)
    for i, (label, ratio, better) in enumerate(shown):
        y = top + i * (bar_h + gap)
        x = x_of(max(min(ratio, 30), 0.032))
        win = (ratio >= 1) == bool(better)
        colour = "#3a9d3a" if win else "#c44"
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{label}</text>')
        out.append(f'<rect x="{min(one, x):.1f}" y="{y}" width="{abs(x - one):.1f}" height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{max(one, x) + 4:.1f}" y="{y + 13}">{ratio:.2f}x</text>')
    out.append(f'<line x1="{one:.1f}" y1="{top - 6}" x2="{one:.1f}" y2="{h - 30}" stroke="black"/>')
    for r in (0.1, 1, 10):
        out.append(f'<text x="{x_of(r):.1f}" y="{h - 12}" text-anchor="middle">{r:g}x</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(rig.ROOT, "target", "rig"))
    ap.add_argument("--underlays", default=",".join(UNDERLAYS), help="veth, wire or both (default)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, XDP)")
    if not os.path.exists(rig.BIN):
        sys.exit(f"{rig.BIN} missing: cargo build --release -p vxnat-control")
    os.makedirs(a.out, exist_ok=True)
    underlays = [u for u in a.underlays.split(",") if u]
    if any(u not in UNDERLAYS for u in underlays):
        sys.exit(f"--underlays: each of {', '.join(UNDERLAYS)}")
    results = {u: {"kernel": [], "vxnat": []} for u in underlays}
    started = time.time()
    for rep in range(a.reps):
        for kind in (("kernel", "vxnat") if rep % 2 == 0 else ("vxnat", "kernel")):
            for u in underlays:
                t = Full(kind, f"vxr{os.getpid() % 10000}{kind[0]}{rep}{u[0]}")
                t.underlay = u
                try:
                    t.build()
                    r = measure_all(t, a.seconds)
                finally:
                    t.teardown()
                results[u][kind].append(r)
                print(f"rep {rep + 1} {kind:6} {u:4}: " + "  ".join(f"{k}={fmt(scale(k, v))}" for k, v in r.items()),
                      flush=True)
    rows = {u: table(results[u]) for u in underlays}
    md = "\n\n".join(f"### {u} underlay\n\n" + render(rows[u]) for u in underlays)
    print()
    print(md)
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    report = (f"# vxnat vs the kernel path\n\nMachine: {os.cpu_count()} vCPUs ({cpu}), kernel {os.uname().release}. "
              f"Command: `python3 benches/rig/rig.py --seconds {a.seconds:g} --reps {a.reps}`; "
              f"{a.reps} repetitions per path, alternating, {a.seconds:g} s per measurement, "
              f"{time.time() - started:.0f} s in all.\n\n{md}\n\n"
              + "".join(f"![vxnat/kernel, {u} underlay](chart-{u}.svg)\n" for u in underlays))
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report)
    for u in underlays:
        with open(os.path.join(a.out, f"chart-{u}.svg"), "w") as f:
            f.write(svg(rows[u], u))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nreport: {a.out}/report.md, charts: {a.out}/chart-*.svg ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
