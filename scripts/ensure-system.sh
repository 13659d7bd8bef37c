#!/usr/bin/env bash
# Installs the Debian packages TIDE needs when they are missing: redis-server/redis-cli (tests, benchmarks and the
# demo start their own private server from this binary; nothing relies on a system service) and debian-handbook
# (French and German text for the non-English workload).
set -euo pipefail
missing=()
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
[ -d /usr/share/doc/debian-handbook ] || missing+=(debian-handbook)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)  # chart tests
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing with apt-get: ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "error: missing ${missing[*]} and this user cannot run apt-get (no root, no passwordless sudo)." >&2
    echo "       install them yourself: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
install() { $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
install 2>/dev/null || { $SUDO apt-get update -q >/dev/null && install; } || {
  echo "error: apt-get could not install ${missing[*]}" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "error: redis-server still not on PATH after apt-get" >&2; exit 1; }
