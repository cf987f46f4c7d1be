#!/usr/bin/env bash
# Installs vxnat's CNI plugin (`vxnat-cni`) and its network configuration list on a node, where
# the container runtime (containerd, CRI-O) looks for them. kube-flannel.yml does this with two
# init containers running `cp -f`; configs/vxnat-daemonset.yaml runs this script in two init
# containers instead (`plugin`, then `conflist`), because `cp -f` is neither atomic nor quiet:
#
# - Atomic: each file is written to a temporary file in its target directory, fsynced,
#   chmodded, then renamed over the target (`mv -fT`), so the runtime never reads a half-written
#   plugin or configuration, and a plugin being executed is replaced without "text file busy".
#   The temporary name starts with a dot and does not end in .conf/.conflist/.json, so libcni
#   never loads it.
# - Idempotent: a target that already has the same contents and mode is left alone (`cmp`) and
#   reported as unchanged.
# - The conflist's `socket` (the ctl socket vxnat-cni asks for the pod gateway) is set from the
#   node configuration (`--node-config`, the DaemonSet's node.toml), so the two cannot disagree.
# - `--pod-cidr` sets host-local's subnet: each node allocates pod addresses from its own
#   spec.podCIDR (`--pod-cidr node` reads it from the Kubernetes API for Node $NODE_NAME with the
#   pod's service account, which is what the DaemonSet does).
#
# usage: install-cni.sh [options] [all|plugin|conflist]      (default: all, the plugin first)
#   --root DIR          prefix for the target directories (tests; a host mounted at /host) [$CNI_ROOT]
#   --bin-dir DIR       CNI plugin directory, default /opt/cni/bin          [$CNI_BIN_DIR]
#   --conf-dir DIR      CNI configuration directory, default /etc/cni/net.d [$CNI_CONF_DIR]
#   --plugin FILE       the vxnat-cni binary, default /usr/local/bin/vxnat-cni  [$VXNAT_CNI_PLUGIN]
#   --conflist FILE     the configuration list, default /usr/local/share/vxnat/10-vxnat.conflist
#                       [$VXNAT_CNI_CONFLIST]
#   --conf-name NAME    name in the configuration directory, default the source's name [$CNI_CONF_NAME]
#   --node-config FILE  vxnat's node.toml: its `socket` (default /run/vxnat/vxnat.sock) goes into
#                       the conflist                                        [$VXNAT_NODE_CONFIG]
#   --pod-cidr CIDR     host-local's subnet in the conflist; `node`: spec.podCIDR of Node
#                       $NODE_NAME from the Kubernetes API (in-cluster service account) [$POD_CIDR]
# Exit status: 0 installed or unchanged, 1 an error (named on stderr), 2 a usage error.
set -euo pipefail

me=install-cni
die() {
    echo "$me: error: $*" >&2
    exit 1
}
warn() { echo "$me: warning: $*" >&2; }
usage() { # usage STATUS: the header's usage lines, on stderr unless asked for
    if (($1 == 0)); then
        sed -n '/^# usage:/,/^# Exit status/s/^# \{0,1\}//p' "$0"
    else
        sed -n '/^# usage:/,/^# Exit status/s/^# \{0,1\}//p' "$0" >&2
    fi
    exit "$1"
}

root=${CNI_ROOT:-}
bin_dir=${CNI_BIN_DIR:-/opt/cni/bin}
conf_dir=${CNI_CONF_DIR:-/etc/cni/net.d}
plugin_src=${VXNAT_CNI_PLUGIN:-/usr/local/bin/vxnat-cni}
conflist_src=${VXNAT_CNI_CONFLIST:-/usr/local/share/vxnat/10-vxnat.conflist}
conf_name=${CNI_CONF_NAME:-}
node_config=${VXNAT_NODE_CONFIG:-}
pod_cidr=${POD_CIDR:-}
what=all
default_socket=/run/vxnat/vxnat.sock

while (($#)); do
    case $1 in
        --root | --bin-dir | --conf-dir | --plugin | --conflist | --conf-name | --node-config | --pod-cidr)
            (($# >= 2)) || { echo "$me: $1 needs a value" >&2; usage 2; }
            case $1 in
                --root) root=$2 ;;
                --bin-dir) bin_dir=$2 ;;
                --conf-dir) conf_dir=$2 ;;
                --plugin) plugin_src=$2 ;;
                --conflist) conflist_src=$2 ;;
                --conf-name) conf_name=$2 ;;
                --node-config) node_config=$2 ;;
                --pod-cidr) pod_cidr=$2 ;;
            esac
            shift 2
            ;;
        all | plugin | conflist)
            what=$1
            shift
            ;;
        -h | --help) usage 0 ;;
        *)
            echo "$me: unknown argument: $1" >&2
            usage 2
            ;;
    esac
