#!/usr/bin/env python3
"""TCP bulk throughput pod to remote pod (iperf3): vxnat against the kernel VXLAN path, the
same topology, one run, at pod MTU 1450 (flannel's) and with jumbo pods (MTU 9000) behind the
same 1500-byte underlay.

Topology as overlay_udp.py (two nodes, veth underlay MTU 1500, one pod per node). iperf3 runs
for a fixed time from pod A to pod B; measured: received Gbit/s, and the whole machine's busy
CPU time (/proc/stat), so vxnat's polling and the kernel's softirq work count the same way.
Paths alternate over repetitions; medians and spread, with vxnat/kernel ratios.

Two underlays (`--underlays`): "veth" carries GSO frames between the nodes whole; "wire" is a
1500-byte link as a physical one is (the nodes' `ul` with `tso off gso off gro on`).

Three paths (`--paths`): the kernel (flannel.1), vxnat with pods' frames sent by AF_XDP, and
vxnat with `pod_tx = "packet-gro"` (software GRO, aggregated frames through a packet socket).

Usage (root): python3 benches/rig/tcp_bulk.py [--seconds 5] [--reps 3] [--mtus 1450,9000] [--underlays veth,wire]
              [--paths kernel,vxnat,vxnat-gro]
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlay_udp as rig  # noqa: E402  (the shared topology builder)


def wire(t):
    """The node-to-node veth as a 1500-byte wire: no GSO frame leaves a node (`tso off gso
    off`: segmented on the way out, as a NIC's TSO would), GRO on the way in."""
    for n in "ab":
        rig.sh("ip", "netns", "exec", t.node[n], "ethtool", "-K", "ul", "tso", "off", "gso", "off", "gro", "on")


def measure(t, seconds):
    server = subprocess.Popen(["ip", "netns", "exec", t.pod["b"], "iperf3", "-s", "-1", "-B", rig.POD["b"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    rig.sh("ip", "netns", "exec", t.pod["a"], "ping", "-c", "2", "-W", "1", rig.POD["b"], check=False)
    b0, hz = rig.cpu_busy()
    out = subprocess.run(["ip", "netns", "exec", t.pod["a"], "iperf3", "-c", rig.POD["b"], "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    b1, _ = rig.cpu_busy()
    server.wait(timeout=10)
    try:
        end = json.loads(out.stdout)["end"]
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        retrans = end["sum_sent"].get("retransmits", 0)
    except (ValueError, KeyError):
        print(f"   iperf3 failed: {out.stdout[-400:]} {out.stderr[-400:]}", flush=True)
        gbps, retrans = 0.0, -1
    cpu = (b1 - b0) / hz / seconds
    return {"gbps": gbps, "cpu_s_per_s": cpu, "retransmits": retrans}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mtus", default="1450,9000")
    ap.add_argument("--underlays", default="veth,wire", help="veth, wire or both (default)")
    ap.add_argument("--paths", default="kernel,vxnat,vxnat-gro",
                    help="kernel; vxnat (pod_tx xsk); vxnat-gro (pod_tx packet-gro: software GRO toward pods)")
    a = ap.parse_args()
    underlays = a.underlays.split(",")
    paths = a.paths.split(",")
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, XDP)")
    if not os.path.exists(rig.BIN):
        sys.exit(f"{rig.BIN} missing: cargo build --release -p vxnat-control")
    mtus = [int(m) for m in a.mtus.split(",")]
    results = {(k, m, u): [] for k in paths for m in mtus for u in underlays}
    for rep in range(a.reps):
        for kind in (paths if rep % 2 == 0 else paths[::-1]):
            for m in mtus:
                for u in underlays:
                    t = rig.Topology("kernel" if kind == "kernel" else "vxnat",
                                     f"vxtcp{os.getpid()}{kind[0]}{kind[-1]}{rep}{m}{u[0]}", pod_mtu=m)
                    if kind == "vxnat-gro":
                        t.extra_config = 'pod_tx = "packet-gro"\n'
                    try:
                        t.build()
                        if u == "wire":
                            wire(t)
                        r = measure(t, a.seconds)
                    finally:
                        t.teardown()
                    results[(kind, m, u)].append(r)
                    print(f"rep {rep + 1} {kind:6} pod MTU {m:5} {u:4}: {r['gbps']:6.2f} Gbit/s  "
                          f"cpu {r['cpu_s_per_s']:.2f} s/s  retransmits {r['retransmits']}", flush=True)
    print()
    print("| underlay | pod MTU | path | Gbit/s (median, min-max) | busy CPU s/s | vxnat/kernel |")
    print("|---|---|---|---|---|---|")
    for u in underlays:
        for m in mtus:
            med = {}
            for kind in paths:
                g = [r["gbps"] for r in results[(kind, m, u)]]
                med[kind] = statistics.median(g)
                cpu = statistics.median([r["cpu_s_per_s"] for r in results[(kind, m, u)]])
                ratio = "%.2f" % (med[kind] / med["kernel"]) if kind != "kernel" and med.get("kernel") else ""
                print(f"| {u} | {m} | {kind} | {med[kind]:.2f} ({min(g):.2f}-{max(g):.2f}) | {cpu:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
