#!/usr/bin/env bash
# On the CPU machine: build .gpu/ (gitignored) with what the lent GPU machine lacks, in pieces that fit one `run`
# call each (64 MiB): cp312 wheels of TIDE's light dependencies, redis-server with its two uncommon libraries,
# the SmolLM2 GGUF split in two, and workload snapshots (the GPU machine has no package registry).
#   call 1 carries .gpu/wheels .gpu/redis .gpu/gguf-a .cache/workloads ; call 2 carries .gpu/gguf-b
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
mkdir -p .gpu/wheels .gpu/redis .gpu/gguf-a .gpu/gguf-b
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels \
  pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types redis hiredis xxhash \
  click rich markdown-it-py mdurl pygments prometheus-client gguf accelerate
cp /usr/bin/redis-server /usr/bin/redis-cli .gpu/redis/
cp -L /lib/x86_64-linux-gnu/liblzf.so.1 /lib/x86_64-linux-gnu/libjemalloc.so.2 .gpu/redis/
gguf=$($PY -c 'from tide_sglang.draft.target import smollm2_gguf; print(smollm2_gguf())')
head -c 50000000 "$gguf" > .gpu/gguf-a/part
tail -c +50000001 "$gguf" > .gpu/gguf-b/part
sha256sum "$gguf" | cut -c1-64 > .gpu/gguf-b/sha256
PYTHONPATH=$PWD $PY scripts/gpu/payload.py snapshots
du -sh .gpu/* .cache/workloads
