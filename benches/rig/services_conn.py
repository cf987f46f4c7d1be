#!/usr/bin/env python3
"""New TCP connections per second through a ClusterIP, and connect latency: vxnat against the
kernel path (flannel's VXLAN configuration plus nftables DNAT as kube-proxy's nftables mode
writes it), the same topology, one run.

Client pod on node A, the Service's endpoint pod on node B (each connection crosses VXLAN).
The client opens connections one after another for a fixed time (connect, read to EOF, close;
the endpoint closes first, so the client never piles up TIME_WAIT ports); measured: completed
connections per second and the connect() latency p50/p99. Paths alternate over repetitions.

Usage (root): python3 benches/rig/services_conn.py [--seconds 5] [--reps 3]
"""
import argparse, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlay_udp as rig  # noqa: E402  (the shared topology builder)

VIP, PORT, EP_PORT = "10.96.0.50", 80, 8080
SERVICE = """
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    clusterIP: 10.96.0.50
    ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-x1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"""

SERVER = r"""
import socket, time, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.244.1.2", 8080)); s.listen(1024); s.settimeout(1.0)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        c, _ = s.accept()
        c.close()   # the endpoint closes first
    except socket.timeout:
        pass
"""

CLIENT = r"""
import socket, time, sys, json
seconds = float(sys.argv[1]); lat = []; fails = 0
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    t0 = time.perf_counter()
    try:
        c = socket.create_connection(("10.96.0.50", 80), timeout=2)
        t1 = time.perf_counter()
        c.recv(1)
        c.close()
        lat.append(t1 - t0)
    except OSError:
        fails += 1
print(json.dumps({"n": len(lat), "fails": fails, "lat": lat}))
"""


# kube-proxy's nftables mode for the ClusterIP, on node A (where the client is).
KUBE_PROXY = ("table ip kube-proxy {\n chain nat-prerouting {\n type nat hook prerouting priority dstnat; policy accept;\n"
              f" ip daddr {VIP} tcp dport {PORT} dnat to 10.244.1.2:{EP_PORT}\n }}\n}}\n")


class ServiceTopology(rig.Topology):
    services = SERVICE
    kube_proxy = KUBE_PROXY
    kube_proxy_nodes = "a"

def measure(t, seconds):
    srv = subprocess.Popen(["ip", "netns", "exec", t.pod["b"], "python3", "-c", SERVER, str(seconds + 3)])
    time.sleep(0.5)
    out = rig.sh("ip", "netns", "exec", t.pod["a"], "python3", "-c", CLIENT, str(seconds))
    srv.wait()
    import json
    r = json.loads(out)
    lat = sorted(r["lat"])
    return {"cps": r["n"] / seconds, "fails": r["fails"], "p50_us": rig.percentile_us(lat, 0.5), "p99_us": rig.percentile_us(lat, 0.99)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, XDP)")
    res = {"kernel": [], "vxnat": []}
    for rep in range(a.reps):
        for kind in (("kernel", "vxnat") if rep % 2 == 0 else ("vxnat", "kernel")):
            t = ServiceTopology(kind, f"vxsvc{os.getpid()}{kind[0]}{rep}")
            try:
                t.build()
                r = measure(t, a.seconds)
                res[kind].append(r)
                print(f"rep {rep + 1} {kind:6}: {r['cps']:8.0f} conn/s  connect p50 {r['p50_us']:7.0f} us  p99 {r['p99_us']:7.0f} us  failures {r['fails']}", flush=True)
            finally:
                t.teardown()
    print()
    print("| path | new connections/s (median, min-max) | connect p50 (us) | connect p99 (us) | failures | vxnat/kernel conn/s |")
    print("|---|---|---|---|---|---|")
    med = {k: statistics.median([r["cps"] for r in v]) for k, v in res.items()}
    for k, v in res.items():
        cps = [r["cps"] for r in v]
        ratio = f"{med['vxnat'] / med['kernel']:.2f}" if k == "vxnat" and med["kernel"] else ""
        print(f"| {k} | {med[k]:.0f} ({min(cps):.0f}-{max(cps):.0f}) | {statistics.median([r['p50_us'] for r in v]):.0f} | "
              f"{statistics.median([r['p99_us'] for r in v]):.0f} | {sum(r['fails'] for r in v)} | {ratio} |")


if __name__ == "__main__":
    main()
