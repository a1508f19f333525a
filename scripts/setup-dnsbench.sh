#!/usr/bin/env bash
# Installs what the GeoDNS benchmark's reference rows need (docs/pdns-bench-notes.md): dnsperf (the
# load generator), PowerDNS Authoritative with its bind and geoip backends (the reference server,
# Lua records with ifurlup health checks), and dig. Debian 12 packages: pdns 4.7.3, dnsperf 2.10.0.
# Idempotent: installs only the packages that are missing, and runs `apt-get update` only when an
# install fails (a machine whose package lists are stale). Works as root, or as a user with sudo.
# The benchmark starts its own pdns_server (its own config dir, 127.0.0.1:5302); a system service
# that the package may have started is stopped and disabled here.
set -euo pipefail

PACKAGES=(dnsperf pdns-server pdns-backend-bind pdns-backend-geoip bind9-dnsutils)

step() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done

if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  apt_install() { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2; }
  if ! apt_install "${missing[@]}"; then
    step "install failed: apt-get update, then once more"
    as_root apt-get update -qq >&2
    apt_install "${missing[@]}"
  fi
  # Debian's pdns-server enables and starts pdns.service where services may start (systemd):
  # it would listen on port 53 and poll for security updates over the network. The benchmark
  # runs its own server, so stop and disable the system one.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now pdns >/dev/null 2>&1 || true
  fi
fi

for b in dnsperf pdns_server pdnsutil pdns_control dig; do
  command -v "$b" >/dev/null || { echo "setup-dnsbench: $b not found after install" >&2; exit 1; }
done
for m in libbindbackend.so libgeoipbackend.so; do
  ls /usr/lib/*/pdns/"$m" >/dev/null 2>&1 || { echo "setup-dnsbench: pdns module $m not found" >&2; exit 1; }
done
printf 'pdns_server %s, %s, dig %s\n' \
  "$(dpkg-query -W -f='${Version}' pdns-server)" \
  "$(dnsperf -h 2>&1 | sed -n 's/^Version /dnsperf /p')" \
  "$(dig -v 2>&1 | awk '{print $2}')" >&2
