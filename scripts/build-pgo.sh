#!/usr/bin/env bash
# Builds the `edgeroute` binary with profile-guided optimisation (PGO): the `dist` build (fat
# LTO, one codegen unit), laid out and inlined by where a trained run spent its time.
#
#   scripts/build-pgo.sh [--out PATH] [--keep-profile DIR]
#
# 1. llvm-profdata of rustc's own LLVM major version (Debian's `llvm-N`, installed when missing:
#    a profile is only read by the LLVM that wrote its format).
# 2. An instrumented `dist` build (`-Cprofile-generate`) in its own target directory, so that the
#    flags never invalidate the normal builds.
# 3. Training, on loopback, bounded in time: `edgeroute-lab` runs the instrumented binary's
#    servers under load and stops them with SIGTERM (each writes its profile as it exits):
#    - `bench gateway --router --endpoints all`: the simulator, the node (JWT, limits, chat as
#      JSON and SSE, embeddings, completions, transcriptions, speech), discovery and the router,
#      at a light and a heavy rate;
#    - `bench soak`: the same node beside hostile requests (slow bodies, oversize and beyond-
#      context prompts, bad tokens, abandoned streams), so the refusal paths are not cold;
#    - `bench dns`: `edgeroute dns` under dnsperf, and a failover.
#    A server that was never run in training is still built, only without a profile to guide it.
# 4. The profiles are merged, and the `dist` build runs again with `-Cprofile-use`, linked with
#    `-z keep-text-section-prefix`: LLVM puts the functions the profile found hot in `.text.hot.*`
#    sections and the cold ones in `.text.unlikely.*`, and the flag has the linker keep them
#    apart, so the request path's code sits together (about 1.7 MB of hot code instead of
#    spread over 20 MB of `.text`; BENCHMARKS.md, "Hot code kept together").
#
# --out           where the binary goes (default $TARGET/dist-pgo/edgeroute)
# --keep-profile  also copy the merged profile there (merged.profdata)
#
# The training needs `edgeroute-lab` (built here, release). Two full `dist` builds and about 5
# minutes of training: about 30 minutes on 2 cores the first time. BENCHMARKS.md
# ("Profile-guided build") has what it changes.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
OUT="$TARGET/dist-pgo/edgeroute"
KEEP=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --keep-profile) KEEP="$2"; shift 2 ;;
    *) echo "build-pgo: unknown argument $1" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

LLVM_MAJOR="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
[ -n "$LLVM_MAJOR" ] || { echo "build-pgo: cannot read rustc's LLVM version" >&2; exit 1; }
PROFDATA="$(command -v "llvm-profdata-$LLVM_MAJOR" || true)"
if [ -z "$PROFDATA" ]; then
  step "installing llvm-$LLVM_MAJOR (llvm-profdata for rustc's LLVM $LLVM_MAJOR)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$LLVM_MAJOR" >&2 \
    || { as_root apt-get update -qq >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$LLVM_MAJOR" >&2; }
  PROFDATA="$(command -v "llvm-profdata-$LLVM_MAJOR")"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgeroute-pgo.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# Fixed paths, so that RUSTFLAGS (which cargo fingerprints) are the same each run and a second
# run rebuilds only what changed; rustc tracks the profile's contents itself.
RAW="$TARGET/pgo-gen/profraw"
MERGED="$TARGET/pgo-use/merged.profdata"
rm -rf "$RAW"
mkdir -p "$RAW" "$(dirname "$MERGED")"

step "instrumented build (cargo build --profile dist, -Cprofile-generate) in $TARGET/pgo-gen"
CARGO_TARGET_DIR="$TARGET/pgo-gen" RUSTFLAGS="-Cprofile-generate=$RAW" \
  cargo build --profile dist --locked -p edgeroute >&2
GEN="$TARGET/pgo-gen/dist/edgeroute"
# RUSTFLAGS also instrumented the build scripts and proc macros, which wrote profiles as they ran.
rm -f "$RAW"/*.profraw

# The same package set as scripts/bench.sh's build, so the two share their artifacts (building
# the lab alone would unify dependency features differently and rebuild them).
step "edgeroute-lab (release), the training's driver"
cargo build --release --locked -p edgeroute -p edgeroute-lab >&2
LAB="$TARGET/release/edgeroute-lab"

step "training: the gateway benchmark (sim, node, discovery, router; every endpoint)"
"$LAB" bench gateway --edgeroute "$GEN" --litellm none --nginx none --router --endpoints all \
  --rates 200,2000 --duration-s 3 --rounds 1 --work-dir "$WORK/gateway" >"$WORK/gateway.md"
step "training: the soak (hostile requests beside well-behaved ones)"
"$LAB" bench soak --edgeroute "$GEN" --duration-s 10 >"$WORK/soak.md"
step "training: the GeoDNS server under dnsperf (scripts/setup-dnsbench.sh installs it)"
bash scripts/setup-dnsbench.sh >&2
"$LAB" bench dns --edgeroute "$GEN" --pdns none --rates 20000 --duration-s 3 --trials 1 \
  --work-dir "$WORK/dns" >"$WORK/dns.md"

shopt -s nullglob
profiles=("$RAW"/*.profraw)
[ "${#profiles[@]}" -gt 0 ] || { echo "build-pgo: training wrote no profile (did the servers exit on SIGTERM?)" >&2; exit 1; }
step "merging ${#profiles[@]} profiles"
"$PROFDATA" merge -o "$MERGED" "${profiles[@]}"
[ -z "$KEEP" ] || { mkdir -p "$KEEP"; cp "$MERGED" "$KEEP/"; }

step "optimised build (cargo build --profile dist, -Cprofile-use) in $TARGET/pgo-use"
CARGO_TARGET_DIR="$TARGET/pgo-use" \
  RUSTFLAGS="-Cprofile-use=$MERGED -Clink-arg=-Wl,-z,keep-text-section-prefix" \
  cargo build --profile dist --locked -p edgeroute >&2
# The profile reached the code generator only if hot code was laid out on its own.
readelf -S -W "$TARGET/pgo-use/dist/edgeroute" | grep -q ' \.text\.hot ' \
  || { echo "build-pgo: no .text.hot section: the profile did not guide the build" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
cp "$TARGET/pgo-use/dist/edgeroute" "$OUT"
echo "$OUT"
