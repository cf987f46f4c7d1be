#!/usr/bin/env bash
# vxnat's demo on the embedded default: a two-node cluster in network namespaces driven by
# configs/demo-cluster.yaml. Each node runs `vxnat run`; two pods per node are attached with
# `vxnat ctl attach`; then ping, TCP (iperf3) across nodes and on one node, node-to-pod through
# the host port, and each node's `vxnat ctl stats`. Everything is removed on exit, even on
# failure. Needs root (namespaces, XDP, AF_XDP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p vxnat-control
BIN="$PWD/target/release/vxnat"
STATE="$PWD/configs/demo-cluster.yaml"
TAG="vxdemo-$$"
WORK="$(mktemp -d /tmp/vxnat-demo.XXXXXX)"
PIDS=()
NSES=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for n in "${NSES[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

ns() { ip netns add "$1"; NSES+=("$1"); ip -n "$1" link set lo up; }

echo "== topology: node-a and node-b joined by a veth underlay (192.168.77.0/24), two pods each"
ns "$TAG-a"; ns "$TAG-b"
ip -n "$TAG-a" link add ul type veth peer name ul netns "$TAG-b"
ip -n "$TAG-a" addr add 192.168.77.1/24 dev ul; ip -n "$TAG-a" link set ul up
ip -n "$TAG-b" addr add 192.168.77.2/24 dev ul; ip -n "$TAG-b" link set ul up

pod() { # node-ns pod-name host-if ip gateway
    ns "$2"
    ip -n "$1" link add "$3" type veth peer name eth0 netns "$2"
    ip -n "$1" link set "$3" mtu 1450 up
    ip -n "$2" addr add "$4/32" dev eth0
    ip -n "$2" link set eth0 mtu 1450 up
    ip -n "$2" route add "$5" dev eth0 scope link
    ip -n "$2" route add default via "$5" dev eth0
}
pod "$TAG-a" "$TAG-a1" vxa1 10.244.0.2 10.244.0.1
pod "$TAG-a" "$TAG-a2" vxa2 10.244.0.3 10.244.0.1
pod "$TAG-b" "$TAG-b1" vxb1 10.244.1.2 10.244.1.1
pod "$TAG-b" "$TAG-b2" vxb2 10.244.1.3 10.244.1.1

for n in a b; do
    sed -e "s|^state = .*|state = \"$STATE\"|" -e "s|^socket = .*|socket = \"$WORK/node-$n.sock\"|" \
        -e '0,/^uplink = /s|^uplink = .*|uplink = "ul"|' -e "s|^cores = .*|cores = []|" "configs/node-$n.toml" > "$WORK/node-$n.toml"
    ip netns exec "$TAG-$n" "$BIN" run --config "$WORK/node-$n.toml" 2> "$WORK/node-$n.log" &
    PIDS+=($!)
done
for n in a b; do
    for _ in $(seq 100); do "$BIN" ctl --socket "$WORK/node-$n.sock" ports >/dev/null 2>&1 && break; sleep 0.1; done
    sed 's/^/   /' "$WORK/node-$n.log"
done

echo "== attach pods (MAC learned from the veth peer)"
ctl() { "$BIN" ctl --socket "$WORK/node-$1.sock" "${@:2}"; }
ctl a attach --ifname vxa1 --ip 10.244.0.2 >/dev/null
ctl a attach --ifname vxa2 --ip 10.244.0.3 >/dev/null
ctl b attach --ifname vxb1 --ip 10.244.1.2 >/dev/null
ctl b attach --ifname vxb2 --ip 10.244.1.3 >/dev/null
ctl a ports | grep -E '"(ifname|ip)"' | paste - - | sed 's/^ */   /'

FAIL=0
check() { # description, command...
    if "${@:2}" >/dev/null 2>&1; then echo "   ok    $1"; else echo "   FAIL  $1"; FAIL=1; fi
}
echo "== traffic"
check "ping pod a1 -> pod b1 (across nodes, VXLAN)" ip netns exec "$TAG-a1" ping -c 3 -i 0.2 -W 2 10.244.1.2
check "ping pod a1 -> pod a2 (same node)" ip netns exec "$TAG-a1" ping -c 3 -i 0.2 -W 2 10.244.0.3
check "ping pod b2 -> its gateway (the node)" ip netns exec "$TAG-b2" ping -c 3 -i 0.2 -W 2 10.244.1.1
check "ping node-a -> pod b2 (host port, VXLAN)" ip netns exec "$TAG-a" ping -c 3 -i 0.2 -W 2 10.244.1.3
if command -v iperf3 >/dev/null; then
    ip netns exec "$TAG-b1" iperf3 -s -1 -D -B 10.244.1.2 >/dev/null 2>&1
    ip netns exec "$TAG-a2" iperf3 -s -1 -D -B 10.244.0.3 >/dev/null 2>&1
    sleep 0.5
    r=$(ip netns exec "$TAG-a1" iperf3 -c 10.244.1.2 -t 3 -J 2>/dev/null | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo "failed")
    echo "   TCP pod a1 -> pod b1 (across nodes): $r Gbit/s"
    r=$(ip netns exec "$TAG-a1" iperf3 -c 10.244.0.3 -t 3 -J 2>/dev/null | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo "failed")
    echo "   TCP pod a1 -> pod a2 (same node):    $r Gbit/s"
    ip netns exec "$TAG-b1" iperf3 -s -1 -D -B 10.244.1.2 >/dev/null 2>&1
    sleep 0.5
    r=$(ip netns exec "$TAG-a1" iperf3 -c 10.96.0.100 -t 3 -J 2>/dev/null | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo "failed")
    echo "   TCP pod a1 -> Service iperf (ClusterIP 10.96.0.100, endpoint b1): $r Gbit/s"
    [ "$r" != "failed" ] || FAIL=1
fi

for n in a b; do
    echo "== vxnat ctl stats, node-$n"
    ctl "$n" stats | sed 's/^/   /'
done
if [ "$FAIL" = 0 ]; then echo "== demo ok"; else echo "== demo FAILED"; exit 1; fi
