#!/usr/bin/env bash
# Prepares a fresh Debian machine for building and testing vxnat: installs the Debian
# packages listed in scripts/debian-packages.txt that are missing, and checks the Rust
# toolchain components the test command uses. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t wanted < <(grep -v '^\s*#' scripts/debian-packages.txt | tr -s ' \t' '\n' | sed '/^$/d')
missing=()
for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "setup: Debian packages present (${#wanted[@]} listed)"
fi

for tool in cargo rustfmt cargo-clippy; do
    command -v "$tool" >/dev/null || { echo "setup: $tool not found; vxnat needs the Rust toolchain with rustfmt and clippy" >&2; exit 1; }
done
