#!/usr/bin/env bash
# Builds an SGLang contract-test environment (CPU torch, sglang without its CUDA stack, the pure-Python modules its
# imports need, torchvision stubbed, this project installed editable) for one supported release:
#   scripts/sglang-contract-env.sh                        -> .venv-sglang        from scripts/sglang-contract-requirements.txt (0.5.23)
#   SGLANG_VERSION=0.5.17 scripts/sglang-contract-env.sh  -> .venv-sglang-0.5.17 from scripts/sglang-contract-requirements-0.5.17.txt
# Idempotent: one stamp holds the hash of what shapes the environment (this script, the requirements), another
# that of pyproject.toml, so a pyproject edit only reinstalls the project. Unchanged stamps exit at once.
# The venv's .sglang-pin records the release it was built for (tests/contract/test_registration.py checks it).
# Caches nothing outside the checkout (pip runs with --no-cache-dir; the .pth points into the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Keep every cache that pip, sglang (SGLANG_CACHE_DIR: triton/inductor dirs) or Hugging Face might touch inside.
export SGLANG_CACHE_DIR=$ROOT/.cache/sglang XDG_CACHE_HOME=$ROOT/.cache HF_HOME=$ROOT/.cache/huggingface
PYTHON=${PYTHON:-python3.11}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
if [ "$SGLANG_VERSION" = 0.5.23 ]; then
  VENV=.venv-sglang
  REQ=scripts/sglang-contract-requirements.txt
else
  VENV=.venv-sglang-$SGLANG_VERSION
  REQ=scripts/sglang-contract-requirements-$SGLANG_VERSION.txt
fi
[ -f "$REQ" ] || { echo "error: no contract requirements for sglang $SGLANG_VERSION ($REQ)" >&2; exit 1; }
grep -qx "sglang==$SGLANG_VERSION" "$REQ" || { echo "error: $REQ does not pin sglang==$SGLANG_VERSION" >&2; exit 1; }
ENV_KEY=$(cat "$0" "$REQ" | sha256sum | cut -c1-16)
PROJECT_KEY=$(sha256sum pyproject.toml | cut -c1-16)
PIP=("$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check)
start=$(date +%s)

if [ "$(cat "$VENV/.env-stamp" 2>/dev/null)" != "$ENV_KEY" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "error: the SGLang contract environment needs Python 3.11 (sglang $SGLANG_VERSION ships cp311 wheels); set PYTHON" >&2
    exit 1
  }
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # torch first and pinned: an unpinned torch (or sglang's own torch pin: 2.11.0 in 0.5.17, 2.14.1 in 0.5.23) would
  # pull a multi-GB CUDA build. 2.13.0 CPU serves both releases: the tests only import and build modules on the CPU.
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" --no-deps -r "$REQ"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$ROOT/tests/contract/stubs" > "$SITE/tide-contract-stubs.pth"
  rm -f "$VENV/.project-stamp"
  echo "$SGLANG_VERSION" > "$VENV/.sglang-pin"
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
