#!/usr/bin/env bash
# Runs every test of edgeroute on a fresh machine: formatting, lints, the Rust suites, and the
# Python suites against real peers (the official `openai` client; llama.cpp serving SmolLM2).
# Installs what the tests need (Python venv, llama-cpp-python, the model; cached under
# ~/.cache/edgeroute so later runs are fast). Loopback only; every test stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x /usr/sbin/nats-server ]; then
  step "installing nats-server (the topology bus tests start their own)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nats-server; else sudo apt-get update -qq && sudo apt-get install -y -qq nats-server; fi
fi

step "python peers (venv, openai, llama-cpp-python, SmolLM2 model)"
bash scripts/setup-python.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rust tests (nextest)"
cargo nextest run --workspace --locked --no-fail-fast

step "rust doc tests"
cargo test --workspace --doc --locked --quiet

step "fuzz smoke (${FUZZ_SECONDS:-10} s per target)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-10}"

step "python suites against the real binary"
cargo build -p edgeroute --locked --quiet
EDGEROUTE_BIN="$TARGET/debug/edgeroute" "$CACHE/venv/bin/python" -m pytest tests/python -q -p no:cacheprovider
