#!/usr/bin/env bash
# Guest kernel of the qemu runtime: Debian's cloud kernel, unpacked into a
# cache directory, with the virtio modules our init loads (Debian builds
# virtio_mmio, virtio_blk, virtio_net and virtio_console as modules).
#
#   prepare-kernel.sh CACHE_DIR
#
# Idempotent: a finished directory (marked by `.done`) is reused as it is.
# Leaves in CACHE_DIR/<kver>/:
#   vmlinuz               the kernel
#   modules/*.ko          the modules, uncompressed
#   modules/load.order    their file names, dependencies first (one per line)
# and prints that directory on stdout. Needs apt-get and dpkg (Debian), no
# kmod: dependencies are read from each module's own `depends=` modinfo.
set -euo pipefail

# ONE version, named: a glob would download dozens of packages.
readonly KVER=6.1.0-56-cloud-amd64
readonly PKG=linux-image-$KVER
# The modules the guest needs, roots of the dependency walk.
readonly WANT=(virtio_mmio virtio_blk virtio_net virtio_console)

[ $# -eq 1 ] || { echo "usage: $0 CACHE_DIR" >&2; exit 2; }
cache=$1
out=$cache/$KVER
if [ -f "$out/.done" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
# One preparer at a time per cache; a second caller waits, then reuses.
exec 9>"$cache/.prepare.lock"
flock 9
if [ -f "$out/.done" ]; then
    echo "$out"
    exit 0
fi

work=$(mktemp -d "$cache/.prepare.XXXXXX")
trap 'rm -rf "$work"' EXIT

deb=$(find "$cache" -maxdepth 1 -name "${PKG}_*_amd64.deb" -print -quit)
if [ -z "$deb" ]; then
    (cd "$work" && apt-get download "$PKG" >&2) || {
        echo "prepare-kernel: apt-get download $PKG failed (apt-get update first?)" >&2
        exit 1
    }
    deb=$(find "$work" -maxdepth 1 -name "${PKG}_*_amd64.deb" -print -quit)
    [ -n "$deb" ] || { echo "prepare-kernel: no .deb after apt-get download" >&2; exit 1; }
    mv "$deb" "$cache/"
    deb=$cache/$(basename "$deb")
fi

dpkg -x "$deb" "$work/root"
moddir=$(find "$work/root" -type d -path "*/modules/$KVER/kernel" -print -quit)
[ -n "$moddir" ] || { echo "prepare-kernel: no modules for $KVER in $deb" >&2; exit 1; }

mkdir -p "$work/out/modules"
cp "$work/root/boot/vmlinuz-$KVER" "$work/out/vmlinuz"

# module name -> file, names normalised to underscores as the kernel does.
declare -A file_of=()
while IFS= read -r -d '' f; do
    base=$(basename "$f")
    base=${base%%.ko*}
    file_of[${base//-/_}]=$f
done < <(find "$moddir" -name '*.ko*' -print0)

unpack() { # unpack FILE DEST: modules may be shipped compressed.
    case $1 in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -qdc "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) echo "prepare-kernel: unknown module format $1" >&2; return 1 ;;
    esac
}

declare -A state=() # 1 = visiting, 2 = done
order=()
visit() {
    local name=${1//-/_} deps dep
    case ${state[$name]:-0} in
    2) return 0 ;;
    1) echo "prepare-kernel: dependency cycle at $name" >&2; return 1 ;;
    esac
    state[$name]=1
    local f=${file_of[$name]:-}
    [ -n "$f" ] || { echo "prepare-kernel: module $name not in $PKG" >&2; return 1; }
    unpack "$f" "$work/out/modules/$name.ko"
    deps=$(tr '\0' '\n' <"$work/out/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    local IFS=,
    for dep in $deps; do
        [ -n "$dep" ] && visit "$dep"
    done
    state[$name]=2
    order+=("$name.ko")
}
for m in "${WANT[@]}"; do
    visit "$m"
done
printf '%s\n' "${order[@]}" >"$work/out/modules/load.order"
touch "$work/out/.done"

rm -rf "$out"
mv "$work/out" "$out"
echo "$out"
