"""SGLang contract tests: the plugin against the real sglang 0.5.23 modules, on CPU.

They run inside .venv-sglang (scripts/sglang-contract-env.sh builds it; run `.venv-sglang/bin/pytest
tests/contract`). In an environment without SGLang (the main .venv) they are not collected.
"""

import importlib.util
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

if importlib.util.find_spec("sglang") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    # Whatever SGLang or Hugging Face would cache stays inside the checkout.
    os.environ.setdefault("SGLANG_CACHE_DIR", str(ROOT / ".cache" / "sglang"))
    os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "huggingface"))


def pytest_configure(config: pytest.Config) -> None:
    # SGLang warns at import that its CUDA-only kernels are unavailable on this CPU machine: expected here.
    for line in ("ignore:Only CUDA:UserWarning", "ignore:Triton is not supported:UserWarning",
                 "ignore::DeprecationWarning", "ignore::FutureWarning"):
        config.addinivalue_line("filterwarnings", line)


def tiny_target(path: Path) -> Path:
    """A two-layer Llama config the draft below fits (SGLang reads only config.json for what is tested)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, vocab_size=100, num_hidden_layers=3, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("target"))


@contextmanager
def sglang_model_context(server_args) -> Iterator[None]:
    """SGLang's process context for building modules outside a scheduler: the published config bags, and the
    single-process ranks a launcher would stamp (there is no process group on a CPU test machine)."""
    from sglang.srt.runtime_context import create_context, get_parallel, use_context

    pp = types.SimpleNamespace(is_last_rank=True, is_first_rank=True, world_size=1, rank_in_group=0)
    with use_context(create_context(server_args, role="scheduler")), \
            get_parallel().override(pp_group=pp, tp_rank=0, attn_tp_rank=0):
        yield
