#!/usr/bin/env bash
# pg-test-cluster.sh DIR PORT WATCH_PID
#
# Start a throwaway PostgreSQL cluster for tests in DIR (created, must not
# exist), listening on 127.0.0.1:PORT with trust authentication for the
# user "postgres", and return once it accepts connections. A reaper in the
# background stops the cluster and deletes DIR as soon as process WATCH_PID
# (the test binary) exits, however it exits.
#
# Postgres refuses to run as root: as root the server runs as the postgres
# user through runuser. Binaries: $PG_BIN or /usr/lib/postgresql/15/bin.
set -euo pipefail

dir=${1:?usage: pg-test-cluster.sh DIR PORT WATCH_PID}
port=${2:?port}
watch=${3:?pid to watch}
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

mkdir -p "$dir"
if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir"; fi
if ! as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1; then
  cat "$dir/initdb.log" >&2
  exit 1
fi
opts="-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
if ! as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$opts" start >/dev/null; then
  cat "$dir/server.log" >&2
  exit 1
fi

# The reaper ignores the signals a harness (timeout, Ctrl-C) sends to the
# whole process group, so a killed test run still stops its cluster.
(
  set +e
  trap '' HUP INT TERM
  while kill -0 "$watch" 2>/dev/null; do sleep 0.5; done
  as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
) </dev/null >/dev/null 2>&1 &
disown
