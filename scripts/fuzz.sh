#!/usr/bin/env bash
# Fuzzes zeitwork's parsers of hostile input, each target for a bounded time,
# one after another: scripts/fuzz.sh [seconds per target (60)] [target...]
#
# The targets are in fuzz/fuzz_targets/ (cargo-fuzz, libFuzzer); each calls
# a check of fuzz/checks/, which the ordinary test suite also runs over the
# committed corpora (fuzz/corpus/<target>/). New inputs that reach new code
# are added to the corpus, which is minimized at the end of each run: commit
# what it keeps. A finding (a panic, a disagreement with a
# reference, an escape) is written to fuzz/artifacts/<target>/ and printed;
# copy it into the corpus once fixed so that it stays fixed.
#
# Only a stable Rust is installed: cargo-fuzz's nightly-only rustc flags
# (-Zsanitizer, -Cpasses=sancov-module, ...) are accepted with
# RUSTC_BOOTSTRAP=1. No sanitizer is used: the code under test is safe Rust,
# so a finding is a panic, an overflow (debug assertions are on) or a failed
# check, and ASan would only halve the executions.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

secs=${1:-60}
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

if ! command -v c++ >/dev/null 2>&1; then
  # libFuzzer itself is C++, built by libfuzzer-sys.
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${ZW_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zeitwork/target}/fuzz}"
build=(--sanitizer none --debug-assertions)
bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

cd fuzz

# Keeps the committed corpus small: a smallest set of inputs that covers the
# same code edges (libFuzzer's set-cover merge, hit counts ignored), plus the
# named seed-* and finding-* files.
minimize() {
  local t=$1 dir=$2 new f
  new=$(mktemp -d)
  if ! "$bin_dir/$t" -set_cover_merge=1 -use_counters=0 -use_value_profile=0 "$new" "$dir" >/dev/null 2>&1; then
    rm -rf "$new"
    return
  fi
  for f in "$dir"/seed-* "$dir"/finding-*; do
    [ -e "$f" ] || continue
    cp "$f" "$new/"
    rm -f "$new/$(sha1sum "$f" | cut -d' ' -f1)"
  done
  rm -rf "$dir"
  mv "$new" "$dir"
  chmod 755 "$dir"
}

summary=()
for t in "${targets[@]}"; do
  # The webhook target needs the captain, by far the largest build under
  # these flags: only it is built with it.
  features=()
  if [ "$t" = webhook ]; then features=(--features webhook); fi
  cargo fuzz build "${build[@]}" "${features[@]}" "$t"
  corpus="corpus/$t"
  artifacts="artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log=$(mktemp)
  args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1)
  echo "fuzz.sh: $t for ${secs}s"
  if [ "$t" = tar_extract ] && [ "$(id -u)" -eq 0 ]; then
    # This target writes the files an archive names: run it unprivileged,
    # so that an escape the fuzzer finds cannot touch the machine.
    work=$(mktemp -d)
    cp -r "$corpus" "$work/corpus"
    mkdir -p "$work/artifacts"
    chown -R nobody "$work"
    set +e
    (cd "$work" && setpriv --reuid=nobody --regid=nogroup --clear-groups -- \
      "$bin_dir/$t" "${args[@]}" -artifact_prefix="$work/artifacts/" corpus) >"$log" 2>&1
    rc=$?
    set -e
    cp -n "$work/corpus/"* "$corpus/" 2>/dev/null || true
    cp "$work/artifacts/"* "$artifacts/" 2>/dev/null || true
    rm -rf "$work"
  else
    set +e
    cargo fuzz run "${build[@]}" "${features[@]}" "$t" "$corpus" -- "${args[@]}" >"$log" 2>&1
    rc=$?
    set -e
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  if [ "$rc" -ne 0 ]; then
    echo "fuzz.sh: $t: FINDING (exit $rc); the input is in fuzz/$artifacts/:"
    grep -E 'panicked|assertion|Test unit written' "$log" | head -20 || true
  fi
  minimize "$t" "$corpus"
  summary+=("$t: ${runs:-?} executions, exit $rc, $(ls "$corpus" | wc -l) corpus files, $(ls "$artifacts" | wc -l) artifacts")
  rm -f "$log"
done

printf 'fuzz.sh: %s\n' "${summary[@]}"
