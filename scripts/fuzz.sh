#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) for a bounded time each, on stable
# Rust (`-s none`: no sanitizer, so no nightly). Every parser that sees untrusted bytes has a
# target; see fuzz/fuzz_targets/*.rs for what each one checks.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 60 s, every target)
#
# The seeds in fuzz/corpus/<target>/ are read, never written: what libFuzzer finds goes to a
# scratch directory, so the tree stays clean. A crash fails the run; its reproducer is kept in
# fuzz/artifacts/<target>/ (replay: cargo fuzz run -s none <target> <file>). No network: the
# targets only parse bytes in memory.
#
# Environment: FUZZ_TARGET_DIR (default ~/.cache/edgeroute/fuzz-target, kept across clones),
# EDGEROUTE_CARGO_LOCK (a file to `flock` around each cargo command, for shared machines).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
case "$secs" in '' | *[!0-9]*)
  echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
  exit 2
  ;;
esac

CACHE="${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$CACHE/fuzz-target}"

cargo_locked() {
  if [ -n "${EDGEROUTE_CARGO_LOCK:-}" ]; then
    flock "$EDGEROUTE_CARGO_LOCK" cargo "$@"
  else
    cargo "$@"
  fi
}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo_locked install --locked cargo-fuzz
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

start=$(date +%s)
cargo_locked fuzz build --fuzz-dir fuzz -s none
echo "built in $(($(date +%s) - start)) s"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  if [ ! -d "fuzz/corpus/$t" ]; then
    echo "$t: no seed corpus in fuzz/corpus/$t" >&2
    failed+=("$t")
    continue
  fi
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  log="$scratch/$t.log"
  # The scratch dir comes first: libFuzzer writes new inputs to the first corpus dir only.
  rc=0
  cargo_locked fuzz run --fuzz-dir fuzz -s none "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  new=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -n1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | cut -d' ' -f2)
  seeds=$(find "fuzz/corpus/$t" -type f | wc -l)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "$t: FAILED (exit $rc) after ${runs:-?} runs; last output:"
    tail -n 40 "$log" | sed 's/^/    /'
    grep -h 'Test unit written to' "$log" | sed "s/^/$t: reproducer: /" || true
  else
    echo "$t: ${runs:-?} runs in ${secs} s (${rate:-?} exec/s), ${new:-0} new inputs beyond ${seeds} seeds, ${cov:-?} edges covered"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets, no crash"
