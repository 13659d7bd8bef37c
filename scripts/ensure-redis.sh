#!/usr/bin/env bash
# Installs redis-server (and redis-cli) with apt when missing. Tests, benchmarks and the demo start their own
# private server from this binary; nothing relies on a system service.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  exit 0
fi
echo "redis-server not found: installing it with apt-get" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "error: redis-server is missing and this user cannot run apt-get (no root, no sudo)." >&2
    echo "       install it yourself: apt-get install redis-server  (or put redis-server on PATH)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null
} || { echo "error: apt-get could not install redis-server" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "error: redis-server still not on PATH after apt-get" >&2; exit 1; }
