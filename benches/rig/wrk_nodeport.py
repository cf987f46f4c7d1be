#!/usr/bin/env python3
"""HTTP load through a NodePort (issue 15): vxnat against the kernel path, the same topology, one run.

Topology (overlay_udp.Topology on rig.py's underlay switch, MTU 1500; pods MTU 1450): nodes A and
B, one pod per node, and two external clients on the underlay, each in its own namespace
(192.168.77.100 and 192.168.77.101, so two distinct client addresses with their own TCP
timestamp clocks, as two machines behind a load balancer would be).
  kernel: both nodes as flannel's vxlan backend configures them (flannel.1, cni0), and the
          NodePort as kube-proxy's nftables mode writes it: `fib daddr type local tcp dport
          30090` marked and DNAT'd to 10.244.1.2:8080 in prerouting, the mark masqueraded
          `fully-random` in postrouting (the whole port range, as kube-proxy does);
  vxnat:  both nodes run `vxnat run` on the demo cluster state plus the Service `np`
          (NodePort 30090 -> targetPort 8080, externalTrafficPolicy: Cluster, endpoint
          10.244.1.2 on node B), the default `nat.snat_ports` (1024-29999) and hold time.
The NodePort is addressed on node A, whose only endpoint is on node B: node A DNATs to the pod
and SNATs to its own address (Cluster policy), every connection crosses VXLAN.

Backend: nginx (its own prefix, config, pid and error log in a temporary directory; no system
file touched) in pod B, `worker_processes` --nginx-workers, `access_log off`, `keepalive_timeout
0` (nginx closes every connection first, so the backend holds each SNAT tuple in TIME_WAIT),
serving a small static file on 10.244.1.2:8080.

Load: in each client at once, `wrk -t1 -c<--conns> -d<--seconds>s -H 'Connection: close'
--latency http://192.168.77.1:30090/` (a new connection per request). Measured per run:
  - wrk, per client and summed: requests, requests/s, socket errors (connect, read, write,
    timeout), non-2xx/3xx responses, latency p50/p90/p99 and Max (converted to ms; the p99 of
    the two clients is the worse of their two p99s);
  - at the backend pod's eth0 (tcpdump -s 96 'tcp port 8080', read back by a pure-Python pcap
    reader): SYNs toward 8080 (SYN set; ACK, RST, FIN clear), SYN|ACKs from the backend, and
    SYNs the backend answered with a bare ACK (the next packet from the backend to that tuple
    is an ACK without SYN: it still held the tuple in TIME_WAIT, incident 2), plus SYNs answered
    by RST or not answered at all; tcpdump's own counts of the SYNs and SYN|ACKs cross-check
    the reader, and its kernel drop count says whether the capture is complete;
  - vxnat: `vxnat ctl --json stats` on node A after the run, every key (and every named
    counter) containing "snat", raw, the stats kept whole in --out; kernel: node A's
    nf_conntrack_count after the run;
  - the machine's busy CPU during the run (the machine may be shared).
Paths alternate over repetitions (kernel, vxnat, vxnat, kernel, ...), a fresh topology for each
measurement. The vxnat binary is copied first, so a rebuild during the run does not change it.
Reported: a markdown table per path (medians over the repetitions, vxnat/kernel requests/s),
one row per run, vxnat's SNAT counters; report.md and results.json in --out.

Usage (root, after `cargo build --release -p vxnat-control`):
  python3 benches/rig/wrk_nodeport.py [--seconds 60] [--reps 1] [--conns 16] [--nginx-workers 1]
                                      [--out target/rig/wrk_nodeport] [--keep-pcap] [--bin target/release/vxnat]
"""
import argparse, atexit, hashlib, json, os, re, shutil, signal, statistics, struct, subprocess, sys, tempfile, time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlay_udp as topo  # noqa: E402  (the shared topology pieces)

NODE_A = topo.UNDERLAY["a"]
NODE_PORT = 30090
BACKEND, BACKEND_PORT = topo.POD["b"], 8080
CLIENTS = ("192.168.77.100", "192.168.77.101")
NGINX = "/usr/sbin/nginx"
BODY = "hello from the backend pod on node B\n"

