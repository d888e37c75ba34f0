#!/usr/bin/env bash
# Run zeitwork on this machine with embedded defaults: `zw up`.
#
# Installs what running apps needs when it is missing (buildah for builds,
# e2fsprogs for root filesystems, busybox-static for the example app,
# iproute2/nftables for instance networking), builds the `zw` binary and
# starts it. Extra arguments go to `zw up` (e.g. --runtime process).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

need=()
for pair in buildah:buildah mkfs.ext4:e2fsprogs debugfs:e2fsprogs /bin/busybox:busybox-static \
            ip:iproute2 nft:nftables git:git qemu-system-x86_64:qemu-system-x86; do
  cmd=${pair%%:*} pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -e "$cmd" ]; then need+=("$pkg"); fi
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "up.sh: missing packages; as root run: apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "up.sh: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "up.sh: instances need network namespaces and loop mounts: run as root" >&2
  exit 1
fi

cargo build --release --locked --bin zw
target=${CARGO_TARGET_DIR:-$here/target}
exec "$target/release/zw" up "$@"
