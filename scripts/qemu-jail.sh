#!/usr/bin/env bash
# Starts QEMU for one microVM in a jail, the way Firecracker's jailer does:
# its own mount namespace whose root is a tmpfs holding only what QEMU
# needs (read-only /usr, the guest kernel, the image, the console log, a
# run directory of its own, and device nodes it may open), chrooted, as an
# unprivileged uid with no capabilities, no supplementary groups and
# no_new_privs. QEMU's own seccomp filter (-sandbox on) comes on top.
#
#   qemu-jail.sh UID WORK KERNEL ROOTFS KVM QEMU ARGS...
#
# In the jail: /kernel, /rootfs.ext4 (read-only), /console.log (WORK/stdout.log),
# /initrd (the instance's initrd, with its secrets: the memfd the follower
# passes as fd 3, copied into the jail's tmpfs, never on disk) and /run-vm (WORK/vm, owned by UID: console socket,
# pidfile, the snapshot overlay). KVM is 1 when the guest runs under KVM
# (/dev/kvm is then made).
# Every exec keeps the pid: the follower's child is QEMU itself. The mounts
# live in the private mount namespace and vanish with QEMU.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "qemu-jail: $*" >&2; exit 125; }

if [ "${1:-}" != inner ]; then
    [ $# -ge 6 ] || die "usage: $0 UID WORK KERNEL ROOTFS KVM QEMU ARGS..."
    exec unshare --mount --propagation private -- bash "$0" inner "$@"
fi
shift
uid=$1 work=$2 kernel=$3 rootfs=$4 kvm=$5 qemu=$6
shift 6
case $uid in '' | *[!0-9]* | 0) die "UID must be a non-zero number" ;; esac

jail=$work/jail
mkdir -p "$jail"
# No nodev here: the device nodes below are made by us, and QEMU cannot make
# any (no CAP_MKNOD); nosuid all the same.
mount -t tmpfs -o mode=0755,size=64m,nosuid zw-jail "$jail" || die "cannot mount the jail"
mkdir -p "$jail/usr" "$jail/etc" "$jail/dev/net" "$jail/run-vm"
mount --bind /usr "$jail/usr"
mount -o remount,bind,ro,nosuid,nodev "$jail/usr"
for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$jail/$d"
    elif [ -d "/$d" ]; then
        mkdir "$jail/$d"
        mount --bind "/$d" "$jail/$d"
        mount -o remount,bind,ro,nosuid,nodev "$jail/$d"
    fi
done

# bindfile SRC DST [ro]
bindfile() {
    touch "$2"
    mount --bind "$1" "$2"
    mount -o "remount,bind,nosuid,nodev,noexec${3:+,ro}" "$2"
}
[ -f /etc/ld.so.cache ] && bindfile /etc/ld.so.cache "$jail/etc/ld.so.cache" ro
bindfile "$kernel" "$jail/kernel" ro
bindfile "$rootfs" "$jail/rootfs.ext4" ro
bindfile "$work/stdout.log" "$jail/console.log"
# A memfd cannot be bind-mounted: its bytes are copied into the jail's
# tmpfs (memory, like the memfd), readable by QEMU alone.
cat /proc/self/fd/3 >"$jail/initrd" || die "cannot read the initrd from fd 3"
chown "$uid" "$jail/initrd"
chmod 0400 "$jail/initrd"
exec 3<&-
mount --bind "$work/vm" "$jail/run-vm"
mount -o remount,bind,nosuid,nodev,noexec "$jail/run-vm"

# mkdev NAME MODE OWNER: a node with the numbers of the host's /dev/NAME.
mkdev() {
    local numbers
    numbers=$(stat -c '%Hr %Lr' "/dev/$1") || die "no /dev/$1"
    # shellcheck disable=SC2086
    mknod -m "$2" "$jail/dev/$1" c $numbers
    chown "$3" "$jail/dev/$1"
}
mkdev null 0666 0
mkdev zero 0666 0
mkdev urandom 0666 0
mkdev net/tun 0600 "$uid"
[ "$kvm" = 1 ] && mkdev kvm 0600 "$uid"
mount -o remount,ro,nosuid "$jail"

exec chroot "$jail" /usr/bin/setpriv --reuid="$uid" --regid="$uid" --clear-groups \
    --no-new-privs --inh-caps=-all --bounding-set=-all -- "$qemu" "$@"
