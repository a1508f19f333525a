#!/usr/bin/env bash
# Installs LiteLLM's proxy (a pinned `litellm[proxy]` from PyPI) into its own venv, for the
# gateway-overhead benchmark's LiteLLM row (`edgeroute-lab bench gateway`):
#   ${EDGEROUTE_CACHE:-~/.cache/edgeroute}/litellm-venv/bin/litellm
# Idempotent: a marker records the installed pin, so a later run returns at once.
#
# Why 1.106.0 (published 2026-10-18): litellm releases have been hijacked on PyPI before (1.82.7
# and 1.82.8 in March 2026; 1.107.0 was withdrawn later), so the pin predates the last
# withdrawal; and every later release requires certifi>=2026.10.19, which the registry does not
# have (its newest is 2026.10.18), so they cannot be installed here.
# Supply chain: the litellm wheel itself is installed first with
# `--require-hashes` against the digests PyPI published for this pin (Linux wheels), its
# dependencies after; an installed litellm that drops a `.pth` start-up hook (how 1.82.8 ran
# on every Python start) is refused. To move the pin, update VERSION and the digests together.
set -euo pipefail
CACHE="${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute}"
VENV="$CACHE/litellm-venv"
VERSION="1.106.0"
HASHES=(
  # litellm-1.106.0-cp310-abi3-manylinux_2_28_x86_64.whl
  eeb604f06c27ab5373e2e05e4c1f14980fd87de3a09bd9a9dc2ddab7069bd34e
  # litellm-1.106.0-cp310-abi3-manylinux_2_28_aarch64.whl
  f1c5de99aa3c8ce6fa5b0b940a701b219714db47ce406b194fe530712eb7b9aa
  # litellm-1.106.0-cp310-abi3-musllinux_1_2_x86_64.whl
  a570458fbfd3d760f8e8176bf67e3519c380894324425723ac0e843d94e812f0
  # litellm-1.106.0-cp310-abi3-musllinux_1_2_aarch64.whl
  8a4ef54208bd36295fefae37004846edc23e20640803e81abddb02e073aa6ab6
)
MARKER="$VENV/.edgeroute-litellm-ok"
WANT="litellm[proxy]==$VERSION"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] && [ -x "$VENV/bin/litellm" ]; then
  echo "setup-litellm: $WANT already in $VENV" >&2
  exit 0
fi

mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
echo "setup-litellm: installing $WANT into $VENV (one-off, about a minute)" >&2

reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
{
  printf 'litellm==%s' "$VERSION"
  for h in "${HASHES[@]}"; do printf ' --hash=sha256:%s' "$h"; done
  printf '\n'
} > "$reqs"
# Only binary wheels, so that --require-hashes never falls back to building the sdist.
"${PIP[@]}" --no-deps --only-binary=:all: --require-hashes -r "$reqs"
# The proxy's dependencies; litellm itself is already the verified wheel.
"${PIP[@]}" "$WANT"

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ls "$site"/*.pth 2>/dev/null | xargs -r grep -l -i litellm >/dev/null 2>&1 \
  || ls "$site"/litellm*.pth >/dev/null 2>&1; then
  echo "setup-litellm: refusing: a litellm .pth start-up hook is installed in $site" >&2
  exit 1
fi
got=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("litellm"))')
if [ "$got" != "$VERSION" ]; then
  echo "setup-litellm: expected litellm $VERSION, found $got" >&2
  exit 1
fi
echo "$WANT" > "$MARKER"
echo "setup-litellm: $WANT in $VENV" >&2
