"""SGLang contract tests: the plugin against the real sglang modules, on CPU, for the oldest and the newest
supported release (0.5.17 and 0.5.23).

They run inside .venv-sglang (0.5.23) and .venv-sglang-0.5.17 (scripts/sglang-contract-env.sh builds them; run
`.venv-sglang/bin/pytest tests/contract`, or `make contract` for both). In an environment without SGLang (the
main .venv) they are not collected. Where the two releases differ, the fixtures that build SGLang objects adapt
(each difference is commented where it is handled); the tests' assertions are the same for both.
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


@pytest.fixture(autouse=True)
def tide_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `tide serve` and the operator set: without it the entry point patches nothing."""
    monkeypatch.setenv("TIDE_ENABLED", "1")


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("target"))


@contextmanager
def sglang_model_context(server_args) -> Iterator[None]:
    """SGLang's process context for building modules outside a scheduler: the published config bags, and the
    single-process ranks a launcher would stamp (there is no process group on a CPU test machine)."""
    import sglang.srt.runtime_context as rc

    pp = types.SimpleNamespace(is_last_rank=True, is_first_rank=True, world_size=1, rank_in_group=0)
    with _published(rc, server_args, pp), rc.get_parallel().override(pp_group=pp, tp_rank=0, attn_tp_rank=0):
        yield


# 0.5.17 reads the tensor-parallel width live from `parallel_state` (which asserts the process group exists);
# 0.5.23 derives it from the context's config, so only 0.5.17 needs it forced.
_WIDTHS_0_5_17 = {"tp_size": 1}


@contextmanager
def _published(rc: types.ModuleType, server_args, pp: types.SimpleNamespace) -> Iterator[None]:
    """The config bags of `server_args`, as a scheduler process sees them, for the duration of the block.

    0.5.23: `create_context` builds a model-owned context and `use_context` activates it, restoring the
    previous one on exit. 0.5.17 has neither: its only way is the process-wide `publish(server_args,
    role=...)`, undone by `reset_context()` (a test process has nothing published before). 0.5.17's
    `LlamaForCausalLMEagle3` also reads the pipeline group from `parallel_state.get_pp_group()` rather than
    `get_parallel().pp_group`, so the override does not reach it: the group is set there too."""
    if hasattr(rc, "create_context"):
        with rc.use_context(rc.create_context(server_args, role="scheduler")):
            yield
        return
    from sglang.srt.distributed import parallel_state

    previous_pp = parallel_state._PP
    rc.publish(server_args, role="scheduler")
    parallel_state._PP = pp
    try:
        with rc.get_parallel().override(**_WIDTHS_0_5_17):
            yield
    finally:
        parallel_state._PP = previous_pp
        rc.reset_context()
