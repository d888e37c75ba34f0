#!/usr/bin/env bash
# OpenAPI-driven fuzzing of a running captain with schemathesis.
#
#   openapi-fuzz.sh install               install schemathesis into a venv (idempotent),
#                                         print the path of its `st` binary
#   openapi-fuzz.sh run BASE TOKEN SECS   fuzz the captain at BASE (http://127.0.0.1:PORT)
#                                         with the bearer TOKEN for at most SECS seconds;
#                                         exits non-zero on any finding
#
# Not fuzzed: git smart HTTP and the route stream (not request/answer
# APIs: git's own protocol, an endless event stream), source uploads (a
# gzip'd tarball schemathesis cannot make) and token revocation (it would
# revoke the fuzzer's own admin token from the listing and end the run).
#
# Checks: no 5xx, every status code and content type documented, answers
# conform to their schemas. (ZW_FUZZ_CHECKS=all adds that data the schema
# refuses is refused and data it takes is not refused with 400: integer
# widths and 1.0-as-integer still differ there, see ARCHITECTURE.md.)
# The venv lives under ${ZW_CACHE_DIR:-$HOME/.cache/zeitwork}/schemathesis-venv.
set -euo pipefail

ST_VERSION="${ZW_SCHEMATHESIS_VERSION:-4.32.5}"
CACHE_DIR="${ZW_CACHE_DIR:-${HOME:-/root}/.cache/zeitwork}"
VENV="$CACHE_DIR/schemathesis-venv"
BIN="$VENV/bin/st"

install_st() {
    if [[ -x "$BIN" ]] && "$BIN" --version 2>/dev/null | grep -qF "$ST_VERSION"; then
        return 0
    fi
    command -v python3 >/dev/null || { echo "openapi-fuzz: python3 is required" >&2; exit 2; }
    mkdir -p "$CACHE_DIR"
    # Serialise concurrent installs.
    exec 9>"$CACHE_DIR/schemathesis-venv.lock"
    flock 9
    if ! { [[ -x "$BIN" ]] && "$BIN" --version 2>/dev/null | grep -qF "$ST_VERSION"; }; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" >&2 || {
            echo "openapi-fuzz: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
            exit 2
        }
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION" >&2
    fi
    flock -u 9
}

case "${1:-}" in
    install)
        install_st
        echo "$BIN"
        ;;
    run)
        base="${2:?usage: openapi-fuzz.sh run BASE TOKEN SECS}"
        token="${3:?usage: openapi-fuzz.sh run BASE TOKEN SECS}"
        secs="${4:?usage: openapi-fuzz.sh run BASE TOKEN SECS}"
        install_st
        export SCHEMATHESIS_HOOKS=
        # No colour, no telemetry; the document is the captain's own.
        exec timeout --signal=INT --kill-after=10 "$secs" "$BIN" run \
            "$base/v1/openapi.json" \
            --url "$base" \
            --header "Authorization: Bearer $token" \
            --checks "${ZW_FUZZ_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance}" \
            --max-examples "${ZW_FUZZ_EXAMPLES:-20}" \
            --workers 1 \
            --no-color \
            --suppress-health-check all \
            --exclude-path-regex '^/meta\.git/|^/v1/routes/stream$' \
            --exclude-operation-id delete_v1_tokens__id_ \
            --exclude-operation-id post_v1_sources \
            --seed "${ZW_FUZZ_SEED:-15}"
        ;;
    *)
        echo "usage: openapi-fuzz.sh install | run BASE TOKEN SECS" >&2
        exit 2
        ;;
esac