done

if [[ -n $root ]]; then
    [[ -d $root ]] || die "root $root: no such directory (--root / CNI_ROOT)"
    root=${root%/}
fi
[[ $bin_dir == /* ]] || die "bin dir $bin_dir: not an absolute path"
[[ $conf_dir == /* ]] || die "conf dir $conf_dir: not an absolute path"

tmpfiles=()
cleanup() { ((${#tmpfiles[@]} == 0)) || rm -f -- "${tmpfiles[@]}"; }
trap cleanup EXIT

# install_file SRC DEST MODE: DEST gets SRC's contents and MODE, atomically; nothing is written
# when it already has both.
install_file() {
    local src=$1 dest=$2 mode=$3 dir name tmp
    dir=$(dirname -- "$dest")
    name=$(basename -- "$dest")
    [[ ! -d $dest || -L $dest ]] || die "$dest: is a directory"
    if [[ -f $dest && ! -L $dest ]] && cmp -s -- "$src" "$dest" && [[ $(stat -c %a -- "$dest") == "$mode" ]]; then
        echo "$me: $dest unchanged"
        return
    fi
    mkdir -p -- "$dir"
    tmp=$(mktemp -p "$dir" ".$name.tmp.XXXXXX")
    tmpfiles+=("$tmp")
    cat -- "$src" >"$tmp"
    chmod -- "$mode" "$tmp"
    sync -- "$tmp" || warn "fsync $tmp failed; installing anyway"
    mv -fT -- "$tmp" "$dest"
    sync -- "$dir" || warn "fsync $dir failed"
    echo "$me: installed $dest"
}

# The top-level `socket` of a node.toml (before any [table]), else vxnat's default.
node_socket() {
    local file=$1 line value
    [[ -f $file ]] || die "node config $file: no such file (--node-config / VXNAT_NODE_CONFIG)"
    line=$(sed -n -e '/^[[:space:]]*\[/q' -e '/^[[:space:]]*socket[[:space:]]*=/p' -- "$file" | head -n1)
    if [[ -z $line ]]; then
        echo "$default_socket"
        return
    fi
    value=$(sed -n -e 's/^[^=]*=[[:space:]]*"\([^"\\]*\)"[[:space:]]*\(#.*\)\{0,1\}$/\1/p' \
        -e "s/^[^=]*=[[:space:]]*'\\([^']*\\)'[[:space:]]*\\(#.*\\)\\{0,1\\}\$/\\1/p" <<<"$line")
    [[ -n $value ]] || die "node config $file: cannot read socket from: $line"
    echo "$value"
}

# spec.podCIDR of Node $NODE_NAME, read with the pod's service account.
node_pod_cidr() {
    local sa=${VXNAT_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount} url host body cidr
    [[ -n ${NODE_NAME:-} ]] || die "--pod-cidr node: NODE_NAME is not set (the DaemonSet passes spec.nodeName)"
    if [[ -n ${VXNAT_API_URL:-} ]]; then
        url=$VXNAT_API_URL
    else
        [[ -n ${KUBERNETES_SERVICE_HOST:-} ]] ||
            die "--pod-cidr node: KUBERNETES_SERVICE_HOST is not set (not in a pod?); pass --pod-cidr CIDR"
        host=$KUBERNETES_SERVICE_HOST
        [[ $host != *:* ]] || host="[$host]"
        url="https://$host:${KUBERNETES_SERVICE_PORT:-443}"
    fi
    [[ -r $sa/token ]] || die "service account token $sa/token: no such file"
    command -v curl >/dev/null || die "--pod-cidr node needs curl"
    local args=(-sS --fail --max-time 10 -H @-)
    [[ ! -r $sa/ca.crt ]] || args+=(--cacert "$sa/ca.crt")
    body=$(printf 'Authorization: Bearer %s\n' "$(<"$sa/token")" |
        curl "${args[@]}" "$url/api/v1/nodes/$NODE_NAME") ||
        die "reading Node $NODE_NAME from $url failed (the ClusterRole grants get on nodes)"
    cidr=$(tr -d '\n' <<<"$body" | grep -o '"podCIDR"[[:space:]]*:[[:space:]]*"[^"]*"' | head -n1 |
        sed 's/.*"\([^"]*\)"$/\1/') || true
    [[ -n $cidr ]] || die "Node $NODE_NAME has no spec.podCIDR yet (kube-controller-manager \
--allocate-node-cidrs assigns it, as flannel also needs); kubelet retries this init container"
    echo "$cidr"
}

# render_conflist OUT: the source with vxnat's socket and host-local's subnet set.
render_conflist() {
    local out=$1 socket n
    grep -q '"type"[[:space:]]*:[[:space:]]*"vxnat-cni"' -- "$conflist_src" ||
        die "conflist $conflist_src: no plugin of type vxnat-cni in it"
    cat -- "$conflist_src" >"$out"
    if [[ -n $node_config ]]; then
        socket=$(node_socket "$node_config")
        [[ $socket =~ ^/[A-Za-z0-9._/@+:,=-]+$ ]] ||
            die "node config $node_config: socket $socket: the CNI plugin needs an absolute path of plain characters"
        n=$(grep -o '"socket"[[:space:]]*:' -- "$out" | wc -l)
        [[ $n == 1 ]] || die "conflist $conflist_src: has $n \"socket\" keys; expected one (vxnat-cni's)"
        sed -i "s|\"socket\"\\([[:space:]]*:[[:space:]]*\\)\"[^\"]*\"|\"socket\"\\1\"$socket\"|" -- "$out"
        grep -q "\"socket\"[[:space:]]*:[[:space:]]*\"$socket\"" -- "$out" ||
            die "conflist $conflist_src: its \"socket\" value is not a plain string"
    fi
    if [[ -n $pod_cidr ]]; then
        [[ $pod_cidr != node ]] || pod_cidr=$(node_pod_cidr)
        [[ $pod_cidr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]] || die "pod CIDR $pod_cidr: not an IPv4 CIDR"
        n=$(grep -o '"subnet"[[:space:]]*:' -- "$out" | wc -l)
        [[ $n == 1 ]] || die "conflist $conflist_src: has $n \"subnet\" keys; expected one (host-local's range)"
        sed -i "s|\"subnet\"\\([[:space:]]*:[[:space:]]*\\)\"[^\"]*\"|\"subnet\"\\1\"$pod_cidr\"|" -- "$out"
        grep -q "\"subnet\"[[:space:]]*:[[:space:]]*\"$pod_cidr\"" -- "$out" ||
            die "conflist $conflist_src: its \"subnet\" value is not a plain string"
    fi
}

install_plugin() {
    [[ -f $plugin_src ]] || die "plugin $plugin_src: no such file (the vxnat-cni binary; --plugin / VXNAT_CNI_PLUGIN)"
    install_file "$plugin_src" "$root$bin_dir/vxnat-cni" 755
}

install_conflist() {
    [[ -f $conflist_src ]] || die "conflist $conflist_src: no such file (--conflist / VXNAT_CNI_CONFLIST)"
    local name=${conf_name:-$(basename -- "$conflist_src")} rendered first t
    [[ $name =~ \.(conf|conflist|json)$ && $name != */* ]] ||
        die "conf name $name: the runtime loads only *.conf, *.conflist and *.json files"
    rendered=$(mktemp)
    tmpfiles+=("$rendered")
    render_conflist "$rendered"
    install_file "$rendered" "$root$conf_dir/$name" 644
    # containerd and CRI-O use the first configuration by name (libcni's order).
    first=$(find "$root$conf_dir" -mindepth 1 -maxdepth 1 \( -name '*.conf' -o -name '*.conflist' -o -name '*.json' \) \
        -printf '%f\n' | LC_ALL=C sort | head -n1)
    [[ $first == "$name" ]] ||
        warn "$root$conf_dir/$first sorts before $name: the runtime uses it, not vxnat, until it is removed"
    # The plugins chained in the list must be beside vxnat-cni (containernetworking-plugins).
    grep -o '"type"[[:space:]]*:[[:space:]]*"[^"]*"' -- "$rendered" | sed 's/.*"\([^"]*\)"$/\1/' |
        while read -r t; do
            [[ $t == vxnat-cni || -x $root$bin_dir/$t ]] ||
                warn "$root$bin_dir/$t: missing; $name uses it (install the containernetworking plugins)"
        done
}

case $what in
    plugin) install_plugin ;;
    conflist) install_conflist ;;
    all)
        # The plugin first: a configuration must never name a plugin that is not there yet.
        install_plugin
        install_conflist
        ;;
esac
