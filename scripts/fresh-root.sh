#!/usr/bin/env bash
# Proves the README's two commands on a bare machine: runs `bash scripts/test.sh` and
# `bash scripts/demo.sh` from the committed tree (HEAD) in a chroot that holds only a
# debootstrap --variant=minbase install of this machine's Debian release, from the mirror
# this machine's apt uses. Each command gets its own fresh copy of that root, so each does
# all of its own set-up (scripts/setup.sh installs the Debian packages with apt, cargo
# downloads the crates) as on a new machine. The chroot shares the kernel, so the tests'
# network namespaces and XDP programs work as on the host. Slow (a full build per command:
# 25-30 minutes for both on 2 cores: the tests 13-14, the demo 9-16 with other builds
# running, plus ~1 minute for the first debootstrap); not part of CI. Needs root.
#
#   bash scripts/fresh-root.sh [--root DIR] [--rebuild] [--keep] [--only tests|demo]
#                              [--same-root] [--log FILE] [--mirror URL] [--overlay PATH]...
#
#   --root DIR      where the roots live (default /var/tmp/vxnat-fresh-root): DIR/base is the
#                   pristine debootstrap, reused by later runs; DIR/run-tests and DIR/run-demo
#                   are the copies the commands run in
#   --rebuild       debootstrap DIR/base again instead of reusing it
#   --keep          keep DIR/run-* after the run (to look inside; unmounted all the same)
#   --only WHAT     run only the tests (scripts/test.sh) or only the demo (scripts/demo.sh)
#   --same-root     run the demo in the tests' root instead of a fresh one (saves the second
#                   set-up and crate download; the demo's release build still happens)
#   --log FILE      also write everything to FILE (default DIR/fresh-root.log)
#   --mirror URL    the Debian mirror (default: the one this machine's apt uses)
#   --overlay PATH  copy PATH (a file or directory of the repository) from the working tree
#                   over the committed tree; may be given more than once. Without it,
#                   uncommitted changes are NOT included: the run is of HEAD exactly.
#
# Besides the base system, the roots get only what this machine uses to reach its mirror
# and crates.io: its apt sources (the Debian entries), apt.conf.d files with Acquire::
# settings, /etc/resolv.conf, /etc/hosts and the local CA certificates in
# /usr/local/share/ca-certificates (used once setup.sh has installed ca-certificates), plus a
# policy-rc.d that stops package scripts starting services (nginx) in the chroot. The Rust
# toolchain is this machine's: /root/.rustup and /root/.cargo/bin are bind-mounted read-only,
# and CARGO_HOME is the chroot's own /root/.cargo, so the crates are downloaded afresh.
#
# All mounts are made in a private mount namespace (unshare --mount), so none are ever
# visible outside it or survive it; they are also unmounted on exit, after any process left
# in the chroot is killed, and the script checks none are left behind.
set -euo pipefail

