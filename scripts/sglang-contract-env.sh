#!/usr/bin/env bash
# Builds .venv-sglang: the SGLang contract-test environment (CPU torch, sglang==0.5.23 without its CUDA stack,
# the pure-Python modules its imports need, torchvision stubbed, this project installed editable).
# Idempotent: a stamp holds the hash of everything that shapes the environment; an unchanged stamp exits at once.
# Caches nothing outside the checkout (pip runs with --no-cache-dir; the .pth points into the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Keep every cache that pip, sglang (SGLANG_CACHE_DIR: triton/inductor dirs) or Hugging Face might touch inside.
export SGLANG_CACHE_DIR=$ROOT/.cache/sglang XDG_CACHE_HOME=$ROOT/.cache HF_HOME=$ROOT/.cache/huggingface
PYTHON=${PYTHON:-python3.11}
VENV=.venv-sglang
REQ=scripts/sglang-contract-requirements.txt
STAMP=$VENV/.contract-stamp
KEY=$(cat "$0" "$REQ" pyproject.toml | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "error: the SGLang contract environment needs Python 3.11 (sglang 0.5.23 ships cp311 wheels); set PYTHON" >&2
  exit 1
}
start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check)
# torch first and pinned: an unpinned torch (or sglang's own torch==2.14.1 pin) would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps -r "$REQ"
"${PIP[@]}" --no-deps -e .
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ROOT/tests/contract/stubs" > "$SITE/tide-contract-stubs.pth"
"$VENV/bin/python" -W ignore -c '
import sglang.srt.plugins.hook_registry, sglang.srt.server_args
import sglang.srt.speculative.eagle_worker_v2, sglang.srt.models.llama_eagle3
' 2>/dev/null || {
  echo "error: sglang modules do not import in $VENV; run the import above to see what is missing" >&2
  exit 1
}
echo "$KEY" > "$STAMP"
echo "$VENV ready in $(( $(date +%s) - start )) s" >&2
