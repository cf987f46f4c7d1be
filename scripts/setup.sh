#!/usr/bin/env bash
# Prepares a fresh Debian machine for building and testing vxnat: installs the Debian
# packages listed in scripts/debian-packages.txt that are missing, then checks that every
# header, library and tool the build and the tests use is really there (and the Rust
# toolchain with rustfmt and clippy), naming the Debian package that provides whatever is
# not. Idempotent.
#
#   bash scripts/setup.sh                install what is missing (apt-get), then check
#   bash scripts/setup.sh --check        only check (never runs apt-get or dpkg); exit 1 and
#                                        name the packages if anything is missing
#   bash scripts/setup.sh --list-checks  print the checks, one a line: kind, path or command,
#                                        package (tab-separated)
#
# VXNAT_SETUP_ROOT=DIR (only with --check) checks the tree under DIR instead of /: a file
# /usr/include/zlib.h is looked for as DIR/usr/include/zlib.h, and a command only in DIR
# followed by each directory of PATH (with PATH=/usr/bin:/bin, in DIR/usr/bin and DIR/bin).
# tests/tests/setup_script.rs runs it against fake trees.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=install
case "${1:-}" in
    "") ;;
    --check) mode=check ;;
    --list-checks) mode=list ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "setup: unknown option '$1' (try --help)" >&2
        exit 2
        ;;
esac
ROOT="${VXNAT_SETUP_ROOT:-}"
if [ -n "$ROOT" ] && [ "$mode" = install ]; then
    echo "setup: VXNAT_SETUP_ROOT only works with --check (it never installs into a fake root)" >&2
    exit 2
fi

# Debian's multiarch directory, as dataplane/xsk/build.rs names it (ARCH-linux-gnu).
MA="$(uname -m)-linux-gnu"

# What the build and the tests need: kind (file: a path, may be a glob; cmd: a program on
# PATH; rust: a Rust toolchain program), the path or command, and the Debian package that
# provides it (for rust: the rustup component). Every package named here is listed in
# scripts/debian-packages.txt (tests/tests/setup_script.rs checks that).
CHECKS=(
    # The build: dataplane/xsk/build.rs (clang on bpf/vxnat.bpf.c), libbpf-sys and libxdp-sys
    # (vendored C libraries built with make/cc/clang/m4/pkg-config, bindings with bindgen),
    # linking with -lelf -lz, crates over TLS.
    "file /usr/include/pcap/dlt.h libpcap-dev"
    "file /usr/include/bpf/bpf_helpers.h libbpf-dev"
    "file /usr/include/linux/bpf.h linux-libc-dev"
    "file /usr/include/$MA/asm/types.h linux-libc-dev"
    "file /usr/include/stdio.h libc6-dev"
    "file /usr/include/gelf.h libelf-dev"
    "file /usr/include/libelf.h libelf-dev"
    "file /usr/lib/$MA/libelf.so libelf-dev"
    "file /usr/include/zlib.h zlib1g-dev"
    "file /usr/lib/$MA/libz.so zlib1g-dev"
    "file /usr/lib/$MA/libclang-*.so* clang"
    "file /etc/ssl/certs/ca-certificates.crt ca-certificates"
    "cmd clang clang"
    "cmd llc llvm"
    "cmd pkg-config pkg-config"
    "cmd m4 m4"
    "cmd make make"
    "cmd cc gcc"
    # The tests and the demo.
    "cmd ip iproute2"
    "cmd bridge iproute2"
    "cmd nstat iproute2"
    "cmd sysctl procps"
    "cmd kill procps"
    "cmd ping iputils-ping"
    "cmd ethtool ethtool"
    "cmd iperf3 iperf3"
    "cmd trafgen netsniff-ng"
    "cmd tcpdump tcpdump"
    "cmd nft nftables"
    "cmd tshark tshark"
    "file /usr/lib/cni/host-local containernetworking-plugins"
    "file /usr/lib/cni/portmap containernetworking-plugins"
    "cmd nsenter util-linux"
    "cmd iptables iptables"
    "cmd python3 python3"
    # The load tests.
    "cmd nginx nginx-light"
    "cmd wrk wrk"
    "cmd curl curl"
    # The Rust toolchain (scripts/test.sh runs cargo fmt and cargo clippy).
    "rust cargo cargo"
    "rust rustc rustc"
    "rust rustfmt rustfmt"
    "rust cargo-fmt rustfmt"
    "rust cargo-clippy clippy"
)

if [ "$mode" = list ]; then
    for c in "${CHECKS[@]}"; do
        read -r kind what pkg <<<"$c"
        printf '%s\t%s\t%s\n' "$kind" "$what" "$pkg"
    done
    exit 0
fi

if [ "$mode" = install ]; then
    mapfile -t wanted < <(grep -v '^\s*#' scripts/debian-packages.txt | tr -s ' \t' '\n' | sed '/^$/d')
    missing=()
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [ "$(id -u)" != 0 ]; then
            echo "setup: ${missing[*]} not installed, and installing needs root" >&2
            exit 1
        fi
        echo "setup: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "setup: Debian packages present (${#wanted[@]} listed)"
    fi
fi

# Where commands are looked for: PATH, or with VXNAT_SETUP_ROOT each PATH directory under it.
lookup="$PATH"
if [ -n "$ROOT" ]; then
    lookup=""
    IFS=: read -r -a dirs <<<"$PATH"
    for d in "${dirs[@]}"; do lookup="${lookup:+$lookup:}$ROOT$d"; done
fi
has_cmd() { PATH="$lookup" type -P "$1" >/dev/null; }
has_file() {
    local f
    while IFS= read -r f; do [ -e "$f" ] && return 0; done < <(compgen -G "$ROOT$1" || true)
    return 1
}

failed=0
debs=()
for c in "${CHECKS[@]}"; do
    read -r kind what pkg <<<"$c"
    case "$kind" in
        file)
            has_file "$what" && continue
            echo "setup: missing $what: install the Debian package $pkg" >&2
            debs+=("$pkg")
            ;;
        cmd)
            has_cmd "$what" && continue
            echo "setup: missing command $what: install the Debian package $pkg" >&2
            debs+=("$pkg")
            ;;
        rust)
            has_cmd "$what" && continue
            if [ "$pkg" = cargo ] || [ "$pkg" = rustc ]; then
                echo "setup: missing $what: vxnat needs the Rust toolchain (rustup, https://rustup.rs) on PATH" >&2
            else
                echo "setup: missing $what: add the Rust toolchain component with: rustup component add $pkg" >&2
            fi
            ;;
    esac
    failed=$((failed + 1))
done
if ((failed)); then
    if ((${#debs[@]})); then
        mapfile -t debs < <(printf '%s\n' "${debs[@]}" | sort -u)
        echo "setup: $failed of ${#CHECKS[@]} checks failed; the Debian packages: apt-get install --no-install-recommends ${debs[*]}" >&2
    else
        echo "setup: $failed of ${#CHECKS[@]} checks failed" >&2
    fi
    exit 1
fi
echo "setup: all ${#CHECKS[@]} checks passed (headers, libraries, tools, Rust toolchain)"
