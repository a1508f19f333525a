#!/usr/bin/env bash
# Builds the edgeroute container image without a daemon or a registry (issue 18): buildah from
# `scratch`, holding only the binary, the shared libraries `ldd` says it loads, a passwd entry
# for its non-root user and a writable /tmp. One image, several commands: `node`, `discovery`,
# `router`, `dns`, `watch`, `sim`, `proxy` (the entrypoint is the binary; the command picks).
#
#   scripts/build-image.sh [--binary PATH] [--out DIR] [--tag TAG]
#
# --binary  default target/dist-pgo/edgeroute, built with scripts/build-pgo.sh when missing: the
#           `dist` profile (release with fat LTO and one codegen unit, Cargo.toml) guided by a
#           profile of a trained run, what ships; see BENCHMARKS.md, "Profile-guided build".
#           `--binary target/dist/edgeroute` ships the plain `dist` build instead
# --out     an OCI image layout directory (default target/image); load it with
#           `skopeo copy oci:target/image:TAG docker-daemon:edgeroute:TAG`, push it with
#           `skopeo copy oci:... docker://REGISTRY/edgeroute:TAG`, or unpack it with umoci
# --tag     default the crate version
#
# Needs buildah (Debian's; root, or a user with subuids). Storage is a private vfs store under
# the output directory, removed afterwards: nothing is left in /var/lib/containers.
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_BINARY="${CARGO_TARGET_DIR:-target}/dist-pgo/edgeroute"
BINARY="$DEFAULT_BINARY"
OUT=target/image
TAG="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v buildah >/dev/null || { echo "build-image: buildah is missing (apt-get install buildah)" >&2; exit 1; }
if [ ! -x "$BINARY" ]; then
  [ "$BINARY" = "$DEFAULT_BINARY" ] || { echo "build-image: no executable at $BINARY" >&2; exit 1; }
  bash scripts/build-pgo.sh --out "$BINARY" >/dev/null
fi

# The image's one user: not root, no shell, no home (numeric so runAsNonRoot can verify it).
UID_=65532
STORE="$(mktemp -d "${TMPDIR:-/tmp}/edgeroute-image.XXXXXX")"
trap 'buildah --storage-driver vfs --root "$STORE/root" --runroot "$STORE/run" rm -a >/dev/null 2>&1 || true; rm -rf "$STORE"' EXIT
b() { buildah --storage-driver vfs --root "$STORE/root" --runroot "$STORE/run" "$@"; }

ROOTFS="$STORE/rootfs"
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/etc" "$ROOTFS/tmp"
chmod 1777 "$ROOTFS/tmp"
install -m 0755 "$BINARY" "$ROOTFS/usr/local/bin/edgeroute"
# Its runtime libraries, at the paths the dynamic linker looks for them.
ldd "$BINARY" | awk '/=> \// { print $3 } /^\s*\/[^ ]+ \(/ { print $1 }' | sort -u | while read -r lib; do
  mkdir -p "$ROOTFS$(dirname "$lib")"
  cp -L "$lib" "$ROOTFS$lib"
done
printf 'root:x:0:0:root:/nonexistent:/sbin/nologin\nedgeroute:x:%s:%s:edgeroute:/nonexistent:/sbin/nologin\n' "$UID_" "$UID_" > "$ROOTFS/etc/passwd"
printf 'root:x:0:\nedgeroute:x:%s:\n' "$UID_" > "$ROOTFS/etc/group"
printf 'hosts: files dns\n' > "$ROOTFS/etc/nsswitch.conf"

CTR="$(b from scratch)"
b copy "$CTR" "$ROOTFS/" / >/dev/null
b config \
  --user "$UID_:$UID_" \
  --workingdir /tmp \
  --entrypoint '["/usr/local/bin/edgeroute"]' \
  --cmd '["--help"]' \
  --env EDGEROUTE_LOG=info \
  --port 8080 --port 7070 --port 8089 --port 5353/udp --port 5353/tcp \
  --label org.opencontainers.image.title=edgeroute \
  --label org.opencontainers.image.version="$TAG" \
  --label org.opencontainers.image.description="edgeroute: node, discovery, router, dns, watch, sim, proxy" \
  "$CTR"
mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT"
b commit --quiet --format oci "$CTR" "oci:$OUT:$TAG" >/dev/null
echo "$OUT:$TAG"
