#!/usr/bin/env bash
# Builds zw-init, the guest's PID 1, as a static x86_64 glibc binary.
#
#   build-guest-init.sh SOURCE OUT
#
# SOURCE is follower/src/bin/zw-init.rs. The init uses std and the C library
# only (no crates), so plain rustc builds it in seconds, independently of
# cargo's target directory and lock; `+crt-static` links glibc statically
# (needs libc6-dev's libc.a), so the init runs in images without any libc
# and after the switch into the app's rootfs. Writes OUT atomically.
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 SOURCE OUT" >&2; exit 2; }
src=$1 out=$2
tmp=$out.tmp.$$
trap 'rm -f "$tmp"' EXIT

rustc --edition 2024 --crate-name zw_init --crate-type bin \
    --target x86_64-unknown-linux-gnu \
    -C opt-level=2 -C panic=abort -C strip=symbols \
    -C target-feature=+crt-static \
    "$src" -o "$tmp"
# A dynamic binary would die at once in the guest: refuse it here.
if readelf -l "$tmp" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    echo "build-guest-init: $tmp is not static" >&2
    exit 1
fi
mv "$tmp" "$out"
