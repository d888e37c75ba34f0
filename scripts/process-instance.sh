#!/usr/bin/env bash
# Supervisor of one instance of the follower's `process` runtime: NOT a VM.
# The instance is an OCI container run by runc (user namespace, default
# capabilities, seccomp, cgroup limits) in a bundle the follower prepared:
# its root filesystem is mounted and config.json (which holds the app's
# environment) is written on tmpfs.
#
#   process-instance.sh run WORK RUNC STATE BUNDLE ID
#
# Started by the follower in its own session (setsid) with an environment
# of its own (PATH only): the app's environment never reaches this shell or
# any host program; runc hands it to the app's process alone. It outlives
# a follower killed with kill -9 and can be adopted after a restart. Files
# it writes in WORK:
#   supervisor.pid  its own pid (first thing it does)
#   app.pid         the app's pid on the host (written by runc once the
#                   container runs)
#   exit_status     exit code of the instance, once it has ended
# Messages of its own go to stderr prefixed with "zw-process:".
set -uo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "zw-process: $*" >&2; }
die() { say "$*"; exit 125; }

stage=${1:-}
shift || true

case $stage in
run)
    [ $# -eq 5 ] || die "usage: $0 run WORK RUNC STATE BUNDLE ID"
    work=$1 runc=$2 state=$3 bundle=$4 id=$5
    echo $$ >"$work/supervisor.pid"
    rm -f "$work/exit_status" "$work/app.pid"
    say "starting $id in an OCI sandbox (runc; not a VM)"
    # runc stays in the foreground: it passes the app's output on and
    # exits with the app's status; it deletes the container when it ends.
    "$runc" --root "$state" run --bundle "$bundle" --pid-file "$work/app.pid" "$id" </dev/null
    code=$?
    echo "$code" >"$work/exit_status"
    say "instance exited with status $code"
    exit "$code"
    ;;
*)
    die "usage: $0 run WORK RUNC STATE BUNDLE ID"
    ;;
esac