SERVICE = """
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: np, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.51
    externalTrafficPolicy: Cluster
    ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30090}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: np-x1, namespace: default, labels: {kubernetes.io/service-name: np}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-b}
"""

# kube-proxy's nftables mode reduced to this Service: the NodePort marked and DNAT'd in
# prerouting, the mark masqueraded fully-random (no port range: the kernel's whole range).
KUBE_PROXY = """table ip kube-proxy {
 chain nat-prerouting {
  type nat hook prerouting priority dstnat; policy accept;
  fib daddr type local tcp dport 30090 meta mark set mark | 0x4000 dnat to 10.244.1.2:8080
 }
 chain nat-postrouting {
  type nat hook postrouting priority srcnat; policy accept;
  meta mark & 0x4000 == 0x4000 masquerade fully-random
 }
}
"""

NGINX_CONF = """user root;
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_timeout 0;
  default_type text/plain;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen {addr}:{port};
    root {dir}/www;
    location / {{ index index.html; }}
  }}
}}
"""

# One request, the server closing first (as wrk's will be): proves the NodePort answers and
# resolves neighbours before the measurement.
WARMUP = r"""
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
last = "no attempt"
while time.time() < deadline:
    try:
        c = socket.create_connection((host, port), timeout=1)
        c.settimeout(2)
        c.sendall(b"GET / HTTP/1.1\r\nHost: np\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = c.recv(4096)
            if not b:
                break
            data += b
        c.close()
        if data.startswith(b"HTTP/1.1 200"):
            print("ok")
            sys.exit(0)
        last = repr(data[:60])
    except OSError as e:
        last = str(e)
    time.sleep(0.2)
print("failed: " + last)
sys.exit(1)
"""

class WrkTopology(topo.Topology):
    """rig.py's switched underlay with two external clients; default SNAT range on vxnat."""
    services = SERVICE
    kube_proxy = KUBE_PROXY

    def build(self):
        self.switch = self.ns("sw")
        self.node = {n: self.ns(f"node{n}") for n in "ab"}
        self.pod = {n: self.ns(f"pod{n}") for n in "ab"}
        self.clients = [self.ns(f"client{i + 1}") for i in range(len(CLIENTS))]
        self.build_switch(((self.node["a"], "pa", "ul"), (self.node["b"], "pb", "ul"))
                          + tuple((c, f"pc{i + 1}", "eth0") for i, c in enumerate(self.clients)))
        for c, addr in zip(self.clients, CLIENTS):
            self.ip(c, "addr", "add", f"{addr}/24", "dev", "eth0")
            self.ip(c, "link", "set", "eth0", "up")
        getattr(self, f"build_{self.kind}")()

    def socket(self, n):
        return os.path.join(self.work, f"node-{n}.sock")

    def spawn(self, args, **kw):
        """A process this run owns: stopped at teardown."""
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def teardown(self):
        # Ours first (nginx, tcpdump, wrk, vxnat: SIGTERM, then SIGKILL after 10 s), then anything
        # still inside this run's own namespaces (nginx workers whose master was killed), then
        # the namespaces and the work directory.
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for ns in self.nses:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        super().teardown()


# ---- wrk output ----

UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(text):
    """wrk's time format (format_time: 629.00us, 1.23ms, 2.00s, 1.50m, 1.00h) in milliseconds."""
    m = re.fullmatch(r"\s*(-?[\d.]+)\s*(us|ms|s|m|h)\s*", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(out):
    r = {"requests": None, "duration_s": None, "rps": None, "errors_connect": 0, "errors_read": 0, "errors_write": 0,
         "errors_timeout": 0, "non_2xx_3xx": 0, "latency_avg_ms": float("nan"), "latency_max_ms": float("nan"),
         "latency_pct_ms": {}}
    for line in out.splitlines():
        m = re.match(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+\s*$", line)
        if m:
            r["latency_avg_ms"], r["latency_max_ms"] = to_ms(m.group(1)), to_ms(m.group(3))
            continue
        m = re.match(r"^\s*(\d+(?:\.\d+)?)%\s+(\S+)\s*$", line)
        if m:
            r["latency_pct_ms"][f"{float(m.group(1)):g}"] = to_ms(m.group(2))
            continue
        m = re.match(r"^\s*(\d+)\s+requests in\s+(\S+),", line)
        if m:
            r["requests"], r["duration_s"] = int(m.group(1)), to_ms(m.group(2)) / 1e3
            continue
        m = re.match(r"^\s*Socket errors:\s*connect (\d+), read (\d+), write (\d+), timeout (\d+)", line)
        if m:
            r["errors_connect"], r["errors_read"], r["errors_write"], r["errors_timeout"] = (int(x) for x in m.groups())
            continue
        m = re.match(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", line)
        if m:
            r["non_2xx_3xx"] = int(m.group(1))
            continue
        m = re.match(r"^\s*Requests/sec:\s*([\d.]+)", line)
        if m:
            r["rps"] = float(m.group(1))
    r["parsed"] = r["requests"] is not None and r["rps"] is not None
    r["errors"] = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"] + r["non_2xx_3xx"]
    for q in ("50", "75", "90", "99"):
        r[f"p{q}_ms"] = r["latency_pct_ms"].get(q, float("nan"))
    return r


# ---- the capture ----

def pcap_packets(path):
    """(src ip, src port, dst ip, dst port, tcp flags) of every IPv4 TCP packet (first fragment
    or unfragmented) in a classic pcap file (either byte order, us or ns timestamps; Ethernet
    with VLAN tags, Linux cooked v1/v2, raw IPv4). A record cut short at the end of the file
    (the capture stopped mid-write) ends the reading."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (pcapng?)")
    linktype = struct.unpack_from(end + "I", data, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(end + "IIII")
    u16 = struct.Struct("!H")
    off, n = 24, len(data)
    while off + 16 <= n:
        _, _, incl, _ = rec.unpack_from(data, off)
        off += 16
        if off + incl > n:
            break
        pkt = data[off:off + incl]
        off += incl
        if linktype == 1:  # Ethernet
            if len(pkt) < 14:
                continue
            l3, etype = 14, u16.unpack_from(pkt, 12)[0]
            while etype in (0x8100, 0x88A8) and len(pkt) >= l3 + 4:
                etype = u16.unpack_from(pkt, l3 + 2)[0]
                l3 += 4
        elif linktype == 113:  # Linux cooked v1
            if len(pkt) < 16:
                continue
            l3, etype = 16, u16.unpack_from(pkt, 14)[0]
        elif linktype == 276:  # Linux cooked v2
            if len(pkt) < 20:
                continue
            l3, etype = 20, u16.unpack_from(pkt, 0)[0]
        elif linktype in (101, 228, 12):  # raw IP / raw IPv4
            l3, etype = 0, 0x0800
        else:
            raise ValueError(f"{path}: link type {linktype} not handled")
        if etype != 0x0800 or len(pkt) < l3 + 20:
            continue
        vihl = pkt[l3]
        if vihl >> 4 != 4 or pkt[l3 + 9] != 6:
            continue
        if u16.unpack_from(pkt, l3 + 6)[0] & 0x1FFF:  # a later fragment: no TCP header
            continue
        l4 = l3 + (vihl & 0x0F) * 4
        if len(pkt) < l4 + 14:
            continue
        src, dst = pkt[l3 + 12:l3 + 16], pkt[l3 + 16:l3 + 20]
        sport, dport = struct.unpack_from("!HH", pkt, l4)
        yield src, sport, dst, dport, pkt[l4 + 13]


FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


def count_handshakes(path, backend=BACKEND, port=BACKEND_PORT):
    """At the backend: SYNs toward it (SYN set; ACK, RST and FIN clear; ECN bits ignored), SYN|ACKs
    from it, and how each SYN was answered: by the next packet from the backend to the same
    tuple (SYN|ACK; a bare ACK, i.e. ACK without SYN or RST: the tuple was still in TIME_WAIT;
    RST), or not at all (a retransmitted SYN or the end of the capture came first)."""
    import socket as _s
    b = _s.inet_aton(backend)
    c = {"packets": 0, "syns": 0, "synacks": 0, "syns_answered_synack": 0, "syns_answered_bare_ack": 0,
         "syns_answered_rst": 0, "syns_unanswered": 0}
    pending = set()  # tuples (client ip, client port) with a SYN not yet answered
    bare_ack_tuples = []
    for src, sport, dst, dport, flags in pcap_packets(path):
        c["packets"] += 1
        if dst == b and dport == port:
            if flags & (SYN | ACK | RST | FIN) == SYN:
                c["syns"] += 1
                t = (src, sport)
                if t in pending:
                    c["syns_unanswered"] += 1  # the previous SYN got no answer before this one
                pending.add(t)
        elif src == b and sport == port:
            t = (dst, dport)
            if flags & (SYN | ACK) == (SYN | ACK):
                c["synacks"] += 1
            if t in pending:
                pending.discard(t)
                if flags & RST:
                    c["syns_answered_rst"] += 1
                elif flags & (SYN | ACK) == (SYN | ACK):
                    c["syns_answered_synack"] += 1
                elif flags & ACK and not flags & SYN:
                    c["syns_answered_bare_ack"] += 1
                    if len(bare_ack_tuples) < 20:
                        bare_ack_tuples.append(f"{_s.inet_ntoa(dst)}:{dport}")
                else:
                    pending.add(t)  # something else (no ACK bit): not an answer
    c["syns_unanswered"] += len(pending)
    c["bare_ack_examples"] = bare_ack_tuples
    return c


def tcpdump_count(path, expr):
    """tcpdump's own count of the packets matching expr in the capture (the reader's cross-check)."""
    r = subprocess.run(["tcpdump", "-nn", "-r", path, expr], capture_output=True, text=True)
    return len(r.stdout.splitlines()) if r.returncode == 0 else None


def tcpdump_summary(text):
    out = {}
    for key, pat in (("captured", r"(\d+) packets? captured"), ("received_by_filter", r"(\d+) packets? received by filter"),
                     ("dropped_by_kernel", r"(\d+) packets? dropped by kernel")):
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else None
    return out


# ---- vxnat ----

def ctl_stats(t, n):
    r = subprocess.run([topo.BIN, "ctl", "--socket", t.socket(n), "--json", "stats"], capture_output=True, text=True, timeout=30)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or r.stdout).strip()}


def grep_snat(obj, path=""):
    """Every key containing "snat" (its value as is), and every named counter (a [name, value, ...]
    list, as the drop lists' [name, count, description] are) whose name contains "snat", anywhere
    in obj, by path."""
    found = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            if "snat" in str(k).lower():
                found[p] = v
            else:
                found.update(grep_snat(v, p))
    elif isinstance(obj, list):
        if len(obj) >= 2 and isinstance(obj[0], str) and "snat" in obj[0].lower() and not isinstance(obj[1], (dict, list)):
            base = re.sub(r"\[\d+\]$", "", path)  # worker.ports[0].drops[3] -> worker.ports[0].drops.<name>
            found[f"{base}.{obj[0]}"] = obj[1]
        else:
            for i, v in enumerate(obj):
                found.update(grep_snat(v, f"{path}[{i}]"))
    return found


def port_names(stats):
    """Port numbers to names ("uplink", "pod ..."), to label the paths grep_snat finds."""
    return {x.get("port"): x.get("name") for x in stats.get("names", []) if isinstance(x, dict)}


def label_paths(found, stats):
    names = port_names(stats)
    ports = stats.get("worker", {}).get("ports", []) if isinstance(stats.get("worker"), dict) else []
    out = {}
    for p, v in found.items():
        m = re.match(r"^worker\.ports\[(\d+)\](.*)$", p)
        if m and int(m.group(1)) < len(ports):
            port = ports[int(m.group(1))].get("port")
            p = f"worker.ports[{names.get(port, port)}]{m.group(2)}"
        out[p] = v
    return out


# ---- one measurement ----

def busy():
    return topo.cpu_busy()


def measure(t, a, save_prefix):
    w = t.work
    daemons = list(t.procs)  # vxnat on both nodes (none on the kernel path)
    ng = os.path.join(w, "nginx")
    os.makedirs(os.path.join(ng, "www"))
    with open(os.path.join(ng, "www", "index.html"), "w") as f:
        f.write(BODY)
    conf = os.path.join(ng, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(workers=a.nginx_workers, dir=ng, addr=BACKEND, port=BACKEND_PORT))
    nginx_err = open(os.path.join(ng, "stderr.log"), "w")
    nginx = t.spawn(["ip", "netns", "exec", t.pod["b"], NGINX, "-p", ng + "/", "-c", conf, "-e", os.path.join(ng, "error.log")],
                    stdout=subprocess.DEVNULL, stderr=nginx_err)
    for _ in range(100):
        ss = subprocess.run(["ip", "netns", "exec", t.pod["b"], "ss", "-Hltn", f"sport = :{BACKEND_PORT}"], capture_output=True, text=True)
        if ss.stdout.strip() or nginx.poll() is not None:
            break
        time.sleep(0.05)
    if nginx.poll() is not None or not ss.stdout.strip():
        with open(os.path.join(ng, "error.log")) as f:
            raise RuntimeError(f"nginx did not start: {f.read().strip()}")

    warm = {}
    for c, addr in zip(t.clients, CLIENTS):
        r = subprocess.run(["ip", "netns", "exec", c, sys.executable, "-c", WARMUP, NODE_A, str(NODE_PORT), "10"],
                           capture_output=True, text=True, timeout=30)
        warm[addr] = r.stdout.strip() or r.stderr.strip()
    if any(v != "ok" for v in warm.values()):
        print(f"   warning: the NodePort did not answer every client before the run: {warm}", flush=True)

    pcap = os.path.join(w, "backend.pcap")
    dump_err_path = os.path.join(w, "tcpdump.err")
    dump_err = open(dump_err_path, "w")
    dump = t.spawn(["ip", "netns", "exec", t.pod["b"], "tcpdump", "-i", "eth0", "-nn", "-s", "96", "-B", "16384", "-U", "-Z", "root",
                    "-w", pcap, "tcp", "port", str(BACKEND_PORT)], stdout=subprocess.DEVNULL, stderr=dump_err)
    deadline = time.time() + 10
    while time.time() < deadline:
        with open(dump_err_path) as f:
            if "listening on" in f.read():
                break
        if dump.poll() is not None:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("tcpdump did not start")
    if dump.poll() is not None:
        with open(dump_err_path) as f:
            raise RuntimeError(f"tcpdump failed: {f.read().strip()}")

    stats_before = ctl_stats(t, "a") if t.kind == "vxnat" else None
    url = f"http://{NODE_A}:{NODE_PORT}/"
    secs = f"{a.seconds:g}s"
    b0, hz = busy()
    start = time.time()
    wrks = []
    for c, addr in zip(t.clients, CLIENTS):
        out = open(os.path.join(w, f"wrk-{addr}.out"), "w+")
        err = open(os.path.join(w, f"wrk-{addr}.err"), "w+")
        p = t.spawn(["ip", "netns", "exec", c, "wrk", "-t1", f"-c{a.conns}", f"-d{secs}", "-H", "Connection: close", "--latency", url],
                    stdout=out, stderr=err)
        wrks.append((addr, p, out, err))
    clients = {}
    for addr, p, out, err in wrks:
        try:
            rc = p.wait(timeout=max(0.0, start + a.seconds + 60 - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait(timeout=10)
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
        r = parse_wrk(text)
        out.close()
        err.close()
        r["rc"], r["output"], r["stderr"] = rc, text, etext.strip()
        clients[addr] = r
    elapsed = time.time() - start
    b1, _ = busy()
    time.sleep(1.0)  # the last connections' FINs and ACKs reach the capture
    dump.send_signal(signal.SIGINT)
    try:
        dump.wait(timeout=30)
    except subprocess.TimeoutExpired:
        dump.kill()
        dump.wait(timeout=10)
    with open(dump_err_path) as f:
        capture = tcpdump_summary(f.read())

    res = {"elapsed_s": elapsed, "busy_cpu_s_per_s": (b1 - b0) / hz / elapsed, "warmup": warm, "clients": clients}
    tot = {}
    ok = [c for c in clients.values() if c["parsed"]]
    tot["parsed"] = len(ok) == len(clients)
    tot["requests"] = sum(c["requests"] for c in ok)
    tot["rps"] = sum(c["rps"] for c in ok)
    for k in ("errors", "errors_connect", "errors_read", "errors_write", "errors_timeout", "non_2xx_3xx"):
        tot[k] = sum(c[k] for c in ok)
    lat = lambda k: max((c[k] for c in ok if c[k] == c[k]), default=float("nan"))
    tot["p50_ms"], tot["p99_ms"], tot["max_ms"] = lat("p50_ms"), lat("p99_ms"), lat("latency_max_ms")
    res["total"] = tot

    hs = count_handshakes(pcap)
    hs["capture"] = capture
    hs["check_tcpdump_syns"] = tcpdump_count(pcap, f"dst host {BACKEND} and dst port {BACKEND_PORT} and "
                                                   "tcp[tcpflags] & (tcp-syn|tcp-ack|tcp-rst|tcp-fin) == tcp-syn")
    hs["check_tcpdump_synacks"] = tcpdump_count(pcap, f"src host {BACKEND} and src port {BACKEND_PORT} and "
                                                      "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)")
    hs["reader_agrees"] = hs["check_tcpdump_syns"] == hs["syns"] and hs["check_tcpdump_synacks"] == hs["synacks"]
    res["backend"] = hs
    if a.keep_pcap:
        shutil.copy2(pcap, f"{save_prefix}-backend.pcap")

    if t.kind == "vxnat":
        gone = {n: p.returncode for n, p in zip("ab", daemons) if p.poll() is not None}
        res["vxnat_exited"] = gone
        if gone:
            print(f"   warning: vxnat exited during the run (node: exit status) {gone}; logs in {w}/node-*.log are removed at teardown:", flush=True)
            for n in gone:
                with open(os.path.join(w, f"node-{n}.log")) as f:
                    print("   " + "\n   ".join(f.read().strip().splitlines()[-10:]), flush=True)
        after = ctl_stats(t, "a")
        res["snat_node_a"] = label_paths(grep_snat(after), after)
        res["snat_node_a_before"] = label_paths(grep_snat(stats_before), stats_before) if stats_before else {}
        if "error" in after:
            res["snat_node_a"]["error"] = after["error"]
        with open(f"{save_prefix}-stats-node-a.json", "w") as f:
            json.dump(after, f, indent=1)
    else:
        try:
            res["conntrack_node_a"] = int(topo.sh("ip", "netns", "exec", t.node["a"], "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
        except (RuntimeError, ValueError):
            res["conntrack_node_a"] = None
    return res


# ---- report ----

def med(vals):
    vals = [v for v in vals if v is not None and v == v]
    return statistics.median(vals) if vals else float("nan")


def fnum(v, digits=0):
    if v is None or v != v:
        return "n/a"
    return f"{v:,.{digits}f}"


COLUMNS = ["requests/s", "total requests", "errors (socket + non-2xx/3xx)", "p99 latency (ms)", "max latency (ms)",
           "SYNs at backend", "SYN\\|ACKs", "SYNs answered by a bare ACK"]


def row_values(r):
    t, h = r["total"], r["backend"]
    return [t["rps"], t["requests"], t["errors"], t["p99_ms"], t["max_ms"], h["syns"], h["synacks"], h["syns_answered_bare_ack"]]


def summarize(results):
    s = {}
    for kind in ("kernel", "vxnat"):
        vals = [row_values(r) for r in results[kind]]
        s[kind] = [med([v[i] for v in vals]) for i in range(len(COLUMNS))] if vals else [float("nan")] * len(COLUMNS)
    k, x = s["kernel"][0], s["vxnat"][0]
    s["ratio_rps"] = x / k if k and k == k and x == x else float("nan")
    return s


def render(results, s, a):
    digits = [0, 0, 0, 2, 1, 0, 0, 0]
    lines = []
    for kind, label in (("kernel", "kernel (flannel.1 + kube-proxy nftables)"), ("vxnat", "vxnat")):
        n = len(results[kind])
        lines += [f"**{label}** ({n} run{'s' if n != 1 else ''}; median)", "",
                  "| " + " | ".join(COLUMNS) + (" | vxnat/kernel requests/s |" if kind == "vxnat" else " |"),
                  "|" + "---|" * (len(COLUMNS) + (1 if kind == "vxnat" else 0))]
        cells = [fnum(v, d) for v, d in zip(s[kind], digits)]
        if kind == "vxnat":
            cells.append("n/a" if s["ratio_rps"] != s["ratio_rps"] else f"**{s['ratio_rps']:.2f}**")
        lines += ["| " + " | ".join(cells) + " |", ""]
    lines += ["Each run (both clients together; p99 and max are the worse client's; errors: connect / read / write / timeout / "
              "non-2xx-3xx; backend SYNs answered by SYN|ACK / bare ACK / RST / not at all, and tcpdump's kernel drops):", "",
              "| run | path | requests/s | per client | requests | errors (c/r/w/t/n) | p50 ms | p99 ms | max ms | SYNs | SYN\\|ACKs | "
              "answered: SYN\\|ACK / bare ACK / RST / none | capture drops | busy CPU s/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("kernel", "vxnat"):
        for r in results[kind]:
            t, h = r["total"], r["backend"]
            per = " / ".join(fnum(c["rps"]) if c["parsed"] else "unparsed" for c in r["clients"].values())
            errs = f"{t['errors_connect']}/{t['errors_read']}/{t['errors_write']}/{t['errors_timeout']}/{t['non_2xx_3xx']}"
            ans = f"{h['syns_answered_synack']} / {h['syns_answered_bare_ack']} / {h['syns_answered_rst']} / {h['syns_unanswered']}"
            lines.append(f"| {r['run']} | {kind} | {fnum(t['rps'])} | {per} | {t['requests']} | {errs} | {fnum(t['p50_ms'], 2)} | "
                         f"{fnum(t['p99_ms'], 2)} | {fnum(t['max_ms'], 1)} | {h['syns']} | {h['synacks']} | {ans} | "
                         f"{h['capture'].get('dropped_by_kernel')} | {r['busy_cpu_s_per_s']:.2f} |")
    lines += ["", "vxnat node A, after each run: every `vxnat ctl --json stats` key (or named counter) containing `snat`, raw:", ""]
    for r in results["vxnat"]:
        lines.append(f"- run {r['run']}: `{json.dumps(r.get('snat_node_a', {}), sort_keys=True)}`")
    if results["kernel"]:
        lines += ["", "Kernel node A's nf_conntrack_count after each run: "
                  + ", ".join(f"run {r['run']}: {r.get('conntrack_node_a')}" for r in results["kernel"]) + "."]
    return "\n".join(lines)


def git_rev():
    r = subprocess.run(["git", "-C", topo.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    d = subprocess.run(["git", "-C", topo.ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return (r.stdout.strip() or "unknown") + ("+dirty" if d.stdout.strip() else "")


def main():
    ap = argparse.ArgumentParser(description="HTTP load (wrk, Connection: close) through a Cluster NodePort: vxnat vs the kernel path")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--conns", type=int, default=16, help="wrk connections per client")
    ap.add_argument("--nginx-workers", type=int, default=1, choices=(1, 2))
    ap.add_argument("--out", default=os.path.join(topo.ROOT, "target", "rig", "wrk_nodeport"))
    ap.add_argument("--keep-pcap", action="store_true", help="copy each run's backend capture to --out")
    ap.add_argument("--bin", default=topo.BIN, help="the vxnat binary (copied first)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, XDP)")
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} missing: cargo build --release -p vxnat-control")
    for tool in ("wrk", "tcpdump", "nft"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing")
    if not os.path.exists(NGINX):
        sys.exit(f"{NGINX} missing (nginx-light)")
    if a.seconds < 1 or a.reps < 1 or a.conns < 1:
        sys.exit("--seconds >= 1, --reps >= 1, --conns >= 1")
    snapshot = tempfile.mkdtemp(prefix="vxnat-wrk-bin-")
    atexit.register(shutil.rmtree, snapshot, True)
    topo.BIN = os.path.join(snapshot, "vxnat")
    shutil.copy2(a.bin, topo.BIN)
    with open(topo.BIN, "rb") as f:
        binary = {"path": os.path.abspath(a.bin), "sha256": hashlib.sha256(f.read()).hexdigest(),
                  "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(a.bin)))}
    topo.tear_down_at_exit()
    os.makedirs(a.out, exist_ok=True)
    results = {"kernel": [], "vxnat": []}
    started = time.time()
    for rep in range(a.reps):
        for kind in (("kernel", "vxnat") if rep % 2 == 0 else ("vxnat", "kernel")):
            t = WrkTopology(kind, f"wrk{os.getpid() % 100000}{kind[0]}{rep}")
            topo.LIVE.append(t)
            try:
                t.build()
                r = measure(t, a, os.path.join(a.out, f"{kind}-{rep + 1}"))
            finally:
                t.teardown()
                topo.LIVE.remove(t)
            r["run"] = rep + 1
            results[kind].append(r)
            tot, h = r["total"], r["backend"]
            extra = ""
            if kind == "vxnat":
                extra = "  snat " + json.dumps(r.get("snat_node_a", {}), sort_keys=True)
            elif r.get("conntrack_node_a") is not None:
                extra = f"  conntrack {r['conntrack_node_a']}"
            print(f"rep {rep + 1} {kind:6}: {tot['rps']:8.0f} req/s  {tot['requests']} requests  errors {tot['errors']} "
                  f"(connect {tot['errors_connect']}, read {tot['errors_read']}, write {tot['errors_write']}, timeout {tot['errors_timeout']}, "
                  f"non-2xx {tot['non_2xx_3xx']})  p99 {fnum(tot['p99_ms'], 2)} ms  max {fnum(tot['max_ms'], 1)} ms  "
                  f"backend: SYNs {h['syns']} SYN|ACKs {h['synacks']} bare ACKs {h['syns_answered_bare_ack']} "
                  f"(capture drops {h['capture'].get('dropped_by_kernel')}{'' if h['reader_agrees'] else ', READER DISAGREES WITH TCPDUMP'}){extra}",
                  flush=True)
            if not tot["parsed"]:
                for addr, c in r["clients"].items():
                    if not c["parsed"]:
                        print(f"   wrk in {addr} (rc {c['rc']}) printed nothing parsable: {c['stderr'] or c['output']!r}", flush=True)
    s = summarize(results)
    md = render(results, s, a)
    elapsed = time.time() - started
    print()
    print(md)
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    machine = {"cpus": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release}
    cmd = f"python3 benches/rig/wrk_nodeport.py --seconds {a.seconds:g} --reps {a.reps} --conns {a.conns}" + (
        f" --nginx-workers {a.nginx_workers}" if a.nginx_workers != 1 else "")
    report = (f"# HTTP through a NodePort (externalTrafficPolicy: Cluster): vxnat vs the kernel path\n\n"
              f"Machine: {os.cpu_count()} vCPUs ({cpu}), kernel {os.uname().release}. Command: `{cmd}`; {a.reps} run(s) per path, "
              f"alternating, a fresh topology each, {time.strftime('%Y-%m-%d')}, {elapsed:.0f} s in all. Tree {git_rev()}; vxnat binary "
              f"{binary['path']} (built {binary['mtime']}, sha256 {binary['sha256'][:12]}).\n\n"
              f"Two external clients ({', '.join(CLIENTS)}) each run `wrk -t1 -c{a.conns} -d{a.seconds:g}s -H 'Connection: close' --latency "
              f"http://{NODE_A}:{NODE_PORT}/` at once; node A DNATs to nginx ({a.nginx_workers} worker, `keepalive_timeout 0`: "
              f"the backend closes first and holds TIME_WAIT) in the pod {BACKEND} on node B and SNATs to its own address. "
              f"SYNs, SYN|ACKs and bare ACKs are counted in a capture at the backend pod's eth0. A connection refused with an RST shows in "
              f"wrk's socket errors (as a write error when the RST answers the SYN). vxnat: default `nat.snat_ports` "
              f"(1024-29999) and `snat_hold_s` (120); kernel: `masquerade fully-random`.\n\n{md}\n")
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "command": cmd, "machine": machine, "binary": binary, "tree": git_rev(), "elapsed_s": elapsed,
                   "summary": {"columns": COLUMNS, **s}, "runs": results}, f, indent=1)
    print(f"\nreport: {a.out}/report.md, raw: {a.out}/results.json ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
