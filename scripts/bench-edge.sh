#!/usr/bin/env bash
# Benchmark: the edge vs nginx in front of the same backend, on loopback.
#
#   scripts/bench-edge.sh [duration_seconds]
#
# Both proxies run one worker pinned to CPU 0 (the edge on a current-thread
# runtime, like nginx's single-threaded worker, unless EDGE_CURRENT_THREAD=0:
# then a one-worker multi-thread runtime); wrk and the backend (an nginx
# answering 200 itself) share CPU 1. Also the whole path to an instance on a
# node (edge -> node-proxy over mTLS vs nginx -> nginx over TLS with a client
# certificate, both pairs on CPU 0). Prints one JSON line per figure, as
# BENCH.md asks: {"bench":..,"ours":..,"reference":..,"ratio":..}.
# Needs: nginx, wrk, taskset, python3, openssl; builds the edge in release.
set -euo pipefail

DURATION="${1:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zeitwork/target}"
for tool in nginx wrk taskset python3 openssl; do
  command -v "$tool" >/dev/null || { echo "bench-edge: missing $tool (apt-get install nginx wrk util-linux python3 openssl)" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "bench-edge: needs 2 CPUs to pin proxy and load generator apart" >&2; exit 1; }

(cd "$ROOT" && cargo build --release -q -p edge --example edge_server --example node_proxy_server)
EDGE_BIN="$CARGO_TARGET_DIR/release/examples/edge_server"
NODE_PROXY_BIN="$CARGO_TARGET_DIR/release/examples/node_proxy_server"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/backend.pid" ] && kill "$(cat "$WORK/backend.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/node.pid" ] && kill "$(cat "$WORK/node.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 12000 ] || { echo "bench-edge: needs ulimit -n >= 12000 for 10k idle connections" >&2; exit 1; }

# Free loopback ports, picked now (other services may hold fixed ones).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND=127.0.0.1:$(free_port)
NGINX_HTTP=127.0.0.1:$(free_port)
NGINX_HTTPS=127.0.0.1:$(free_port)
EDGE_HTTP=127.0.0.1:$(free_port)
EDGE_HTTPS=127.0.0.1:$(free_port)
NODE_PROXY=127.0.0.1:$(free_port)
NGINX_NODE=127.0.0.1:$(free_port)
NGINX_FULL=127.0.0.1:$(free_port)
HOST=bench.test
FULL_HOST=full.test

# One ECDSA P-256 certificate for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=$HOST" -addext "subjectAltName=DNS:$HOST" \
  -keyout "$WORK/cert.key" -out "$WORK/cert.crt" 2>/dev/null

cat >"$WORK/backend.conf" <<CONF
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend.err warn;
events { worker_connections 14000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen $BACKEND reuseport backlog=4096;
    location / { return 200 "hello from the backend\n"; }
  }
}
CONF

cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 15000;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 14000; }
http {
  access_log off;
  keepalive_requests 1000000;
  # What the edge sends on, for both servers (inherited by their locations).
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host \$host;
  proxy_set_header X-Forwarded-For \$remote_addr;
  proxy_set_header X-Forwarded-Proto \$scheme;
  proxy_set_header X-Forwarded-Host \$host;
  proxy_set_header X-Request-Id \$request_id;
  upstream app { server $BACKEND; keepalive 128; }
  server {
    listen $NGINX_HTTP backlog=4096;
    listen $NGINX_HTTPS ssl backlog=4096;
    server_name $HOST;
    ssl_certificate $WORK/cert.crt;
    ssl_certificate_key $WORK/cert.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {
      proxy_pass http://app;
    }
  }
  # The whole path: front -> "node" nginx over TLS with a client
  # certificate (the edge -> node-proxy hop), then the backend.
  upstream node { server $NGINX_NODE; keepalive 128; }
  server {
    listen $NGINX_FULL backlog=4096;
    server_name $FULL_HOST;
    location / {
      proxy_pass https://node;
      proxy_ssl_certificate $WORK/mtls/edge.crt;
      proxy_ssl_certificate_key $WORK/mtls/edge.key;
      proxy_ssl_trusted_certificate $WORK/mtls/ca.crt;
      proxy_ssl_verify on;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_name node-1.bench;
      proxy_ssl_session_reuse on;
    }
  }
}
CONF

