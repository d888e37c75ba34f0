#!/usr/bin/env bash
# cluster.sh: a cluster of "hosts" on one machine, for the multi-host tests
# and for trying a cluster by hand. Each host is a network namespace with
# its own IPv4 and IPv6 address on a LAN; the LAN is a bridge that lives,
# with the router, in a namespace of its own. The root namespace's links,
# routes and nftables are never touched, and no traffic leaves the
# namespaces made here.
#
# Every subcommand takes [--dir D] [--name P] (before a `--`):
#   cluster.sh up [--watch PID]           build it (a reaper runs `down` when PID exits)
#   cluster.sh down [--keep-logs]         stop and remove everything (and D, unless --keep-logs)
#   cluster.sh status                     the state file and which processes run
#   cluster.sh exec HOST -- CMD...        run CMD in HOST, in the foreground
#   cluster.sh spawn HOST NAME -- CMD...  start CMD in HOST in the background,
#                                         log D/logs/HOST-NAME.log, pid D/pids/HOST-NAME.pid
#   cluster.sh kill HOST NAME [SIGNAL]    signal it (default KILL; waits for a KILL to land)
#   cluster.sh alive HOST NAME            exit 0 (and print the pid) if it runs
#   cluster.sh pids                       every process of the cluster
#   cluster.sh crash HOST                 a power cut: kill every process of HOST (instances
#                                         too), remove the namespaces and mounts made from it
#                                         and its nftables rules; addresses and routes stay
#   cluster.sh partition HOST | heal HOST take HOST's link to the LAN down / up
#   cluster.sh ip HOST [4|6]              HOST's address
#   cluster.sh service pg|s3|git|internet start|stop|restart
#
# Hosts (LAN 10.A.B.0/24 and fdXX:XXXX:XXXX::/64, A, B and the X derived
# from P, so harnesses with different names differ; they could not reach
# each other anyway, each has its own bridge namespace):
#   pg (.10)       PostgreSQL 15, trust auth, user and database "zw"
#   s3 (.11)       the suite's S3 test server (moto, scripts/s3-test-server.sh), bucket "zeitwork"
#   git (.12)      bare repositories under D/git: git://<git>/meta.git (git daemon, push
#                  enabled) and http://<git>/cgi-bin/git/meta.git (git http-backend behind
#                  busybox httpd); an empty meta.git that refuses non-fast-forward pushes
#   op1, op2 (.21, .22)      operators (captain + edge)
#   w1, w2, w3 (.31-.33)     workers (follower)
#   internet       plain HTTP server answering a known body, on a routed "public" subnet
#                  (203.0.113.10/24, 2001:db8:XXXX::10/64, documentation ranges) behind the router
# Every LAN host routes to the internet host through the router (.1).
# D/hosts.txt maps the names to the addresses (/etc/hosts format; the hosts
# themselves resolve with the machine's /etc/hosts: use addresses). Inside a
# host the hostname is the host's name (a UTS namespace per process) and the
# working directory is D/hosts/HOST. Processes enter a host's network
# namespace with nsenter and stay in the machine's mount namespace, as on a
# real host: network namespaces and mounts they make are seen by everyone
# (`ip netns exec` would give each a private mount namespace, where an
# `ip netns add` or a loop mount is invisible to the others). So /sys/class/net
# shows the machine's interfaces, not the host's: ask `ip` (netlink). Keep
# what processes of a host write under D/hosts/HOST (relative paths do):
# `down` unmounts whatever is mounted under D.
#
# Processes started in a host are put in a cgroup (v2) of their own,
# <cgroup2 mount>/zw-cluster-P/HOST, so `down` finds even the ones that
# moved to another network namespace (an instance started by a follower);
# `down` also kills every process of each namespace (`ip netns pids`) and of
# the namespaces hanging off a host by a veth (instance namespaces), then
# removes them. `up --watch PID` leaves a reaper that runs `down` when PID
# exits, however it exits. `down` works after a crash or a partial `up`.
#
# Defaults: P = $ZW_CLUSTER_NAME or "zwc", D = $ZW_CLUSTER_DIR or
# ${TMPDIR:-/tmp}/zw-cluster-P. State: D/state.json (hosts, addresses,
# service pids and URLs), D/hosts (the names). Needs root, iproute2, jq,
# curl, git, busybox, python3 (moto) and PostgreSQL 15 ($PG_BIN or
# /usr/lib/postgresql/15/bin).
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SELF")
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

