#!/usr/bin/env bash
# The guest's initramfs for the qemu runtime: our static init as /init and
# the kernel modules it loads, nothing else (no shell: zw-init loads the
# modules, mounts the app's rootfs from /dev/vda and switches into it).
#
#   build-initramfs.sh KERNEL_DIR ZW_INIT OUT
#
# KERNEL_DIR is what prepare-kernel.sh printed; ZW_INIT a statically linked
# zw-init (see build-guest-init.sh). Writes OUT (newc cpio, uncompressed:
# the kernel unpacks it faster than it would decompress it) atomically.
# Each instance's own config is appended by the follower as a second cpio
# archive in memory, never written here.
set -euo pipefail

[ $# -eq 3 ] || { echo "usage: $0 KERNEL_DIR ZW_INIT OUT" >&2; exit 2; }
kdir=$1 init=$2 out=$3

[ -f "$kdir/.done" ] || { echo "build-initramfs: $kdir is not a prepared kernel" >&2; exit 1; }
[ -x "$init" ] || { echo "build-initramfs: $init is not executable" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib/modules" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/newroot"
cp "$init" "$stage/init"
chmod 0755 "$stage/init"
while IFS= read -r m; do
    cp "$kdir/modules/$m" "$stage/lib/modules/$m"
done <"$kdir/modules/load.order"
cp "$kdir/modules/load.order" "$stage/lib/modules/load.order"

tmp=$out.tmp.$$
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$tmp"
mv "$tmp" "$out"