die() {
    echo "fresh-root: $*" >&2
    exit 1
}
hms() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# Kills every process whose root directory is DIR or below it (leftovers of a command).
kill_rooted() {
    local dir="$1" sig p r pids
    for sig in TERM KILL; do
        pids=()
        for p in /proc/[0-9]*; do
            r="$(readlink "$p/root" 2>/dev/null)" || continue
            [[ "$r" == "$dir" || "$r" == "$dir/"* ]] && pids+=("${p#/proc/}")
        done
        ((${#pids[@]})) || return 0
        echo "fresh-root: killing processes left in $dir (SIG$sig): ${pids[*]}"
        kill -"$sig" "${pids[@]}" 2>/dev/null || true
        sleep 1
    done
}

# Mount points at or below DIR in this mount namespace, deepest first.
mounts_under() {
    findmnt -rn -o TARGET | awk -v d="$1" '$0 == d || index($0, d "/") == 1' | sort -r
}

# ---- Inner half: runs in a private mount namespace (see run_in_root below).
if [ "${1:-}" = __inner ]; then
    RUN="$2"
    shift 2
    inner_cleanup() {
        local rc=$? m
        trap - EXIT INT TERM
        kill_rooted "$RUN"
        if [ -d "$RUN/run/netns" ] && [ -n "$(ls -A "$RUN/run/netns" 2>/dev/null)" ]; then
            echo "fresh-root: network namespaces left by the command: $(ls "$RUN/run/netns" | tr '\n' ' ')"
        fi
        while read -r m; do
            [ -n "$m" ] || continue
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "fresh-root: could not unmount $m" >&2
        done < <(mounts_under "$RUN")
        exit "$rc"
    }
    trap inner_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # The chroot's / must be a mount point: `ip -n NS` and `ip netns exec` make / a slave
    # mount in their own mount namespace, which fails with EINVAL on a plain directory.
    mount --bind "$RUN" "$RUN"
    mount -t proc proc "$RUN/proc"
    mount --rbind /sys "$RUN/sys" # with /sys/fs/bpf and the cgroup mounts when the host has them
    mount --rbind /dev "$RUN/dev" # with /dev/pts and /dev/shm
    # /run as on a booted system (a tmpfs); `ip netns add` makes /run/netns a shared mount
    # in it, and the namespaces' bind mounts stay in this mount namespace.
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$RUN/run"
    mkdir -p "$RUN/run/lock" "$RUN/run/netns"
    for d in /root/.rustup /root/.cargo/bin; do
        mkdir -p "$RUN$d"
        mount --bind "$d" "$RUN$d"
        mount -o remount,bind,ro "$RUN$d"
    done
    env -i HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8 \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        CARGO_HOME=/root/.cargo RUSTUP_HOME=/root/.rustup CARGO_TERM_COLOR=never \
        chroot "$RUN" /bin/bash -c 'cd /root/vxnat && exec "$@"' bash "$@"
    exit $?
fi

# ---- Outer half.
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BASE_DIR=/var/tmp/vxnat-fresh-root
REBUILD=0
KEEP=0
ONLY=""
SAME=0
LOG=""
MIRROR=""
OVERLAYS=()
while (($#)); do
    case "$1" in
        --root) BASE_DIR="${2:?--root DIR}"; shift ;;
        --rebuild) REBUILD=1 ;;
        --keep) KEEP=1 ;;
        --only) ONLY="${2:?--only tests|demo}"; shift ;;
        --same-root) SAME=1 ;;
        --log) LOG="${2:?--log FILE}"; shift ;;
        --mirror) MIRROR="${2:?--mirror URL}"; shift ;;
        --overlay) OVERLAYS+=("${2:?--overlay PATH}"); shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown option '$1' (try --help)" ;;
    esac
    shift
done
case "$ONLY" in "" | tests | demo) ;; *) die "--only takes tests or demo" ;; esac
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts; the tests need root too)"
[ -d /root/.rustup ] && [ -x /root/.cargo/bin/cargo ] || die "needs the Rust toolchain in /root/.rustup and /root/.cargo/bin (rustup)"
mkdir -p "$BASE_DIR"
BASE_DIR="$(cd "$BASE_DIR" && pwd)"
LOG="${LOG:-$BASE_DIR/fresh-root.log}"
: >"$LOG"
# tee ignores INT and TERM, so that a Ctrl-C or a kill of the process group still logs the
# clean-up (and the script does not die of SIGPIPE half-way through it).
exec > >(
    trap '' INT TERM
    exec tee -a "$LOG"
) 2>&1
T0=$SECONDS

COMMIT="$(git -C "$REPO" rev-parse HEAD)"
echo "== fresh-root: vxnat commit $COMMIT ($(git -C "$REPO" log -1 --format=%s "$COMMIT" | cut -c1-70))"
if [ -n "$(git -C "$REPO" status --porcelain)" ]; then
    echo "   the working tree has uncommitted changes; they are NOT included${OVERLAYS[*]:+, except the overlays: ${OVERLAYS[*]}}"