readonly ALL_HOSTS=(pg s3 git internet op1 op2 w1 w2 w3)
readonly PG_PORT=5432 S3_PORT=9000 GIT_PORT=9418 HTTP_PORT=80
readonly S3_BUCKET=zeitwork

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

# --- arguments ---------------------------------------------------------------

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
name=${ZW_CLUSTER_NAME:-zwc}
dir=${ZW_CLUSTER_DIR:-}
watch=""
keep_logs=0
pos=()
rest=()
while [ $# -gt 0 ]; do
    case $1 in
    --dir) dir=${2:?--dir needs a value}; shift 2 ;;
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --watch) watch=${2:?--watch needs a pid}; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    --) shift; rest=("$@"); break ;;
    *) pos+=("$1"); shift ;;
    esac
done
[[ $name =~ ^[a-z][a-z0-9]{0,15}$ ]] || die "name '$name': 1 to 16 lowercase letters or digits, starting with a letter"
P=$name
D=${dir:-${TMPDIR:-/tmp}/zw-cluster-$P}
case $D in /*) ;; *) D=$(pwd)/$D ;; esac
BR=$P-br

# --- addresses ---------------------------------------------------------------

hash=$(printf '%s' "$P" | sha256sum)
V4_NET=10.$((16#${hash:0:2})).$((16#${hash:2:2}))
V6_NET=fd${hash:4:2}:${hash:6:4}:${hash:10:4}
PUB4_NET=203.0.113
PUB6_NET=2001:db8:${hash:14:4}

host_num() {
    case $1 in
    pg) echo 10 ;; s3) echo 11 ;; git) echo 12 ;; internet) echo 10 ;;
    op1) echo 21 ;; op2) echo 22 ;; w1) echo 31 ;; w2) echo 32 ;; w3) echo 33 ;;
    *) die "no host '$1' (hosts: ${ALL_HOSTS[*]})" ;;
    esac
}

host_role() {
    case $1 in
    pg) echo postgres ;; s3) echo s3 ;; git) echo git ;; internet) echo internet ;;
    op*) echo operator ;; w*) echo worker ;;
    esac
}

ip4_of() {
    local n
    n=$(host_num "$1")
    if [ "$1" = internet ]; then echo "$PUB4_NET.$n"; else echo "$V4_NET.$n"; fi
}

ip6_of() {
    local n
    n=$(host_num "$1")
    if [ "$1" = internet ]; then echo "$PUB6_NET::$n"; else echo "$V6_NET::$n"; fi
}

ns_of() { echo "$P-$1"; }

# The router's side of a host's link (an interface in the bridge namespace).
link_of() { echo "$1"; }

# --- cgroup ------------------------------------------------------------------

CG_MOUNT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
CG_ROOT=""
if [ -n "$CG_MOUNT" ]; then CG_ROOT=$CG_MOUNT/zw-cluster-$P; fi

# --- helpers -----------------------------------------------------------------

our_namespaces() {
    ip netns list 2>/dev/null | awk '{ print $1 }' | grep -E "^$P-" || true
}

ns_exists() { [ -e "/run/netns/$1" ]; }

# "PID STARTTIME" of a live (not zombie) process, else nothing.
proc_id() {
    local pid=$1 stat
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    # fields after the comm: state is 1st, starttime is 20th
    # shellcheck disable=SC2086
    set -- $stat
    case $1 in Z | X | x) return 0 ;; esac
    echo "$pid ${20}"
}

# The pid of a process recorded in FILE if it is still that process.
recorded_pid() {
    local f=$1 pid start now
    [ -f "$f" ] || return 0
    read -r pid start <"$f" || true
    [ -n "${pid:-}" ] || return 0
    now=$(proc_id "$pid")
    [ -n "$now" ] || return 0
    if [ -n "${start:-}" ] && [ "$now" != "$pid $start" ]; then return 0; fi
    echo "$pid"
}

require_up() {
    ns_exists "$BR" || die "cluster '$P' is not up (no namespace $BR)"
}

require_host() {
    host_num "$1" >/dev/null
    ns_exists "$(ns_of "$1")" || die "host $1 of cluster '$P' does not exist"
}

# Runs "$@" in host $1: its network namespace, its cgroup, a UTS namespace
# named after it, its directory. Replaces the calling (sub)shell.
enter() {
    local h=$1
    shift
    if [ -n "$CG_ROOT" ] && [ -d "$CG_ROOT/$h" ]; then
        echo "$BASHPID" >"$CG_ROOT/$h/cgroup.procs"
    fi
    exec nsenter --net="/run/netns/$(ns_of "$h")" -- unshare --uts -- bash "$SELF" _host "$h" "$D/hosts/$h" -- "$@"
}

check_proc_name() {
    [[ $1 =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die "process name '$1': letters, digits, _ . - only"
}

# spawn_in HOST NAME CMD...: background, logged, pid recorded.
spawn_in() {
    local h=$1 n=$2
    shift 2
    check_proc_name "$n"
    local pidf=$D/pids/$h-$n.pid log=$D/logs/$h-$n.log
    if [ -n "$(recorded_pid "$pidf")" ]; then die "$n already runs on $h"; fi
    mkdir -p "$D/pids" "$D/logs"
    # setsid: its own session, so a Ctrl-C to the caller's terminal does not
    # reach it; the subshell is no group leader, so setsid does not fork and
    # $! stays the pid of the command (nsenter, unshare and bash exec).
    (enter "$h" setsid "$@") </dev/null >>"$log" 2>&1 &
    local pid=$!
    disown "$pid"
    local id=""
    for _ in $(seq 50); do
        id=$(proc_id "$pid")
        [ -n "$id" ] && break
        sleep 0.01
    done
    [ -n "$id" ] || id="$pid"
    echo "$id" >"$pidf"
    echo "$pid"
}

# wait_for TRIES CMD...: CMD until it succeeds, 0.1 s apart.
wait_for() {
    local tries=$1
    shift
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}

in_host() { (enter "$@"); }

# --- services ----------------------------------------------------------------

as_pg() { runuser -u postgres -- "$@"; }

# A stopped data directory with the zw user and database, kept per machine
# and PostgreSQL version: initdb and creating them take seconds, a copy less.
pg_template() {
    local v
    v=$("$PG_BIN/postgres" --version | tr -c 'A-Za-z0-9.\n' '-')
    echo "${ZW_CACHE_DIR:-${HOME:-/root}/.cache/zeitwork}/cluster-pg/$v"
}

pg_ctl_start() {
    local pgd=$D/pg
    touch "$D/logs/pg-postgres.log"
    chown postgres:postgres "$D/logs/pg-postgres.log"
    local opts="-c listen_addresses='*' -p $PG_PORT -k $pgd -c fsync=off -c synchronous_commit=off"
    opts+=" -c full_page_writes=off -c max_connections=300 -c dynamic_shared_memory_type=mmap"
    # Its own IPC namespace: no System V segment outlives the cluster.
    if ! in_host pg unshare --ipc -- runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$pgd/data" \
        -l "$D/logs/pg-postgres.log" -w -t 60 -o "$opts" start >/dev/null; then
        tail -n 30 "$D/logs/pg-postgres.log" >&2
        return 1
    fi
}

pg_start() {
    local pgd=$D/pg template fresh=0
    template=$(pg_template)
    if [ ! -d "$pgd/data" ]; then
        mkdir -p "$pgd"
        chown postgres:postgres "$pgd"
        if [ -f "$template/ready" ]; then
            cp -a "$template/data" "$pgd/data"
        else
            as_pg "$PG_BIN/initdb" -D "$pgd/data" -U postgres --auth=trust -E UTF8 --no-sync \
                >"$D/logs/pg-initdb.log" 2>&1 || { cat "$D/logs/pg-initdb.log" >&2; return 1; }
            # Reachable from every host of the cluster (and only they exist here).
            printf 'host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n' >>"$pgd/data/pg_hba.conf"
            fresh=1
        fi
    fi
    pg_ctl_start || return 1
    if [ "$fresh" = 1 ]; then
        as_pg "$PG_BIN/createuser" -h "$pgd" -p "$PG_PORT" -U postgres zw
        as_pg "$PG_BIN/createdb" -h "$pgd" -p "$PG_PORT" -U postgres -O zw zw
        # Keep a stopped copy for the next clusters; the first to finish
        # wins the rename, the others throw theirs away.
        as_pg "$PG_BIN/pg_ctl" -D "$pgd/data" -m fast -w -t 30 stop >/dev/null
        local tmp=$template.tmp.$$
        mkdir -p "$tmp"
        if cp -a "$pgd/data" "$tmp/data" && touch "$tmp/ready" && mv -T "$tmp" "$template" 2>/dev/null; then
            :
        else
            rm -rf "$tmp"
        fi
        pg_ctl_start || return 1
    fi
}

pg_pid() {
    local f=$D/pg/data/postmaster.pid pid
    [ -f "$f" ] || return 0
    pid=$(head -n 1 "$f")
    [ -n "$(proc_id "$pid")" ] && echo "$pid"
    return 0
}

pg_stop() {
    if [ -f "$D/pg/data/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$D/pg/data" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
    fi
}

# Starts moto in the background (it takes seconds to import; s3_ready
# waits): straight from its venv when there is one (checking the venv
# imports moto once more, seconds again), else through the script, which
# installs it.
s3_spawn() {
    local bin
    bin=$(bash "$HERE/s3-test-server.sh" bin)
    if [ "${1:-}" != --install ] && [ -x "$bin" ]; then
        spawn_in s3 moto "$bin" -H :: -p "$S3_PORT" >/dev/null
    else
        spawn_in s3 moto bash "$HERE/s3-test-server.sh" run "$S3_PORT" :: >/dev/null
    fi
}

s3_ready() {
    local url=http://$(ip4_of s3):$S3_PORT ok=0 tries=0
    # Up to ~3 minutes: the first start on a machine installs moto (pip).
    for _ in $(seq 900); do
        if in_host s3 curl -fsS --max-time 5 -o /dev/null "$url/" 2>/dev/null; then ok=1; break; fi
        if [ -z "$(recorded_pid "$D/pids/s3-moto.pid")" ]; then
            # A venv that no longer works: once more through the script.
            tries=$((tries + 1))
            [ "$tries" -le 1 ] || break
            s3_spawn --install
        fi
        sleep 0.1
    done
    [ "$ok" = 1 ] || { tail -n 20 "$D/logs/s3-moto.log" >&2; die "the S3 server did not start"; }
    in_host s3 curl -fsS --max-time 5 -o /dev/null -X PUT "$url/$S3_BUCKET" || die "creating bucket $S3_BUCKET"
}

git_start() {
    local git
    git=$(command -v git)
    if [ ! -d "$D/git/meta.git" ]; then
        mkdir -p "$D/git" "$D/git-www/cgi-bin"
        git init -q --bare --initial-branch=main "$D/git/meta.git"
        # Like a meta repository made by zw: history only moves forward.
        git -C "$D/git/meta.git" config receive.denyNonFastForwards true
        git -C "$D/git/meta.git" config receive.denyDeletes true
        git -C "$D/git/meta.git" config http.receivepack true
        cat >"$D/git-www/cgi-bin/git" <<CGI
#!/bin/sh
# git smart HTTP for the cluster's git host (busybox httpd CGI).
GIT_PROJECT_ROOT='$D/git' GIT_HTTP_EXPORT_ALL=1 exec '$git' http-backend
CGI
        chmod 755 "$D/git-www/cgi-bin/git"
    fi
    # git-daemon itself: `git daemon` would run it as a child, out of reach
    # of a signal to the recorded pid.
    spawn_in git daemon "$("$git" --exec-path)/git-daemon" --reuseaddr --export-all --enable=receive-pack \
        --informative-errors --port="$GIT_PORT" --base-path="$D/git" "$D/git" >/dev/null
    spawn_in git http busybox httpd -f -p "$HTTP_PORT" -h "$D/git-www" >/dev/null
    wait_for 100 in_host git git ls-remote "git://$(ip4_of git)/meta.git" ||
        { tail -n 20 "$D/logs/git-daemon.log" >&2; die "git daemon did not start"; }
    wait_for 100 in_host git git ls-remote "http://$(ip4_of git)/cgi-bin/git/meta.git" ||
        { tail -n 20 "$D/logs/git-http.log" >&2; die "git over HTTP did not start"; }
}

internet_body() { echo "zeitwork cluster $P: the internet answers"; }

internet_start() {
    mkdir -p "$D/internet/www"
    internet_body >"$D/internet/www/index.html"
    spawn_in internet httpd busybox httpd -f -p "$HTTP_PORT" -h "$D/internet/www" >/dev/null
    wait_for 100 in_host internet curl -fsS --max-time 5 -o /dev/null "http://$(ip4_of internet)/" ||
        die "the internet host's HTTP server did not start"
}

# Kills a spawned service and its process group (spawn makes it a group
# leader).
stop_recorded() {
    local pid
    pid=$(recorded_pid "$D/pids/$1-$2.pid")
    if [ -n "$pid" ]; then
        kill -KILL -- "-$pid" "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            [ -z "$(proc_id "$pid")" ] && break
            sleep 0.05
        done
    fi
    rm -f "$D/pids/$1-$2.pid"
}

service() {
    local svc=$1 action=$2
    case $svc:$action in
    pg:start) pg_start ;;
    pg:stop) pg_stop ;;
    s3:start) s3_spawn; s3_ready ;;
    s3:stop) stop_recorded s3 moto ;;
    git:start) git_start ;;
    git:stop) stop_recorded git daemon; stop_recorded git http ;;
    internet:start) internet_start ;;
    internet:stop) stop_recorded internet httpd ;;
    *:restart) service "$svc" stop; service "$svc" start ;;
    *) die "service: pg|s3|git|internet start|stop|restart" ;;
    esac
}

# --- up ----------------------------------------------------------------------

hosts_file() {
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    local h
    for h in "${ALL_HOSTS[@]}"; do
        printf '%s\t%s\n%s\t%s\n' "$(ip4_of "$h")" "$h" "$(ip6_of "$h")" "$h"
    done
}

# add_host HOST: namespace, veth to the router namespace, addresses, routes.
add_host() {
    local h=$1 ns gw4 gw6 plen4=24
    ns=$(ns_of "$h")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # No duplicate address detection: addresses are usable at once, and
    # again right after a heal.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0 \
        net.ipv6.conf.all.keep_addr_on_down=1
    ip -n "$BR" link add "$(link_of "$h")" type veth peer name eth0 netns "$ns"
    if [ "$h" = internet ]; then
        gw4=$PUB4_NET.1
        gw6=$PUB6_NET::1
        ip -n "$BR" addr add "$gw4/24" dev "$(link_of "$h")"
        ip -n "$BR" addr add "$gw6/64" dev "$(link_of "$h")" nodad
    else
        gw4=$V4_NET.1
        gw6=$V6_NET::1
        ip -n "$BR" link set "$(link_of "$h")" master br0
    fi
    ip -n "$BR" link set "$(link_of "$h")" up
    ip -n "$ns" addr add "$(ip4_of "$h")/$plen4" dev eth0
    ip -n "$ns" addr add "$(ip6_of "$h")/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$gw4"
    ip -n "$ns" -6 route add default via "$gw6"
    mkdir -p "$D/hosts/$h"
    if [ -n "$CG_ROOT" ]; then mkdir -p "$CG_ROOT/$h"; fi
}

write_state() {
    local hosts='{}' h
    for h in "${ALL_HOSTS[@]}"; do
        hosts=$(jq -c --arg h "$h" --arg ns "$(ns_of "$h")" --arg role "$(host_role "$h")" \
            --arg v4 "$(ip4_of "$h")" --arg v6 "$(ip6_of "$h")" --arg dir "$D/hosts/$h" \
            '. + {($h): {netns: $ns, role: $role, ipv4: $v4, ipv6: $v6, dir: $dir}}' <<<"$hosts")
    done
    local pg4 pg6 s34 s36 git4 git6 in4 in6
    pg4=$(ip4_of pg) pg6=$(ip6_of pg) s34=$(ip4_of s3) s36=$(ip6_of s3)
    git4=$(ip4_of git) git6=$(ip6_of git) in4=$(ip4_of internet) in6=$(ip6_of internet)
    jq -n --arg name "$P" --arg dir "$D" --arg br "$BR" --arg cg "$CG_ROOT" \
        --argjson hosts "$hosts" \
        --arg pg_pid "$(pg_pid)" --arg s3_pid "$(recorded_pid "$D/pids/s3-moto.pid")" \
        --arg git_pid "$(recorded_pid "$D/pids/git-daemon.pid")" \
        --arg git_http_pid "$(recorded_pid "$D/pids/git-http.pid")" \
        --arg in_pid "$(recorded_pid "$D/pids/internet-httpd.pid")" \
        --arg pg_url "postgres://zw@$pg4:$PG_PORT/zw" --arg pg_url6 "postgres://zw@[$pg6]:$PG_PORT/zw" \
        --arg s3_url "http://$s34:$S3_PORT" --arg s3_url6 "http://[$s36]:$S3_PORT" --arg bucket "$S3_BUCKET" \
        --arg git_url "http://$git4/cgi-bin/git/meta.git" --arg git_url6 "http://[$git6]/cgi-bin/git/meta.git" \
        --arg git_daemon "git://$git4/meta.git" --arg git_root "$D/git" \
        --arg in_url "http://$in4/" --arg in_url6 "http://[$in6]/" --arg body "$(internet_body)" \
        --arg v4net "$V4_NET.0/24" --arg v6net "$V6_NET::/64" \
        --arg pub4 "$PUB4_NET.0/24" --arg pub6 "$PUB6_NET::/64" '
        def pid($p): if $p == "" then null else ($p | tonumber) end;
        {
          name: $name, dir: $dir, bridge_netns: $br,
          cgroup: (if $cg == "" then null else $cg end),
          networks: {lan4: $v4net, lan6: $v6net, public4: $pub4, public6: $pub6},
          hosts: $hosts,
          services: {
            pg: {host: "pg", pid: pid($pg_pid), url: $pg_url, url6: $pg_url6,
                 user: "zw", database: "zw"},
            s3: {host: "s3", pid: pid($s3_pid), url: $s3_url, url6: $s3_url6, bucket: $bucket,
                 region: "us-east-1", access_key_id: "test", secret_access_key: "test"},
            git: {host: "git", pid: pid($git_pid), http_pid: pid($git_http_pid),
                  url: $git_url, url6: $git_url6, git_url: $git_daemon, root: $git_root},
            internet: {host: "internet", pid: pid($in_pid), url: $in_url, url6: $in_url6, body: $body}
          },
          hosts_file: ($dir + "/hosts.txt"),
          logs: ($dir + "/logs"),
          pids: ($dir + "/pids")
        }' >"$D/state.json.tmp"
    mv "$D/state.json.tmp" "$D/state.json"
}

start_reaper() {
    local pid=$1
    (
        set +e
        trap '' HUP INT TERM
        while kill -0 "$pid" 2>/dev/null && [ -e "$D/.zw-cluster" ]; do sleep 0.5; done
        if [ -e "$D/.zw-cluster" ]; then IN_REAPER=1 down; fi
    ) </dev/null >/dev/null 2>&1 &
    echo "$!" >"$D/reaper.pid"
    disown
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)"
    for t in ip jq curl git busybox runuser nsenter unshare setsid python3 "$PG_BIN/initdb"; do
        command -v "$t" >/dev/null || die "missing $t (bash scripts/test.sh installs what the tests need)"
    done
    if [ -n "$(our_namespaces)" ]; then
        die "cluster '$P' exists already: cluster.sh down --name $P${dir:+ --dir $D}"
    fi
    # D is new, or empty but for the scripts a driver put there to run.
    if [ -e "$D" ] && [ -n "$(ls -A "$D" | grep -vx scripts)" ]; then
        die "$D is not empty (a cluster directory must be new or empty)"
    fi
    mkdir -p "$D/logs" "$D/pids" "$D/hosts"
    touch "$D/.zw-cluster"
    # Services run as the postgres user reach their files under D.
    chmod 711 "$D"
    chmod 755 "$D/logs" "$D/hosts"
    if [ -n "$watch" ]; then start_reaper "$watch"; fi
    # A failed `up` leaves nothing behind.
    up_ok=0
    trap 'if [ "$up_ok" != 1 ]; then echo "cluster.sh: up failed, tearing down" >&2; down >/dev/null || true; fi' EXIT
    hosts_file >"$D/hosts.txt"
    if [ -n "$CG_ROOT" ]; then mkdir -p "$CG_ROOT" || CG_ROOT=""; fi

    ip netns add "$BR"
    ip -n "$BR" link set lo up
    ip netns exec "$BR" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
        net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
    ip -n "$BR" link add br0 type bridge
    ip -n "$BR" addr add "$V4_NET.1/24" dev br0
    ip -n "$BR" addr add "$V6_NET::1/64" dev br0 nodad
    ip -n "$BR" link set br0 up
    local h
    for h in "${ALL_HOSTS[@]}"; do add_host "$h"; done

    s3_spawn
    pg_start
    git_start
    internet_start
    s3_ready
    write_state
    up_ok=1
    echo "cluster $P is up: $D/state.json"
    jq -r '.hosts | to_entries[] | "  \(.key)\t\(.value.ipv4)\t\(.value.ipv6)"' "$D/state.json"
    jq -r '.services | to_entries[] | "  \(.key)\t\(.value.url)"' "$D/state.json"
}

# --- down --------------------------------------------------------------------

# Named namespaces made from our hosts (instance namespaces of a follower):
# those hanging off one of ours by a veth, and those a process of our
# cgroups runs in. With HOST arguments, only those made from these hosts.
child_namespaces() {
    local ns pid f inodes=" " nss=() cgs=()
    if [ $# -eq 0 ]; then
        mapfile -t nss < <(our_namespaces)
        if [ -n "$CG_ROOT" ]; then cgs=("$CG_ROOT"/*/cgroup.procs); fi
    else
        for h in "$@"; do
            nss+=("$(ns_of "$h")")
            if [ -n "$CG_ROOT" ]; then cgs+=("$CG_ROOT/$h/cgroup.procs"); fi
        done
    fi
    {
        for ns in "${nss[@]}"; do
            ip -n "$ns" -o link show type veth 2>/dev/null |
                grep -o 'link-netns [^ ]*' | awk '{ print $2 }' || true
        done
        if [ ${#cgs[@]} -gt 0 ]; then
            for pid in $(cat "${cgs[@]}" 2>/dev/null); do
                inodes+="$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) "
            done
            for f in /run/netns/*; do
                [ -e "$f" ] || continue
                case $inodes in *" $(stat -L -c %i "$f" 2>/dev/null) "*) basename "$f" ;; esac
            done
        fi
    } | sort -u | grep -vE "^$P-" || true
}

# Unmounts everything mounted under a directory, deepest first.
unmount_under() {
    local m
    for m in $(awk -v d="$1/" 'index($5 "/", d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

# What a power cut takes from a host: every process started in it (also
# those in namespaces made from it), those namespaces, the mounts under its
# directory and its nftables rules. Its addresses and routes stay, as a
# rebooted host's configuration would bring them back.
crash() {
    local h=$1 children pids c
    children=$(child_namespaces "$h")
    for _ in $(seq 50); do
        if [ -n "$CG_ROOT" ] && [ -e "$CG_ROOT/$h/cgroup.kill" ]; then
            echo 1 >"$CG_ROOT/$h/cgroup.kill" 2>/dev/null || true
        fi
        pids=$({
            for c in "$(ns_of "$h")" $children; do ip netns pids "$c" 2>/dev/null || true; done
            if [ -n "$CG_ROOT" ]; then cat "$CG_ROOT/$h/cgroup.procs" 2>/dev/null || true; fi
        } | sort -un)
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    [ -z "$pids" ] || die "processes of $h survive: $pids"
    for c in $children; do ip netns del "$c" 2>/dev/null || true; done
    unmount_under "$D/hosts/$h"
    ip netns exec "$(ns_of "$h")" nft flush ruleset 2>/dev/null || true
}

cluster_pids() {
    local ns f pid
    {
        for ns in $(our_namespaces) $(child_namespaces); do ip netns pids "$ns" 2>/dev/null || true; done
        if [ -n "$CG_ROOT" ] && [ -d "$CG_ROOT" ]; then
            cat "$CG_ROOT"/*/cgroup.procs 2>/dev/null || true
        fi
        for f in "$D"/pids/*.pid; do
            [ -e "$f" ] && recorded_pid "$f"
        done
        pg_pid
    } | sort -un
}

down() {
    set +e
    local reaper failed=0
    if [ -z "${IN_REAPER:-}" ] && [ -f "$D/reaper.pid" ]; then
        reaper=$(cat "$D/reaper.pid")
        kill -KILL "$reaper" 2>/dev/null || true
    fi
    pg_stop
    local children
    children=$(child_namespaces)
    # Kill, then look again: a process may fork while it is being killed.
    local pids
    for _ in $(seq 50); do
        if [ -n "$CG_ROOT" ] && [ -d "$CG_ROOT" ]; then
            for f in "$CG_ROOT"/*/cgroup.kill; do [ -e "$f" ] && echo 1 >"$f" 2>/dev/null; done
        fi
        pids=$(cluster_pids)
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    if [ -n "$(cluster_pids)" ]; then
        echo "cluster.sh: processes survive: $(cluster_pids | tr '\n' ' ')" >&2
        failed=1
    fi
    local ns
    for ns in $children $(our_namespaces); do
        ip netns del "$ns" 2>/dev/null || true
    done
    # Mounts left by a crash in the middle of `ip netns add`, or under D.
    unmount_under "$D"
    local m
    for m in $(awk -v p="/run/netns/$P-" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -f "/run/netns/$P-"* 2>/dev/null || true
    if [ -n "$CG_ROOT" ] && [ -d "$CG_ROOT" ]; then
        for _ in $(seq 50); do
            for f in "$CG_ROOT"/*/; do [ -d "$f" ] && rmdir "$f" 2>/dev/null; done
            rmdir "$CG_ROOT" 2>/dev/null && break
            sleep 0.1
        done
        if [ -d "$CG_ROOT" ]; then
            echo "cluster.sh: cgroup $CG_ROOT is still there" >&2
            failed=1
        fi
    fi
    if [ -n "$(our_namespaces)" ]; then
        echo "cluster.sh: namespaces survive: $(our_namespaces | tr '\n' ' ')" >&2
        failed=1
    fi
    if [ -e "$D/.zw-cluster" ]; then
        if [ "$keep_logs" = 1 ]; then
            find "$D" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
        else
            rm -rf "$D"
        fi
    fi
    return "$failed"
}

# --- status ------------------------------------------------------------------

status() {
    if [ -f "$D/state.json" ]; then cat "$D/state.json"; else echo "no state file $D/state.json"; fi
    echo "namespaces: $(our_namespaces | tr '\n' ' ')"
    local f base pid
    local pgp
    pgp=$(pg_pid)
    if [ -n "$pgp" ]; then echo "pg postgres $pgp alive"; else echo "pg postgres - dead"; fi
    for f in "$D"/pids/*.pid; do
        [ -e "$f" ] || continue
        base=$(basename "$f" .pid)
        pid=$(recorded_pid "$f")
        if [ -n "$pid" ]; then
            echo "${base%%-*} ${base#*-} $pid alive"
        else
            echo "${base%%-*} ${base#*-} $(cut -d' ' -f1 "$f") dead"
        fi
    done
}

# --- commands ----------------------------------------------------------------

case $cmd in
up) up ;;
down) down ;;
status) status ;;
exec)
    [ ${#pos[@]} -eq 1 ] && [ ${#rest[@]} -gt 0 ] || die "usage: exec HOST -- CMD..."
    require_host "${pos[0]}"
    enter "${pos[0]}" "${rest[@]}"
    ;;
spawn)
    [ ${#pos[@]} -eq 2 ] && [ ${#rest[@]} -gt 0 ] || die "usage: spawn HOST NAME -- CMD..."
    require_host "${pos[0]}"
    spawn_in "${pos[0]}" "${pos[1]}" "${rest[@]}"
    ;;
kill)
    [ ${#pos[@]} -ge 2 ] && [ ${#pos[@]} -le 3 ] || die "usage: kill HOST NAME [SIGNAL]"
    host_num "${pos[0]}" >/dev/null
    check_proc_name "${pos[1]}"
    sig=${pos[2]:-KILL}
    sig=${sig#-}
    pid=$(recorded_pid "$D/pids/${pos[0]}-${pos[1]}.pid")
    [ -n "$pid" ] || die "${pos[1]} does not run on ${pos[0]}"
    kill -s "$sig" "$pid"
    if [ "$sig" = KILL ] || [ "$sig" = 9 ]; then
        for _ in $(seq 100); do
            [ -z "$(proc_id "$pid")" ] && break
            sleep 0.05
        done
        [ -z "$(proc_id "$pid")" ] || die "${pos[1]} ($pid) on ${pos[0]} survived SIGKILL"
    fi
    ;;
alive)
    [ ${#pos[@]} -eq 2 ] || die "usage: alive HOST NAME"
    host_num "${pos[0]}" >/dev/null
    check_proc_name "${pos[1]}"
    pid=$(recorded_pid "$D/pids/${pos[0]}-${pos[1]}.pid")
    [ -n "$pid" ] || exit 1
    echo "$pid"
    ;;
pids) cluster_pids ;;
crash)
    [ ${#pos[@]} -eq 1 ] || die "usage: crash HOST"
    require_host "${pos[0]}"
    crash "${pos[0]}"
    ;;
partition | heal)
    [ ${#pos[@]} -eq 1 ] || die "usage: $cmd HOST"
    require_up
    require_host "${pos[0]}"
    if [ "$cmd" = partition ]; then state=down; else state=up; fi
    ip -n "$BR" link set "$(link_of "${pos[0]}")" "$state"
    ;;
ip)
    [ ${#pos[@]} -ge 1 ] && [ ${#pos[@]} -le 2 ] || die "usage: ip HOST [4|6]"
    case ${pos[1]:-4} in
    4) ip4_of "${pos[0]}" ;;
    6) ip6_of "${pos[0]}" ;;
    *) die "usage: ip HOST [4|6]" ;;
    esac
    ;;
service)
    [ ${#pos[@]} -eq 2 ] || die "usage: service pg|s3|git|internet start|stop|restart"
    require_up
    service "${pos[0]}" "${pos[1]}"
    ;;
_host)
    # Internal: the last step of `enter`, inside the host's namespaces.
    hostname "${pos[0]}"
    cd "${pos[1]}"
    exec "${rest[@]}"
    ;;
-h | --help | help) usage ;;
*) usage ;;
esac
