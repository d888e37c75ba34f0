#!/usr/bin/env bash
# The whole test suite of zeitwork, runnable on a fresh Debian 12 machine.
#
# Installs what the tests need when it is missing (apt packages, the S3 test
# server), then runs fmt, clippy and every test of the workspace. Reuses a
# build cache in $CARGO_TARGET_DIR (default ~/.cache/zeitwork/target) so a
# second run, or CI on the same machine, does not rebuild every dependency.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

need_pkgs=()
want() { # want <command-or-path> <apt package>
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -e "$1" ]; then need_pkgs+=("$2"); fi
}
want git git
want /usr/lib/postgresql/15/bin/initdb postgresql
want qemu-system-x86_64 qemu-system-x86
want buildah buildah
want runc runc
want /usr/share/containers/seccomp.json golang-github-containers-common
want mkfs.ext4 e2fsprogs
want debugfs e2fsprogs
want /bin/busybox busybox-static
want age age
want nginx nginx
want wrk wrk
want pebble pebble
want nft nftables
want ip iproute2
want cpio cpio
want runuser util-linux
want python3 python3
want curl curl
want jq jq
want nsenter util-linux
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "test.sh: installing ${need_pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: missing packages and not root; install: apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zeitwork/target}"
export ZW_CACHE_DIR="${ZW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zeitwork}"
mkdir -p "$CARGO_TARGET_DIR" "$ZW_CACHE_DIR"
# PyPI tools the tests run, each pinned, in a venv under the cache.
bash scripts/openapi-fuzz.sh install >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked --bins
cargo test --workspace --locked --no-fail-fast -- --test-threads="${ZW_TEST_THREADS:-2}"