cat >"$WORK/node.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 15000;
pid $WORK/node.pid;
error_log $WORK/node.err warn;
events { worker_connections 14000; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream app { server $BACKEND; keepalive 128; }
  server {
    listen $NGINX_NODE ssl backlog=4096;
    ssl_certificate $WORK/mtls/node.crt;
    ssl_certificate_key $WORK/mtls/node.key;
    ssl_client_certificate $WORK/mtls/ca.crt;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF

cat >"$WORK/routes.json" <<JSON
{"version":1,"routes":[{"domain":"$HOST","env":"bench","app":"bench","kind":"http",
 "backends":[{"instance_id":"b1","node_id":"local","node_proxy":"$BACKEND","transport":"plain"}]},
 {"domain":"$FULL_HOST","env":"bench","app":"full","kind":"http",
 "backends":[{"instance_id":"b1","node_id":"local","node_proxy":"$NODE_PROXY","transport":"mtls"}]}]}
JSON
mkdir -p "$WORK/edge-data/certs"

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
taskset -c 1 nginx -c "$WORK/backend.conf" -p "$WORK"
# The node-proxy writes the cluster CA and both certificates first.
EDGE_CURRENT_THREAD=${EDGE_CURRENT_THREAD:-1} TOKIO_WORKER_THREADS=1 ZW_LOG=error taskset -c 0 "$NODE_PROXY_BIN" \
  --dir "$WORK/mtls" --listen "$NODE_PROXY" --instance "b1=$BACKEND" &
PIDS+=("$!")
wait_port "$NODE_PROXY"
taskset -c 0 nginx -c "$WORK/node.conf" -p "$WORK"
taskset -c 0 nginx -c "$WORK/nginx.conf" -p "$WORK"
# Every client of the benchmark is 127.0.0.1 (10k idle connections among
# them): a per-client share above that, so that its cost is measured too.
EDGE_CURRENT_THREAD=${EDGE_CURRENT_THREAD:-1} TOKIO_WORKER_THREADS=1 ZW_LOG=error taskset -c 0 "$EDGE_BIN" \
  --routes-file "$WORK/routes.json" --data-dir "$WORK/edge-data" \
  --http "$EDGE_HTTP" --https "$EDGE_HTTPS" --no-access-log --max-connections-per-ip 20000 \
  --tls-cert "$WORK/cert.crt" --tls-key "$WORK/cert.key" --no-local-ca --mtls-dir "$WORK/mtls" &
EDGE_PID=$!
PIDS+=("$EDGE_PID")

for p in $BACKEND $NGINX_HTTP $EDGE_HTTP $EDGE_HTTPS $NGINX_HTTPS $NGINX_NODE $NGINX_FULL; do wait_port "$p"; done
for pair in "$HOST http://$NGINX_HTTP/" "$HOST http://$EDGE_HTTP/" "$FULL_HOST http://$NGINX_FULL/" "$FULL_HOST http://$EDGE_HTTP/"; do
  read -r host url <<<"$pair"
  out="$(curl -sS -H "Host: $host" "$url")"
  [ "$out" = "hello from the backend" ] || { echo "bench-edge: $url ($host) answered '$out'" >&2; tail -n 3 "$WORK"/*.err >&2; exit 1; }
done

# wrk prints latencies like 1.23ms / 850.00us / 1.02s; normalise to ms.
to_ms() { python3 -c 'import sys,re
v=sys.argv[1]; m=re.match(r"([\d.]+)(us|ms|s)$",v); n=float(m.group(1)); u=m.group(2)
print(n/1000 if u=="us" else n*1000 if u=="s" else n)' "$1"; }

# run_wrk URL [extra wrk args...] -> "rps p99ms"
run_wrk() {
  local url="$1"; shift
  local out
  out="$(taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" --latency -H "Host: ${WRK_HOST:-$HOST}" "$@" "$url")"
  local rps p99 errs
  rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
  errs="$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")"
  [ -z "$errs" ] || echo "bench-edge: $url: $errs" >&2
  echo "$rps $(to_ms "$p99")"
}

ratio() { python3 -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(round(a/b,3) if b else 0)' "$1" "$2"; }

# CPU time (user + system, clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
NGINX_WORKER="$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)"

# Warm up both, then measure alternately (edge, nginx) to share the noise.
# Besides requests/s and p99, the proxy's own CPU time per request: when
# wrk and the backend saturate their core (they do at ~100k/s here), the
# requests/s of both proxies are capped by it, the CPU cost is not.
run_wrk "http://$EDGE_HTTP/" >/dev/null
run_wrk "http://$NGINX_HTTP/" >/dev/null
T0="$(cpu_ticks "$EDGE_PID")"
read -r E_RPS E_P99 < <(run_wrk "http://$EDGE_HTTP/")
E_TICKS=$(( $(cpu_ticks "$EDGE_PID") - T0 ))
T0="$(cpu_ticks "$NGINX_WORKER")"
read -r N_RPS N_P99 < <(run_wrk "http://$NGINX_HTTP/")
N_TICKS=$(( $(cpu_ticks "$NGINX_WORKER") - T0 ))
us_per_req() { python3 -c 'import sys,os; t,r,d=map(float,sys.argv[1:]); print(round(t/os.sysconf("SC_CLK_TCK")*1e6/(r*d),2) if r else 0)' "$1" "$2" "$DURATION"; }
E_US="$(us_per_req "$E_TICKS" "$E_RPS")"
N_US="$(us_per_req "$N_TICKS" "$N_RPS")"
echo "{\"bench\":\"edge_http1_keepalive_rps\",\"ours\":$E_RPS,\"reference\":$N_RPS,\"ratio\":$(ratio "$E_RPS" "$N_RPS")}"
echo "{\"bench\":\"edge_http1_cpu_us_per_request\",\"ours\":$E_US,\"reference\":$N_US,\"ratio\":$(ratio "$E_US" "$N_US")}"
echo "{\"bench\":\"edge_http1_keepalive_p99_ms\",\"ours\":$E_P99,\"reference\":$N_P99,\"ratio\":$(ratio "$E_P99" "$N_P99")}"

# The whole path to an instance on a node: edge -> node-proxy over mTLS
# (both on CPU 0) vs nginx -> nginx over TLS with a client certificate
# (both on CPU 0), each in front of the same backend.
WRK_HOST=$FULL_HOST run_wrk "http://$EDGE_HTTP/" >/dev/null
read -r EF_RPS EF_P99 < <(WRK_HOST=$FULL_HOST run_wrk "http://$EDGE_HTTP/")
read -r NF_RPS NF_P99 < <(WRK_HOST=$FULL_HOST run_wrk "http://$NGINX_FULL/")
echo "{\"bench\":\"edge_node_proxy_path_rps\",\"ours\":$EF_RPS,\"reference\":$NF_RPS,\"ratio\":$(ratio "$EF_RPS" "$NF_RPS")}"
echo "{\"bench\":\"edge_node_proxy_path_p99_ms\",\"ours\":$EF_P99,\"reference\":$NF_P99,\"ratio\":$(ratio "$EF_P99" "$NF_P99")}"

[ "${BENCH_EDGE_ONLY_HTTP:-}" = 1 ] && exit 0

# Full TLS 1.3 handshakes: one request per connection, no session reuse.
read -r E_HS _ < <(run_wrk "https://$EDGE_HTTPS/" -H "Connection: close")
read -r N_HS _ < <(run_wrk "https://$NGINX_HTTPS/" -H "Connection: close")
echo "{\"bench\":\"edge_tls13_full_handshakes_per_s\",\"ours\":$E_HS,\"reference\":$N_HS,\"ratio\":$(ratio "$E_HS" "$N_HS")}"

# RSS growth for 10,000 idle keep-alive connections (each served one request).
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss() {
  local pid="$1" addr="$2" before after
  before="$(rss_kb "$pid")"
  python3 - "$addr" "$HOST" "$pid" <<'PY' &
import socket, sys, time, os
host, port = sys.argv[1].rsplit(":", 1)
req = ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % sys.argv[2]).encode()
socks = []
for i in range(10000):
    s = socket.create_connection((host, int(port)))
    s.sendall(req)
    got = b""
    while b"backend" not in got:
        got += s.recv(4096)
    socks.append(s)
print("ready", file=sys.stderr, flush=True)
time.sleep(4)
PY
  local py=$!
  sleep 3
  while ! [ "$(ls /proc/$py/fd 2>/dev/null | wc -l)" -ge 10000 ]; do sleep 0.5; kill -0 "$py" 2>/dev/null || break; done
  sleep 0.5
  after="$(rss_kb "$pid")"
  wait "$py" || true
  echo $(( after - before ))
}
E_RSS="$(idle_rss "$EDGE_PID" "$EDGE_HTTP")"
N_RSS="$(idle_rss "$NGINX_WORKER" "$NGINX_HTTP")"
echo "{\"bench\":\"edge_rss_kib_per_10k_idle_conns\",\"ours\":$E_RSS,\"reference\":$N_RSS,\"ratio\":$(ratio "$E_RSS" "$N_RSS")}"
