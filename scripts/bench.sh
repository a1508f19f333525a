#!/usr/bin/env bash
# Runs the gateway-overhead benchmark (BENCHMARKS.md, "Gateway overhead") on a fresh machine:
# installs what its reference rows need — nginx (Debian) and LiteLLM's proxy (a pinned PyPI
# release in its own venv, scripts/setup-litellm.sh) — builds the release binaries (`edgeroute`,
# the gateway measured, and `edgeroute-lab`, the benchmark), and runs
# `edgeroute-lab bench gateway` with this script's arguments passed through, e.g.
#   scripts/bench.sh                                   # the published configuration
#   scripts/bench.sh --rates 50 --duration-s 4 --rounds 1
# Loopback only; the run stops by itself. The report (Markdown) goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
step() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x /usr/sbin/nginx ]; then
  step "installing nginx (the reference reverse proxy)"
  as_root apt-get update -qq
  as_root apt-get install -y -qq nginx >&2
  # The benchmark starts its own nginx on a free loopback port. Debian's package may start
  # and enable a system nginx on port 80 (on machines where services are allowed to start):
  # stop and disable it, so that it neither holds port 80 nor competes for the cores.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now nginx >/dev/null 2>&1 || true
  elif [ -f /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    as_root /usr/sbin/nginx -s quit || true
  fi
fi

step "LiteLLM proxy (venv under ${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute})"
bash scripts/setup-litellm.sh

step "cargo build --release -p edgeroute -p edgeroute-lab"
cargo build --release -p edgeroute -p edgeroute-lab --locked >&2

step "edgeroute-lab bench gateway $*"
exec "$TARGET/release/edgeroute-lab" bench gateway "$@"   # measures the edgeroute built next to it