fi
for o in "${OVERLAYS[@]}"; do
    case "$o" in /* | *..*) die "--overlay takes a path inside the repository: $o" ;; esac
done

. /etc/os-release
SUITE="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
ARCH="$(dpkg --print-architecture)"

# The host's Debian apt entries: "URI SUITE" lines, from deb822 .sources and one-line lists.
host_sources() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
             { uris = ""; suites = ""; types = ""; enabled = "yes"
               for (i = 1; i <= NF; i++) {
                   if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                   if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
                   if ($i ~ /^Types:/) { types = $i }
                   if ($i ~ /^Enabled:[ \t]*no/) { enabled = "no" } }
               if (enabled == "no" || types !~ /(^|[ \t])deb([ \t]|$)/) next
               n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
               for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print u[i], s[j] }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        sed -E -n 's/^deb[ \t]+(\[[^]]*\][ \t]+)?([^ \t]+)[ \t]+([^ \t]+).*/\2 \3/p' "$f"
    done
}
SOURCES="$(host_sources | awk -v s="$SUITE" '$2 == s || $2 == s "-updates" || $2 == s "-security"' | sort -u -k2,2)"
if [ -z "$MIRROR" ]; then
    MIRROR="$(awk -v s="$SUITE" '$2 == s { print $1; exit }' <<<"$SOURCES")"
    [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
fi
[ -n "$SOURCES" ] || SOURCES="$MIRROR $SUITE"
echo "   Debian $SUITE $ARCH, minbase from $MIRROR; apt sources: $(awk '{ printf "%s%s %s", sep, $1, $2; sep = ", " }' <<<"$SOURCES")"

# ---- The base root: debootstrap once, reused until --rebuild.
BASE="$BASE_DIR/base"
STAMP="$BASE/.vxnat-fresh-root"
WANT_STAMP="$SUITE $ARCH minbase $MIRROR"
if ((REBUILD)) || [ ! -f "$STAMP" ] || [ "$(head -1 "$STAMP")" != "$WANT_STAMP" ]; then
    [ -z "$(mounts_under "$BASE")" ] || die "mounts under $BASE; not removing it"
    rm -rf --one-file-system "$BASE" "$BASE.tmp"
    if ! command -v debootstrap >/dev/null; then
        echo "== installing debootstrap on this machine (a host tool, not one of vxnat's packages)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
    fi
    echo "== debootstrap --variant=minbase $SUITE from $MIRROR"
    t=$SECONDS
    debootstrap --variant=minbase --arch="$ARCH" "$SUITE" "$BASE.tmp" "$MIRROR" >"$BASE_DIR/debootstrap.log" 2>&1 ||
        {
            tail -20 "$BASE_DIR/debootstrap.log"
            die "debootstrap failed (log: $BASE_DIR/debootstrap.log)"
        }
    # apt sources as on this machine (debootstrap only wrote the suite it installed).
    awk '{ print "deb " $1 " " $2 " main" }' <<<"$SOURCES" >"$BASE.tmp/etc/apt/sources.list"
    # This machine's ways of reaching its mirror (proxies, validity checks of a snapshot).
    for f in /etc/apt/apt.conf.d/*; do
        [ -f "$f" ] && grep -q '^[[:space:]]*Acquire::' "$f" && cp "$f" "$BASE.tmp/etc/apt/apt.conf.d/"
    done
    # Package scripts must not start services in the chroot (nginx's postinst would).
    printf '#!/bin/sh\nexit 101\n' >"$BASE.tmp/usr/sbin/policy-rc.d"
    chmod 755 "$BASE.tmp/usr/sbin/policy-rc.d"
    echo "$WANT_STAMP" >"$BASE.tmp/.vxnat-fresh-root"
    date -u +%FT%TZ >>"$BASE.tmp/.vxnat-fresh-root"
    mv "$BASE.tmp" "$BASE"
    BASE_NOTE="built in $(hms $((SECONDS - t)))"
    echo "   base root built in $(hms $((SECONDS - t))): $(du -sh --one-file-system "$BASE" | cut -f1), $(chroot "$BASE" dpkg-query -W | wc -l) packages"
else
    BASE_NOTE="reused, built $(sed -n 2p "$STAMP")"
    echo "== reusing the base root $BASE (built $(sed -n 2p "$STAMP"); --rebuild to debootstrap again)"
fi

RUNS=()
RESULTS=()
FAILED=0
SUMMARIZED=0
summary() {
    echo
    echo "== fresh-root summary: commit ${COMMIT:0:12}${OVERLAYS[*]:+ + overlays ${OVERLAYS[*]}}, Debian $SUITE minbase (base root $BASE_NOTE)"
    for r in "${RESULTS[@]}"; do echo "   $r"; done
    [ -z "${1:-}" ] || echo "   $1"
    echo "   total $(hms $((SECONDS - T0))); log $LOG"
    if ((FAILED)) || [ -n "${1:-}" ]; then echo "== FAIL"; else echo "== PASS"; fi
    SUMMARIZED=1
}
cleanup() {
    local rc=$? r
    trap - EXIT INT TERM
    ((SUMMARIZED)) || summary "stopped early (exit $rc) before every command had run"
    for r in "${RUNS[@]}"; do
        kill_rooted "$r"
        if [ -n "$(mounts_under "$r")" ]; then
            echo "fresh-root: mounts left under $r (unmounting):" >&2
            mounts_under "$r" >&2
            mounts_under "$r" | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
        fi
        if ((KEEP)); then
            echo "   kept $r (chroot $r /bin/bash to look inside; rm -rf --one-file-system $r to remove)"
        elif [ -z "$(mounts_under "$r")" ]; then
            rm -rf --one-file-system "$r"
        else
            echo "fresh-root: not removing $r: mounts still there" >&2
            rc=1
        fi
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A fresh copy of the base root with the repository at COMMIT in /root/vxnat.
new_root() {
    local r="$BASE_DIR/run-$1" o
    [ -z "$(mounts_under "$r")" ] || die "mounts under $r; not touching it"
    rm -rf --one-file-system "$r"
    RUNS+=("$r")
    cp -a --reflink=auto "$BASE" "$r"
    cp /etc/resolv.conf "$r/etc/resolv.conf"
    cp /etc/hosts "$r/etc/hosts"
    if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
        mkdir -p "$r/usr/local/share/ca-certificates"
        cp -a /usr/local/share/ca-certificates/. "$r/usr/local/share/ca-certificates/"
    fi
    mkdir -p "$r/root/vxnat"
    git -C "$REPO" archive --format=tar "$COMMIT" | tar -x -C "$r/root/vxnat"
    for o in "${OVERLAYS[@]}"; do
        rm -rf "${r:?}/root/vxnat/$o"
        if [ -e "$REPO/$o" ]; then
            mkdir -p "$(dirname "$r/root/vxnat/$o")"
            cp -a "$REPO/$o" "$r/root/vxnat/$o"
        fi
    done
    ROOT_DIR="$r"
}

# Runs a command in ROOT in a private mount namespace; records PASS/FAIL and the time.
run_in_root() {
    local name="$1" root="$2" t rc
    shift 2
    echo
    echo "== [$name] chroot $root: $*"
    t=$SECONDS
    set +e
    unshare --mount --propagation private -- "$BASH" "$0" __inner "$root" "$@"
    rc=$?
    set -e
    local took=$((SECONDS - t)) left
    left="$(mounts_under "$root")"
    if [ -n "$left" ]; then
        echo "fresh-root: mounts visible outside after [$name]: $left" >&2
        rc=1
    fi
    if ((rc == 0)); then
        RESULTS+=("PASS  $(printf '%-22s' "$*")  $(hms "$took")")
    else
        RESULTS+=("FAIL  $(printf '%-22s' "$*")  $(hms "$took")  (exit $rc)")
        FAILED=1
    fi
    echo "== [$name] exit $rc after $(hms "$took")"
}

if [ "$ONLY" != demo ]; then
    new_root tests
    run_in_root tests "$ROOT_DIR" bash scripts/test.sh
fi
if [ "$ONLY" != tests ]; then
    if ((SAME)) && [ "$ONLY" = "" ]; then
        run_in_root demo "$ROOT_DIR" bash scripts/demo.sh
    else
        new_root demo
        run_in_root demo "$ROOT_DIR" bash scripts/demo.sh
    fi
fi

summary
exit "$FAILED"
