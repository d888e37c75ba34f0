#!/usr/bin/env bash
# Supervisor of one instance of the follower's `process` runtime: NOT a VM.
# The image's entrypoint runs in its own mount, pid and network namespaces,
# with the image's ext4 rootfs loop-mounted read-only under a tmpfs overlay
# (so / and /tmp are writable and vanish with the instance), chrooted, as
# the image's user.
#
#   process-instance.sh run WORK NETNS ROOTFS USER WORKDIR -- ARGV...
#
# Started by the follower in its own session (setsid), so it outlives a
# follower killed with kill -9 and can be adopted after a restart. The
# environment it is started with is the app's environment, passed on
# untouched (secrets never touch the disk); the script's own tools are
# looked up on a fixed host PATH. Files it writes in WORK:
#   supervisor.pid  its own pid (first thing it does)
#   started         the namespaces and mounts are ready, the app is exec'd
#   exit_status     exit code of the instance, once it has ended
# Messages of its own go to stderr prefixed with "zw-process:".
set -uo pipefail

app_path_set=${PATH+x}
app_path=${PATH-}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "zw-process: $*" >&2; }
die() { say "$*"; exit 125; }

stage=${1:-}
shift || true

case $stage in
run)
    [ $# -ge 7 ] && [ "$6" = -- ] || die "usage: $0 run WORK NETNS ROOTFS USER WORKDIR -- ARGV..."
    work=$1 ns=$2
    echo $$ >"$work/supervisor.pid"
    rm -f "$work/exit_status" "$work/started"
    say "starting in namespaces (not a VM): netns $ns"
    # ip netns exec execs; unshare forks the namespace's pid 1 and kills it
    # when it dies itself (SIGTERM to our process group stops everything).
    ip netns exec "$ns" unshare --mount --pid --fork --kill-child --propagation private -- \
        bash "$0" inner "${app_path_set:-unset}" "$app_path" "$@"
    code=$?
    echo "$code" >"$work/exit_status"
    say "instance exited with status $code"
    exit "$code"
    ;;
inner)
    path_set=$1 path_value=$2
    shift 2
    work=$1 rootfs=$3 user=$4 wd=$5
    shift 6
    lower=$work/lower upper=$work/upper root=$work/root
    mkdir -p "$lower" "$upper" "$root" || die "cannot create mount points in $work"
    mount -t ext4 -o loop,ro,nodev "$rootfs" "$lower" || die "rootfs $rootfs cannot be mounted as ext4"
    mount -t tmpfs -o mode=0755,size=256m zw-upper "$upper" || die "cannot mount tmpfs"
    mkdir "$upper/data" "$upper/work"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper/data,workdir=$upper/work" "$root" ||
        die "cannot mount the overlay root"
    mkdir -p "$root/proc" "$root/dev" "$root/tmp" "$root/etc"
    chmod 1777 "$root/tmp"
    mount -t proc proc "$root/proc" || die "cannot mount /proc"
    mount -t tmpfs -o mode=0755,size=1m zw-dev "$root/dev" || die "cannot mount /dev"
    for d in null zero full random urandom; do
        touch "$root/dev/$d" && mount --bind "/dev/$d" "$root/dev/$d" || die "cannot bind /dev/$d"
    done

    # USER is "", "name", "uid", "name:group" or "uid:gid", resolved in the
    # image's own /etc/passwd and /etc/group.
    u=${user%%:*} g=
    [ "$user" != "$u" ] && g=${user#*:}
    [ -n "$u" ] || u=0
    lookup() { # file name -> id (third field)
        [ -f "$1" ] && awk -F: -v n="$2" '$1 == n { print $3; found = 1; exit } END { exit !found }' "$1"
    }
    case $u in
    *[!0-9]*) uid=$(lookup "$root/etc/passwd" "$u") || die "user $u is not in the image's /etc/passwd" ;;
    *) uid=$u ;;
    esac
    if [ -z "$g" ]; then
        gid=$(awk -F: -v n="$uid" '$3 == n { print $4; exit }' "$root/etc/passwd" 2>/dev/null)
        [ -n "$gid" ] || gid=$uid
    else
        case $g in
        *[!0-9]*) gid=$(lookup "$root/etc/group" "$g") || die "group $g is not in the image's /etc/group" ;;
        *) gid=$g ;;
        esac
    fi
    [ -d "$root$wd" ] || mkdir -p "$root$wd" || die "cannot create working directory $wd"

    unshare_bin=$(command -v unshare)
    touch "$work/started"
    unset PWD OLDPWD SHLVL
    if [ "$path_set" = x ]; then export PATH="$path_value"; else unset PATH; fi
    exec "$unshare_bin" --root="$root" --wd="$wd" --setgid="$gid" --setuid="$uid" -- "$@"
    ;;
*)
    die "usage: $0 run WORK NETNS ROOTFS USER WORKDIR -- ARGV..."
    ;;
esac
