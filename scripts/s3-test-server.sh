#!/usr/bin/env bash
# S3-compatible test server (moto_server) for the builder's tests.
#
#   s3-test-server.sh install        install moto[server] into a venv (idempotent),
#                                    print the path of the moto_server binary
#   s3-test-server.sh bin            print where moto_server is or will be (no check)
#   s3-test-server.sh run PORT [ADDR] install if missing, then exec moto_server on
#                                    ADDR:PORT (default 127.0.0.1: loopback only;
#                                    scripts/cluster.sh gives :: inside its s3 host)
#
# The venv lives under ${ZW_CACHE_DIR:-$HOME/.cache/zeitwork}/moto-venv.
set -euo pipefail

MOTO_VERSION="${ZW_MOTO_VERSION:-5.1.4}"
CACHE_DIR="${ZW_CACHE_DIR:-${HOME:-/root}/.cache/zeitwork}"
VENV="$CACHE_DIR/moto-venv"
BIN="$VENV/bin/moto_server"

install_moto() {
    if [[ -x "$BIN" ]] && "$VENV/bin/python" -c 'import moto.server' 2>/dev/null; then
        return 0
    fi
    command -v python3 >/dev/null || { echo "s3-test-server: python3 is required" >&2; exit 2; }
    mkdir -p "$CACHE_DIR"
    # Serialise concurrent installs (several test binaries may start at once).
    exec 9>"$CACHE_DIR/moto-venv.lock"
    flock 9
    if [[ ! -x "$BIN" ]]; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" >&2 || {
            echo "s3-test-server: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
            exit 2
        }
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
    fi
    flock -u 9
}

case "${1:-}" in
    install)
        install_moto
        echo "$BIN"
        ;;
    bin)
        echo "$BIN"
        ;;
    run)
        port="${2:?usage: s3-test-server.sh run PORT [ADDR]}"
        addr="${3:-127.0.0.1}"
        install_moto
        exec "$BIN" -H "$addr" -p "$port"
        ;;
    *)
        echo "usage: s3-test-server.sh install | bin | run PORT [ADDR]" >&2
        exit 2
        ;;
esac
