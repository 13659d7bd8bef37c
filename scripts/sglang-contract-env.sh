#!/usr/bin/env bash
# Builds .venv-sglang: the SGLang contract-test environment (CPU torch, sglang==0.5.23 without its CUDA stack,
# the pure-Python modules its imports need, torchvision stubbed, this project installed editable).
# Idempotent: one stamp holds the hash of what shapes the environment (this script, the requirements), another
# that of pyproject.toml, so a pyproject edit only reinstalls the project. Unchanged stamps exit at once.
# Caches nothing outside the checkout (pip runs with --no-cache-dir; the .pth points into the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Keep every cache that pip, sglang (SGLANG_CACHE_DIR: triton/inductor dirs) or Hugging Face might touch inside.
export SGLANG_CACHE_DIR=$ROOT/.cache/sglang XDG_CACHE_HOME=$ROOT/.cache HF_HOME=$ROOT/.cache/huggingface
PYTHON=${PYTHON:-python3.11}
VENV=.venv-sglang
REQ=scripts/sglang-contract-requirements.txt
ENV_KEY=$(cat "$0" "$REQ" | sha256sum | cut -c1-16)
PROJECT_KEY=$(sha256sum pyproject.toml | cut -c1-16)
PIP=("$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check)
start=$(date +%s)

if [ "$(cat "$VENV/.env-stamp" 2>/dev/null)" != "$ENV_KEY" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "error: the SGLang contract environment needs Python 3.11 (sglang 0.5.23 ships cp311 wheels); set PYTHON" >&2
    exit 1
  }
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # torch first and pinned: an unpinned torch (or sglang's own torch==2.14.1 pin) would pull a multi-GB CUDA build.
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" --no-deps -r "$REQ"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$ROOT/tests/contract/stubs" > "$SITE/tide-contract-stubs.pth"
  rm -f "$VENV/.project-stamp"
  echo "$ENV_KEY" > "$VENV/.env-stamp"
fi

if [ "$(cat "$VENV/.project-stamp" 2>/dev/null)" != "$PROJECT_KEY" ]; then
  "${PIP[@]}" --no-deps -e .  # also registers the sglang.srt.plugins entry point from pyproject.toml
  "$VENV/bin/python" -W ignore -c '
import sglang.srt.plugins.hook_registry, sglang.srt.server_args
import sglang.srt.speculative.eagle_worker_v2, sglang.srt.models.llama_eagle3
import tide_sglang.plugin.hooks
' 2>/dev/null || {
    echo "error: sglang or the plugin does not import in $VENV; run the imports above to see what is missing" >&2
    exit 1
  }
  echo "$PROJECT_KEY" > "$VENV/.project-stamp"
  echo "$VENV ready in $(( $(date +%s) - start )) s" >&2
fi
