#!/usr/bin/env bash
# pre-receive hook of a zeitwork meta repository, written into the bare
# repository's hooks/ by the captain at start.
#
# Every push is validated by the captain's own code (meta_schema): the
# captain runs `git http-backend` with ZW_PRE_RECEIVE_HOOK set to the
# command to run, one argument per line (by default: the zw binary and its
# hidden `captain-pre-receive` subcommand). That command reads the
# "<old> <new> <ref>" lines on stdin and exits non-zero, with the reason on
# stderr, to refuse the push. Pushes that bypass the captain are refused.
set -euo pipefail
if [ -z "${ZW_PRE_RECEIVE_HOOK:-}" ]; then
  echo "zeitwork: push to the meta repository through the captain (<captain>/meta.git); direct pushes are refused" >&2
  exit 1
fi
mapfile -t cmd <<<"$ZW_PRE_RECEIVE_HOOK"
exec "${cmd[@]}"
