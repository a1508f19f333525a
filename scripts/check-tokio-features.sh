#!/usr/bin/env bash
# Fails when a normal (not dev) dependency of a shipped binary turns on tokio's `test-util`.
# Cargo unifies features, so one such dependency gives every binary tokio's paused-clock
# machinery: a thread-local runtime lookup and a mutex on each tokio clock read, on the request
# path. vendor/tryhard/PATCHED.md tells the story of the one that did.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for pkg in edgeroute edgeroute-lab; do
  tree=$(cargo tree --locked -p "$pkg" -e normal,features -i tokio)
  if grep -q 'tokio feature "test-util"' <<<"$tree"; then
    echo "$pkg is built with tokio's test-util; it is turned on through:" >&2
    grep -A6 'tokio feature "test-util"' <<<"$tree" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "no shipped binary builds tokio's test-util"
exit "$status"
